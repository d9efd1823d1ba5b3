//! The job queue: an interrupted checkpoint resumes without redoing recorded work, a
//! cancelled one publishes nothing and frees its scratch, and jobs survive reopening.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use cairn_core::{keys, DbId};
use cairn_orchestrator::{
    CairnError, Checkpointer, Config, Env, JobOutcome, JobSpec, JobState, Source,
};
use cairn_remote_store::RemoteStore;
use rand::{RngCore, SeedableRng};

fn open(dir: &Path, seed: u64) -> Checkpointer {
    let mut cfg = Config::new(dir.join("state")).unwrap();
    cfg.chunk_size = 16 * 1024;
    let url = format!("file://{}", dir.join("store").display());
    Checkpointer::open_with(
        cfg,
        RemoteStore::open(&url).unwrap(),
        Env::fixed(1_000, seed),
    )
    .unwrap()
}

fn source(dir: &Path, chunks: usize) -> (Source, Vec<u8>) {
    let mut data = vec![0u8; chunks * 16 * 1024];
    rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut data);
    let path = dir.join("db.bin");
    std::fs::write(&path, &data).unwrap();
    (
        Source::Pages {
            path,
            page_size: 4096,
        },
        data,
    )
}

fn spec(db: &DbId, source: &Source) -> JobSpec {
    JobSpec::Checkpoint {
        db: db.clone(),
        source: source.clone(),
        chunk_size: 16 * 1024,
        lsn: None,
        stamp: None,
    }
}

/// Waits until the job has recorded at least `n` units of progress.
async fn progress_reaches(cp: &Checkpointer, id: cairn_core::JobId, n: u64) {
    loop {
        if cp.job(id).unwrap().progress.done >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_checkpoint_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let db = DbId::new("resumable").unwrap();
    let (src, data) = source(dir.path(), 300);
    let id = {
        let cp = open(dir.path(), 1);
        let id = cp.enqueue(spec(&db, &src)).unwrap();
        // "Crash": drop the running job once it recorded 100 chunks.
        tokio::select! {
            r = cp.run_job(id) => panic!("finished before the interruption: {r:?}"),
            () = progress_reaches(&cp, id, 100) => {}
        }
        let rec = cp.job(id).unwrap();
        assert_eq!(rec.state, JobState::Running);
        id
    };
    // Let uploads that were in flight settle, as a crashed process's would not.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cp = open(dir.path(), 2);
    let results = cp.resume().await.unwrap();
    assert_eq!(results.len(), 1);
    let (rid, outcome) = &results[0];
    assert_eq!(*rid, id);
    let JobOutcome::Checkpoint(r) = outcome.as_ref().unwrap() else {
        panic!("{outcome:?}")
    };
    assert_eq!(r.generation, 1);
    assert_eq!(
        r.chunks_full, 300,
        "the report covers every chunk, whichever attempt did it"
    );
    assert!(
        r.blobs_uploaded <= 200 + 4,
        "recorded chunks were uploaded again: {r:?}"
    );
    let rec = cp.job(id).unwrap();
    assert_eq!((rec.state, rec.attempts), (JobState::Succeeded, 2));
    let out = dir.path().join("out");
    cp.restore(&db, None, &out).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
    assert_eq!(
        cp.list(&db).await.unwrap().len(),
        1,
        "published exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_checkpoint_publishes_nothing_and_frees_its_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let db = DbId::new("cancelled").unwrap();
    let (src, _) = source(dir.path(), 300);
    let cp = open(dir.path(), 3);
    // A queued job is cancelled at once.
    let queued = cp.enqueue(spec(&db, &src)).unwrap();
    cp.cancel(queued).unwrap();
    assert!(matches!(
        cp.run_job(queued).await,
        Err(CairnError::JobEnded { .. })
    ));
    // A running job stops at its next safe point.
    let id = cp.enqueue(spec(&db, &src)).unwrap();
    let (result, ()) = tokio::join!(cp.run_job(id), async {
        progress_reaches(&cp, id, 20).await;
        cp.cancel(id).unwrap();
    });
    assert!(
        matches!(result, Err(CairnError::Cancelled { .. })),
        "{result:?}"
    );
    assert_eq!(cp.job(id).unwrap().state, JobState::Cancelled);
    assert!(
        !dir.path()
            .join("state/scratch")
            .join(id.to_string())
            .exists(),
        "scratch not freed"
    );
    let tenant = cp.config().tenant.clone();
    let manifests = cp
        .store()
        .list(&keys::manifests_prefix(&tenant, &db))
        .await
        .unwrap();
    assert!(
        manifests.is_empty(),
        "a cancelled job published {manifests:?}"
    );
    // The database is usable afterwards.
    assert_eq!(cp.checkpoint(&db, &src).await.unwrap().generation, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_listed_with_their_outcome_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = DbId::new("listed").unwrap();
    let (src, _) = source(dir.path(), 4);
    {
        let cp = open(dir.path(), 4);
        cp.checkpoint(&db, &src).await.unwrap();
        let err = cp
            .restore(&DbId::new("missing").unwrap(), None, &dir.path().join("x"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
    let cp = open(dir.path(), 5);
    let jobs = cp.jobs().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(
        (jobs[0].spec.kind(), jobs[0].state),
        ("checkpoint", JobState::Succeeded)
    );
    assert_eq!(jobs[0].generation, Some(1));
    assert_eq!(
        (jobs[1].spec.kind(), jobs[1].state),
        ("restore", JobState::Failed)
    );
    assert!(jobs[1]
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("missing"));
    // A second process cannot open the same state directory.
    let err = Checkpointer::open(Config::new(dir.path().join("state")).unwrap()).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
}

/// A page checkpoint at an LSN whose file is written again before it runs (an engine that
/// did not wait for an interrupted job) fails, naming the file and the LSN, rather than
/// publish other pages under that LSN; one without an LSN takes the file as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_checkpoint_at_an_lsn_fails_if_its_file_changed_before_it_ran() {
    let dir = tempfile::tempdir().unwrap();
    let cp = open(dir.path(), 1);
    let db = DbId::new("lsn").unwrap();
    let (src, mut data) = source(dir.path(), 4);
    let opts = cairn_orchestrator::CheckpointOptions {
        lsn: Some(cairn_orchestrator::Lsn(10)),
        ..Default::default()
    };
    let at_lsn = cp.enqueue_checkpoint(&db, &src, &opts).unwrap();
    let plain = cp
        .enqueue_checkpoint(&db, &src, &Default::default())
        .unwrap();
    // The engine writes the file again (and moves its mtime) before the jobs run.
    std::thread::sleep(Duration::from_millis(10));
    data[5] ^= 1;
    let Source::Pages { path, .. } = &src else {
        unreachable!()
    };
    std::fs::write(path, &data).unwrap();
    let results = cp.resume().await.unwrap();
    let of = |id| {
        results
            .iter()
            .find(|(j, _)| *j == id)
            .map(|(_, r)| r)
            .unwrap()
    };
    match of(at_lsn) {
        Err(CairnError::SourceChanged { lsn: 10, path, .. }) => {
            assert!(path.ends_with("db.bin"), "{path}")
        }
        other => panic!("{other:?}"),
    }
    assert!(of(plain).is_ok(), "{:?}", of(plain));
    assert_eq!(cp.job(at_lsn).unwrap().state, JobState::Failed);
    let out = dir.path().join("out");
    cp.restore(&db, None, &out).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}
