//! The job records of the durable queue: what a job does ([`JobSpec`]), where it is
//! ([`JobState`], [`Phase`], [`Progress`]) and how `cairn status` shows it ([`JobStatus`]).
//! Records are plain data; [`super::Job`] is the one place that changes and persists them.

use std::path::PathBuf;

use cairn_core::{DbId, JobId, TenantId};
use serde::{Deserialize, Serialize};

use crate::{CairnError, Source};

/// Attempts before a job with transient errors is given up.
pub const MAX_ATTEMPTS: u32 = 3;

/// Starts (including those cut short by a crash) before a job is given up, so a job that
/// kills its process is not resumed forever.
pub const MAX_STARTS: u32 = 10;

/// What a job does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    /// Create a checkpoint.
    Checkpoint {
        /// Database.
        db: DbId,
        /// Source.
        source: Source,
        /// Chunk size to plan with.
        chunk_size: u64,
        /// The LSN a page checkpoint covers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lsn: Option<u64>,
        /// The page file when a checkpoint at an LSN was requested: if it changes before
        /// the job publishes, the job fails rather than publish other pages at that LSN.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stamp: Option<crate::checkpoint::FileStamp>,
    },
    /// Restore a generation.
    Restore {
        /// Database.
        db: DbId,
        /// Generation (latest when `None`, resolved when the job is planned).
        generation: Option<u64>,
        /// Target path.
        to: PathBuf,
        /// Restore to this LSN (a page checkpoint and the WAL to replay) instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lsn: Option<u64>,
    },
    /// Verify a generation.
    Verify {
        /// Database.
        db: DbId,
        /// Generation (latest when `None`).
        generation: Option<u64>,
        /// Re-read every blob.
        deep: bool,
    },
    /// Apply a retention policy and collect unreferenced blobs.
    Gc {
        /// Database.
        db: DbId,
        /// Keep the newest N data generations.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keep_last: Option<u64>,
        /// Keep data generations younger than this (milliseconds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keep_within_ms: Option<u64>,
        /// Keep unreferenced blobs younger than this by the store's clock (milliseconds).
        grace_ms: u64,
        /// Decide and report only; publish and delete nothing.
        dry_run: bool,
        /// Report every kept blob with its reason.
        #[serde(default)]
        explain: bool,
    },
}

impl JobSpec {
    /// `checkpoint`, `restore`, `verify` or `gc`.
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Checkpoint { .. } => "checkpoint",
            JobSpec::Restore { .. } => "restore",
            JobSpec::Verify { .. } => "verify",
            JobSpec::Gc { .. } => "gc",
        }
    }

    /// The database the job acts on.
    pub fn db(&self) -> &DbId {
        match self {
            JobSpec::Checkpoint { db, .. }
            | JobSpec::Restore { db, .. }
            | JobSpec::Verify { db, .. }
            | JobSpec::Gc { db, .. } => db,
        }
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting to run (new, or backing off after a retryable failure).
    Queued,
    /// Claimed by a process (or orphaned by one that died).
    Running,
    /// Finished.
    Succeeded,
    /// Gave up; `last_error` says why.
    Failed,
    /// Cancelled through the API.
    Cancelled,
}

impl JobState {
    /// Whether the job still has work to do.
    pub fn is_unfinished(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }
}

/// The step a job reached. Checkpoints go planned → staged → uploaded → published →
/// cleaned; restores planned → written → committed; verifies straight to checked; GC
/// planned → published (its generation) → swept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Nothing durable yet beyond the record.
    New,
    /// The plan is persisted.
    Planned,
    /// Every blob is staged (or known to be stored).
    Staged,
    /// Every blob is in the store.
    Uploaded,
    /// The manifest is published and recorded locally.
    Published,
    /// Scratch removed; the job is complete.
    Cleaned,
    /// Every restored byte is written and synced.
    Written,
    /// The restored file or directory is in place.
    Committed,
    /// Verification finished.
    Checked,
    /// Unreferenced blobs deleted (GC).
    Swept,
}

