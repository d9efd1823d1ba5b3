//! Building the manifest of a database's next generation: its whole state, published as a
//! diff against the parent when that is small, and as a full manifest now and then.
//!
//! Contract: the choice is a pure function of the parent (its manifest and state) and the
//! next state, so a resumed job rebuilds the same manifest. A diff is written when the
//! parent exists, the chain from the last full manifest stays shorter than
//! [`MAX_DIFF_CHAIN`], and the diff carries fewer than half the entries of the whole
//! state; so materialising any generation reads one full manifest and at most
//! `MAX_DIFF_CHAIN − 1` diffs, and publication costs what changed plus a full manifest
//! every `MAX_DIFF_CHAIN` generations. No I/O here.

use cairn_core::{Content, DbId, DbState, Generation, JobId, Manifest, StateDiff, TenantId};

use crate::GenerationState;

/// Diffs between full manifests, at most: a chain is a full manifest and up to
/// `MAX_DIFF_CHAIN − 1` diffs.
pub const MAX_DIFF_CHAIN: u32 = 64;

/// Who publishes, and when.
pub(crate) struct Publisher<'a> {
    pub tenant: &'a TenantId,
    pub db: &'a DbId,
    pub writer: &'a str,
    pub created_unix_ms: u64,
    pub job: Option<JobId>,
}

fn entries(s: &DbState) -> usize {
    s.pages.as_ref().map_or(0, |p| p.chunks.len()) + s.wal.as_ref().map_or(0, |w| w.segments.len())
}

impl Publisher<'_> {
    /// The manifest of generation `generation` with state `next` on top of `parent`.
    pub(crate) fn manifest(
        &self,
        generation: Generation,
        parent: Option<&GenerationState>,
        next: DbState,
    ) -> Manifest {
        let content = match parent {
            Some(p) if p.manifest.chain() + 1 < MAX_DIFF_CHAIN => {
                let d = StateDiff::between(&p.state, &next, p.manifest.chain() + 1);
                if d.entries() * 2 < entries(&next).max(1) {
                    Content::Diff(d)
                } else {
                    Content::Full(next)
                }
            }
            _ => Content::Full(next),
        };
        Manifest {
            format: cairn_core::manifest::MANIFEST_VERSION,
            tenant: self.tenant.clone(),
            db: self.db.clone(),
            generation,
            parent: parent.map(|p| p.manifest.generation),
            writer: self.writer.to_string(),
            created_unix_ms: self.created_unix_ms,
            job: self.job.map(|j| j.to_string()),
            content,
            gc: false,
        }
    }
}
