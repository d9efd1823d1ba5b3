//! Running and resuming jobs.
//!
//! Contract: [`Checkpointer::run_job`] runs a queued (or orphaned running) job to its end.
//! An attempt that fails with a [`cairn_core::ErrorClass::Transient`] error sends the job
//! back to `queued` with an exponential backoff with jitter, up to
//! [`crate::queue::MAX_ATTEMPTS`]; any other error (permanent, fenced, corrupt) fails it
//! at once. A job that will not run again gives up its scratch, its items and, for a
//! restore, the partial target beside the destination.
//!
//! Crash: every transition is one synced batch of the job's record (see
//! [`crate::queue`]), and each start counts as an attempt before the work begins, so a job
//! that keeps killing its process is failed after [`crate::queue::MAX_STARTS`] starts
//! instead of being resumed forever. A checkpoint is recorded as `cleaned`/`succeeded`
//! before its scratch goes: a crash in between leaves only garbage for the janitor, never a
//! job that would publish again. Cancellation: see [`Checkpointer::cancel`]; uploads in
//! flight when an attempt ends are aborted with it.

use cairn_core::{DbId, JobId, Lsn};
use serde::Serialize;

use crate::queue::{backoff_ms, Job, JobSpec, JobState, Phase, MAX_ATTEMPTS, MAX_STARTS};
use crate::{CairnError, CheckpointReport, Checkpointer, RestoreReport, VerifyReport};

/// What a finished job produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum JobOutcome {
    /// A published checkpoint.
    Checkpoint(CheckpointReport),
    /// A restore.
    Restore(RestoreReport),
    /// A verification.
    Verify(VerifyReport),
    /// A garbage collection.
    Gc(crate::GcReport),
}

impl Checkpointer {
    /// Frees what a job that will not run again holds: its scratch, items and leases.
    fn release_job(&self, job: &Job<'_>) -> Result<(), CairnError> {
        let id = job.id();
        // Cleanup only: a scratch that cannot be removed now (read-only, say) must not
        // fail a job that is done, nor keep its items and leases; the janitor removes it
        // once it can (the job will not run again).
        if let Err(e) = self.scratch.remove_job(id) {
            tracing::warn!(job = %id, error = %e, "job scratch not removed; the janitor will");
        }
        self.state.delete_job(id, false)?;
        let (tenant, db) = (&job.rec().tenant, job.rec().spec.db());
        for l in self.state.leases(tenant, db)? {
            if l.holder == Some(id) {
                self.state.delete_lease(tenant, db, l.id)?;
            }
        }
        Ok(())
    }

    /// A job that will not run again gives up its scratch, its items and, for a restore,
    /// the partial file or directory beside the target.
    fn abandon_job(&self, job: &Job<'_>) -> Result<(), CairnError> {
        if let JobSpec::Restore { to, .. } = &job.rec().spec {
            cairn_executor::assemble::discard_partial(to)?;
        }
        self.release_job(job)
    }

    /// Ends a job that will not run again with `state`, keeping `error` as its last one.
    fn end_job(&self, mut job: Job<'_>, state: JobState, error: String) -> Result<(), CairnError> {
        job.update(
            |r| {
                r.state = state;
                r.last_error = Some(error);
            },
            &[],
        )?;
        self.abandon_job(&job)?;
        self.cancels.forget(job.id());
        Ok(())
    }

    /// Ends a job that waits in the queue (for its first run or a retry) as cancelled.
    pub(crate) fn end_queued(&self, id: JobId) -> Result<(), CairnError> {
        let job = self.job_handle(id)?;
        if job.rec().state == JobState::Queued {
            let e = CairnError::Cancelled {
                job: id.to_string(),
            };
            self.end_job(job, JobState::Cancelled, e.to_string())?;
        }
        Ok(())
    }

    /// Runs (or resumes) a job to its end, retrying transient failures with backoff.
    /// Everything it logs is inside a `job` span with the job id, kind, tenant and
    /// database, and the generation and phase as they become known.
    pub async fn run_job(&self, id: JobId) -> Result<JobOutcome, CairnError> {
        use tracing::field::Empty;
        use tracing::Instrument;
        let span = tracing::info_span!(
            "job",
            job = %id,
            kind = Empty,
            tenant = Empty,
            db = Empty,
            generation = Empty,
            phase = Empty
        );
        self.run_job_in_span(id).instrument(span).await
    }

