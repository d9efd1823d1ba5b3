//! File descriptors of a live SQLite database's files (the database, `-wal`, `-shm`) that
//! are opened once and never closed.
//!
//! Why: SQLite's locks are POSIX advisory (`fcntl`) locks, which belong to the process, and
//! closing *any* descriptor of a file releases every lock the process holds on it. A
//! snapshot that read the `-shm` through its own descriptor and closed it would silently
//! drop the read mark of its own read transaction (and of every other connection in the
//! process), letting SQLite copy and overwrite frames the snapshot still reads. SQLite
//! avoids this for its own connections by deferring closes; we keep our descriptors, one
//! per file identity (device and inode), for the life of the process.
//!
//! Crash: nothing is written. Retries: none. Cancellation: none.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

type Kept = Mutex<HashMap<PathBuf, Vec<((u64, u64), Arc<File>)>>>;

static KEPT: LazyLock<Kept> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// A read-only descriptor of the file now at `path`, opened once per file identity and
/// never closed (see the module docs).
pub(crate) fn open(path: &Path) -> std::io::Result<Arc<File>> {
    let m = std::fs::metadata(path)?;
    let id = (m.dev(), m.ino());
    let mut kept = KEPT.lock().unwrap_or_else(PoisonError::into_inner);
    let files = kept.entry(path.to_path_buf()).or_default();
    if let Some((_, f)) = files.iter().find(|(k, _)| *k == id) {
        return Ok(Arc::clone(f));
    }
    let f = Arc::new(File::open(path)?);
    // The identity of what was opened (the path may have been replaced meanwhile).
    let m = f.metadata()?;
    let id = (m.dev(), m.ino());
    if let Some((_, g)) = files.iter().find(|(k, _)| *k == id) {
        // Opened twice: keep the first and leak this one rather than close it.
        std::mem::forget(Arc::clone(&f));
        return Ok(Arc::clone(g));
    }
    files.push((id, Arc::clone(&f)));
    Ok(f)
}
