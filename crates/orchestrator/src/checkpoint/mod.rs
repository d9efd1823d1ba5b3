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

pub use plan::FileStamp;
mod publish;
mod segments;
mod sink;

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use cairn_core::{DbId, DirtySet, DirtyTracker, Generation, JobId, Lsn, SourceKind};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::queue::{CancelHandle, Item, Job, JobEvent, JobItems, JobSpec, Phase, PlanBody};
use crate::{CairnError, Checkpointer, JobOutcome};

use sink::BlobSink;

/// What to checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A live SQLite database file (read in place under a read transaction).
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
    /// previous checkpoint must be marked, by whichever process wrote it (an engine that
    /// cannot say so after a restart passes `tracker` instead); only pages past the
    /// previous checkpoint's end of file need none. `None` (or an overflowed set) means the checkpointer finds changed
    /// pages itself by comparing page digests. Only a raw page file can use them; for any
    /// other source they are an error. The caller keeps its set: if the checkpoint fails,
    /// it can put it back into its tracker.
    pub dirty: Option<DirtySet>,
    /// The engine's tracker: the checkpointer drains it when the job is enqueued and, if
    /// the job fails or is cancelled, puts the drained pages back (used instead of
    /// `dirty`). Its dirty pages are used only after one checkpoint of the database with this
    /// same tracker has compared page digests and succeeded (in this process), since a
    /// new tracker knows nothing of writes made before it existed.
    pub tracker: Option<Arc<DirtyTracker>>,
    /// The LSN of the engine's WAL this page checkpoint covers (page sources).
    pub lsn: Option<Lsn>,
    /// For a segment directory, the LSN range `[start, end)` of each file by name, for an
    /// engine whose LSNs are not byte offsets. `None`: byte offsets in name order.
    pub segment_lsns: Option<BTreeMap<String, (Lsn, Lsn)>>,
    /// For a SQLite source, the snapshot to checkpoint, opened by the caller (who set its
    /// changed pages): with `lsn`, the caller knows that the snapshot is the state at that
    /// LSN. It lives only in this process: a job resumed without it that was given an LSN
    /// fails ([`CairnError::SourceChanged`]) rather than publish another state under it.
    pub snapshot: Option<Arc<cairn_executor::SqliteSnapshot>>,
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
    /// The engine's dirty pages decided which pages were read (otherwise page digests were
    /// compared, as for the first checkpoint with a new tracker). For SQLite, the dirty
    /// pages are those of the WAL frames committed since the previous generation.
    pub dirty_used: bool,
    /// SQLite only: why every page's digest was compared instead of taking the changed
    /// pages from the WAL (`no_position`, `wal_reset`, `wal_rewritten`, `not_wal`; see
    /// [`cairn_executor::FullScanReason`]); `None` when the WAL named them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_scan_reason: Option<&'static str>,
    /// SQLite only: the committed WAL frames the snapshot included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_frames: Option<u32>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// A checkpoint job that was enqueued: its id, a cancel handle and a watch of its
/// progress (those of [`crate::JobRun`]); awaiting it runs the job to its end and settles
/// the engine's dirty pages by its outcome.
#[must_use = "a checkpoint runs only when it is awaited"]
pub struct CheckpointRun<'a> {
    run: crate::JobRun<'a, CheckpointReport>,
    db: DbId,
    /// The tracker and the pages drained from it, given back if the job fails.
    give_back: Option<(Arc<DirtyTracker>, DirtySet)>,
    /// The identity of a tracker whose dirty pages this checkpoint did not use: once it
    /// succeeds, they are trusted for the database.
    trust: Option<u64>,
}

impl CheckpointRun<'_> {
    /// The job's id (or why it could not be enqueued).
    pub fn id(&self) -> Result<JobId, &CairnError> {
        self.run.id()
    }

    /// A handle that cancels the job from any task.
    pub fn cancel_handle(&self) -> Option<CancelHandle> {
        self.run.cancel_handle()
    }

    /// A watch of the job's state, phase and progress.
    pub fn progress(&self) -> Option<watch::Receiver<JobEvent>> {
        self.run.progress()
    }
}

