//! Control of a live SQLite database's WAL for continuous shipping: which committed
//! frames follow the position last shipped, and the WAL checkpoints (PASSIVE, TRUNCATE)
//! run so that no frame is copied into the main file and then overwritten before it was
//! shipped.
//!
//! Contract (SQLite's WAL locking, see "WAL-mode File Format" and `wal.c`): a read
//! transaction whose snapshot includes frame `m > 0` keeps every frame after `m` out of the
//! main file and keeps the WAL from restarting; one that began when every frame was
//! already in the main file (*backfilled*, read mark 0) keeps every frame out of the main
//! file but allows one restart. So a shipper that always holds a read transaction, and
//! opens the next before it lets the previous go, sees every committed frame: either in
//! the same WAL after its position, or, after a backfilled position, in a WAL restarted
//! exactly once (whatever its salts). [`frames_to_ship`] applies
//! that rule and reports anything else as a lost position.
//!
//! [`SqliteControl::truncate_wal`] resets the WAL with the application's writers held off
//! only while the frames are made durable locally and copied into the main file: under the
//! write lock, the caller makes the frames after its position durable, its read
//! transactions end, a PASSIVE checkpoint copies every frame, and a new (backfilled)
//! snapshot begins; the lock is released and a TRUNCATE checkpoint runs, which either
//! restarts the WAL with nothing unshipped in it or finds a writer first and does nothing.
//!
//! Crash: nothing is written here except by SQLite's own checkpoints, which never lose a
//! committed transaction. Retries: none (a busy database is reported). Cancellation: none;
//! every call is bounded by [`crate::sqlite::WRITE_LOCK_WAIT`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_core::WalPosition;
use rusqlite::{Connection, OpenFlags};

use crate::error::ExecError;
use crate::sqlite::{FullScanReason, SqliteSnapshot, WRITE_LOCK_WAIT};

/// How long a TRUNCATE checkpoint waits for the application's writer before giving up
/// (it then runs at a later step).
const TRUNCATE_WAIT: Duration = Duration::from_millis(200);

/// Where a shipper stands: the position after the last frame it shipped, and what it
/// knows of the WAL there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shipped {
    /// Salts, last frame shipped and its checksum.
    pub position: WalPosition,
    /// The read transaction held since began with every frame backfilled (so the WAL may
    /// have restarted once). Only true within the process that holds it.
    pub backfilled: bool,
    /// The database had no WAL (no valid header) at the position.
    pub no_wal: bool,
}

impl Shipped {
    /// Where `snap` stands, once its frames are shipped (`before`: where shipping stood).
    pub fn at(snap: &SqliteSnapshot, before: Option<&Shipped>) -> Shipped {
        match snap.position() {
            Some(p) => Shipped {
                position: p,
                backfilled: snap.backfilled(),
                no_wal: false,
            },
            // No WAL: the position stays where it was, now with every frame backfilled.
            None => match before {
                Some(b) => Shipped {
                    backfilled: true,
                    ..*b
                },
                None => Shipped {
                    position: WalPosition {
                        salts: (0, 0),
                        frame: 0,
                        checksum: (0, 0),
                    },
                    backfilled: true,
                    no_wal: true,
                },
            },
        }
    }
}

/// The committed frames of `snap` after `shipped` (`first..=last`, from 1; empty when
/// `first > last`), or why they cannot be known: frames may have been lost.
pub fn frames_to_ship(
    shipped: &Shipped,
    snap: &SqliteSnapshot,
) -> Result<(u32, u32), FullScanReason> {
    let last = snap.frames();
    let Some(h) = snap.wal_header() else {
        // An empty or missing WAL: nothing lost only if it was held empty or backfilled
        // since the position (otherwise its frames may have been copied into the main file
        // and the WAL deleted, say by the application's last connection closing).
        return if shipped.backfilled {
            Ok((1, 0))
        } else {
            Err(FullScanReason::WalReset)
        };
    };
    let p = shipped.position;
    if shipped.no_wal {
        // Held since there was no WAL: the one that exists now began after it.
        return if shipped.backfilled {
            Ok((1, last))
        } else {
            Err(FullScanReason::WalReset)
        };
    }
    if h.salts == p.salts {
        if p.frame == 0 {
            return if p.checksum == h.checksum {
                Ok((1, last))
            } else {
                Err(FullScanReason::WalRewritten)
            };
        }
        return match snap.frame_checksum(p.frame) {
            Some(c) if c == p.checksum => Ok((p.frame + 1, last)),
            _ => Err(FullScanReason::WalRewritten),
        };
    }
    // Held since every frame was backfilled and shipped: a second restart would need the
    // first one's frames copied into the main file, which our read mark 0 forbids, so new
    // salts mean exactly one restart of a WAL that held nothing unshipped. (The salts do
    // not count restarts: a connection that did not restart the WAL itself writes random
    // ones into the next header.)
    if shipped.backfilled {
        Ok((1, last))
    } else {
        Err(FullScanReason::WalReset)
    }
}

/// What a WAL checkpoint did (`PRAGMA wal_checkpoint`'s row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointResult {
    /// It could not finish because of other connections.
    pub busy: bool,
    /// Frames in the WAL.
    pub log: i64,
    /// Frames copied into the main file.
    pub checkpointed: i64,
}

