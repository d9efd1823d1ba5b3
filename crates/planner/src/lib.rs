//! The planner: a pure, deterministic function from (previous generation, current source
//! shape) to the work a checkpoint must do. No I/O, no clock, no randomness: the same
//! inputs always give the same plan, which is why a plan can be persisted and a resumed job
//! produces the same blob names.

mod cost;

use std::collections::BTreeMap;

use cairn_core::{Lsn, PagesState, SegmentEntry, SegmentsState, SourceKind};
use serde::{Deserialize, Serialize};

pub use cost::{decide_chunk, ChainInfo, ChunkDecision, ChunkInput, CostModel, FullReason};

/// Planning errors: the source contradicts the previous generation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// Chunk size not a positive multiple of the page size.
    #[error("chunk size {chunk_size} is not a positive multiple of the page size {page_size}")]
    BadChunkSize {
        /// Requested chunk size.
        chunk_size: u64,
        /// Page size.
        page_size: u32,
    },
    /// A raw page source's page size differs from the previous generation's.
    #[error("page size {given} differs from {previous} used by generation {generation}: wrong --page-size?")]
    PageSizeChanged {
        /// Page size given now.
        given: u32,
        /// Page size of the previous generation.
        previous: u32,
        /// The previous generation.
        generation: u64,
    },
    /// A sealed segment changed length since it was checkpointed.
    #[error("sealed segment {name} changed length from {previous} to {now} bytes; sealed segments must be immutable")]
    SegmentChanged {
        /// Segment name.
        name: String,
        /// Length recorded.
        previous: u64,
        /// Length now.
        now: u64,
    },
    /// A new segment sorts before segments already checkpointed.
    #[error("new segment {name} sorts before already checkpointed segment {last}; segments must be appended in name order")]
    OutOfOrder {
        /// The new segment.
        name: String,
        /// The last checkpointed segment.
        last: String,
    },
    /// A checkpointed segment vanished from the middle of the directory.
    #[error("segment {missing} is missing between {before} and {after}; only the oldest segments may be removed")]
    Gap {
        /// The missing segment.
        missing: String,
        /// The segment before it that is present.
        before: String,
        /// The segment after it that is present.
        after: String,
    },
    /// The newest checkpointed segments vanished from the directory.
    #[error("segment {missing} (checkpointed after {last_present}) is missing; sealed segments may only be removed from the head")]
    TailMissing {
        /// The first missing segment.
        missing: String,
        /// The last one still present.
        last_present: String,
    },
    /// Two segments with the same name.
    #[error("segment {0} is listed twice")]
    Duplicate(String),
}

/// The shape of a page source now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagesInput {
    /// `sqlite` or `pages`.
    pub origin: SourceKind,
    /// File length in bytes.
    pub len: u64,
    /// Page size in bytes.
    pub page_size: u32,
    /// Chunk size in bytes.
    pub chunk_size: u64,
}

/// One chunk to checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkPlan {
    /// Chunk index.
    pub index: u64,
    /// First byte of the chunk in the file.
    pub offset: u64,
    /// Bytes in the chunk (the last chunk may be short).
    pub len: u64,
}

/// The plan for a page source: every chunk of the file, each hashed and written as a full
/// base unless the store already holds a blob with the same content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagesPlan {
    /// Page size.
    pub page_size: u32,
    /// Chunk size.
    pub chunk_size: u64,
    /// File length.
    pub len: u64,
    /// Chunks in index order, covering `[0, len)` exactly.
    pub chunks: Vec<ChunkPlan>,
}

