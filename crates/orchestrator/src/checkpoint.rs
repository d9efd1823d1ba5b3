//! Creating a checkpoint: snapshot → plan → stage → upload → publish → clean up.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cairn_core::{
    keys, BlobKind, BlobRef, ChunkState, DbId, Generation, Manifest, ManifestBody, PagesState,
    SegmentEntry, SegmentsState, SourceKind,
};
use cairn_executor::{
    hash_range, list_segments, sqlite_snapshot, JobScratch, PageFile, StagedBlob,
};
use cairn_manifest::BlobLookup;
use cairn_planner::{plan_pages, plan_segments, PagesInput, SegmentAction, SegmentInput};
use cairn_remote_store::RemoteStore;
use futures::stream::{FuturesUnordered, StreamExt};
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
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

type UploadTask = JoinHandle<Result<u64, CairnError>>;

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

impl<'a> BlobSink<'a> {
    async fn drain_to(&mut self, max: usize) -> Result<(), CairnError> {
        while self.in_flight.len() > max {
            if let Some(done) = self.in_flight.next().await {
                self.report.bytes_uploaded +=
                    done.map_err(|e| CairnError::Task(e.to_string()))??;
                self.report.blobs_uploaded += 1;
            }
        }
        Ok(())
    }

    /// Makes sure the payload at `file[offset..offset+len]` is stored as a blob of `kind`.
    async fn put_range(
        &mut self,
        kind: BlobKind,
        file: &Arc<File>,
        path: &Path,
        offset: u64,
        len: u64,
    ) -> Result<BlobRef, CairnError> {
        let (addr, xxh3) = {
            let (file, path) = (Arc::clone(file), path.to_path_buf());
            tokio::task::spawn_blocking(move || hash_range(&file, &path, offset, len))
                .await
                .map_err(|e| CairnError::Task(e.to_string()))??
        };
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
        let staged: StagedBlob = {
            let (file, path) = (Arc::clone(file), path.to_path_buf());
            let job = self.scratch.clone();
            tokio::task::spawn_blocking(move || {
                job.stage_range(kind, &file, &path, offset, len, Some(&blob))
            })
            .await
            .map_err(|e| CairnError::Task(e.to_string()))??
        };
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
            .checkpoint_in(db, source, prev.as_ref(), &scratch)
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
    ) -> Result<CheckpointReport, CairnError> {
        let tenant = &self.cfg.tenant;
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
        let body = match source {
            Source::Sqlite(p) => {
                let (p, dest) = (p.clone(), scratch.dir().join("snapshot.sqlite"));
                let page_file = tokio::task::spawn_blocking(move || sqlite_snapshot(&p, &dest))
                    .await
                    .map_err(|e| CairnError::Task(e.to_string()))??;
                pages_body(&mut sink, source.kind(), page_file, prev).await?
            }
            Source::Pages { path, page_size } => {
                let page_file = PageFile::open(path, *page_size)?;
                pages_body(&mut sink, source.kind(), page_file, prev).await?
            }
            Source::Segments(dir) => segments_body(&mut sink, dir, prev).await?,
        };
        sink.drain_to(0).await?;
        let generation = prev.map_or(Generation(1), |m| m.generation.next());
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
        cairn_manifest::publish(&self.state, &self.store, &manifest).await?;
        let mut report = sink.report;
        report.generation = generation.0;
        report.manifest_bytes = manifest.encode().len() as u64;
        report.bytes_uploaded += report.manifest_bytes;
        Ok(report)
    }
}

async fn pages_body(
    sink: &mut BlobSink<'_>,
    origin: SourceKind,
    page_file: PageFile,
    prev: Option<&Manifest>,
) -> Result<ManifestBody, CairnError> {
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
    let file = Arc::new(page_file.file);
    let mut chunks = Vec::with_capacity(plan.chunks.len());
    for c in &plan.chunks {
        let base = sink
            .put_range(BlobKind::Base, &file, &page_file.path, c.offset, c.len)
            .await?;
        chunks.push(ChunkState {
            index: c.index,
            base,
            deltas: Vec::new(),
        });
    }
    Ok(ManifestBody::Pages(PagesState {
        origin,
        page_size: plan.page_size,
        chunk_size: plan.chunk_size,
        len: plan.len,
        chunks,
    }))
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
                let f = File::open(&path).map_err(|e| cairn_executor::ExecError::Io {
                    op: "open segment",
                    path: path.display().to_string(),
                    source: e,
                })?;
                let blob = sink
                    .put_range(BlobKind::Segment, &Arc::new(f), &path, 0, len)
                    .await?;
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
