//! Progress bars of the one-shot commands (`checkpoint`, `restore`, `verify`, `gc`): a
//! job's progress watch drawn on stderr as an indicatif bar (bytes, rate, ETA; blobs when
//! a job counts no bytes; a spinner while the total is unknown), cleared when the command
//! ends. Drawn only when stderr is a terminal and `--json` is not given, so scripts and
//! tests that pipe stderr see nothing of it.

use std::future::IntoFuture;
use std::io::IsTerminal;
use std::time::Duration;

use cairn_orchestrator::{JobEvent, Phase, Progress};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;

/// Whether a bar is drawn: on a terminal, and never with `--json`.
pub fn enabled(json: bool, stderr_is_terminal: bool) -> bool {
    !json && stderr_is_terminal
}

/// What the bar shows for a job's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Bytes of a known total.
    Bytes { done: u64, total: u64 },
    /// Units (chunks, segments, blobs) of a known total, when the job counts no bytes.
    Units { done: u64, total: u64 },
    /// Nothing planned yet: a spinner.
    Spinner,
}

impl Shape {
    /// The shape of `p`: bytes when the plan has any, else units, else a spinner.
    pub fn of(p: &Progress) -> Self {
        if p.bytes_total > 0 {
            Shape::Bytes {
                done: p.bytes_done.min(p.bytes_total),
                total: p.bytes_total,
            }
        } else if p.total > 0 {
            Shape::Units {
                done: p.done.min(p.total),
                total: p.total,
            }
        } else {
            Shape::Spinner
        }
    }

    /// The bar's length and position (`None` for a spinner).
    pub fn extent(self) -> Option<(u64, u64)> {
        match self {
            Shape::Bytes { done, total } | Shape::Units { done, total } => Some((total, done)),
            Shape::Spinner => None,
        }
    }

    fn template(self) -> &'static str {
        match self {
            Shape::Bytes { .. } => {
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}, ETA {eta} {msg}"
            }
            Shape::Units { .. } => {
                "{prefix} [{bar:30}] {human_pos}/{human_len} {per_sec}, ETA {eta} {msg}"
            }
            Shape::Spinner => "{spinner} {prefix} {msg} {elapsed}",
        }
    }

    fn same_kind(self, other: Self) -> bool {
        std::mem::discriminant(&self) == std::mem::discriminant(&other)
    }
}

/// A bar following one job's events.
struct Drawer {
    bar: ProgressBar,
    shape: Option<Shape>,
}

impl Drawer {
    /// A drawer whose bar shows `first`, set up while hidden (so nothing half-styled is
    /// drawn), then drawn on `target` and ticking.
    fn new(
        bar: ProgressBar,
        target: ProgressDrawTarget,
        what: &'static str,
        first: &JobEvent,
    ) -> Self {
        bar.set_draw_target(ProgressDrawTarget::hidden());
        bar.set_prefix(what);
        let mut d = Self { bar, shape: None };
        d.apply(first);
        d.bar.set_draw_target(target);
        d.bar.enable_steady_tick(Duration::from_millis(120));
        d
    }

    /// Shows `ev`: length and position, the style when the shape changes, then the phase
    /// (the one draw that sees all of it).
    fn apply(&mut self, ev: &JobEvent) {
        let shape = Shape::of(&ev.progress);
        match shape.extent() {
            Some((len, pos)) => {
                let replanned = self.bar.length() != Some(len);
                self.bar.set_length(len);
                self.bar.set_position(pos);
                if replanned {
                    // Work done before (a resumed job's) is not this run's rate.
                    self.bar.reset_eta();
                }
            }
            None => self.bar.unset_length(),
        }
        if !self.shape.is_some_and(|s| s.same_kind(shape)) {
            self.bar.set_style(style(shape));
        }
        self.bar.set_message(phase(ev.phase));
        self.shape = Some(shape);
    }
}

