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
        let mut records: Vec<JobRecord> = self
            .state
            .jobs()?
            .into_iter()
            .filter_map(|(id, b)| JobRecord::decode(id, &b).ok())
            .collect();
        records.sort_by_key(|r| std::cmp::Reverse(r.seq));
        let unfinished: Vec<JobId> = records
            .iter()
            .filter(|r| r.state.is_unfinished())
            .map(|r| r.id)
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