    async fn run_job_in_span(&self, id: JobId) -> Result<JobOutcome, CairnError> {
        loop {
            let mut job = self.job_handle(id)?;
            let rec = job.rec();
            let span = tracing::Span::current();
            span.record("kind", rec.spec.kind());
            span.record("tenant", rec.tenant.as_str());
            span.record("db", rec.spec.db().as_str());
            span.record("phase", tracing::field::debug(rec.phase));
            if let Some(g) = rec.generation {
                span.record("generation", g);
            }
            if !rec.state.is_unfinished() {
                self.cancels.forget(id);
                return Err(CairnError::JobEnded {
                    job: id.to_string(),
                    state: format!("{:?}", rec.state).to_lowercase(),
                });
            }
            if rec.attempts >= MAX_STARTS {
                // Each start that never ended (the process died) counted; stop retrying.
                let error = format!(
                    "gave up after {} starts without finishing (last error: {})",
                    rec.attempts,
                    rec.last_error.as_deref().unwrap_or("none recorded")
                );
                self.end_job(job, JobState::Failed, error)?;
                return Err(CairnError::JobEnded {
                    job: id.to_string(),
                    state: "failed".into(),
                });
            }
            let cancel = self.cancels.state(id);
            let now = self.env.now_ms();
            if rec.not_before_ms > now {
                let wait = std::time::Duration::from_millis(rec.not_before_ms - now);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => {
                        let e = CairnError::Cancelled { job: id.to_string() };
                        self.end_job(job, JobState::Cancelled, e.to_string())?;
                        return Err(e);
                    }
                }
            }
            job.update(
                |r| {
                    r.state = JobState::Running;
                    r.attempts += 1;
                    r.owner = Some(std::process::id());
                },
                &[],
            )?;
            tracing::info!(attempt = job.rec().attempts, "job running");
            let spec = job.rec().spec.clone();
            let attempt = async {
                match spec {
                    JobSpec::Checkpoint {
                        db,
                        source,
                        chunk_size,
                        lsn,
                        stamp,
                    } => self
                        .run_checkpoint(&mut job, &db, &source, chunk_size, (lsn.map(Lsn), stamp))
                        .await
                        .map(JobOutcome::Checkpoint),
                    JobSpec::Restore {
                        db,
                        generation,
                        to,
                        lsn,
                    } => self
                        .run_restore(&mut job, &db, generation, lsn.map(Lsn), &to)
                        .await
                        .map(JobOutcome::Restore),
                    JobSpec::Verify {
                        db,
                        generation,
                        deep,
                    } => self
                        .run_verify(&mut job, &db, generation, deep)
                        .await
                        .map(JobOutcome::Verify),
                    JobSpec::Gc {
                        db,
                        keep_last,
                        keep_within_ms,
                        grace_ms,
                        dry_run,
                        explain,
                    } => {
                        let opts = crate::GcOptions {
                            keep_last,
                            keep_within: keep_within_ms.map(std::time::Duration::from_millis),
                            grace: std::time::Duration::from_millis(grace_ms),
                            dry_run,
                            explain,
                        };
                        self.run_gc(&mut job, &db, &opts).await.map(JobOutcome::Gc)
                    }
                }
            };
            // A cancel stops the attempt wherever it waits (its uploads are aborted with
            // it), unless the job entered publication.
            let result = tokio::select! {
                r = attempt => r,
                () = cancel.cancelled() => Err(CairnError::Cancelled { job: id.to_string() }),
            };
            match result {
                Ok(outcome) => {
                    let result = serde_json::to_value(&outcome).ok();
                    job.update(
                        |r| {
                            if matches!(r.spec, JobSpec::Checkpoint { .. }) {
                                // Recorded before the scratch goes: a crash in between
                                // leaves only garbage for the janitor.
                                r.phase = Phase::Cleaned;
                            }
                            r.state = JobState::Succeeded;
                            r.last_error = None;
                            r.result = result;
                        },
                        &[],
                    )?;
                    self.release_job(&job)?;
                    self.cancels.forget(id);
                    tracing::info!("job succeeded");
                    return Ok(outcome);
                }
                Err(e @ CairnError::Cancelled { .. }) => {
                    self.end_job(job, JobState::Cancelled, e.to_string())?;
                    return Err(e);
                }
                Err(e) => {
                    if e.class().is_transient() && job.rec().attempts < MAX_ATTEMPTS {
                        let wait_ms = backoff_ms(job.rec().attempts - 1, self.env.next_u64());
                        tracing::warn!(error = %e, retry_in_ms = wait_ms, "job attempt failed; retrying");
                        let not_before = self.env.now_ms() + wait_ms;
                        job.update(
                            |r| {
                                r.last_error = Some(e.to_string());
                                r.state = JobState::Queued;
                                r.not_before_ms = not_before;
                            },
                            &[],
                        )?;
                        continue;
                    }
                    tracing::warn!(error = %e, "job failed");
                    self.end_job(job, JobState::Failed, e.to_string())?;
                    return Err(e);
                }
            }
        }
    }

    /// Runs every unfinished job (queued, or running when a process died), oldest first.
    pub async fn resume(&self) -> Result<Vec<(JobId, Result<JobOutcome, CairnError>)>, CairnError> {
        self.resume_where(|_| true).await
    }

    /// Runs the unfinished jobs of one database, oldest first.
    pub async fn resume_db(
        &self,
        db: &DbId,
    ) -> Result<Vec<(JobId, Result<JobOutcome, CairnError>)>, CairnError> {
        self.resume_where(|r| r.spec.db() == db).await
    }

    async fn resume_where(
        &self,
        pick: impl Fn(&crate::JobRecord) -> bool,
    ) -> Result<Vec<(JobId, Result<JobOutcome, CairnError>)>, CairnError> {
        let mut out = Vec::new();
        for rec in self.jobs()? {
            if rec.state.is_unfinished() && pick(&rec) {
                let r = self.run_job(rec.id).await;
                out.push((rec.id, r));
            }
        }
        Ok(out)
    }
}
