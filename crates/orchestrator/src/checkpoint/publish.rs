//! Publishing a checkpoint: the manifest rebuilt from the plan and the items, its
//! conditional create, and one local batch with the catalog, the page digests and the job
//! record in phase `published`.
//!
//! Crash: after the remote create and before the local batch, the store holds the
//! generation and the job is still `uploaded`; the resumed job rebuilds identical manifest
//! bytes, the create finds its own object and only the local batch is committed. Retries:
//! a lost create response is settled by reading back ([`cairn_state::publish_with`]).
//! Cancellation: a cancel is honoured before the create, never after.

use std::time::Instant;

use cairn_core::{DbId, Generation, Manifest, ManifestBody, SourceKind, TenantId};
use cairn_planner::SegmentAction;
use cairn_state::{ChunkDigests, LocalUpdates};

use crate::queue::{CkptPlan, Job, JobItems, Outcome, Phase, PlanBody};
use crate::{CairnError, CheckpointReport, Checkpointer};

/// What the runs staged: the new generation's body and the local updates that go with it.
pub(super) struct Staged {
    /// The manifest body.
    pub body: ManifestBody,
    /// Page digests of chunks that got a new blob.
    pub digests: Vec<ChunkDigests>,
    /// For page sources, the chunk count (digests of chunks past it are dropped).
    pub chunks: Option<u64>,
}

impl Checkpointer {
    /// Publishes the planned generation; returns the manifest object's size.
    pub(super) async fn publish_plan(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        plan: &CkptPlan,
        staged: Staged,
    ) -> Result<u64, CairnError> {
        let manifest = Manifest {
            format: cairn_core::manifest::MANIFEST_VERSION,
            tenant: self.cfg.tenant.clone(),
            db: db.clone(),
            generation: Generation(plan.generation),
            parent: plan.parent.map(Generation),
            writer: self.writer.clone(),
            created_unix_ms: plan.created_unix_ms,
            job: Some(job.id().to_string()),
            body: staged.body,
        };
        let (published, record) = job.prepare(|r| r.phase = Phase::Published)?;
        let local = LocalUpdates {
            digests: &staged.digests,
            chunks: staged.chunks,
            job: Some((job.id(), &record)),
        };
        let bytes = cairn_state::publish_with(&self.state, &self.store, &manifest, &local).await?;
        job.committed(published);
        Ok(bytes)
    }
}

/// The report of everything recorded, whichever attempt did it.
pub(super) fn report(
    items: &JobItems,
    tenant: &TenantId,
    db: &DbId,
    kind: SourceKind,
    plan: &CkptPlan,
    started: Instant,
) -> CheckpointReport {
    let mut r = CheckpointReport {
        tenant: tenant.to_string(),
        db: db.to_string(),
        generation: plan.generation,
        kind: kind.as_str(),
        duration_ms: started.elapsed().as_millis() as u64,
        ..Default::default()
    };
    match &plan.body {
        PlanBody::Pages { len, page_size, .. } => {
            r.source_bytes = *len;
            for c in items.chunks.values() {
                match c.outcome {
                    Outcome::Full => r.chunks_full += 1,
                    Outcome::Delta => r.chunks_delta += 1,
                    Outcome::Unchanged => r.chunks_unchanged += 1,
                }
                r.pages_dirty += c.dirty;
            }
            r.bytes_dirty = r.pages_dirty * u64::from(*page_size);
        }
        PlanBody::Segments { actions, .. } => {
            r.source_bytes = actions
                .iter()
                .map(|a| match a {
                    SegmentAction::Reuse(e) => e.len,
                    SegmentAction::Upload { len, .. } => *len,
                })
                .sum();
        }
    }
    r
}