impl<'a> CheckpointRun<'a> {
    /// Runs the job to its end (what awaiting the run does).
    pub async fn wait(self) -> Result<CheckpointReport, CairnError> {
        let Ok(id) = self.run.id() else {
            return self.run.wait().await;
        };
        let cp = self.run.checkpointer();
        let result = self.run.wait().await;
        // A lent snapshot not taken by a plan (the job failed first) ends its read
        // transaction here.
        cp.lent.remove(&id);
        if let (Ok(_), Some(id)) = (&result, self.trust) {
            cp.trackers.insert(self.db.clone(), id);
        }
        if let (Err(_), Some((tracker, pages))) = (&result, &self.give_back) {
            // Failed or cancelled for good: the pages it drained are dirty still.
            let unfinished = matches!(cp.job(id), Ok(r) if r.state.is_unfinished());
            if !unfinished {
                tracker.restore(pages);
            }
        }
        result
    }
}

impl<'a> IntoFuture for CheckpointRun<'a> {
    type Output = Result<CheckpointReport, CairnError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
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

    /// [`Checkpointer::checkpoint`] with options (the engine's dirty pages, the LSN it
    /// covers). The job is enqueued at once and runs when the result is awaited; it
    /// survives a crash (see [`Checkpointer::resume`]).
    pub fn checkpoint_with(
        &self,
        db: &DbId,
        source: &Source,
        opts: &CheckpointOptions,
    ) -> CheckpointRun<'_> {
        let mut opts = opts.clone();
        let mut give_back = None;
        let mut trust = None;
        if let Some(t) = opts.tracker.take() {
            let drained = t.drain();
            // A tracker's dirty pages cover only what happened since it was made: until a
            // checkpoint that compared page digests succeeds with it, they are not used.
            let trusted = self.trackers.get(db).is_some_and(|id| *id == t.id());
            opts.dirty = trusted.then(|| drained.clone());
            trust = (!trusted).then(|| t.id());
            give_back = Some((t, drained));
        }
        let job = self.enqueue_checkpoint(db, source, &opts);
        if job.is_err() {
            if let Some((t, pages)) = &give_back {
                t.restore(pages);
            }
        }
        CheckpointRun {
            run: crate::JobRun::new(self, job, "checkpoint", |o| match o {
                JobOutcome::Checkpoint(r) => Some(r),
                _ => None,
            }),
            db: db.clone(),
            give_back,
            trust,
        }
    }

    /// Persists a checkpoint job (with the engine's dirty pages, if any) without running it.
    pub fn enqueue_checkpoint(
        &self,
        db: &DbId,
        source: &Source,
        opts: &CheckpointOptions,
    ) -> Result<JobId, CairnError> {
        let source = source.absolute()?;
        // The engine's dirty pages apply to a raw page file the engine writes in place; a
        // SQLite source is read from a snapshot taken later, so pages drained earlier would
        // miss writes made in between. They may come unsorted (merged drains).
        let dirty = match (&source, &opts.dirty) {
            (_, None) => None,
            (Source::Pages { .. }, Some(d)) => (!d.overflow).then(|| {
                let mut pages = d.pages.clone();
                pages.sort_unstable();
                pages.dedup();
                pages
            }),
            (other, Some(_)) => {
                return Err(CairnError::DirtyPagesUnusable {
                    db: db.clone(),
                    kind: other.kind().as_str(),
                })
            }
        };
        if opts.lsn.is_some() && source.kind() == SourceKind::Segments {
            return Err(CairnError::Config {
                what: format!("checkpoint of {db}"),
                reason: "an LSN is given to page checkpoints; a segment's LSNs are its range"
                    .into(),
            });
        }
        if opts.snapshot.is_some() && source.kind() != SourceKind::Sqlite {
            return Err(CairnError::Config {
                what: format!("checkpoint of {db}"),
                reason: "a SQLite snapshot is given to SQLite sources only".into(),
            });
        }
        if opts.segment_lsns.is_some() && source.kind() != SourceKind::Segments {
            return Err(CairnError::Config {
                what: format!("checkpoint of {db}"),
                reason: "segment LSN ranges are given to segment directories only".into(),
            });
        }
        let stamp = match (&source, opts.lsn) {
            (Source::Pages { path, .. }, Some(_)) => FileStamp::of(path),
            _ => None,
        };
        let spec = JobSpec::Checkpoint {
            db: db.clone(),
            source,
            chunk_size: self.cfg.chunk_size,
            lsn: opts.lsn.map(|l| l.0),
            stamp,
        };
        let mut items = Vec::new();
        if let Some(pages) = &dirty {
            items.push(Item::Dirty(pages));
        }
        if let Some(ranges) = &opts.segment_lsns {
            items.push(Item::Ranges(ranges));
        }
        let id = self.enqueue_with(spec, &items)?;
        if let Some(snap) = &opts.snapshot {
            self.lent.insert(id, Arc::clone(snap));
        }
        Ok(id)
    }

    /// Whether generation `g` of `db` was published by garbage collection.
    async fn published_by_gc(&self, db: &DbId, g: u64) -> Result<bool, CairnError> {
        let m = cairn_state::fetch_manifest(
            &self.state,
            &self.store,
            &self.cfg.tenant,
            db,
            Generation(g),
        )
        .await?;
        Ok(m.gc)
    }

    /// Plans (or reloads the plan of) a checkpoint job, then stages, uploads and publishes
    /// whatever its items do not record as done.
    pub(crate) async fn run_checkpoint(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        source: &Source,
        chunk_size: u64,
        (lsn, stamp): (Option<Lsn>, Option<FileStamp>),
    ) -> Result<CheckpointReport, CairnError> {
        let started = Instant::now();
        self.check_store().await?;
        // One publication at a time per database in this process, from plan to publish.
        let lock = self.db_lock(db);
        let _publishing = lock.lock().await;
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
        if let (Some(was), Source::Pages { path, .. }, Some(at)) = (stamp, source, lsn) {
            if FileStamp::of(path) != Some(was) {
                return Err(CairnError::SourceChanged {
                    db: db.clone(),
                    path: path.display().to_string(),
                    lsn: at.0,
                    job: job.id().to_string(),
                });
            }
        }
        let mut snapshot = None;
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
                let what = plan::PlanRequest {
                    db,
                    source,
                    chunk_size,
                    lsn,
                };
                let planned = self.plan_checkpoint(job, &what, &items, &scratch).await?;
                if planned.snapshot.is_some() {
                    // A SQLite snapshot's changed pages come from its WAL, or are unknown.
                    items.dirty = planned.changed;
                }
                snapshot = planned.snapshot;
                planned.plan
            }
        };
        let parent =
            match plan.parent {
                Some(g) => Some(self.state(db, Some(Generation(g))).await.map_err(
                    |e| match e {
                        CairnError::UnknownGeneration { .. } | CairnError::UnknownDb { .. } => {
                            CairnError::ParentMissing {
                                job: job.id().to_string(),
                                tenant: self.cfg.tenant.clone(),
                                db: db.clone(),
                                generation: Generation(g),
                            }
                        }
                        other => other,
                    },
                )?),
                None => None,
            };
        let mut sink = BlobSink::new(
            self,
            job.id(),
            db,
            &scratch,
            parent.as_ref().map(|p| &p.state),
        );
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
                    snapshot: snapshot.clone(),
                };
                pages::PagesRun {
                    sink: &mut sink,
                    job: &mut *job,
                    items: &mut items,
                    shape,
                    generation: plan.generation,
                    prev: parent.as_ref().and_then(|p| p.state.pages.as_ref()),
                }
                .run()
                .await?
            }
            PlanBody::Segments { dir, new, .. } => {
                segments::SegmentsRun {
                    sink: &mut sink,
                    job: &mut *job,
                    items: &mut items,
                }
                .run(dir, new)
                .await?
            }
        };
        let uploaded = sink.finish().await?;
        self.check_cancel(job.id())?;
        job.update(|r| r.phase = Phase::Uploaded, &[])?;
        let manifest_bytes = match self
            .publish_plan(job, db, &plan, parent.as_ref(), staged)
            .await
        {
            Err(CairnError::State(cairn_state::StateError::Fenced { .. }))
                if self.published_by_gc(db, plan.generation).await? =>
            {
                // A garbage collection took the generation: plan again on top of it (the
                // engine's inputs are kept), in the runner's next attempt.
                let kept = job.items()?;
                job.clear_items()?;
                let mut again = Vec::new();
                if let Some(d) = &kept.dirty {
                    again.push(Item::Dirty(d));
                }
                if let Some(r) = &kept.ranges {
                    again.push(Item::Ranges(r));
                }
                job.update(
                    |r| {
                        r.phase = Phase::New;
                        r.generation = None;
                    },
                    &again,
                )?;
                return Err(CairnError::PlanAgain {
                    db: db.clone(),
                    generation: Generation(plan.generation),
                });
            }
            other => other?,
        };
        let mut report = publish::report(&items, &self.cfg.tenant, db, kind, &plan, started);
        report.blobs_uploaded = uploaded.blobs_uploaded;
        report.blobs_reused = uploaded.blobs_reused;
        report.manifest_bytes = manifest_bytes;
        report.bytes_uploaded = uploaded.bytes_uploaded + manifest_bytes;
        Ok(report)
    }
}
