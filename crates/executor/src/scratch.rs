//! Scratch space and staging.
//!
//! Contract: each job owns `<state>/scratch/<job>/`. A blob is staged by streaming its
//! payload from the source through a fixed-size buffer into a `.partial` file with the blob
//! header in front and the CRC64-NVME footer behind, hashing it (and, for page sources,
//! digesting each page) on the way, so the source is read once. With compression on
//! ([`Scratch::with_compression`]) the payload is zstd-compressed on its way into the file
//! (a version 2 blob); if that does not pay ([`cairn_core::blob::worthwhile`]) the source
//! range is read a second time and stored raw, still as version 2, and a source whose
//! digests differ on the second read fails as changed. The file is then fsynced
//! and renamed to the blob's name (and the directory fsynced), so a file named after a blob
//! is always complete and holds exactly the bytes its name and digests describe.
//!
//! Crash: a crash leaves at most `*.partial` files, which [`Scratch::job`] deletes when the
//! job's scratch is reopened, and complete staged blobs, which a resumed job reuses after
//! re-verifying them. Nothing here retries; the caller does. Cancellation: stop calling;
//! [`Scratch::remove_job`] frees the space.
//!
//! In use: every [`JobScratch`] handle (and its clones) marks its job's directory as in use
//! by this process until the last one is dropped ([`Scratch::in_use`]), so a periodic
//! janitor never removes the scratch of a job running here, whether or not it has a job
//! record (verify's scratch has none).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use cairn_core::blob::{
    effective_level, encode_footer, encode_footer_v2, encode_header, encode_header_v2,
    max_object_len, worthwhile, Codec, HEADER_LEN_V2,
};
use cairn_core::{BlobKind, BlobRef, ContentAddress, Digest128, JobId, PayloadHasher};
use cairn_quota::{Budget, Reservation};

use crate::error::ExecError;
use crate::fsutil::{fsync_dir, remove_if_exists};
use crate::source::{page_digest, read_range, ReadAt};

/// The scratch root, `<state>/scratch`, with the byte budget staging draws from.
#[derive(Clone, Debug)]
pub struct Scratch {
    root: PathBuf,
    budget: Budget,
    /// zstd level for staged blobs; `None` writes uncompressed version 1 blobs.
    compression: Option<i32>,
    /// Jobs with a live [`JobScratch`] handle in this process, with their handle count.
    live: Arc<Mutex<HashMap<JobId, usize>>>,
    /// The limit of each job's own budget (a child of `budget`).
    job_limit: u64,
}

/// Locks the in-use map; a panic while it was held cannot leave it inconsistent (every
/// update is a single insert or remove), so a poisoned lock is used as it is.
fn lock(live: &Mutex<HashMap<JobId, usize>>) -> MutexGuard<'_, HashMap<JobId, usize>> {
    live.lock().unwrap_or_else(|p| p.into_inner())
}

/// Marks a job's scratch as in use until dropped (shared by a [`JobScratch`]'s clones).
#[derive(Debug)]
struct InUse {
    job: JobId,
    live: Arc<Mutex<HashMap<JobId, usize>>>,
}

impl InUse {
    fn new(job: JobId, live: &Arc<Mutex<HashMap<JobId, usize>>>) -> Self {
        *lock(live).entry(job).or_insert(0) += 1;
        Self {
            job,
            live: Arc::clone(live),
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut live = lock(&self.live);
        if let Some(n) = live.get_mut(&self.job) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.job);
            }
        }
    }
}

/// What a job's scratch directory holds, for the janitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchUsage {
    /// Bytes of the files in it.
    pub bytes: u64,
    /// The newest modification time of the directory and its files (`None` if the file
    /// system does not keep them).
    pub modified: Option<SystemTime>,
}

