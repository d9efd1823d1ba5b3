//! Creating a checkpoint: snapshot → plan → (per chunk) find dirty pages → decide delta or
//! full rewrite → stage → upload → publish → clean up.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cairn_core::delta::{encode_delta, DeltaHeader};
use cairn_core::{
    keys, BlobKind, BlobRef, ChunkState, ContentAddress, DbId, Digest128, DirtySet, Generation,
    Manifest, ManifestBody, PagesState, PayloadHasher, SegmentEntry, SegmentsState, SourceKind,
};
use cairn_executor::{
    list_segments, page_digest, read_pages, scan_chunk, sqlite_snapshot, JobScratch, PageFile,
    StagedBlob,
};
use cairn_manifest::{BlobLookup, ChunkDigests, StateDb};
use cairn_planner::{
    decide_chunk, plan_pages, plan_segments, ChainInfo, ChunkDecision, ChunkInput, ChunkPlan,
    CostModel, PagesInput, SegmentAction, SegmentInput,
};
use cairn_remote_store::RemoteStore;
use futures::stream::{self, FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::{CairnError, Checkpointer};

/// What to checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    report: CheckpointReport,
}

enum Stage {
    Range {
        file: Arc<File>,
        path: PathBuf,
        offset: u64,
    },
    Bytes(Vec<u8>),
}