/// Plans a checkpoint of a page source on top of `prev` (the latest generation, if any).
pub fn plan_pages(
    prev: Option<(u64, &PagesState)>,
    input: &PagesInput,
) -> Result<PagesPlan, PlanError> {
    if input.page_size == 0
        || input.chunk_size == 0
        || !input.chunk_size.is_multiple_of(u64::from(input.page_size))
    {
        return Err(PlanError::BadChunkSize {
            chunk_size: input.chunk_size,
            page_size: input.page_size,
        });
    }
    if let Some((generation, p)) = prev {
        if input.origin == SourceKind::Pages && p.page_size != input.page_size {
            return Err(PlanError::PageSizeChanged {
                given: input.page_size,
                previous: p.page_size,
                generation,
            });
        }
    }
    let n = input.len.div_ceil(input.chunk_size);
    let chunks = (0..n)
        .map(|index| {
            let offset = index * input.chunk_size;
            ChunkPlan {
                index,
                offset,
                len: input.chunk_size.min(input.len - offset),
            }
        })
        .collect();
    Ok(PagesPlan {
        page_size: input.page_size,
        chunk_size: input.chunk_size,
        len: input.len,
        chunks,
    })
}

/// A segment as found in the source directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInput {
    /// File name.
    pub name: String,
    /// Length in bytes.
    pub len: u64,
}

/// What to do with one segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegmentAction {
    /// Already durable in the previous generation: reference its blob again.
    Reuse(SegmentEntry),
    /// New: stage and upload it as a blob covering `[lsn_start, lsn_start + len)`.
    Upload {
        /// File name.
        name: String,
        /// First LSN.
        lsn_start: Lsn,
        /// Length in bytes.
        len: u64,
    },
}

/// The plan for a segment source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentsPlan {
    /// One action per segment present, in name order.
    pub actions: Vec<SegmentAction>,
    /// The LSN the new generation will cover up to.
    pub lsn_end: Lsn,
}

