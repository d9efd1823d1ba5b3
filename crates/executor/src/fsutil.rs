//! Small filesystem helpers shared by staging and restore assembly.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::ExecError;

/// Fsyncs a directory, making the entries created or renamed in it durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<(), ExecError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ExecError::io("fsync directory", dir))
}

/// Fsyncs the directory holding `path`.
pub(crate) fn fsync_parent(path: &Path) -> Result<(), ExecError> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => fsync_dir(p),
        _ => fsync_dir(&PathBuf::from(".")),
    }
}

/// Removes a file or a directory tree; one that is already gone is not an error.
pub(crate) fn remove_if_exists(path: &Path, op: &'static str) -> Result<(), ExecError> {
    let result = if path.is_dir() {
        remove_dir_settling(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ExecError::Io {
            op,
            path: path.display().to_string(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Attempts of [`remove_dir_settling`] while files keep appearing in the directory.
const REMOVE_ATTEMPTS: u32 = 20;

/// `remove_dir_all`, tried again while it fails because the directory is not empty: a
/// job's staging thread that was told to stop (blocking work cannot be aborted) may still
/// create a file in the directory being removed. Once the directory itself is gone, such
/// a thread's next create fails, so this settles within a few attempts.
fn remove_dir_settling(path: &Path) -> std::io::Result<()> {
    let mut attempt = 1;
    loop {
        match std::fs::remove_dir_all(path) {
            Err(e)
                if e.kind() == std::io::ErrorKind::DirectoryNotEmpty
                    && attempt < REMOVE_ATTEMPTS =>
            {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}
