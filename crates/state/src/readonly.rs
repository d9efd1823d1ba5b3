//! Reading a state directory beside the process that owns it (a running `cairn
//! replicate`), as `cairn status` and `cairn ls` do.
//!
//! Contract: [`StateDb::open_read_only`] opens the RocksDB as a *secondary instance*: it
//! takes neither `<state>/lock` nor RocksDB's `LOCK`, never creates, changes or deletes a
//! file in the state directory, and sees every batch the owner had written when it opened
//! (including those still only in the owner's write-ahead log). [`StateDb::catch_up`]
//! brings it up to the owner's latest writes. Every write through such a handle fails with
//! [`StateError::ReadOnly`] before it reaches RocksDB (which refuses writes on a secondary
//! as well), and imports of fetched manifests are skipped (see
//! [`crate::publish::fetch_manifest`]). Reads see whole batches: a batch is either visible
//! or not, as for the owner. Why a secondary rather than RocksDB's read-only open is
//! decision record 0028.
//!
//! The secondary's own files (its info log) go to a fresh temporary directory, removed
//! when the handle drops; a process killed by SIGKILL leaves that small directory behind
//! in the system temp directory, never anything in the state directory.
//!
//! A state directory that holds no state yet is [`StateError::NoState`];
//! [`StateDb::read_only_empty`] gives a reader empty state for it instead, creating
//! nothing there.
//!
//! Retries: the owner may switch its MANIFEST or delete a write-ahead log file while the
//! secondary opens, or, at its very first open, still be creating its column families;
//! the open is tried again (a few times, within a quarter of a second) when it fails with
//! an I/O error or finds families missing. Cancellation: each call is one local RocksDB
//! operation.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rocksdb::{Options, DB};

use crate::db::{Mode, CFS};
use crate::error::StateError;
use crate::StateDb;

/// Attempts of a secondary open that meets the owner changing its files.
const OPEN_ATTEMPTS: u32 = 5;

impl StateDb {
    /// Opens the state database in `<state_dir>/db` read-only, beside its owner if one
    /// runs. A directory without a state database is [`StateError::NoState`] (see
    /// [`StateDb::read_only_empty`]).
    pub fn open_read_only(state_dir: &Path) -> Result<Self, StateError> {
        let path = state_dir.join("db");
        if !path.join("CURRENT").is_file() {
            return Err(StateError::NoState {
                path: state_dir.display().to_string(),
            });
        }
        let own = own_dir("cairn-secondary-")?;
        let mut opts = Options::default();
        opts.create_if_missing(false);
        // A secondary keeps every table file open, so the owner's compactions may delete
        // files it still reads.
        opts.set_max_open_files(-1);
        let rocks = |op: &'static str| {
            let path = path.display().to_string();
            move |source| StateError::Rocks { op, path, source }
        };
        let mut attempt = 1;
        let db = loop {
            let opened = DB::list_cf(&opts, &path)
                .map_err(rocks("list column families (read-only)"))
                .and_then(|names| {
                    let complete = CFS.iter().all(|c| names.iter().any(|n| n == c));
                    DB::open_cf_as_secondary(&opts, path.as_path(), own.path(), names)
                        .map(|db| (db, complete))
                        .map_err(rocks("open read-only (secondary)"))
                });
            let again = match opened {
                // An owner at its very first open may still be creating its families;
                // after the last attempt a family still missing fails the reads of it,
                // naming it.
                Ok((db, complete)) if complete || attempt >= OPEN_ATTEMPTS => break db,
                Ok(_) => "column families incomplete",
                Err(StateError::Rocks { ref source, .. })
                    if attempt < OPEN_ATTEMPTS && source.kind() == rocksdb::ErrorKind::IOError =>
                {
                    "I/O error"
                }
                Err(e) => return Err(e),
            };
            tracing::debug!(
                attempt,
                reason = again,
                "read-only open of the state raced its owner; again"
            );
            std::thread::sleep(Duration::from_millis(25 * u64::from(attempt)));
            attempt += 1;
        };
        Ok(Self {
            db,
            path,
            seq_lock: Mutex::new(()),
            mode: Mode::Secondary { _own: own },
        })
    }

    /// A read-only handle on empty state, for a `state_dir` that holds no state yet: no
    /// jobs, no local generations (a reader on a fresh machine lists the store alone).
    /// Nothing is created in `state_dir`; an empty database in a fresh temporary
    /// directory stands in, removed when the handle drops. Writes fail with
    /// [`StateError::ReadOnly`] naming `state_dir`.
    pub fn read_only_empty(state_dir: &Path) -> Result<Self, StateError> {
        let own = own_dir("cairn-empty-state-")?;
        let mut s = Self::open(own.path())?;
        s.mode = Mode::Empty {
            state_dir: state_dir.to_path_buf(),
            _own: own,
        };
        Ok(s)
    }

    /// Brings a read-only handle up to the owner's latest writes (a no-op for the owner,
    /// which always sees its own, and for empty state).
    pub fn catch_up(&self) -> Result<(), StateError> {
        match self.mode {
            Mode::Primary { .. } | Mode::Empty { .. } => Ok(()),
            Mode::Secondary { .. } => self
                .db
                .try_catch_up_with_primary()
                .map_err(self.rocks("catch up with the owner")),
        }
    }
}

