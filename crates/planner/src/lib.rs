//! The planner: a pure, deterministic function from (previous generation, current source
//! shape) to the work a checkpoint must do. No I/O, no clock, no randomness: the same
//! inputs always give the same plan, which is why a plan can be persisted and a resumed job
//! produces the same blob names.

mod cost;
pub mod gc;
pub mod wal;

use std::collections::BTreeMap;

use cairn_core::{Lsn, PagesState, SegmentEntry, SourceKind, WalState};
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
    /// A sealed segment changed since it was checkpointed.
    #[error(
        "sealed segment {name} changed from {previous} to {now}; sealed segments must be immutable"
    )]
    SegmentChanged {
        /// Segment name.
        name: String,
        /// What was recorded (length, LSN range).
        previous: String,
        /// What it is now.
        now: String,
    },
    /// A segment that is not in the published stream sorts inside it.
    #[error("segment {name} is not in the published WAL stream but sorts before its newest segment {last}; new segments must be appended in name order")]
    OutOfOrder {
        /// The new segment.
        name: String,
        /// The newest segment the stream has held.
        last: String,
    },
    /// A new segment does not start where the stream ends.
    #[error("new segment {name} starts at LSN {start}, but the WAL stream ends at {end}")]
    Gap {
        /// The segment.
        name: String,
        /// Its first LSN.
        start: Lsn,
        /// Where the stream (with the segments before it) ends.
        end: Lsn,
    },
    /// A segment's LSN range is empty or reversed, or given for some segments only.
    #[error("segment {name}: {reason}")]
    BadRange {
        /// The segment.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A page checkpoint's LSN is older than the database's newest one.
    #[error("page checkpoint at LSN {lsn} is older than generation {generation}'s at {newest}; page checkpoints must not go back")]
    LsnBackwards {
        /// The LSN given.
        lsn: Lsn,
        /// The newest page checkpoint's LSN.
        newest: Lsn,
        /// Its generation.
        generation: u64,
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
    /// The LSN range `[start, end)` the engine gives it; `None`: byte offsets, the
    /// segments in name order continuing the stream.
    pub lsn: Option<(Lsn, Lsn)>,
}

/// A segment to upload and append to the WAL stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSegment {
    /// File name.
    pub name: String,
    /// First LSN.
    pub lsn_start: Lsn,
    /// One past the last LSN.
    pub lsn_end: Lsn,
    /// Length in bytes.
    pub len: u64,
}

/// The plan for a segment source: what to append to the published stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentsPlan {
    /// New segments, in name (and LSN) order.
    pub new: Vec<NewSegment>,
    /// The stream's start: the published one's, or for a new stream its first LSN (0 at
    /// byte offsets, the first range's start with the engine's ranges).
    pub start: Lsn,
    /// The stream's end afterwards.
    pub end: Lsn,
}

