//! The whole pipeline over a bad network: the `FaultStore` wrapper injects transient
//! errors, latency, cut-off and corrupted bodies and lost write responses under the
//! `Checkpointer`, which must still publish exactly what it was given and restore it byte
//! for byte, detect every corrupted read, and refuse a store without conditional create.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_core::{DbId, Generation};
use cairn_orchestrator::{Checkpointer, Config, Env, Source};
use cairn_remote_store::fault::{FaultConfig, FaultStore};
use cairn_remote_store::{RemoteStore, StoreConfig, StoreError};
use cairn_tests::fixtures;
use rand::{Rng, RngCore, SeedableRng};

const PAGE: usize = 4096;

/// Quick retries so a test with thousands of injected faults stays fast.
fn store_cfg() -> StoreConfig {
    StoreConfig {
        multipart_threshold: 5 << 20,
        part_size: 5 << 20,
        retry_max_attempts: 25,
        retry_initial_backoff_ms: 1,
        retry_max_backoff_ms: 20,
        ..Default::default()
    }
}

fn checkpointer(state: &Path, store: RemoteStore, seed: u64) -> Checkpointer {
    let mut cfg = Config::new(state).unwrap();
    cfg.chunk_size = 64 * 1024;
    cfg.store_url = Some(store.describe().to_string());
    Checkpointer::open_with(cfg, store, Env::fixed(1_700_000_000_000, seed)).unwrap()
}