/// Plans a checkpoint of a segment directory on top of `prev`.
///
/// Segments already checkpointed keep their LSN ranges; new ones must sort after them and
/// continue the LSN space; removed segments are allowed only at the head (WAL truncation).
pub fn plan_segments(
    prev: Option<&SegmentsState>,
    input: &[SegmentInput],
) -> Result<SegmentsPlan, PlanError> {
    let mut sorted: Vec<&SegmentInput> = input.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for w in sorted.windows(2) {
        if w[0].name == w[1].name {
            return Err(PlanError::Duplicate(w[0].name.clone()));
        }
    }
    let known: BTreeMap<&str, (usize, &SegmentEntry)> = prev
        .map(|p| {
            p.segments
                .iter()
                .enumerate()
                .map(|(i, e)| (e.name.as_str(), (i, e)))
                .collect()
        })
        .unwrap_or_default();
    let last_known = prev.and_then(|p| p.segments.last());
    let mut next_lsn = prev.map_or(0, |p| p.lsn_end.0);
    let mut actions = Vec::with_capacity(sorted.len());
    let mut prev_known_idx: Option<(usize, &str)> = None;
    for s in sorted {
        if let Some((idx, e)) = known.get(s.name.as_str()) {
            if e.len != s.len {
                return Err(PlanError::SegmentChanged {
                    name: s.name.clone(),
                    previous: e.len,
                    now: s.len,
                });
            }
            if let (Some((pi, pname)), Some(p)) = (prev_known_idx, prev) {
                if *idx != pi + 1 {
                    return Err(PlanError::Gap {
                        missing: p.segments[pi + 1].name.clone(),
                        before: pname.to_string(),
                        after: s.name.clone(),
                    });
                }
            }
            prev_known_idx = Some((*idx, e.name.as_str()));
            actions.push(SegmentAction::Reuse((*e).clone()));
        } else {
            if let Some(last) = last_known {
                if s.name <= last.name {
                    return Err(PlanError::OutOfOrder {
                        name: s.name.clone(),
                        last: last.name.clone(),
                    });
                }
            }
            // A known segment after a new one is impossible: new names sort after every
            // known name, and input is sorted.
            if let (Some((pi, pname)), Some(p)) = (prev_known_idx, prev) {
                if pi + 1 != p.segments.len() {
                    return Err(PlanError::Gap {
                        missing: p.segments[pi + 1].name.clone(),
                        before: pname.to_string(),
                        after: s.name.clone(),
                    });
                }
            }
            actions.push(SegmentAction::Upload {
                name: s.name.clone(),
                lsn_start: Lsn(next_lsn),
                len: s.len,
            });
            next_lsn += s.len;
            prev_known_idx = None;
            // Everything after this is new as well.
        }
    }
    if let (Some((pi, pname)), Some(p)) = (prev_known_idx, prev) {
        if pi + 1 != p.segments.len() {
            return Err(PlanError::TailMissing {
                missing: p.segments[pi + 1].name.clone(),
                last_present: pname.to_string(),
            });
        }
    }
    let lsn_end = match actions.last() {
        Some(SegmentAction::Reuse(e)) => Lsn(e.lsn_start.0 + e.len),
        Some(SegmentAction::Upload { lsn_start, len, .. }) => Lsn(lsn_start.0 + len),
        None => Lsn(next_lsn),
    };
    Ok(SegmentsPlan { actions, lsn_end })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::{BlobKind, BlobRef, Digest128};
    use proptest::prelude::*;

    fn input(len: u64, chunk: u64) -> PagesInput {
        PagesInput {
            origin: SourceKind::Pages,
            len,
            page_size: 4096,
            chunk_size: chunk,
        }
    }

    #[test]
    fn chunks_cover_the_file() {
        let p = plan_pages(None, &input(3 * 8192 + 4096, 8192)).unwrap();
        assert_eq!(p.chunks.len(), 4);
        assert_eq!(
            p.chunks[3],
            ChunkPlan {
                index: 3,
                offset: 24576,
                len: 4096
            }
        );
        assert!(plan_pages(None, &input(0, 8192)).unwrap().chunks.is_empty());
        assert!(matches!(
            plan_pages(None, &input(8192, 5000)),
            Err(PlanError::BadChunkSize { .. })
        ));
    }

    #[test]
    fn raw_page_size_change_is_refused() {
        let prev = PagesState {
            origin: SourceKind::Pages,
            page_size: 8192,
            chunk_size: 8192,
            len: 0,
            chunks: vec![],
        };
        let err = plan_pages(Some((3, &prev)), &input(8192, 8192)).unwrap_err();
        assert!(err.to_string().contains("generation 3"), "{err}");
        let sqlite = PagesInput {
            origin: SourceKind::Sqlite,
            ..input(8192, 8192)
        };
        assert!(plan_pages(Some((3, &prev)), &sqlite).is_ok());
    }

    fn entry(name: &str, start: u64, len: u64) -> SegmentEntry {
        SegmentEntry {
            name: name.into(),
            lsn_start: Lsn(start),
            len,
            blob: BlobRef {
                kind: BlobKind::Segment,
                crc64: start,
                len,
                xxh3: Digest128(0),
                alias: 0,
            },
        }
    }

    fn seg(name: &str, len: u64) -> SegmentInput {
        SegmentInput {
            name: name.into(),
            len,
        }
    }

    #[test]
    fn segments_reuse_append_and_truncate_head() {
        let prev = SegmentsState {
            segments: vec![entry("a", 0, 10), entry("b", 10, 5)],
            lsn_end: Lsn(15),
        };
        let p = plan_segments(Some(&prev), &[seg("c", 7), seg("b", 5)]).unwrap();
        assert_eq!(p.actions[0], SegmentAction::Reuse(entry("b", 10, 5)));
        assert_eq!(
            p.actions[1],
            SegmentAction::Upload {
                name: "c".into(),
                lsn_start: Lsn(15),
                len: 7
            }
        );
        assert_eq!(p.lsn_end, Lsn(22));
        // All old segments truncated away: new ones continue the LSN space.
        let p = plan_segments(Some(&prev), &[seg("d", 1)]).unwrap();
        assert_eq!(p.lsn_end, Lsn(16));
    }

    #[test]
    fn segment_errors() {
        let prev = SegmentsState {
            segments: vec![entry("a", 0, 10), entry("b", 10, 5), entry("c", 15, 1)],
            lsn_end: Lsn(16),
        };
        assert!(matches!(
            plan_segments(Some(&prev), &[seg("a", 11)]),
            Err(PlanError::SegmentChanged { .. })
        ));
        assert!(matches!(
            plan_segments(Some(&prev), &[seg("a", 10), seg("c", 1)]),
            Err(PlanError::Gap { .. })
        ));
        assert!(matches!(
            plan_segments(Some(&prev), &[seg("a", 10), seg("z", 1)]),
            Err(PlanError::Gap { .. })
        ));
        assert!(matches!(
            plan_segments(Some(&prev), &[seg("c", 1), seg("bb", 1)]),
            Err(PlanError::OutOfOrder { .. })
        ));
        assert!(matches!(
            plan_segments(None, &[seg("x", 1), seg("x", 1)]),
            Err(PlanError::Duplicate(_))
        ));
        assert!(matches!(
            plan_segments(Some(&prev), &[seg("a", 10), seg("b", 5)]),
            Err(PlanError::TailMissing { .. })
        ));
    }

    proptest! {
        #[test]
        fn pages_plan_is_deterministic_and_exact(pages in 0u64..5000, chunk_pages in 1u64..64) {
            let inp = input(pages * 4096, chunk_pages * 4096);
            let a = plan_pages(None, &inp).unwrap();
            prop_assert_eq!(&a, &plan_pages(None, &inp).unwrap());
            let mut next = 0;
            for (i, c) in a.chunks.iter().enumerate() {
                prop_assert_eq!(c.index, i as u64);
                prop_assert_eq!(c.offset, next);
                prop_assert!(c.len > 0 && c.len <= inp.chunk_size && c.len % 4096 == 0);
                next += c.len;
            }
            prop_assert_eq!(next, inp.len);
        }

        #[test]
        fn segment_plans_chain_lsns(lens in proptest::collection::vec(1u64..1000, 0..20), keep_from in 0usize..20, extra in proptest::collection::vec(1u64..1000, 0..5)) {
            let first: Vec<SegmentInput> = lens.iter().enumerate().map(|(i, l)| seg(&format!("{i:04}"), *l)).collect();
            let p1 = plan_segments(None, &first).unwrap();
            let entries: Vec<SegmentEntry> = p1.actions.iter().map(|a| match a {
                SegmentAction::Upload { name, lsn_start, len } => entry(name, lsn_start.0, *len),
                SegmentAction::Reuse(e) => e.clone(),
            }).collect();
            prop_assert_eq!(p1.lsn_end.0, lens.iter().sum::<u64>());
            let prev = SegmentsState { segments: entries.clone(), lsn_end: p1.lsn_end };
            let mut second: Vec<SegmentInput> = first.iter().skip(keep_from.min(first.len())).cloned().collect();
            second.extend(extra.iter().enumerate().map(|(i, l)| seg(&format!("{:04}", 1000 + i), *l)));
            let p2 = plan_segments(Some(&prev), &second).unwrap();
            prop_assert_eq!(&p2, &plan_segments(Some(&prev), &second).unwrap());
            let mut end: Option<u64> = None;
            for a in &p2.actions {
                let (s, l) = match a { SegmentAction::Reuse(e) => (e.lsn_start.0, e.len), SegmentAction::Upload { lsn_start, len, .. } => (lsn_start.0, *len) };
                if let Some(e) = end { prop_assert_eq!(e, s); }
                end = Some(s + l);
            }
            prop_assert_eq!(p2.lsn_end.0, p1.lsn_end.0 + extra.iter().sum::<u64>());
        }
    }
}
