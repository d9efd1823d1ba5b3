//! The typed items of a job: everything a job persists beside its record, with the one
//! codec that maps each to its key ([`cairn_state::ItemKey`]) and bytes.
//!
//! | item | key | value |
//! |---|---|---|
//! | [`Item::Plan`] | `plan` | a checkpoint's [`CkptPlan`], JSON |
//! | [`Item::Dirty`] | `dirty` | the engine's dirty pages, u64 LE each, written once at enqueue |
//! | [`Item::Chunk`] | `c` + index | a checkpoint's finished [`ChunkItem`], JSON |
//! | [`Item::Digests`] | `d` + index | that chunk's new page digests, 16 bytes each |
//! | [`Item::Segment`] | `s` + position | a checkpoint's finished [`SegItem`], JSON |
//! | [`Item::Gc`] | `gcplan` | a garbage collection's plan, JSON |
//! | [`Item::Ranges`] | `ranges` | the engine's LSN ranges of segment files, JSON, written once at enqueue |
//! | [`Item::Restored`] | `r` + index | a restore's "chunk written and synced" marker, empty |
//! | [`Item::RestoredSegment`] | `w` + position | a restore's "segment written and synced" marker, empty |

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use cairn_core::{BlobRef, ChunkState, JobId, Lsn, SegmentEntry, SourceKind};
use cairn_planner::{ChunkPlan, NewSegment};
use cairn_state::ItemKey;
use serde::{Deserialize, Serialize};

use crate::CairnError;

/// A checkpoint's persisted plan: the first durable step of the job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct CkptPlan {
    /// The generation the job publishes.
    pub generation: u64,
    /// The generation it builds on.
    pub parent: Option<u64>,
    /// Creation time, taken from the clock once at planning; the manifest's.
    pub created_unix_ms: u64,
    /// What to read.
    pub body: PlanBody,
}

/// The source-specific part of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "snake_case")]
pub(crate) enum PlanBody {
    /// A file of pages.
    Pages {
        /// `sqlite` or `pages`.
        origin: SourceKind,
        /// The file read: the source itself, or the SQLite snapshot in scratch.
        file: PathBuf,
        /// Page size.
        page_size: u32,
        /// Chunk size.
        chunk_size: u64,
        /// File length.
        len: u64,
        /// The LSN the page checkpoint covers, if the engine gave one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lsn: Option<Lsn>,
        /// Inode and modification time of the file when planned: a file changed in place
        /// since (not quiescent after all) makes the plan stale instead of mixing contents.
        #[serde(default)]
        stamp: Option<(u64, i64, i64)>,
        /// Every chunk of the file.
        chunks: Vec<ChunkPlan>,
        /// For a SQLite database read in place under a read transaction: its WAL position
        /// and how its changed pages are found. Such a plan is valid only while the attempt
        /// that made it holds the snapshot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sqlite: Option<SqlitePlan>,
    },
    /// A directory of segments.
    Segments {
        /// The directory.
        dir: PathBuf,
        /// The segments to append to the stream.
        new: Vec<NewSegment>,
        /// The stream's start (of a new stream: its first LSN).
        start: Lsn,
        /// The stream's end afterwards.
        end: Lsn,
    },
}

/// How one chunk was checkpointed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// Written as a new base.
    Full,
    /// A delta appended to its chain.
    Delta,
    /// Left as it was.
    Unchanged,
}

/// A chunk done (staged or known to be stored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ChunkItem {
    /// The chunk's state in the new generation.
    pub state: ChunkState,
    /// The blob this job added, if any.
    pub new_blob: Option<BlobRef>,
    /// What was done.
    pub outcome: Outcome,
    /// Pages that changed.
    pub dirty: u64,
}

/// A new segment done (staged or known to be stored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct SegItem {
    /// The segment as the manifest will list it.
    pub entry: SegmentEntry,
}

