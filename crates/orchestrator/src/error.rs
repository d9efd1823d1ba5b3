//! The orchestrator's error type.

use cairn_core::{CoreError, DbId, Generation, TenantId};
use cairn_executor::ExecError;
use cairn_manifest::ManifestError;
use cairn_planner::PlanError;
use cairn_remote_store::StoreError;

/// Errors of the `Checkpointer` facade. Each names the database, generation, path or key.
#[derive(Debug, thiserror::Error)]
pub enum CairnError {
    /// Configuration that cannot work.
    #[error("configuration: {what}: {reason}")]
    Config {
        /// The setting.
        what: String,
        /// Why it is rejected.
        reason: String,
    },
    /// No generation of the database exists, locally or in the store.
    #[error("unknown database {tenant}/{db}: no published generation in {store}")]
    UnknownDb {
        /// Tenant.
        tenant: TenantId,
        /// Database.
        db: DbId,
        /// The store searched.
        store: String,
    },
    /// The requested generation does not exist.
    #[error("database {tenant}/{db} has no generation {generation} (available: {available})")]
    UnknownGeneration {
        /// Tenant.
        tenant: TenantId,
        /// Database.
        db: DbId,
        /// Requested generation.
        generation: Generation,
        /// Generations that exist, summarised.
        available: String,
    },
    /// A checkpoint's source kind differs from the database's.
    #[error(
        "database {tenant}/{db} holds a {recorded} source; it cannot be checkpointed as {given}"
    )]
    KindMismatch {
        /// Tenant.
        tenant: TenantId,
        /// Database.
        db: DbId,
        /// Kind of the published generations.
        recorded: &'static str,
        /// Kind asked for now.
        given: &'static str,
    },
    /// Planning refused the source.
    #[error("database {db}: {source}")]
    Plan {
        /// Database.
        db: DbId,
        /// Why.
        #[source]
        source: PlanError,
    },
    /// Verification found damage.
    #[error("verify of {tenant}/{db} generation {generation} found {count} bad blob(s): {first}")]
    VerifyFailed {
        /// Tenant.
        tenant: TenantId,
        /// Database.
        db: DbId,
        /// Generation.
        generation: Generation,
        /// Number of problems.
        count: usize,
        /// The first problem.
        first: String,
    },
    /// Source reading, staging or assembling failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// Local state or publishing failed.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The object store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A format error.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The job was cancelled through the API; nothing was published.
    #[error("job {job} was cancelled; nothing was published and its scratch space was freed")]
    Cancelled {
        /// The job.
        job: String,
    },
    /// The job is not runnable (it already succeeded, failed or was cancelled).
    #[error("job {job} is {state} and will not run again")]
    JobEnded {
        /// The job.
        job: String,
        /// Its state.
        state: String,
    },
    /// No such job.
    #[error("no job {job} in this state directory")]
    UnknownJob {
        /// The job.
        job: String,
    },
    /// A background task failed.
    #[error("internal task failed: {0}")]
    Task(String),
}

impl CairnError {
    /// Whether retrying the whole operation could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            CairnError::Exec(e) => e.is_retryable(),
            CairnError::Manifest(e) => e.is_retryable(),
            // A read that still fails verification after the store's own re-reads is damage.
            CairnError::Store(StoreError::Corrupt(_)) => false,
            CairnError::Store(e) => e.is_retryable(),
            CairnError::Core(e) => e.is_retryable(),
            CairnError::Task(_) => true,
            CairnError::Cancelled { .. }
            | CairnError::JobEnded { .. }
            | CairnError::UnknownJob { .. } => false,
            CairnError::Config { .. }
            | CairnError::UnknownDb { .. }
            | CairnError::UnknownGeneration { .. }
            | CairnError::KindMismatch { .. }
            | CairnError::Plan { .. }
            | CairnError::VerifyFailed { .. } => false,
        }
    }
}
