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
mod janitor;
mod queue;
mod restore;
mod runner;
mod verify;

use std::path::Path;
use std::sync::Arc;

use cairn_core::{DbId, Generation, Manifest};
use cairn_executor::Scratch;
use cairn_quota::Budget;
use cairn_remote_store::{RemoteStore, StoreConfig};
use cairn_state::StateDb;
use serde::Serialize;

pub use cairn_executor::{sqlite_integrity_check, ExecError};
pub use cairn_planner::CostModel;
pub use checkpoint::{CheckpointOptions, CheckpointReport, Source};
pub use config::{Clock, Config, Env, SystemClock, DEFAULT_CHUNK_SIZE};
pub use error::CairnError;
pub use queue::{JobRecord, JobSpec, JobState, JobStatus, Phase, Progress};
pub use restore::RestoreReport;
pub use runner::JobOutcome;
pub use verify::VerifyReport;

/// Summary of one generation, as `cairn ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GenerationInfo {
    /// The generation.
    pub generation: u64,
    /// Publication time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Source kind.
    pub kind: &'static str,
    /// Logical size in bytes.
    pub logical_bytes: u64,
    /// Distinct blobs referenced.
    pub blobs: usize,
    /// Parent generation.
    pub parent: Option<u64>,
    /// Writer identity.
    pub writer: String,
    /// The job that published it.
    pub job: Option<String>,
}

/// The checkpointer: local state, store, scratch, clock and randomness.
pub struct Checkpointer {
    cfg: Config,
    env: Env,
    state: Arc<StateDb>,
    store: RemoteStore,
    scratch: Scratch,
    writer: String,
    cancels: queue::CancelFlags,
    resumed: std::sync::atomic::AtomicBool,
    store_checked: tokio::sync::OnceCell<()>,
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
        let url = match &cfg.store_url {
            Some(u) => u.clone(),
            None => default_store_url(&cfg.state_dir)?,
        };
        let mut store_cfg = match &cfg.store_config {
            Some(path) => StoreConfig::from_file(path)?,
            None => StoreConfig::from_env()?,
        };
        store_cfg.single_writer |= cfg.single_writer;
        let store = RemoteStore::open_with(&url, store_cfg)?;
        Self::open_with(cfg, store, Env::system())
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
        let budget = Budget::root("scratch", cfg.scratch_limit);
        let scratch = Scratch::open(&cfg.state_dir.join("scratch"), budget)?;
        let cp = Self {
            cfg,
            env,
            state,
            store,
            scratch,
            writer,
            cancels: queue::CancelFlags::default(),
            resumed: std::sync::atomic::AtomicBool::new(false),
            store_checked: tokio::sync::OnceCell::new(),
        };
        cp.sweep_finished_jobs()?;
        Ok(cp)
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

    /// The store in use.
    pub fn store(&self) -> &RemoteStore {
        &self.store
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// This state directory's writer identity.
    pub fn writer_id(&self) -> &str {
        &self.writer
    }

    /// Imports generations published by others, then returns the database's generations.
    pub async fn generations(&self, db: &DbId) -> Result<Vec<Generation>, CairnError> {
        cairn_state::sync_from_remote(&self.state, &self.store, &self.cfg.tenant, db).await?;
        Ok(self.state.generations(&self.cfg.tenant, db)?)
    }

    /// The manifest of `generation` (latest if `None`).
    pub async fn manifest(
        &self,
        db: &DbId,
        generation: Option<Generation>,
    ) -> Result<Manifest, CairnError> {
        let gens = self.generations(db).await?;
        let tenant = &self.cfg.tenant;
        let Some(latest) = gens.last().copied() else {
            return Err(CairnError::UnknownDb {
                tenant: tenant.clone(),
                db: db.clone(),
                store: self.store.describe().to_string(),
            });
        };
        let g = generation.unwrap_or(latest);
        match self.state.manifest(tenant, db, g)? {
            Some(m) => Ok(m),
            None => Err(CairnError::UnknownGeneration {
                tenant: tenant.clone(),
                db: db.clone(),
                generation: g,
                available: summarize(&gens),
            }),
        }
    }

    /// Every generation of a database with its summary.
    pub async fn list(&self, db: &DbId) -> Result<Vec<GenerationInfo>, CairnError> {
        self.ensure_resumed().await?;
        let gens = self.generations(db).await?;
        if gens.is_empty() {
            return Err(CairnError::UnknownDb {
                tenant: self.cfg.tenant.clone(),
                db: db.clone(),
                store: self.store.describe().to_string(),
            });
        }
        let mut out = Vec::with_capacity(gens.len());
        for g in gens {
            if let Some(m) = self.state.manifest(&self.cfg.tenant, db, g)? {
                let mut names: Vec<String> = m.blobs().iter().map(|b| b.name()).collect();
                names.sort();
                names.dedup();
                out.push(GenerationInfo {
                    generation: g.0,
                    created_unix_ms: m.created_unix_ms,
                    kind: m.kind().as_str(),
                    logical_bytes: m.logical_len(),
                    blobs: names.len(),
                    parent: m.parent.map(|p| p.0),
                    writer: m.writer.clone(),
                    job: m.job.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Databases of the tenant that have published generations in the store.
    pub async fn databases(&self) -> Result<Vec<DbId>, CairnError> {
        Ok(cairn_state::remote_databases(&self.store, &self.cfg.tenant).await?)
    }
}

/// The embedded default store of a state directory: `file://<state>/store`.
pub fn default_store_url(state_dir: &Path) -> Result<String, CairnError> {
    let abs = std::path::absolute(state_dir).map_err(|e| CairnError::Config {
        what: format!("state directory {}", state_dir.display()),
        reason: e.to_string(),
    })?;
    Ok(format!("file://{}", abs.join("store").display()))
}

fn summarize(gens: &[Generation]) -> String {
    match (gens.first(), gens.last()) {
        (Some(a), Some(b)) if a == b => format!("{a}"),
        (Some(a), Some(b)) => format!("{} generations, {a}..={b}", gens.len()),
        _ => "none".into(),
    }
}