/// The phase a job reached, as the bar shows it (nothing before its first step).
fn phase(p: Phase) -> String {
    match p {
        Phase::New => String::new(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The bar's style for `shape`.
fn style(shape: Shape) -> ProgressStyle {
    ProgressStyle::with_template(shape.template())
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Awaits `run`, drawing `progress` on stderr meanwhile when a bar is [`enabled`]; the bar
/// is cleared when `run` ends, however it ends.
pub async fn show<F: IntoFuture>(
    what: &'static str,
    json: bool,
    progress: Option<watch::Receiver<JobEvent>>,
    run: F,
) -> F::Output {
    match (enabled(json, std::io::stderr().is_terminal()), progress) {
        (true, Some(rx)) => {
            let target = ProgressDrawTarget::stderr();
            drive(ProgressBar::hidden(), target, what, rx, run).await
        }
        _ => run.await,
    }
}

/// Awaits `run` while `bar`, drawn on `target`, follows `rx`; then clears the bar.
async fn drive<F: IntoFuture>(
    bar: ProgressBar,
    target: ProgressDrawTarget,
    what: &'static str,
    mut rx: watch::Receiver<JobEvent>,
    run: F,
) -> F::Output {
    let first = rx.borrow_and_update().clone();
    let mut drawer = Drawer::new(bar, target, what, &first);
    let run = run.into_future();
    tokio::pin!(run);
    let mut open = true;
    let out = loop {
        tokio::select! {
            out = &mut run => break out,
            changed = rx.changed(), if open => match changed {
                Ok(()) => drawer.apply(&rx.borrow_and_update()),
                // The job ended and its channel closed: wait for the run alone.
                Err(_) => open = false,
            },
        }
    };
    drawer.bar.finish_and_clear();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_orchestrator::{JobId, JobState};

    fn event(phase: Phase, progress: Progress) -> JobEvent {
        JobEvent {
            id: JobId(1),
            state: JobState::Running,
            phase,
            progress,
        }
    }

    fn progress(done: u64, total: u64, bytes_done: u64, bytes_total: u64) -> Progress {
        Progress {
            done,
            total,
            bytes_done,
            bytes_total,
        }
    }

    #[test]
    fn drawn_only_on_a_terminal_without_json() {
        assert!(enabled(false, true));
        assert!(!enabled(true, true));
        assert!(!enabled(false, false));
        assert!(!enabled(true, false));
    }

    #[test]
    fn shapes_follow_what_the_job_counts() {
        assert_eq!(Shape::of(&Progress::default()), Shape::Spinner);
        assert_eq!(Shape::Spinner.extent(), None);
        let bytes = Shape::of(&progress(1, 4, 100, 400));
        assert_eq!(
            bytes,
            Shape::Bytes {
                done: 100,
                total: 400
            }
        );
        assert_eq!(bytes.extent(), Some((400, 100)));
        // A shallow verify counts blobs only.
        let units = Shape::of(&progress(3, 7, 0, 0));
        assert_eq!(units, Shape::Units { done: 3, total: 7 });
        assert_eq!(units.extent(), Some((7, 3)));
        // Never past the end.
        assert_eq!(
            Shape::of(&progress(9, 7, 500, 400)).extent(),
            Some((400, 400))
        );
        assert!(Shape::Bytes { done: 0, total: 1 }.same_kind(bytes));
        assert!(!units.same_kind(bytes));
    }

    #[test]
    fn templates_parse() {
        for s in [
            Shape::Spinner,
            Shape::Units { done: 0, total: 1 },
            Shape::Bytes { done: 0, total: 1 },
        ] {
            assert!(ProgressStyle::with_template(s.template()).is_ok(), "{s:?}");
        }
    }

    #[test]
    fn events_set_length_position_and_phase() {
        let mut d = Drawer::new(
            ProgressBar::hidden(),
            ProgressDrawTarget::hidden(),
            "restore",
            &event(Phase::New, Progress::default()),
        );
        assert_eq!(d.bar.length(), None);
        assert_eq!(d.bar.message(), "");
        d.apply(&event(Phase::Planned, progress(0, 4, 0, 4096)));
        assert_eq!((d.bar.length(), d.bar.position()), (Some(4096), 0));
        d.apply(&event(Phase::Planned, progress(2, 4, 2048, 4096)));
        assert_eq!((d.bar.length(), d.bar.position()), (Some(4096), 2048));
        assert_eq!(d.bar.message(), "planned");
        assert_eq!(d.bar.prefix(), "restore");
    }

    #[tokio::test]
    async fn the_bar_follows_the_job_and_is_cleared_at_the_end() {
        let (tx, rx) = watch::channel(event(Phase::New, Progress::default()));
        let bar = ProgressBar::hidden();
        let seen = bar.clone();
        let run = async move {
            tx.send_replace(event(Phase::Planned, progress(1, 2, 10, 20)));
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let at = (seen.length(), seen.position());
            drop(tx);
            tokio::time::sleep(Duration::from_millis(5)).await;
            at
        };
        let bar_after = bar.clone();
        let at = drive(bar, ProgressDrawTarget::hidden(), "checkpoint", rx, run).await;
        assert_eq!(at, (Some(20), 10));
        assert!(bar_after.is_finished());
    }

    #[tokio::test]
    async fn without_a_bar_the_run_is_awaited_as_is() {
        // Tests run with stderr piped (not a terminal), and `--json` never draws.
        let (_tx, rx) = watch::channel(event(Phase::New, Progress::default()));
        assert_eq!(show("gc", true, Some(rx), async { 7 }).await, 7);
        assert_eq!(show("gc", false, None, async { 8 }).await, 8);
    }
}
