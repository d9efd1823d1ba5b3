//! Creating a checkpoint: snapshot → plan → (per chunk) find dirty pages → decide delta or
//! full rewrite → stage → upload → publish → clean up.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use std::collections::BTreeMap;

use cairn_core::delta::{encode_delta, DeltaHeader};
use cairn_core::{
    keys, BlobKind, BlobRef, ChunkState, ContentAddress, DbId, Digest128, DirtySet, Generation,
    Lsn, Manifest, ManifestBody, PagesState, PayloadHasher, SegmentEntry, SegmentsState,
    SourceKind, TenantId,
};
use cairn_executor::{
    list_segments, page_digest, read_pages, scan_chunk, sqlite_snapshot, JobScratch, PageFile,
    StagedBlob,
};
use cairn_manifest::{BlobLookup, ChunkDigests, LocalUpdates, StateDb};
use cairn_planner::{
    decide_chunk, plan_pages, plan_segments, ChainInfo, ChunkDecision, ChunkInput, ChunkPlan,
    CostModel, PagesInput, SegmentAction, SegmentInput,
};
use cairn_remote_store::StoreError;
use futures::stream::{self, FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::jobs::{JobRecord, JobSpec, Phase, Progress};
use crate::{CairnError, Checkpointer, JobOutcome};

/// What to checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A live SQLite database file (snapshotted with the online backup API).
    Sqlite(PathBuf),
    /// A quiescent raw file of fixed-size pages.
    Pages {
        /// The file.
        path: PathBuf,
        /// Its page size.
        page_size: u32,
    },
    /// A directory of sealed segment files, ordered by name.
    Segments(PathBuf),
}

impl Source {
    /// The source kind.
    pub fn kind(&self) -> SourceKind {
        match self {
            Source::Sqlite(_) => SourceKind::Sqlite,
            Source::Pages { .. } => SourceKind::Pages,
            Source::Segments(_) => SourceKind::Segments,
        }
    }
}

/// Options of one checkpoint.
#[derive(Clone, Debug, Default)]
pub struct CheckpointOptions {
    /// Pages the engine marked dirty since its previous checkpoint (a
    /// [`cairn_core::DirtyTracker`] drain), as file-wide page numbers. Pages outside the set
    /// are trusted to be unchanged and are not read, so every page written since the
    /// previous checkpoint must be marked; only pages past the previous checkpoint's end of
    /// file need no mark. `None` (or an overflowed set) means
    /// the checkpointer finds changed pages itself by comparing page digests.
    pub dirty: Option<DirtySet>,
}

/// What a checkpoint did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckpointReport {
    /// Tenant.
    pub tenant: String,
    /// Database.
    pub db: String,
    /// The published generation.
    pub generation: u64,
    /// `sqlite`, `pages` or `segments`.
    pub kind: &'static str,
    /// Logical bytes of the source snapshot.
    pub source_bytes: u64,
    /// Bytes sent to the store: blob objects plus the manifest object.
    pub bytes_uploaded: u64,
    /// Blobs uploaded.
    pub blobs_uploaded: u64,
    /// Blobs referenced without uploading (already stored).
    pub blobs_reused: u64,
    /// Size of the published manifest object.
    pub manifest_bytes: u64,
    /// Chunks written as a new base.
    pub chunks_full: u64,
    /// Chunks that got a delta.
    pub chunks_delta: u64,
    /// Chunks left as they were.
    pub chunks_unchanged: u64,
    /// Pages that changed since the previous generation (all pages of chunks whose
    /// previous state is unknown).
    pub pages_dirty: u64,
    /// Bytes of those pages.
    pub bytes_dirty: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

type UploadTask = JoinHandle<Result<u64, CairnError>>;

fn task_err(e: tokio::task::JoinError) -> CairnError {
    CairnError::Task(e.to_string())
}

/// Decides per blob whether it is already stored, and otherwise stages and uploads it with
/// bounded concurrency.
struct BlobSink<'a> {
    cp: &'a Checkpointer,
    db: &'a DbId,
    scratch: &'a JobScratch,
    in_flight: FuturesUnordered<UploadTask>,
    this_job: HashMap<String, BlobRef>,
    stats: UploadStats,
}

/// What one attempt did with blobs.
#[derive(Default)]
struct UploadStats {
    bytes_uploaded: u64,
    blobs_uploaded: u64,
    blobs_reused: u64,
}

/// Where an upload reads its blob from.
enum Upload {
    /// A staged file, deleted once uploaded; `hold` keeps its scratch reservation till then.
    Staged {
        path: PathBuf,
        hold: Option<StagedBlob>,
    },
    /// Bytes of an immutable source file, framed on the fly.
    Range { path: PathBuf, offset: u64 },
}

enum Stage {
    Range {
        file: Arc<File>,
        path: PathBuf,
        offset: u64,
    },
    Bytes(Vec<u8>),
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

impl BlobSink<'_> {
    async fn drain_to(&mut self, max: usize) -> Result<(), CairnError> {
        while self.in_flight.len() > max {
            if let Some(done) = self.in_flight.next().await {
                self.stats.bytes_uploaded += done.map_err(task_err)??;
                self.stats.blobs_uploaded += 1;
            }
        }
        Ok(())
    }