/// Plans a checkpoint of a segment directory on top of the published stream `prev`.
///
/// Published segments still present must be unchanged; published ones that are gone were
/// deleted by the engine (below the truncation watermark) and stay published. Segments
/// sorting after the newest one the stream has held are new: they continue the stream,
/// at byte offsets in name order, or at the LSN ranges the engine gives (which must be
/// contiguous from the stream's end). Unpublished segments sorting before the stream's head
/// were truncated from it and are ignored; any other unpublished one is out of order.
pub fn plan_segments(
    prev: Option<&WalState>,
    input: &[SegmentInput],
) -> Result<SegmentsPlan, PlanError> {
    let mut sorted: Vec<&SegmentInput> = input.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for w in sorted.windows(2) {
        if w[0].name == w[1].name {
            return Err(PlanError::Duplicate(w[0].name.clone()));
        }
    }
    if let (Some(a), Some(b)) = (
        sorted.iter().find(|s| s.lsn.is_some()),
        sorted.iter().find(|s| s.lsn.is_none()),
    ) {
        return Err(PlanError::BadRange {
            name: b.name.clone(),
            reason: format!(
                "has no LSN range while {} has one; give all or none",
                a.name
            ),
        });
    }
    let published: BTreeMap<&str, &SegmentEntry> = prev
        .map(|p| p.segments.iter().map(|e| (e.name.as_str(), e)).collect())
        .unwrap_or_default();
    let last_name = prev.and_then(|p| p.last_name.as_deref());
    let head_name = prev
        .and_then(|p| p.segments.first())
        .map(|e| e.name.as_str());
    // A new stream starts where the engine's first range does (or at 0).
    let first = match (prev, sorted.first().and_then(|s| s.lsn)) {
        (None, Some((start, _))) => start,
        (None, None) => Lsn(0),
        (Some(p), _) => p.end,
    };
    let start = prev.map_or(first, |p| p.start);
    let mut end = first;
    let mut new = Vec::new();
    for s in sorted {
        if let Some(e) = published.get(s.name.as_str()) {
            let range = s.lsn.unwrap_or((e.lsn_start, e.lsn_end));
            if e.len != s.len || range != (e.lsn_start, e.lsn_end) {
                let show = |len: u64, (a, b): (Lsn, Lsn)| format!("{len} bytes at LSNs {a}..{b}");
                return Err(PlanError::SegmentChanged {
                    name: s.name.clone(),
                    previous: show(e.len, (e.lsn_start, e.lsn_end)),
                    now: show(s.len, range),
                });
            }
            continue;
        }
        if let Some(last) = last_name.filter(|l| s.name.as_str() <= *l) {
            let below_head = match (s.lsn, head_name, prev) {
                (Some((_, e)), _, Some(p)) => e <= p.start,
                (None, Some(h), _) => s.name.as_str() < h,
                (None, None, _) => true,
                (Some(_), _, None) => false,
            };
            if below_head {
                continue;
            }
            return Err(PlanError::OutOfOrder {
                name: s.name.clone(),
                last: last.to_string(),
            });
        }
        let (lsn_start, lsn_end) = s.lsn.unwrap_or((end, Lsn(end.0 + s.len)));
        if lsn_end < lsn_start {
            return Err(PlanError::BadRange {
                name: s.name.clone(),
                reason: format!("LSN range {lsn_start}..{lsn_end} ends before it starts"),
            });
        }
        if lsn_start != end {
            return Err(PlanError::Gap {
                name: s.name.clone(),
                start: lsn_start,
                end,
            });
        }
        new.push(NewSegment {
            name: s.name.clone(),
            lsn_start,
            lsn_end,
            len: s.len,
        });
        end = lsn_end;
    }
    Ok(SegmentsPlan { new, start, end })
}

