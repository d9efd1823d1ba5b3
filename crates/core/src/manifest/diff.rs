//! Differential manifests: the change from a generation's parent state to its own, so a
//! publication costs what changed, not the database's size.
//!
//! A diff names the page checkpoint's header and only the chunks that differ from the
//! parent's, and for the WAL stream how many segments left its head and its tail and which
//! were appended. [`DbState::apply`] and [`StateDiff::between`] are exact inverses:
//! `prev.apply(g, &StateDiff::between(&prev, &next, g, chain))` gives `next`.

use serde::{Deserialize, Serialize};

use crate::ids::{Generation, Lsn};
use crate::manifest::state::{
    ChunkState, DbState, GcState, PagesState, SegmentEntry, SourceKind, WalState,
};

/// A new page checkpoint, as the chunks that differ from the parent's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagesDiff {
    /// `sqlite` or `pages`.
    pub origin: SourceKind,
    /// Page size.
    pub page_size: u32,
    /// Chunk size.
    pub chunk_size: u64,
    /// File length.
    pub len: u64,
    /// The LSN it covers, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<Lsn>,
    /// The generation that took the checkpoint (this one, or an older one a tail
    /// truncation went back to).
    pub generation: Generation,
    /// Chunks that differ from the parent's (or are new), in index order; chunks past the
    /// new length are dropped.
    pub chunks: Vec<ChunkState>,
}

/// The change of a WAL stream: segments dropped at its head and tail, then appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalDiff {
    /// Segments removed from the head (oldest first).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub drop_head: u64,
    /// Segments removed from the tail (newest first), before appending.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub drop_tail: u64,
    /// Segments appended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub append: Vec<SegmentEntry>,
    /// The stream's start afterwards.
    pub start: Lsn,
    /// The stream's end afterwards.
    pub end: Lsn,
    /// The newest name the stream has held, afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// What changed from the parent generation's state to this one's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDiff {
    /// Diffs since the last full manifest, this one included (at least 1): the full one is
    /// generation `this − chain`.
    pub chain: u32,
    /// A changed page checkpoint; `None` when the pages are the parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<PagesDiff>,
    /// A changed WAL stream; `None` when it is the parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<WalDiff>,
    /// Garbage collection's new record; `None` when it is the parent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc: Option<GcState>,
}

impl StateDiff {
    /// The diff that turns `prev` into `next`.
    pub fn between(prev: &DbState, next: &DbState, chain: u32) -> StateDiff {
        let pages = match (&prev.pages, &next.pages) {
            (a, Some(n)) if a.as_ref() != Some(n) => {
                let same_layout = a
                    .as_ref()
                    .is_some_and(|p| p.chunk_size == n.chunk_size && p.page_size == n.page_size);
                let chunks = n
                    .chunks
                    .iter()
                    .filter(|c| {
                        !same_layout
                            || a.as_ref()
                                .and_then(|p| p.chunks.get(c.index as usize))
                                .is_none_or(|old| old != *c)
                    })
                    .cloned()
                    .collect();
                Some(PagesDiff {
                    origin: n.origin,
                    page_size: n.page_size,
                    chunk_size: n.chunk_size,
                    len: n.len,
                    lsn: n.lsn,
                    generation: n.generation,
                    chunks,
                })
            }
            _ => None,
        };
        let wal = match (&prev.wal, &next.wal) {
            (a, Some(n)) if a.as_ref() != Some(n) => Some(wal_diff(a.as_ref(), n)),
            _ => None,
        };
        let gc = (prev.gc != next.gc).then(|| next.gc.clone());
        StateDiff {
            chain,
            pages,
            wal,
            gc,
        }
    }

    /// Entries this diff carries (chunks and segments), to weigh it against a full state.
    pub fn entries(&self) -> usize {
        self.pages.as_ref().map_or(0, |p| p.chunks.len())
            + self.wal.as_ref().map_or(0, |w| w.append.len())
    }
}

