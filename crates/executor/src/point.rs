//! Assembling a restore to a point: a directory holding the page checkpoint (`pages`) and
//! the WAL segments to replay (`wal/`), built in `<target>.cairn-restore/` and renamed over
//! the target only when complete.
//!
//! Contract: the inner parts are assembled with [`crate::FileAssembler`] (at
//! [`PointAssembler::pages_target`]) and [`crate::DirAssembler`] (at
//! [`PointAssembler::wal_target`]), each committed inside the staging directory; then
//! [`PointAssembler::commit`] fsyncs it and renames it over the target. Crash: everything
//! stays in the staging directory; a resumed restore reopens it and finds the parts that
//! were already committed in it. No retries here; cancellation: stop calling, and
//! [`crate::assemble::discard_partial`] removes the staging directory.

use std::path::{Path, PathBuf};

use crate::error::ExecError;
use crate::fsutil::{fsync_dir, fsync_parent};

/// A point-in-time restore directory being assembled.
#[derive(Debug)]
pub struct PointAssembler {
    target: PathBuf,
    tmp: PathBuf,
}

impl PointAssembler {
    /// Starts (or with `resume`, continues) assembling the directory that will replace
    /// `target`. Returns whether an earlier staging directory was reopened.
    pub fn open(target: &Path, resume: bool) -> Result<(Self, bool), ExecError> {
        if target.is_file() {
            return Err(ExecError::BadSource {
                path: target.display().to_string(),
                reason: "restore target is a file; a restore to a point writes a directory".into(),
            });
        }
        let mut s = target.as_os_str().to_os_string();
        s.push(".cairn-restore");
        let tmp = PathBuf::from(s);
        let reused = resume && tmp.is_dir();
        if !reused {
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)
                    .map_err(ExecError::io("remove stale restore directory", &tmp))?;
            }
            std::fs::create_dir_all(&tmp)
                .map_err(ExecError::io("create restore directory", &tmp))?;
        }
        let me = Self {
            target: target.to_path_buf(),
            tmp,
        };
        Ok((me, reused))
    }

    /// Where the page file is assembled (and committed) inside the staging directory.
    pub fn pages_target(&self) -> PathBuf {
        self.tmp.join("pages")
    }

    /// Where the WAL segments are assembled (and committed) inside the staging directory.
    pub fn wal_target(&self) -> PathBuf {
        self.tmp.join("wal")
    }

    /// Whether a part was already committed into the staging directory (a resumed
    /// restore skips it).
    pub fn has_committed(part: &Path) -> bool {
        part.exists()
    }

    /// Fsyncs the staging directory and moves it into place, replacing any previous target.
    pub fn commit(self) -> Result<PathBuf, ExecError> {
        fsync_dir(&self.tmp)?;
        if self.target.exists() {
            std::fs::remove_dir_all(&self.target)
                .map_err(ExecError::io("replace restore target", &self.target))?;
        }
        std::fs::rename(&self.tmp, &self.target).map_err(ExecError::io(
            "rename restore directory into place",
            &self.target,
        ))?;
        fsync_parent(&self.target)?;
        Ok(self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DirAssembler, FileAssembler};

    #[test]
    fn parts_commit_inside_and_the_whole_replaces_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("point");
        std::fs::create_dir_all(target.join("old")).unwrap();
        let (p, reused) = PointAssembler::open(&target, false).unwrap();
        assert!(!reused);
        let pages = FileAssembler::create(&p.pages_target(), 4).unwrap();
        pages.write_at(0, b"abcd").unwrap();
        pages.commit().unwrap();
        assert!(PointAssembler::has_committed(&p.pages_target()));
        let (wal, _) = DirAssembler::open(&p.wal_target(), false).unwrap();
        let w = wal.file("0001.seg", 2).unwrap();
        w.write_at(0, b"xy").unwrap();
        w.finish().unwrap();
        wal.commit().unwrap();
        // Resumed: the staging directory and its committed parts are found again.
        let (p, reused) = PointAssembler::open(&target, true).unwrap();
        assert!(reused && PointAssembler::has_committed(&p.wal_target()));
        p.commit().unwrap();
        assert_eq!(std::fs::read(target.join("pages")).unwrap(), b"abcd");
        assert_eq!(std::fs::read(target.join("wal/0001.seg")).unwrap(), b"xy");
        assert!(!target.join("old").exists());
    }
}
