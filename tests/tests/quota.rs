//! Scratch budgets under concurrent jobs: global, then tenant, then job. Every job either
//! finishes (having waited for space) or fails with an error naming the budget; nothing
//! published is damaged, and every budget is back to zero afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use cairn_core::DbId;
use cairn_orchestrator::{Checkpointer, Config, Env, Source};
use cairn_remote_store::RemoteStore;
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1 << 20;

fn open(state: &Path, store: &Path, global: u64, job: Option<u64>) -> Arc<Checkpointer> {
    let url = format!("file://{}", store.display());
    let mut cfg = Config::new(state).unwrap();
    cfg.chunk_size = MIB;
    cfg.store_url = Some(url.clone());
    cfg.scratch_limit = global;
    cfg.tenant_scratch_limit = Some(global);
    cfg.job_scratch_limit = job;
    Arc::new(
        Checkpointer::open_with(
            cfg,
            RemoteStore::open(&url).unwrap(),
            Env::fixed(1_700_000_000_000, 3),
        )
        .unwrap(),
    )
}

fn random_file(path: &Path, len: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut bytes = vec![0u8; len as usize];
    rng.fill_bytes(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

fn pages(path: &Path) -> Source {
    Source::Pages {
        path: path.to_path_buf(),
        page_size: 4096,
    }
}

fn assert_budgets_empty(cp: &Checkpointer) {
    let levels = cp.quota_levels();
    let names: Vec<&str> = levels.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "scratch",
            "scratch/tenant:default",
            "cache",
            "cache/tenant:default"
        ],
        "global and tenant, of scratch and of the local cache"
    );
    for l in &levels {
        assert_eq!(l.used, 0, "budget {} still holds bytes", l.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_over_a_small_budget_wait_or_fail_by_name_and_give_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    // Room for about four staged 1 MiB chunks at once, for six jobs of four chunks each
    // (a job alone stages up to two chunks at once and holds four in upload).
    let cp = open(
        &dir.path().join("state"),
        &dir.path().join("store"),
        4 * MIB,
        None,
    );
    let jobs: Vec<_> = (0..6u64)
        .map(|i| {
            let src = dir.path().join(format!("db{i}.pages"));
            random_file(&src, 4 * MIB, i);
            let cp = Arc::clone(&cp);
            tokio::spawn(async move {
                let db = DbId::new(format!("db{i}")).unwrap();
                let r = cp.checkpoint(&db, &pages(&src)).await;
                (db, src, r)
            })
        })
        .collect();
    let mut failed = Vec::new();
    for j in jobs {
        let (db, src, r) = j.await.unwrap();
        match r {
            Ok(_) => {
                let out = dir.path().join(format!("{db}.restored"));
                cp.restore(&db, None, &out).await.unwrap();
                assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("scratch"),
                    "{db}: the error names no budget: {msg}"
                );
                assert!(cp
                    .restore(&db, None, &dir.path().join("none"))
                    .await
                    .is_err());
                failed.push((db, src));
            }
        }
    }
    assert_budgets_empty(&cp);
    // Alone, each job that did not fit goes through: nothing was left held or damaged.
    for (db, src) in failed {
        cp.checkpoint(&db, &pages(&src)).await.unwrap();
        let out = dir.path().join(format!("{db}.restored"));
        cp.restore(&db, None, &out).await.unwrap();
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
    }
    assert_budgets_empty(&cp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_budget_smaller_than_one_staging_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open(
        &dir.path().join("state"),
        &dir.path().join("store"),
        64 * MIB,
        Some(MIB / 2),
    );
    let src = dir.path().join("db.pages");
    random_file(&src, 2 * MIB, 9);
    let db = DbId::new("small").unwrap();
    let e = cp
        .checkpoint(&db, &pages(&src))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("scratch/tenant:default/job:"), "{e}");
    assert_budgets_empty(&cp);
    // Nothing was published, and a bigger budget then succeeds from the same state.
    drop(cp);
    let cp = open(
        &dir.path().join("state"),
        &dir.path().join("store"),
        64 * MIB,
        None,
    );
    cp.checkpoint(&db, &pages(&src)).await.unwrap();
    assert_budgets_empty(&cp);
}
