//! The orchestrator's error type.

use cairn_core::{CoreError, DbId, ErrorClass, Generation, TenantId};
use cairn_executor::ExecError;
use cairn_planner::PlanError;
use cairn_remote_store::StoreError;
use cairn_state::StateError;

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
    /// Source reading, staging or assembling failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// Local state or publishing failed.
    #[error(transparent)]
    State(#[from] StateError),
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
    /// The engine's dirty pages were given for a source that cannot use them.
    #[error("database {db}: dirty pages are used only for a raw page file; a {kind} source is read whole (drop the dirty pages from the options)")]
    DirtyPagesUnusable {
        /// Database.
        db: DbId,
        /// The source kind given.
        kind: &'static str,
    },
    /// A restore's target already exists (and is not an empty directory); nothing was
    /// written.
    #[error("restore target {path} already exists; restore somewhere else, remove it, or ask to overwrite it (cairn restore --force)")]
    TargetExists {
        /// The target.
        path: String,
    },
    /// A page file changed after a checkpoint at an LSN was requested and before it was
    /// published (say, the job was interrupted and the engine wrote the file again).
    #[error("database {db}: the page file {path} changed after the checkpoint at LSN {lsn} was requested (job {job}); its pages would be published under the wrong LSN, so the job fails: checkpoint again at the file's current LSN")]
    SourceChanged {
        /// Database.
        db: DbId,
        /// The page file.
        path: String,
        /// The LSN the job was to cover.
        lsn: u64,
        /// The job.
        job: String,
    },
    /// The generation was expired by garbage collection.
    #[error("generation {generation} of database {db} was expired by garbage collection (retention); it cannot be restored or verified")]
    Expired {
        /// Database.
        db: DbId,
        /// The generation.
        generation: Generation,
    },
    /// A garbage collection published the generation a checkpoint planned: it plans again
    /// on top of it.
    #[error("garbage collection published generation {generation} of {db} first; the checkpoint plans again on top of it")]
    PlanAgain {
        /// Database.
        db: DbId,
        /// The generation taken.
        generation: Generation,
    },
    /// No such pin.
    #[error("database {db} has no pin on generation {generation}")]
    UnknownPin {
        /// Database.
        db: DbId,
        /// The generation.
        generation: Generation,
    },
    /// No such lease.
    #[error("database {db} has no lease {lease}")]
    UnknownLease {
        /// Database.
        db: DbId,
        /// The lease (16 hex digits).
        lease: String,
    },
    /// A lease in force overlaps the range a head truncation drops.
    #[error("database {db}: lease {lease} holds LSNs {start}..{end} until {expires_unix_ms} (ms since the epoch); waited {waited_ms} ms. Release it, wait, or cancel its job")]
    LeaseHeld {
        /// Database.
        db: DbId,
        /// The lease (16 hex digits).
        lease: String,
        /// First LSN it holds.
        start: cairn_core::Lsn,
        /// One past the last.
        end: cairn_core::Lsn,
        /// Its expiry.
        expires_unix_ms: u64,
        /// How long the truncation waited.
        waited_ms: u64,
    },
    /// The database is busy with another publication of this process.
    #[error("database {db} is busy: {what}")]
    Busy {
        /// Database.
        db: DbId,
        /// What holds it.
        what: String,
    },
    /// A truncation or restore point that the WAL rules refuse.
    #[error("database {db}: {source}")]
    Wal {
        /// Database.
        db: DbId,
        /// Why.
        #[source]
        source: cairn_planner::wal::WalError,
    },
    /// A job's record or one of its items cannot be read back.
    #[error("job {job}: unreadable {item}: {reason}")]
    CorruptJob {
        /// The job.
        job: String,
        /// Which record or item.
        item: String,
        /// What is wrong.
        reason: String,
    },
    /// A job record or item cannot be encoded.
    #[error("job {job}: cannot encode {item}: {source}")]
    Encode {
        /// The job.
        job: String,
        /// Which record or item.
        item: &'static str,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A blocking task of a job panicked or was cancelled with its runtime.
    #[error("job {job}: {what} did not finish: {source}")]
    Join {
        /// The job.
        job: String,
        /// The task.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A checkpoint's plan builds on a generation the local state does not hold.
    #[error("job {job}: parent generation {generation} of {tenant}/{db} is not recorded in this state directory")]
    ParentMissing {
        /// The job.
        job: String,
        /// Tenant.
        tenant: TenantId,
        /// Database.
        db: DbId,
        /// The parent generation.
        generation: Generation,
    },
    /// A checkpoint reached publication without a record for one of its chunks.
    #[error("job {job}: chunk {chunk} was never recorded; the job cannot publish")]
    ChunkNotRecorded {
        /// The job.
        job: String,
        /// The chunk index.
        chunk: u64,
    },
    /// A job produced an outcome of another kind than it was enqueued for.
    #[error("job {job} was enqueued as a {expected} but produced another outcome")]
    UnexpectedOutcome {
        /// The job.
        job: String,
        /// The kind expected.
        expected: &'static str,
    },
}

impl CairnError {
    /// What a caller may do about this error, as decided where its cause is known. Only
    /// [`ErrorClass::Transient`] errors are retried (by the job runner).
    pub fn class(&self) -> ErrorClass {
        match self {
            CairnError::Exec(e) => e.class(),
            CairnError::State(e) => e.class(),
            CairnError::Store(e) => e.class(),
            CairnError::Core(e) => e.class(),
            CairnError::CorruptJob { .. } => ErrorClass::Corrupt,
            CairnError::Config { .. }
            | CairnError::UnknownDb { .. }
            | CairnError::UnknownGeneration { .. }
            | CairnError::KindMismatch { .. }
            | CairnError::Plan { .. }
            | CairnError::Cancelled { .. }
            | CairnError::JobEnded { .. }
            | CairnError::UnknownJob { .. }
            | CairnError::Encode { .. }
            | CairnError::Join { .. }
            | CairnError::ParentMissing { .. }
            | CairnError::ChunkNotRecorded { .. }
            | CairnError::UnexpectedOutcome { .. }
            | CairnError::DirtyPagesUnusable { .. }
            | CairnError::SourceChanged { .. }
            | CairnError::TargetExists { .. }
            | CairnError::UnknownLease { .. }
            | CairnError::Expired { .. }
            | CairnError::UnknownPin { .. }
            | CairnError::Wal { .. } => ErrorClass::Permanent,
            CairnError::LeaseHeld { .. }
            | CairnError::Busy { .. }
            | CairnError::PlanAgain { .. } => ErrorClass::Transient,
        }
    }

    /// Whether retrying the same operation could succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_transient()
    }
}
