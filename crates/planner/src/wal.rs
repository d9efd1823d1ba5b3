//! The engine contract, as pure functions: the truncation watermark, head and tail
//! truncation, and choosing what a restore to an LSN needs. No I/O, no clock (the caller
//! passes "now"), so every rule is property-tested over random histories.
//!
//! Vocabulary: a database's WAL stream covers `[start, end)` with contiguous sealed
//! segments; each page checkpoint that was given an LSN is a [`PageRef`]. A point `L` is
//! restorable from page checkpoint `P` (`P.lsn ≤ L`) when the stream holds every LSN of
//! `[P.lsn, L)`, or from nothing (an empty database) when the stream holds `[0, L)`.

use std::ops::Range;

use cairn_core::{Generation, Lsn, WalState};

/// A page checkpoint that covers an LSN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageRef {
    /// The LSN it covers.
    pub lsn: Lsn,
    /// The generation that took it.
    pub generation: Generation,
}

/// A lease on a range of a database's WAL, as the rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRange {
    /// The lease's identity.
    pub id: u64,
    /// First LSN it covers.
    pub start: Lsn,
    /// One past the last.
    pub end: Lsn,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_unix_ms: u64,
}

impl LeaseRange {
    /// Whether the lease is in force at `now`.
    pub fn active(&self, now_ms: u64) -> bool {
        self.expires_unix_ms > now_ms
    }

    /// Whether the lease is in force at `now` and covers any LSN of `range`.
    pub fn blocks(&self, range: &Range<Lsn>, now_ms: u64) -> bool {
        self.active(now_ms) && self.start < range.end && range.start < self.end
    }
}

/// How far an engine may delete its local WAL, never past the start of a lease in force.
/// For a database with a WAL stream it is the published stream's end: WAL that was never
/// shipped must stay, even below a page checkpoint, because the stream can only continue
/// from its end (a gap could never be bridged). For a database of page checkpoints only,
/// it is the newest page checkpoint's LSN. Only published state counts: the caller passes
/// the latest published generation's `page_lsn` and `wal_end`.
pub fn watermark(
    page_lsn: Option<Lsn>,
    wal_end: Option<Lsn>,
    leases: &[LeaseRange],
    now_ms: u64,
) -> Lsn {
    let frontier = wal_end.or(page_lsn).unwrap_or(Lsn(0));
    leases
        .iter()
        .filter(|l| l.active(now_ms))
        .map(|l| l.start)
        .fold(frontier, Lsn::min)
}

/// Why a truncation or a restore point is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalError {
    /// Truncating the head would leave the newest state without a page checkpoint to
    /// replay from.
    #[error("dropping the WAL below {before} would leave the newest state (LSN {end}) unrestorable: no page checkpoint has an LSN in {new_start}..={end}; take a page checkpoint first, or force it")]
    HeadUnrestorable {
        /// The requested head.
        before: Lsn,
        /// The stream's start afterwards.
        new_start: Lsn,
        /// The stream's end.
        end: Lsn,
    },
    /// Published state past the point a tail truncation would cut.
    #[error("published state past LSN {after}: {what}; force it to publish a generation that ends there")]
    TailPublished {
        /// The requested end.
        after: Lsn,
        /// What lies past it.
        what: String,
    },
    /// A tail truncation must cut at a segment boundary.
    #[error("LSN {after} is inside segment {segment} ({start}..{end}); the WAL can only be cut at a segment boundary")]
    NotABoundary {
        /// The requested end.
        after: Lsn,
        /// The segment it falls in.
        segment: String,
        /// Its start.
        start: Lsn,
        /// Its end.
        end: Lsn,
    },
    /// The point cannot be restored.
    #[error("LSN {lsn} cannot be restored: {why}; restorable: {restorable}")]
    NotRestorable {
        /// The requested point.
        lsn: Lsn,
        /// Why not.
        why: String,
        /// The restorable points, described.
        restorable: String,
    },
}

/// What a head truncation drops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadCut {
    /// Segments dropped from the head (those that end at or below `before`).
    pub drop: usize,
    /// The stream's start afterwards.
    pub new_start: Lsn,
}

/// Plans dropping the published segments that end at or below `before`. Unless `force`,
/// it refuses to leave the newest state unrestorable: when no page checkpoint has an LSN
/// between the stream's new start and its end (with every segment dropped, that means
/// none at the end itself).
pub fn plan_head(
    wal: &WalState,
    pages: &[PageRef],
    before: Lsn,
    force: bool,
) -> Result<HeadCut, WalError> {
    let drop = wal
        .segments
        .iter()
        .take_while(|s| s.lsn_end <= before)
        .count();
    let new_start = wal.segments.get(drop).map_or(wal.end, |s| s.lsn_start);
    let covered = pages.iter().any(|p| p.lsn >= new_start && p.lsn <= wal.end);
    if drop > 0 && !force && !covered {
        return Err(WalError::HeadUnrestorable {
            before,
            new_start,
            end: wal.end,
        });
    }
    Ok(HeadCut { drop, new_start })
}

