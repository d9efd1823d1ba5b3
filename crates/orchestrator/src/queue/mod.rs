//! The durable job queue: one module owning job state.
//!
//! Contract: every checkpoint, restore, verify and collection (GC) is a [`JobRecord`] in the state
//! database, written before any work starts ([`Checkpointer::enqueue`]). While a job runs,
//! its [`Job`] handle holds the record in memory and is the only thing that changes it:
//! every change is persisted with the step's typed items ([`Item`]) in one synced batch,
//! so the in-memory record and the stored one never disagree and nothing reloads it. Large
//! inputs (an engine's dirty pages) are items written once at enqueue, not part of the
//! record that every step re-writes.
//!
//! Crash: a job killed at any instant leaves its record at the last step it persisted,
//! with exactly that step's items; a `running` job found at open belonged to a dead
//! process (one process owns a state directory) and is resumed by the runner. Retries and
//! backoff are the runner's ([`crate::runner`]). Cancellation: [`Checkpointer::cancel`]
//! cancels a running job within moments (see the `cancel` module); a queued job is
//! cancelled at once.

mod cancel;
mod items;
mod record;

use cairn_core::JobId;
use tokio::sync::watch;

pub(crate) use cancel::Cancels;
pub use cancel::{CancelHandle, JobEvent};
pub(crate) use items::{
    ChunkItem, CkptPlan, Item, JobItems, Outcome, PlanBody, SegItem, SqlitePlan,
};
pub use record::{
    backoff_ms, JobRecord, JobSpec, JobState, JobStatus, Phase, Progress, MAX_ATTEMPTS, MAX_STARTS,
};

use crate::{CairnError, Checkpointer};

/// A job being run (or about to be): the record in memory, persisted on every change.
pub(crate) struct Job<'a> {
    cp: &'a Checkpointer,
    rec: JobRecord,
}

impl<'a> Job<'a> {
    /// The job's identity.
    pub(crate) fn id(&self) -> JobId {
        self.rec.id
    }

    /// The record as last persisted.
    pub(crate) fn rec(&self) -> &JobRecord {
        &self.rec
    }