/// One job's scratch directory (cheap to clone: a path and a budget handle).
#[derive(Clone, Debug)]
pub struct JobScratch {
    dir: PathBuf,
    budget: Budget,
    compression: Option<i32>,
    /// Numbers the `.partial` files of stagings in progress.
    next_partial: Arc<AtomicU64>,
    /// The reservations of staged files an earlier attempt left (by file name), taken by
    /// whoever uploads or discards them ([`JobScratch::take_existing`]).
    existing: Arc<Mutex<HashMap<String, Reservation>>>,
    _in_use: Arc<InUse>,
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
            compression: None,
            live: Arc::default(),
            job_limit: u64::MAX,
        })
    }

    /// A handle on the scratch root that neither creates nor touches it: for a reader
    /// that stages nothing (a read-only checkpointer beside the state's owner).
    pub fn detached(root: &Path, budget: Budget) -> Self {
        Self {
            root: root.to_path_buf(),
            budget,
            compression: None,
            live: Arc::default(),
            job_limit: u64::MAX,
        }
    }

    /// Caps each job's own scratch budget at `limit` bytes (below the root's).
    pub fn with_job_limit(mut self, limit: u64) -> Self {
        self.job_limit = limit;
        self
    }

    /// The budget staging draws from (the root of the job budgets).
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Whether a [`JobScratch`] handle of `job` is alive in this process.
    pub fn in_use(&self, job: JobId) -> bool {
        lock(&self.live).contains_key(&job)
    }

    /// The bytes in `job`'s scratch directory and when it last changed (`None` if there
    /// is no such directory).
    pub fn usage(&self, job: JobId) -> Result<Option<ScratchUsage>, ExecError> {
        let dir = self.root.join(job.to_string());
        let meta = match std::fs::metadata(&dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ExecError::io("stat job scratch", &dir)(e)),
        };
        let mut usage = ScratchUsage {
            bytes: 0,
            modified: meta.modified().ok(),
        };
        for entry in std::fs::read_dir(&dir).map_err(ExecError::io("list job scratch", &dir))? {
            let entry = entry.map_err(ExecError::io("list job scratch", &dir))?;
            // A file removed meanwhile (an upload finished) counts for nothing.
            let Ok(m) = entry.metadata() else { continue };
            usage.bytes += m.len();
            usage.modified = usage.modified.max(m.modified().ok());
        }
        Ok(Some(usage))
    }

    /// Stages blobs compressed with zstd at `level` (`None` or `Some(0)`: uncompressed,
    /// the default).
    pub fn with_compression(mut self, level: Option<i32>) -> Self {
        self.compression = effective_level(level);
        self
    }

    /// Opens (creating) the scratch directory of `job`, deleting half-written files.
    pub fn job(&self, job: JobId) -> Result<JobScratch, ExecError> {
        // In use from before the directory exists, so no janitor sees it unclaimed.
        let in_use = Arc::new(InUse::new(job, &self.live));
        let dir = self.root.join(job.to_string());
        std::fs::create_dir_all(&dir).map_err(ExecError::io("create job scratch", &dir))?;
        let budget = self.budget.child(
            format!("job:{job}"),
            self.job_limit.min(self.budget.limit()),
        );
        // Staged files an earlier attempt left are charged again: a resumed job's re-uploads
        // hold their space like fresh stagings do, so the budget covers them too.
        let mut existing = HashMap::new();
        for entry in std::fs::read_dir(&dir).map_err(ExecError::io("list job scratch", &dir))? {
            let entry = entry.map_err(ExecError::io("list job scratch", &dir))?;
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".partial") {
                std::fs::remove_file(&p)
                    .map_err(ExecError::io("remove partial staged file", &p))?;
                continue;
            }
            let len = entry
                .metadata()
                .map_err(ExecError::io("stat staged file", &p))?
                .len();
            existing.insert(name, budget.try_reserve(len)?);
        }
        Ok(JobScratch {
            dir,
            budget,
            compression: self.compression,
            next_partial: Arc::new(AtomicU64::new(0)),
            existing: Arc::new(Mutex::new(existing)),
            _in_use: in_use,
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
    /// The reservation of a staged file named `name` left by an earlier attempt (once:
    /// the caller holds it until the file is uploaded or removed).
    pub fn take_existing(&self, name: &str) -> Option<Reservation> {
        self.existing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    /// Reserves `bytes` of this job's budget for a file the caller writes into the
    /// directory itself (verify's restore); fails naming the budget that cannot take it.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation, ExecError> {
        Ok(self.budget.try_reserve(bytes)?)
    }

    /// The job's scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The zstd level staged blobs are compressed with, if compression is on.
    pub fn compression(&self) -> Option<i32> {
        self.compression
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
        // The largest the staged file can be, whatever the codec.
        let reservation = self.budget.try_reserve(max_object_len(len))?;
        let n = self.next_partial.fetch_add(1, Ordering::Relaxed);
        let partial = self.dir.join(format!("staging-{n}.partial"));
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(ExecError::io("create staged file", &partial))?;
        let mut digests = Vec::new();
        let range = SourceRange {
            src,
            path: src_path,
            offset,
            len,
        };
        let written = match self.compression {
            None => write_plain(&mut out, &partial, kind, &range, page_size, &mut digests),
            Some(level) => write_compressed(
                &mut out,
                &partial,
                kind,
                &range,
                page_size,
                &mut digests,
                level,
            ),
        };
        let (addr, xxh3) = match written {
            Ok(digests) => digests,
            Err(e) => {
                drop(out);
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
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
        let (obj, fresh) = cairn_core::blob::encode_blob_with(name.kind, payload, self.compression)
            .map_err(|source| ExecError::Encode {
                dir: self.dir.display().to_string(),
                source,
            })?;
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

/// The source bytes a blob is staged from.
struct SourceRange<'a, R: ?Sized> {
    src: &'a R,
    path: &'a Path,
    offset: u64,
    len: u64,
}

impl<R: ReadAt + ?Sized> SourceRange<'_, R> {
    /// Reads the range once, hashing it and, with `page_size`, digesting each page into
    /// `digests`; each piece then goes to `out`.
    fn read(
        &self,
        page_size: Option<u32>,
        digests: &mut Vec<u128>,
        mut out: impl FnMut(&[u8]) -> Result<(), ExecError>,
    ) -> Result<(ContentAddress, Digest128), ExecError> {
        let mut hasher = PayloadHasher::new();
        read_range(self.src, self.path, self.offset, self.len, |piece| {
            hasher.update(piece);
            if let Some(ps) = page_size {
                // IO_BUF is a multiple of every supported page size: pieces hold whole pages.
                digests.extend(piece.chunks(ps as usize).map(page_digest));
            }
            out(piece)
        })?;
        Ok(hasher.finish())
    }
}

/// Writes a version 1 blob: header, the payload as it is, footer.
fn write_plain<R: ReadAt + ?Sized>(
    out: &mut File,
    partial: &Path,
    kind: BlobKind,
    range: &SourceRange<'_, R>,
    page_size: Option<u32>,
    digests: &mut Vec<u128>,
) -> Result<(ContentAddress, Digest128), ExecError> {
    let io = |op| ExecError::io(op, partial);
    out.write_all(&encode_header(kind, range.len))
        .map_err(io("write staged file"))?;
    let (addr, xxh3) = range.read(page_size, digests, |piece| {
        out.write_all(piece).map_err(io("write staged file"))
    })?;
    out.write_all(&encode_footer(addr.crc64))
        .map_err(io("write staged file"))?;
    Ok((addr, xxh3))
}

/// Counts and checksums the bytes written through it (the stored body of a blob).
struct BodyWriter<W> {
    inner: W,
    crc: crc64fast_nvme::Digest,
    len: u64,
}

impl<W: Write> Write for BodyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.write(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a version 2 blob: the body zstd-compressed at `level` while the source is read,
/// or, if that does not pay, the source read again and stored raw; the header (which holds
/// the body's length) last.
fn write_compressed<R: ReadAt + ?Sized>(
    out: &mut File,
    partial: &Path,
    kind: BlobKind,
    range: &SourceRange<'_, R>,
    page_size: Option<u32>,
    digests: &mut Vec<u128>,
    level: i32,
) -> Result<(ContentAddress, Digest128), ExecError> {
    let io = |op| ExecError::io(op, partial);
    out.write_all(&[0u8; HEADER_LEN_V2])
        .map_err(io("write staged file"))?;
    let body = BodyWriter {
        inner: BufWriter::with_capacity(1 << 20, &mut *out),
        crc: crc64fast_nvme::Digest::new(),
        len: 0,
    };
    let mut z = zstd::stream::write::Encoder::new(body, level).map_err(io("start zstd for"))?;
    z.set_pledged_src_size(Some(range.len))
        .and_then(|()| z.include_contentsize(true))
        .and_then(|()| z.include_checksum(false))
        .map_err(io("set up zstd for"))?;
    let (addr, xxh3) = range.read(page_size, digests, |piece| {
        z.write_all(piece).map_err(io("compress into staged file"))
    })?;
    let mut body = z.finish().map_err(io("compress into staged file"))?;
    body.inner.flush().map_err(io("write staged file"))?;
    let (mut codec, mut stored, mut body_crc) = (Codec::Zstd, body.len, body.crc.sum64());
    drop(body);
    if !worthwhile(range.len, stored) {
        out.set_len(HEADER_LEN_V2 as u64)
            .and_then(|()| out.seek(SeekFrom::Start(HEADER_LEN_V2 as u64)).map(|_| ()))
            .map_err(io("rewind staged file"))?;
        let again = range.read(None, &mut Vec::new(), |piece| {
            out.write_all(piece).map_err(io("write staged file"))
        })?;
        if again != (addr, xxh3) {
            return Err(ExecError::SourceChanged {
                path: range.path.display().to_string(),
                detail: format!(
                    "bytes {}..{} differ between two reads",
                    range.offset,
                    range.offset + range.len
                ),
            });
        }
        (codec, stored, body_crc) = (Codec::Raw, range.len, addr.crc64);
    }
    out.write_all(&encode_footer_v2(body_crc, addr.crc64))
        .and_then(|()| out.seek(SeekFrom::Start(0)).map(|_| ()))
        .and_then(|()| out.write_all(&encode_header_v2(kind, codec, range.len, stored)))
        .map_err(io("write staged file"))?;
    Ok((addr, xxh3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::blob::{decode_blob, Codec};

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

    /// A source whose bytes change after `reads` reads (each a fresh noise stream).
    struct Shifting {
        reads: std::sync::atomic::AtomicU32,
        after: u32,
    }

    impl ReadAt for Shifting {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let n = self.reads.fetch_add(1, Ordering::Relaxed);
            let salt = u64::from(n >= self.after);
            for (i, b) in buf.iter_mut().enumerate() {
                let mut x = (offset + i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt;
                x ^= x >> 29;
                *b = x.wrapping_mul(0xbf58_476d_1ce4_e5b9).to_le_bytes()[7];
            }
            Ok(())
        }
    }

    #[test]
    fn compressed_staging_compresses_what_pays_and_stores_the_rest_raw() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = Scratch::open(&dir.path().join("s"), Budget::root("global", 1 << 30))
            .unwrap()
            .with_compression(Some(3));
        let job = scratch.job(JobId(3)).unwrap();
        assert_eq!(job.compression(), Some(3));
        // Pages of text compress: version 2, zstd, the same name as uncompressed.
        let src_path = dir.path().join("pages");
        let data: Vec<u8> = (0..1_000_000u32)
            .map(|i| b"select * from orders where id = ?; "[(i % 35) as usize])
            .collect();
        std::fs::write(&src_path, &data).unwrap();
        let src = File::open(&src_path).unwrap();
        let (staged, digests) = job
            .stage_range(BlobKind::Base, &src, &src_path, 0, 819_200, Some(4096))
            .unwrap();
        let obj = std::fs::read(&staged.path).unwrap();
        let (payload, dec) = decode_blob("t", &obj, Some(staged.blob)).unwrap();
        assert!(payload == data[..819_200]);
        assert_eq!((dec.version, dec.codec), (2, Codec::Zstd));
        assert!(obj.len() < 819_200 / 20, "{} bytes", obj.len());
        assert_eq!(digests.len(), 200);
        let plain = cairn_core::blob::encode_blob(BlobKind::Base, &data[..819_200]).1;
        assert_eq!(staged.blob, plain);
        // Noise does not: read again and stored raw, still version 2.
        let noise = Shifting {
            reads: 0.into(),
            after: u32::MAX,
        };
        let (staged, _) = job
            .stage_range(BlobKind::Segment, &noise, &src_path, 7, 300_000, None)
            .unwrap();
        let obj = std::fs::read(&staged.path).unwrap();
        let (_, dec) = decode_blob("t", &obj, Some(staged.blob)).unwrap();
        assert_eq!((dec.version, dec.codec), (2, Codec::Raw));
        assert_eq!(obj.len(), 300_000 + 72);
        // A source that changes between those two reads is refused.
        let reads = 300_000usize.div_ceil(crate::source::IO_BUF) as u32;
        let changing = Shifting {
            reads: 0.into(),
            after: reads,
        };
        let err = job
            .stage_range(BlobKind::Segment, &changing, &src_path, 7, 300_000, None)
            .unwrap_err();
        assert!(matches!(err, ExecError::SourceChanged { .. }), "{err}");
        // In-memory payloads (deltas) are compressed too.
        let blob = cairn_core::blob::encode_blob(BlobKind::Delta, &data[..50_000]).1;
        let staged = job.stage_bytes(&data[..50_000], &blob).unwrap();
        let obj = std::fs::read(&staged.path).unwrap();
        let (back, dec) = decode_blob("t", &obj, Some(blob)).unwrap();
        assert_eq!((back.len(), dec.codec), (50_000, Codec::Zstd));
    }
}