impl BlobSink<'_> {
    async fn drain_to(&mut self, max: usize) -> Result<(), CairnError> {
        while self.in_flight.len() > max {
            if let Some(done) = self.in_flight.next().await {
                self.report.bytes_uploaded += done.map_err(task_err)??;
                self.report.blobs_uploaded += 1;
            }
        }
        Ok(())
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
                self.report.blobs_reused += 1;
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
            self.report.blobs_reused += 1;
            return Ok(*b);
        }
        self.this_job.insert(name, blob);
        let key = keys::blob_key(tenant, self.db, &blob);
        // An interrupted earlier attempt may have uploaded it already.
        if self.cp.store.head(&key).await? == Some(blob.object_len()) {
            self.report.blobs_reused += 1;
            return Ok(blob);
        }
        self.drain_to(self.cp.cfg.upload_concurrency.saturating_sub(1))
            .await?;
        let job = self.scratch.clone();
        let staged: StagedBlob = tokio::task::spawn_blocking(move || match stage {
            Stage::Range { file, path, offset } => {
                job.stage_range(kind, &file, &path, offset, blob.len, Some(&blob))
            }
            Stage::Bytes(payload) => job.stage_bytes(kind, &payload, blob.alias),
        })
        .await
        .map_err(task_err)??;
        let store: RemoteStore = self.cp.store.clone();
        self.in_flight.push(tokio::spawn(async move {
            store
                .put_blob_file(&key, &staged.path, &staged.blob)
                .await?;
            let size = staged.blob.object_len();
            let _ = std::fs::remove_file(&staged.path);
            drop(staged);
            Ok(size)
        }));
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

    /// [`Checkpointer::checkpoint`] with options (the engine's dirty pages).
    pub async fn checkpoint_with(
        &self,
        db: &DbId,
        source: &Source,
        opts: &CheckpointOptions,
    ) -> Result<CheckpointReport, CairnError> {
        let started = Instant::now();
        let tenant = self.cfg.tenant.clone();
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
        let job = cairn_core::JobId(self.env.next_u64());
        let scratch = self.scratch.job(job)?;
        let result = self
            .checkpoint_in(db, source, prev.as_ref(), &scratch, opts)
            .await;
        // Scratch goes whatever happened; published or not, nothing in it is needed.
        let cleanup = self.scratch.remove_job(job);
        let mut report = result?;
        cleanup?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    async fn checkpoint_in(
        &self,
        db: &DbId,
        source: &Source,
        prev: Option<&Manifest>,
        scratch: &JobScratch,
        opts: &CheckpointOptions,
    ) -> Result<CheckpointReport, CairnError> {
        let tenant = &self.cfg.tenant;
        let generation = prev.map_or(Generation(1), |m| m.generation.next());
        let mut sink = BlobSink {
            cp: self,
            db,
            scratch,
            in_flight: FuturesUnordered::new(),
            this_job: HashMap::new(),
            report: CheckpointReport {
                tenant: tenant.to_string(),
                db: db.to_string(),
                kind: source.kind().as_str(),
                ..Default::default()
            },
        };
        let (body, digests) = match source {
            Source::Sqlite(p) => {
                let (p, dest) = (p.clone(), scratch.dir().join("snapshot.sqlite"));
                let page_file = tokio::task::spawn_blocking(move || sqlite_snapshot(&p, &dest))
                    .await
                    .map_err(task_err)??;
                // A SQLite snapshot is read whole; the engine's marks do not apply to it.
                pages_body(&mut sink, source.kind(), page_file, prev, generation, None).await?
            }
            Source::Pages { path, page_size } => {
                let page_file = PageFile::open(path, *page_size)?;
                let hint = opts.dirty.as_ref().filter(|d| !d.overflow);
                pages_body(&mut sink, source.kind(), page_file, prev, generation, hint).await?
            }
            Source::Segments(dir) => (segments_body(&mut sink, dir, prev).await?, None),
        };
        sink.drain_to(0).await?;
        let manifest = Manifest {
            format: cairn_core::manifest::MANIFEST_VERSION,
            tenant: tenant.clone(),
            db: db.clone(),
            generation,
            parent: prev.map(|m| m.generation),
            writer: self.writer.clone(),
            created_unix_ms: self.env.clock.now_unix_ms(),
            body,
        };
        let (updates, chunks) = match &digests {
            Some((u, n)) => (u.as_slice(), Some(*n)),
            None => (&[][..], None),
        };
        cairn_manifest::publish_with(&self.state, &self.store, &manifest, updates, chunks).await?;
        let mut report = sink.report;
        report.generation = generation.0;
        report.manifest_bytes = manifest.encode().len() as u64;
        report.bytes_uploaded += report.manifest_bytes;
        Ok(report)
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

type DigestUpdates = Option<(Vec<ChunkDigests>, u64)>;

async fn pages_body(
    sink: &mut BlobSink<'_>,
    origin: SourceKind,
    page_file: PageFile,
    prev: Option<&Manifest>,
    generation: Generation,
    hint: Option<&DirtySet>,
) -> Result<(ManifestBody, DigestUpdates), CairnError> {
    let prev_pages = prev.and_then(|m| match &m.body {
        ManifestBody::Pages(p) => Some((m.generation.0, p)),
        ManifestBody::Segments(_) => None,
    });
    let input = PagesInput {
        origin,
        len: page_file.len,
        page_size: page_file.page_size,
        chunk_size: sink.cp.cfg.chunk_size,
    };
    let plan = plan_pages(prev_pages, &input).map_err(|e| CairnError::Plan {
        db: sink.db.clone(),
        source: e,
    })?;
    sink.report.source_bytes = plan.len;
    // Previous chunk states line up with the new ones only if page and chunk sizes agree.
    let aligned: Option<&PagesState> = prev_pages
        .map(|(_, p)| p)
        .filter(|p| p.page_size == plan.page_size && p.chunk_size == plan.chunk_size);
    let pages_per_chunk = plan.chunk_size / u64::from(plan.page_size);
    let file = Arc::new(page_file.file);
    let path = page_file.path.clone();
    let state: &StateDb = &sink.cp.state;
    let (tenant, db) = (sink.cp.cfg.tenant.clone(), sink.db.clone());
    let model = sink.cp.cfg.cost_model;
    let mut contexts = Vec::with_capacity(plan.chunks.len());
    for c in &plan.chunks {
        let prev_chunk = aligned
            .and_then(|p| p.chunks.get(c.index as usize))
            .cloned();
        let stored = match &prev_chunk {
            Some(pc) => state.chunk_digests(&tenant, &db, c.index)?.filter(|d| {
                d.tip == tip(pc)
                    && d.page_size == plan.page_size
                    && d.digests.len() as u64 * u64::from(plan.page_size) == pc.len
            }),
            None => None,
        };
        let hint = hint.map(|h| {
            let first = c.index * pages_per_chunk;
            let lo = h.pages.partition_point(|p| *p < first);
            let hi = h.pages.partition_point(|p| *p < first + pages_per_chunk);
            h.pages[lo..hi]
                .iter()
                .filter_map(|p| u32::try_from(p - first).ok())
                .collect()
        });
        contexts.push(ChunkCtx {
            plan: *c,
            page_size: plan.page_size,
            generation: generation.0,
            prev: prev_chunk,
            stored,
            hint,
            model,
            file: Arc::clone(&file),
            path: path.clone(),
        });
    }
    let mut analyses = stream::iter(contexts)
        .map(|ctx| tokio::task::spawn_blocking(move || analyze(ctx)))
        .buffered(sink.cp.cfg.scan_concurrency);
    let mut chunks = Vec::with_capacity(plan.chunks.len());
    let mut updates = Vec::new();
    let ps = u64::from(plan.page_size);
    for c in &plan.chunks {
        let analysis = analyses
            .next()
            .await
            .ok_or_else(|| CairnError::Task("chunk analysis ended early".into()))?
            .map_err(task_err)??;
        match analysis {
            Analysis::Unchanged(state) => {
                sink.report.chunks_unchanged += 1;
                chunks.push(state);
            }
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
                sink.report.chunks_full += 1;
                sink.report.pages_dirty += dirty;
                updates.push(ChunkDigests {
                    index: c.index,
                    tip: base.name(),
                    page_size: plan.page_size,
                    digests,
                });
                chunks.push(ChunkState {
                    index: c.index,
                    len: c.len,
                    base,
                    deltas: Vec::new(),
                });
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
                sink.report.chunks_delta += 1;
                sink.report.pages_dirty += dirty;
                updates.push(ChunkDigests {
                    index: c.index,
                    tip: delta.name(),
                    page_size: plan.page_size,
                    digests,
                });
                let mut deltas = prev.deltas;
                deltas.push(delta);
                chunks.push(ChunkState {
                    index: c.index,
                    len: c.len,
                    base: prev.base,
                    deltas,
                });
            }
        }
    }
    sink.report.bytes_dirty = sink.report.pages_dirty * ps;
    let n = plan.chunks.len() as u64;
    Ok((
        ManifestBody::Pages(PagesState {
            origin,
            page_size: plan.page_size,
            chunk_size: plan.chunk_size,
            len: plan.len,
            chunks,
        }),
        Some((updates, n)),
    ))
}

async fn segments_body(
    sink: &mut BlobSink<'_>,
    dir: &Path,
    prev: Option<&Manifest>,
) -> Result<ManifestBody, CairnError> {
    let files = list_segments(dir)?;
    let inputs: Vec<SegmentInput> = files
        .iter()
        .map(|f| SegmentInput {
            name: f.name.clone(),
            len: f.len,
        })
        .collect();
    let prev_segs = prev.and_then(|m| match &m.body {
        ManifestBody::Segments(s) => Some(s),
        ManifestBody::Pages(_) => None,
    });
    let plan = plan_segments(prev_segs, &inputs).map_err(|e| CairnError::Plan {
        db: sink.db.clone(),
        source: e,
    })?;
    sink.report.source_bytes = files.iter().map(|f| f.len).sum();
    let mut segments = Vec::with_capacity(plan.actions.len());
    for action in plan.actions {
        match action {
            SegmentAction::Reuse(e) => {
                sink.report.blobs_reused += 1;
                segments.push(e);
            }
            SegmentAction::Upload {
                name,
                lsn_start,
                len,
            } => {
                let path = dir.join(&name);
                let f = Arc::new(
                    File::open(&path).map_err(|e| cairn_executor::ExecError::Io {
                        op: "open segment",
                        path: path.display().to_string(),
                        source: e,
                    })?,
                );
                let (fh, ph) = (Arc::clone(&f), path.clone());
                let (addr, xxh3) = tokio::task::spawn_blocking(move || {
                    cairn_executor::hash_range(&fh, &ph, 0, len)
                })
                .await
                .map_err(task_err)??;
                let stage = Stage::Range {
                    file: f,
                    path: path.clone(),
                    offset: 0,
                };
                let blob = sink.put(BlobKind::Segment, addr, xxh3, stage).await?;
                segments.push(SegmentEntry {
                    name,
                    lsn_start,
                    len,
                    blob,
                });
            }
        }
    }
    Ok(ManifestBody::Segments(SegmentsState {
        segments,
        lsn_end: plan.lsn_end,
    }))
}
