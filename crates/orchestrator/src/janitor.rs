//! The janitor: scratch directories and records of jobs that will not run again are
//! removed, at open and then periodically in a service ([`Checkpointer::run_janitor`]).
//!
//! Contract: only the newest [`KEEP_FINISHED_JOBS`] finished job records are kept, for
//! `cairn status`. A job's scratch directory is removed when the job will not run again
//! (finished, or no record at all: a job that vanished) and it is not in use by this
//! process ([`cairn_executor::Scratch::in_use`]) and nothing in it changed for at least the
//! sweep's minimum age. Scratch of unfinished jobs is kept whatever its age: it holds
//! staged work their resumption reuses. At open the minimum age is zero (no job runs yet);
//! a periodic sweep uses a bound, so a job whose scratch exists a moment before its record
//! is never swept. Each removal is logged with the job and its bytes and counted
//! ([`Checkpointer::janitor_totals`]).
//!
//! Crash: each removal is independent and idempotent; a crash half-way leaves garbage the
//! next sweep removes. Retries: none within a sweep; a periodic sweep that fails (an
//! unreadable scratch directory) is logged and tried again at the next period.
//! Cancellation: the periodic task stops when its stop signal turns true; a sweep in hand
//! finishes first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_core::JobId;
use serde::Serialize;

use crate::queue::JobRecord;
use crate::{CairnError, Checkpointer};

/// Finished job records kept for `cairn status`.
pub(crate) const KEEP_FINISHED_JOBS: usize = 200;

/// What sweeps removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Job scratch directories removed.
    pub scratch_dirs: u64,
    /// Bytes they held.
    pub scratch_bytes: u64,
}

/// Totals of every sweep of one [`Checkpointer`] (for metrics).
#[derive(Debug, Default)]
pub(crate) struct JanitorTotals {
    dirs: AtomicU64,
    bytes: AtomicU64,
}

impl Checkpointer {
    /// The open-time sweep: records pruned, and the scratch of every job that will not
    /// run again removed (see the module documentation).
    pub(crate) fn sweep_finished_jobs(&self) -> Result<SweepReport, CairnError> {
        self.sweep(Duration::ZERO)
    }

    /// One sweep: prunes finished job records and removes the scratch of jobs that will
    /// not run again, unchanged for at least `min_age` and not in use here.
    pub fn sweep(&self, min_age: Duration) -> Result<SweepReport, CairnError> {
        let keep = self.prune_job_records()?;
        let now = std::time::UNIX_EPOCH + Duration::from_millis(self.env.now_ms());
        let mut report = SweepReport::default();
        for job in self.scratch.jobs()? {
            if keep.contains(&job) || self.scratch.in_use(job) {
                continue;
            }
            let Some(usage) = self.scratch.usage(job)? else {
                continue;
            };
            // A directory whose time is unknown or in the future counts as fresh.
            let age = usage
                .modified
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or(Duration::ZERO);
            if age < min_age {
                continue;
            }
            self.scratch.remove_job(job)?;
            tracing::info!(
                job = %job,
                bytes = usage.bytes,
                age_s = age.as_secs(),
                "janitor removed the scratch of a job that will not run again"
            );
            report.scratch_dirs += 1;
            report.scratch_bytes += usage.bytes;
        }
        self.janitor
            .dirs
            .fetch_add(report.scratch_dirs, Ordering::Relaxed);
        self.janitor
            .bytes
            .fetch_add(report.scratch_bytes, Ordering::Relaxed);
        Ok(report)
    }

    /// What every sweep of this process removed so far.
    pub fn janitor_totals(&self) -> SweepReport {
        SweepReport {
            scratch_dirs: self.janitor.dirs.load(Ordering::Relaxed),
            scratch_bytes: self.janitor.bytes.load(Ordering::Relaxed),
        }
    }