fn wal_diff(prev: Option<&WalState>, next: &WalState) -> WalDiff {
    let old: &[SegmentEntry] = prev.map_or(&[], |p| &p.segments);
    // The segments next keeps from prev form a contiguous run of prev, at next's start.
    let head = next
        .segments
        .first()
        .and_then(|first| old.iter().position(|s| s == first));
    let (drop_head, kept) = match head {
        Some(h) => {
            let kept = old[h..]
                .iter()
                .zip(&next.segments)
                .take_while(|(a, b)| a == b)
                .count();
            (h, kept)
        }
        None => (old.len(), 0),
    };
    let drop_tail = old.len() - drop_head - kept;
    WalDiff {
        drop_head: drop_head as u64,
        drop_tail: drop_tail as u64,
        append: next.segments[kept..].to_vec(),
        start: next.start,
        end: next.end,
        last_name: next.last_name.clone(),
    }
}

impl DbState {
    /// Applies a diff to this (the parent's) state, giving the diff's generation's state.
    /// The error says what does not fit; the result is validated.
    pub fn apply(&mut self, d: &StateDiff) -> Result<(), String> {
        if let Some(pd) = &d.pages {
            let n = usize::try_from(pd.len.div_ceil(pd.chunk_size.max(1))).unwrap_or(usize::MAX);
            let mut chunks = match self.pages.take() {
                Some(p) if p.chunk_size == pd.chunk_size && p.page_size == pd.page_size => p.chunks,
                _ => Vec::new(),
            };
            chunks.truncate(n);
            for c in &pd.chunks {
                let i = usize::try_from(c.index).unwrap_or(usize::MAX);
                match i.cmp(&chunks.len()) {
                    std::cmp::Ordering::Less => chunks[i] = c.clone(),
                    std::cmp::Ordering::Equal => chunks.push(c.clone()),
                    std::cmp::Ordering::Greater => {
                        return Err(format!(
                            "the diff's chunk {} leaves a gap after chunk {}",
                            c.index,
                            chunks.len()
                        ))
                    }
                }
            }
            self.pages = Some(PagesState {
                origin: pd.origin,
                page_size: pd.page_size,
                chunk_size: pd.chunk_size,
                len: pd.len,
                lsn: pd.lsn,
                generation: pd.generation,
                chunks,
            });
        }
        if let Some(wd) = &d.wal {
            let mut segments = self.wal.take().map(|w| w.segments).unwrap_or_default();
            let (h, t) = (
                usize::try_from(wd.drop_head).unwrap_or(usize::MAX),
                usize::try_from(wd.drop_tail).unwrap_or(usize::MAX),
            );
            if h.saturating_add(t) > segments.len() {
                return Err(format!(
                    "the diff drops {h} + {t} segments of a stream of {}",
                    segments.len()
                ));
            }
            segments.truncate(segments.len() - t);
            segments.drain(..h);
            segments.extend(wd.append.iter().cloned());
            self.wal = Some(WalState {
                start: wd.start,
                end: wd.end,
                last_name: wd.last_name.clone(),
                segments,
            });
        }
        if let Some(gc) = &d.gc {
            self.gc = gc.clone();
        }
        self.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::{BlobKind, BlobRef, Digest128};
    use proptest::prelude::*;

    fn blob(kind: BlobKind, len: u64, c: u64) -> BlobRef {
        BlobRef {
            kind,
            crc64: c,
            len,
            xxh3: Digest128(u128::from(c)),
            alias: 0,
            scheme: 0,
            epoch: 0,
        }
    }

    fn seg(i: u64, start: u64, len: u64) -> SegmentEntry {
        SegmentEntry {
            name: format!("{i:08}.seg"),
            lsn_start: Lsn(start),
            lsn_end: Lsn(start + len),
            len,
            blob: blob(BlobKind::Segment, len, i),
        }
    }

    /// A random history step: grow the stream, truncate its head or tail, checkpoint pages.
    #[derive(Clone, Debug)]
    enum Step {
        Append(u8),
        Head(u8),
        Tail(u8),
        Pages {
            chunks: u8,
            changed: Vec<u8>,
            lsn: bool,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1u8..4).prop_map(Step::Append),
            (0u8..3).prop_map(Step::Head),
            (0u8..2).prop_map(Step::Tail),
            (
                0u8..6,
                proptest::collection::vec(0u8..6, 0..4),
                any::<bool>()
            )
                .prop_map(|(chunks, changed, lsn)| Step::Pages {
                    chunks,
                    changed,
                    lsn
                }),
        ]
    }

