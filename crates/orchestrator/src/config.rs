//! Settings of a [`crate::Checkpointer`] and its injected environment (clock and
//! randomness), so tests control time and identities.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use cairn_core::TenantId;
use cairn_planner::CostModel;
use rand::{RngCore, SeedableRng};

use crate::CairnError;

/// Default chunk size of page sources: 64 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * 1024 * 1024;
/// Lowest accepted [`Config::compression_level`] (zstd's fast modes are negative).
pub const MIN_COMPRESSION_LEVEL: i32 = -7;
/// Highest accepted [`Config::compression_level`]: above 19 zstd's windows (and a
/// reader's memory) grow past 8 MiB.
pub const MAX_COMPRESSION_LEVEL: i32 = 19;

/// Default bound on the delta payloads a restore holds in memory: 128 MiB.
pub(crate) const DEFAULT_RESTORE_MEMORY: u64 = 128 * 1024 * 1024;

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

    /// Milliseconds since the Unix epoch, from the injected clock.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_unix_ms()
    }

    /// The next random value.
    pub fn next_u64(&self) -> u64 {
        self.rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_u64()
    }
}

/// Settings of a [`crate::Checkpointer`].
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
    /// Bytes of scratch space all jobs of this process may use at once (the global budget).
    pub scratch_limit: u64,
    /// ... of which the tenant's jobs may use this much (`None`: the global limit). The
    /// budgets nest global, then tenant, then job: a reservation must fit all three.
    pub tenant_scratch_limit: Option<u64>,
    /// ... and each job this much (`None`: the tenant's limit).
    pub job_scratch_limit: Option<u64>,
    /// Bytes of local cache all databases of this process may hold at once: the spools
    /// of replicated SQLite databases (committed WAL made durable locally before it is
    /// shipped; it grows while the store is unreachable). When it is full, replication
    /// steps fail naming the budget and are retried; the frames wait in SQLite's WAL.
    pub cache_limit: u64,
    /// ... of which the tenant's databases may hold this much (`None`: the global limit).
    pub tenant_cache_limit: Option<u64>,
    /// Blob uploads in flight at once.
    pub upload_concurrency: usize,
    /// Blob downloads in flight at once during restore and verify; a restore composes up
    /// to this many chunks at once.
    pub download_concurrency: usize,
    /// Bytes of delta payloads one restore holds in memory at once, across all the chunks
    /// it composes (128 MiB by default). A delta larger than this is fetched alone.
    pub restore_memory: u64,
    /// Chunks read and analysed at once during a checkpoint.
    pub scan_concurrency: usize,
    /// The delta-or-rewrite cost model.
    pub cost_model: CostModel,
    /// Resume unfinished jobs in the background when opened with
    /// [`crate::Checkpointer::open_shared`]. Otherwise resuming is explicit
    /// ([`crate::Checkpointer::resume`], [`crate::Checkpointer::resume_db`]).
    pub resume_at_open: bool,
    /// zstd level for the payloads of new page (base), delta and segment blobs: `Some(3)`
    /// by default; `None` or `Some(0)` turns compression off (blobs are then written in
    /// the uncompressed version 1 format). Valid levels are -7..=19 (negative levels are
    /// zstd's fast modes). A payload zstd does not shrink to at most 97% is stored as it
    /// is. Names, dedup and manifests are the same whatever the level, and every build
    /// that reads blob version 2 reads blobs of any level; changing it only affects blobs
    /// written from then on (docs/decisions/0024-blob-compression.md).
    pub compression_level: Option<i32>,
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
            tenant_scratch_limit: None,
            job_scratch_limit: None,
            cache_limit: 4 * 1024 * 1024 * 1024,
            tenant_cache_limit: None,
            upload_concurrency: 4,
            download_concurrency: 8,
            restore_memory: DEFAULT_RESTORE_MEMORY,
            scan_concurrency: 2,
            cost_model: CostModel::default(),
            resume_at_open: false,
            compression_level: Some(cairn_core::blob::DEFAULT_LEVEL),
        })
    }

    /// Refuses settings that cannot work, naming the setting.
    pub(crate) fn validate(&self) -> Result<(), CairnError> {
        if self.chunk_size == 0 || !self.chunk_size.is_multiple_of(512) {
            return Err(CairnError::Config {
                what: "chunk size".into(),
                reason: format!(
                    "{} is not a positive multiple of 512 bytes",
                    self.chunk_size
                ),
            });
        }
        if self.upload_concurrency == 0
            || self.download_concurrency == 0
            || self.scan_concurrency == 0
        {
            return Err(CairnError::Config {
                what: "concurrency".into(),
                reason: "must be at least 1".into(),
            });
        }
        if let Some(level) = cairn_core::blob::effective_level(self.compression_level) {
            if !(MIN_COMPRESSION_LEVEL..=MAX_COMPRESSION_LEVEL).contains(&level) {
                return Err(CairnError::Config {
                    what: "compression level".into(),
                    reason: format!(
                        "{level} is outside {MIN_COMPRESSION_LEVEL}..={MAX_COMPRESSION_LEVEL} (0 turns compression off)"
                    ),
                });
            }
        }
        if self.restore_memory == 0 {
            return Err(CairnError::Config {
                what: "restore memory".into(),
                reason: "must be at least 1 byte".into(),
            });
        }
        Ok(())
    }
}