    /// For a blob recorded by an earlier attempt: true if it is in the store, or was
    /// staged and is now being uploaded; false if neither (it must be produced again).
    async fn ensure_stored(&mut self, blob: &BlobRef) -> Result<bool, CairnError> {
        let key = keys::blob_key(&self.cp.cfg.tenant, self.db, blob);
        if self.cp.store.head(&key).await? == Some(blob.object_len()) {
            self.stats.blobs_reused += 1;
            return Ok(true);
        }
        let staged = self.scratch.dir().join(blob.name());
        if !staged.is_file() {
            return Ok(false);
        }
        self.this_job.insert(blob.name(), *blob);
        self.drain_to(self.cp.cfg.upload_concurrency.saturating_sub(1))
            .await?;
        let from = Upload::Staged {
            path: staged,
            hold: None,
        };
        self.spawn_upload(key, *blob, from);
        Ok(true)
    }

    /// Uploads `blob` in the background (the caller bounds how many are in flight).
    fn spawn_upload(&mut self, key: String, blob: BlobRef, from: Upload) {
        let store = self.cp.store.clone();
        self.in_flight.push(tokio::spawn(async move {
            match from {
                Upload::Staged { path, hold } => {
                    store.put_blob_file(&key, &path, &blob).await?;
                    let _ = std::fs::remove_file(&path);
                    drop(hold);
                }
                Upload::Range { path, offset } => {
                    store.put_blob_range(&key, &path, offset, &blob).await?
                }
            }
            Ok(blob.object_len())
        }));
    }

    /// Makes sure a payload with this content address is stored as a blob of `kind`:
    /// reused if the catalog, this job or the store already has it, else staged from
    /// `stage` and uploaded in the background.
    async fn put(
        &mut self,
        kind: BlobKind,
        addr: ContentAddress,
        xxh3: Digest128,
        stage: Stage,
    ) -> Result<BlobRef, CairnError> {
        let tenant = &self.cp.cfg.tenant;
        let alias = match self
            .cp
            .state
            .find_blob(tenant, self.db, kind, addr.crc64, addr.len, xxh3)?
        {
            BlobLookup::Found(b) => {
                self.stats.blobs_reused += 1;
                return Ok(b);
            }
            BlobLookup::New { alias } => alias,
        };
        let blob = BlobRef {
            kind,
            crc64: addr.crc64,
            len: addr.len,
            xxh3,
            alias,
        };
        let name = blob.name();
        if let Some(b) = self.this_job.get(&name) {
            self.stats.blobs_reused += 1;
            return Ok(*b);
        }
        self.this_job.insert(name, blob);
        let key = keys::blob_key(tenant, self.db, &blob);
        // An interrupted earlier attempt may have uploaded it already.
        if self.cp.store.head(&key).await? == Some(blob.object_len()) {
            self.stats.blobs_reused += 1;
            return Ok(blob);
        }
        self.drain_to(self.cp.cfg.upload_concurrency.saturating_sub(1))
            .await?;
        if let (BlobKind::Segment, Stage::Range { path, offset, .. }, false) =
            (kind, &stage, self.cp.store.is_local())
        {
            // A sealed segment is immutable, so the file itself is as stable as a staged
            // copy: stream it straight to a remote store (verified while it streams; an
            // interrupted upload is redone from the file). See docs/decisions/0016.
            let from = Upload::Range {
                path: path.clone(),
                offset: *offset,
            };
            self.spawn_upload(key, blob, from);
            return Ok(blob);
        }
        let job = self.scratch.clone();
        let staged: StagedBlob = tokio::task::spawn_blocking(move || match stage {
            Stage::Range { file, path, offset } => {
                job.stage_range(kind, &file, &path, offset, blob.len, Some(&blob))
            }
            Stage::Bytes(payload) => job.stage_bytes(kind, &payload, blob.alias),
        })
        .await
        .map_err(task_err)??;
        let from = Upload::Staged {
            path: staged.path.clone(),
            hold: Some(staged),
        };
        self.spawn_upload(key, blob, from);
        Ok(blob)
    }
}

impl Checkpointer {
    /// Checkpoints `source` as the next generation of `db` and publishes it.
    pub async fn checkpoint(
        &self,
        db: &DbId,
        source: &Source,
    ) -> Result<CheckpointReport, CairnError> {
        self.checkpoint_with(db, source, &CheckpointOptions::default())
            .await
    }

