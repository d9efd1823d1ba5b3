//! Property: for random sources and random sequences of changes, restoring every
//! generation gives exactly the bytes checkpointed for it (for segment directories: the
//! published stream, which keeps segments the engine deleted locally until a head
//! truncation drops them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use cairn_core::{DbId, DirtyTracker, Generation};
use cairn_orchestrator::{CheckpointOptions, Checkpointer, Config, Env, HeadOptions, Lsn, Source};
use cairn_remote_store::RemoteStore;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Change {
    /// Overwrite a page (index modulo the page count) with a byte pattern.
    Write { page: usize, byte: u8 },
    /// Append pages.
    Grow { pages: usize },
    /// Drop pages from the end.
    Shrink { pages: usize },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (0usize..1000, any::<u8>()).prop_map(|(page, byte)| Change::Write { page, byte }),
        1 => (1usize..20).prop_map(|pages| Change::Grow { pages }),
        1 => (1usize..20).prop_map(|pages| Change::Shrink { pages }),
    ]
}

fn rt() -> tokio::runtime::Runtime {
    cairn_tests::fixtures::runtime().unwrap()
}

const PAGE: usize = 1024;

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn every_page_generation_restores_exactly(
        initial in 0usize..40,
        chunk_pages in 1u64..9,
        steps in proptest::collection::vec(proptest::collection::vec(change(), 0..6), 1..6),
        tracked in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store_url = format!("memory://prop-{}", dir.path().display().to_string().replace('/', "-"));
        let mut cfg = Config::new(dir.path().join("state")).unwrap();
        cfg.chunk_size = chunk_pages * PAGE as u64;
        let cp = Checkpointer::open_with(cfg, RemoteStore::open(&store_url).unwrap(), Env::fixed(0, 1)).unwrap();
        let db = DbId::new("p").unwrap();
        let src = dir.path().join("src");
        let mut data: Vec<u8> = (0..initial * PAGE).map(|i| (i / PAGE) as u8 ^ (i % 251) as u8).collect();
        let mut snapshots: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let tracker = DirtyTracker::new(1 << 16);
        rt().block_on(async {
            for step in &steps {
                for c in step {
                    match *c {
                        Change::Write { page, byte } if !data.is_empty() => {
                            let p = page % (data.len() / PAGE);
                            data[p * PAGE..(p + 1) * PAGE].fill(byte);
                            tracker.mark(p as u64);
                        }
                        Change::Write { .. } => {}
                        Change::Grow { pages } => {
                            let start = data.len();
                            data.extend((0..pages * PAGE).map(|i| ((start + i) % 253) as u8));
                            // An engine marks every page it writes, appended ones included
                            // (they may lie below the previous checkpoint's end after a shrink).
                            for p in start / PAGE..data.len() / PAGE {
                                tracker.mark(p as u64);
                            }
                        }
                        Change::Shrink { pages } => {
                            let keep = data.len().saturating_sub(pages * PAGE);
                            data.truncate(keep);
                        }
                    }
                }
                std::fs::write(&src, &data).unwrap();
                // Either the engine's marks (pages past the old end need none) or digests.
                let opts = CheckpointOptions { dirty: tracked.then(|| tracker.drain()), ..Default::default() };
                let source = Source::Pages { path: src.clone(), page_size: PAGE as u32 };
                let r = cp.checkpoint_with(&db, &source, &opts).await.unwrap();
                snapshots.insert(r.generation, data.clone());
            }
            for (g, want) in &snapshots {
                let out = dir.path().join(format!("out-{g}"));
                cp.restore(&db, Some(Generation(*g)), &out).await.unwrap();
                let got = std::fs::read(&out).unwrap();
                assert_eq!(got.len(), want.len(), "generation {g} length");
                let first_diff = got.iter().zip(want.iter()).position(|(a, b)| a != b);
                assert_eq!(first_diff, None, "generation {g} differs at byte {first_diff:?}");
            }
        });
    }

    #[test]
    fn every_segment_generation_restores_exactly(
        batches in proptest::collection::vec((0usize..4, any::<bool>(), proptest::collection::vec(0usize..5000, 0..5)), 1..5),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store_url = format!("memory://prop-seg-{}", dir.path().display().to_string().replace('/', "-"));
        let cp = Checkpointer::open_with(
            Config::new(dir.path().join("state")).unwrap(),
            RemoteStore::open(&store_url).unwrap(),
            Env::fixed(0, 2),
        ).unwrap();
        let db = DbId::new("s").unwrap();
        let src = dir.path().join("wal");
        std::fs::create_dir_all(&src).unwrap();
        let mut next = 0usize;
        // The published stream: every segment written, minus what head truncation dropped.
        let mut stream: BTreeMap<String, (u64, Vec<u8>)> = BTreeMap::new();
        let mut end = 0u64;
        let mut snapshots = BTreeMap::new();
        rt().block_on(async {
            for (drop_head, truncate, lens) in &batches {
                // The engine deletes its oldest local segments (they are published) …
                let mut names: Vec<_> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().file_name()).collect();
                names.sort();
                for n in names.iter().take(*drop_head) {
                    std::fs::remove_file(src.join(n)).unwrap();
                }
                // … and sometimes truncates the published head below what it deleted.
                if *truncate && *drop_head > 0 {
                    if let Some(last) = names.get(drop_head.min(&names.len()).saturating_sub(1)) {
                        let last = last.to_string_lossy().into_owned();
                        let before = stream[&last].0 + stream[&last].1.len() as u64;
                        let opts = HeadOptions { force: true, ..Default::default() };
                        if let Some(g) = cp.truncate_head(&db, Lsn(before), &opts).await.unwrap().generation {
                            stream.retain(|_, (s, b)| *s + b.len() as u64 > before);
                            snapshots.insert(g, stream.clone());
                        }
                    }
                }
                for len in lens {
                    let bytes: Vec<u8> = (0..*len).map(|i| (i * 7 + next) as u8).collect();
                    let name = format!("{next:06}.seg");
                    std::fs::write(src.join(&name), &bytes).unwrap();
                    stream.insert(name, (end, bytes.clone()));
                    end += bytes.len() as u64;
                    next += 1;
                }
                let r = cp.checkpoint(&db, &Source::Segments(src.clone())).await.unwrap();
                snapshots.insert(r.generation, stream.clone());
            }
            for (g, want) in &snapshots {
                let out = dir.path().join(format!("out-{g}"));
                cp.restore(&db, Some(Generation(*g)), &out).await.unwrap();
                let want: BTreeMap<String, Vec<u8>> = want.iter().map(|(n, (_, b))| (n.clone(), b.clone())).collect();
                assert_eq!(cairn_tests::fixtures::read_dir_files(&out).unwrap(), want, "generation {g}");
            }
        });
    }
}
