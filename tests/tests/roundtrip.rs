//! End-to-end round trips through the library: every source kind, dedup, corruption,
//! fresh-state restore and two racing publishers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use cairn_core::{keys, DbId, Generation};
use cairn_orchestrator::{CairnError, Checkpointer, Config, Env, HeadOptions, Lsn, Source};
use cairn_remote_store::RemoteStore;
use cairn_state::StateError;
use cairn_tests::fixtures;
use rand::SeedableRng;

fn open(state: &Path, store: &str, chunk: u64) -> Checkpointer {
    let mut cfg = Config::new(state).unwrap();
    cfg.chunk_size = chunk;
    cfg.store_url = Some(store.to_string());
    Checkpointer::open_with(
        cfg,
        RemoteStore::open(store).unwrap(),
        Env::fixed(1_700_000_000_000, 7),
    )
    .unwrap()
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_roundtrip_with_partial_last_chunk_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_url(&dir.path().join("store"));
    let cp = open(&dir.path().join("state"), &store, 64 * 1024);
    let src = dir.path().join("pages.bin");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    // 83 pages of 4 KiB: 5 full 64 KiB chunks and one of 3 pages.
    let data = fixtures::write_page_file(&src, 83, 4096, &mut rng).unwrap();
    let db = DbId::new("pages").unwrap();
    let source = Source::Pages {
        path: src.clone(),
        page_size: 4096,
    };
    let r1 = cp.checkpoint(&db, &source).await.unwrap();
    assert_eq!(r1.generation, 1);
    assert_eq!(r1.source_bytes, data.len() as u64);
    assert!(r1.blobs_uploaded >= 5);

    // Unchanged: no blob uploaded, only the manifest.
    let r2 = cp.checkpoint(&db, &source).await.unwrap();
    assert_eq!(r2.generation, 2);
    assert_eq!(r2.blobs_uploaded, 0, "{r2:?}");
    assert_eq!(r2.bytes_uploaded, r2.manifest_bytes);

    // Change one page: only its chunk is uploaded again.
    let mut changed = data.clone();
    changed[10 * 4096] ^= 0xff;
    std::fs::write(&src, &changed).unwrap();
    let r3 = cp.checkpoint(&db, &source).await.unwrap();
    assert_eq!(r3.blobs_uploaded, 1, "{r3:?}");

    for (g, want) in [(1, &data), (2, &data), (3, &changed)] {
        let out = dir.path().join(format!("out-{g}"));
        let r = cp.restore(&db, Some(Generation(g)), &out).await.unwrap();
        assert_eq!(r.bytes_written, want.len() as u64);
        assert_eq!(&std::fs::read(&out).unwrap(), want, "generation {g}");
    }
    let v = cp.verify(&db, None, true).await.unwrap();
    assert!(v.ok, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_roundtrip_across_appends_local_deletion_and_head_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_url(&dir.path().join("store"));
    let cp = open(&dir.path().join("state"), &store, 64 * 1024);
    let src = dir.path().join("wal");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    fixtures::write_segments(&src, 0, 6, 200_000, &mut rng).unwrap();
    let db = DbId::new("wal").unwrap();
    let source = Source::Segments(src.clone());
    let g1_files = fixtures::read_dir_files(&src).unwrap();
    let r1 = cp.checkpoint(&db, &source).await.unwrap();
    assert_eq!(r1.blobs_uploaded, 6);
    // Append two segments; the engine deletes its oldest local one (it is published, below
    // the watermark). The published stream keeps it: deleting local WAL is not truncation.
    fixtures::write_segments(&src, 6, 2, 100_000, &mut rng).unwrap();
    let w = cp.watermark(&db).await.unwrap();
    assert_eq!(w.watermark, w.wal_end.unwrap());
    std::fs::remove_file(src.join("seg-00000000")).unwrap();
    let mut g2_files = fixtures::read_dir_files(&src).unwrap();
    g2_files.insert("seg-00000000".into(), g1_files["seg-00000000"].clone());
    let r2 = cp.checkpoint(&db, &source).await.unwrap();
    assert_eq!(r2.blobs_uploaded, 2, "{r2:?}");
    // Dropping the head of the stream is an explicit truncation, in its own generation.
    let seg0 = g1_files["seg-00000000"].len() as u64;
    let opts = HeadOptions {
        force: true,
        ..Default::default()
    };
    let t = cp.truncate_head(&db, Lsn(seg0), &opts).await.unwrap();
    assert_eq!(
        (t.generation, t.segments_dropped, t.wal_start),
        (Some(3), 1, seg0)
    );
    let mut g3_files = g2_files.clone();
    g3_files.remove("seg-00000000");
    for (g, want) in [(1, &g1_files), (2, &g2_files), (3, &g3_files)] {
        let out = dir.path().join(format!("restored-{g}"));
        cp.restore(&db, Some(Generation(g)), &out).await.unwrap();
        assert_eq!(
            &fixtures::read_dir_files(&out).unwrap(),
            want,
            "generation {g}"
        );
    }
    let wal = cp.state(&db, None).await.unwrap().state.wal.unwrap();
    assert_eq!(wal.segments[0].lsn_start.0, seg0);
    // A sealed segment that changed is refused, naming it.
    std::fs::write(src.join("seg-00000003"), b"rewritten").unwrap();
    let err = cp.checkpoint(&db, &source).await.unwrap_err().to_string();
    assert!(err.contains("seg-00000003"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_roundtrip_with_integrity_check() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_url(&dir.path().join("store"));
    let cp = open(&dir.path().join("state"), &store, 256 * 1024);
    let src = dir.path().join("app.db");
    fixtures::build_sqlite(&src, 3000, 3).unwrap();
    let rows1 = fixtures::sqlite_rows(&src).unwrap();
    let db = DbId::new("app").unwrap();
    cp.checkpoint(&db, &Source::Sqlite(src.clone()))
        .await
        .unwrap();
    fixtures::build_sqlite(&src, 500, 4).unwrap();
    let rows2 = fixtures::sqlite_rows(&src).unwrap();
    assert_ne!(rows1, rows2);
    cp.checkpoint(&db, &Source::Sqlite(src.clone()))
        .await
        .unwrap();
    for (g, want) in [(1, &rows1), (2, &rows2)] {
        let out = dir.path().join(format!("r{g}.db"));
        cp.restore(&db, Some(Generation(g)), &out).await.unwrap();
        assert_eq!(fixtures::integrity(&out).unwrap(), vec!["ok".to_string()]);
        assert_eq!(&fixtures::sqlite_rows(&out).unwrap(), want);
    }
    let v = cp.verify(&db, None, true).await.unwrap();
    assert!(v.ok, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_state_restores_from_the_store_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_url(&dir.path().join("store"));
    let src = dir.path().join("p.bin");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let data = fixtures::write_page_file(&src, 40, 4096, &mut rng).unwrap();
    let db = DbId::new("p").unwrap();
    {
        let cp = open(&dir.path().join("state"), &store, 32 * 1024);
        cp.checkpoint(
            &db,
            &Source::Pages {
                path: src.clone(),
                page_size: 4096,
            },
        )
        .await
        .unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let fresh = dir.path().join("fresh");
    let cp = open(&fresh, &store, 32 * 1024);
    let out = dir.path().join("out");
    let r = cp.restore(&db, None, &out).await.unwrap();
    assert_eq!(r.generation, 1);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert_eq!(cp.list(&db).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_missing_blobs_are_named_by_verify_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = file_url(&store_dir);
    let cp = open(&dir.path().join("state"), &store, 16 * 1024);
    let src = dir.path().join("p.bin");
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    fixtures::write_page_file(&src, 16, 4096, &mut rng).unwrap();
    let db = DbId::new("c").unwrap();
    cp.checkpoint(
        &db,
        &Source::Pages {
            path: src.clone(),
            page_size: 4096,
        },
    )
    .await
    .unwrap();
    let blobs = cp.state(&db, None).await.unwrap().state.blobs();
    let tenant = cp.config().tenant.clone();
    let corrupt_key = keys::blob_key(&tenant, &db, &blobs[0]);
    let missing_key = keys::blob_key(&tenant, &db, &blobs[2]);
    // Flip one payload byte in place (same size) and delete another blob.
    let path = store_dir.join(&corrupt_key);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    std::fs::remove_file(store_dir.join(&missing_key)).unwrap();

    let shallow = cp.verify(&db, None, false).await.unwrap();
    assert!(!shallow.ok);
    assert_eq!(shallow.errors.len(), 1, "{shallow:?}");
    assert!(shallow.errors[0].contains(&missing_key));
    let deep = cp.verify(&db, None, true).await.unwrap();
    assert_eq!(deep.errors.len(), 2, "{deep:?}");
    assert!(
        deep.errors
            .iter()
            .any(|e| e.contains(&corrupt_key) && e.contains("CRC64")),
        "{deep:?}"
    );
    assert!(
        deep.errors.iter().any(|e| e.contains(&missing_key)),
        "{deep:?}"
    );
    let out = dir.path().join("out");
    let err = cp.restore(&db, None, &out).await.unwrap_err().to_string();
    assert!(
        err.contains(&corrupt_key) || err.contains(&missing_key),
        "{err}"
    );
    assert!(
        !out.exists(),
        "a failed restore must not leave a target behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_of_one_generation_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = file_url(&dir.path().join("store"));
    let a = open(&dir.path().join("a"), &store, 64 * 1024);
    let mut cfg = Config::new(dir.path().join("b")).unwrap();
    cfg.chunk_size = 64 * 1024;
    let b = Checkpointer::open_with(cfg, RemoteStore::open(&store).unwrap(), Env::fixed(1, 99))
        .unwrap();
    let src_a = dir.path().join("a.bin");
    let src_b = dir.path().join("b.bin");
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    fixtures::write_page_file(&src_a, 200, 4096, &mut rng).unwrap();
    fixtures::write_page_file(&src_b, 200, 4096, &mut rng).unwrap();
    let db = DbId::new("contested").unwrap();
    let (sa, sb) = (
        Source::Pages {
            path: src_a.clone(),
            page_size: 4096,
        },
        Source::Pages {
            path: src_b.clone(),
            page_size: 4096,
        },
    );
    let (ra, rb) = tokio::join!(a.checkpoint(&db, &sa), b.checkpoint(&db, &sb));
    let results = [ra, rb];
    let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let fenced: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .filter(|e| matches!(e, CairnError::State(StateError::Fenced { .. })))
        .collect();
    assert_eq!(won.len(), 1, "exactly one publisher wins: {results:?}");
    assert_eq!(won[0].generation, 1);
    assert_eq!(fenced.len(), 1, "{results:?}");
    assert!(
        fenced[0].to_string().contains("another writer"),
        "{}",
        fenced[0]
    );
    // The loser's next attempt builds on the winner's generation.
    let loser = if results[0].is_ok() { &b } else { &a };
    let loser_src = if results[0].is_ok() { &src_b } else { &src_a };
    let r = loser
        .checkpoint(
            &db,
            &Source::Pages {
                path: loser_src.clone(),
                page_size: 4096,
            },
        )
        .await
        .unwrap();
    assert_eq!(r.generation, 2);
    let m = loser
        .state(&db, Some(Generation(2)))
        .await
        .unwrap()
        .manifest;
    assert_eq!(m.parent, Some(Generation(1)));
}