/// A fresh private (0700) directory under the system temp directory.
fn own_dir(prefix: &str) -> Result<tempfile::TempDir, StateError> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|source| StateError::CreateDir {
            path: std::env::temp_dir()
                .join(format!("{prefix}*"))
                .display()
                .to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::{DbId, Generation, Manifest, TenantId};

    fn manifest(g: u64) -> Manifest {
        crate::fixtures::manifest(g, "w", g)
    }

    #[test]
    fn a_reader_beside_the_owner_sees_its_writes_after_catching_up_and_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let (t, d) = (TenantId::new("t").unwrap(), DbId::new("d").unwrap());
        let owner = StateDb::open(dir.path()).unwrap();
        owner.record_generation(&manifest(1)).unwrap();
        let id = owner.writer_id(|| 7).unwrap();

        // The owner holds the lock: a second owner is refused, a reader is not.
        assert!(matches!(
            StateDb::open(dir.path()).unwrap_err(),
            StateError::Locked { .. }
        ));
        let reader = StateDb::open_read_only(dir.path()).unwrap();
        assert!(reader.is_read_only() && !owner.is_read_only());
        assert_eq!(reader.generations(&t, &d).unwrap(), vec![Generation(1)]);
        assert_eq!(reader.stored_writer_id().unwrap(), Some(id));

        // The owner writes on; the reader sees it once it catches up.
        for g in 2..=4 {
            owner.record_generation(&manifest(g)).unwrap();
        }
        reader.catch_up().unwrap();
        assert_eq!(
            reader.generations(&t, &d).unwrap(),
            (1..=4).map(Generation).collect::<Vec<_>>()
        );
        assert_eq!(
            reader.manifest(&t, &d, Generation(4)).unwrap(),
            Some(manifest(4))
        );
        assert_eq!(
            reader.db_record(&t, &d).unwrap().unwrap().latest,
            Generation(4)
        );

        // Every write is refused by name, and nothing reached the state.
        let err = reader.record_generation(&manifest(5)).unwrap_err();
        assert!(matches!(err, StateError::ReadOnly { .. }), "{err}");
        let shown = err.to_string();
        assert!(shown.contains(&dir.path().display().to_string()), "{shown}");
        assert!(shown.contains("read-only"), "{shown}");
        assert!(matches!(
            reader.next_counter("x").unwrap_err(),
            StateError::ReadOnly { .. }
        ));
        // RocksDB itself refuses a write on a secondary too.
        assert!(reader.db.put(b"k", b"v").is_err());
        owner.catch_up().unwrap();
        reader.catch_up().unwrap();
        assert_eq!(owner.generations(&t, &d).unwrap().len(), 4);
        assert_eq!(reader.generations(&t, &d).unwrap().len(), 4);

        // The reader left nothing in the state directory and takes its own files along.
        let own = match &reader.mode {
            Mode::Secondary { _own } => _own.path().to_path_buf(),
            _ => unreachable!(),
        };
        assert!(own.is_dir() && !own.starts_with(dir.path()));
        drop(reader);
        assert!(!own.exists(), "the secondary's directory is removed");
        drop(owner);
        // Once the owner is gone the directory opens read-write again.
        StateDb::open(dir.path()).unwrap();
    }

    #[test]
    fn a_directory_without_state_is_named_or_read_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let err = StateDb::open_read_only(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::NoState { .. }), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));

        let empty = StateDb::read_only_empty(dir.path()).unwrap();
        assert!(empty.is_read_only());
        let (t, d) = (TenantId::new("t").unwrap(), DbId::new("d").unwrap());
        assert!(empty.jobs().unwrap().is_empty());
        assert!(empty.generations(&t, &d).unwrap().is_empty());
        assert_eq!(empty.stored_writer_id().unwrap(), None);
        empty.catch_up().unwrap();
        let err = empty.record_generation(&manifest(1)).unwrap_err();
        assert!(matches!(err, StateError::ReadOnly { .. }), "{err}");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
        let own = match &empty.mode {
            Mode::Empty { _own, .. } => _own.path().to_path_buf(),
            _ => unreachable!(),
        };
        drop(empty);
        assert!(!own.exists(), "the stand-in is removed");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing is created"
        );
    }
}