    /// [`Checkpointer::checkpoint`] with options (the engine's dirty pages). Runs as a
    /// job: unfinished jobs are resumed first, and this one survives a crash.
    pub async fn checkpoint_with(
        &self,
        db: &DbId,
        source: &Source,
        opts: &CheckpointOptions,
    ) -> Result<CheckpointReport, CairnError> {
        self.ensure_resumed().await?;
        let source = match source {
            Source::Sqlite(p) => Source::Sqlite(absolute(p)?),
            Source::Pages { path, page_size } => Source::Pages {
                path: absolute(path)?,
                page_size: *page_size,
            },
            Source::Segments(p) => Source::Segments(absolute(p)?),
        };
        // Engine marks apply to a raw page file the engine writes in place; a SQLite source
        // is read from a snapshot taken later, so marks drained earlier would miss writes
        // made in between. Marks may come unsorted (merged drains).
        let dirty = match source {
            Source::Pages { .. } => opts.dirty.as_ref().filter(|d| !d.overflow).map(|d| {
                let mut pages = d.pages.clone();
                pages.sort_unstable();
                pages.dedup();
                pages
            }),
            Source::Sqlite(_) | Source::Segments(_) => None,
        };
        let id = self.enqueue(JobSpec::Checkpoint {
            db: db.clone(),
            source,
            chunk_size: self.cfg.chunk_size,
            dirty,
        })?;
        match self.run_job(id).await? {
            JobOutcome::Checkpoint(r) => Ok(r),
            other => Err(CairnError::Task(format!(
                "checkpoint job returned {other:?}"
            ))),
        }
    }

    /// Plans (or reloads the plan of) a checkpoint job, then stages, uploads and publishes
    /// whatever its items do not record as done.
    pub(crate) async fn run_checkpoint(
        &self,
        rec: &mut JobRecord,
    ) -> Result<CheckpointReport, CairnError> {
        let started = Instant::now();
        let JobSpec::Checkpoint {
            db,
            source,
            chunk_size,
            dirty,
        } = rec.spec.clone()
        else {
            return Err(CairnError::Task("not a checkpoint job".into()));
        };
        let tenant = self.cfg.tenant.clone();
        let job = rec.id;
        self.check_store().await?;
        let scratch = self.scratch.job(job)?;
        let mut items = JobItems::load(&self.state, job)?;
        if rec.phase == Phase::Published {
            if let Some(plan) = &items.plan {
                // Published before a crash: only the bookkeeping was left.
                return Ok(items.report(&tenant, &db, source.kind(), plan, started));
            }
        }
        let mut dirty = dirty;
        let plan = match items.plan.take() {
            Some(p) if p.still_valid() => p,
            stale => {
                if stale.is_some() {
                    // The marks described the file as it was; it changed since.
                    dirty = None;
                }
                if let Some(p) = &stale {
                    // The page file changed under an interrupted job. If its manifest
                    // reached the store before the interruption, the job is published:
                    // adopt that generation instead of planning another one.
                    if self.adopt_published(rec, &db, p).await? {
                        return Ok(items.report(&tenant, &db, source.kind(), p, started));
                    }
                }
                if !items.is_empty() {
                    self.state.delete_job(job.0, false)?;
                    items = JobItems::default();
                }
                self.plan_checkpoint(rec, &db, &source, chunk_size, &scratch)
                    .await?
            }
        };
        let prev = match plan.parent {
            Some(g) => Some(
                self.state
                    .manifest(&tenant, &db, Generation(g))?
                    .ok_or_else(|| {
                        CairnError::Task(format!(
                            "job {job}: parent generation {g} of {tenant}/{db} is not recorded"
                        ))
                    })?,
            ),
            None => None,
        };
        let mut sink = BlobSink {
            cp: self,
            db: &db,
            scratch: &scratch,
            in_flight: FuturesUnordered::new(),
            this_job: HashMap::new(),
            stats: UploadStats::default(),
        };
        let (body, local_digests, chunks) = match &plan.body {
            PlanBody::Pages {
                origin,
                file,
                page_size,
                chunk_size,
                len,
                chunks,
                ..
            } => {
                let page_file = PageFile::open(file, *page_size)?;
                if page_file.len != *len {
                    return Err(CairnError::Exec(cairn_executor::ExecError::SourceChanged {
                        path: file.display().to_string(),
                        detail: format!("length {} differs from the planned {len}", page_file.len),
                    }));
                }
                let shape = PagesShape {
                    origin: *origin,
                    page_size: *page_size,
                    chunk_size: *chunk_size,
                    len: *len,
                    chunks,
                };
                let hint = dirty.as_deref();
                let (body, digests) = pages_run(
                    &mut sink,
                    rec,
                    &mut items,
                    &shape,
                    page_file,
                    prev.as_ref(),
                    plan.generation,
                    hint,
                )
                .await?;
                (body, digests, Some(chunks.len() as u64))
            }
            PlanBody::Segments {
                dir,
                actions,
                lsn_end,
            } => {
                let body = segments_run(&mut sink, rec, &mut items, dir, actions, *lsn_end).await?;
                (body, Vec::new(), None)
            }
        };
        sink.drain_to(0).await?;
        let uploaded = std::mem::take(&mut sink.stats);
        drop(sink);
        self.check_cancel(job)?;
        rec.phase = Phase::Uploaded;
        self.save_job(rec, &[])?;
        let manifest = Manifest {
            format: cairn_core::manifest::MANIFEST_VERSION,
            tenant: tenant.clone(),
            db: db.clone(),
            generation: Generation(plan.generation),
            parent: plan.parent.map(Generation),
            writer: self.writer.clone(),
            created_unix_ms: plan.created_unix_ms,
            job: Some(job.to_string()),
            body,
        };
        rec.phase = Phase::Published;
        rec.updated_ms = self.env.clock.now_unix_ms();
        let record = rec.encode()?;
        let local = LocalUpdates {
            digests: &local_digests,
            chunks,
            job: Some((job.0, &record)),
        };
        let manifest_bytes =
            cairn_manifest::publish_with(&self.state, &self.store, &manifest, &local).await?;
        let mut report = items.report(&tenant, &db, source.kind(), &plan, started);
        report.blobs_uploaded = uploaded.blobs_uploaded;
        report.blobs_reused = uploaded.blobs_reused;
        report.manifest_bytes = manifest_bytes;
        report.bytes_uploaded = uploaded.bytes_uploaded + manifest_bytes;
        Ok(report)
    }

