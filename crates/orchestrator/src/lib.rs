//! The `Checkpointer` facade: what an embedding engine and the `cairn` command call.
//!
//! Contract: [`Checkpointer::checkpoint`] publishes exactly one new generation of a
//! database or fails having published nothing; [`Checkpointer::restore`] writes exactly the
//! bytes of a published generation or leaves the target untouched;
//! [`Checkpointer::verify`] reports every referenced blob that is missing, has the wrong
//! size or (deep) fails its checksums.
//!
//! Every checkpoint, restore and verify runs as a durable job (the `queue` and `runner` modules), so
//! a process killed at any instant leaves work that the next one resumes: a checkpoint's
//! staged blobs stay in its scratch directory, uploaded blobs that no manifest references
//! yet are found by HEAD and not uploaded again, and a published remote manifest that the
//! local state lacks is imported. An interrupted restore leaves only
//! `<target>.cairn-restore`, which its resumption continues.
//!
//! Retries: the store retries transient requests; the runner retries attempts that fail
//! with a transient error; a fenced publish fails its job, and the next checkpoint plans on
//! top of the winner. Cancellation: [`Checkpointer::cancel`] at the job's safe points, or
//! dropping the future (the crash case); nothing is published unless the manifest create
//! completed.

mod checkpoint;
mod config;
mod error;
mod gauges;
mod gc;
mod history;
mod janitor;
mod job_run;
mod publication;
mod queue;
mod readonly;
mod replicate;
mod restore;
mod runner;
mod schedule;
mod truncate;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_executor::Scratch;
use cairn_quota::Budget;
use cairn_state::StateDb;

pub use cairn_core::{
    CoreError, DbId, DbState, DirtySet, DirtyTracker, ErrorClass, Generation, JobId, Lsn, Manifest,
    PagesState, SegmentEntry, SourceKind, TenantId, WalState,
};
pub use cairn_executor::{sqlite_integrity_check, ExecError};
pub use cairn_planner::wal::{PageRef, WalError};
pub use cairn_planner::CostModel;
pub use cairn_remote_store::{RemoteStore, StoreConfig};
pub use cairn_state::Lease;
pub use checkpoint::{CheckpointOptions, CheckpointReport, CheckpointRun, FileStamp, Source};
pub use config::{
    Clock, Config, Env, SystemClock, DEFAULT_CHUNK_SIZE, MAX_COMPRESSION_LEVEL,
    MIN_COMPRESSION_LEVEL,
};
pub use error::CairnError;
pub use gauges::QuotaLevel;
pub use gc::{Count, GcOptions, GcReport, KeptBlob, Pin};
pub use history::{GenerationInfo, GenerationState};
pub use janitor::SweepReport;
pub use job_run::JobRun;
pub use publication::MAX_DIFF_CHAIN;
pub use queue::{CancelHandle, JobEvent, JobRecord, JobSpec, JobState, JobStatus, Phase, Progress};
pub use readonly::ReadOnlyCheckpointer;
pub use replicate::{
    step_backoff, NoObserver, ReplicateObserver, ReplicateOptions, ReplicateReport, ReplicateStatus,
};
pub use restore::{RestoreOptions, RestoreReport, SqlitePoint, SqliteRestoreReport};
pub use runner::JobOutcome;
pub use schedule::{ScheduleOptions, ScheduleReport, Trigger, SETTLE};
pub use truncate::{HeadOptions, LeaseHandle, LeaseInfo, TruncateReport, Watermark};
pub use verify::VerifyReport;

/// The checkpointer: local state, store, scratch, clock and randomness.
pub struct Checkpointer {
    cfg: Config,
    env: Env,
    state: Arc<StateDb>,
    store: RemoteStore,
    scratch: Scratch,
    /// The local cache budget (the tenant's node): replication spools.
    cache: Budget,
    writer: String,
    cancels: queue::Cancels,
    /// Serialises publications per database within this process (a checkpoint from its
    /// plan to its publish, a truncation), so they never fence each other.
    db_locks: dashmap::DashMap<cairn_core::DbId, Arc<tokio::sync::Mutex<()>>>,
    /// The newest materialised state of each database this process published or read.
    latest: dashmap::DashMap<cairn_core::DbId, GenerationState>,
    /// Per database, the tracker whose dirty pages checkpoints trust (see
    /// [`CheckpointOptions::tracker`]).
    trackers: dashmap::DashMap<cairn_core::DbId, u64>,
    /// SQLite snapshots lent to checkpoint jobs by their enqueuer (see
    /// [`CheckpointOptions::snapshot`]), taken by the job's plan.
    lent: dashmap::DashMap<JobId, Arc<cairn_executor::SqliteSnapshot>>,
    store_checked: tokio::sync::OnceCell<()>,
    /// What the janitor's sweeps removed.
    janitor: janitor::JanitorTotals,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("state", &self.cfg.state_dir)
            .field("store", &self.store.describe())
            .finish()
    }
}

impl Checkpointer {
    /// Opens the state directory and the configured store with the system clock.
    pub fn open(cfg: Config) -> Result<Self, CairnError> {
        let store = configured_store(&cfg)?;
        Self::open_with(cfg, store, Env::system())
    }

