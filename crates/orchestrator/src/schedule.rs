//! Scheduled checkpoints of a page file or a directory of sealed segments, for a
//! long-running service (`cairn replicate --config`): what `replicate` is for SQLite, this
//! is for the other engines' sources.
//!
//! Contract: a step runs every [`ScheduleOptions::interval`]. With [`Trigger::Change`], a
//! step first looks at the source ([`Look`]: a page file's length, inode and modification
//! time; a segment directory's segment names and lengths). If it looks as it did when the
//! last successful checkpoint of this run read it, the step publishes nothing (no empty
//! generation) and everything the source holds counts as durable. A page file's look is
//! trusted to stand for its bytes only once the modification time it saw is at least
//! [`SETTLE`] older than the look, so a write in the same coarse timestamp tick as the look
//! still makes the next step checkpoint; a segment directory's always is (sealed segments
//! never change, so their names and lengths are the contents). With [`Trigger::Interval`]
//! every step checkpoints. The observer is told of every checkpoint and step, as
//! replication tells it
//! ([`ReplicateStatus::durable_ms`] is when the newest durable look was taken).
//!
//! Crash: a checkpoint is a durable job (resumed by the next open); the schedule itself
//! keeps nothing, so a restarted schedule checkpoints at its first step. Retries: a step
//! that fails with a transient error is logged, counted and tried again after a backoff
//! (the interval, doubled per failure in a row, capped at [`ScheduleOptions::max_backoff`]);
//! a permanent error ends the run. Cancellation: the stop signal is honoured between
//! steps and during a backoff; a checkpoint in hand when it comes is cancelled (a job that
//! entered publication finishes instead), so nothing half-done is published and the
//! service exits promptly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_core::DbId;
use serde::Serialize;
use tokio::sync::watch;

use crate::checkpoint::FileStamp;
use crate::replicate::observe::{failed_step, pause, published_status};
use crate::{CairnError, CheckpointReport, Checkpointer, ReplicateObserver, Source};
use crate::{CheckpointOptions, ReplicateStatus};

/// A look is trusted once the modification time it saw is this much older than the look.
pub const SETTLE: Duration = Duration::from_secs(2);

/// When a scheduled step checkpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Every step whose source changed since the last checkpoint (see the module docs).
    #[default]
    Change,
    /// Every step.
    Interval,
}

/// How a schedule runs.
#[derive(Clone, Debug)]
pub struct ScheduleOptions {
    /// Time between steps.
    pub interval: Duration,
    /// When a step checkpoints.
    pub trigger: Trigger,
    /// The longest wait after failed steps.
    pub max_backoff: Duration,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            trigger: Trigger::Change,
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// What a schedule did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScheduleReport {
    /// Database.
    pub db: String,
    /// The source path.
    pub source: String,
    /// `pages` or `segments`.
    pub kind: &'static str,
    /// Steps run.
    pub steps: u64,
    /// Steps that failed with a transient error and were retried.
    pub steps_failed: u64,
    /// Checkpoints published.
    pub checkpoints: u64,
    /// Steps that found the source unchanged and published nothing.
    pub unchanged: u64,
    /// The newest generation published.
    pub generation: Option<u64>,
}

/// How a source looked at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Look {
    /// A page file's stamp.
    Pages(Option<FileStamp>),
    /// A segment directory's segments (name, length), in name order.
    Segments(Vec<(String, u64)>),
}

impl Look {
    /// How `source` looks now, at `look_ms`, and whether the look can be trusted to stand
    /// for the contents (see the module docs).
    fn of(source: &Source, look_ms: u64) -> Result<(Self, bool), CairnError> {
        match source {
            Source::Pages { path, .. } => {
                let stamp = FileStamp::of(path);
                let look_at = std::time::UNIX_EPOCH + Duration::from_millis(look_ms);
                let settled = stamp.is_some_and(|s| {
                    look_at
                        .duration_since(s.modified())
                        .is_ok_and(|age| age >= SETTLE)
                });
                Ok((Look::Pages(stamp), settled))
            }
            Source::Segments(dir) => {
                let files = cairn_executor::list_segments(dir)?;
                let names = files.into_iter().map(|f| (f.name, f.len)).collect();
                Ok((Look::Segments(names), true))
            }
            Source::Sqlite(p) => Err(not_scheduled(p)),
        }
    }
}

