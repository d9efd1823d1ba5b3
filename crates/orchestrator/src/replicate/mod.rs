//! Continuous replication of a live SQLite database: its committed WAL frames become the
//! database's WAL stream, at least once per interval, and its pages become page
//! generations when enough WAL was shipped since the last one.
//!
//! Contract: each step opens a snapshot (a read transaction, [`SqliteSnapshot`]) before it
//! lets the previous one go, so SQLite never copies an unshipped frame into the main file
//! and then overwrites it in the WAL (see [`cairn_executor::sqlite_control`] for the rule).
//! The frames committed after the position last shipped are written to the local spool
//! (fsynced: from then on a crash cannot lose them) and published as one segment; the
//! spool's newest segment header is where shipping continues after a restart. When that
//! position is lost (SQLite reset the WAL while no Cairn process held it, e.g. the
//! application's `wal_checkpoint(TRUNCATE)` between two runs), the step ships a *gap*
//! segment and then a page generation at the end of the stream, taken from the same
//! snapshot, so every LSN outside the gap restores exactly. A page generation at an LSN
//! is always taken from the snapshot the frames up to that LSN came from.
//!
//! The application's writers are held off as little as we can: a snapshot takes the write
//! lock only to begin and to fix its last frame, and parses only the frames committed
//! since the held snapshot ([`SqliteSnapshot::open_after`]). The WAL is checkpointed by
//! us: PASSIVE right after each snapshot swap (it copies only frames our snapshot already
//! shipped, before the application's next commit would copy them inside its own fsync),
//! with the shipped frames `fdatasync`ed by us, and a TRUNCATE reset when the WAL file
//! passes [`ReplicateOptions::wal_limit`] and the watermark says everything in it is
//! published. Before the reset takes the write lock, rounds of shipping and PASSIVE
//! outside it leave fewer than `LOCKED_FRAMES` for the lock; a writer that outpaces
//! `PRECOPY_ROUNDS` rounds defers the reset to a later step instead of being stalled.
//!
//! Crash: at any point, the spool holds every frame that may have left the WAL; the next
//! run publishes what it holds, and continues from its newest header. Uncommitted frames
//! are never read (a snapshot stops at its last commit frame). Retries: a step that fails
//! with a transient error (store unreachable, database busy) is logged, counted and tried
//! again after a backoff (the interval, doubled per failure in a row, capped at
//! [`ReplicateOptions::max_backoff`]); what it had spooled is published by the next step,
//! so a dead store delays shipping but loses nothing and never ends the run. A permanent
//! error (fenced by another writer, corrupt state, a bad source) ends the run.
//! Cancellation: the stop signal is honoured between steps and during a backoff; the step
//! in hand finishes (or its jobs persist their progress), and a last step ships what was
//! committed up to then. An observer ([`ReplicateObserver`], see `observe.rs`) is told of
//! every checkpoint and every step.

pub(crate) mod observe;

use std::collections::BTreeSet;
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_core::sqlite_segment::{segment_name, uncovered_gap, SegmentHeader, SegmentKind};
use cairn_core::sqlite_wal::FRAME_HEADER_LEN;
use cairn_core::{DbId, Lsn, SourceKind};
use cairn_executor::{
    frames_to_ship, FullScanReason, Shipped, Spool, SqliteControl, SqliteSnapshot,
};
use serde::Serialize;
use tokio::sync::watch;

use crate::{CairnError, CheckpointOptions, CheckpointReport, Checkpointer, Source};

use observe::{failed_step, pause};
pub use observe::{step_backoff, NoObserver, ReplicateObserver, ReplicateStatus};

