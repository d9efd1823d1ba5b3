//! The `Checkpointer` facade: what an embedding engine and the `cairn` command call.
//!
//! Contract: [`Checkpointer::checkpoint`] publishes exactly one new generation of a
//! database or fails having published nothing; [`Checkpointer::restore`] writes exactly the
//! bytes of a published generation or leaves the target untouched;
//! [`Checkpointer::verify`] reports every referenced blob that is missing, has the wrong
//! size or (deep) fails its checksums.
//!
//! Crash: a checkpoint interrupted at any point leaves staged blobs in its scratch
//! directory (removed by the janitor at the next open), uploaded blobs that no manifest
//! references yet (found by the next checkpoint with a HEAD and not uploaded again) and
//! possibly a published remote manifest that the local state lacks (imported on the next
//! operation). A restore interrupted leaves only `<target>.cairn-restore`.
//!
//! Retries: the store retries transient HTTP failures; a fenced publish is reported and a
//! new attempt plans on top of the winner. Cancellation: dropping the future stops the work
//! at the next await; nothing is published unless the manifest create completed.

mod checkpoint;
mod error;
pub mod jobs;
mod restore;
mod runner;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn_core::{DbId, Generation, Manifest, TenantId};
use cairn_executor::Scratch;
use cairn_manifest::StateDb;
use cairn_quota::Budget;
use cairn_remote_store::{RemoteStore, StoreConfig};
use rand::{RngCore, SeedableRng};
use serde::Serialize;

pub use cairn_executor::{sqlite_integrity_check, ExecError};
pub use cairn_planner::CostModel;
pub use checkpoint::{CheckpointOptions, CheckpointReport, Source};
pub use error::CairnError;
pub use jobs::{JobRecord, JobSpec, JobState, JobStatus, Phase, Progress};
pub use restore::RestoreReport;
pub use runner::JobOutcome;
pub use verify::VerifyReport;

/// Finished job records kept for `cairn status`.
const KEEP_FINISHED_JOBS: usize = 200;

/// Default chunk size of page sources: 64 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024 * 1024;

/// Wall-clock time, injected so tests control it.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// Clock and randomness, injected so tests can fix them.
#[derive(Clone)]
pub struct Env {
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Source of job ids and writer identities.
    pub rng: Arc<Mutex<rand::rngs::StdRng>>,
}

impl Env {
    /// The system clock and an entropy-seeded generator.
    pub fn system() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            rng: Arc::new(Mutex::new(rand::rngs::StdRng::from_entropy())),
        }
    }

    /// A fixed clock reading and seed (tests).
    pub fn fixed(now_unix_ms: u64, seed: u64) -> Self {
        struct Fixed(u64);
        impl Clock for Fixed {
            fn now_unix_ms(&self) -> u64 {
                self.0
            }
        }
        Self {
            clock: Arc::new(Fixed(now_unix_ms)),
            rng: Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed))),
        }
    }

    fn next_u64(&self) -> u64 {
        match self.rng.lock() {
            Ok(mut r) => r.next_u64(),
            Err(poisoned) => poisoned.into_inner().next_u64(),
        }
    }
}

/// Settings of a [`Checkpointer`].
#[derive(Clone, Debug)]
pub struct Config {
    /// The state directory (RocksDB, scratch, and the default local store).
    pub state_dir: PathBuf,
    /// The store URL; `None` means the embedded default `file://<state>/store`.
    pub store_url: Option<String>,
    /// The store's configuration file (TOML or JSON); `None` reads `$CAIRN_STORE_CONFIG`.
    pub store_config: Option<PathBuf>,
    /// Skip the conditional-create check: the operator guarantees a single writer per
    /// database (for stores, like Garage, that ignore conditional writes).
    pub single_writer: bool,
    /// The tenant all operations act for.
    pub tenant: TenantId,
    /// Chunk size of page sources.
    pub chunk_size: u64,
    /// Bytes of scratch space staging may use at once.
    pub scratch_limit: u64,
    /// Blob uploads in flight at once.
    pub upload_concurrency: usize,
    /// Blob downloads in flight at once during restore and verify.
    pub download_concurrency: usize,
    /// Chunks read and analysed at once during a checkpoint.
    pub scan_concurrency: usize,
    /// The delta-or-rewrite cost model.
    pub cost_model: CostModel,
}

impl Config {
    /// Defaults for a state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> Result<Self, CairnError> {
        Ok(Self {
            state_dir: state_dir.into(),
            store_url: None,
            store_config: None,
            single_writer: false,
            tenant: TenantId::new("default")?,
            chunk_size: DEFAULT_CHUNK_SIZE,
            scratch_limit: 8 * 1024 * 1024 * 1024,
            upload_concurrency: 4,
            download_concurrency: 8,
            scan_concurrency: 2,
            cost_model: CostModel::default(),
        })
    }
}

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
    cancels: jobs::CancelFlags,
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
        if cfg.chunk_size == 0 || !cfg.chunk_size.is_multiple_of(512) {
            return Err(CairnError::Config {
                what: "chunk size".into(),
                reason: format!("{} is not a positive multiple of 512 bytes", cfg.chunk_size),
            });
        }
        if cfg.upload_concurrency == 0 || cfg.download_concurrency == 0 || cfg.scan_concurrency == 0
        {
            return Err(CairnError::Config {
                what: "concurrency".into(),
                reason: "must be at least 1".into(),
            });
        }
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| CairnError::Config {
            what: format!("state directory {}", cfg.state_dir.display()),
            reason: e.to_string(),
        })?;
        let state = Arc::new(StateDb::open(&cfg.state_dir)?);
        let writer = state.writer_id(|| env.next_u64())?;
        let budget = Budget::root("scratch", cfg.scratch_limit);
        let scratch = Scratch::open(&cfg.state_dir.join("scratch"), budget)?;
        // Janitor: scratch directories and items of jobs that will not run again are
        // garbage; those of unfinished jobs hold staged work their resumption reuses. Only
        // the newest finished job records are kept, for `cairn status`.
        let mut records: Vec<jobs::JobRecord> = state
            .jobs()?
            .into_iter()
            .filter_map(|(id, b)| jobs::JobRecord::decode(id, &b).ok())
            .collect();
        records.sort_by_key(|r| std::cmp::Reverse(r.seq));
        let unfinished: Vec<cairn_core::JobId> = records
            .iter()
            .filter(|r| r.state.is_unfinished())
            .map(|r| r.id)
            .collect();
        for (n, r) in records
            .iter()
            .filter(|r| !r.state.is_unfinished())
            .enumerate()
        {
            state.delete_job(r.id.0, n >= KEEP_FINISHED_JOBS)?;
        }
        for job in scratch.jobs()? {
            if !unfinished.contains(&job) {
                scratch.remove_job(job)?;
            }
        }
        Ok(Self {
            cfg,
            env,
            state,
            store,
            scratch,
            writer,
            cancels: jobs::CancelFlags::default(),
            resumed: std::sync::atomic::AtomicBool::new(false),
            store_checked: tokio::sync::OnceCell::new(),
        })
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
        cairn_manifest::sync_from_remote(&self.state, &self.store, &self.cfg.tenant, db).await?;
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
        Ok(cairn_manifest::remote_databases(&self.store, &self.cfg.tenant).await?)
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