    /// Opens a checkpointer to share between tasks. With [`Config::resume_at_open`], its
    /// unfinished jobs are resumed in the background on the current tokio runtime (a
    /// resumed job that fails is logged and recorded as failed).
    pub fn open_shared(cfg: Config) -> Result<Arc<Self>, CairnError> {
        let resume = cfg.resume_at_open;
        let cp = Arc::new(Self::open(cfg)?);
        if resume {
            let handle = tokio::runtime::Handle::try_current().map_err(|e| CairnError::Config {
                what: "resume_at_open".into(),
                reason: format!("needs a tokio runtime to resume in: {e}"),
            })?;
            let bg = Arc::clone(&cp);
            handle.spawn(async move {
                match bg.resume().await {
                    Ok(results) => {
                        for (id, r) in results {
                            if let Err(e) = r {
                                tracing::warn!(job = %id, error = %e, "resumed job did not complete");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "could not resume unfinished jobs"),
                }
            });
        }
        Ok(cp)
    }

    /// Opens with an explicit store and environment (tests, embedding).
    pub fn open_with(cfg: Config, store: RemoteStore, env: Env) -> Result<Self, CairnError> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| CairnError::Config {
            what: format!("state directory {}", cfg.state_dir.display()),
            reason: e.to_string(),
        })?;
        let state = Arc::new(StateDb::open(&cfg.state_dir)?);
        let writer = state.writer_id(|| env.next_u64())?;
        let tenant = scratch_budget(&cfg);
        let job_limit = cfg.job_scratch_limit.unwrap_or(tenant.limit());
        let scratch = Scratch::open(&cfg.state_dir.join("scratch"), tenant)?
            .with_job_limit(job_limit)
            .with_compression(cfg.compression_level);
        let cp = Self::assemble(cfg, env, state, store, scratch, writer);
        cp.sweep_finished_jobs()?;
        Ok(cp)
    }

    /// The checkpointer over opened parts; nothing is read or written.
    fn assemble(
        cfg: Config,
        env: Env,
        state: Arc<StateDb>,
        store: RemoteStore,
        scratch: Scratch,
        writer: String,
    ) -> Self {
        let cache = Budget::root("cache", cfg.cache_limit).child(
            format!("tenant:{}", cfg.tenant),
            cfg.tenant_cache_limit.unwrap_or(cfg.cache_limit),
        );
        Self {
            cfg,
            env,
            state,
            store,
            scratch,
            cache,
            writer,
            cancels: queue::Cancels::default(),
            db_locks: dashmap::DashMap::new(),
            latest: dashmap::DashMap::new(),
            trackers: dashmap::DashMap::new(),
            lent: dashmap::DashMap::new(),
            store_checked: tokio::sync::OnceCell::new(),
            janitor: janitor::JanitorTotals::default(),
        }
    }

    /// Refuses a store that does not honour conditional create (publication depends on
    /// it), once per `Checkpointer`, before the first publication; skipped in the store's
    /// documented single-writer mode.
    pub(crate) async fn check_store(&self) -> Result<(), CairnError> {
        self.store_checked
            .get_or_try_init(|| async { self.store.check_conditional_create().await })
            .await?;
        Ok(())
    }

    /// The publication lock of one database (see `db_locks`).
    pub(crate) fn db_lock(&self, db: &cairn_core::DbId) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(self.db_locks.entry(db.clone()).or_default().value())
    }

    /// The store in use.
    pub fn store(&self) -> &RemoteStore {
        &self.store
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The scratch directory (`<state>/scratch`): staged blobs and restores into scratch.
    pub fn scratch_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("scratch")
    }

    /// This state directory's writer identity.
    pub fn writer_id(&self) -> &str {
        &self.writer
    }
}

/// The store `cfg` names (its URL, or the state directory's default; its settings file,
/// or the environment's).
fn configured_store(cfg: &Config) -> Result<RemoteStore, CairnError> {
    let url = match &cfg.store_url {
        Some(u) => u.clone(),
        None => default_store_url(&cfg.state_dir)?,
    };
    let mut store_cfg = match &cfg.store_config {
        Some(path) => StoreConfig::from_file(path)?,
        None => StoreConfig::from_env()?,
    };
    store_cfg.single_writer |= cfg.single_writer;
    Ok(RemoteStore::open_with(&url, store_cfg)?)
}

/// The tenant's scratch budget under the global one (see [`Config::scratch_limit`]).
fn scratch_budget(cfg: &Config) -> Budget {
    let global = Budget::root("scratch", cfg.scratch_limit);
    global.child(
        format!("tenant:{}", cfg.tenant),
        cfg.tenant_scratch_limit.unwrap_or(cfg.scratch_limit),
    )
}

/// The embedded default store of a state directory: `file://<state>/store`.
pub fn default_store_url(state_dir: &Path) -> Result<String, CairnError> {
    let abs = std::path::absolute(state_dir).map_err(|e| CairnError::Config {
        what: format!("state directory {}", state_dir.display()),
        reason: e.to_string(),
    })?;
    Ok(format!("file://{}", abs.join("store").display()))
}

#[cfg(test)]
mod send_check {
    use super::*;

    #[allow(dead_code)]
    fn futures_are_send(cp: &'static Checkpointer, db: &'static DbId, s: &'static Source) {
        fn send<T: Send>(_: T) {}
        send(cp.checkpoint(db, s));
        send(cp.restore(db, None, Path::new("x")));
        send(cp.verify(db, None, true));
        send(cp.resume());
    }
}