fn pages() -> (DbId, impl Fn(&Path) -> Source) {
    (DbId::new("pages").unwrap(), |p: &Path| Source::Pages {
        path: p.to_path_buf(),
        page_size: PAGE as u32,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_latency_and_lost_responses_leave_restores_byte_identical() {
    let fault = FaultConfig {
        seed: 42,
        transient_errors: 0.15,
        latency: 0.2,
        max_latency: Duration::from_millis(3),
        lost_write_responses: 0.1,
        truncated_bodies: 0.1,
        ..Default::default()
    };
    let (store, faults) =
        RemoteStore::open_faulty("memory://faults-transient", store_cfg(), fault).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = checkpointer(&dir.path().join("state"), store.clone(), 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);

    // A page file changing between generations (deltas and rewrites), and a segment
    // directory growing, with one segment large enough for a multipart upload.
    let (db, source) = pages();
    let file = dir.path().join("pages.bin");
    let mut data = fixtures::write_page_file(&file, 96, PAGE, &mut rng).unwrap();
    let wal = dir.path().join("wal");
    let wdb = DbId::new("wal").unwrap();
    fixtures::write_segments(&wal, 0, 3, 50_000, &mut rng).unwrap();
    let mut big = vec![0u8; (6 << 20) + 11];
    rng.fill_bytes(&mut big);
    std::fs::write(wal.join("seg-00000003"), &big).unwrap();
    let mut page_versions = Vec::new();
    let mut wal_versions = Vec::new();
    for round in 0..5u64 {
        let r = cp.checkpoint(&db, &source(&file)).await.unwrap();
        assert_eq!(r.generation, round + 1);
        page_versions.push(data.clone());
        let r = cp
            .checkpoint(&wdb, &Source::Segments(wal.clone()))
            .await
            .unwrap();
        assert_eq!(r.generation, round + 1);
        wal_versions.push(fixtures::read_dir_files(&wal).unwrap());
        // Change a few pages, sometimes grow the file; add a segment.
        for _ in 0..4 {
            let p = rng.gen_range(0..data.len() / PAGE);
            rng.fill_bytes(&mut data[p * PAGE..(p + 1) * PAGE]);
        }
        if round % 2 == 1 {
            let mut more = vec![0u8; 3 * PAGE];
            rng.fill_bytes(&mut more);
            data.extend_from_slice(&more);
        }
        std::fs::write(&file, &data).unwrap();
        fixtures::write_segments(&wal, 4 + round as usize, 1, 40_000, &mut rng).unwrap();
    }
    for (i, want) in page_versions.iter().enumerate() {
        let g = i as u64 + 1;
        let out = dir.path().join(format!("pages-{g}"));
        cp.restore(&db, Some(Generation(g)), &out).await.unwrap();
        assert!(
            std::fs::read(&out).unwrap() == *want,
            "pages generation {g}"
        );
    }
    for (i, want) in wal_versions.iter().enumerate() {
        let g = i as u64 + 1;
        let out = dir.path().join(format!("wal-{g}"));
        cp.restore(&wdb, Some(Generation(g)), &out).await.unwrap();
        assert!(
            fixtures::read_dir_files(&out).unwrap() == *want,
            "wal generation {g}"
        );
    }
    assert!(cp.verify(&db, None, true).await.unwrap().ok);
    assert!(cp.verify(&wdb, None, true).await.unwrap().ok);

    let (c, s) = (faults.counts(), store.stats());
    eprintln!("faults {c:?}\nstore {s:?}");
    let rate = c.transient_errors as f64 / s.requests as f64;
    assert!(
        rate >= 0.10,
        "only {rate:.3} of requests failed transiently"
    );
    assert!(
        c.lost_responses > 0 && c.delayed > 0 && c.truncated > 0,
        "{c:?}"
    );
    assert!(s.retries >= c.transient_errors, "{s:?} {c:?}");
    assert!(s.resumed_reads > 0, "{s:?}");
    // No corruption was injected, so every damaged read is a body cut short: a whole-object
    // GET that a truncation hit (ranged reads resume instead). About one run in thirty has
    // one, depending on which request the seeded faults land on.
    assert!(s.damaged_reads <= c.truncated, "{s:?} {c:?}");
}

/// Publishes one generation of a page file (bases only) and a segment directory through a
/// clean store; returns what was published.
async fn seed_clean(url: &str, dir: &Path) -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let clean = RemoteStore::open_with(url, store_cfg()).unwrap();
    let cp = checkpointer(&dir.join("seed-state"), clean, 2);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (db, source) = pages();
    let file = dir.join("pages.bin");
    let data = fixtures::write_page_file(&file, 80, PAGE, &mut rng).unwrap();
    cp.checkpoint(&db, &source(&file)).await.unwrap();
    let wal = dir.join("wal");
    fixtures::write_segments(&wal, 0, 4, 60_000, &mut rng).unwrap();
    cp.checkpoint(&DbId::new("wal").unwrap(), &Source::Segments(wal.clone()))
        .await
        .unwrap();
    (data, fixtures::read_dir_files(&wal).unwrap())
}

fn assert_corruption_reported(e: &impl std::fmt::Display) {
    let msg = e.to_string();
    assert!(
        msg.contains("corrupt") && msg.contains("/blobs/"),
        "a failed restore must name the corrupt blob: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_corrupted_read_is_detected_and_none_reaches_a_restored_file() {
    let url = "memory://faults-corrupt";
    let dir = tempfile::tempdir().unwrap();
    let (data, wal) = seed_clean(url, dir.path()).await;
    let fault = FaultConfig {
        seed: 7,
        transient_errors: 0.1,
        corrupted_bodies: 0.3,
        // Manifests are read whole and checked by the manifest layer; blobs are the target.
        body_fault_keys: Some("/blobs/".into()),
        ..Default::default()
    };
    let (store, faults) = RemoteStore::open_faulty(url, store_cfg(), fault).unwrap();
    // A fresh state directory: everything comes from the (faulty) store.
    let cp = checkpointer(&dir.path().join("state"), store.clone(), 3);
    let (db, _) = pages();
    let wdb = DbId::new("wal").unwrap();
    let (mut ok, mut failed) = (0, 0);
    for i in 0..8 {
        let out = dir.path().join(format!("pages-{i}"));
        match cp.restore(&db, None, &out).await {
            Ok(_) => {
                assert!(std::fs::read(&out).unwrap() == data, "restore {i}");
                ok += 1;
            }
            Err(e) => {
                assert_corruption_reported(&e);
                assert!(!out.exists(), "a failed restore left {}", out.display());
                failed += 1;
            }
        }
        let out = dir.path().join(format!("wal-{i}"));
        match cp.restore(&wdb, None, &out).await {
            Ok(_) => {
                assert!(
                    fixtures::read_dir_files(&out).unwrap() == wal,
                    "restore {i}"
                );
                ok += 1;
            }
            Err(e) => {
                assert_corruption_reported(&e);
                failed += 1;
            }
        }
        let v = cp.verify(&db, None, true).await.unwrap();
        for e in &v.errors {
            assert_corruption_reported(e);
        }
    }
    let (c, s) = (faults.counts(), store.stats());
    eprintln!("restores ok {ok}, failed {failed}\nfaults {c:?}\nstore {s:?}");
    assert!(c.corrupted > 10, "{c:?}");
    assert!(ok > 0, "re-reads should heal most damaged transfers");
    // Every corrupted body that reached the store layer was caught there: each one either
    // led to a clean re-read or to the corruption error above.
    assert_eq!(c.corrupted, s.damaged_reads, "{c:?} {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_on_every_read_fails_restore_and_verify_naming_the_blob() {
    let url = "memory://faults-always-corrupt";
    let dir = tempfile::tempdir().unwrap();
    let (_data, _wal) = seed_clean(url, dir.path()).await;
    let fault = FaultConfig {
        seed: 1,
        corrupted_bodies: 1.0,
        body_fault_keys: Some("/blobs/".into()),
        ..Default::default()
    };
    let (store, faults) = RemoteStore::open_faulty(url, store_cfg(), fault).unwrap();
    let cp = checkpointer(&dir.path().join("state"), store.clone(), 4);
    let (db, _) = pages();
    let out = dir.path().join("restored");
    let e = cp.restore(&db, None, &out).await.unwrap_err();
    assert_corruption_reported(&e);
    assert!(!out.exists());
    let v = cp.verify(&db, None, true).await.unwrap();
    assert!(!v.ok && !v.errors.is_empty(), "{v:?}");
    for e in &v.errors {
        assert_corruption_reported(e);
    }
    let (c, s) = (faults.counts(), store.stats());
    assert!(c.corrupted > 0);
    assert_eq!(c.corrupted, s.damaged_reads, "{c:?} {s:?}");
    // Every read of a blob was retried the configured number of times before giving up.
    assert_eq!(
        s.damaged_reads % u64::from(store.config().verify_read_attempts),
        0,
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_check_refuses_a_store_without_conditional_create() {
    let inner = Arc::new(object_store::memory::InMemory::new());
    let fault = FaultConfig {
        ignore_conditional_create: true,
        ..Default::default()
    };
    let wrapped = Arc::new(FaultStore::new(inner.clone(), fault.clone()));
    let store = RemoteStore::from_object_store(
        wrapped.clone(),
        "root",
        "fault+memory://no-cc",
        store_cfg(),
    );
    let e = store.check_conditional_create().await.unwrap_err();
    assert!(
        matches!(e, StoreError::ConditionalCreateUnsupported { .. }),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("fault+memory://no-cc") && msg.contains("single_writer"),
        "{msg}"
    );
    assert!(wrapped.counts().ignored_conditional_creates >= 2);
    // The probe is cleaned up.
    assert!(store.list("_cairn").await.unwrap().is_empty());

    // Single-writer mode skips the check (the operator vouches for one writer).
    let cfg = StoreConfig {
        single_writer: true,
        ..store_cfg()
    };
    let single = RemoteStore::from_object_store(
        Arc::new(FaultStore::new(inner.clone(), fault)),
        "root",
        "fault+memory://no-cc",
        cfg,
    );
    single.check_conditional_create().await.unwrap();

    // The same check passes on the honest store underneath, even with lost responses.
    let lossy = FaultConfig {
        lost_write_responses: 0.5,
        transient_errors: 0.2,
        seed: 3,
        ..Default::default()
    };
    let honest = RemoteStore::from_object_store(
        Arc::new(FaultStore::new(inner, lossy)),
        "root",
        "fault+memory://honest",
        store_cfg(),
    );
    for _ in 0..10 {
        honest.check_conditional_create().await.unwrap();
    }
}
