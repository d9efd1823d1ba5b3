//! Property: a database with both streams, driven through random histories of page
//! checkpoints at LSNs, segment batches and head and tail truncations (long enough to cross
//! full-manifest boundaries of the differential manifests), restores exactly from the
//! bucket alone, from a fresh state directory, at every generation; and `restore_at`
//! picks the newest page checkpoint at or below each point and exactly the segments that
//! overlap the replay range.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use cairn_orchestrator::{
    CheckpointOptions, Checkpointer, Config, DbId, Env, Generation, HeadOptions, Lsn, RemoteStore,
    Source, MAX_DIFF_CHAIN,
};
use proptest::prelude::*;

const PAGE: usize = 512;

#[derive(Clone, Debug)]
enum Op {
    /// Change a few pages and checkpoint the page file at the WAL's end.
    Pages(Vec<(u8, u8)>),
    /// Seal segments of these sizes (in units of 37 bytes) and checkpoint them.
    Segments(Vec<u8>),
    /// Drop the head below the end of the segment at this position (modulo the count).
    Head(u8),
    /// Cut the tail after this many segments (from the end, modulo the count).
    Tail(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => proptest::collection::vec((any::<u8>(), any::<u8>()), 1..4).prop_map(Op::Pages),
        4 => proptest::collection::vec(1u8..6, 1..3).prop_map(Op::Segments),
        1 => any::<u8>().prop_map(Op::Head),
        1 => any::<u8>().prop_map(Op::Tail),
    ]
}

/// What a generation must restore to.
#[derive(Clone, Debug, PartialEq)]
struct Expect {
    pages: Option<(Vec<u8>, u64)>,
    wal: BTreeMap<String, (u64, Vec<u8>)>,
}

