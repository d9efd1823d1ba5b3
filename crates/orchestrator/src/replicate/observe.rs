//! What the replicate loop tells an observer (a metrics registry, a readiness check):
//! each checkpoint it starts and how it ended, and after every step where replication
//! stands ([`ReplicateStatus`]).
//!
//! Contract: the loop calls the observer synchronously, from its own task, at the moment
//! the event happens; an observer must be cheap and must not block (record and return).
//! Nothing the observer does can fail the loop. The status is built from what the loop
//! already holds (its report, the newest state this process published or read, the local
//! leases): observing costs no store request.
//!
//! Crash: observers live in memory; a restarted loop starts a new status. Retries: the
//! loop's (see [`super`]); an observer sees each failed step and its backoff.
//! Cancellation: none of its own; the loop stops calling once it returns.

use std::time::Duration;

use cairn_core::SourceKind;
use serde::Serialize;

use crate::{CairnError, CheckpointReport, Checkpointer};

/// Hooks called by [`crate::Checkpointer::replicate_observed`]; every method has an empty
/// default.
pub trait ReplicateObserver: Send + Sync {
    /// A checkpoint of `kind` (`segments`: shipped WAL; `sqlite`: a page generation) starts.
    fn checkpoint_started(&self, kind: SourceKind) {
        let _ = kind;
    }

    /// That checkpoint ended after `elapsed`, with its report or its error.
    fn checkpoint_finished(
        &self,
        kind: SourceKind,
        elapsed: Duration,
        outcome: Result<&CheckpointReport, &CairnError>,
    ) {
        let _ = (kind, elapsed, outcome);
    }

    /// A step ended (succeeded or failed); where replication stands now.
    fn step_finished(&self, status: &ReplicateStatus) {
        let _ = status;
    }
}

/// An observer that ignores everything ([`crate::Checkpointer::replicate`] uses it).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObserver;

impl ReplicateObserver for NoObserver {}

/// Where a replication run stands after a step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplicateStatus {
    /// Tenant.
    pub tenant: String,
    /// Database.
    pub db: String,
    /// When the run started (unix ms, the checkpointer's clock).
    pub started_ms: u64,
    /// When this status was taken (unix ms).
    pub at_ms: u64,
    /// Steps run.
    pub steps: u64,
    /// Steps that failed and were retried.
    pub steps_failed: u64,
    /// Failed steps in a row, up to this one (0: the last step succeeded).
    pub consecutive_failures: u32,
    /// The error of the last step, if it failed.
    pub last_error: Option<String>,
    /// After a failed step: how long the loop waits before the next one.
    pub retry_in_ms: Option<u64>,
    /// Every transaction committed before this time (unix ms) is durable in the store: the
    /// time the snapshot of the newest step that published everything it read was opened.
    /// `None` until a step did.
    pub durable_ms: Option<u64>,
    /// The newest generation published (by this run or before it, as this process knows).
    pub generation: Option<u64>,
    /// That generation's publication time (unix ms, from its manifest).
    pub generation_created_ms: Option<u64>,
    /// The truncation watermark ([`crate::Watermark::watermark`]), if known.
    pub watermark: Option<u64>,
    /// The end of the published WAL stream.
    pub wal_end: Option<u64>,
}

impl ReplicateStatus {
    /// Replication lag at `now_ms`: how long ago the newest durable point was, in ms
    /// (before any durable step, how long the run has been going: a lower bound).
    pub fn lag_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.durable_ms.unwrap_or(self.started_ms))
    }
}

/// What this process knows of a database's newest publication (no store request).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Published {
    pub generation: Option<u64>,
    pub generation_created_ms: Option<u64>,
    pub watermark: Option<u64>,
    pub wal_end: Option<u64>,
}

/// The newest generation of `db` this process published or read, with its watermark.
pub(crate) fn published_status(cp: &Checkpointer, db: &cairn_core::DbId) -> Published {
    let latest = cp.latest.get(db);
    let Some(latest) = latest.as_deref() else {
        return Published::default();
    };
    let watermark = match cp.watermark_of(db, Some(latest)) {
        Ok(w) => Some(w.watermark),
        Err(e) => {
            tracing::debug!(db = %db, error = %e, "no watermark for the status");
            None
        }
    };
    Published {
        generation: Some(latest.manifest.generation.0),
        generation_created_ms: Some(latest.manifest.created_unix_ms),
        watermark,
        wal_end: latest.state.wal.as_ref().map(|w| w.end.0),
    }
}

/// Counts a failed step of `db` that will be retried (`failures`: in a row, this one
/// included), logs it as `what` failed, and returns the wait before the next step.
pub(crate) fn failed_step(
    failures: &mut u32,
    db: &cairn_core::DbId,
    e: &CairnError,
    what: &str,
    (interval, max): (Duration, Duration),
) -> Duration {
    *failures = failures.saturating_add(1);
    let wait = step_backoff(interval, max, *failures);
    tracing::warn!(
        db = %db,
        error = %e,
        failures = *failures,
        retry_in = ?wait,
        "{what} failed; retrying after a backoff"
    );
    wait
}

/// Waits `wait`, or less if `stop` changes first.
pub(crate) async fn pause(wait: Duration, stop: &mut tokio::sync::watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = stop.changed() => {}
    }
}

/// The wait after `failures` failed steps in a row: the interval, doubled per further
/// failure, capped at `max` (never below the interval).
pub fn step_backoff(interval: Duration, max: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    interval.saturating_mul(factor).min(max.max(interval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_interval_and_is_capped() {
        let i = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        assert_eq!(step_backoff(i, max, 1), i);
        assert_eq!(step_backoff(i, max, 2), Duration::from_millis(200));
        assert_eq!(step_backoff(i, max, 4), Duration::from_millis(800));
        assert_eq!(step_backoff(i, max, 5), max);
        assert_eq!(step_backoff(i, max, 1000), max);
        // An interval longer than the cap is kept.
        assert_eq!(
            step_backoff(Duration::from_secs(5), max, 3),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn lag_counts_from_the_durable_point_or_the_start() {
        let mut s = ReplicateStatus {
            started_ms: 1_000,
            ..Default::default()
        };
        assert_eq!(s.lag_ms(4_000), 3_000);
        s.durable_ms = Some(3_500);
        assert_eq!(s.lag_ms(4_000), 500);
        assert_eq!(s.lag_ms(3_000), 0);
    }
}