/// How `cairn replicate` runs.
#[derive(Clone, Debug)]
pub struct ReplicateOptions {
    /// Time between steps: the loss window for a store that keeps up.
    pub interval: Duration,
    /// A page generation is written once this much WAL was shipped since the last one.
    pub page_every_bytes: u64,
    /// ... or once this long has passed since the last one (and something was shipped).
    pub page_every: Duration,
    /// The WAL is reset (TRUNCATE) once its file is larger than this.
    pub wal_limit: u64,
    /// The longest wait after failed steps (the wait starts at `interval` and doubles per
    /// failure in a row).
    pub max_backoff: Duration,
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            page_every_bytes: 256 << 20,
            page_every: Duration::from_secs(600),
            wal_limit: 64 << 20,
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// What a replication run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicateReport {
    /// Database.
    pub db: String,
    /// The SQLite file.
    pub source: String,
    /// Steps run.
    pub steps: u64,
    /// Steps that failed with a transient error and were retried.
    pub steps_failed: u64,
    /// Segments of frames published.
    pub segments: u64,
    /// Frames shipped.
    pub frames: u64,
    /// Bytes of segments shipped.
    pub bytes_shipped: u64,
    /// Page generations written.
    pub page_generations: u64,
    /// Gap segments written (a lost WAL position; see the module docs).
    pub gaps: u64,
    /// Why the last gap was written (`no_position`, `wal_reset`, `wal_rewritten`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_gap_reason: Option<&'static str>,
    /// WAL resets (TRUNCATE checkpoints that went through).
    pub wal_truncations: u64,
    /// The newest generation published.
    pub generation: Option<u64>,
    /// The end of the published WAL stream.
    pub stream_end: Option<u64>,
}

/// One replication run's state between steps.
struct Run<'c> {
    cp: &'c Checkpointer,
    db: DbId,
    src: PathBuf,
    opts: ReplicateOptions,
    spool: Spool,
    control: SqliteControl,
    /// The snapshot held since the last step, and where shipping stands.
    held: Option<(Arc<SqliteSnapshot>, Shipped)>,
    /// Pages changed since the last page generation (`None`: unknown).
    changed: Option<BTreeSet<u64>>,
    /// Bytes shipped since the last page generation.
    since_page: u64,
    last_page: Instant,
    /// A page generation must be written (after a gap, or one that failed).
    page_due: Option<FullScanReason>,
    /// The spool holds segments not yet published.
    unpublished: bool,
    report: ReplicateReport,
    observer: &'c dyn ReplicateObserver,
    /// When the held snapshot was opened (unix ms).
    held_ms: Option<u64>,
    /// See [`ReplicateStatus::durable_ms`].
    durable_ms: Option<u64>,
    started_ms: u64,
    /// Failed steps in a row.
    failures: u32,
}

/// The header of a segment of `snap`'s frames from `first`; for a database without a WAL
/// (never written in WAL mode since its last connection closed), position frame 0 of no WAL.
fn header_of(
    snap: &SqliteSnapshot,
    kind: SegmentKind,
    first: u32,
    captured_ms: u64,
) -> SegmentHeader {
    let no_wal = cairn_core::WalPosition {
        salts: (0, 0),
        frame: 0,
        checksum: (0, 0),
    };
    let (position, seq) = match (snap.position(), snap.wal_header()) {
        (Some(p), Some(h)) => (p, h.checkpoint_seq),
        _ => (no_wal, 0),
    };
    SegmentHeader {
        kind,
        page_size: snap.page_size(),
        checkpoint_seq: seq,
        position,
        first_frame: first,
        backfilled: snap.backfilled(),
        captured_ms,
    }
}

/// A snapshot of `src` on a blocking thread, parsing only the frames after `earlier`'s.
async fn snapshot(
    src: PathBuf,
    earlier: Option<Arc<SqliteSnapshot>>,
) -> Result<SqliteSnapshot, CairnError> {
    tokio::task::spawn_blocking(move || match earlier {
        Some(e) => SqliteSnapshot::open_after(&src, &e),
        None => SqliteSnapshot::open(&src, None),
    })
    .await
    .map_err(|source| CairnError::Join {
        job: "replicate".into(),
        what: "SQLite snapshot",
        source,
    })?
    .map_err(CairnError::from)
}

fn frame_pages(frames: &[u8], page_size: u32) -> impl Iterator<Item = u64> + '_ {
    frames
        .chunks_exact(FRAME_HEADER_LEN + page_size as usize)
        .map(|f| u64::from(u32::from_be_bytes([f[0], f[1], f[2], f[3]]).saturating_sub(1)))
}