/// What a tail truncation cuts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailCut {
    /// Segments dropped from the tail (those that start at or past `after`).
    pub drop: usize,
    /// The stream's end afterwards.
    pub new_end: Lsn,
    /// When the newest page checkpoint lies past `after`: the newest one at or below it
    /// (`Some(None)`: none), which the new generation's pages go back to.
    pub pages_back_to: Option<Option<PageRef>>,
}

/// Plans cutting the WAL at `after`: segments starting at or past it go, and a page
/// checkpoint past it is replaced by the newest one at or below it. Without `force`,
/// any such published state is refused; `after` must be a segment boundary (or at or
/// past the end, which cuts nothing).
pub fn plan_tail(
    wal: Option<&WalState>,
    pages: &[PageRef],
    newest_page: Option<Lsn>,
    after: Lsn,
    force: bool,
) -> Result<TailCut, WalError> {
    let (drop, new_end) = match wal {
        Some(w) if after < w.end => {
            if let Some(s) = w
                .segments
                .iter()
                .find(|s| s.lsn_start < after && after < s.lsn_end)
            {
                return Err(WalError::NotABoundary {
                    after,
                    segment: s.name.clone(),
                    start: s.lsn_start,
                    end: s.lsn_end,
                });
            }
            let keep = w.segments.iter().take_while(|s| s.lsn_end <= after).count();
            (w.segments.len() - keep, after.max(w.start))
        }
        Some(w) => (0, w.end),
        None => (0, after),
    };
    let pages_back_to = match newest_page {
        Some(l) if l > after => Some(pages.iter().filter(|p| p.lsn <= after).max().copied()),
        _ => None,
    };
    if !force && (drop > 0 || pages_back_to.is_some()) {
        let mut what = Vec::new();
        if drop > 0 {
            what.push(format!(
                "{drop} segment(s) up to LSN {new_end_before}",
                new_end_before = wal.map_or(after, |w| w.end)
            ));
        }
        if let Some(l) = newest_page.filter(|_| pages_back_to.is_some()) {
            what.push(format!("a page checkpoint at LSN {l}"));
        }
        return Err(WalError::TailPublished {
            after,
            what: what.join(" and "),
        });
    }
    Ok(TailCut {
        drop,
        new_end,
        pages_back_to,
    })
}

/// What restoring to an LSN reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePoint {
    /// The page checkpoint to start from; `None`: start from an empty database.
    pub page: Option<PageRef>,
    /// First LSN to replay (the page checkpoint's, or 0).
    pub replay_from: Lsn,
    /// One past the last LSN to replay: the requested point.
    pub replay_to: Lsn,
    /// Indices into the stream's segments of exactly those that overlap
    /// `[replay_from, replay_to)`.
    pub segments: Range<usize>,
}

/// Chooses what a restore to `lsn` needs: the newest page checkpoint at or below it, and
/// the segments overlapping `[its LSN, lsn)`. Refuses a point past the end of the stream,
/// or one whose segments were truncated and that no page checkpoint covers, describing
/// what can be restored.
pub fn restore_point(
    wal: Option<&WalState>,
    pages: &[PageRef],
    lsn: Lsn,
) -> Result<RestorePoint, WalError> {
    let page = pages.iter().filter(|p| p.lsn <= lsn).max().copied();
    let from = page.map_or(Lsn(0), |p| p.lsn);
    let refuse = |why: String| WalError::NotRestorable {
        lsn,
        why,
        restorable: describe_restorable(wal, pages),
    };
    if from == lsn {
        return Ok(RestorePoint {
            page,
            replay_from: from,
            replay_to: lsn,
            segments: 0..0,
        });
    }
    let Some(w) = wal else {
        return Err(refuse("the database has no WAL stream to replay".into()));
    };
    if lsn > w.end {
        return Err(refuse(format!("the WAL stream ends at {}", w.end)));
    }
    if from < w.start {
        let why = match page {
            Some(p) => format!(
                "the newest page checkpoint at or below it is at LSN {} and the WAL below {} was truncated",
                p.lsn, w.start
            ),
            None => format!(
                "no page checkpoint is at or below it and the WAL below {} was truncated",
                w.start
            ),
        };
        return Err(refuse(why));
    }
    let first = w.segments.partition_point(|s| s.lsn_end <= from);
    let last = w.segments.partition_point(|s| s.lsn_start < lsn);
    Ok(RestorePoint {
        page,
        replay_from: from,
        replay_to: lsn,
        segments: first..last.max(first),
    })
}