    fn next_state(prev: &DbState, s: &Step, g: u64, seq: &mut u64) -> DbState {
        let mut st = prev.clone();
        let mut wal = st.wal.take().unwrap_or(WalState {
            start: Lsn(0),
            end: Lsn(0),
            last_name: None,
            segments: vec![],
        });
        match s {
            Step::Append(n) => {
                for _ in 0..*n {
                    *seq += 1;
                    let len = 10 + *seq % 7;
                    wal.segments.push(seg(*seq, wal.end.0, len));
                    wal.end = Lsn(wal.end.0 + len);
                    wal.last_name = Some(format!("{:08}.seg", *seq));
                }
            }
            Step::Head(n) => {
                let n = (*n as usize).min(wal.segments.len());
                wal.segments.drain(..n);
                wal.start = wal.segments.first().map_or(wal.end, |s| s.lsn_start);
            }
            Step::Tail(n) => {
                let n = (*n as usize).min(wal.segments.len());
                wal.segments.truncate(wal.segments.len() - n);
                wal.end = wal.segments.last().map_or(wal.start, |s| s.lsn_end);
                if n > 0 {
                    wal.last_name = wal.segments.last().map(|s| s.name.clone());
                }
            }
            Step::Pages {
                chunks,
                changed,
                lsn,
            } => {
                let chunk_size = 8192u64;
                let len = u64::from(*chunks) * chunk_size;
                let old = st.pages.take();
                let cs = (0..u64::from(*chunks))
                    .map(|i| {
                        let keep = old.as_ref().and_then(|p| p.chunks.get(i as usize)).cloned();
                        match keep {
                            Some(c) if !changed.contains(&(i as u8)) => c,
                            _ => ChunkState {
                                index: i,
                                len: chunk_size,
                                base: blob(BlobKind::Base, chunk_size, g * 100 + i),
                                deltas: vec![],
                            },
                        }
                    })
                    .collect();
                st.pages = Some(PagesState {
                    origin: SourceKind::Pages,
                    page_size: 4096,
                    chunk_size,
                    len,
                    lsn: lsn.then_some(wal.end),
                    generation: Generation(g),
                    chunks: cs,
                });
            }
        }
        st.wal = Some(wal);
        st
    }

    proptest! {
        #[test]
        fn applying_the_diff_between_two_states_gives_the_second(
            steps in proptest::collection::vec(step(), 1..30)
        ) {
            let mut seq = 0;
            let mut state = DbState::default();
            for (g, s) in steps.iter().enumerate() {
                let next = next_state(&state, s, g as u64 + 1, &mut seq);
                prop_assert_eq!(next.validate(), Ok(()));
                let d = StateDiff::between(&state, &next, 1);
                let mut applied = state.clone();
                prop_assert_eq!(applied.apply(&d), Ok(()));
                prop_assert_eq!(&applied, &next);
                // A diff carries only what changed.
                if let (Some(a), Some(b)) = (&state.wal, &next.wal) {
                    let kept = a.segments.iter().filter(|s| b.segments.contains(s)).count();
                    prop_assert!(d.wal.as_ref().is_none_or(|w| w.append.len() == b.segments.len() - kept));
                }
                state = next;
            }
        }
    }

    #[test]
    fn a_diff_that_does_not_fit_is_refused() {
        let mut st = DbState::default();
        let d = StateDiff {
            chain: 1,
            pages: None,
            wal: Some(WalDiff {
                drop_head: 1,
                drop_tail: 0,
                append: vec![],
                start: Lsn(0),
                end: Lsn(0),
                last_name: None,
            }),
            gc: None,
        };
        assert!(st.apply(&d).unwrap_err().contains("drops"));
        let d = StateDiff {
            chain: 1,
            pages: None,
            wal: Some(WalDiff {
                drop_head: 0,
                drop_tail: 0,
                append: vec![seg(1, 5, 10)],
                start: Lsn(0),
                end: Lsn(15),
                last_name: Some("00000001.seg".into()),
            }),
            gc: None,
        };
        assert!(st.apply(&d).unwrap_err().contains("starts at 5"));
    }
}