    /// Whether the store holds this job's manifest for the planned generation; if so it is
    /// imported and the job recorded as published.
    async fn adopt_published(
        &self,
        rec: &mut JobRecord,
        db: &DbId,
        plan: &CkptPlan,
    ) -> Result<bool, CairnError> {
        let key = keys::manifest_key(&self.cfg.tenant, db, Generation(plan.generation));
        let bytes = match self
            .store
            .get_bytes_verified(&key, |b| Manifest::decode(&key, b).map(|_| ()))
            .await
        {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let m = Manifest::decode(&key, &bytes)?;
        if m.job.as_deref() != Some(rec.id.to_string().as_str()) {
            return Ok(false);
        }
        cairn_manifest::sync_from_remote(&self.state, &self.store, &self.cfg.tenant, db).await?;
        rec.phase = Phase::Published;
        self.save_job(rec, &[])?;
        Ok(true)
    }

    /// Takes the snapshot (SQLite), plans, and persists the plan: the first durable step.
    async fn plan_checkpoint(
        &self,
        rec: &mut JobRecord,
        db: &DbId,
        source: &Source,
        chunk_size: u64,
        scratch: &JobScratch,
    ) -> Result<CkptPlan, CairnError> {
        let tenant = self.cfg.tenant.clone();
        self.check_cancel(rec.id)?;
        let gens = self.generations(db).await?;
        let prev = match gens.last() {
            Some(g) => self.state.manifest(&tenant, db, *g)?,
            None => None,
        };
        if let Some(p) = &prev {
            let recorded = p.kind();
            if recorded != source.kind() {
                return Err(CairnError::KindMismatch {
                    tenant,
                    db: db.clone(),
                    recorded: recorded.as_str(),
                    given: source.kind().as_str(),
                });
            }
        }
        let generation = prev.as_ref().map_or(Generation(1), |m| m.generation.next());
        let plan_err = |e| CairnError::Plan {
            db: db.clone(),
            source: e,
        };
        let (body, units, bytes) = match source {
            Source::Sqlite(_) | Source::Pages { .. } => {
                let page_file = match source {
                    Source::Sqlite(p) => {
                        let (p, dest) = (p.clone(), scratch.dir().join("snapshot.sqlite"));
                        tokio::task::spawn_blocking(move || sqlite_snapshot(&p, &dest))
                            .await
                            .map_err(task_err)??
                    }
                    Source::Pages { path, page_size } => PageFile::open(path, *page_size)?,
                    Source::Segments(p) => {
                        return Err(CairnError::Task(format!(
                            "segment source {} on the page path",
                            p.display()
                        )))
                    }
                };
                let prev_pages = prev.as_ref().and_then(|m| match &m.body {
                    ManifestBody::Pages(p) => Some((m.generation.0, p)),
                    ManifestBody::Segments(_) => None,
                });
                let input = PagesInput {
                    origin: source.kind(),
                    len: page_file.len,
                    page_size: page_file.page_size,
                    chunk_size,
                };
                let plan = plan_pages(prev_pages, &input).map_err(plan_err)?;
                let units = plan.chunks.len() as u64;
                let body = PlanBody::Pages {
                    origin: source.kind(),
                    file: page_file.path.clone(),
                    page_size: plan.page_size,
                    chunk_size: plan.chunk_size,
                    len: plan.len,
                    stamp: file_stamp(&page_file.path),
                    chunks: plan.chunks,
                };
                (body, units, plan.len)
            }
            Source::Segments(dir) => {
                let files = list_segments(dir)?;
                let inputs: Vec<SegmentInput> = files
                    .iter()
                    .map(|f| SegmentInput {
                        name: f.name.clone(),
                        len: f.len,
                    })
                    .collect();
                let prev_segs = prev.as_ref().and_then(|m| match &m.body {
                    ManifestBody::Segments(s) => Some(s),
                    ManifestBody::Pages(_) => None,
                });
                let plan = plan_segments(prev_segs, &inputs).map_err(plan_err)?;
                let bytes = files.iter().map(|f| f.len).sum();
                let units = plan.actions.len() as u64;
                let body = PlanBody::Segments {
                    dir: dir.clone(),
                    actions: plan.actions,
                    lsn_end: plan.lsn_end,
                };
                (body, units, bytes)
            }
        };
        let plan = CkptPlan {
            generation: generation.0,
            parent: prev.as_ref().map(|m| m.generation.0),
            created_unix_ms: self.env.clock.now_unix_ms(),
            body,
        };
        let encoded =
            serde_json::to_vec(&plan).map_err(|e| CairnError::Task(format!("encode plan: {e}")))?;
        rec.phase = Phase::Planned;
        rec.generation = Some(generation.0);
        rec.progress = Progress {
            done: 0,
            total: units,
            bytes_done: 0,
            bytes_total: bytes,
        };
        self.save_job(rec, &[(b"plan", Some(&encoded))])?;
        Ok(plan)
    }
}

fn absolute(p: &Path) -> Result<PathBuf, CairnError> {
    std::path::absolute(p).map_err(|e| CairnError::Config {
        what: format!("source {}", p.display()),
        reason: e.to_string(),
    })
}

fn file_stamp(path: &Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
}

/// A checkpoint's persisted plan.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CkptPlan {
    generation: u64,
    parent: Option<u64>,
    created_unix_ms: u64,
    body: PlanBody,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "snake_case")]
