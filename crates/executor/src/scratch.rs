//! Scratch space and staging.
//!
//! Contract: each job owns `<state>/scratch/<job>/`. A blob is staged by streaming its
//! payload from the source through a fixed-size buffer into a `.partial` file with the blob
//! header in front and the CRC64-NVME footer behind, hashing it (and, for page sources,
//! digesting each page) on the way, so the source is read once; the file is then fsynced
//! and renamed to the blob's name (and the directory fsynced), so a file named after a blob
//! is always complete and holds exactly the bytes its name and digests describe.
//!
//! Crash: a crash leaves at most `*.partial` files, which [`Scratch::job`] deletes when the
//! job's scratch is reopened, and complete staged blobs, which a resumed job reuses after
//! re-verifying them. Nothing here retries; the caller does. Cancellation: stop calling;
//! [`Scratch::remove_job`] frees the space.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cairn_core::blob::{encode_footer, encode_header};
use cairn_core::{BlobKind, BlobRef, JobId, PayloadHasher};
use cairn_quota::{Budget, Reservation};

use crate::error::ExecError;
use crate::fsutil::{fsync_dir, remove_if_exists};
use crate::source::{page_digest, read_range, ReadAt};

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
    /// Numbers the `.partial` files of stagings in progress.
    next_partial: Arc<AtomicU64>,
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

impl StagedBlob {
    /// Renames the staged file for `blob`, another name of the same payload (an alias, a
    /// garbage-collection epoch).
    pub fn rename_for(&mut self, blob: BlobRef) -> Result<(), ExecError> {
        if blob.name() == self.blob.name() {
            self.blob = blob;
            return Ok(());
        }
        if !blob.same_payload(&self.blob) {
            return Err(ExecError::BadSource {
                path: self.path.display().to_string(),
                reason: format!(
                    "staged blob {} cannot be named {}",
                    self.blob.name(),
                    blob.name()
                ),
            });
        }
        let path = self.path.with_file_name(blob.name());
        std::fs::rename(&self.path, &path).map_err(ExecError::io("rename staged file", &path))?;
        self.blob = blob;
        self.path = path;
        Ok(())
    }

    /// Deletes the staged file (its blob turned out to be stored already) and gives its
    /// scratch space back.
    pub fn discard(self) -> Result<(), ExecError> {
        remove_if_exists(&self.path, "remove staged file")
    }
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
        Ok(JobScratch {
            dir,
            budget,
            next_partial: Arc::new(AtomicU64::new(0)),
        })
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

    /// Stages `len` bytes of `src` at `offset` as a blob of `kind`, in one read of the
    /// source that also computes its content address and, with `page_size`, one digest per
    /// page (returned; empty without it). The blob gets alias 0 ([`StagedBlob::rename_for`]).
    pub fn stage_range(
        &self,
        kind: BlobKind,
        src: &(impl ReadAt + ?Sized),
        src_path: &Path,
        offset: u64,
        len: u64,
        page_size: Option<u32>,
    ) -> Result<(StagedBlob, Vec<u128>), ExecError> {
        let object_len =
            cairn_core::blob::HEADER_LEN as u64 + len + cairn_core::blob::FOOTER_LEN as u64;
        let reservation = self.budget.try_reserve(object_len)?;
        let n = self.next_partial.fetch_add(1, Ordering::Relaxed);
        let partial = self.dir.join(format!("staging-{n}.partial"));
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(ExecError::io("create staged file", &partial))?;
        let mut hasher = PayloadHasher::new();
        let mut digests = Vec::new();
        out.write_all(&encode_header(kind, len))
            .map_err(ExecError::io("write staged file", &partial))?;
        let staged = read_range(src, src_path, offset, len, |piece| {
            hasher.update(piece);
            if let Some(ps) = page_size {
                // IO_BUF is a multiple of every supported page size: pieces hold whole pages.
                digests.extend(piece.chunks(ps as usize).map(page_digest));
            }
            out.write_all(piece)
                .map_err(ExecError::io("write staged file", &partial))
        });
        if let Err(e) = staged {
            drop(out);
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        let (addr, xxh3) = hasher.finish();
        out.write_all(&encode_footer(addr.crc64))
            .map_err(ExecError::io("write staged file", &partial))?;
        out.sync_all()
            .map_err(ExecError::io("fsync staged file", &partial))?;
        drop(out);
        let blob = BlobRef::new(kind, addr.crc64, addr.len, xxh3);
        let path = self.dir.join(blob.name());
        std::fs::rename(&partial, &path).map_err(ExecError::io("rename staged file", &path))?;
        fsync_dir(&self.dir)?;
        let staged = StagedBlob {
            blob,
            path,
            _reservation: reservation,
        };
        Ok((staged, digests))
    }

    /// Stages an in-memory payload (small blobs such as deltas) under `name`'s name (a
    /// reference to this very payload).
    pub fn stage_bytes(&self, payload: &[u8], name: &BlobRef) -> Result<StagedBlob, ExecError> {
        let (obj, fresh) = cairn_core::blob::encode_blob(name.kind, payload);
        if !fresh.same_payload(name) {
            return Err(ExecError::BadSource {
                path: self.dir.display().to_string(),
                reason: format!("payload does not match blob {}", name.name()),
            });
        }
        let blob = *name;
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
        let (staged, digests) = job
            .stage_range(BlobKind::Base, &src, &src_path, 4096, 2_048_000, Some(4096))
            .unwrap();
        let obj = std::fs::read(&staged.path).unwrap();
        let (payload, _) = decode_blob("t", &obj, Some(staged.blob)).unwrap();
        assert_eq!(payload, &data[4096..4096 + 2_048_000]);
        assert_eq!(digests.len(), 500);
        assert_eq!(digests[3], page_digest(&data[4 * 4096..5 * 4096]));
        let mut staged = staged;
        let renamed = BlobRef {
            alias: 2,
            epoch: 3,
            ..staged.blob
        };
        staged.rename_for(renamed).unwrap();
        assert!(staged.path.ends_with(renamed.name()) && renamed.name().ends_with("-g3-2"));
        assert!(staged.path.is_file());
        let path = staged.path.clone();
        staged.discard().unwrap();
        assert!(!path.exists());
        assert_eq!(scratch.jobs().unwrap(), vec![JobId(1)]);
        scratch.remove_job(JobId(1)).unwrap();
        assert!(scratch.jobs().unwrap().is_empty());
    }

    #[test]
    fn a_source_that_shrinks_while_staged_fails_and_the_budget_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        std::fs::write(&src_path, vec![1u8; 8192]).unwrap();
        let src = File::open(&src_path).unwrap();
        let scratch = Scratch::open(&dir.path().join("s"), Budget::root("global", 10_000)).unwrap();
        let job = scratch.job(JobId(2)).unwrap();
        let (first, _) = job
            .stage_range(BlobKind::Base, &src, &src_path, 0, 4096, None)
            .unwrap();
        std::fs::write(&src_path, vec![1u8; 2048]).unwrap();
        let err = job
            .stage_range(BlobKind::Base, &src, &src_path, 0, 4096, None)
            .unwrap_err();
        assert!(matches!(err, ExecError::SourceChanged { .. }), "{err}");
        assert!(
            std::fs::read_dir(job.dir()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".partial")),
            "a failed staging leaves no partial file"
        );
        let _hold = first;
        let err = job
            .stage_range(BlobKind::Base, &src, &src_path, 0, 8192, None)
            .unwrap_err();
        assert!(matches!(err, ExecError::Quota(_)), "{err}");
    }
}
