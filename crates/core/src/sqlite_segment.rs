//! The segments of a SQLite database's WAL stream (version 1): committed WAL frames as
//! `cairn replicate` ships them, or a *gap* where frames were lost to a WAL reset outside
//! Cairn's control. Pure functions over bytes: no I/O.
//!
//! ```text
//! header (64 bytes)  magic "CAIRNSQW" | version u16 LE | kind u8 (0 frames, 1 gap) | 0 u8
//!                    | page size u32 | salt-1 u32 | salt-2 u32 | checkpoint seq u32
//!                    | first frame u32 | last frame u32 | last checksum u32 u32
//!                    | flags u32 (bit 0: the WAL was wholly copied into the database when
//!                      the frames were read) | captured unix ms u64 | 8 zero bytes
//!                    (all little-endian)
//! frames             for kind 0: frames first..=last of that WAL exactly as SQLite wrote
//!                    them (24-byte frame header, then the page); the last one is a commit
//!                    frame. A gap has none.
//! ```
//!
//! The segment's LSN range spans its bytes (see decision 0004): a transaction's LSN is the
//! stream offset just past its commit frame, and restoring to LSN `L` applies every
//! transaction whose LSN is at most `L`. The header's position (salts, last frame and its
//! checksum) is where the next segment continues.

use crate::error::CoreError;
use crate::sqlite_wal::{WalPosition, FRAME_HEADER_LEN};

/// Segment header length.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Format version written.
pub const SEGMENT_VERSION: u16 = 1;
const MAGIC: &[u8; 8] = b"CAIRNSQW";
/// Suffix of a frames segment's name.
pub const FRAMES_SUFFIX: &str = "sqlwal";
/// Suffix of a gap segment's name.
pub const GAP_SUFFIX: &str = "sqlgap";

/// What a segment holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// Committed frames.
    Frames,
    /// Frames that were lost: no state inside the gap can be restored.
    Gap,
}

/// A segment's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Frames or gap.
    pub kind: SegmentKind,
    /// The database's page size.
    pub page_size: u32,
    /// The WAL's checkpoint sequence number.
    pub checkpoint_seq: u32,
    /// Where the stream stands after this segment: the WAL's salts, the last frame
    /// included and its cumulative checksum.
    pub position: WalPosition,
    /// First frame included (0 for a gap).
    pub first_frame: u32,
    /// Every frame of the WAL had been copied into the database file when it was read.
    pub backfilled: bool,
    /// When the frames were read (unix milliseconds): every transaction in the segment
    /// committed at or before it.
    pub captured_ms: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn corrupt(name: &str, reason: impl Into<String>) -> CoreError {
    CoreError::CorruptBlob {
        name: name.to_string(),
        reason: reason.into(),
    }
}

impl SegmentHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut h = [0u8; SEGMENT_HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        h[10] = match self.kind {
            SegmentKind::Frames => 0,
            SegmentKind::Gap => 1,
        };
        let p = &self.position;
        let words = [
            self.page_size,
            p.salts.0,
            p.salts.1,
            self.checkpoint_seq,
            self.first_frame,
            p.frame,
            p.checksum.0,
            p.checksum.1,
            u32::from(self.backfilled),
        ];
        for (i, w) in words.iter().enumerate() {
            h[12 + 4 * i..16 + 4 * i].copy_from_slice(&w.to_le_bytes());
        }
        h[48..56].copy_from_slice(&self.captured_ms.to_le_bytes());
        h
    }

    /// Parses the header of the segment `name`.
    pub fn parse(name: &str, b: &[u8]) -> Result<Self, CoreError> {
        if b.len() < SEGMENT_HEADER_LEN || &b[0..8] != MAGIC {
            return Err(corrupt(name, "not a SQLite WAL segment (bad magic)"));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != SEGMENT_VERSION {
            return Err(CoreError::UnsupportedVersion {
                name: name.to_string(),
                what: "SQLite WAL segment",
                version: u32::from(version),
                supported: u32::from(SEGMENT_VERSION),
            });
        }
        let kind = match b[10] {
            0 => SegmentKind::Frames,
            1 => SegmentKind::Gap,
            k => return Err(corrupt(name, format!("unknown segment kind {k}"))),
        };
        let w = |i: usize| le32(b, 12 + 4 * i);
        let mut ms = [0u8; 8];
        ms.copy_from_slice(&b[48..56]);
        let page_size = w(0);
        if !page_size.is_power_of_two() || !(512..=65536).contains(&page_size) {
            return Err(corrupt(name, format!("page size {page_size}")));
        }
        Ok(Self {
            kind,
            page_size,
            checkpoint_seq: w(3),
            position: WalPosition {
                salts: (w(1), w(2)),
                frame: w(5),
                checksum: (w(6), w(7)),
            },
            first_frame: w(4),
            backfilled: w(8) & 1 == 1,
            captured_ms: u64::from_le_bytes(ms),
        })
    }
}

/// The name of a segment starting at stream offset `lsn_start`: names sort in stream
/// order, and carry the capture time for restores to a time.
pub fn segment_name(lsn_start: u64, captured_ms: u64, kind: SegmentKind) -> String {
    let suffix = match kind {
        SegmentKind::Frames => FRAMES_SUFFIX,
        SegmentKind::Gap => GAP_SUFFIX,
    };
    format!("{lsn_start:020}-{captured_ms:013}.{suffix}")
}

/// The capture time a segment name carries, if it is one of ours.
pub fn captured_ms_of(name: &str) -> Option<u64> {
    let (stem, suffix) = name.rsplit_once('.')?;
    if suffix != FRAMES_SUFFIX && suffix != GAP_SUFFIX {
        return None;
    }
    stem.split_once('-')?.1.parse().ok()
}