/// Units and bytes done, for `cairn status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Chunks, segments or blobs done.
    pub done: u64,
    /// Chunks, segments or blobs in the plan.
    pub total: u64,
    /// Bytes done.
    pub bytes_done: u64,
    /// Bytes in the plan.
    pub bytes_total: u64,
}

/// A job as persisted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Identity.
    pub id: JobId,
    /// Enqueue order within this state directory.
    #[serde(default)]
    pub seq: u64,
    /// Tenant.
    pub tenant: TenantId,
    /// What it does.
    pub spec: JobSpec,
    /// Life state.
    pub state: JobState,
    /// Step reached.
    pub phase: Phase,
    /// Attempts started.
    pub attempts: u32,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// Earliest time of the next attempt (ms since the epoch).
    pub not_before_ms: u64,
    /// Creation time.
    pub created_ms: u64,
    /// Last update (the heartbeat of a running job).
    pub updated_ms: u64,
    /// Process id of the last claimer.
    pub owner: Option<u32>,
    /// Progress.
    pub progress: Progress,
    /// The generation planned, published, restored or verified.
    pub generation: Option<u64>,
    /// The report of a succeeded job.
    pub result: Option<serde_json::Value>,
}

/// A job as `cairn status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobStatus {
    /// Identity, 16 hex digits.
    pub id: String,
    /// `checkpoint`, `restore`, `verify` or `gc`.
    pub kind: &'static str,
    /// Database.
    pub db: String,
    /// Life state.
    pub state: JobState,
    /// Step reached.
    pub phase: Phase,
    /// Progress.
    pub progress: Progress,
    /// Attempts started.
    pub attempts: u32,
    /// The last error.
    pub last_error: Option<String>,
    /// Generation.
    pub generation: Option<u64>,
    /// Creation time (ms since the epoch).
    pub created_ms: u64,
    /// Last update (ms since the epoch).
    pub updated_ms: u64,
}

impl From<&JobRecord> for JobStatus {
    fn from(r: &JobRecord) -> Self {
        Self {
            id: r.id.to_string(),
            kind: r.spec.kind(),
            db: r.spec.db().to_string(),
            state: r.state,
            phase: r.phase,
            progress: r.progress.clone(),
            attempts: r.attempts,
            last_error: r.last_error.clone(),
            generation: r.generation,
            created_ms: r.created_ms,
            updated_ms: r.updated_ms,
        }
    }
}

impl JobRecord {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, CairnError> {
        serde_json::to_vec(self).map_err(|source| CairnError::Encode {
            job: self.id.to_string(),
            item: "record",
            source,
        })
    }

    pub(crate) fn decode(id: JobId, bytes: &[u8]) -> Result<Self, CairnError> {
        serde_json::from_slice(bytes).map_err(|e| CairnError::CorruptJob {
            job: id.to_string(),
            item: "record".into(),
            reason: e.to_string(),
        })
    }
}

/// Backoff before attempt `attempt + 1`: 1 s, 2 s, 4 s … capped at 60 s, with ±50% jitter.
pub fn backoff_ms(attempt: u32, jitter: u64) -> u64 {
    let base = 1000u64.saturating_mul(1 << attempt.min(6)).min(60_000);
    base / 2 + jitter % base.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!((500..1500).contains(&backoff_ms(0, 123)));
        assert!((1000..3000).contains(&backoff_ms(1, 999_999)));
        assert!(backoff_ms(30, u64::MAX) < 90_000);
    }

    #[test]
    fn records_roundtrip() {
        let r = JobRecord {
            id: JobId(7),
            seq: 1,
            tenant: TenantId::new("t").unwrap(),
            spec: JobSpec::Restore {
                db: DbId::new("d").unwrap(),
                generation: Some(3),
                to: PathBuf::from("/x"),
                lsn: None,
            },
            state: JobState::Queued,
            phase: Phase::New,
            attempts: 0,
            last_error: None,
            not_before_ms: 0,
            created_ms: 1,
            updated_ms: 1,
            owner: None,
            progress: Progress::default(),
            generation: None,
            result: None,
        };
        let back = JobRecord::decode(JobId(7), &r.encode().unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(JobStatus::from(&r).id, "0000000000000007");
    }
}
