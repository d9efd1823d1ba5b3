//! Assembling restored files and directories.
//!
//! Contract: a restore writes into `<target>.cairn-restore` (a file or a directory beside
//! the target) and only [`FileAssembler::commit`] / [`DirAssembler::commit`] fsync it and
//! rename it over the target, so the target is either untouched or the complete restore.
//! Crash: a leftover `.cairn-restore` is overwritten by the next restore. No retries here.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::ExecError;
use crate::fsutil::{fsync_dir, fsync_parent, remove_if_exists};

fn staging_path(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_os_string();
    s.push(".cairn-restore");
    PathBuf::from(s)
}

/// A restored file being assembled from pieces written at offsets.
#[derive(Debug)]
pub struct FileAssembler {
    target: PathBuf,
    tmp: PathBuf,
    file: File,
}

impl FileAssembler {
    /// Starts assembling a file of `len` bytes that will replace `target`.
    pub fn create(target: &Path, len: u64) -> Result<Self, ExecError> {
        Ok(Self::open(target, len, false)?.0)
    }

    /// Like [`FileAssembler::create`], but with `resume` an existing partial file of the
    /// right length is reopened as it is (an interrupted restore continues into it).
    /// Returns whether it was reopened.
    pub fn open(target: &Path, len: u64, resume: bool) -> Result<(Self, bool), ExecError> {
        if target.is_dir() {
            return Err(ExecError::BadSource {
                path: target.display().to_string(),
                reason: "restore target is a directory; expected a file path".into(),
            });
        }
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(ExecError::io("create restore directory", parent))?;
        }
        let tmp = staging_path(target);
        let reusable = resume
            && std::fs::metadata(&tmp)
                .map(|m| m.is_file() && m.len() == len)
                .unwrap_or(false);
        let file = if reusable {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&tmp)
                .map_err(ExecError::io("reopen restore file", &tmp))?
        } else {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(ExecError::io("create restore file", &tmp))?;
            file.set_len(len)
                .map_err(ExecError::io("size restore file", &tmp))?;
            file
        };
        let me = Self {
            target: target.to_path_buf(),
            tmp,
            file,
        };
        Ok((me, reusable))
    }

    /// Makes everything written so far durable (before recording it as done).
    pub fn sync(&self) -> Result<(), ExecError> {
        self.file
            .sync_data()
            .map_err(ExecError::io("fsync restore file", &self.tmp))
    }

    /// Writes `bytes` at `offset`.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }

    /// Writes `bytes` at `offset`; an error names the restore file.
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), ExecError> {
        self.file
            .write_all_at(bytes, offset)
            .map_err(ExecError::io("write restore file", &self.tmp))
    }

    /// A second handle on the file, with a file position of its own, for vectored writes.
    /// Several may write at once, to disjoint ranges; [`FileAssembler::sync`] and
    /// [`FileAssembler::commit`] cover what they wrote.
    pub fn writer(&self) -> Result<AssemblyWriter, ExecError> {
        let file = OpenOptions::new()
            .write(true)
            .open(&self.tmp)
            .map_err(ExecError::io("open restore file", &self.tmp))?;
        Ok(AssemblyWriter { file })
    }

    /// Fsyncs the file and renames it over the target.
    pub fn commit(self) -> Result<PathBuf, ExecError> {
        self.file
            .sync_all()
            .map_err(ExecError::io("fsync restore file", &self.tmp))?;
        std::fs::rename(&self.tmp, &self.target).map_err(ExecError::io(
            "rename restore file into place",
            &self.target,
        ))?;
        fsync_parent(&self.target)?;
        Ok(self.target)
    }

    /// Discards the partial file.
    pub fn abort(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Most slices one `writev` takes (Linux's `IOV_MAX`).
const MAX_SLICES: usize = 1024;

/// A handle on a [`FileAssembler`]'s file for vectored writes (see
/// [`FileAssembler::writer`]).
#[derive(Debug)]
pub struct AssemblyWriter {
    file: File,
}

impl AssemblyWriter {
    /// Writes `slices` one after the other from `offset`: one system call per 1024 slices
    /// (Linux's `IOV_MAX`), unless the kernel takes fewer bytes. The slices are consumed.
    pub fn write_vectored_at(
        &mut self,
        offset: u64,
        mut slices: &mut [IoSlice<'_>],
    ) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            let n = self
                .file
                .write_vectored(&slices[..slices.len().min(MAX_SLICES)])?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, n);
        }
        Ok(())
    }
}