    /// Sweeps every `every` (scratch unchanged for `min_age`) until `stop` turns true. A
    /// failed sweep is logged and tried again at the next period: the service goes on.
    pub async fn run_janitor(
        &self,
        every: Duration,
        min_age: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; open has just swept.
        tick.tick().await;
        loop {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = tick.tick() => {}
                r = stop.changed() => {
                    if r.is_err() {
                        return;
                    }
                    continue;
                }
            }
            if let Err(e) = self.sweep(min_age) {
                tracing::warn!(error = %e, "janitor sweep failed; trying again at the next period");
            }
        }
    }

    /// Deletes finished job records past the newest [`KEEP_FINISHED_JOBS`] and returns the
    /// jobs whose scratch must stay: unfinished ones, and those whose record does not
    /// decode (possibly an unfinished job of another build; `cairn status` names it).
    fn prune_job_records(&self) -> Result<Vec<JobId>, CairnError> {
        let mut records = Vec::new();
        let mut undecodable = Vec::new();
        for (id, b) in self.state.jobs()? {
            match JobRecord::decode(id, &b) {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "job record does not decode; its scratch is kept");
                    undecodable.push(id);
                }
            }
        }
        records.sort_by_key(|r| std::cmp::Reverse(r.seq));
        for (n, r) in records
            .iter()
            .filter(|r| !r.state.is_unfinished())
            .enumerate()
        {
            self.state.delete_job(r.id, n >= KEEP_FINISHED_JOBS)?;
        }
        Ok(records
            .iter()
            .filter(|r| r.state.is_unfinished())
            .map(|r| r.id)
            .chain(undecodable)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::{Config, Env};
    use cairn_remote_store::{RemoteStore, StoreConfig};

    /// A checkpointer whose clock reads the system time plus `ahead`, so that files
    /// written now look `ahead` old.
    fn open(state: &std::path::Path, ahead: Duration) -> Checkpointer {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let store = RemoteStore::open_with("memory://janitor", StoreConfig::default()).unwrap();
        let env = Env::fixed((now + ahead).as_millis() as u64, 7);
        Checkpointer::open_with(Config::new(state).unwrap(), store, env).unwrap()
    }

    /// A scratch directory of a job without a record (one that vanished), with `bytes`.
    fn leftover(state: &std::path::Path, job: JobId, bytes: usize) {
        let dir = state.join("scratch").join(job.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("blob"), vec![7u8; bytes]).unwrap();
    }

    #[test]
    fn a_vanished_jobs_scratch_goes_once_older_than_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (old, young) = (JobId(0xa1), JobId(0xb2));
        // Fresh: the periodic sweep keeps it.
        let cp = open(dir.path(), Duration::ZERO);
        leftover(dir.path(), young, 10);
        assert_eq!(
            cp.sweep(Duration::from_secs(3600)).unwrap(),
            SweepReport::default()
        );
        assert!(cp.scratch.usage(young).unwrap().is_some());
        drop(cp);
        // Two hours later it is removed, and counted with its bytes.
        let cp = open(dir.path(), Duration::from_secs(7200));
        // (Open swept everything that will not run again, whatever its age.)
        assert!(cp.scratch.usage(young).unwrap().is_none());
        leftover(dir.path(), old, 1000);
        let r = cp.sweep(Duration::from_secs(3600)).unwrap();
        assert_eq!(
            r,
            SweepReport {
                scratch_dirs: 1,
                scratch_bytes: 1000
            }
        );
        assert!(cp.scratch.usage(old).unwrap().is_none());
        // The totals count the open-time sweep too.
        assert_eq!(
            cp.janitor_totals(),
            SweepReport {
                scratch_dirs: 2,
                scratch_bytes: 1010
            }
        );
    }

    #[test]
    fn scratch_in_use_here_is_never_swept() {
        let dir = tempfile::tempdir().unwrap();
        let cp = open(dir.path(), Duration::from_secs(7200));
        let job = JobId(0xc3);
        let handle = cp.scratch.job(job).unwrap();
        std::fs::write(handle.dir().join("staged"), b"x").unwrap();
        let clone = handle.clone();
        drop(handle);
        assert_eq!(cp.sweep(Duration::ZERO).unwrap(), SweepReport::default());
        assert!(
            cp.scratch.usage(job).unwrap().is_some(),
            "a clone still holds it"
        );
        drop(clone);
        let r = cp.sweep(Duration::ZERO).unwrap();
        assert_eq!(r.scratch_dirs, 1);
        assert!(!cp.scratch.in_use(job));
    }

    #[tokio::test]
    async fn the_periodic_janitor_sweeps_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let cp = open(dir.path(), Duration::from_secs(7200));
        leftover(dir.path(), JobId(0xd4), 5);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let janitor = cp.run_janitor(Duration::from_millis(10), Duration::from_secs(60), rx);
        tokio::pin!(janitor);
        // It runs until the leftover is gone, then stops at the signal.
        loop {
            tokio::select! {
                () = &mut janitor => panic!("the janitor stopped unasked"),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
            if cp.janitor_totals().scratch_dirs == 1 {
                break;
            }
        }
        assert_eq!(cp.janitor_totals().scratch_bytes, 5);
        tx.send(true).unwrap();
        janitor.await;
    }
}