enum PlanBody {
    Pages {
        origin: SourceKind,
        /// The file read: the source itself, or the SQLite snapshot in scratch.
        file: PathBuf,
        page_size: u32,
        chunk_size: u64,
        len: u64,
        /// Inode and modification time of the file when planned: a file changed in place
        /// since (not quiescent after all) makes the plan stale instead of mixing contents.
        #[serde(default)]
        stamp: Option<(u64, i64, i64)>,
        chunks: Vec<ChunkPlan>,
    },
    Segments {
        dir: PathBuf,
        actions: Vec<SegmentAction>,
        lsn_end: Lsn,
    },
}

impl CkptPlan {
    /// Whether the plan can still be executed (its page file is there with its length).
    fn still_valid(&self) -> bool {
        match &self.body {
            PlanBody::Pages {
                file, len, stamp, ..
            } => {
                std::fs::metadata(file)
                    .map(|m| m.len() == *len)
                    .unwrap_or(false)
                    && (stamp.is_none() || file_stamp(file) == *stamp)
            }
            PlanBody::Segments { dir, .. } => dir.is_dir(),
        }
    }
}

/// How one chunk was checkpointed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Full,
    Delta,
    Unchanged,
}

/// A chunk done (staged or known to be stored), as recorded in the job.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChunkItem {
    state: ChunkState,
    new_blob: Option<BlobRef>,
    outcome: Outcome,
    dirty: u64,
}

/// A new segment done (staged or known to be stored).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SegItem {
    entry: SegmentEntry,
}

/// The items of a checkpoint job.
#[derive(Default)]
struct JobItems {
    plan: Option<CkptPlan>,
    chunks: BTreeMap<u64, ChunkItem>,
    digests: BTreeMap<u64, Vec<u128>>,
    segments: BTreeMap<u64, SegItem>,
}

fn item_key(tag: u8, index: u64) -> Vec<u8> {
    let mut k = vec![tag];
    k.extend_from_slice(&index.to_be_bytes());
    k
}

impl JobItems {
    fn load(state: &StateDb, job: cairn_core::JobId) -> Result<Self, CairnError> {
        let mut out = Self::default();
        let bad =
            |what: &str, e: String| CairnError::Task(format!("job {job}: unreadable {what}: {e}"));
        for (k, v) in state.job_items(job.0)? {
            let index = k
                .get(1..9)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes);
            match (k.first(), index) {
                (Some(b'p'), _) if k == b"plan" => {
                    out.plan =
                        Some(serde_json::from_slice(&v).map_err(|e| bad("plan", e.to_string()))?);
                }
                (Some(b'c'), Some(i)) => {
                    out.chunks.insert(
                        i,
                        serde_json::from_slice(&v).map_err(|e| bad("chunk", e.to_string()))?,
                    );
                }
                (Some(b'd'), Some(i)) => {
                    let d = cairn_core::address::digests_from_bytes(&v)
                        .ok_or_else(|| bad("digests", format!("{} bytes", v.len())))?;
                    out.digests.insert(i, d);
                }
                (Some(b's'), Some(i)) => {
                    out.segments.insert(
                        i,
                        serde_json::from_slice(&v).map_err(|e| bad("segment", e.to_string()))?,
                    );
                }
                _ => {}
            }
        }
        Ok(out)
    }

    fn is_empty(&self) -> bool {
        self.plan.is_none()
            && self.chunks.is_empty()
            && self.segments.is_empty()
            && self.digests.is_empty()
    }

    /// The report of everything recorded, whichever attempt did it.
    fn report(
        &self,
        tenant: &TenantId,
        db: &DbId,
        kind: SourceKind,
        plan: &CkptPlan,
        started: Instant,
    ) -> CheckpointReport {
        let mut r = CheckpointReport {
            tenant: tenant.to_string(),
            db: db.to_string(),
            generation: plan.generation,
            kind: kind.as_str(),
            duration_ms: started.elapsed().as_millis() as u64,
            ..Default::default()
        };
        match &plan.body {
            PlanBody::Pages { len, page_size, .. } => {
                r.source_bytes = *len;
                for c in self.chunks.values() {
                    match c.outcome {
                        Outcome::Full => r.chunks_full += 1,
                        Outcome::Delta => r.chunks_delta += 1,
                        Outcome::Unchanged => r.chunks_unchanged += 1,
                    }
                    r.pages_dirty += c.dirty;
                }
                r.bytes_dirty = r.pages_dirty * u64::from(*page_size);
            }
            PlanBody::Segments { actions, .. } => {
                r.source_bytes = actions
                    .iter()
                    .map(|a| match a {
                        SegmentAction::Reuse(e) => e.len,
                        SegmentAction::Upload { len, .. } => *len,
                    })
                    .sum();
            }
        }
        r
    }
}

