//! Restoring: a generation (a page file, a segment directory, or both), or a point of the
//! WAL stream (the newest page checkpoint at or below it and the segments to replay from
//! it). Verified parallel reads are assembled beside the target, then renamed over it.
//!
//! Contract: a restore writes exactly the bytes of what it restores, or leaves the target
//! untouched: everything is assembled in `<target>.cairn-restore` and renamed over the
//! target only when complete and synced. Every blob is verified end to end while it is
//! read, and each delta is checked against its chunk, base and page size before it is
//! applied. Crash: what to restore is resolved once and kept in the job (the generation);
//! each finished chunk or segment is synced and then recorded as a job item, so a resumed
//! restore reopens the partial assembly and skips what is recorded; a crash before the
//! rename leaves only the partial assembly (deleted when the job fails or is cancelled).
//! Retries: the store retries requests and re-reads damaged transfers. Cancellation:
//! checked after each restored chunk or segment.

mod chunk;
mod memory;
mod sqlite;
mod write;

pub(crate) use chunk::fetch_blob_decoded;

use std::path::Path;
use std::time::Instant;

use cairn_core::{DbId, Generation, JobId, Lsn, PagesState, SegmentEntry};
use cairn_executor::{DirAssembler, FileAssembler, PointAssembler};
use cairn_planner::wal::restore_point;
use serde::Serialize;

use crate::queue::{Job, JobSpec, Phase};

/// Whether something is at `path` other than an empty directory.
fn occupied(path: &Path) -> bool {
    match std::fs::symlink_metadata(path) {
        Err(_) => false,
        Ok(m) if m.is_dir() => std::fs::read_dir(path).map_or(true, |mut d| d.next().is_some()),
        Ok(_) => true,
    }
}
use crate::{CairnError, Checkpointer, GenerationState, JobOutcome, JobRun};
pub use sqlite::{SqlitePoint, SqliteRestoreReport};

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    /// Database.
    pub db: String,
    /// The restored generation (for a restore to a point, the generation whose WAL
    /// stream it used).
    pub generation: u64,
    /// `sqlite`, `pages` or `segments`.
    pub kind: &'static str,
    /// Bytes written to the target.
    pub bytes_written: u64,
    /// Blobs read (and verified).
    pub blobs_read: u64,
    /// Where it went.
    pub path: String,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// The page checkpoint's generation (restores to a point, or of both streams).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_generation: Option<u64>,
    /// That checkpoint's LSN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_lsn: Option<u64>,
    /// First LSN to replay from `wal/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_from: Option<u64>,
    /// One past the last LSN to replay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_to: Option<u64>,
    /// The segments written to `wal/`, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<Vec<String>>,
    /// Their LSN ranges `[start, end)`, in the same order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment_lsns: Option<Vec<(u64, u64)>>,
}

/// How the parts of a restore are laid out at the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// The page file is the target.
    File,
    /// The segment directory is the target.
    Dir,
    /// The target is a directory holding `pages` (if any) and `wal/`.
    Point,
}

/// What a restore writes.
pub(crate) struct Parts<'a> {
    pub pages: Option<&'a PagesState>,
    pub segments: &'a [SegmentEntry],
    pub layout: Layout,
}

/// What to restore and whether it may replace what is at the target.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// The generation (the latest when `None`).
    pub generation: Option<Generation>,
    /// A point of the WAL stream instead of a generation (see [`Checkpointer::restore_at`]).
    pub lsn: Option<Lsn>,
    /// Replace an existing target. Without it a restore refuses any target that exists,
    /// other than an empty directory, so a mistyped path never wipes a live database.
    pub overwrite: bool,
}

impl Checkpointer {
    /// Restores `generation` of `db` (the latest if `None`) to `to`: a file for a page
    /// source, a directory of segment files for a WAL stream, and for a database with both
    /// a directory holding `pages` and `wal/`. Runs as a job, so an interrupted restore
    /// resumes where it stopped. An existing target is refused (see
    /// [`RestoreOptions::overwrite`]).
    pub async fn restore(
        &self,
        db: &DbId,
        generation: Option<Generation>,
        to: &Path,
    ) -> Result<RestoreReport, CairnError> {
        let opts = RestoreOptions {
            generation,
            ..Default::default()
        };
        self.restore_with(db, to, &opts).await
    }

    /// Restores `db` to LSN `lsn` of its WAL stream, into directory `to`: `to/pages`, the
    /// newest page checkpoint at or below `lsn` (absent when there is none), and `to/wal/`,
    /// exactly the segments that overlap `[its LSN, lsn)` (from 0 without one), under their
    /// own names. The engine replays them. A point that cannot be restored is refused with
    /// the restorable range, and so is an existing target.
    pub async fn restore_at(
        &self,
        db: &DbId,
        lsn: Lsn,
        to: &Path,
    ) -> Result<RestoreReport, CairnError> {
        let opts = RestoreOptions {
            lsn: Some(lsn),
            ..Default::default()
        };
        self.restore_with(db, to, &opts).await
    }