/// Checks a page checkpoint's LSN against the database's newest one (page checkpoints
/// never go back).
pub fn check_page_lsn(prev: Option<&PagesState>, lsn: Option<Lsn>) -> Result<(), PlanError> {
    match (prev, lsn) {
        (Some(p), Some(l)) => match p.lsn {
            Some(newest) if l < newest => Err(PlanError::LsnBackwards {
                lsn: l,
                newest,
                generation: p.generation.0,
            }),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
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
            lsn: None,
            generation: cairn_core::Generation(3),
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
            lsn_end: Lsn(start + len),
            len,
            blob: BlobRef {
                kind: BlobKind::Segment,
                crc64: start,
                len,
                xxh3: Digest128(0),
                alias: 0,
                scheme: 0,
                epoch: 0,
            },
        }
    }

    fn seg(name: &str, len: u64) -> SegmentInput {
        SegmentInput {
            name: name.into(),
            len,
            lsn: None,
        }
    }

    fn stream(segments: Vec<SegmentEntry>) -> WalState {
        WalState {
            start: segments.first().map_or(Lsn(0), |s| s.lsn_start),
            end: segments.last().map_or(Lsn(0), |s| s.lsn_end),
            last_name: segments.last().map(|s| s.name.clone()),
            segments,
        }
    }

    #[test]
    fn segments_append_and_published_ones_may_go_locally() {
        let prev = stream(vec![entry("a", 0, 10), entry("b", 10, 5)]);
        let p = plan_segments(Some(&prev), &[seg("c", 7), seg("b", 5)]).unwrap();
        assert_eq!(
            p.new,
            vec![NewSegment {
                name: "c".into(),
                lsn_start: Lsn(15),
                lsn_end: Lsn(22),
                len: 7
            }]
        );
        assert_eq!(p.end, Lsn(22));
        // The engine deleted every published segment: new ones continue the LSN space.
        let p = plan_segments(Some(&prev), &[seg("d", 1)]).unwrap();
        assert_eq!(p.end, Lsn(16));
        // A segment truncated from the stream's head but still on disk is ignored.
        let truncated = stream(vec![entry("b", 10, 5)]);
        let p = plan_segments(Some(&truncated), &[seg("a", 10), seg("b", 5), seg("c", 1)]).unwrap();
        assert_eq!((p.new.len(), p.end), (1, Lsn(16)));
        // Engine-given ranges: contiguous from the end, any length.
        let ranged = |name: &str, len, a, b| SegmentInput {
            name: name.into(),
            len,
            lsn: Some((Lsn(a), Lsn(b))),
        };
        let p = plan_segments(
            Some(&prev),
            &[ranged("c", 3, 15, 40), ranged("d", 9, 40, 41)],
        )
        .unwrap();
        assert_eq!((p.new[1].lsn_start, p.end), (Lsn(40), Lsn(41)));
    }

    #[test]
    fn segment_errors() {
        let prev = stream(vec![
            entry("a", 0, 10),
            entry("b", 10, 5),
            entry("c", 15, 1),
        ]);
        assert!(matches!(
            plan_segments(Some(&prev), &[seg("a", 11)]),
            Err(PlanError::SegmentChanged { .. })
        ));
        assert!(matches!(
            plan_segments(Some(&prev), &[seg("c", 1), seg("bb", 1)]),
            Err(PlanError::OutOfOrder { .. })
        ));
        assert!(matches!(
            plan_segments(None, &[seg("x", 1), seg("x", 1)]),
            Err(PlanError::Duplicate(_))
        ));
        let ranged = |name: &str, a, b| SegmentInput {
            name: name.into(),
            len: 1,
            lsn: Some((Lsn(a), Lsn(b))),
        };
        assert!(matches!(
            plan_segments(Some(&prev), &[ranged("d", 17, 20)]),
            Err(PlanError::Gap { .. })
        ));
        assert!(matches!(
            plan_segments(Some(&prev), &[ranged("d", 16, 15)]),
            Err(PlanError::BadRange { .. })
        ));
        assert!(matches!(
            plan_segments(Some(&prev), &[ranged("d", 16, 17), seg("e", 1)]),
            Err(PlanError::BadRange { .. })
        ));
        assert!(matches!(
            plan_segments(Some(&prev), &[ranged("b", 10, 16)]),
            Err(PlanError::SegmentChanged { .. })
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
            let entries: Vec<SegmentEntry> = p1.new.iter().map(|n| entry(&n.name, n.lsn_start.0, n.len)).collect();
            prop_assert_eq!(p1.end.0, lens.iter().sum::<u64>());
            let prev = WalState { last_name: entries.last().map(|e| e.name.clone()), start: Lsn(0), end: p1.end, segments: entries };
            // The engine deleted a prefix of its local WAL and sealed more.
            let mut second: Vec<SegmentInput> = first.iter().skip(keep_from.min(first.len())).cloned().collect();
            second.extend(extra.iter().enumerate().map(|(i, l)| seg(&format!("{:04}", 1000 + i), *l)));
            let p2 = plan_segments(Some(&prev), &second).unwrap();
            prop_assert_eq!(&p2, &plan_segments(Some(&prev), &second).unwrap());
            let mut end = prev.end;
            for n in &p2.new {
                prop_assert_eq!(n.lsn_start, end);
                end = n.lsn_end;
            }
            prop_assert_eq!(p2.end.0, p1.end.0 + extra.iter().sum::<u64>());
            prop_assert_eq!(p2.new.len(), extra.len());
        }
    }
}