/// One item to write or delete, in the batch of a record update.
pub(crate) enum Item<'a> {
    /// A checkpoint's plan.
    Plan(&'a CkptPlan),
    /// The engine's dirty pages (file-wide page numbers).
    Dirty(&'a [u64]),
    /// The engine's LSN ranges of segment files, by name.
    Ranges(&'a BTreeMap<String, (Lsn, Lsn)>),
    /// A garbage collection's plan.
    Gc(&'a crate::gc::GcPlan),
    /// A finished chunk.
    Chunk(u64, &'a ChunkItem),
    /// A finished chunk's page digests.
    Digests(u64, &'a [u128]),
    /// A finished new segment.
    Segment(u64, &'a SegItem),
    /// A restored chunk.
    Restored(u64),
    /// A restored segment.
    RestoredSegment(u64),
    /// Removes an item.
    Delete(ItemKey),
}

impl Item<'_> {
    /// The item's key and encoded value (`None` deletes it).
    pub(crate) fn encode(&self, job: JobId) -> Result<(ItemKey, Option<Vec<u8>>), CairnError> {
        Ok(match self {
            Item::Plan(p) => (ItemKey::Plan, Some(json(job, "plan", *p)?)),
            Item::Dirty(pages) => (
                ItemKey::Dirty,
                Some(pages.iter().flat_map(|p| p.to_le_bytes()).collect()),
            ),
            Item::Chunk(i, c) => (ItemKey::Chunk(*i), Some(json(job, "chunk item", *c)?)),
            Item::Digests(i, d) => (
                ItemKey::ChunkDigests(*i),
                Some(cairn_core::address::digests_to_bytes(d)),
            ),
            Item::Segment(i, s) => (ItemKey::Segment(*i), Some(json(job, "segment item", *s)?)),
            Item::Ranges(r) => (ItemKey::Ranges, Some(json(job, "segment ranges", *r)?)),
            Item::Gc(p) => (ItemKey::GcPlan, Some(json(job, "gc plan", *p)?)),
            Item::Restored(i) => (ItemKey::Restored(*i), Some(Vec::new())),
            Item::RestoredSegment(i) => (ItemKey::RestoredSegment(*i), Some(Vec::new())),
            Item::Delete(k) => (*k, None),
        })
    }
}

fn json<T: Serialize>(job: JobId, item: &'static str, v: &T) -> Result<Vec<u8>, CairnError> {
    serde_json::to_vec(v).map_err(|source| CairnError::Encode {
        job: job.to_string(),
        item,
        source,
    })
}

/// What a SQLite page checkpoint's snapshot found (see [`cairn_executor::SqliteSnapshot`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SqlitePlan {
    /// The snapshot's WAL position, recorded with the generation when it is published.
    pub position: Option<cairn_core::WalPosition>,
    /// Why every page's digest is compared; `None` when the WAL's frames since the
    /// previous generation's position named the changed pages.
    pub full_scan_reason: Option<cairn_executor::FullScanReason>,
    /// Committed WAL frames the snapshot included.
    pub wal_frames: u32,
}

/// Everything a job has persisted beside its record.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct JobItems {
    pub plan: Option<CkptPlan>,
    pub dirty: Option<Vec<u64>>,
    pub ranges: Option<BTreeMap<String, (Lsn, Lsn)>>,
    pub chunks: BTreeMap<u64, ChunkItem>,
    pub digests: BTreeMap<u64, Vec<u128>>,
    pub segments: BTreeMap<u64, SegItem>,
    pub restored: BTreeSet<u64>,
    pub restored_segments: BTreeSet<u64>,
    pub gc: Option<crate::gc::GcPlan>,
}

impl JobItems {
    /// Decodes a job's stored items; an undecodable one is an error naming it.
    pub(crate) fn decode(job: JobId, stored: Vec<(ItemKey, Vec<u8>)>) -> Result<Self, CairnError> {
        let bad = |item: String, reason: String| CairnError::CorruptJob {
            job: job.to_string(),
            item,
            reason,
        };
        let mut out = Self::default();
        for (k, v) in stored {
            match k {
                ItemKey::Plan => {
                    out.plan = Some(
                        serde_json::from_slice(&v)
                            .map_err(|e| bad("plan".into(), e.to_string()))?,
                    )
                }
                ItemKey::Dirty => {
                    if v.len() % 8 != 0 {
                        return Err(bad("dirty pages".into(), format!("{} bytes", v.len())));
                    }
                    out.dirty = Some(
                        v.chunks_exact(8)
                            .map(|c| {
                                let mut a = [0u8; 8];
                                a.copy_from_slice(c);
                                u64::from_le_bytes(a)
                            })
                            .collect(),
                    );
                }
                ItemKey::Chunk(i) => {
                    let c = serde_json::from_slice(&v)
                        .map_err(|e| bad(format!("chunk item {i}"), e.to_string()))?;
                    out.chunks.insert(i, c);
                }
                ItemKey::ChunkDigests(i) => {
                    let d = cairn_core::address::digests_from_bytes(&v).ok_or_else(|| {
                        bad(
                            format!("page digests of chunk {i}"),
                            format!("{} bytes", v.len()),
                        )
                    })?;
                    out.digests.insert(i, d);
                }
                ItemKey::Segment(i) => {
                    let s = serde_json::from_slice(&v)
                        .map_err(|e| bad(format!("segment item {i}"), e.to_string()))?;
                    out.segments.insert(i, s);
                }
                ItemKey::Ranges => {
                    out.ranges = Some(
                        serde_json::from_slice(&v)
                            .map_err(|e| bad("segment ranges".into(), e.to_string()))?,
                    )
                }
                ItemKey::GcPlan => {
                    out.gc = Some(
                        serde_json::from_slice(&v)
                            .map_err(|e| bad("gc plan".into(), e.to_string()))?,
                    )
                }
                ItemKey::Restored(i) => {
                    out.restored.insert(i);
                }
                ItemKey::RestoredSegment(i) => {
                    out.restored_segments.insert(i);
                }
            }
        }
        Ok(out)
    }
}
