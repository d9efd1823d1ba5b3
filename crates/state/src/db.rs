//! The RocksDB handle: opening (one process per state directory), the column families,
//! synced write batches, the writer identity and durable counters.
//!
//! Contract: every change is one synced [`WriteBatch`], so after a crash each batch is
//! either wholly present or absent. A state directory is owned by one process: `open`
//! takes an exclusive advisory lock on `<state>/lock` before it opens RocksDB, and a second
//! process gets [`StateError::Locked`]. Other processes may read beside the owner through
//! [`StateDb::open_read_only`] (module [`crate::readonly`]): such a handle refuses every
//! write with [`StateError::ReadOnly`]. Nothing here retries or is cancellable: each call
//! is one local RocksDB operation.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use cairn_core::{DbId, TenantId};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch,
    WriteOptions, DB,
};

use crate::error::StateError;

/// Column families of this build; see the crate documentation for their keys.
pub(crate) const CFS: &[&str] = &[
    "meta",
    "dbs",
    "generations",
    "catalog",
    "pagedigests",
    "walpositions",
    "jobs",
    "leases",
];

/// Families earlier builds created and this one no longer uses; dropped at open.
const OBSOLETE_CFS: &[&str] = &["changelog", "pins"];

/// The local state database.
pub struct StateDb {
    // Declared first so RocksDB closes before `mode` (a secondary's log directory) goes.
    pub(crate) db: DB,
    pub(crate) path: PathBuf,
    /// Serialises read-modify-write sequences (counters, the latest generation).
    pub(crate) seq_lock: Mutex<()>,
    /// How this handle holds the directory: owner, or reader beside the owner.
    pub(crate) mode: Mode,
}

/// How a [`StateDb`] holds its state directory.
pub(crate) enum Mode {
    /// This process owns the directory: the advisory lock on `<state>/lock`.
    Primary {
        /// Held for the handle's life; unlocked when the file closes.
        _lock: File,
    },
    /// A RocksDB secondary instance beside the owner: reads only. Its own files (the
    /// info log) live in a fresh temporary directory, removed when the handle drops.
    Secondary {
        /// The secondary's directory.
        _own: tempfile::TempDir,
    },
    /// Reads only, of a state directory that holds no state yet: an empty database in a
    /// fresh temporary directory stands in, removed when the handle drops.
    Empty {
        /// The state directory named by the caller (for messages); nothing is created.
        state_dir: PathBuf,
        /// The stand-in's directory.
        _own: tempfile::TempDir,
    },
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb").field("path", &self.path).finish()
    }
}

