//! Running, resuming and cancelling jobs (see [`crate::jobs`] for the contract).

use std::sync::atomic::Ordering;

use cairn_core::JobId;
use serde::Serialize;

use crate::jobs::{self, backoff_ms, JobRecord, JobSpec, JobState, Phase, Progress, MAX_ATTEMPTS};
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
}

impl Checkpointer {
    /// Persists a new job; it runs when [`Checkpointer::run_job`] or
    /// [`Checkpointer::resume`] is called.
    pub fn enqueue(&self, spec: JobSpec) -> Result<JobId, CairnError> {
        let now = self.env.clock.now_unix_ms();
        let mut rec = JobRecord {
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
        self.save_job(&mut rec, &[])?;
        Ok(rec.id)
    }

    /// A job's record.
    pub fn job(&self, id: JobId) -> Result<JobRecord, CairnError> {
        match self.state.job(id.0)? {
            Some(b) => JobRecord::decode(id.0, &b),
            None => Err(CairnError::UnknownJob {
                job: id.to_string(),
            }),
        }
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

    pub(crate) fn save_job(
        &self,
        rec: &mut JobRecord,
        items: &[(&[u8], Option<&[u8]>)],
    ) -> Result<(), CairnError> {
        rec.updated_ms = self.env.clock.now_unix_ms();
        self.state.put_job(rec.id.0, &rec.encode()?, items)?;
        Ok(())
    }

    /// Asks a job to stop at its next safe point. A queued job is cancelled at once.
    pub fn cancel(&self, id: JobId) -> Result<(), CairnError> {
        let mut rec = self.job(id)?;
        self.cancels.cancel(id);
        if rec.state == JobState::Queued && rec.phase == Phase::New {
            rec.state = JobState::Cancelled;
            self.save_job(&mut rec, &[])?;
            self.cancels.forget(id);
        }
        Ok(())
    }

    pub(crate) fn check_cancel(&self, id: JobId) -> Result<(), CairnError> {
        if self.cancels.flag(id).load(Ordering::SeqCst) {
            Err(CairnError::Cancelled {
                job: id.to_string(),
            })
        } else {
            Ok(())
        }
    }

    fn release_job(&self, id: JobId) -> Result<(), CairnError> {
        self.scratch.remove_job(id)?;
        self.state.delete_job(id.0, false)?;
        Ok(())
    }

    /// A job that will not run again gives up its scratch, its items and, for a restore,
    /// the partial file or directory beside the target.
    fn abandon_job(&self, rec: &JobRecord) -> Result<(), CairnError> {
        if let JobSpec::Restore { to, .. } = &rec.spec {
            cairn_executor::assemble::discard_partial(to)?;
        }
        self.release_job(rec.id)
    }

    /// Runs (or resumes) a job to its end, retrying retryable failures with backoff.
    pub async fn run_job(&self, id: JobId) -> Result<JobOutcome, CairnError> {
        loop {
            let mut rec = self.job(id)?;
            if !rec.state.is_unfinished() {
                self.cancels.forget(id);
                return Err(CairnError::JobEnded {
                    job: id.to_string(),
                    state: format!("{:?}", rec.state).to_lowercase(),
                });
            }
            if rec.attempts >= jobs::MAX_STARTS {
                // Each start that never ended (the process died) counted; stop retrying.
                rec.state = JobState::Failed;
                rec.last_error = Some(format!(
                    "gave up after {} starts without finishing (last error: {})",
                    rec.attempts,
                    rec.last_error.as_deref().unwrap_or("none recorded")
                ));
                self.save_job(&mut rec, &[])?;
                self.abandon_job(&rec)?;
                self.cancels.forget(id);
                return Err(CairnError::JobEnded {
                    job: id.to_string(),
                    state: "failed".into(),
                });
            }
            let now = self.env.clock.now_unix_ms();
            if rec.not_before_ms > now {
                tokio::time::sleep(std::time::Duration::from_millis(rec.not_before_ms - now)).await;
            }
            rec.state = JobState::Running;
            rec.attempts += 1;
            rec.owner = Some(std::process::id());
            self.save_job(&mut rec, &[])?;
            let result = match rec.spec.clone() {
                JobSpec::Checkpoint { .. } => self
                    .run_checkpoint(&mut rec)
                    .await
                    .map(JobOutcome::Checkpoint),
                JobSpec::Restore { .. } => {
                    self.run_restore(&mut rec).await.map(JobOutcome::Restore)
                }
                JobSpec::Verify { .. } => self.run_verify(&mut rec).await.map(JobOutcome::Verify),
            };
            // The runner may have advanced the persisted record; continue from it.
            let mut rec = self.job(id)?;
            match result {
                Ok(outcome) => {
                    if matches!(rec.spec, JobSpec::Checkpoint { .. }) {
                        // Recorded before the scratch goes: a crash in between leaves only
                        // garbage for the janitor, never a job that would publish again.
                        rec.phase = Phase::Cleaned;
                    }
                    rec.state = JobState::Succeeded;
                    rec.last_error = None;
                    rec.result = serde_json::to_value(&outcome).ok();
                    self.save_job(&mut rec, &[])?;
                    self.release_job(id)?;
                    self.cancels.forget(id);
                    return Ok(outcome);
                }
                Err(e @ CairnError::Cancelled { .. }) => {
                    rec.state = JobState::Cancelled;
                    rec.last_error = Some(e.to_string());
                    self.save_job(&mut rec, &[])?;
                    self.abandon_job(&rec)?;
                    self.cancels.forget(id);
                    return Err(e);
                }
                Err(e) => {
                    rec.last_error = Some(e.to_string());
                    let fenced = matches!(
                        e,
                        CairnError::Manifest(cairn_manifest::ManifestError::Fenced { .. })
                    );
                    if e.is_retryable() && !fenced && rec.attempts < MAX_ATTEMPTS {
                        rec.state = JobState::Queued;
                        rec.not_before_ms = self.env.clock.now_unix_ms()
                            + backoff_ms(rec.attempts - 1, self.env.next_u64());
                        self.save_job(&mut rec, &[])?;
                        continue;
                    }
                    rec.state = JobState::Failed;
                    self.save_job(&mut rec, &[])?;
                    self.abandon_job(&rec)?;
                    self.cancels.forget(id);
                    return Err(e);
                }
            }
        }
    }

    /// Runs every unfinished job (queued, or running when a process died), oldest first.
    pub async fn resume(&self) -> Result<Vec<(JobId, Result<JobOutcome, CairnError>)>, CairnError> {
        self.resumed.store(true, Ordering::SeqCst);
        let mut out = Vec::new();
        for rec in self.jobs()? {
            if rec.state.is_unfinished() {
                let r = self.run_job(rec.id).await;
                out.push((rec.id, r));
            }
        }
        Ok(out)
    }

    /// Resumes unfinished jobs once per `Checkpointer`, before its first operation. A job
    /// that fails is recorded as failed; it does not fail the operation that triggered it.
    pub(crate) async fn ensure_resumed(&self) -> Result<(), CairnError> {
        if self.resumed.load(Ordering::SeqCst) {
            return Ok(());
        }
        for (id, r) in self.resume().await? {
            if let Err(e) = r {
                tracing::warn!(job = %id, error = %e, "resumed job did not complete");
            }
        }
        Ok(())
    }

    async fn run_verify(&self, rec: &mut JobRecord) -> Result<VerifyReport, CairnError> {
        let JobSpec::Verify {
            db,
            generation,
            deep,
        } = rec.spec.clone()
        else {
            return Err(CairnError::Task("not a verify job".into()));
        };
        let report = self
            .verify_now(&db, generation.map(cairn_core::Generation), deep)
            .await?;
        rec.generation = Some(report.generation);
        rec.phase = Phase::Checked;
        rec.progress = Progress {
            done: report.blobs_checked,
            total: report.blobs_checked,
            bytes_done: report.bytes_read,
            bytes_total: report.bytes_read,
        };
        self.save_job(rec, &[])?;
        Ok(report)
    }
}