/// A restored segment directory being assembled file by file.
#[derive(Debug)]
pub struct DirAssembler {
    target: PathBuf,
    tmp: PathBuf,
}

impl DirAssembler {
    /// Starts assembling a directory that will replace `target`.
    pub fn create(target: &Path) -> Result<Self, ExecError> {
        Ok(Self::open(target, false)?.0)
    }

    /// Like [`DirAssembler::create`], but with `resume` an existing partial directory is
    /// kept (its finished files are reused). Returns whether it was reopened.
    pub fn open(target: &Path, resume: bool) -> Result<(Self, bool), ExecError> {
        if target.is_file() {
            return Err(ExecError::BadSource {
                path: target.display().to_string(),
                reason: "restore target is a file; a segments restore writes a directory".into(),
            });
        }
        let tmp = staging_path(target);
        let reusable = resume && tmp.is_dir();
        if !reusable {
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
        Ok((me, reusable))
    }

    /// Fsyncs the directory's entries (before recording files in it as done).
    pub fn sync(&self) -> Result<(), ExecError> {
        fsync_dir(&self.tmp)
    }

    /// Whether a file written earlier is there with `len` bytes (a resumed restore trusts
    /// its done-markers only for files that are).
    pub fn has_file(&self, name: &str, len: u64) -> bool {
        std::fs::metadata(self.tmp.join(name))
            .map(|m| m.is_file() && m.len() == len)
            .unwrap_or(false)
    }

    /// Creates a file of `len` bytes named `name` inside the directory.
    pub fn file(&self, name: &str, len: u64) -> Result<SegmentWriter, ExecError> {
        let path = self.tmp.join(name);
        let file = File::create(&path).map_err(ExecError::io("create restored segment", &path))?;
        file.set_len(len)
            .map_err(ExecError::io("size restored segment", &path))?;
        Ok(SegmentWriter { path, file })
    }

    /// Fsyncs the directory and moves it into place, replacing any previous target.
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

/// One file of a [`DirAssembler`].
#[derive(Debug)]
pub struct SegmentWriter {
    path: PathBuf,
    file: File,
}

impl SegmentWriter {
    /// Writes `bytes` at `offset`.
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }

    /// Fsyncs the file.
    pub fn finish(self) -> Result<(), ExecError> {
        self.file
            .sync_all()
            .map_err(ExecError::io("fsync restored segment", &self.path))
    }
}

/// Whether an assembly of `target` was renamed into place: the target exists and no
/// staging copy of it does. A restore killed between that rename and recording it uses
/// this to finish instead of writing everything again.
pub fn committed(target: &Path) -> bool {
    target.exists() && !staging_path(target).exists()
}

/// Removes what an abandoned restore to `target` left beside it (`<target>.cairn-restore`).
pub fn discard_partial(target: &Path) -> Result<(), ExecError> {
    remove_if_exists(&staging_path(target), "remove partial restore")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn vectored_writes_land_at_their_offsets_past_the_slice_limit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        let asm = FileAssembler::create(&target, 10_000).unwrap();
        let pieces: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 251) as u8; (i % 3) as usize])
            .collect();
        let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        let mut w = asm.writer().unwrap();
        w.write_vectored_at(100, &mut slices).unwrap();
        w.write_vectored_at(9_000, &mut [IoSlice::new(&[]), IoSlice::new(b"end")])
            .unwrap();
        asm.write(0, b"head").unwrap();
        let path = asm.commit().unwrap();
        let got = std::fs::read(path).unwrap();
        let want: Vec<u8> = pieces.concat();
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[100..100 + want.len()], &want[..]);
        assert_eq!(&got[9_000..9_003], b"end");
        assert_eq!(got.len(), 10_000);
    }
}