/// A human description of the restorable points: the range the stream and the page
/// checkpoints inside it cover, plus the exact LSNs of older page checkpoints.
pub fn describe_restorable(wal: Option<&WalState>, pages: &[PageRef]) -> String {
    let mut parts = Vec::new();
    if let Some(w) = wal {
        let from = if w.start == Lsn(0) {
            Some(Lsn(0))
        } else {
            pages
                .iter()
                .map(|p| p.lsn)
                .filter(|l| *l >= w.start && *l <= w.end)
                .min()
        };
        if let Some(f) = from {
            parts.push(format!("LSNs {f}..={}", w.end));
        }
    }
    let inside = |l: Lsn| wal.is_some_and(|w| !parts.is_empty() && l >= w.start && l <= w.end);
    let exact: Vec<String> = pages
        .iter()
        .map(|p| p.lsn)
        .filter(|l| !inside(*l))
        .map(|l| l.to_string())
        .collect();
    if !exact.is_empty() {
        parts.push(format!("exactly LSN {}", exact.join(", ")));
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", and ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::{BlobKind, BlobRef, Digest128, SegmentEntry};
    use proptest::prelude::*;

    fn stream(start_seg: usize, lens: &[u64]) -> WalState {
        let mut at = 0;
        let mut segments = Vec::new();
        for (i, len) in lens.iter().enumerate() {
            let e = SegmentEntry {
                name: format!("{i:06}"),
                lsn_start: Lsn(at),
                lsn_end: Lsn(at + len),
                len: *len,
                blob: BlobRef {
                    kind: BlobKind::Segment,
                    crc64: i as u64,
                    len: *len,
                    xxh3: Digest128(0),
                    alias: 0,
                    scheme: 0,
                    epoch: 0,
                },
            };
            at += len;
            segments.push(e);
        }
        let end = Lsn(at);
        let last_name = segments.last().map(|s| s.name.clone());
        let segments: Vec<SegmentEntry> = segments.into_iter().skip(start_seg).collect();
        WalState {
            start: segments.first().map_or(end, |s| s.lsn_start),
            end,
            last_name,
            segments,
        }
    }

    fn history() -> impl Strategy<Value = (WalState, Vec<PageRef>, Vec<LeaseRange>)> {
        (
            proptest::collection::vec(1u64..50, 0..12),
            0usize..6,
            proptest::collection::vec(0u64..400, 0..5),
            proptest::collection::vec((0u64..400, 1u64..100, 0u64..2000), 0..4),
        )
            .prop_map(|(lens, head, page_lsns, leases)| {
                let wal = stream(head.min(lens.len()), &lens);
                let mut pages: Vec<PageRef> = page_lsns
                    .into_iter()
                    .enumerate()
                    .map(|(g, l)| PageRef {
                        lsn: Lsn(l.min(wal.end.0)),
                        generation: Generation(g as u64 + 1),
                    })
                    .collect();
                pages.sort();
                let leases = leases
                    .into_iter()
                    .enumerate()
                    .map(|(i, (s, len, exp))| LeaseRange {
                        id: i as u64,
                        start: Lsn(s),
                        end: Lsn(s + len),
                        expires_unix_ms: exp,
                    })
                    .collect();
                (wal, pages, leases)
            })
    }

    proptest! {
        #[test]
        fn the_watermark_never_passes_a_lease_or_the_published_frontier(
            (wal, pages, leases) in history(), now in 0u64..2000
        ) {
            let page_lsn = pages.last().map(|p| p.lsn);
            let w = watermark(page_lsn, Some(wal.end), &leases, now);
            // Never past what the stream holds, whatever the page checkpoints cover.
            prop_assert!(w <= wal.end);
            for l in leases.iter().filter(|l| l.active(now)) {
                prop_assert!(w <= l.start, "watermark {} passes lease {:?}", w, l);
            }
            // With no lease in force it is exactly the stream's end.
            if leases.iter().all(|l| !l.active(now)) {
                prop_assert_eq!(w, wal.end);
            }
            // Without a stream, the newest page checkpoint is the frontier.
            if leases.is_empty() {
                prop_assert_eq!(watermark(page_lsn, None, &[], now), page_lsn.unwrap_or(Lsn(0)));
            }
        }

        #[test]
        fn a_restore_point_is_the_newest_page_checkpoint_and_exactly_the_overlapping_segments(
            (wal, pages, _) in history(), target in 0u64..450
        ) {
            let lsn = Lsn(target);
            match restore_point(Some(&wal), &pages, lsn) {
                Ok(rp) => {
                    let best = pages.iter().filter(|p| p.lsn <= lsn).max().copied();
                    prop_assert_eq!(rp.page, best);
                    prop_assert_eq!(rp.replay_from, best.map_or(Lsn(0), |p| p.lsn));
                    prop_assert_eq!(rp.replay_to, lsn);
                    for (i, s) in wal.segments.iter().enumerate() {
                        // An empty replay range overlaps nothing.
                        let overlaps = rp.replay_from < lsn && s.lsn_start < lsn && rp.replay_from < s.lsn_end;
                        prop_assert_eq!(rp.segments.contains(&i), overlaps, "segment {}", i);
                    }
                    // The chosen segments cover the replay range without a hole.
                    if rp.replay_from < lsn {
                        let segs = &wal.segments[rp.segments.clone()];
                        prop_assert!(segs.first().is_some_and(|s| s.lsn_start <= rp.replay_from));
                        prop_assert!(segs.last().is_some_and(|s| s.lsn_end >= lsn));
                    }
                }
                Err(e) => {
                    let from = pages.iter().filter(|p| p.lsn <= lsn).map(|p| p.lsn).max().unwrap_or(Lsn(0));
                    prop_assert!(from != lsn, "an exact page checkpoint is always restorable: {}", e);
                    prop_assert!(lsn > wal.end || from < wal.start, "refused a restorable point: {}", e);
                    prop_assert!(e.to_string().contains("restorable"));
                }
            }
        }

        #[test]
        fn head_truncation_drops_only_what_ends_below_and_keeps_the_newest_state_restorable(
            (wal, pages, _) in history(), before in 0u64..450, force in any::<bool>()
        ) {
            match plan_head(&wal, &pages, Lsn(before), force) {
                Ok(cut) => {
                    for (i, s) in wal.segments.iter().enumerate() {
                        prop_assert_eq!(i < cut.drop, s.lsn_end <= Lsn(before));
                    }
                    let after = WalState {
                        start: cut.new_start,
                        segments: wal.segments[cut.drop..].to_vec(),
                        ..wal.clone()
                    };
                    prop_assert_eq!(after.segments.first().map_or(after.end, |s| s.lsn_start), cut.new_start);
                    if !force && cut.drop > 0 {
                        prop_assert!(restore_point(Some(&after), &pages, wal.end).is_ok());
                    }
                }
                Err(e) => {
                    prop_assert!(!force);
                    prop_assert!(matches!(e, WalError::HeadUnrestorable { .. }), "{}", e);
                }
            }
        }

        #[test]
        fn tail_truncation_cuts_at_boundaries_and_refuses_published_state_unless_forced(
            (wal, pages, _) in history(), after in 0u64..450, force in any::<bool>()
        ) {
            let newest = pages.last().map(|p| p.lsn);
            match plan_tail(Some(&wal), &pages, newest, Lsn(after), force) {
                Ok(cut) => {
                    let kept = &wal.segments[..wal.segments.len() - cut.drop];
                    prop_assert!(kept.iter().all(|s| s.lsn_end <= Lsn(after)));
                    prop_assert!(wal.segments[kept.len()..].iter().all(|s| s.lsn_start >= Lsn(after)));
                    prop_assert!(cut.new_end <= wal.end);
                    if let Some(Some(p)) = cut.pages_back_to {
                        prop_assert!(p.lsn <= Lsn(after));
                    }
                    if !force {
                        prop_assert_eq!(cut.drop, 0);
                        prop_assert!(cut.pages_back_to.is_none());
                    }
                }
                Err(WalError::NotABoundary { start, end, .. }) => {
                    prop_assert!(start < Lsn(after) && Lsn(after) < end);
                }
                Err(e) => prop_assert!(!force, "forced cut refused: {}", e),
            }
        }
    }

    #[test]
    fn refusals_name_the_restorable_range() {
        let wal = stream(2, &[10, 10, 10, 10]);
        let pages = [PageRef {
            lsn: Lsn(25),
            generation: Generation(3),
        }];
        let e = restore_point(Some(&wal), &pages, Lsn(41))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ends at 40") && e.contains("LSNs 25..=40"),
            "{e}"
        );
        let e = restore_point(Some(&wal), &pages, Lsn(22))
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated") && e.contains("25..=40"), "{e}");
        let rp = restore_point(Some(&wal), &pages, Lsn(33)).unwrap();
        assert_eq!((rp.replay_from, rp.segments), (Lsn(25), 0..2));
        let e = plan_head(&wal, &[], Lsn(30), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unrestorable"), "{e}");
    }
}
