//! The run over a page source: every chunk the job has not recorded is analysed (in
//! parallel, on blocking threads), its blob stored through the sink, and the chunk
//! recorded with its page digests in one batch (relaxed: see `Job::progress`).
//!
//! Crash: a chunk is recorded after its blob is staged (or found stored), before its upload
//! finishes; a resumed run checks each recorded blob ([`super::sink::BlobSink::ensure_stored`])
//! and analyses again only chunks whose blob is neither stored nor staged. Cancellation:
//! checked after each analysed chunk.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use cairn_core::{BlobKind, ChunkState, PagesState, SourceKind};
use cairn_executor::{PageFile, ReadAt, SqliteSnapshot};
use cairn_planner::ChunkPlan;
use cairn_state::{ChunkDigests, ItemKey};
use futures::stream::{self, StreamExt};

use super::analyse::{analyse, Analysis, ChunkCtx};
use super::publish::Staged;
use super::sink::BlobSink;
use crate::queue::{ChunkItem, Item, Job, JobItems, Outcome, Phase};
use crate::CairnError;

/// The page-source part of a plan.
pub(super) struct PagesShape<'r> {
    pub origin: SourceKind,
    pub file: &'r Path,
    pub page_size: u32,
    pub chunk_size: u64,
    pub len: u64,
    pub chunks: &'r [ChunkPlan],
    /// The SQLite snapshot the plan was made from, read instead of the file.
    pub snapshot: Option<Arc<SqliteSnapshot>>,
}

/// One run over a page source: the sink, the job and its items, the plan and the parent.
pub(super) struct PagesRun<'r, 's, 'j> {
    pub sink: &'r mut BlobSink<'s>,
    pub job: &'r mut Job<'j>,
    pub items: &'r mut JobItems,
    pub shape: PagesShape<'r>,
    pub generation: u64,
    /// The parent generation's page checkpoint.
    pub prev: Option<&'r PagesState>,
}

fn tip(c: &ChunkState) -> String {
    c.deltas.last().unwrap_or(&c.base).name()
}

