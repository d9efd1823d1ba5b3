//! Creating a checkpoint, step by step: [`plan`] (snapshot, plan, persist), [`analyse`]
//! (per chunk: find changed pages, decide delta or rewrite), [`sink`] (dedup, stage,
//! upload), [`pages`] and [`segments`] (the runs over each source shape) and [`publish`]
//! (the manifest, its conditional create and the local batch).
//!
//! Contract: a checkpoint job publishes exactly one new generation of its database or
//! fails having published nothing. Crash: the plan is persisted before any work, and each
//! chunk or segment is recorded after its blob is staged (or found stored), so a job killed
//! at any instant resumes with the same plan and the same blob names; a recorded blob is
//! found by HEAD or uploaded again from its staged file, and only otherwise produced again.
//! The manifest is rebuilt from the plan and the items, byte for byte what an uninterrupted
//! run would publish. Retries: the store retries requests; the runner retries transient
//! failures of the whole attempt. Cancellation: checked before planning, after each
//! analysed chunk, before each new segment and before publishing; a cancelled job
//! publishes nothing, and its uploads in flight are aborted.

mod analyse;
mod pages;
mod plan;
mod publish;
mod segments;
mod sink;

use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_core::{DbId, DirtySet, Generation, SourceKind};
use serde::{Deserialize, Serialize};

use crate::queue::{Item, Job, JobItems, JobSpec, Phase, PlanBody};
use crate::{CairnError, Checkpointer, JobOutcome};

use sink::BlobSink;

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

    fn absolute(&self) -> Result<Self, CairnError> {
        let abs = |p: &Path| {
            std::path::absolute(p).map_err(|e| CairnError::Config {
                what: format!("source {}", p.display()),
                reason: e.to_string(),
            })
        };
        Ok(match self {
            Source::Sqlite(p) => Source::Sqlite(abs(p)?),
            Source::Pages { path, page_size } => Source::Pages {
                path: abs(path)?,
                page_size: *page_size,
            },
            Source::Segments(p) => Source::Segments(abs(p)?),
        })
    }
}

/// Options of one checkpoint.
#[derive(Clone, Debug, Default)]
pub struct CheckpointOptions {
    /// Pages the engine marked dirty since its previous checkpoint (a
    /// [`cairn_core::DirtyTracker`] drain), as file-wide page numbers. Pages outside the set
    /// are trusted to be unchanged and are not read, so every page written since the
    /// previous checkpoint must be marked; only pages past the previous checkpoint's end of
    /// file need none. `None` (or an overflowed set) means the checkpointer finds changed
    /// pages itself by comparing page digests.
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
        let id = self.enqueue_checkpoint(db, source, opts)?;
        match self.run_job(id).await? {
            JobOutcome::Checkpoint(r) => Ok(r),
            _ => Err(CairnError::UnexpectedOutcome {
                job: id.to_string(),
                expected: "checkpoint",
            }),
        }
    }

    /// Persists a checkpoint job (with the engine's dirty pages, if any) without running it.
    pub fn enqueue_checkpoint(
        &self,
        db: &DbId,
        source: &Source,
        opts: &CheckpointOptions,
    ) -> Result<cairn_core::JobId, CairnError> {
        let source = source.absolute()?;
        // The engine's dirty pages apply to a raw page file the engine writes in place; a
        // SQLite source is read from a snapshot taken later, so pages drained earlier would
        // miss writes made in between. They may come unsorted (merged drains).
        let dirty = match source {
            Source::Pages { .. } => opts.dirty.as_ref().filter(|d| !d.overflow).map(|d| {
                let mut pages = d.pages.clone();
                pages.sort_unstable();
                pages.dedup();
                pages
            }),
            Source::Sqlite(_) | Source::Segments(_) => None,
        };
        let spec = JobSpec::Checkpoint {
            db: db.clone(),
            source,
            chunk_size: self.cfg.chunk_size,
        };
        match &dirty {
            Some(pages) => self.enqueue_with(spec, &[Item::Dirty(pages)]),
            None => self.enqueue(spec),
        }
    }

    /// Plans (or reloads the plan of) a checkpoint job, then stages, uploads and publishes
    /// whatever its items do not record as done.
    pub(crate) async fn run_checkpoint(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        source: &Source,
        chunk_size: u64,
    ) -> Result<CheckpointReport, CairnError> {
        let started = Instant::now();
        self.check_store().await?;
        let scratch = self.scratch.job(job.id())?;
        let mut items = job.items()?;
        let kind = source.kind();
        if job.rec().phase == Phase::Published {
            if let Some(plan) = &items.plan {
                // Published before a crash: only the bookkeeping was left.
                return Ok(publish::report(
                    &items,
                    &self.cfg.tenant,
                    db,
                    kind,
                    plan,
                    started,
                ));
            }
        }
        let plan = match items.plan.take() {
            Some(p) if p.still_valid() => p,
            stale => {
                if let Some(p) = &stale {
                    // The page file changed under an interrupted job. If its manifest
                    // reached the store before the interruption, the job is published:
                    // adopt that generation instead of planning another one.
                    if self.adopt_published(job, db, p).await? {
                        return Ok(publish::report(
                            &items,
                            &self.cfg.tenant,
                            db,
                            kind,
                            p,
                            started,
                        ));
                    }
                    // The engine's dirty pages described the file as it was.
                    items = JobItems::default();
                    job.clear_items()?;
                }
                self.plan_checkpoint(job, db, source, chunk_size, &scratch)
                    .await?
            }
        };
        let prev = match plan.parent {
            Some(g) => Some(
                self.state
                    .manifest(&self.cfg.tenant, db, Generation(g))?
                    .ok_or_else(|| CairnError::ParentMissing {
                        job: job.id().to_string(),
                        tenant: self.cfg.tenant.clone(),
                        db: db.clone(),
                        generation: Generation(g),
                    })?,
            ),
            None => None,
        };
        let mut sink = BlobSink::new(self, job.id(), db, &scratch);
        let staged = match &plan.body {
            PlanBody::Pages {
                origin,
                file,
                page_size,
                chunk_size,
                len,
                chunks,
                ..
            } => {
                let shape = pages::PagesShape {
                    origin: *origin,
                    file,
                    page_size: *page_size,
                    chunk_size: *chunk_size,
                    len: *len,
                    chunks,
                };
                pages::PagesRun {
                    sink: &mut sink,
                    job: &mut *job,
                    items: &mut items,
                    shape,
                    generation: plan.generation,
                    prev: prev.as_ref(),
                }
                .run()
                .await?
            }
            PlanBody::Segments {
                dir,
                actions,
                lsn_end,
            } => {
                segments::SegmentsRun {
                    sink: &mut sink,
                    job: &mut *job,
                    items: &mut items,
                }
                .run(dir, actions, *lsn_end)
                .await?
            }
        };
        let uploaded = sink.finish().await?;
        self.check_cancel(job.id())?;
        job.update(|r| r.phase = Phase::Uploaded, &[])?;
        let manifest_bytes = self.publish_plan(job, db, &plan, staged).await?;
        let mut report = publish::report(&items, &self.cfg.tenant, db, kind, &plan, started);
        report.blobs_uploaded = uploaded.blobs_uploaded;
        report.blobs_reused = uploaded.blobs_reused;
        report.manifest_bytes = manifest_bytes;
        report.bytes_uploaded = uploaded.bytes_uploaded + manifest_bytes;
        Ok(report)
    }
}
