//! Cancelling running jobs, and watching their progress.
//!
//! Contract: [`CancelHandle::cancel`] asks a job to stop. The job notices at its safe
//! points ([`crate::Checkpointer::check_cancel`]) and, wherever it is waiting, within
//! moments: the runner races each attempt against the cancel and drops the attempt (its
//! uploads are aborted with it), unless the job has entered publication
//! ([`Cancels::shield`]): once a manifest create may have happened, the job finishes. A
//! cancelled job publishes nothing. In memory only: a crash cancels nothing, and the
//! resumed job runs on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cairn_core::JobId;
use dashmap::DashMap;
use tokio::sync::{watch, Notify};

use super::{JobState, Phase, Progress};

/// The cancel state of one job.
#[derive(Default)]
pub(crate) struct CancelState {
    requested: AtomicBool,
    shielded: AtomicBool,
    notify: Notify,
}

impl CancelState {
    /// Completes once a cancel is requested while the job is not shielded.
    pub(crate) async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            if self.requested.load(Ordering::SeqCst) && !self.shielded.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// Asks one job to stop; cheap to clone and send to another task.
#[derive(Clone)]
pub struct CancelHandle {
    job: JobId,
    state: Arc<CancelState>,
}

impl std::fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelHandle")
            .field("job", &self.job)
            .finish()
    }
}

impl CancelHandle {
    /// The job this handle cancels.
    pub fn job(&self) -> JobId {
        self.job
    }

    /// Asks the job to stop. A job that already entered publication finishes instead.
    pub fn cancel(&self) {
        self.state.requested.store(true, Ordering::SeqCst);
        self.state.notify.notify_waiters();
    }
}

/// Where a job is, as its progress watchers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEvent {
    /// The job.
    pub id: JobId,
    /// Its life state.
    pub state: JobState,
    /// The step it reached.
    pub phase: Phase,
    /// Units and bytes done.
    pub progress: Progress,
}

/// Cancel states and progress channels of the jobs of one process.
#[derive(Default)]
pub(crate) struct Cancels {
    states: DashMap<JobId, Arc<CancelState>>,
    watchers: DashMap<JobId, watch::Sender<JobEvent>>,
}

impl Cancels {
    pub(crate) fn state(&self, id: JobId) -> Arc<CancelState> {
        Arc::clone(self.states.entry(id).or_default().value())
    }

    pub(crate) fn handle(&self, id: JobId) -> CancelHandle {
        CancelHandle {
            job: id,
            state: self.state(id),
        }
    }

    /// Marks the job as publishing: from now on a cancel is not honoured. Fails if a cancel
    /// came first.
    pub(crate) fn shield(&self, id: JobId) -> bool {
        let s = self.state(id);
        s.shielded.store(true, Ordering::SeqCst);
        if s.requested.load(Ordering::SeqCst) {
            s.shielded.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// A watch of the job's progress, starting at `now`.
    pub(crate) fn watch(&self, now: JobEvent) -> watch::Receiver<JobEvent> {
        self.watchers
            .entry(now.id)
            .or_insert_with(|| watch::channel(now.clone()).0)
            .subscribe()
    }

    /// Tells the job's watchers where it is.
    pub(crate) fn publish(&self, event: JobEvent) {
        if let Some(tx) = self.watchers.get(&event.id) {
            tx.send_replace(event);
        }
    }

    /// Drops the job's in-process state once it ended (watchers keep its last event).
    pub(crate) fn forget(&self, id: JobId) {
        self.states.remove(&id);
        self.watchers.remove(&id);
    }
}
