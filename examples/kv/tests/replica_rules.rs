//! The engine's rules for using Cairn, each in a case that would go wrong without it,
//! against the embedded local store (no server needed):
//!
//! - a flush whose page checkpoint a crash prevented is still published in full by the
//!   next process (its first page checkpoint compares digests instead of trusting a
//!   tracker that lost its marks in the crash);
//! - a page checkpoint left unfinished is run before the page file is written again (a
//!   job re-planned later would read the new pages under its old LSN);
//! - local segments are deleted only once shipped, although the watermark (a page
//!   checkpoint's LSN) passes them;
//! - a restore to an LSN inside a record is refused, naming it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use cairn_kv::replica::Replica;
use cairn_kv::workload::apply;
use cairn_kv::{Kv, Options, Workload};
use cairn_orchestrator::{CheckpointOptions, Config, DbId, Lsn, Source};

const WL: Workload = Workload {
    seed: 11,
    keys: 800,
};
const OPTS: Options = Options {
    data_pages: 64,
    segment_size: 8 * 1024,
};

fn db() -> DbId {
    DbId::new("rules").unwrap()
}

fn config(state: &Path, store: &Path) -> Config {
    let mut cfg = Config::new(state).unwrap();
    cfg.store_url = Some(format!("file://{}", store.display()));
    cfg.chunk_size = 64 * 1024;
    cfg
}

/// Commits batches up to `until` (sealing as it goes); returns the LSN after them.
fn commit_until(kv: &mut Kv, until: u64) -> u64 {
    while kv.next_seq() < until {
        kv.commit(&WL.batch(kv.next_seq())).unwrap();
        kv.seal_if_full().unwrap();
    }
    kv.lsn()
}

fn model(upto_seq: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut m = BTreeMap::new();
    for s in 0..upto_seq {
        apply(&mut m, &WL.batch(s));
    }
    m.into_iter().collect()
}