impl Checkpointer {
    /// Replicates the SQLite database at `src` as `db` until `stop` turns true (see the
    /// module docs), and returns what it did.
    pub async fn replicate(
        &self,
        db: &DbId,
        src: &Path,
        opts: &ReplicateOptions,
        stop: watch::Receiver<bool>,
    ) -> Result<ReplicateReport, CairnError> {
        self.replicate_observed(db, src, opts, stop, &NoObserver)
            .await
    }

    /// [`Checkpointer::replicate`], telling `observer` of every checkpoint and step.
    pub async fn replicate_observed(
        &self,
        db: &DbId,
        src: &Path,
        opts: &ReplicateOptions,
        mut stop: watch::Receiver<bool>,
        observer: &dyn ReplicateObserver,
    ) -> Result<ReplicateReport, CairnError> {
        let src = std::path::absolute(src).map_err(|e| CairnError::Config {
            what: format!("replication source {}", src.display()),
            reason: e.to_string(),
        })?;
        let control = SqliteControl::open(&src)?;
        let spool = Spool::open(
            &self
                .cfg
                .state_dir
                .join("spool")
                .join(self.cfg.tenant.as_str())
                .join(db.as_str()),
        )?
        .with_budget(self.cache.clone())?;
        let mut run = Run {
            cp: self,
            db: db.clone(),
            report: ReplicateReport {
                db: db.to_string(),
                source: src.display().to_string(),
                ..Default::default()
            },
            src,
            opts: opts.clone(),
            unpublished: spool.newest()?.is_some(),
            spool,
            control,
            held: None,
            changed: None,
            since_page: 0,
            last_page: Instant::now(),
            page_due: None,
            observer,
            held_ms: None,
            durable_ms: None,
            started_ms: self.env.now_ms(),
            failures: 0,
        };
        // Steps start at a fixed rate (a step that overruns delays the next one, with no
        // burst after it), so the loss window is the interval, not interval + step.
        let mut tick = tokio::time::interval(run.opts.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let stopping = *stop.borrow();
            let result = run.step(!stopping).await;
            run.report.steps += 1;
            match result {
                Ok(()) => {
                    run.failures = 0;
                    run.observe(None, None);
                }
                Err(e) if e.is_retryable() && !stopping => {
                    run.report.steps_failed += 1;
                    let limits = (run.opts.interval, run.opts.max_backoff);
                    let wait =
                        failed_step(&mut run.failures, &run.db, &e, "replication step", limits);
                    run.observe(Some(&e), Some(wait));
                    pause(wait, &mut stop).await;
                    tick.reset();
                    continue;
                }
                Err(e) => {
                    run.failures = run.failures.saturating_add(1);
                    run.observe(Some(&e), None);
                    return Err(e);
                }
            }
            if stopping {
                break;
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => {}
            }
        }
        Ok(run.report)
    }
}

