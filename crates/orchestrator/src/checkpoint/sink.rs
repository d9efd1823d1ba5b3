//! The blob sink: decides per blob whether it is already stored and otherwise stages and
//! uploads it, with bounded concurrency.
//!
//! Contract: [`BlobSink::put_staged`], [`BlobSink::put_bytes`] and
//! [`BlobSink::put_segment`] return the blob's reference once it is either known to be
//! stored (a catalog hit confirmed by XXH3-128, a blob this job already produced, or an
//! object the store has with a size a blob of that payload can have, compressed or
//! not) or handed to an upload task; at most `upload_concurrency` uploads are in flight. [`BlobSink::finish`] waits for them all.
//!
//! An in-memory payload (a delta) is staged by its upload task, in the background.
//!
//! Crash: a staged file stays in the job's scratch until its upload finished, so a resumed
//! job finds it ([`BlobSink::ensure_stored`]); a delta recorded before its staging finished
//! has neither a staged file nor an object, so a resumed job analyses its chunk again; an upload cut short never becomes visible
//! (see the remote store). Retries: the store retries requests. Cancellation: uploads
//! still in flight when the sink is dropped (an error, a cancel) are aborted.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_core::{
    keys, BlobKind, BlobRef, ContentAddress, DbId, DbState, Digest128, JobId, PayloadHasher,
};
use cairn_executor::{JobScratch, StagedBlob};
use cairn_state::BlobLookup;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::task::JoinHandle;

use crate::{CairnError, Checkpointer};

type UploadTask = JoinHandle<Result<u64, CairnError>>;

/// What one attempt did with blobs.
#[derive(Debug, Default)]
pub(super) struct UploadStats {
    pub bytes_uploaded: u64,
    pub blobs_uploaded: u64,
    pub blobs_reused: u64,
}

/// Where an upload reads its blob from.
enum Upload {
    /// A staged file, deleted once uploaded; `hold` keeps its scratch reservation till then.
    Staged { path: PathBuf, hold: Hold },
    /// The whole of an immutable source file, framed on the fly.
    File { path: PathBuf },
    /// An in-memory payload (a delta), staged by the upload task itself, so that staging
    /// (a compression attempt, a write and two fsyncs) overlaps the caller's next chunk.
    Bytes {
        payload: Vec<u8>,
        scratch: JobScratch,
    },
}

/// What keeps a staged file's scratch space reserved while it uploads.
enum Hold {
    /// Staged by this attempt.
    Staged { _blob: StagedBlob },
    /// Left by an earlier attempt, charged again when the job's scratch was reopened
    /// (`None` if it appeared since).
    Existing {
        _space: Option<cairn_quota::Reservation>,
    },
}

/// Whether a payload still has to be stored.
enum Resolved {
    /// It is stored (or being stored by this job) under this reference.
    Stored(BlobRef),
    /// It must be uploaded under this reference and key.
    New(BlobRef, String),
}

pub(super) struct BlobSink<'a> {
    cp: &'a Checkpointer,
    job: JobId,
    db: &'a DbId,
    scratch: &'a JobScratch,
    in_flight: FuturesUnordered<UploadTask>,
    this_job: HashMap<String, BlobRef>,
    stats: UploadStats,
    /// The garbage-collection epoch of the parent generation: new blobs are named with it.
    epoch: u64,
    /// The parent generation's state, whose blobs stay reusable whatever their epoch.
    parent: Option<&'a DbState>,
    /// The names of the parent's blobs, built on first need.
    parent_names: Option<HashSet<String>>,
}

impl Drop for BlobSink<'_> {
    /// Uploads still in flight when the sink is dropped (an error, a cancel) are aborted:
    /// nothing outlives the attempt that started it.
    fn drop(&mut self) {
        for task in self.in_flight.iter() {
            task.abort();
        }
    }
}

impl<'a> BlobSink<'a> {
    pub(super) fn new(
        cp: &'a Checkpointer,
        job: JobId,
        db: &'a DbId,
        scratch: &'a JobScratch,
        parent: Option<&'a DbState>,
    ) -> Self {
        Self {
            cp,
            job,
            db,
            scratch,
            in_flight: FuturesUnordered::new(),
            this_job: HashMap::new(),
            stats: UploadStats::default(),
            epoch: parent.map_or(0, |p| p.gc.epoch),
            parent,
            parent_names: None,
        }
    }

