//! Scratch space and staging.
//!
//! Contract: each job owns `<state>/scratch/<job>/`. A blob is staged by streaming its
//! payload from the source through a fixed-size buffer into `<name>.partial` with the blob
//! header in front and the CRC64-NVME footer behind, then fsynced and renamed to `<name>`
//! (and the directory fsynced), so a file named after a blob is always complete.
//!
//! Crash: a crash leaves at most `*.partial` files, which [`Scratch::job`] deletes when the
//! job's scratch is reopened, and complete staged blobs, which a resumed job reuses after
//! re-verifying them. Nothing here retries; the caller does. Cancellation: stop calling;
//! [`Scratch::remove_job`] frees the space.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use cairn_core::blob::{encode_footer, encode_header};
use cairn_core::{BlobKind, BlobRef, JobId, PayloadHasher};
use cairn_quota::{Budget, Reservation};

use crate::error::ExecError;
use crate::fsutil::{fsync_dir, remove_if_exists};
use crate::source::read_range;

/// The scratch root, `<state>/scratch`, with the byte budget staging draws from.
#[derive(Clone, Debug)]
pub struct Scratch {
    root: PathBuf,
    budget: Budget,
}

/// One job's scratch directory (cheap to clone: a path and a budget handle).
#[derive(Clone, Debug)]
pub struct JobScratch {
    dir: PathBuf,
    budget: Budget,
}

/// A complete, fsynced staged blob. Holds its share of the scratch budget until dropped.
#[derive(Debug)]
pub struct StagedBlob {
    /// The blob's reference (content address, digest, kind).
    pub blob: BlobRef,
    /// The staged file (header + payload + footer).
    pub path: PathBuf,
    _reservation: Reservation,
}

impl Scratch {
    /// Opens (creating) the scratch root.
    pub fn open(root: &Path, budget: Budget) -> Result<Self, ExecError> {
        std::fs::create_dir_all(root).map_err(ExecError::io("create scratch directory", root))?;
        Ok(Self {
            root: root.to_path_buf(),
            budget,
        })
    }

    /// Opens (creating) the scratch directory of `job`, deleting half-written files.
    pub fn job(&self, job: JobId) -> Result<JobScratch, ExecError> {
        let dir = self.root.join(job.to_string());
        std::fs::create_dir_all(&dir).map_err(ExecError::io("create job scratch", &dir))?;
        for entry in std::fs::read_dir(&dir).map_err(ExecError::io("list job scratch", &dir))? {
            let entry = entry.map_err(ExecError::io("list job scratch", &dir))?;
            if entry.file_name().to_string_lossy().ends_with(".partial") {
                let p = entry.path();
                std::fs::remove_file(&p)
                    .map_err(ExecError::io("remove partial staged file", &p))?;
            }
        }
        let budget = self.budget.child(format!("job:{job}"), self.budget.limit());
        Ok(JobScratch { dir, budget })
    }

    /// Deletes the scratch directory of `job` and everything in it.
    pub fn remove_job(&self, job: JobId) -> Result<(), ExecError> {
        remove_if_exists(&self.root.join(job.to_string()), "remove job scratch")
    }

    /// Job directories present under the scratch root (for the janitor).
    pub fn jobs(&self) -> Result<Vec<JobId>, ExecError> {
        let mut out = Vec::new();
        for entry in
            std::fs::read_dir(&self.root).map_err(ExecError::io("list scratch", &self.root))?
        {
            let entry = entry.map_err(ExecError::io("list scratch", &self.root))?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .filter(|n| n.len() == 16)
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            {
                out.push(JobId(id));
            }
        }
        out.sort();
        Ok(out)
    }
}

