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

use cairn_core::{
    ChunkState, DbId, Generation, PagesState, SegmentEntry, SourceKind, TenantId, WalState,
};
use cairn_state::{ChunkDigests, LocalUpdates};

use crate::publication::Publisher;
use crate::queue::{CkptPlan, Job, JobItems, Outcome, Phase, PlanBody};
use crate::{CairnError, CheckpointReport, Checkpointer, GenerationState};

/// What the runs staged.
pub(super) enum Staged {
    /// A page checkpoint's chunks, and the page digests of those that got a new blob.
    Pages {
        origin: SourceKind,
        page_size: u32,
        chunk_size: u64,
        len: u64,
        chunks: Vec<ChunkState>,
        digests: Vec<ChunkDigests>,
    },
    /// New segments to append to the WAL stream.
    Segments(Vec<SegmentEntry>),
}

impl Checkpointer {
    /// Publishes the planned generation on top of its parent; returns the manifest
    /// object's size.
    pub(super) async fn publish_plan(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        plan: &CkptPlan,
        parent: Option<&GenerationState>,
        staged: Staged,
    ) -> Result<u64, CairnError> {
        let mut next = parent.map(|p| p.state.clone()).unwrap_or_default();
        let (digests, chunk_count) = match (staged, &plan.body) {
            (
                Staged::Pages {
                    origin,
                    page_size,
                    chunk_size,
                    len,
                    chunks,
                    digests,
                },
                PlanBody::Pages { lsn, .. },
            ) => {
                let n = chunks.len() as u64;
                next.pages = Some(PagesState {
                    origin,
                    page_size,
                    chunk_size,
                    len,
                    lsn: *lsn,
                    generation: Generation(plan.generation),
                    chunks,
                });
                (digests, Some(n))
            }
            (Staged::Segments(new), PlanBody::Segments { start, end, .. }) => {
                let mut wal = next.wal.take().unwrap_or(WalState {
                    start: *start,
                    end: *start,
                    last_name: None,
                    segments: Vec::new(),
                });
                if let Some(last) = new.last() {
                    wal.last_name = Some(last.name.clone());
                }
                wal.segments.extend(new);
                wal.end = *end;
                next.wal = Some(wal);
                (Vec::new(), None)
            }
            _ => {
                return Err(CairnError::UnexpectedOutcome {
                    job: job.id().to_string(),
                    expected: "a run matching its plan",
                })
            }
        };
        let manifest = Publisher {
            tenant: &self.cfg.tenant,
            db,
            writer: &self.writer,
            created_unix_ms: plan.created_unix_ms,
            job: Some(job.id()),
        }
        .manifest(Generation(plan.generation), parent, next.clone());
        let next_state = next;
        self.enter_publication(job.id())?;
        let (published, record) = job.prepare(|r| r.phase = Phase::Published)?;
        let local = LocalUpdates {
            digests: &digests,
            chunks: chunk_count,
            job: Some((job.id(), &record)),
            wal_position: match &plan.body {
                PlanBody::Pages {
                    sqlite: Some(s), ..
                } => s.position,
                _ => None,
            },
        };
        let bytes = cairn_state::publish_with(&self.state, &self.store, &manifest, &local).await?;
        job.committed(published);
        self.remember(
            db,
            &GenerationState {
                manifest,
                state: next_state,
            },
        );
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
        PlanBody::Pages {
            len,
            page_size,
            sqlite,
            ..
        } => {
            r.source_bytes = *len;
            if let Some(s) = sqlite {
                r.full_scan_reason = s.full_scan_reason.map(|f| f.as_str());
                r.wal_frames = Some(s.wal_frames);
            }
            for c in items.chunks.values() {
                match c.outcome {
                    Outcome::Full => r.chunks_full += 1,
                    Outcome::Delta => r.chunks_delta += 1,
                    Outcome::Unchanged => r.chunks_unchanged += 1,
                }
                r.pages_dirty += c.dirty;
            }
            r.bytes_dirty = r.pages_dirty * u64::from(*page_size);
            r.dirty_used = items.dirty.is_some();
        }
        PlanBody::Segments { new, .. } => {
            r.source_bytes = new.iter().map(|n| n.len).sum();
        }
    }
    r
}
