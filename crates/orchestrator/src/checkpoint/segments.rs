//! The run over a segment directory: each new segment is stored through the sink and
//! recorded in one batch (relaxed: see `Job::progress`); the published stream carries the older ones.
//!
//! Crash: a segment is recorded once its blob is staged (local store) or its upload started
//! from the file (remote store); a resumed run checks each recorded blob and stores again
//! only those neither stored nor staged. Cancellation: checked before each new segment.

use std::path::Path;

use cairn_core::SegmentEntry;
use cairn_planner::NewSegment;

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
    /// Stores every new segment the job has not recorded; returns their entries.
    pub(super) async fn run(self, dir: &Path, new: &[NewSegment]) -> Result<Staged, CairnError> {
        let cp = self.sink.cp();
        let mut segments = Vec::with_capacity(new.len());
        for (i, n) in new.iter().enumerate() {
            let i = i as u64;
            if let Some(item) = self.items.segments.get(&i) {
                if self.sink.ensure_stored(&item.entry.blob).await? {
                    segments.push(item.entry.clone());
                    continue;
                }
            }
            cp.check_cancel(self.job.id())?;
            let blob = self.sink.put_segment(&dir.join(&n.name), n.len).await?;
            let entry = SegmentEntry {
                name: n.name.clone(),
                lsn_start: n.lsn_start,
                lsn_end: n.lsn_end,
                len: n.len,
                blob,
            };
            let item = SegItem {
                entry: entry.clone(),
            };
            self.job.progress(
                |r| {
                    r.progress.done += 1;
                    r.progress.bytes_done += n.len;
                },
                &[Item::Segment(i, &item)],
            )?;
            self.items.segments.insert(i, item);
            segments.push(entry);
        }
        self.job.update(|r| r.phase = Phase::Staged, &[])?;
        Ok(Staged::Segments(segments))
    }
}