struct Schedule<'c> {
    cp: &'c Checkpointer,
    db: DbId,
    source: Source,
    opts: ScheduleOptions,
    observer: &'c dyn ReplicateObserver,
    report: ScheduleReport,
    /// The look the last successful checkpoint read, if trusted (settled).
    durable_look: Option<Look>,
    durable_ms: Option<u64>,
    started_ms: u64,
    failures: u32,
}

impl Checkpointer {
    /// Checkpoints `source` (a page file or segment directory) as `db` on the schedule of
    /// `opts` until `stop` turns true (see the module docs), telling `observer` of every
    /// checkpoint and step.
    pub async fn run_schedule(
        &self,
        db: &DbId,
        source: &Source,
        opts: &ScheduleOptions,
        mut stop: watch::Receiver<bool>,
        observer: &dyn ReplicateObserver,
    ) -> Result<ScheduleReport, CairnError> {
        let source = match source {
            Source::Pages { path, page_size } => Source::Pages {
                path: absolute(path)?,
                page_size: *page_size,
            },
            Source::Segments(dir) => Source::Segments(absolute(dir)?),
            Source::Sqlite(p) => return Err(not_scheduled(p)),
        };
        let mut s = Schedule {
            cp: self,
            db: db.clone(),
            report: ScheduleReport {
                db: db.to_string(),
                source: match &source {
                    Source::Pages { path, .. } | Source::Segments(path) | Source::Sqlite(path) => {
                        path.display().to_string()
                    }
                },
                kind: source.kind().as_str(),
                ..Default::default()
            },
            source,
            opts: opts.clone(),
            observer,
            durable_look: None,
            durable_ms: None,
            started_ms: self.env.now_ms(),
            failures: 0,
        };
        let mut tick = tokio::time::interval(s.opts.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        while !*stop.borrow() {
            let result = s.step(&mut stop).await;
            if matches!(result, Err(CairnError::Cancelled { .. })) && *stop.borrow() {
                // The stop cancelled the step's checkpoint: it published nothing.
                break;
            }
            s.report.steps += 1;
            match result {
                Ok(()) => {
                    s.failures = 0;
                    s.observe(None, None);
                }
                Err(e) if e.is_retryable() && !*stop.borrow() => {
                    s.report.steps_failed += 1;
                    let limits = (s.opts.interval, s.opts.max_backoff);
                    let wait =
                        failed_step(&mut s.failures, &s.db, &e, "scheduled checkpoint", limits);
                    s.observe(Some(&e), Some(wait));
                    pause(wait, &mut stop).await;
                    tick.reset();
                    continue;
                }
                Err(e) => {
                    s.failures = s.failures.saturating_add(1);
                    s.observe(Some(&e), None);
                    return Err(e);
                }
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => {}
            }
        }
        Ok(s.report)
    }
}

fn not_scheduled(p: &Path) -> CairnError {
    CairnError::Config {
        what: format!("scheduled source {}", p.display()),
        reason: "a SQLite database is replicated, not scheduled (cairn replicate)".into(),
    }
}

fn absolute(p: &Path) -> Result<PathBuf, CairnError> {
    std::path::absolute(p).map_err(|e| CairnError::Config {
        what: format!("source {}", p.display()),
        reason: e.to_string(),
    })
}

impl Schedule<'_> {
    /// One step: look, and checkpoint unless nothing changed.
    async fn step(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), CairnError> {
        let look_ms = self.cp.env.now_ms();
        let src = self.source.clone();
        let (look, settled) = tokio::task::spawn_blocking(move || Look::of(&src, look_ms))
            .await
            .map_err(|source| CairnError::Join {
                job: "schedule".into(),
                what: "source look",
                source,
            })??;
        if self.opts.trigger == Trigger::Change && self.durable_look.as_ref() == Some(&look) {
            self.report.unchanged += 1;
            self.durable_ms = Some(look_ms);
            return Ok(());
        }
        self.checkpoint(stop).await?;
        self.report.checkpoints += 1;
        self.durable_ms = Some(look_ms);
        // An unsettled look may hide a write in the same timestamp tick: the next step
        // checkpoints again rather than trust it.
        self.durable_look = settled.then_some(look);
        Ok(())
    }

