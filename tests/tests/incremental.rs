//! Incremental checkpoints: deltas carry only changed pages, the engine's dirty marks are
//! honoured, and damaged deltas are refused by restore and `verify --deep`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cairn_core::delta::{encode_delta, DeltaHeader, DELTA_HEADER_LEN};
use cairn_core::{keys, BlobKind, DbId, DirtyTracker, Generation};
use cairn_orchestrator::{CheckpointOptions, Checkpointer, Config, Env, Source};
use cairn_remote_store::RemoteStore;
use rand::{Rng, RngCore, SeedableRng};

const PS: usize = 4096;

fn open(dir: &Path, chunk: u64) -> Checkpointer {
    let mut cfg = Config::new(dir.join("state")).unwrap();
    cfg.chunk_size = chunk;
    let url = format!("file://{}", dir.join("store").display());
    Checkpointer::open_with(cfg, RemoteStore::open(&url).unwrap(), Env::fixed(0, 3)).unwrap()
}

fn random_file(path: &Path, pages: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; pages * PS];
    rng.fill_bytes(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_dirty_pages_upload_about_their_own_size() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open(dir.path(), 256 * PS as u64);
    let src = dir.path().join("db");
    let mut data = random_file(&src, 1024, 1);
    let db = DbId::new("inc").unwrap();
    let source = Source::Pages {
        path: src.clone(),
        page_size: PS as u32,
    };
    let full = cp.checkpoint(&db, &source).await.unwrap();
    assert_eq!((full.chunks_full, full.chunks_delta), (4, 0));
    // Change 10 pages in chunk 1 and 1 page in chunk 3.
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let pages: Vec<usize> = (0..10).map(|i| 256 + i * 20).chain([900]).collect();
    for p in &pages {
        rng.fill_bytes(&mut data[p * PS..(p + 1) * PS]);
    }
    std::fs::write(&src, &data).unwrap();
    let inc = cp.checkpoint(&db, &source).await.unwrap();
    assert_eq!(
        (inc.chunks_delta, inc.chunks_unchanged, inc.chunks_full),
        (2, 2, 0),
        "{inc:?}"
    );
    assert_eq!(inc.pages_dirty, 11);
    assert_eq!(inc.bytes_dirty, 11 * PS as u64);
    let blob_bytes = inc.bytes_uploaded - inc.manifest_bytes;
    assert!(
        blob_bytes < inc.bytes_dirty + 1024,
        "{blob_bytes} uploaded for {} dirty",
        inc.bytes_dirty
    );
    let out = dir.path().join("out");
    cp.restore(&db, None, &out).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert!(cp.verify(&db, None, true).await.unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_marks_are_used_and_unmarked_pages_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open(dir.path(), 64 * PS as u64);
    let src = dir.path().join("db");
    let mut data = random_file(&src, 300, 3);
    let db = DbId::new("tracked").unwrap();
    let source = Source::Pages {
        path: src.clone(),
        page_size: PS as u32,
    };
    cp.checkpoint(&db, &source).await.unwrap();
    let tracker = DirtyTracker::new(1 << 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut gens = vec![(Generation(1), data.clone())];
    for round in 0..4 {
        for _ in 0..5 {
            let p = rng.gen_range(0..data.len() / PS);
            rng.fill_bytes(&mut data[p * PS..(p + 1) * PS]);
            tracker.mark(p as u64);
        }
        // Grow by a few pages in one round: new pages need no marks.
        if round == 2 {
            let mut extra = vec![0u8; 10 * PS];
            rng.fill_bytes(&mut extra);
            data.extend_from_slice(&extra);
        }
        std::fs::write(&src, &data).unwrap();
        let opts = CheckpointOptions {
            dirty: Some(tracker.drain()),
            ..Default::default()
        };
        let r = cp.checkpoint_with(&db, &source, &opts).await.unwrap();
        assert_eq!(r.chunks_full, 0, "round {round}: {r:?}");
        gens.push((Generation(r.generation), data.clone()));
    }
    // An unmarked change is not picked up: the engine's marks are trusted as the contract says.
    let mut sneaky = data.clone();
    sneaky[5] ^= 1;
    std::fs::write(&src, &sneaky).unwrap();
    let r = cp
        .checkpoint_with(
            &db,
            &source,
            &CheckpointOptions {
                dirty: Some(tracker.drain()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.pages_dirty, 0);
    // Without marks, digests find it.
    let r = cp.checkpoint(&db, &source).await.unwrap();
    assert_eq!(r.pages_dirty, 1);
    gens.push((Generation(r.generation), sneaky));
    for (g, want) in &gens {
        let out = dir.path().join(format!("out-{g}"));
        cp.restore(&db, Some(*g), &out).await.unwrap();
        assert_eq!(&std::fs::read(&out).unwrap(), want, "generation {g}");
    }
}

/// A tracker made after a restart knows nothing of the pages written before it: its first
/// checkpoint compares page digests, and only later ones trust its marks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tracker_is_trusted_only_after_one_checkpoint_compared_digests() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("db");
    let mut data = random_file(&src, 300, 8);
    let db = DbId::new("restarted").unwrap();
    let source = Source::Pages {
        path: src.clone(),
        page_size: PS as u32,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut change = |data: &mut Vec<u8>, tracker: Option<&DirtyTracker>| {
        let p = rng.gen_range(0..data.len() / PS);
        rng.fill_bytes(&mut data[p * PS..(p + 1) * PS]);
        if let Some(t) = tracker {
            t.mark(p as u64);
        }
        std::fs::write(&src, &*data).unwrap();
    };
    let with = |t: &Arc<DirtyTracker>| CheckpointOptions {
        tracker: Some(Arc::clone(t)),
        ..Default::default()
    };
    {
        let cp = open(dir.path(), 64 * PS as u64);
        let first = Arc::new(DirtyTracker::new(1 << 20));
        let r = cp
            .checkpoint_with(&db, &source, &with(&first))
            .await
            .unwrap();
        assert!(!r.dirty_used);
        change(&mut data, Some(&first));
        let r = cp
            .checkpoint_with(&db, &source, &with(&first))
            .await
            .unwrap();
        assert!(r.dirty_used, "{r:?}");
        assert_eq!(r.pages_dirty, 1);
        // Written, then the process dies before its checkpoint.
        change(&mut data, Some(&first));
        change(&mut data, Some(&first));
    }
    let cp = open(dir.path(), 64 * PS as u64);
    let fresh = Arc::new(DirtyTracker::new(1 << 20));
    change(&mut data, Some(&fresh));
    let r = cp
        .checkpoint_with(&db, &source, &with(&fresh))
        .await
        .unwrap();
    assert!(
        !r.dirty_used,
        "a new tracker's first checkpoint compares digests"
    );
    assert!(
        r.pages_dirty >= 2,
        "the pages written before the restart: {r:?}"
    );
    let out = dir.path().join("after-restart");
    cp.restore(&db, Some(Generation(r.generation)), &out)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
    change(&mut data, Some(&fresh));
    let r = cp
        .checkpoint_with(&db, &source, &with(&fresh))
        .await
        .unwrap();
    assert!(r.dirty_used, "{r:?}");
    assert_eq!(r.pages_dirty, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_are_bounded_by_the_cost_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path().join("state")).unwrap();
    cfg.chunk_size = 64 * PS as u64;
    cfg.cost_model.max_chain_depth = 3;
    let url = format!("file://{}", dir.path().join("store").display());
    let cp =
        Checkpointer::open_with(cfg, RemoteStore::open(&url).unwrap(), Env::fixed(0, 5)).unwrap();
    let src = dir.path().join("db");
    let mut data = random_file(&src, 64, 6);
    let db = DbId::new("chain").unwrap();
    let source = Source::Pages {
        path: src.clone(),
        page_size: PS as u32,
    };
    let mut kinds = Vec::new();
    for i in 0..9 {
        data[(i % 64) * PS] ^= 0x5a;
        std::fs::write(&src, &data).unwrap();
        let r = cp.checkpoint(&db, &source).await.unwrap();
        kinds.push(if r.chunks_full == 1 { 'F' } else { 'D' });
        let p = cp.state(&db, None).await.unwrap().state.pages.unwrap();
        assert!(p.chunks[0].deltas.len() <= 3);
    }
    assert_eq!(kinds.iter().collect::<String>(), "FDDDFDDDF");
    // Heavy churn rewrites the chunk at once.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    rng.fill_bytes(&mut data[..40 * PS]);
    std::fs::write(&src, &data).unwrap();
    let r = cp.checkpoint(&db, &source).await.unwrap();
    assert_eq!(r.chunks_full, 1, "{r:?}");
}

/// Publishes a copy of the latest generation whose first delta is replaced by `payload`,
/// returning the new generation and the bad blob's key.
async fn publish_with_bad_delta(
    cp: &Checkpointer,
    db: &DbId,
    payload: Vec<u8>,
) -> (Generation, String) {
    let gs = cp.state(db, None).await.unwrap();
    let mut m = gs.manifest;
    let mut state = gs.state;
    let (obj, blob) = cairn_core::blob::encode_blob(BlobKind::Delta, &payload);
    let key = keys::blob_key(&m.tenant, db, &blob);
    cp.store().put_bytes(&key, Bytes::from(obj)).await.unwrap();
    let p = state.pages.as_mut().unwrap();
    let c = p.chunks.iter_mut().find(|c| !c.deltas.is_empty()).unwrap();
    c.deltas[0] = blob;
    m.content = cairn_core::Content::Full(state);
    m.parent = Some(m.generation);
    m.generation = m.generation.next();
    let dir = tempfile::tempdir().unwrap();
    let side = cairn_state::StateDb::open(dir.path()).unwrap();
    cairn_state::publish(&side, cp.store(), &m).await.unwrap();
    (m.generation, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_deltas_are_rejected_by_restore_and_deep_verify() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open(dir.path(), 16 * PS as u64);
    let src = dir.path().join("db");
    let mut data = random_file(&src, 16, 8);
    let db = DbId::new("bad").unwrap();
    let source = Source::Pages {
        path: src.clone(),
        page_size: PS as u32,
    };
    cp.checkpoint(&db, &source).await.unwrap();
    data[3 * PS] ^= 1;
    std::fs::write(&src, &data).unwrap();
    cp.checkpoint(&db, &source).await.unwrap();
    let m = cp.state(&db, None).await.unwrap();
    let p = m.state.pages.as_ref().unwrap();
    let good_delta = p.chunks[0].deltas[0];
    let base_crc = p.chunks[0].base.crc64;

    // 1. Bad footer: flip a footer byte of the stored delta object.
    let key = keys::blob_key(&m.manifest.tenant, &db, &good_delta);
    let path = dir.path().join("store").join(&key);
    let mut obj = std::fs::read(&path).unwrap();
    let n = obj.len();
    obj[n - 10] ^= 0xff;
    std::fs::write(&path, &obj).unwrap();
    let v = cp.verify(&db, Some(Generation(2)), true).await.unwrap();
    assert!(!v.ok && v.errors[0].contains(&key), "{v:?}");
    let err = cp
        .restore(&db, Some(Generation(2)), &dir.path().join("o1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&key) && err.contains("footer"), "{err}");

    // 2. Truncated directory: claims 5 pages, holds 1 (validly enveloped, so only the delta
    //    parser can catch it).
    let h = DeltaHeader {
        page_size: PS as u32,
        chunk: 0,
        generation: 3,
        base_crc64: base_crc,
        chunk_len: 16 * PS as u64,
    };
    let mut truncated = encode_delta(&h, &[3], &vec![9u8; PS]).unwrap();
    truncated[48..52].copy_from_slice(&5u32.to_le_bytes());
    let (g, key) = publish_with_bad_delta(&cp, &db, truncated).await;
    let v = cp.verify(&db, Some(g), true).await.unwrap();
    assert!(
        !v.ok && v.errors[0].contains(&key) && v.errors[0].contains("truncated"),
        "{v:?}"
    );
    let err = cp
        .restore(&db, Some(g), &dir.path().join("o2"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&key) && err.contains("truncated directory"),
        "{err}"
    );

    // 3. Page out of range.
    let oob = encode_delta(
        &DeltaHeader {
            chunk_len: 64 * PS as u64,
            ..h
        },
        &[40],
        &vec![1u8; PS],
    )
    .unwrap();
    let mut oob = oob;
    oob[40..48].copy_from_slice(&(16 * PS as u64).to_le_bytes());
    assert_eq!(oob.len(), DELTA_HEADER_LEN + 4 + PS);
    let (g, key) = publish_with_bad_delta(&cp, &db, oob).await;
    let v = cp.verify(&db, Some(g), true).await.unwrap();
    assert!(!v.ok && v.errors[0].contains("out of range"), "{v:?}");
    let err = cp
        .restore(&db, Some(g), &dir.path().join("o3"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&key) && err.contains("out of range"), "{err}");
    // Nothing was left at any target.
    for o in ["o1", "o2", "o3"] {
        assert!(!dir.path().join(o).exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_unsorted_engine_marks_lose_no_page() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open(dir.path(), 16 * PS as u64);
    let src = dir.path().join("db");
    let mut data = random_file(&src, 64, 11);
    let db = DbId::new("unsorted").unwrap();
    let source = Source::Pages {
        path: src.clone(),
        page_size: PS as u32,
    };
    cp.checkpoint(&db, &source).await.unwrap();
    // Two drains merged by an engine after a failed attempt: unsorted, with a duplicate.
    let pages = [50u64, 3, 40, 3, 17];
    for p in pages {
        data[p as usize * PS] ^= 0x77;
    }
    std::fs::write(&src, &data).unwrap();
    let dirty = cairn_core::DirtySet {
        pages: pages.to_vec(),
        overflow: false,
    };
    let r = cp
        .checkpoint_with(
            &db,
            &source,
            &CheckpointOptions {
                dirty: Some(dirty),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.pages_dirty, 4, "{r:?}");
    let out = dir.path().join("out");
    cp.restore(&db, None, &out).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}