/// `tenant \0 db`: names never contain `\0`.
pub(crate) fn db_key(tenant: &TenantId, db: &DbId) -> Vec<u8> {
    let mut k = Vec::with_capacity(tenant.as_str().len() + db.as_str().len() + 1);
    k.extend_from_slice(tenant.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(db.as_str().as_bytes());
    k
}

/// `tenant \0 db \0 rest`.
pub(crate) fn sub_key(tenant: &TenantId, db: &DbId, rest: &[u8]) -> Vec<u8> {
    let mut k = db_key(tenant, db);
    k.push(0);
    k.extend_from_slice(rest);
    k
}

/// Bytes all memtables of a state directory may hold together before one is flushed.
const MEMTABLE_BUDGET: usize = 4 << 20;

/// Bytes of the block cache all column families share.
const BLOCK_CACHE: usize = 8 << 20;

/// Options of each column family: small memtables (the state is small; see
/// [`MEMTABLE_BUDGET`]) and one small block cache shared by all of them (RocksDB's
/// default gives each table reader its own larger one, which a service's RSS shows
/// growing as the catalog is read), which also holds the tables' index and filter
/// blocks, so that more tables on disk do not mean more memory outside it. Measured in a
/// 600 s soak beside the earlier 16 MiB budget and 4 MiB memtables: 2.37 against 3.04
/// MiB/min of RSS growth, about 10 MiB less resident (decision 0031).
fn family_options(cache: &Cache) -> Options {
    let mut o = Options::default();
    o.set_write_buffer_size(1 << 20);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_cache_index_and_filter_blocks(true);
    o.set_block_based_table_factory(&table);
    o
}

impl StateDb {
    /// Opens (creating) the state database in `<state_dir>/db`.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        let path = state_dir.join("db");
        std::fs::create_dir_all(&path).map_err(|source| StateError::CreateDir {
            path: path.display().to_string(),
            source,
        })?;
        let lock_path = state_dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StateError::CreateDir {
                path: lock_path.display().to_string(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateError::Locked {
                    path: state_dir.display().to_string(),
                })
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StateError::CreateDir {
                    path: lock_path.display().to_string(),
                    source,
                })
            }
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Memory: a long-running service rewrites job records and progress all the time;
        // with RocksDB's defaults every column family's memtable grows to 64 MiB before
        // it is flushed, which shows as RSS climbing for many minutes. Bound them all
        // together (the largest is flushed once the total passes this).
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET);
        let rocks = |op: &'static str| {
            let path = path.display().to_string();
            move |source| StateError::Rocks { op, path, source }
        };
        let cache = Cache::new_lru_cache(BLOCK_CACHE).map_err(rocks("create the block cache"))?;
        // Every family present must be opened; obsolete ones are dropped right after.
        let mut names: Vec<String> = CFS.iter().map(|s| s.to_string()).collect();
        if path.join("CURRENT").exists() {
            for existing in DB::list_cf(&opts, &path).map_err(rocks("list column families"))? {
                if existing != "default" && !names.contains(&existing) {
                    names.push(existing);
                }
            }
        }
        let cfs = names
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(n, family_options(&cache)));
        let mut db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(rocks("open"))?;
        for old in OBSOLETE_CFS {
            if names.iter().any(|n| n == old) {
                db.drop_cf(old)
                    .map_err(rocks("drop obsolete column family"))?;
            }
        }
        Ok(Self {
            db,
            path,
            seq_lock: Mutex::new(()),
            mode: Mode::Primary { _lock: lock },
        })
    }

    /// Whether this handle is a read-only one ([`StateDb::open_read_only`]).
    pub fn is_read_only(&self) -> bool {
        !matches!(self.mode, Mode::Primary { .. })
    }

    /// Refuses `op` on a read-only handle with [`StateError::ReadOnly`].
    fn writable(&self, op: &'static str) -> Result<(), StateError> {
        match &self.mode {
            Mode::Primary { .. } => Ok(()),
            Mode::Secondary { .. } => Err(StateError::ReadOnly {
                path: self.state_dir(),
                op,
            }),
            Mode::Empty { state_dir, .. } => Err(StateError::ReadOnly {
                path: state_dir.display().to_string(),
                op,
            }),
        }
    }

    /// The state directory (the parent of the RocksDB directory), for messages.
    pub(crate) fn state_dir(&self) -> String {
        self.path
            .parent()
            .unwrap_or(&self.path)
            .display()
            .to_string()
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StateError> {
        self.db.cf_handle(name).ok_or_else(|| StateError::Corrupt {
            key: name.to_string(),
            reason: "column family missing".into(),
        })
    }

    pub(crate) fn rocks(&self, op: &'static str) -> impl FnOnce(rocksdb::Error) -> StateError + '_ {
        move |source| StateError::Rocks {
            op,
            path: self.path.display().to_string(),
            source,
        }
    }

    pub(crate) fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.db
            .get_cf(self.cf(cf)?, key)
            .map_err(self.rocks("read"))
    }

    /// Writes `batch` with `sync = true`: durable when this returns.
    pub(crate) fn write(&self, batch: WriteBatch) -> Result<(), StateError> {
        self.writable("write batch")?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(self.rocks("write batch"))
    }

    /// Writes `batch` without waiting for it to reach the disk: a process crash keeps it
    /// (RocksDB's log is written before this returns), a power loss may drop it together
    /// with later unsynced batches, never an earlier synced one; the next synced write
    /// makes it durable too.
    pub(crate) fn write_relaxed(&self, batch: WriteBatch) -> Result<(), StateError> {
        self.writable("write batch")?;
        self.db.write(batch).map_err(self.rocks("write batch"))
    }

    /// Held across a read-modify-write of shared records.
    pub(crate) fn serial(&self) -> MutexGuard<'_, ()> {
        // The guarded sequences leave consistent state even if a holder panicked.
        self.seq_lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This state directory's writer identity, created from `fresh` on first use.
    pub fn writer_id(&self, fresh: impl FnOnce() -> u64) -> Result<String, StateError> {
        if let Some(id) = self.stored_writer_id()? {
            return Ok(id);
        }
        let id = format!("{:016x}", fresh());
        let mut b = WriteBatch::default();
        b.put_cf(self.cf("meta")?, b"writer_id", id.as_bytes());
        self.write(b)?;
        Ok(id)
    }

    /// This state directory's writer identity, if one was created.
    pub fn stored_writer_id(&self) -> Result<Option<String>, StateError> {
        self.get("meta", b"writer_id")?
            .map(|v| {
                String::from_utf8(v).map_err(|_| StateError::Corrupt {
                    key: "meta/writer_id".into(),
                    reason: "not UTF-8".into(),
                })
            })
            .transpose()
    }

    /// The next value of a named counter (1, 2, 3 …), durable across restarts.
    pub fn next_counter(&self, name: &str) -> Result<u64, StateError> {
        let _guard = self.serial();
        let key = format!("counter/{name}");
        let next = match self.get("meta", key.as_bytes())? {
            Some(v) => v.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0) + 1,
            None => 1,
        };
        let mut b = WriteBatch::default();
        b.put_cf(self.cf("meta")?, key.as_bytes(), next.to_be_bytes());
        self.write(b)?;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _a = StateDb::open(dir.path()).unwrap();
        let err = StateDb::open(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        assert!(
            err.to_string().contains("in use by another cairn process"),
            "{err}"
        );
    }

    #[test]
    fn obsolete_families_of_an_older_build_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let old = ["meta", "changelog", "leases", "pins"];
            let _db = DB::open_cf(&opts, &path, old).unwrap();
        }
        let s = StateDb::open(dir.path()).unwrap();
        assert!(s.db.cf_handle("changelog").is_none());
        assert!(s.db.cf_handle("jobs").is_some());
        assert_eq!(s.next_counter("x").unwrap(), 1);
        assert_eq!(s.next_counter("x").unwrap(), 2);
    }
}