/// Restores `lsn` on a fresh state directory and returns the entries.
async fn restored(dir: &Path, store: &Path, name: &str, lsn: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cp = cairn_orchestrator::Checkpointer::open(config(&dir.join(name), store)).unwrap();
    let to = dir.join(format!("{name}-data"));
    cairn_kv::restore::restore(&cp, &db(), lsn, &to, OPTS.data_pages)
        .await
        .unwrap();
    let kv = Kv::open(&to, &OPTS).unwrap();
    assert_eq!(kv.lsn(), lsn);
    kv.entries()
        .into_iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_a_crash_kept_from_its_checkpoint_is_still_published() {
    let dir = tempfile::tempdir().unwrap();
    let (data, state, store) = (
        dir.path().join("d"),
        dir.path().join("s"),
        dir.path().join("st"),
    );
    {
        let mut kv = Kv::open(&data, &OPTS).unwrap();
        let (mut rep, _) = Replica::open(config(&state, &store), db()).await.unwrap();
        commit_until(&mut kv, 100);
        rep.checkpoint_pages(&mut kv).await.unwrap().unwrap();
        commit_until(&mut kv, 200);
        rep.ship(&kv).await.unwrap();
        // The crash comes after this flush and before its checkpoint.
        kv.flush().unwrap();
    }
    let mut kv = Kv::open(&data, &OPTS).unwrap();
    let (mut rep, _) = Replica::open(config(&state, &store), db()).await.unwrap();
    // Only a few pages change after the restart: most of what the lost flush wrote is
    // in no mark of this process.
    commit_until(&mut kv, 203);
    let p = rep.checkpoint_pages(&mut kv).await.unwrap().unwrap();
    assert!(
        !p.tracked,
        "the first page checkpoint of a process compares digests"
    );
    assert!(p.pages_dirty > p.pages_written, "{p:?}");
    commit_until(&mut kv, 206);
    let q = rep.checkpoint_pages(&mut kv).await.unwrap().unwrap();
    assert!(q.tracked, "later ones use the tracker: {q:?}");
    let lsn = kv.lsn();
    drop(kv);
    assert_eq!(restored(dir.path(), &store, "fresh", lsn).await, model(206));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_page_checkpoint_runs_before_the_page_file_is_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let (data, state, store) = (
        dir.path().join("d"),
        dir.path().join("s"),
        dir.path().join("st"),
    );
    let mut kv = Kv::open(&data, &OPTS).unwrap();
    let (mut rep, _) = Replica::open(config(&state, &store), db()).await.unwrap();
    let first = commit_until(&mut kv, 120);
    rep.ship(&kv).await.unwrap();
    kv.flush().unwrap();
    // A page checkpoint at `first` is enqueued and left unfinished (as a crash, or a
    // caller that never awaited it, leaves one).
    let source = Source::Pages {
        path: kv.page_file().to_path_buf(),
        page_size: 4096,
    };
    let opts = CheckpointOptions {
        lsn: Some(Lsn(first)),
        ..CheckpointOptions::default()
    };
    let cp = rep.checkpointer();
    let job = cp.enqueue_checkpoint(&db(), &source, &opts).unwrap();
    commit_until(&mut kv, 240);
    rep.ship(&kv).await.unwrap();
    rep.checkpoint_pages(&mut kv).await.unwrap().unwrap();
    let cp = rep.checkpointer();
    assert!(!cp.job(job).unwrap().state.is_unfinished());
    assert!(cp.jobs().unwrap().iter().all(|r| !r.state.is_unfinished()));
    let second = kv.lsn();
    drop(kv);
    // The first checkpoint holds the pages of its own LSN, not the later ones.
    assert_eq!(restored(dir.path(), &store, "a", first).await, model(120));
    assert_eq!(restored(dir.path(), &store, "b", second).await, model(240));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_segments_go_only_once_shipped_though_the_watermark_passes_them() {
    let dir = tempfile::tempdir().unwrap();
    let (data, state, store) = (
        dir.path().join("d"),
        dir.path().join("s"),
        dir.path().join("st"),
    );
    let mut kv = Kv::open(&data, &OPTS).unwrap();
    let (mut rep, _) = Replica::open(config(&state, &store), db()).await.unwrap();
    commit_until(&mut kv, 150);
    let sealed = kv.wal().sealed().len();
    assert!(sealed >= 2, "{sealed} segments");
    rep.checkpoint_pages(&mut kv).await.unwrap().unwrap();
    let w = rep.checkpointer().watermark(&db()).await.unwrap();
    let last_end = kv.wal().sealed().last().unwrap().end();
    assert!(
        w.watermark >= last_end,
        "the page checkpoint passes them: {w:?}"
    );
    assert_eq!(rep.trim_local(&mut kv).await.unwrap(), None);
    assert_eq!(
        kv.wal().sealed().len(),
        sealed,
        "nothing unshipped is deleted"
    );
    rep.ship(&kv).await.unwrap().unwrap();
    let t = rep.trim_local(&mut kv).await.unwrap().unwrap();
    assert_eq!(t.deleted, sealed as u64, "{t:?}");
    assert!(kv.wal().sealed().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_inside_a_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (data, state, store) = (
        dir.path().join("d"),
        dir.path().join("s"),
        dir.path().join("st"),
    );
    let mut kv = Kv::open(&data, &OPTS).unwrap();
    let (mut rep, _) = Replica::open(config(&state, &store), db()).await.unwrap();
    commit_until(&mut kv, 100);
    let seg = kv.wal().sealed()[0].clone();
    rep.ship(&kv).await.unwrap();
    drop(kv);
    let cp = cairn_orchestrator::Checkpointer::open(config(&dir.path().join("f"), &store)).unwrap();
    let to = dir.path().join("restored");
    let err = cairn_kv::restore::restore(&cp, &db(), seg.start + 5, &to, OPTS.data_pages)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a record boundary"), "{err}");
    assert!(!to.exists());
}