    /// Changes the record and persists it with `items`, in one synced batch.
    pub(crate) fn update(
        &mut self,
        change: impl FnOnce(&mut JobRecord),
        items: &[Item<'_>],
    ) -> Result<(), CairnError> {
        self.write(change, items, true)
    }

    /// [`Job::update`] for one unit of progress (a chunk or segment staged or restored):
    /// one batch, not fsynced. A killed process keeps it; a power loss may drop it, and
    /// the next attempt then does that unit again. The next synced update (every phase
    /// change is one) makes it durable, so nothing after a phase depends on it.
    pub(crate) fn progress(
        &mut self,
        change: impl FnOnce(&mut JobRecord),
        items: &[Item<'_>],
    ) -> Result<(), CairnError> {
        self.write(change, items, false)
    }

    fn write(
        &mut self,
        change: impl FnOnce(&mut JobRecord),
        items: &[Item<'_>],
        sync: bool,
    ) -> Result<(), CairnError> {
        let mut next = self.rec.clone();
        change(&mut next);
        next.updated_ms = self.cp.env.now_ms();
        let encoded: Vec<_> = items
            .iter()
            .map(|i| i.encode(next.id))
            .collect::<Result<_, _>>()?;
        let writes: Vec<cairn_state::ItemWrite<'_>> =
            encoded.iter().map(|(k, v)| (*k, v.as_deref())).collect();
        if sync {
            self.cp.state.put_job(next.id, &next.encode()?, &writes)?;
        } else {
            self.cp
                .state
                .put_job_relaxed(next.id, &next.encode()?, &writes)?;
        }
        // The job's span (see `Checkpointer::run_job`) carries where it is.
        if self.rec.phase != next.phase {
            tracing::Span::current().record("phase", tracing::field::debug(next.phase));
        }
        if let (Some(g), true) = (next.generation, self.rec.generation != next.generation) {
            tracing::Span::current().record("generation", g);
        }
        self.rec = next;
        self.cp.cancels.publish(event(&self.rec));
        Ok(())
    }

    /// Persists items with the record as it is (the heartbeat moves).
    pub(crate) fn save(&mut self, items: &[Item<'_>]) -> Result<(), CairnError> {
        self.update(|_| {}, items)
    }

    /// The record `change` would give, encoded, for a batch committed elsewhere (the
    /// publish batch). Call [`Job::committed`] once that batch is durable.
    pub(crate) fn prepare(
        &self,
        change: impl FnOnce(&mut JobRecord),
    ) -> Result<(JobRecord, Vec<u8>), CairnError> {
        let mut next = self.rec.clone();
        change(&mut next);
        next.updated_ms = self.cp.env.now_ms();
        let bytes = next.encode()?;
        Ok((next, bytes))
    }

    /// Adopts a record prepared with [`Job::prepare`] whose batch has committed.
    pub(crate) fn committed(&mut self, rec: JobRecord) {
        self.rec = rec;
        self.cp.cancels.publish(event(&self.rec));
    }

    /// Every item the job has persisted.
    pub(crate) fn items(&self) -> Result<JobItems, CairnError> {
        JobItems::decode(self.id(), self.cp.state.job_items(self.id())?)
    }

    /// Deletes every item of the job (its record stays).
    pub(crate) fn clear_items(&self) -> Result<(), CairnError> {
        Ok(self.cp.state.delete_job(self.id(), false)?)
    }
}

impl Checkpointer {
    /// Persists a new job; it runs when [`Checkpointer::run_job`] or
    /// [`Checkpointer::resume`] is called.
    pub fn enqueue(&self, spec: JobSpec) -> Result<JobId, CairnError> {
        self.enqueue_with(spec, &[])
    }

    /// [`Checkpointer::enqueue`] with items written in the same batch as the new record.
    pub(crate) fn enqueue_with(
        &self,
        spec: JobSpec,
        items: &[Item<'_>],
    ) -> Result<JobId, CairnError> {
        let now = self.env.now_ms();
        let rec = JobRecord {
            id: JobId(self.env.next_u64()),
            seq: self.state.next_counter("jobs")?,
            tenant: self.cfg.tenant.clone(),
            spec,
            state: JobState::Queued,
            phase: Phase::New,
            attempts: 0,
            last_error: None,
            not_before_ms: 0,
            created_ms: now,
            updated_ms: now,
            owner: None,
            progress: Progress::default(),
            generation: None,
            result: None,
        };
        let id = rec.id;
        Job { cp: self, rec }.save(items)?;
        Ok(id)
    }

    /// A job's record.
    pub fn job(&self, id: JobId) -> Result<JobRecord, CairnError> {
        match self.state.job(id)? {
            Some(b) => JobRecord::decode(id, &b),
            None => Err(CairnError::UnknownJob {
                job: id.to_string(),
            }),
        }
    }

    /// The handle of a job, from its stored record.
    pub(crate) fn job_handle(&self, id: JobId) -> Result<Job<'_>, CairnError> {
        Ok(Job {
            cp: self,
            rec: self.job(id)?,
        })
    }

    /// Every job recorded in this state directory, oldest first.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, CairnError> {
        let mut out = self
            .state
            .jobs()?
            .into_iter()
            .map(|(id, b)| JobRecord::decode(id, &b))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|r| r.seq);
        Ok(out)
    }

    /// Asks a job to stop (see [`CancelHandle::cancel`]). A queued job is cancelled at once.
    pub fn cancel(&self, id: JobId) -> Result<(), CairnError> {
        let mut job = self.job_handle(id)?;
        self.cancels.handle(id).cancel();
        if job.rec().state == JobState::Queued && job.rec().phase == Phase::New {
            job.update(|r| r.state = JobState::Cancelled, &[])?;
            self.cancels.forget(id);
        }
        Ok(())
    }

    /// A handle that cancels the job from anywhere (see [`CancelHandle::cancel`]).
    pub fn cancel_handle(&self, id: JobId) -> CancelHandle {
        self.cancels.handle(id)
    }

    /// A watch of the job's state, phase and progress, updated at every step it persists.
    pub fn watch_job(&self, id: JobId) -> Result<watch::Receiver<JobEvent>, CairnError> {
        Ok(self.cancels.watch(event(&self.job(id)?)))
    }

    /// Fails with [`CairnError::Cancelled`] once the job was asked to stop.
    pub(crate) fn check_cancel(&self, id: JobId) -> Result<(), CairnError> {
        if self.cancels.state(id).is_requested() {
            Err(CairnError::Cancelled {
                job: id.to_string(),
            })
        } else {
            Ok(())
        }
    }

    /// Enters publication: a cancel from now on is not honoured (it might land after the
    /// manifest create). Fails if the job was cancelled before.
    pub(crate) fn enter_publication(&self, id: JobId) -> Result<(), CairnError> {
        if self.cancels.shield(id) {
            Ok(())
        } else {
            Err(CairnError::Cancelled {
                job: id.to_string(),
            })
        }
    }
}

fn event(r: &JobRecord) -> JobEvent {
    JobEvent {
        id: r.id,
        state: r.state,
        phase: r.phase,
        progress: r.progress.clone(),
    }
}