fn rt() -> tokio::runtime::Runtime {
    cairn_tests::fixtures::runtime().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3, ..ProptestConfig::default() })]

    #[test]
    fn random_two_stream_histories_restore_exactly_from_the_bucket_alone(
        ops in proptest::collection::vec(op(), (MAX_DIFF_CHAIN as usize + 6)..(MAX_DIFF_CHAIN as usize + 20)),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("store").display());
        let open = |state: &str| {
            let mut cfg = Config::new(dir.path().join(state)).unwrap();
            cfg.chunk_size = 4 * PAGE as u64;
            Checkpointer::open_with(cfg, RemoteStore::open(&url).unwrap(), Env::fixed(0, 3)).unwrap()
        };
        let db = DbId::new("two").unwrap();
        let page_file = dir.path().join("pages");
        let wal_dir = dir.path().join("wal");
        std::fs::create_dir_all(&wal_dir).unwrap();
        let mut data = vec![7u8; 10 * PAGE];
        let mut expect: BTreeMap<u64, Expect> = BTreeMap::new();
        let mut cur = Expect { pages: None, wal: BTreeMap::new() };
        let mut page_history: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut end = 0u64;
        let mut seq = 0u32;
        rt().block_on(async {
            let cp = open("state");
            for o in &ops {
                let generation = match o {
                    Op::Pages(writes) => {
                        for (p, b) in writes {
                            let at = (*p as usize % 10) * PAGE;
                            data[at..at + PAGE].fill(*b);
                        }
                        std::fs::write(&page_file, &data).unwrap();
                        let opts = CheckpointOptions { lsn: Some(Lsn(end)), ..Default::default() };
                        let src = Source::Pages { path: page_file.clone(), page_size: PAGE as u32 };
                        let r = cp.checkpoint_with(&db, &src, &opts).await.unwrap();
                        cur.pages = Some((data.clone(), end));
                        page_history.push((end, data.clone()));
                        Some(r.generation)
                    }
                    Op::Segments(sizes) => {
                        for s in sizes {
                            let name = format!("{seq:06}.seg");
                            seq += 1;
                            let bytes: Vec<u8> = (0..*s as usize * 37).map(|i| (i as u32 ^ seq) as u8).collect();
                            std::fs::write(wal_dir.join(&name), &bytes).unwrap();
                            cur.wal.insert(name, (end, bytes.clone()));
                            end += bytes.len() as u64;
                        }
                        let r = cp.checkpoint(&db, &Source::Segments(wal_dir.clone())).await.unwrap();
                        Some(r.generation)
                    }
                    Op::Head(k) if !cur.wal.is_empty() => {
                        let names: Vec<String> = cur.wal.keys().cloned().collect();
                        let cut = &names[*k as usize % names.len()];
                        let before = cur.wal[cut].0 + cur.wal[cut].1.len() as u64;
                        let opts = HeadOptions { force: true, ..Default::default() };
                        let r = cp.truncate_head(&db, Lsn(before), &opts).await.unwrap();
                        cur.wal.retain(|_, (s, b)| *s + b.len() as u64 > before);
                        for n in &names {
                            if !cur.wal.contains_key(n) {
                                std::fs::remove_file(wal_dir.join(n)).unwrap();
                            }
                        }
                        r.generation
                    }
                    Op::Tail(k) if !cur.wal.is_empty() => {
                        let names: Vec<String> = cur.wal.keys().cloned().collect();
                        let keep = names.len() - (*k as usize % names.len()).min(names.len());
                        let after = match names.get(keep) {
                            Some(n) => cur.wal[n].0,
                            None => end,
                        };
                        let r = cp.truncate_tail(&db, Lsn(after), true).await.unwrap();
                        for n in &names[keep..] {
                            cur.wal.remove(n);
                            std::fs::remove_file(wal_dir.join(n)).unwrap();
                        }
                        end = after;
                        // A page checkpoint past the cut goes back to the newest at or below.
                        if cur.pages.as_ref().is_some_and(|(_, l)| *l > after) {
                            page_history.retain(|(l, _)| *l <= after);
                            cur.pages = page_history.last().cloned().map(|(l, d)| (d, l));
                            if let Some((d, _)) = &cur.pages {
                                data = d.clone();
                            }
                        }
                        r.generation
                    }
                    Op::Head(_) | Op::Tail(_) => None,
                };
                if let Some(g) = generation {
                    expect.insert(g, cur.clone());
                }
            }
            // Cold: a fresh state directory that has only the bucket.
            let fresh = open("fresh");
            let gens = fresh.generations(&db).await.unwrap();
            prop_assert_eq!(gens.len(), expect.len());
            let mut fulls = 0;
            for (g, want) in &expect {
                let st = fresh.state(&db, Some(Generation(*g))).await.unwrap();
                if st.manifest.chain() == 0 {
                    fulls += 1;
                }
                prop_assert!(st.manifest.chain() < MAX_DIFF_CHAIN);
                let out = dir.path().join(format!("r{g}"));
                let r = fresh.restore(&db, Some(Generation(*g)), &out).await.unwrap();
                // A page file alone restores to the target, a stream alone to a directory,
                // both to `pages` and `wal/` inside it.
                let (pages_path, wal_path) = match (&st.state.pages, &st.state.wal) {
                    (Some(_), Some(_)) => (out.join("pages"), Some(out.join("wal"))),
                    (Some(_), None) => (out.clone(), None),
                    (None, _) => (out.join("pages"), Some(out.clone())),
                };
                if let Some((bytes, _)) = &want.pages {
                    prop_assert!(std::fs::read(&pages_path).unwrap() == *bytes, "pages of generation {}", g);
                }
                let wal_files: BTreeMap<String, Vec<u8>> = match wal_path {
                    Some(p) if p.is_dir() => cairn_tests::fixtures::read_dir_files(&p).unwrap(),
                    _ => BTreeMap::new(),
                };
                let want_wal: BTreeMap<String, Vec<u8>> = want.wal.iter().map(|(n, (_, b))| (n.clone(), b.clone())).collect();
                prop_assert_eq!(&wal_files, &want_wal, "WAL of generation {} ({:?})", g, r);
            }
            prop_assert!(fulls >= 2, "the history crossed a full-manifest boundary");
            // Restores to points of the newest generation's stream.
            if let Some((g, want)) = expect.iter().next_back() {
                let first = want.wal.values().next().map(|(s, _)| *s);
                for (i, lsn) in want.wal.values().map(|(s, b)| s + b.len() as u64).enumerate() {
                    if i % 3 != 0 {
                        continue;
                    }
                    let out = dir.path().join(format!("at-{g}-{lsn}"));
                    match fresh.restore_at(&db, Lsn(lsn), &out).await {
                        Ok(r) => {
                            let from = r.replay_from.unwrap();
                            let page = page_history.iter().rev().find(|(l, _)| *l <= lsn);
                            prop_assert_eq!(r.page_lsn, page.map(|(l, _)| *l));
                            if let Some((_, d)) = page {
                                prop_assert!(std::fs::read(out.join("pages")).unwrap() == *d);
                            }
                            let names = r.segments.clone().unwrap();
                            let want_names: Vec<String> = want.wal.iter().filter(|(_, (s, b))| *s < lsn && from < s + b.len() as u64).map(|(n, _)| n.clone()).collect();
                            prop_assert_eq!(names, want_names);
                        }
                        Err(e) => {
                            // Only a point whose replay would need truncated WAL is refused.
                            let page = page_history.iter().rev().find(|(l, _)| *l <= lsn).map(|(l, _)| *l).unwrap_or(0);
                            prop_assert!(first.is_some_and(|f| page < f), "{}", e);
                        }
                    }
                }
            }
            Ok(())
        })?;
    }
}