    /// A restore of a generation or a point, as `opts` says.
    pub async fn restore_with(
        &self,
        db: &DbId,
        to: &Path,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport, CairnError> {
        self.restore_job(db, to, opts).await
    }

    /// [`Checkpointer::restore_with`] as a handle: the job is enqueued at once (an existing
    /// target is refused first, unless `opts` allows it), its progress can be watched, and
    /// it runs when the handle is awaited.
    pub fn restore_job(
        &self,
        db: &DbId,
        to: &Path,
        opts: &RestoreOptions,
    ) -> JobRun<'_, RestoreReport> {
        let job = self.enqueue_restore(db, to, opts);
        JobRun::new(self, job, "restore", |o| match o {
            JobOutcome::Restore(r) => Some(r),
            _ => None,
        })
    }

    fn enqueue_restore(
        &self,
        db: &DbId,
        to: &Path,
        opts: &RestoreOptions,
    ) -> Result<JobId, CairnError> {
        let to = std::path::absolute(to).map_err(|e| CairnError::Config {
            what: format!("restore target {}", to.display()),
            reason: e.to_string(),
        })?;
        if !opts.overwrite && occupied(&to) {
            return Err(CairnError::TargetExists {
                path: to.display().to_string(),
            });
        }
        let (generation, lsn) = (opts.generation.map(|g| g.0), opts.lsn.map(|l| l.0));
        self.enqueue(JobSpec::Restore {
            db: db.clone(),
            generation,
            to,
            lsn,
        })
    }

