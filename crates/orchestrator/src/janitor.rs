//! The janitor: at open, scratch directories and items of jobs that will not run again
//! are removed (those of unfinished jobs hold staged work their resumption reuses), and
//! only the newest finished job records are kept, for `cairn status`.
//!
//! Crash: each removal is independent and idempotent; a crash half-way leaves garbage the
//! next open removes. Nothing is retried or cancellable.

use cairn_core::JobId;

use crate::queue::JobRecord;
use crate::{CairnError, Checkpointer};

/// Finished job records kept for `cairn status`.
pub(crate) const KEEP_FINISHED_JOBS: usize = 200;

impl Checkpointer {
    /// Removes what finished jobs left behind (see the module documentation).
    pub(crate) fn sweep_finished_jobs(&self) -> Result<(), CairnError> {
        let mut records = Vec::new();
        // A record that does not decode may be an unfinished job of another build: its
        // scratch is kept, and the record too (`cairn status` names it).
        let mut undecodable = Vec::new();
        for (id, b) in self.state.jobs()? {
            match JobRecord::decode(id, &b) {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "job record does not decode; its scratch is kept");
                    undecodable.push(id);
                }
            }
        }
        records.sort_by_key(|r| std::cmp::Reverse(r.seq));
        let unfinished: Vec<JobId> = records
            .iter()
            .filter(|r| r.state.is_unfinished())
            .map(|r| r.id)
            .chain(undecodable)
            .collect();
        for (n, r) in records
            .iter()
            .filter(|r| !r.state.is_unfinished())
            .enumerate()
        {
            self.state.delete_job(r.id, n >= KEEP_FINISHED_JOBS)?;
        }
        for job in self.scratch.jobs()? {
            if !unfinished.contains(&job) {
                self.scratch.remove_job(job)?;
            }
        }
        Ok(())
    }
}