impl Run<'_> {
    /// Tells the observer where the run stands after a step (`error`: it failed; `wait`:
    /// the backoff before the next). Reads only what this process holds: no store request.
    fn observe(&self, error: Option<&CairnError>, wait: Option<Duration>) {
        let p = observe::published_status(self.cp, &self.db);
        let status = ReplicateStatus {
            tenant: self.cp.cfg.tenant.to_string(),
            db: self.db.to_string(),
            started_ms: self.started_ms,
            at_ms: self.cp.env.now_ms(),
            steps: self.report.steps,
            steps_failed: self.report.steps_failed,
            consecutive_failures: self.failures,
            last_error: error.map(|e| e.to_string()),
            retry_in_ms: wait.map(|w| w.as_millis() as u64),
            durable_ms: self.durable_ms,
            generation: p.generation,
            generation_created_ms: p.generation_created_ms,
            watermark: p.watermark,
            wal_end: p.wal_end,
        };
        self.observer.step_finished(&status);
    }

    /// Runs one checkpoint, telling the observer of its start and end.
    async fn observed<F>(&self, kind: SourceKind, run: F) -> Result<CheckpointReport, CairnError>
    where
        F: IntoFuture<Output = Result<CheckpointReport, CairnError>>,
    {
        self.observer.checkpoint_started(kind);
        let t = Instant::now();
        let r = run.into_future().await;
        self.observer
            .checkpoint_finished(kind, t.elapsed(), r.as_ref());
        r
    }

    /// Where shipping stands when no snapshot is held: the spool's newest header, which
    /// is trusted only for the same WAL (this process held nothing in between).
    async fn resume_point(&self) -> Result<Option<Shipped>, CairnError> {
        // A gap whose page generation was never written (a crash between the two): that
        // snapshot is gone, so the position counts as lost and a new gap follows.
        let state = self.cp.latest_state(&self.db).await?;
        if state.is_some_and(|s| uncovered_gap(&s.state).is_some()) {
            return Ok(None);
        }
        Ok(self.spool.newest()?.map(|s| Shipped {
            position: s.header.position,
            backfilled: false,
            no_wal: false,
        }))
    }

    /// The LSN the next spooled segment starts at.
    async fn next_lsn(&self) -> Result<u64, CairnError> {
        if let Some(s) = self.spool.newest()? {
            if let Some(start) = s.name.split('-').next().and_then(|n| n.parse::<u64>().ok()) {
                return Ok(start + s.len);
            }
        }
        let state = self.cp.latest_state(&self.db).await?;
        Ok(state
            .and_then(|s| s.state.wal.map(|w| w.end.0))
            .unwrap_or(0))
    }

    async fn spool_segment(
        &mut self,
        snap: &SqliteSnapshot,
        kind: SegmentKind,
        first: u32,
        frames: &[u8],
    ) -> Result<(), CairnError> {
        let header = header_of(snap, kind, first, self.cp.env.now_ms());
        let name = segment_name(self.next_lsn().await?, header.captured_ms, kind);
        let n = self.spool.write(&name, &header, frames)?;
        self.report.bytes_shipped += n;
        self.since_page += n;
        self.unpublished = true;
        Ok(())
    }

    /// Ships the frames of `snap` after `shipped`, or a gap if they are unknown.
    async fn ship(
        &mut self,
        snap: &SqliteSnapshot,
        shipped: Option<&Shipped>,
    ) -> Result<(), CairnError> {
        let to_ship = match shipped {
            Some(s) => frames_to_ship(s, snap),
            None => Err(FullScanReason::NoPosition),
        };
        match to_ship {
            Ok((first, last)) if first <= last => {
                let frames = snap.read_frames(first, last)?;
                snap.sync_wal()?;
                if let Some(c) = &mut self.changed {
                    c.extend(frame_pages(&frames, snap.page_size()));
                }
                self.spool_segment(snap, SegmentKind::Frames, first, &frames)
                    .await?;
                self.report.segments += 1;
                self.report.frames += u64::from(last - first + 1);
            }
            Ok(_) => {}
            Err(reason) => {
                self.spool_segment(snap, SegmentKind::Gap, 0, &[]).await?;
                self.report.gaps += 1;
                self.report.last_gap_reason = Some(reason.as_str());
                self.changed = None;
                self.page_due = Some(reason);
                let salts = snap.wal_header().map(|h| h.salts);
                if reason == FullScanReason::NoPosition {
                    tracing::info!(db = %self.db, "no shipped position yet: starting the stream with a page generation");
                } else {
                    tracing::warn!(
                        db = %self.db,
                        reason = reason.as_str(),
                        shipped = ?shipped,
                        wal_salts = ?salts,
                        wal_frames = snap.frames(),
                        "the WAL position was lost; shipping a gap and a page generation"
                    );
                }
            }
        }
        Ok(())
    }

    /// Publishes what the spool holds as segments of the stream.
    async fn publish(&mut self) -> Result<(), CairnError> {
        if !self.unpublished {
            return Ok(());
        }
        let source = Source::Segments(self.spool.dir().to_path_buf());
        let r = self
            .observed(SourceKind::Segments, self.cp.checkpoint(&self.db, &source))
            .await?;
        self.unpublished = false;
        self.report.generation = Some(r.generation);
        let state = self.cp.latest_state(&self.db).await?;
        self.report.stream_end = state.and_then(|s| s.state.wal.map(|w| w.end.0));
        if let Some(s) = self.spool.newest()? {
            self.spool.prune(&s.name)?;
        }
        Ok(())
    }

    /// One step: see the module docs. `maintain`: also page generations and WAL resets
    /// (a last step before stopping only ships).
    async fn step(&mut self, maintain: bool) -> Result<(), CairnError> {
        // A segment spooled by an earlier step or run goes first.
        self.publish().await?;
        if self.page_due.is_some() {
            // The page generation after a gap comes from the gap's own snapshot, before
            // anything is shipped after it, so every point after the gap is restorable.
            if let Some((snap, _)) = self.held.clone() {
                self.page_generation(&snap).await?;
                self.mark_durable();
                return Ok(());
            }
        }
        let src = self.src.clone();
        let opened_ms = self.cp.env.now_ms();
        // Only the frames committed since the held snapshot are parsed.
        let earlier = self.held.as_ref().map(|(s, _)| Arc::clone(s));
        let mut snap = snapshot(src, earlier).await?;
        let before = match &self.held {
            Some((_, s)) => Some(*s),
            None => self.resume_point().await?,
        };
        self.ship(&snap, before.as_ref()).await?;
        let now = Shipped::at(&snap, before.as_ref());
        let page = maintain
            && (self.page_due.is_some()
                || self.since_page >= self.opts.page_every_bytes
                || (self.since_page > 0 && self.last_page.elapsed() >= self.opts.page_every));
        if page {
            snap.set_changed(match (&self.changed, self.page_due) {
                (_, Some(r)) => Err(r),
                (Some(c), None) => Ok(c.iter().copied().collect()),
                (None, None) => Err(FullScanReason::NoPosition),
            });
        }
        let snap = Arc::new(snap);
        // The new snapshot is held before the old one goes.
        self.held = Some((Arc::clone(&snap), now));
        self.held_ms = Some(opened_ms);
        if maintain {
            // At once, while the application's own checkpoints would find nothing new: the
            // frames the old snapshot held back are copied by us, without holding writers
            // off, instead of by the application's next commit, which would stall it for
            // as long as the copy of everything since the last step takes.
            self.control.passive()?;
        }
        self.publish().await?;
        if page {
            self.page_generation(&snap).await?;
        }
        // Only `held` may hold the snapshot now: a reset replaces it, and a second handle
        // would keep its read mark, so that the reset's checkpoint could never copy the
        // frames after it and the WAL could never be reset.
        drop(snap);
        if maintain {
            self.checkpoint_wal().await?;
        }
        self.mark_durable();
        Ok(())
    }

    /// Everything the held snapshot holds is published (and restorable: no page
    /// generation is owed after a gap): its commits are durable.
    fn mark_durable(&mut self) {
        if !self.unpublished && self.page_due.is_none() {
            self.durable_ms = self.held_ms.max(self.durable_ms);
        }
    }

    /// A page generation from `snap`, at the end of the stream (which `snap`'s frames
    /// reached).
    async fn page_generation(&mut self, snap: &Arc<SqliteSnapshot>) -> Result<(), CairnError> {
        let state = self.cp.latest_state(&self.db).await?;
        let end = state
            .and_then(|s| s.state.wal.map(|w| w.end.0))
            .unwrap_or(0);
        let opts = CheckpointOptions {
            lsn: Some(Lsn(end)),
            snapshot: Some(Arc::clone(snap)),
            ..Default::default()
        };
        let source = Source::Sqlite(self.src.clone());
        let r = self
            .observed(
                SourceKind::Sqlite,
                self.cp.checkpoint_with(&self.db, &source, &opts),
            )
            .await?;
        self.report.page_generations += 1;
        self.report.generation = Some(r.generation);
        self.report.stream_end = Some(end);
        self.page_due = None;
        self.changed = Some(BTreeSet::new());
        self.since_page = 0;
        self.last_page = Instant::now();
        Ok(())
    }

    /// A TRUNCATE reset once the WAL passes its limit and the watermark covers the whole
    /// stream we shipped. (The step's PASSIVE ran right after its snapshot swap; nothing
    /// more is checkpointable until the next swap.)
    async fn checkpoint_wal(&mut self) -> Result<(), CairnError> {
        if self.control.wal_len() <= self.opts.wal_limit {
            return Ok(());
        }
        if !self.precopy().await? {
            // The writer outpaces the rounds: holding it off for what is left would stall
            // it for longer than a step; the reset waits for a step that catches up.
            tracing::debug!(db = %self.db, wal_len = self.control.wal_len(), "WAL reset deferred: the writer outpaces the pre-copy");
            return Ok(());
        }
        let Some((held, shipped)) = self.held.take() else {
            return Ok(());
        };
        // The engine contract's watermark decides: everything we spooled is published
        // (and no lease holds the stream back).
        let w = self.cp.watermark(&self.db).await?;
        if self.unpublished || Some(w.watermark) != w.wal_end {
            tracing::debug!(db = %self.db, unpublished = self.unpublished, watermark = w.watermark, wal_end = ?w.wal_end, "WAL reset deferred: the watermark is behind");
            self.held = Some((held, shipped));
            return Ok(());
        }
        let next = self.next_lsn().await?;
        let spool = self.spool.clone();
        let now_ms = self.cp.env.now_ms();
        let mut written = None;
        let t = self
            .control
            .truncate_wal(held, &shipped, |snap, (first, last)| {
                if first > last {
                    return Ok::<_, CairnError>(());
                }
                let frames = snap.read_frames(first, last)?;
                let header = header_of(snap, SegmentKind::Frames, first, now_ms);
                let name = segment_name(next, now_ms, SegmentKind::Frames);
                let n = spool.write(&name, &header, &frames)?;
                let pages: Vec<u64> = frame_pages(&frames, snap.page_size()).collect();
                written = Some((n, u64::from(last - first + 1), pages));
                Ok(())
            })?;
        if let Some((n, frames, pages)) = written {
            self.report.bytes_shipped += n;
            self.report.segments += 1;
            self.report.frames += frames;
            self.since_page += n;
            if let Some(c) = &mut self.changed {
                c.extend(pages);
            }
            self.unpublished = true;
        }
        if t.truncated {
            self.report.wal_truncations += 1;
        }
        tracing::debug!(db = %self.db, truncated = t.truncated, backfilled = t.snapshot.backfilled(), wal_len = self.control.wal_len(), "WAL reset tried");
        self.held = Some((Arc::new(t.snapshot), t.locked));
        self.publish().await
    }

    /// Before a WAL reset takes the write lock: ships, publishes and checkpoints what was
    /// committed since the held snapshot, without holding the application's writers off,
    /// until fewer than [`LOCKED_FRAMES`] are left; false if more still are after
    /// [`PRECOPY_ROUNDS`] rounds. What remains is all the reset ships and copies with
    /// writers held off, so a writer committing at full speed waits for a few MiB, not for
    /// everything it wrote during the step.
    async fn precopy(&mut self) -> Result<bool, CairnError> {
        for round in 0..=PRECOPY_ROUNDS {
            let Some((held, shipped)) = self.held.clone() else {
                return Ok(true);
            };
            let opened_ms = self.cp.env.now_ms();
            let snap = snapshot(self.src.clone(), Some(held)).await?;
            match frames_to_ship(&shipped, &snap) {
                Ok((first, last)) if last >= first && last - first >= LOCKED_FRAMES => {}
                // Little left, or a lost position (which the reset reports).
                _ => return Ok(true),
            }
            if round == PRECOPY_ROUNDS {
                return Ok(false);
            }
            self.ship(&snap, Some(&shipped)).await?;
            let now = Shipped::at(&snap, Some(&shipped));
            self.held = Some((Arc::new(snap), now));
            self.held_ms = Some(opened_ms);
            self.control.passive()?;
            self.publish().await?;
        }
        Ok(false)
    }
}

/// A WAL reset takes the write lock once fewer than this many frames are left to ship
/// (see [`Run::precopy`]).
const LOCKED_FRAMES: u32 = 4096;

/// The most rounds of shipping before a WAL reset takes the write lock anyway.
const PRECOPY_ROUNDS: usize = 3;
