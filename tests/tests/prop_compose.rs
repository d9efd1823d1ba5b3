//! Property: a restore composes each chunk newest delta first, and that gives the same bytes
//! as applying the chain oldest first (docs/FORMATS.md, "Applying a chain"), computed here
//! independently from the blobs in the store; and both equal the checkpointed source.
//!
//! The chains come from real checkpoints: random pages per step, growth and shrinking, and
//! a cost model that lets chains grow deep but re-bases a chunk when its chain reaches the
//! depth limit or too many of its pages change. Restores run with random memory bounds
//! (down to one byte, smaller than any delta) and chunk concurrency, from a fresh state
//! directory that knows only the store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use cairn_core::delta::DeltaView;
use cairn_core::{keys, BlobRef, DbId, Generation, PagesState, TenantId};
use cairn_orchestrator::{Checkpointer, Config, CostModel, Env, GenerationState, Source};
use cairn_remote_store::RemoteStore;
use proptest::prelude::*;

const PAGE: usize = 512;

#[derive(Clone, Debug)]
enum Change {
    /// Overwrite `count` pages from `page` (modulo the page count) with a pattern.
    Write { page: usize, count: usize, byte: u8 },
    /// Append pages.
    Grow { pages: usize },
    /// Drop pages from the end.
    Shrink { pages: usize },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        6 => (0usize..1000, 1usize..4, any::<u8>())
            .prop_map(|(page, count, byte)| Change::Write { page, count, byte }),
        // Enough pages at once to make a chunk too dirty for a delta: a re-base.
        1 => (0usize..1000, 4usize..12, any::<u8>())
            .prop_map(|(page, count, byte)| Change::Write { page, count, byte }),
        1 => (1usize..10).prop_map(|pages| Change::Grow { pages }),
        1 => (1usize..10).prop_map(|pages| Change::Shrink { pages }),
    ]
}

fn rt() -> tokio::runtime::Runtime {
    cairn_tests::fixtures::runtime().unwrap()
}

fn apply(data: &mut Vec<u8>, c: &Change, salt: usize) {
    match *c {
        Change::Write { page, count, byte } if !data.is_empty() => {
            let pages = data.len() / PAGE;
            for k in 0..count {
                let p = (page + k) % pages;
                for (i, b) in data[p * PAGE..(p + 1) * PAGE].iter_mut().enumerate() {
                    *b = byte ^ (i as u8) ^ (salt as u8);
                }
            }
        }
        Change::Write { .. } => {}
        Change::Grow { pages } => {
            let start = data.len();
            data.extend((0..pages * PAGE).map(|i| ((start + i) % 253) as u8 ^ (salt as u8)));
        }
        Change::Shrink { pages } => {
            let keep = data.len().saturating_sub(pages * PAGE);
            data.truncate(keep);
        }
    }
}

async fn fetch(store: &RemoteStore, (t, db): (&TenantId, &DbId), blob: &BlobRef) -> Vec<u8> {
    let key = keys::blob_key(t, db, blob);
    let mut buf = Vec::new();
    store
        .get_blob(&key, blob, |off, bytes| {
            buf.truncate(off as usize);
            buf.extend_from_slice(bytes);
            Ok(())
        })
        .await
        .unwrap();
    buf
}

/// The reference: every chunk's base, clamped to the chunk's length, then its deltas'
/// pages, oldest first, clamped the same way.
async fn oldest_first(store: &RemoteStore, g: &GenerationState) -> Vec<u8> {
    let p = pages(g);
    let m = (&g.manifest.tenant, &g.manifest.db);
    let mut out = vec![0u8; p.len as usize];
    for c in &p.chunks {
        let at = (c.index * p.chunk_size) as usize;
        let chunk = &mut out[at..at + c.len as usize];
        let base = fetch(store, m, &c.base).await;
        let n = base.len().min(chunk.len());
        chunk[..n].copy_from_slice(&base[..n]);
        for d in &c.deltas {
            let payload = fetch(store, m, d).await;
            let view = DeltaView::parse("d", &payload, c.index, c.base.crc64, p.page_size).unwrap();
            for (page, bytes) in view.iter() {
                let at = page as usize * p.page_size as usize;
                if at < chunk.len() {
                    let n = bytes.len().min(chunk.len() - at);
                    chunk[at..at + n].copy_from_slice(&bytes[..n]);
                }
            }
        }
    }
    out
}

fn pages(g: &GenerationState) -> &PagesState {
    g.state.pages.as_ref().expect("a page generation")
}

/// Chains seen: (deepest chain, a chunk re-based after having deltas, a chain whose base
/// is shorter than its chunk, one whose base is longer).
fn shapes(g: &GenerationState, prev: Option<&GenerationState>) -> (usize, bool, bool, bool) {
    let Some(p) = g.state.pages.as_ref() else {
        return (0, false, false, false);
    };
    let prev_chunks = prev.and_then(|g| g.state.pages.as_ref().map(|p| &p.chunks));
    let deepest = p.chunks.iter().map(|c| c.deltas.len()).max().unwrap_or(0);
    let rebased = p.chunks.iter().any(|c| {
        c.deltas.is_empty()
            && prev_chunks
                .and_then(|pc| pc.get(c.index as usize))
                .is_some_and(|old| !old.deltas.is_empty() && old.base != c.base)
    });
    let grown = p.chunks.iter().any(|c| c.base.len < c.len);
    let shrunk = p.chunks.iter().any(|c| c.base.len > c.len);
    (deepest, rebased, grown, shrunk)
}

