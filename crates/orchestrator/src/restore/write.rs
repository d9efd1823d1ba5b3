//! Writing a restore's parts: the chunks of a page file and the segments of a WAL stream,
//! in parallel, each synced and recorded as done (with a job) before the next step.
//!
//! Crash: a chunk's or segment's marker is written only after its bytes are synced, so a
//! resumed restore skips exactly what is durable; markers of an assembly that could not be
//! reopened are dropped. Retries: the store's. Cancellation: checked after each part.

use std::collections::BTreeSet;

use cairn_core::{keys, DbId, PagesState, TenantId};
use cairn_executor::{DirAssembler, FileAssembler};
use cairn_state::ItemKey;
use futures::stream::{self, StreamExt};

use super::{Parts, RestoreReport};
use crate::queue::{Item, Job, Phase, Progress};
use crate::{CairnError, Checkpointer};

pub(super) struct Writer<'w, 'j> {
    cp: &'w Checkpointer,
    tenant: &'w TenantId,
    db: &'w DbId,
    parts: &'w Parts<'w>,
    job: Option<&'w mut Job<'j>>,
    chunks_done: BTreeSet<u64>,
    segments_done: BTreeSet<u64>,
}

impl<'w, 'j> Writer<'w, 'j> {
    /// Starts writing `parts`, taking up what a job recorded before.
    pub(super) fn start(
        cp: &'w Checkpointer,
        tenant: &'w TenantId,
        db: &'w DbId,
        parts: &'w Parts<'w>,
        mut job: Option<&'w mut Job<'j>>,
    ) -> Result<Self, CairnError> {
        let (chunks_done, segments_done) = match job.as_deref() {
            Some(j) => {
                let items = j.items()?;
                (items.restored, items.restored_segments)
            }
            None => Default::default(),
        };
        if let Some(j) = job.as_deref_mut() {
            let chunks = parts.pages.map_or(&[][..], |p| &p.chunks[..]);
            let progress = Progress {
                done: (chunks_done.len() + segments_done.len()) as u64,
                total: (chunks.len() + parts.segments.len()) as u64,
                bytes_done: chunks
                    .iter()
                    .filter(|c| chunks_done.contains(&c.index))
                    .map(|c| c.len)
                    .chain(
                        parts
                            .segments
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| segments_done.contains(&(*i as u64)))
                            .map(|(_, s)| s.len),
                    )
                    .sum(),
                bytes_total: parts.pages.map_or(0, |p| p.len)
                    + parts.segments.iter().map(|s| s.len).sum::<u64>(),
            };
            j.update(|r| r.progress = progress, &[])?;
        }
        Ok(Self {
            cp,
            tenant,
            db,
            parts,
            job,
            chunks_done,
            segments_done,
        })
    }

    /// Whether a job recorded parts as done (its assembly should be reopened).
    pub(super) fn resuming(&self) -> bool {
        !self.chunks_done.is_empty() || !self.segments_done.is_empty()
    }

    fn forget(&mut self, keys: Vec<ItemKey>) -> Result<(), CairnError> {
        if let Some(j) = self.job.as_deref_mut() {
            let deletes: Vec<Item<'_>> = keys.into_iter().map(Item::Delete).collect();
            j.save(&deletes)?;
        }
        Ok(())
    }

    fn record(&mut self, item: Item<'_>, bytes: u64) -> Result<(), CairnError> {
        if let Some(j) = self.job.as_deref_mut() {
            self.cp.check_cancel(j.id())?;
            j.progress(
                |r| {
                    r.progress.done += 1;
                    r.progress.bytes_done += bytes;
                },
                &[item],
            )?;
        }
        Ok(())
    }

    /// Restores every chunk of `p` not recorded as done into `asm`.
    pub(super) async fn pages(
        &mut self,
        asm: &FileAssembler,
        p: &PagesState,
        reopened: bool,
        report: &mut RestoreReport,
    ) -> Result<(), CairnError> {
        if !reopened {
            // A fresh file: markers recorded against an older one are void.
            let stale = std::mem::take(&mut self.chunks_done);
            self.forget(stale.into_iter().map(ItemKey::Restored).collect())?;
        }
        let (cp, tenant, db) = (self.cp, self.tenant, self.db);
        // Positions, not references: the closure then has no higher-ranked lifetime and
        // the future stays `Send`.
        let todo: Vec<usize> = (0..p.chunks.len())
            .filter(|i| !self.chunks_done.contains(&p.chunks[*i].index))
            .collect();
        let concurrency = cp.cfg.download_concurrency;
        let memory = super::memory::MemoryBound::new(cp.cfg.restore_memory, concurrency);
        let memory = &memory;
        let mut stream = stream::iter(todo)
            .map(|i| {
                let c = &p.chunks[i];
                async move {
                    let n = cp.restore_chunk(tenant, db, p, c, asm, memory).await?;
                    Ok::<_, CairnError>((c.index, c.len, n))
                }
            })
            .buffer_unordered(concurrency);
        while let Some(r) = stream.next().await {
            let (index, len, n) = r?;
            report.blobs_read += n;
            if self.job.is_some() {
                asm.sync()?;
            }
            self.record(Item::Restored(index), len)?;
        }
        report.bytes_written += p.len;
        Ok(())
    }

    /// Restores every segment of the parts not recorded as done into `asm`.
    pub(super) async fn segments(
        &mut self,
        asm: &DirAssembler,
        reopened: bool,
        report: &mut RestoreReport,
    ) -> Result<(), CairnError> {
        let segments = self.parts.segments;
        if reopened {
            // Trust a marker only for a file that is there whole.
            let gone: Vec<u64> = self
                .segments_done
                .iter()
                .copied()
                .filter(|i| {
                    !segments
                        .get(*i as usize)
                        .is_some_and(|e| asm.has_file(&e.name, e.len))
                })
                .collect();
            for i in &gone {
                self.segments_done.remove(i);
            }
            self.forget(gone.into_iter().map(ItemKey::RestoredSegment).collect())?;
        } else {
            let stale = std::mem::take(&mut self.segments_done);
            self.forget(stale.into_iter().map(ItemKey::RestoredSegment).collect())?;
        }
        let (cp, tenant, db) = (self.cp, self.tenant, self.db);
        let todo: Vec<usize> = (0..segments.len())
            .filter(|i| !self.segments_done.contains(&(*i as u64)))
            .collect();
        let mut stream = stream::iter(todo)
            .map(|i| {
                let e = &segments[i];
                async move {
                    let w = asm.file(&e.name, e.len)?;
                    let key = keys::blob_key(tenant, db, &e.blob);
                    cp.store
                        .get_blob(&key, &e.blob, |off, bytes| w.write_at(off, bytes))
                        .await?;
                    w.finish()?;
                    Ok::<_, CairnError>((i as u64, e.len))
                }
            })
            .buffer_unordered(cp.cfg.download_concurrency);
        while let Some(r) = stream.next().await {
            let (i, len) = r?;
            report.blobs_read += 1;
            if self.job.is_some() {
                asm.sync()?;
            }
            self.record(Item::RestoredSegment(i), len)?;
        }
        report.bytes_written += segments.iter().map(|s| s.len).sum::<u64>();
        Ok(())
    }

    /// Every byte is written and synced.
    pub(super) fn written(&mut self) -> Result<(), CairnError> {
        if let Some(j) = self.job.as_deref_mut() {
            j.update(|r| r.phase = Phase::Written, &[])?;
        }
        Ok(())
    }
}