/// Everything needed to analyse one chunk off the async runtime.
struct ChunkCtx {
    plan: ChunkPlan,
    page_size: u32,
    generation: u64,
    prev: Option<ChunkState>,
    stored: Option<ChunkDigests>,
    hint: Option<Vec<u32>>,
    model: CostModel,
    file: Arc<File>,
    path: PathBuf,
}

/// The outcome of analysing one chunk.
enum Analysis {
    Unchanged(ChunkState),
    Full {
        addr: ContentAddress,
        xxh3: Digest128,
        digests: Vec<u128>,
        dirty: u64,
    },
    Delta {
        prev: ChunkState,
        payload: Vec<u8>,
        digests: Vec<u128>,
        dirty: u64,
    },
}

/// Pages of a chunk that changed, the chunk's new page digests and, if they were read
/// already, the changed pages' bytes.
struct Dirty {
    pages: Vec<u32>,
    digests: Vec<u128>,
    bytes: Option<Vec<u8>>,
}

fn tip(c: &ChunkState) -> String {
    c.deltas.last().unwrap_or(&c.base).name()
}

fn analyze(ctx: ChunkCtx) -> Result<Analysis, CairnError> {
    let ps = u64::from(ctx.page_size);
    let plan = ctx.plan;
    let pages_now = usize::try_from(plan.len / ps).unwrap_or(usize::MAX);
    // Dirty pages within the chunk, with new digests for the whole chunk and, when the
    // dirty pages were read already, their bytes.
    let mut known: Option<Dirty> = None;
    if let (Some(prev), Some(stored)) = (&ctx.prev, &ctx.stored) {
        let prev_pages = usize::try_from(prev.len / ps).unwrap_or(usize::MAX);
        match &ctx.hint {
            Some(hint) => {
                let mut dirty: Vec<u32> = hint
                    .iter()
                    .copied()
                    .filter(|p| (*p as usize) < pages_now)
                    .collect();
                dirty.extend((prev_pages..pages_now).filter_map(|p| u32::try_from(p).ok()));
                dirty.sort_unstable();
                dirty.dedup();
                let bytes = read_pages(&ctx.file, &ctx.path, plan.offset, ctx.page_size, &dirty)?;
                let mut digests = stored.digests.clone();
                digests.resize(pages_now, 0);
                for (i, p) in dirty.iter().enumerate() {
                    digests[*p as usize] =
                        page_digest(&bytes[i * ps as usize..(i + 1) * ps as usize]);
                }
                known = Some(Dirty {
                    pages: dirty,
                    digests,
                    bytes: Some(bytes),
                });
            }
            None => {
                let scan = scan_chunk(
                    &ctx.file,
                    &ctx.path,
                    plan.offset,
                    plan.len,
                    ctx.page_size,
                    false,
                )?;
                let dirty: Vec<u32> = scan
                    .digests
                    .iter()
                    .enumerate()
                    .filter(|(i, d)| stored.digests.get(*i) != Some(d))
                    .filter_map(|(i, _)| u32::try_from(i).ok())
                    .collect();
                known = Some(Dirty {
                    pages: dirty,
                    digests: scan.digests,
                    bytes: None,
                });
            }
        }
    }
    let chain = ctx.prev.as_ref().map(|p| ChainInfo {
        depth: p.deltas.len(),
        base_len: p.base.len,
        delta_bytes: p.deltas.iter().map(|d| d.len).sum(),
        chunk_len: p.len,
    });
    let input = ChunkInput {
        chunk_len: plan.len,
        page_size: ctx.page_size,
        prev: chain.filter(|_| known.is_some()),
        dirty_pages: known.as_ref().map(|k| k.pages.len() as u64),
    };
    let decision = decide_chunk(&input, &ctx.model);
    match (decision, known, ctx.prev) {
        (ChunkDecision::Unchanged, Some(_), Some(prev)) => Ok(Analysis::Unchanged(prev)),
        (
            ChunkDecision::Delta,
            Some(Dirty {
                pages: dirty,
                digests,
                bytes,
            }),
            Some(prev),
        ) => {
            let bytes = match bytes {
                Some(b) => b,
                None => read_pages(&ctx.file, &ctx.path, plan.offset, ctx.page_size, &dirty)?,
            };
            let header = DeltaHeader {
                page_size: ctx.page_size,
                chunk: plan.index,
                generation: ctx.generation,
                base_crc64: prev.base.crc64,
                chunk_len: plan.len,
            };
            let payload = encode_delta(&header, &dirty, &bytes)?;
            Ok(Analysis::Delta {
                prev,
                payload,
                digests,
                dirty: dirty.len() as u64,
            })
        }
        (_, known, _) => {
            let scan = scan_chunk(
                &ctx.file,
                &ctx.path,
                plan.offset,
                plan.len,
                ctx.page_size,
                true,
            )?;
            let (addr, xxh3) = scan
                .whole
                .ok_or_else(|| CairnError::Task("chunk scan lost its hash".into()))?;
            let dirty = known.map_or(pages_now as u64, |k| k.pages.len() as u64);
            Ok(Analysis::Full {
                addr,
                xxh3,
                digests: scan.digests,
                dirty,
            })
        }
    }
}

