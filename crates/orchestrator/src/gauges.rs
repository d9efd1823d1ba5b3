//! Numbers a long-running service reports about its checkpointer: the job queue's depth
//! and the byte budgets' use. Read-only accessors over state that already exists (the
//! RocksDB job queue, the quota tree), for metrics endpoints; nothing is counted twice.
//!
//! Contract: each call reads the current value; nothing is cached. Crash, retries,
//! cancellation: reads only, no I/O beyond the local state, nothing to retry or cancel.

use serde::Serialize;

use crate::{CairnError, Checkpointer};

/// One level of the byte budgets (global, then tenant, then job, as the quota crate
/// defines them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QuotaLevel {
    /// `global`, `tenant` or `job`.
    pub level: &'static str,
    /// The budget's name (its path in the budget tree).
    pub name: String,
    /// Bytes reserved now.
    pub used: u64,
    /// The limit in bytes.
    pub limit: u64,
}

impl Checkpointer {
    /// Jobs queued or running (unfinished) in this state directory.
    pub fn queue_depth(&self) -> Result<u64, CairnError> {
        Ok(self
            .jobs()?
            .iter()
            .filter(|r| r.state.is_unfinished())
            .count() as u64)
    }

    /// The byte budgets in force and their use, outermost first: the global scratch
    /// budget, then the tenant's, then the same for the local cache (`cache`,
    /// `cache/tenant:NAME`). Per-job scratch budgets are children of the tenant's that
    /// live only while their job stages.
    pub fn quota_levels(&self) -> Vec<QuotaLevel> {
        [self.scratch.budget().levels(), self.cache.levels()]
            .into_iter()
            .flat_map(|mut levels| {
                levels.reverse();
                levels
                    .into_iter()
                    .zip(["global", "tenant"])
                    .map(|((name, used, limit), level)| QuotaLevel {
                        level,
                        name,
                        used,
                        limit,
                    })
            })
            .collect()
    }
}