    async fn checkpoint(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), CairnError> {
        let kind = self.source.kind();
        let run = self
            .cp
            .checkpoint_with(&self.db, &self.source, &CheckpointOptions::default());
        let cancel = run.cancel_handle();
        self.observer.checkpoint_started(kind);
        let t = Instant::now();
        let fut = std::future::IntoFuture::into_future(run);
        tokio::pin!(fut);
        let r: Result<CheckpointReport, CairnError> = tokio::select! {
            r = &mut fut => r,
            _ = stop.changed() => {
                if let Some(c) = &cancel {
                    c.cancel();
                }
                fut.await
            }
        };
        self.observer
            .checkpoint_finished(kind, t.elapsed(), r.as_ref());
        let r = r?;
        self.report.generation = Some(r.generation);
        Ok(())
    }

    fn observe(&self, error: Option<&CairnError>, wait: Option<Duration>) {
        let p = published_status(self.cp, &self.db);
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
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Mutex;

    use super::*;
    use crate::{Config, Env};
    use cairn_remote_store::{RemoteStore, StoreConfig};

    /// Keeps the newest status.
    #[derive(Default)]
    struct Last(Mutex<Option<ReplicateStatus>>);

    impl ReplicateObserver for Last {
        fn step_finished(&self, status: &ReplicateStatus) {
            *self.0.lock().unwrap() = Some(status.clone());
        }
    }

    impl Last {
        fn steps(&self) -> u64 {
            self.0.lock().unwrap().as_ref().map_or(0, |s| s.steps)
        }
    }

    /// A checkpointer whose clock is `ahead` of the system's, so files written now have
    /// settled by its clock (or, with zero, have not).
    fn open(state: &Path, ahead: Duration) -> Checkpointer {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let store = RemoteStore::open_with("memory://schedule", StoreConfig::default()).unwrap();
        let env = Env::fixed((now + ahead).as_millis() as u64, 3);
        Checkpointer::open_with(Config::new(state).unwrap(), store, env).unwrap()
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        let t = Instant::now();
        while !done() {
            assert!(t.elapsed() < Duration::from_secs(60), "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Runs a schedule of `trigger` on a page file, changes it once after `before` steps,
    /// and stops after `after` more; the report and the generations published.
    async fn scheduled(trigger: Trigger, ahead: Duration, steps: (u64, u64)) -> ScheduleReport {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("heap.pages");
        std::fs::write(&file, vec![1u8; 8 * 4096]).unwrap();
        let cp = open(&dir.path().join("state"), ahead);
        let db = DbId::new("heap").unwrap();
        let source = Source::Pages {
            path: file.clone(),
            page_size: 4096,
        };
        let opts = ScheduleOptions {
            interval: Duration::from_millis(10),
            trigger,
            max_backoff: Duration::from_millis(50),
        };
        let (tx, rx) = watch::channel(false);
        let last = Last::default();
        let run = cp.run_schedule(&db, &source, &opts, rx, &last);
        let drive = async {
            until("the first steps", || last.steps() >= steps.0).await;
            std::fs::write(&file, vec![2u8; 8 * 4096]).unwrap();
            let at = last.steps();
            until("the steps after the change", || {
                last.steps() >= at + steps.1
            })
            .await;
            tx.send(true).unwrap();
        };
        let (report, ()) = tokio::join!(run, drive);
        let report = report.unwrap();
        let gens = cp.list(&db).await.unwrap();
        assert_eq!(gens.len() as u64, report.checkpoints, "{report:?}");
        assert_eq!(
            report.steps,
            report.checkpoints + report.unchanged,
            "{report:?}"
        );
        report
    }

    #[tokio::test]
    async fn an_unchanged_source_publishes_nothing_and_a_change_is_checkpointed() {
        let r = scheduled(Trigger::Change, Duration::from_secs(60), (5, 5)).await;
        // The first look, and the one after the change.
        assert_eq!(r.checkpoints, 2, "{r:?}");
        assert!(r.unchanged >= 8, "{r:?}");
    }

    #[tokio::test]
    async fn an_unsettled_look_is_not_trusted() {
        // By this clock the file was written just now: every look may hide a write in the
        // same timestamp tick, so every step checkpoints.
        let r = scheduled(Trigger::Change, Duration::ZERO, (3, 3)).await;
        assert_eq!(r.unchanged, 0, "{r:?}");
    }

    #[tokio::test]
    async fn the_interval_trigger_checkpoints_every_step() {
        let r = scheduled(Trigger::Interval, Duration::from_secs(60), (3, 3)).await;
        assert_eq!(r.unchanged, 0, "{r:?}");
        assert!(r.checkpoints >= 6, "{r:?}");
    }
}