/// A connection of the shipper's own that runs WAL checkpoints and takes the write lock.
pub struct SqliteControl {
    path: PathBuf,
    /// Behind a mutex so the control can be shared by a task that moves between threads
    /// (a connection is `Send`, not `Sync`); only one call uses it at a time anyway.
    conn: std::sync::Mutex<Connection>,
}

impl std::fmt::Debug for SqliteControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteControl")
            .field("path", &self.path)
            .finish()
    }
}

/// What [`SqliteControl::truncate_wal`] did.
pub struct Truncation {
    /// Where the caller stands from now on: the frames under the write lock were made
    /// durable, and `backfilled` is that of the new snapshot.
    pub locked: Shipped,
    /// The snapshot held from now on.
    pub snapshot: SqliteSnapshot,
    /// The TRUNCATE checkpoint reset the WAL.
    pub truncated: bool,
}

impl SqliteControl {
    /// Opens a control connection to the database at `src` (which must be in WAL mode).
    pub fn open(src: &Path) -> Result<Self, ExecError> {
        let sql = |source| ExecError::Sqlite {
            path: src.display().to_string(),
            source,
        };
        let conn = Connection::open_with_flags(
            src,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        conn.busy_timeout(WRITE_LOCK_WAIT).map_err(sql)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ExecError::BadSource {
                path: src.display().to_string(),
                reason: format!(
                    "journal mode is {mode}; replication ships WAL frames, so the database must be in WAL mode (PRAGMA journal_mode=WAL)"
                ),
            });
        }
        // Our connection must never checkpoint on its own when it closes.
        conn.execute_batch("PRAGMA wal_autocheckpoint=0")
            .map_err(sql)?;
        Ok(Self {
            path: src.to_path_buf(),
            conn: std::sync::Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> ExecError + '_ {
        move |source| ExecError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Runs `PRAGMA wal_checkpoint(mode)` (`PASSIVE` or `TRUNCATE`).
    fn checkpoint(&self, mode: &str) -> Result<CheckpointResult, ExecError> {
        let (busy, log, checkpointed): (i64, i64, i64) = self
            .conn()
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(self.sql())?;
        Ok(CheckpointResult {
            busy: busy != 0,
            log,
            checkpointed,
        })
    }

    /// A PASSIVE checkpoint: copies the frames no reader still needs from the WAL, without
    /// waiting for anyone. Our held snapshot keeps unshipped frames out of it.
    pub fn passive(&self) -> Result<CheckpointResult, ExecError> {
        self.checkpoint("PASSIVE")
    }

    /// Length of the WAL file (0 when it is missing).
    pub fn wal_len(&self) -> u64 {
        let mut s = self.path.as_os_str().to_os_string();
        s.push("-wal");
        std::fs::metadata(PathBuf::from(s)).map_or(0, |m| m.len())
    }

    /// Resets the WAL without losing an unshipped frame (see the module docs).
    /// `held` is the caller's current snapshot, at `shipped`; `durable` must make the
    /// frames of the given snapshot after `shipped` durable (the write lock is held
    /// meanwhile, so it should be quick: a local write, not an upload).
    pub fn truncate_wal<E: From<ExecError>>(
        &self,
        held: std::sync::Arc<SqliteSnapshot>,
        shipped: &Shipped,
        durable: impl FnOnce(&SqliteSnapshot, (u32, u32)) -> Result<(), E>,
    ) -> Result<Truncation, E> {
        let sql = self.sql();
        let lock = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(&sql)?;
        lock.busy_timeout(WRITE_LOCK_WAIT).map_err(&sql)?;
        lock.execute_batch("BEGIN IMMEDIATE").map_err(&sql)?;
        let inner = || -> Result<(Shipped, SqliteSnapshot), E> {
            let snap = SqliteSnapshot::open_locked(&self.path, None, Some(&lock), held.resume())?;
            let frames = frames_to_ship(shipped, &snap).map_err(|r| ExecError::SourceChanged {
                path: self.path.display().to_string(),
                detail: format!(
                    "its WAL position was lost ({}): shipped up to {:?}, the WAL now has salts {:?} and {} committed frames",
                    r.as_str(),
                    shipped,
                    snap.wal_header().map(|h| h.salts),
                    snap.frames()
                ),
            })?;
            durable(&snap, frames)?;
            let locked = Shipped::at(&snap, Some(shipped));
            let resume = snap.resume();
            drop(snap);
            drop(held);
            self.passive()?;
            let next = SqliteSnapshot::open_locked(&self.path, None, Some(&lock), resume)?;
            let locked = Shipped {
                backfilled: next.backfilled(),
                ..locked
            };
            Ok((locked, next))
        };
        let out = inner();
        lock.execute_batch("ROLLBACK").map_err(&sql)?;
        drop(lock);
        let (locked, snapshot) = out?;
        let mut truncated = false;
        if snapshot.backfilled() {
            self.conn().busy_timeout(TRUNCATE_WAIT).map_err(&sql)?;
            let r = self.checkpoint("TRUNCATE");
            self.conn().busy_timeout(WRITE_LOCK_WAIT).map_err(&sql)?;
            match r {
                Ok(r) => truncated = !r.busy,
                Err(ExecError::Sqlite { source, .. })
                    if source.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Truncation {
            locked,
            snapshot,
            truncated,
        })
    }
}

#[cfg(test)]
#[path = "sqlite_control_tests.rs"]
mod tests;