fn open(dir: &Path, store: &RemoteStore, chunk_pages: u64, depth: usize) -> Checkpointer {
    let mut cfg = Config::new(dir).unwrap();
    cfg.chunk_size = chunk_pages * PAGE as u64;
    cfg.cost_model = CostModel {
        max_chain_depth: depth,
        object_cost_bytes: 0,
        restore_weight: 0.01,
        max_dirty_fraction: 0.5,
    };
    Checkpointer::open_with(cfg, store.clone(), Env::fixed(0, 7)).unwrap()
}

/// Checkpoints `steps` and checks every generation; returns the shapes seen.
fn run(
    initial: usize,
    chunk_pages: u64,
    depth: usize,
    steps: &[Vec<Change>],
    memory: u64,
    concurrency: usize,
) -> (usize, bool, bool, bool) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "memory://compose-{}",
        dir.path().display().to_string().replace('/', "-")
    );
    let store = RemoteStore::open(&url).unwrap();
    let cp = open(&dir.path().join("state"), &store, chunk_pages, depth);
    let db = DbId::new("c").unwrap();
    let src = dir.path().join("src");
    let mut data: Vec<u8> = (0..initial * PAGE)
        .map(|i| (i / PAGE) as u8 ^ (i % 251) as u8)
        .collect();
    let mut snapshots: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut seen = (0, false, false, false);
    rt().block_on(async {
        for (salt, step) in steps.iter().enumerate() {
            for c in step {
                apply(&mut data, c, salt);
            }
            std::fs::write(&src, &data).unwrap();
            let source = Source::Pages {
                path: src.clone(),
                page_size: PAGE as u32,
            };
            let r = cp.checkpoint(&db, &source).await.unwrap();
            snapshots.insert(r.generation, data.clone());
        }
        // A fresh state directory restores from the store alone, under the bounds drawn.
        let mut cfg = Config::new(dir.path().join("restorer")).unwrap();
        cfg.restore_memory = memory;
        cfg.download_concurrency = concurrency;
        let restorer = Checkpointer::open_with(cfg, store.clone(), Env::fixed(0, 8)).unwrap();
        let mut prev: Option<GenerationState> = None;
        for (g, want) in &snapshots {
            let m = restorer.state(&db, Some(Generation(*g))).await.unwrap();
            let s = shapes(&m, prev.as_ref());
            seen = (seen.0.max(s.0), seen.1 || s.1, seen.2 || s.2, seen.3 || s.3);
            let reference = oldest_first(&store, &m).await;
            assert!(
                reference == *want,
                "generation {g}: the oldest-first reference differs from the source"
            );
            let out = dir.path().join(format!("out-{g}"));
            let report = restorer
                .restore(&db, Some(Generation(*g)), &out)
                .await
                .unwrap();
            let got = std::fs::read(&out).unwrap();
            assert_eq!(got.len(), want.len(), "generation {g} length");
            let first_diff = got.iter().zip(reference.iter()).position(|(a, b)| a != b);
            assert_eq!(
                first_diff, None,
                "generation {g}: newest-first differs at byte {first_diff:?}"
            );
            let p = pages(&m);
            let blobs: u64 = p.chunks.iter().map(|c| 1 + c.deltas.len() as u64).sum();
            assert!(report.blobs_read <= blobs, "{report:?}");
            prev = Some(m);
        }
    });
    seen
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn newest_first_restores_equal_oldest_first_application(
        initial in 1usize..30,
        chunk_pages in 2u64..10,
        depth in 1usize..8,
        steps in proptest::collection::vec(proptest::collection::vec(change(), 1..5), 1..10),
        memory in prop_oneof![Just(1u64), Just(2000u64), Just(64 << 20)],
        concurrency in 1usize..4,
    ) {
        run(initial, chunk_pages, depth, &steps, memory, concurrency);
    }
}

/// The shapes the property is about all occur: deep chains, a re-based chunk, and bases
/// shorter and longer than their chunk.
#[test]
fn the_chains_drawn_include_deep_rebased_grown_and_shrunk_ones() {
    use Change::*;
    let w = |page| Write {
        page,
        count: 1,
        byte: page as u8,
    };
    let steps = vec![
        vec![w(1)],
        vec![w(2), Grow { pages: 2 }],
        vec![w(3)],
        vec![Shrink { pages: 3 }],
        vec![w(0)],
        vec![w(1)],
        // Chunk 0 is at the depth limit now: the next change re-bases it.
        vec![w(2)],
        vec![Write {
            page: 8,
            count: 7,
            byte: 9,
        }],
        vec![Grow { pages: 1 }, w(5)],
    ];
    let (deepest, rebased, grown, shrunk) = run(10, 8, 5, &steps, 1, 2);
    assert!(deepest >= 5, "deepest chain {deepest}");
    assert!(rebased && grown && shrunk, "{:?}", (rebased, grown, shrunk));
}