/// The page-source part of a plan.
struct PagesShape<'a> {
    origin: SourceKind,
    page_size: u32,
    chunk_size: u64,
    len: u64,
    chunks: &'a [ChunkPlan],
}

/// Stages and uploads every chunk the job has not recorded, recording each as it is
/// staged; returns the manifest body and the page digests to commit with it.
#[allow(clippy::too_many_arguments)]
async fn pages_run(
    sink: &mut BlobSink<'_>,
    rec: &mut JobRecord,
    items: &mut JobItems,
    shape: &PagesShape<'_>,
    page_file: PageFile,
    prev: Option<&Manifest>,
    generation: u64,
    hint: Option<&[u64]>,
) -> Result<(ManifestBody, Vec<ChunkDigests>), CairnError> {
    let cp = sink.cp;
    let job = rec.id;
    // Chunks recorded by an earlier attempt: their blobs must be in the store (uploaded
    // then, or staged and uploaded now); otherwise they are analysed again.
    let recorded: Vec<(u64, Option<BlobRef>)> =
        items.chunks.iter().map(|(i, c)| (*i, c.new_blob)).collect();
    for (index, blob) in recorded {
        if let Some(b) = blob {
            if !sink.ensure_stored(&b).await? {
                items.chunks.remove(&index);
                items.digests.remove(&index);
                let (ck, dk) = (item_key(b'c', index), item_key(b'd', index));
                cp.save_job(rec, &[(&ck, None), (&dk, None)])?;
            }
        }
    }
    let prev_pages = prev.and_then(|m| match &m.body {
        ManifestBody::Pages(p) => Some(p),
        ManifestBody::Segments(_) => None,
    });
    // Previous chunk states line up with the new ones only if page and chunk sizes agree.
    let aligned: Option<&PagesState> =
        prev_pages.filter(|p| p.page_size == shape.page_size && p.chunk_size == shape.chunk_size);
    let pages_per_chunk = shape.chunk_size / u64::from(shape.page_size);
    let file = Arc::new(page_file.file);
    let path = page_file.path.clone();
    let (tenant, db) = (cp.cfg.tenant.clone(), sink.db.clone());
    let mut contexts = Vec::new();
    for c in shape
        .chunks
        .iter()
        .filter(|c| !items.chunks.contains_key(&c.index))
    {
        let prev_chunk = aligned
            .and_then(|p| p.chunks.get(c.index as usize))
            .cloned();
        let stored = match &prev_chunk {
            Some(pc) => cp.state.chunk_digests(&tenant, &db, c.index)?.filter(|d| {
                d.tip == tip(pc)
                    && d.page_size == shape.page_size
                    && d.digests.len() as u64 * u64::from(shape.page_size) == pc.len
            }),
            None => None,
        };
        let hint = hint.map(|h| {
            let first = c.index * pages_per_chunk;
            let lo = h.partition_point(|p| *p < first);
            let hi = h.partition_point(|p| *p < first + pages_per_chunk);
            h[lo..hi]
                .iter()
                .filter_map(|p| u32::try_from(p - first).ok())
                .collect()
        });
        contexts.push(ChunkCtx {
            plan: *c,
            page_size: shape.page_size,
            generation,
            prev: prev_chunk,
            stored,
            hint,
            model: cp.cfg.cost_model,
            file: Arc::clone(&file),
            path: path.clone(),
        });
    }
    let mut analyses = stream::iter(contexts)
        .map(|ctx| {
            let plan = ctx.plan;
            async move {
                let a = tokio::task::spawn_blocking(move || analyze(ctx))
                    .await
                    .map_err(task_err)??;
                Ok::<_, CairnError>((plan, a))
            }
        })
        .buffered(cp.cfg.scan_concurrency);
    while let Some(next) = analyses.next().await {
        let (c, analysis) = next?;
        cp.check_cancel(job)?;
        let (item, digests) = match analysis {
            Analysis::Unchanged(state) => (
                ChunkItem {
                    state,
                    new_blob: None,
                    outcome: Outcome::Unchanged,
                    dirty: 0,
                },
                None,
            ),
            Analysis::Full {
                addr,
                xxh3,
                digests,
                dirty,
            } => {
                let stage = Stage::Range {
                    file: Arc::clone(&file),
                    path: path.clone(),
                    offset: c.offset,
                };
                let base = sink.put(BlobKind::Base, addr, xxh3, stage).await?;
                let state = ChunkState {
                    index: c.index,
                    len: c.len,
                    base,
                    deltas: Vec::new(),
                };
                (
                    ChunkItem {
                        state,
                        new_blob: Some(base),
                        outcome: Outcome::Full,
                        dirty,
                    },
                    Some(digests),
                )
            }
            Analysis::Delta {
                prev,
                payload,
                digests,
                dirty,
            } => {
                let mut h = PayloadHasher::new();
                h.update(&payload);
                let (addr, xxh3) = h.finish();
                let delta = sink
                    .put(BlobKind::Delta, addr, xxh3, Stage::Bytes(payload))
                    .await?;
                let mut deltas = prev.deltas;
                deltas.push(delta);
                let state = ChunkState {
                    index: c.index,
                    len: c.len,
                    base: prev.base,
                    deltas,
                };
                (
                    ChunkItem {
                        state,
                        new_blob: Some(delta),
                        outcome: Outcome::Delta,
                        dirty,
                    },
                    Some(digests),
                )
            }
        };
        let encoded = serde_json::to_vec(&item)
            .map_err(|e| CairnError::Task(format!("encode chunk item: {e}")))?;
        let ck = item_key(b'c', c.index);
        rec.progress.done += 1;
        rec.progress.bytes_done += c.len;
        match &digests {
            Some(d) => {
                let dk = item_key(b'd', c.index);
                let dv = cairn_core::address::digests_to_bytes(d);
                cp.save_job(rec, &[(&ck, Some(&encoded)), (&dk, Some(&dv))])?;
            }
            None => cp.save_job(rec, &[(&ck, Some(&encoded))])?,
        }
        items.chunks.insert(c.index, item);
        if let Some(d) = digests {
            items.digests.insert(c.index, d);
        }
    }
    rec.phase = Phase::Staged;
    cp.save_job(rec, &[])?;
    let mut chunks = Vec::with_capacity(shape.chunks.len());
    let mut updates = Vec::new();
    for c in shape.chunks {
        let item = items.chunks.get(&c.index).ok_or_else(|| {
            CairnError::Task(format!("job {job}: chunk {} was never recorded", c.index))
        })?;
        if item.outcome != Outcome::Unchanged {
            if let Some(d) = items.digests.get(&c.index) {
                updates.push(ChunkDigests {
                    index: c.index,
                    tip: tip(&item.state),
                    page_size: shape.page_size,
                    digests: d.clone(),
                });
            }
        }
        chunks.push(item.state.clone());
    }
    let body = ManifestBody::Pages(PagesState {
        origin: shape.origin,
        page_size: shape.page_size,
        chunk_size: shape.chunk_size,
        len: shape.len,
        chunks,
    });
    Ok((body, updates))
}