    /// Whether a stored blob may be referenced: one of the current GC epoch, or one the
    /// parent generation references (retained, so no collection deletes it). A blob of an
    /// older epoch that only the catalog or a listing knows may be on the delete list of a
    /// collection, even a stalled one (docs/decisions/0022).
    fn reusable(&mut self, b: &BlobRef) -> bool {
        if b.epoch == self.epoch {
            return true;
        }
        let parent = self.parent;
        let names = self.parent_names.get_or_insert_with(|| {
            parent.map_or_else(HashSet::new, |p| {
                p.blobs().iter().map(|b| b.name()).collect()
            })
        });
        names.contains(&b.name())
    }

    pub(super) fn cp(&self) -> &'a Checkpointer {
        self.cp
    }

    pub(super) fn db(&self) -> &'a DbId {
        self.db
    }

    pub(super) fn scratch(&self) -> &'a JobScratch {
        self.scratch
    }

    fn join_err(&self, what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> CairnError {
        let job = self.job.to_string();
        move |source| CairnError::Join { job, what, source }
    }

    async fn drain_to(&mut self, max: usize) -> Result<(), CairnError> {
        while self.in_flight.len() > max {
            if let Some(done) = self.in_flight.next().await {
                let bytes = done.map_err(self.join_err("blob upload"))??;
                self.stats.bytes_uploaded += bytes;
                self.stats.blobs_uploaded += 1;
            }
        }
        Ok(())
    }

    /// Waits for every upload and returns what this attempt did.
    pub(super) async fn finish(mut self) -> Result<UploadStats, CairnError> {
        self.drain_to(0).await?;
        Ok(std::mem::take(&mut self.stats))
    }

    /// For a blob recorded by an earlier attempt: true if it is in the store, or was
    /// staged and is now being uploaded; false if neither (it must be produced again).
    pub(super) async fn ensure_stored(&mut self, blob: &BlobRef) -> Result<bool, CairnError> {
        let key = keys::blob_key(&self.cp.cfg.tenant, self.db, blob);
        if self.stored(&key, blob).await? {
            self.stats.blobs_reused += 1;
            return Ok(true);
        }
        // Another chunk of this attempt with the same payload already started its upload
        // (which removes the staged file when it is done).
        if self.this_job.contains_key(&blob.name()) {
            self.stats.blobs_reused += 1;
            return Ok(true);
        }
        let staged = self.scratch.dir().join(blob.name());
        if !staged.is_file() {
            return Ok(false);
        }
        self.this_job.insert(blob.name(), *blob);
        self.upload(
            key,
            *blob,
            Upload::Staged {
                path: staged,
                hold: Hold::Existing {
                    _space: self.scratch.take_existing(&blob.name()),
                },
            },
        )
        .await?;
        Ok(true)
    }

    /// Whether the store has an object at `key` of a size a blob of `blob`'s payload can
    /// have (any format version, any compression level: the key names the uncompressed
    /// payload, and every read checks the rest).
    async fn stored(&self, key: &str, blob: &BlobRef) -> Result<bool, CairnError> {
        let size = self.cp.store.head(key).await?;
        Ok(size.is_some_and(|s| blob.plausible_object_len(s)))
    }

    /// Finds a payload among stored blobs: the catalog (confirmed by XXH3-128), this job's
    /// own blobs, then the store (an interrupted earlier attempt may have uploaded it).
    async fn resolve(
        &mut self,
        kind: BlobKind,
        addr: ContentAddress,
        xxh3: Digest128,
    ) -> Result<Resolved, CairnError> {
        let tenant = &self.cp.cfg.tenant;
        let wanted = BlobRef {
            epoch: self.epoch,
            ..BlobRef::new(kind, addr.crc64, addr.len, xxh3)
        };
        let candidates = self.cp.state.same_payload(tenant, self.db, &wanted)?;
        if let Some(b) = candidates.into_iter().find(|b| self.reusable(b)) {
            self.stats.blobs_reused += 1;
            return Ok(Resolved::Stored(b));
        }
        let alias = match self
            .cp
            .state
            .find_blob(tenant, self.db, &wanted, |_| false)?
        {
            BlobLookup::New { alias } => alias,
            BlobLookup::Found(b) => b.alias,
        };
        let blob = BlobRef { alias, ..wanted };
        let name = blob.name();
        if let Some(b) = self.this_job.get(&name) {
            self.stats.blobs_reused += 1;
            return Ok(Resolved::Stored(*b));
        }
        self.this_job.insert(name, blob);
        let key = keys::blob_key(tenant, self.db, &blob);
        if self.stored(&key, &blob).await? {
            self.stats.blobs_reused += 1;
            return Ok(Resolved::Stored(blob));
        }
        Ok(Resolved::New(blob, key))
    }

    /// Uploads `blob` in the background, once fewer than `upload_concurrency` are running.
    async fn upload(&mut self, key: String, blob: BlobRef, from: Upload) -> Result<(), CairnError> {
        self.drain_to(self.cp.cfg.upload_concurrency.saturating_sub(1))
            .await?;
        let store = self.cp.store.clone();
        let join_err = self.join_err("staging a delta");
        self.in_flight.push(tokio::spawn(async move {
            let bytes = match from {
                Upload::Bytes { payload, scratch } => {
                    let staged =
                        tokio::task::spawn_blocking(move || scratch.stage_bytes(&payload, &blob))
                            .await
                            .map_err(join_err)??;
                    let size = std::fs::metadata(&staged.path).map_or(0, |m| m.len());
                    store.put_blob_file(&key, &staged.path, &blob).await?;
                    let _ = std::fs::remove_file(&staged.path);
                    drop(staged);
                    size
                }
                Upload::Staged { path, hold } => {
                    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                    store.put_blob_file(&key, &path, &blob).await?;
                    let _ = std::fs::remove_file(&path);
                    drop(hold);
                    size
                }
                Upload::File { path } => {
                    store.put_blob_range(&key, &path, 0, &blob).await?;
                    cairn_core::blob::plain_object_len(blob.len)
                }
            };
            Ok(bytes)
        }));
        Ok(())
    }

    /// Stores a blob staged by the caller: discarded if its payload is stored already,
    /// otherwise uploaded from its staged file.
    pub(super) async fn put_staged(
        &mut self,
        mut staged: StagedBlob,
    ) -> Result<BlobRef, CairnError> {
        let b = staged.blob;
        match self.resolve(b.kind, b.address(), b.xxh3).await? {
            Resolved::Stored(blob) => {
                // Another chunk of this job with the same payload staged the same file
                // name and is uploading it (the upload removes it): deleting it here
                // would pull it from under that upload.
                if !self.this_job.contains_key(&staged.blob.name()) {
                    staged.discard()?;
                }
                Ok(blob)
            }
            Resolved::New(blob, key) => {
                staged.rename_for(blob)?;
                let from = Upload::Staged {
                    path: staged.path.clone(),
                    hold: Hold::Staged { _blob: staged },
                };
                self.upload(key, blob, from).await?;
                Ok(blob)
            }
        }
    }

    /// Stores an in-memory payload (a delta).
    pub(super) async fn put_bytes(
        &mut self,
        kind: BlobKind,
        payload: Vec<u8>,
    ) -> Result<BlobRef, CairnError> {
        let mut h = PayloadHasher::new();
        h.update(&payload);
        let (addr, xxh3) = h.finish();
        let (blob, key) = match self.resolve(kind, addr, xxh3).await? {
            Resolved::Stored(blob) => return Ok(blob),
            Resolved::New(blob, key) => (blob, key),
        };
        let from = Upload::Bytes {
            payload,
            scratch: self.scratch.clone(),
        };
        self.upload(key, blob, from).await?;
        Ok(blob)
    }

    /// Stores a sealed segment file of `len` bytes. With compression on, or to a local
    /// store, it is staged in one read (compressed on the way; a local store publishes it
    /// by hard link). Uncompressed, a remote store gets it straight from its file, which
    /// is immutable by contract and re-verified while it streams (docs/decisions/0016,
    /// 0024).
    pub(super) async fn put_segment(
        &mut self,
        path: &Path,
        len: u64,
    ) -> Result<BlobRef, CairnError> {
        let file = Arc::new(File::open(path).map_err(|e| cairn_executor::ExecError::Io {
            op: "open segment",
            path: path.display().to_string(),
            source: e,
        })?);
        let p = path.to_path_buf();
        if self.cp.store.is_local() || self.scratch.compression().is_some() {
            let job = self.scratch.clone();
            let (staged, _) = tokio::task::spawn_blocking(move || {
                job.stage_range(BlobKind::Segment, &file, &p, 0, len, None)
            })
            .await
            .map_err(self.join_err("staging a segment"))??;
            return self.put_staged(staged).await;
        }
        let (addr, xxh3) =
            tokio::task::spawn_blocking(move || cairn_executor::hash_range(&file, &p, 0, len))
                .await
                .map_err(self.join_err("hashing a segment"))??;
        match self.resolve(BlobKind::Segment, addr, xxh3).await? {
            Resolved::Stored(blob) => Ok(blob),
            Resolved::New(blob, key) => {
                let from = Upload::File {
                    path: path.to_path_buf(),
                };
                self.upload(key, blob, from).await?;
                Ok(blob)
            }
        }
    }
}
