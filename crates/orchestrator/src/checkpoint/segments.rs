//! The run over a segment directory: segments the previous generation has are referenced
//! again; each new one is stored through the sink and recorded in one synced batch.
//!
//! Crash: a segment is recorded once its blob is staged (local store) or its upload started
//! from the file (remote store); a resumed run checks each recorded blob and stores again
//! only those neither stored nor staged. Cancellation: checked before each new segment.

use std::path::Path;

use cairn_core::{Lsn, ManifestBody, SegmentEntry, SegmentsState};
use cairn_planner::SegmentAction;

use super::publish::Staged;
use super::sink::BlobSink;
use crate::queue::{Item, Job, JobItems, Phase, SegItem};
use crate::CairnError;

/// One run over a segment directory.
pub(super) struct SegmentsRun<'r, 's, 'j> {
    pub sink: &'r mut BlobSink<'s>,
    pub job: &'r mut Job<'j>,
    pub items: &'r mut JobItems,
}

impl SegmentsRun<'_, '_, '_> {
    /// Stores every new segment the job has not recorded; returns the manifest body.
    pub(super) async fn run(
        self,
        dir: &Path,
        actions: &[SegmentAction],
        lsn_end: Lsn,
    ) -> Result<Staged, CairnError> {
        let cp = self.sink.cp();
        let mut segments = Vec::with_capacity(actions.len());
        for (i, action) in actions.iter().enumerate() {
            let i = i as u64;
            match action {
                SegmentAction::Reuse(e) => {
                    self.sink.note_reused();
                    segments.push(e.clone());
                }
                SegmentAction::Upload {
                    name,
                    lsn_start,
                    len,
                } => {
                    if let Some(item) = self.items.segments.get(&i) {
                        if self.sink.ensure_stored(&item.entry.blob).await? {
                            segments.push(item.entry.clone());
                            continue;
                        }
                    }
                    cp.check_cancel(self.job.id())?;
                    let blob = self.sink.put_segment(&dir.join(name), *len).await?;
                    let entry = SegmentEntry {
                        name: name.clone(),
                        lsn_start: *lsn_start,
                        len: *len,
                        blob,
                    };
                    let item = SegItem {
                        entry: entry.clone(),
                    };
                    self.job.update(
                        |r| {
                            r.progress.done += 1;
                            r.progress.bytes_done += len;
                        },
                        &[Item::Segment(i, &item)],
                    )?;
                    self.items.segments.insert(i, item);
                    segments.push(entry);
                }
            }
        }
        self.job.update(|r| r.phase = Phase::Staged, &[])?;
        Ok(Staged {
            body: ManifestBody::Segments(SegmentsState { segments, lsn_end }),
            digests: Vec::new(),
            chunks: None,
        })
    }
}