/// Stages and uploads every new segment the job has not recorded.
async fn segments_run(
    sink: &mut BlobSink<'_>,
    rec: &mut JobRecord,
    items: &mut JobItems,
    dir: &Path,
    actions: &[SegmentAction],
    lsn_end: Lsn,
) -> Result<ManifestBody, CairnError> {
    let cp = sink.cp;
    let job = rec.id;
    let mut segments = Vec::with_capacity(actions.len());
    for (i, action) in actions.iter().enumerate() {
        let i = i as u64;
        match action {
            SegmentAction::Reuse(e) => {
                sink.stats.blobs_reused += 1;
                segments.push(e.clone());
            }
            SegmentAction::Upload {
                name,
                lsn_start,
                len,
            } => {
                if let Some(item) = items.segments.get(&i) {
                    if sink.ensure_stored(&item.entry.blob).await? {
                        segments.push(item.entry.clone());
                        continue;
                    }
                }
                cp.check_cancel(job)?;
                let path = dir.join(name);
                let f = Arc::new(
                    File::open(&path).map_err(|e| cairn_executor::ExecError::Io {
                        op: "open segment",
                        path: path.display().to_string(),
                        source: e,
                    })?,
                );
                let (fh, ph, n) = (Arc::clone(&f), path.clone(), *len);
                let (addr, xxh3) =
                    tokio::task::spawn_blocking(move || cairn_executor::hash_range(&fh, &ph, 0, n))
                        .await
                        .map_err(task_err)??;
                let stage = Stage::Range {
                    file: f,
                    path: path.clone(),
                    offset: 0,
                };
                let blob = sink.put(BlobKind::Segment, addr, xxh3, stage).await?;
                let entry = SegmentEntry {
                    name: name.clone(),
                    lsn_start: *lsn_start,
                    len: *len,
                    blob,
                };
                let item = SegItem {
                    entry: entry.clone(),
                };
                let encoded = serde_json::to_vec(&item)
                    .map_err(|e| CairnError::Task(format!("encode segment item: {e}")))?;
                rec.progress.done += 1;
                rec.progress.bytes_done += len;
                cp.save_job(rec, &[(&item_key(b's', i), Some(&encoded))])?;
                items.segments.insert(i, item);
                segments.push(entry);
            }
        }
    }
    rec.phase = Phase::Staged;
    cp.save_job(rec, &[])?;
    Ok(ManifestBody::Segments(SegmentsState { segments, lsn_end }))
}
