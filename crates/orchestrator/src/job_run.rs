//! Handles of enqueued restore, verify and collection jobs ([`JobRun`]): the job's id, a
//! cancel handle and a watch of its progress, available before it runs; awaiting the
//! handle runs the job to its end and yields its report.
//!
//! Contract: a handle is made once the job is persisted (or holds why it could not be
//! enqueued, returned when it is awaited); awaiting it is [`Checkpointer::run_job`], and
//! the watch from [`JobRun::progress`] sees every step the job persists until it ends (then
//! the watch closes, keeping the last event). Crash: the job is durable from its enqueue,
//! so a process killed while it runs, or a handle dropped without being awaited, leaves a
//! job that [`Checkpointer::resume`] runs. Retries: the runner's. Cancellation:
//! [`JobRun::cancel_handle`], or dropping the future.

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use cairn_core::JobId;
use tokio::sync::watch;

use crate::queue::{CancelHandle, JobEvent};
use crate::{CairnError, Checkpointer, JobOutcome};

/// An enqueued job whose report is an `R`: its id, a cancel handle and a watch of its
/// progress; awaiting it runs the job to its end. Made by [`Checkpointer::restore_job`],
/// [`Checkpointer::verify_job`] and [`Checkpointer::gc_job`].
#[must_use = "a job runs only when it is awaited"]
pub struct JobRun<'a, R> {
    cp: &'a Checkpointer,
    job: Result<JobId, CairnError>,
    /// The job's kind, for the error when its outcome is of another.
    expected: &'static str,
    /// The report, when the outcome is of the expected kind.
    report: fn(JobOutcome) -> Option<R>,
}

impl<'a, R> JobRun<'a, R> {
    pub(crate) fn new(
        cp: &'a Checkpointer,
        job: Result<JobId, CairnError>,
        expected: &'static str,
        report: fn(JobOutcome) -> Option<R>,
    ) -> Self {
        Self {
            cp,
            job,
            expected,
            report,
        }
    }

    /// The checkpointer that runs it.
    pub(crate) fn checkpointer(&self) -> &'a Checkpointer {
        self.cp
    }

    /// The job's id (or why it could not be enqueued).
    pub fn id(&self) -> Result<JobId, &CairnError> {
        self.job.as_ref().copied()
    }

    /// A handle that cancels the job from any task.
    pub fn cancel_handle(&self) -> Option<CancelHandle> {
        self.job.as_ref().ok().map(|id| self.cp.cancel_handle(*id))
    }

    /// A watch of the job's state, phase and progress.
    pub fn progress(&self) -> Option<watch::Receiver<JobEvent>> {
        self.job
            .as_ref()
            .ok()
            .and_then(|id| self.cp.watch_job(*id).ok())
    }

    /// Runs the job to its end (what awaiting the handle does).
    pub async fn wait(self) -> Result<R, CairnError> {
        let id = self.job?;
        let outcome = self.cp.run_job(id).await?;
        (self.report)(outcome).ok_or_else(|| CairnError::UnexpectedOutcome {
            job: id.to_string(),
            expected: self.expected,
        })
    }
}

impl<'a, R: Send + 'a> IntoFuture for JobRun<'a, R> {
    type Output = Result<R, CairnError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}