    pub(crate) async fn run_restore(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        generation: Option<u64>,
        lsn: Option<Lsn>,
        to: &Path,
    ) -> Result<RestoreReport, CairnError> {
        let started = Instant::now();
        // The generation is resolved once, so a resumed "latest" restore stays on it.
        let gs = match job.rec().generation {
            Some(g) => self.state(db, Some(Generation(g))).await?,
            None => {
                let gs = self.state(db, generation.map(Generation)).await?;
                job.update(
                    |r| {
                        r.generation = Some(gs.manifest.generation.0);
                        r.phase = Phase::Planned;
                    },
                    &[],
                )?;
                gs
            }
        };
        // A lease in the store keeps what this restore reads from garbage collection on
        // any machine; the generation is checked only once the lease is there.
        let lease = self
            .take_store_lease(db, job.id().0, vec![gs.manifest.generation.0])
            .await?;
        self.check_live(db, &[gs.manifest.generation.0]).await?;
        let result = self.restore_resolved(job, db, &gs, lsn, to).await;
        lease.release().await;
        let mut report = match result {
            Err(CairnError::Store(cairn_remote_store::StoreError::NotFound { key, store })) => {
                // A blob gone mid-restore: say so plainly if its generation expired.
                self.check_live(db, &[gs.manifest.generation.0]).await?;
                return Err(CairnError::Store(
                    cairn_remote_store::StoreError::NotFound { key, store },
                ));
            }
            other => other?,
        };
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    async fn restore_resolved(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        gs: &GenerationState,
        lsn: Option<Lsn>,
        to: &Path,
    ) -> Result<RestoreReport, CairnError> {
        let report = match lsn {
            Some(l) => self.restore_point_of(gs, db, l, to, job).await?,
            None => {
                let st = &gs.state;
                let segments: &[SegmentEntry] = st.wal.as_ref().map_or(&[], |w| &w.segments);
                let layout = match (&st.pages, &st.wal) {
                    (Some(_), Some(_)) => Layout::Point,
                    (None, _) => Layout::Dir,
                    (Some(_), None) => Layout::File,
                };
                let parts = Parts {
                    pages: st.pages.as_ref(),
                    segments,
                    layout,
                };
                let mut r = self.restore_parts(gs, &parts, to, Some(job)).await?;
                if layout == Layout::Point {
                    let p = st.pages.as_ref();
                    r.page_generation = p.map(|p| p.generation.0);
                    r.page_lsn = p.and_then(|p| p.lsn).map(|l| l.0);
                    r.segments = Some(segments.iter().map(|s| s.name.clone()).collect());
                    r.segment_lsns = Some(
                        segments
                            .iter()
                            .map(|s| (s.lsn_start.0, s.lsn_end.0))
                            .collect(),
                    );
                }
                r
            }
        };
        Ok(report)
    }

    /// Resolves and restores a point of generation `gs`'s WAL stream.
    async fn restore_point_of(
        &self,
        gs: &GenerationState,
        db: &DbId,
        lsn: Lsn,
        to: &Path,
        job: &mut Job<'_>,
    ) -> Result<RestoreReport, CairnError> {
        let wal = gs.state.wal.as_ref();
        let down_to = wal.map_or(lsn, |w| w.start.min(lsn));
        let refs = self.page_refs(db, gs, down_to).await?;
        let rp = restore_point(wal, &refs, lsn).map_err(|e| CairnError::Wal {
            db: db.clone(),
            source: e,
        })?;
        let page_state = match rp.page {
            Some(p) => Some(self.state(db, Some(p.generation)).await?),
            None => None,
        };
        let segments: &[SegmentEntry] = match wal {
            Some(w) => &w.segments[rp.segments.clone()],
            None => &[],
        };
        let parts = Parts {
            pages: page_state.as_ref().and_then(|s| s.state.pages.as_ref()),
            segments,
            layout: Layout::Point,
        };
        let mut r = self.restore_parts(gs, &parts, to, Some(job)).await?;
        r.page_generation = rp.page.map(|p| p.generation.0);
        r.page_lsn = rp.page.map(|p| p.lsn.0);
        r.replay_from = Some(rp.replay_from.0);
        r.replay_to = Some(rp.replay_to.0);
        r.segments = Some(segments.iter().map(|s| s.name.clone()).collect());
        r.segment_lsns = Some(
            segments
                .iter()
                .map(|s| (s.lsn_start.0, s.lsn_end.0))
                .collect(),
        );
        Ok(r)
    }

    /// Writes `parts` to `to`. With a job, each finished chunk or segment is synced and
    /// recorded, and a resumed job skips what is recorded.
    pub(crate) async fn restore_parts(
        &self,
        gs: &GenerationState,
        parts: &Parts<'_>,
        to: &Path,
        mut job: Option<&mut Job<'_>>,
    ) -> Result<RestoreReport, CairnError> {
        let m = &gs.manifest;
        let mut report = RestoreReport {
            db: m.db.to_string(),
            generation: m.generation.0,
            kind: gs.state.kind().as_str(),
            path: to.display().to_string(),
            ..Default::default()
        };
        let was_written = job
            .as_deref()
            .is_some_and(|j| matches!(j.rec().phase, Phase::Written | Phase::Committed));
        if was_written && cairn_executor::assemble::committed(to) {
            // Killed after renaming the assembly into place, before recording it (written),
            // or after recording it, before the job was marked done (committed).
            report.bytes_written = parts.pages.map_or(0, |p| p.len)
                + parts.segments.iter().map(|s| s.len).sum::<u64>();
            if let Some(j) = job {
                j.update(|r| r.phase = Phase::Committed, &[])?;
            }
            return Ok(report);
        }
        let mut w = write::Writer::start(self, &m.tenant, &m.db, parts, job.as_deref_mut())?;
        let outcome = async {
            match parts.layout {
                Layout::File => {
                    if let Some(p) = parts.pages {
                        let resume = w.resuming();
                        let (asm, reopened) = FileAssembler::open(to, p.len, resume)?;
                        w.pages(&asm, p, reopened, &mut report).await?;
                        w.written()?;
                        asm.commit()?;
                    }
                }
                Layout::Dir => {
                    let (asm, reopened) = DirAssembler::open(to, w.resuming())?;
                    w.segments(&asm, reopened, &mut report).await?;
                    w.written()?;
                    asm.commit()?;
                }
                Layout::Point => {
                    let (point, reopened) = PointAssembler::open(to, w.resuming())?;
                    if let Some(p) = parts.pages {
                        let target = point.pages_target();
                        if !(reopened && PointAssembler::has_committed(&target)) {
                            let (asm, again) = FileAssembler::open(&target, p.len, reopened)?;
                            w.pages(&asm, p, again, &mut report).await?;
                            asm.commit()?;
                        } else {
                            report.bytes_written += p.len;
                        }
                    }
                    let target = point.wal_target();
                    if !(reopened && PointAssembler::has_committed(&target)) {
                        let (asm, again) = DirAssembler::open(&target, reopened)?;
                        w.segments(&asm, again, &mut report).await?;
                        asm.commit()?;
                    } else {
                        report.bytes_written += parts.segments.iter().map(|s| s.len).sum::<u64>();
                    }
                    w.written()?;
                    point.commit()?;
                }
            }
            Ok::<_, CairnError>(())
        }
        .await;
        drop(w);
        if let Err(e) = outcome {
            // Keep the partial assembly for a resumable job; discard it otherwise.
            if job.is_none() {
                cairn_executor::assemble::discard_partial(to)?;
            }
            return Err(e);
        }
        if let Some(j) = job {
            j.update(|r| r.phase = Phase::Committed, &[])?;
        }
        Ok(report)
    }
}