impl JobScratch {
    /// The job's scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stages `len` bytes of `src` at `offset` as a blob of `kind`. When `expect` is given
    /// (from an earlier hashing pass), the staged payload must have exactly those digests,
    /// otherwise the source changed underneath and the staging fails.
    pub fn stage_range(
        &self,
        kind: BlobKind,
        src: &File,
        src_path: &Path,
        offset: u64,
        len: u64,
        expect: Option<&BlobRef>,
    ) -> Result<StagedBlob, ExecError> {
        let object_len =
            cairn_core::blob::HEADER_LEN as u64 + len + cairn_core::blob::FOOTER_LEN as u64;
        let reservation = self.budget.try_reserve(object_len)?;
        let partial = match expect {
            Some(b) => self.dir.join(format!("{}.partial", b.name())),
            None => self
                .dir
                .join(format!("{}-{offset:x}.partial", kind.as_str())),
        };
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(ExecError::io("create staged file", &partial))?;
        let mut hasher = PayloadHasher::new();
        out.write_all(&encode_header(kind, len))
            .map_err(ExecError::io("write staged file", &partial))?;
        read_range(src, src_path, offset, len, |piece| {
            hasher.update(piece);
            out.write_all(piece)
                .map_err(ExecError::io("write staged file", &partial))
        })?;
        let (addr, xxh3) = hasher.finish();
        out.write_all(&encode_footer(addr.crc64))
            .map_err(ExecError::io("write staged file", &partial))?;
        out.sync_all()
            .map_err(ExecError::io("fsync staged file", &partial))?;
        drop(out);
        let blob = BlobRef {
            kind,
            crc64: addr.crc64,
            len: addr.len,
            xxh3,
            alias: expect.map_or(0, |b| b.alias),
        };
        if let Some(e) = expect {
            if !e.same_payload(&blob) {
                let _ = std::fs::remove_file(&partial);
                return Err(ExecError::SourceChanged {
                    path: src_path.display().to_string(),
                    detail: format!("bytes {offset}..{} differ between two reads", offset + len),
                });
            }
        }
        let path = self.dir.join(blob.name());
        std::fs::rename(&partial, &path).map_err(ExecError::io("rename staged file", &path))?;
        fsync_dir(&self.dir)?;
        Ok(StagedBlob {
            blob,
            path,
            _reservation: reservation,
        })
    }

    /// Stages an in-memory payload (small blobs such as deltas).
    pub fn stage_bytes(
        &self,
        kind: BlobKind,
        payload: &[u8],
        alias: u32,
    ) -> Result<StagedBlob, ExecError> {
        let (obj, mut blob) = cairn_core::blob::encode_blob(kind, payload);
        blob.alias = alias;
        let reservation = self.budget.try_reserve(obj.len() as u64)?;
        let path = self.dir.join(blob.name());
        let partial = self.dir.join(format!("{}.partial", blob.name()));
        let mut out =
            File::create(&partial).map_err(ExecError::io("create staged file", &partial))?;
        out.write_all(&obj)
            .map_err(ExecError::io("write staged file", &partial))?;
        out.sync_all()
            .map_err(ExecError::io("fsync staged file", &partial))?;
        drop(out);
        std::fs::rename(&partial, &path).map_err(ExecError::io("rename staged file", &path))?;
        fsync_dir(&self.dir)?;
        Ok(StagedBlob {
            blob,
            path,
            _reservation: reservation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::blob::decode_blob;

    #[test]
    fn staged_blob_is_complete_and_verifiable() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&src_path, &data).unwrap();
        let src = File::open(&src_path).unwrap();
        let scratch =
            Scratch::open(&dir.path().join("scratch"), Budget::root("global", 1 << 30)).unwrap();
        let job = scratch.job(JobId(1)).unwrap();
        std::fs::write(job.dir().join("junk.partial"), b"x").unwrap();
        let job = scratch.job(JobId(1)).unwrap();
        assert!(!job.dir().join("junk.partial").exists());
        let staged = job
            .stage_range(BlobKind::Base, &src, &src_path, 1000, 2_000_000, None)
            .unwrap();
        let obj = std::fs::read(&staged.path).unwrap();
        let (payload, _) = decode_blob("t", &obj, Some(staged.blob)).unwrap();
        assert_eq!(payload, &data[1000..2_001_000]);
        assert_eq!(scratch.jobs().unwrap(), vec![JobId(1)]);
        scratch.remove_job(JobId(1)).unwrap();
        assert!(scratch.jobs().unwrap().is_empty());
    }

    #[test]
    fn changed_source_is_detected_and_budget_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        std::fs::write(&src_path, vec![1u8; 8192]).unwrap();
        let src = File::open(&src_path).unwrap();
        let scratch = Scratch::open(&dir.path().join("s"), Budget::root("global", 10_000)).unwrap();
        let job = scratch.job(JobId(2)).unwrap();
        let first = job
            .stage_range(BlobKind::Base, &src, &src_path, 0, 4096, None)
            .unwrap();
        let mut wrong = first.blob;
        wrong.crc64 ^= 1;
        let err = job
            .stage_range(BlobKind::Base, &src, &src_path, 4096, 4096, Some(&wrong))
            .unwrap_err();
        assert!(matches!(err, ExecError::SourceChanged { .. }), "{err}");
        let _hold = first;
        let err = job
            .stage_range(BlobKind::Base, &src, &src_path, 0, 8192, None)
            .unwrap_err();
        assert!(matches!(err, ExecError::Quota(_)), "{err}");
    }
}