/// The gap segment that ends `state`'s stream if no page generation covers it yet (a
/// replicator stopped between the two): no point at or after its start restores.
pub fn uncovered_gap(state: &crate::DbState) -> Option<&crate::SegmentEntry> {
    let wal = state.wal.as_ref()?;
    let page_lsn = state
        .pages
        .as_ref()
        .and_then(|p| p.lsn)
        .unwrap_or(crate::Lsn(0));
    wal.segments
        .last()
        .filter(|g| g.name.ends_with(GAP_SUFFIX) && page_lsn < g.lsn_end)
}

/// One transaction of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction<'a> {
    /// Offset in the segment just past its commit frame.
    pub end: u64,
    /// The database size in pages after it.
    pub db_pages: u32,
    /// Its frames' pages in order: (page number from 1, page bytes).
    pub pages: Vec<(u32, &'a [u8])>,
}

/// The transactions of the frames segment `seg` named `name` (its header parsed as `h`).
/// A segment whose frames do not end with a commit frame is corrupt: Cairn ships only
/// whole transactions.
pub fn transactions<'a>(
    name: &str,
    h: &SegmentHeader,
    seg: &'a [u8],
) -> Result<Vec<Transaction<'a>>, CoreError> {
    let ps = h.page_size as usize;
    let step = FRAME_HEADER_LEN + ps;
    let body = &seg[SEGMENT_HEADER_LEN.min(seg.len())..];
    if !body.len().is_multiple_of(step) {
        return Err(corrupt(
            name,
            format!(
                "{} frame bytes are not whole {step}-byte frames",
                body.len()
            ),
        ));
    }
    let mut out = Vec::new();
    let mut pages = Vec::new();
    for (i, f) in body.chunks_exact(step).enumerate() {
        let be = |at: usize| u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]]);
        let (page, commit) = (be(0), be(4));
        if page == 0 {
            return Err(corrupt(name, format!("frame {i} has page number 0")));
        }
        pages.push((page, &f[FRAME_HEADER_LEN..]));
        if commit != 0 {
            out.push(Transaction {
                end: (SEGMENT_HEADER_LEN + (i + 1) * step) as u64,
                db_pages: commit,
                pages: std::mem::take(&mut pages),
            });
        }
    }
    if !pages.is_empty() {
        return Err(corrupt(name, "its last frame is not a commit frame"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(kind: SegmentKind) -> SegmentHeader {
        SegmentHeader {
            kind,
            page_size: 512,
            checkpoint_seq: 7,
            position: WalPosition {
                salts: (11, 12),
                frame: 9,
                checksum: (13, 14),
            },
            first_frame: 3,
            backfilled: true,
            captured_ms: 1_764_000_000_123,
        }
    }

    fn frame(page: u32, commit: u32, fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; FRAME_HEADER_LEN];
        f[0..4].copy_from_slice(&page.to_be_bytes());
        f[4..8].copy_from_slice(&commit.to_be_bytes());
        f.extend(std::iter::repeat_n(fill, 512));
        f
    }

    #[test]
    fn golden_header_layout() {
        let h = header(SegmentKind::Frames).encode();
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "434149524e53515701000000000200000b0000000c000000070000000300000009000000\
             0d0000000e000000010000007be897b69a0100000000000000000000"
        );
        assert_eq!(
            SegmentHeader::parse("s", &h).unwrap(),
            header(SegmentKind::Frames)
        );
    }

    #[test]
    fn names_sort_by_offset_and_carry_the_time() {
        let a = segment_name(99, 5, SegmentKind::Frames);
        let b = segment_name(100, 4, SegmentKind::Gap);
        assert!(a < b);
        assert_eq!(captured_ms_of(&a), Some(5));
        assert_eq!(captured_ms_of(&b), Some(4));
        assert_eq!(captured_ms_of("000.wal"), None);
    }

    #[test]
    fn transactions_end_at_commit_frames_and_a_torn_tail_is_refused() {
        let h = header(SegmentKind::Frames);
        let mut seg = h.encode().to_vec();
        seg.extend(frame(1, 0, 1));
        seg.extend(frame(2, 3, 2));
        seg.extend(frame(3, 3, 3));
        let t = transactions("s", &h, &seg).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].pages.len(), 2);
        assert_eq!(t[0].end, (SEGMENT_HEADER_LEN + 2 * 536) as u64);
        assert_eq!(t[1].pages[0].0, 3);
        assert_eq!(t[1].end, seg.len() as u64);
        seg.extend(frame(4, 0, 4));
        assert!(transactions("s", &h, &seg).is_err());
        assert!(transactions("s", &h, &seg[..seg.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn headers_roundtrip(
            seq in any::<u32>(), s1 in any::<u32>(), s2 in any::<u32>(), frame in any::<u32>(),
            c1 in any::<u32>(), c2 in any::<u32>(), first in any::<u32>(), bf in any::<bool>(),
            ms in any::<u64>(), gap in any::<bool>(), shift in 9u32..17,
        ) {
            let h = SegmentHeader {
                kind: if gap { SegmentKind::Gap } else { SegmentKind::Frames },
                page_size: 1 << shift,
                checkpoint_seq: seq,
                position: WalPosition { salts: (s1, s2), frame, checksum: (c1, c2) },
                first_frame: first,
                backfilled: bf,
                captured_ms: ms,
            };
            prop_assert_eq!(SegmentHeader::parse("s", &h.encode()).unwrap(), h);
        }
    }
}