impl PagesRun<'_, '_, '_> {
    /// Stages and uploads every chunk not yet recorded; returns the chunks and the page
    /// digests to commit with them.
    pub(super) async fn run(self) -> Result<Staged, CairnError> {
        let PagesShape {
            file: path,
            page_size,
            chunk_size,
            len,
            chunks,
            ref snapshot,
            ..
        } = self.shape;
        let (file, found): (Arc<dyn ReadAt>, u64) = match snapshot {
            Some(s) => (Arc::clone(s) as Arc<dyn ReadAt>, s.len()),
            None => {
                let f = PageFile::open(path, page_size)?;
                let n = f.len;
                (Arc::new(f.file), n)
            }
        };
        if found != len {
            return Err(CairnError::Exec(cairn_executor::ExecError::SourceChanged {
                path: path.display().to_string(),
                detail: format!("length {found} differs from the planned {len}"),
            }));
        }
        let cp = self.sink.cp();
        let job_id = self.job.id();
        // Chunks recorded by an earlier attempt: their blobs must be in the store (uploaded
        // then, or staged and uploaded now); otherwise they are analysed again.
        let recorded: Vec<(u64, Option<cairn_core::BlobRef>)> = self
            .items
            .chunks
            .iter()
            .map(|(i, c)| (*i, c.new_blob))
            .collect();
        for (index, blob) in recorded {
            if let Some(b) = blob {
                if !self.sink.ensure_stored(&b).await? {
                    self.items.chunks.remove(&index);
                    self.items.digests.remove(&index);
                    self.job.save(&[
                        Item::Delete(ItemKey::Chunk(index)),
                        Item::Delete(ItemKey::ChunkDigests(index)),
                    ])?;
                }
            }
        }
        // Previous chunk states line up with the new ones only if page and chunk sizes agree.
        let aligned: Option<&PagesState> = self
            .prev
            .filter(|p| p.page_size == page_size && p.chunk_size == chunk_size);
        let pages_per_chunk = chunk_size / u64::from(page_size);
        let (tenant, db) = (&cp.cfg.tenant, self.sink.db());
        let dirty = self.items.dirty.as_deref();
        let mut contexts = Vec::new();
        for c in chunks
            .iter()
            .filter(|c| !self.items.chunks.contains_key(&c.index))
        {
            let prev = aligned
                .and_then(|p| p.chunks.get(c.index as usize))
                .cloned();
            let stored = match &prev {
                Some(pc) => cp.state.chunk_digests(tenant, db, c.index)?.filter(|d| {
                    d.tip == tip(pc)
                        && d.page_size == page_size
                        && d.digests.len() as u64 * u64::from(page_size) == pc.len
                }),
                None => None,
            };
            let dirty = dirty.map(|d| {
                let first = c.index * pages_per_chunk;
                let lo = d.partition_point(|p| *p < first);
                let hi = d.partition_point(|p| *p < first + pages_per_chunk);
                d[lo..hi]
                    .iter()
                    .filter_map(|p| u32::try_from(p - first).ok())
                    .collect()
            });
            contexts.push(ChunkCtx {
                plan: *c,
                page_size,
                generation: self.generation,
                prev,
                stored,
                dirty,
                model: cp.cfg.cost_model,
                file: Arc::clone(&file),
                path: path.to_path_buf(),
                scratch: self.sink.scratch().clone(),
            });
        }
        let mut analyses = stream::iter(contexts)
            .map(|ctx| {
                let plan = ctx.plan;
                async move {
                    let a = tokio::task::spawn_blocking(move || analyse(ctx))
                        .await
                        .map_err(|source| CairnError::Join {
                            job: job_id.to_string(),
                            what: "chunk analysis",
                            source,
                        })??;
                    Ok::<_, CairnError>((plan, a))
                }
            })
            .buffered(cp.cfg.scan_concurrency);
        while let Some(next) = analyses.next().await {
            let (c, analysis) = next?;
            cp.check_cancel(job_id)?;
            let (item, digests) = match analysis {
                Analysis::Unchanged(state) => (
                    ChunkItem {
                        state,
                        new_blob: None,
                        outcome: Outcome::Unchanged,
                        dirty: 0,
                    },
                    None,
                ),
                Analysis::Full {
                    staged,
                    digests,
                    dirty,
                } => {
                    let base = self.sink.put_staged(staged).await?;
                    let state = ChunkState {
                        index: c.index,
                        len: c.len,
                        base,
                        deltas: Vec::new(),
                    };
                    let item = ChunkItem {
                        state,
                        new_blob: Some(base),
                        outcome: Outcome::Full,
                        dirty,
                    };
                    (item, Some(digests))
                }
                Analysis::Delta {
                    prev,
                    payload,
                    digests,
                    dirty,
                } => {
                    let delta = self.sink.put_bytes(BlobKind::Delta, payload).await?;
                    let mut deltas = prev.deltas;
                    deltas.push(delta);
                    let state = ChunkState {
                        index: c.index,
                        len: c.len,
                        base: prev.base,
                        deltas,
                    };
                    let item = ChunkItem {
                        state,
                        new_blob: Some(delta),
                        outcome: Outcome::Delta,
                        dirty,
                    };
                    (item, Some(digests))
                }
            };
            let mut writes = vec![Item::Chunk(c.index, &item)];
            if let Some(d) = &digests {
                writes.push(Item::Digests(c.index, d));
            }
            self.job.progress(
                |r| {
                    r.progress.done += 1;
                    r.progress.bytes_done += c.len;
                },
                &writes,
            )?;
            drop(writes);
            self.items.chunks.insert(c.index, item);
            if let Some(d) = digests {
                self.items.digests.insert(c.index, d);
            }
        }
        self.job.update(|r| r.phase = Phase::Staged, &[])?;
        assemble(self.job, self.items, &self.shape)
    }
}

/// The manifest body and the digests to commit, from every recorded chunk.
fn assemble(job: &Job<'_>, items: &JobItems, shape: &PagesShape<'_>) -> Result<Staged, CairnError> {
    let chunks = shape.chunks;
    let mut states = Vec::with_capacity(chunks.len());
    let mut updates = Vec::new();
    let recorded: &BTreeMap<u64, ChunkItem> = &items.chunks;
    for c in chunks {
        let item = recorded
            .get(&c.index)
            .ok_or_else(|| CairnError::ChunkNotRecorded {
                job: job.id().to_string(),
                chunk: c.index,
            })?;
        if item.outcome != Outcome::Unchanged {
            if let Some(d) = items.digests.get(&c.index) {
                updates.push(ChunkDigests {
                    index: c.index,
                    tip: tip(&item.state),
                    page_size: shape.page_size,
                    digests: d.clone(),
                });
            }
        }
        states.push(item.state.clone());
    }
    Ok(Staged::Pages {
        origin: shape.origin,
        page_size: shape.page_size,
        chunk_size: shape.chunk_size,
        len: shape.len,
        chunks: states,
        digests: updates,
    })
}
