//! SQLite's write-ahead log format, as far as Cairn reads it: the 32-byte WAL header, the
//! 24-byte frame headers and their cumulative checksums (see "The WAL File Format" in
//! SQLite's file format documentation), and the *position* Cairn keeps of the WAL it last
//! shipped. Pure functions over bytes: no I/O.
//!
//! A frame is valid when its salts equal the header's and its checksum, computed over the
//! first 8 bytes of its header and its page with the previous frame's checksum (the
//! header's for frame 1) as the seed, equals the one it carries. The valid frames are a
//! prefix of the file; only those up to the last commit frame (non-zero "database size")
//! are committed. SQLite restarts the WAL with a new salt-1 (incremented) and a new random
//! salt-2, so a position (salts, frame, checksum) names one frame of one WAL generation.

use serde::{Deserialize, Serialize};

/// Length of the WAL header.
pub const WAL_HEADER_LEN: usize = 32;
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 24;
const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_be_bytes(w)
}

/// SQLite's WAL checksum of `data` (a multiple of 8 bytes), seeded with `seed`; words are
/// big-endian when `big_endian` (magic 0x377f0683), little-endian otherwise.
pub fn wal_checksum(big_endian: bool, seed: (u32, u32), data: &[u8]) -> (u32, u32) {
    let (mut s1, mut s2) = seed;
    for pair in data.chunks_exact(8) {
        let (a, b) = (&pair[..4], &pair[4..]);
        let word = |w: &[u8]| {
            let mut x = [0u8; 4];
            x.copy_from_slice(w);
            if big_endian {
                u32::from_be_bytes(x)
            } else {
                u32::from_le_bytes(x)
            }
        };
        s1 = s1.wrapping_add(word(a)).wrapping_add(s2);
        s2 = s2.wrapping_add(word(b)).wrapping_add(s1);
    }
    (s1, s2)
}

/// A parsed, valid WAL header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalHeader {
    /// Checksums use big-endian words.
    pub big_endian: bool,
    /// Page size.
    pub page_size: u32,
    /// Checkpoint sequence number.
    pub checkpoint_seq: u32,
    /// Salt-1 and salt-2.
    pub salts: (u32, u32),
    /// The header's checksum (seed of frame 1's).
    pub checksum: (u32, u32),
}

impl WalHeader {
    /// Parses a WAL header; `None` if it is short, has a wrong magic or version, a page size
    /// SQLite would not use, or a checksum that does not match (SQLite then ignores the WAL).
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < WAL_HEADER_LEN {
            return None;
        }
        let magic = be32(b, 0);
        let big_endian = match magic {
            MAGIC_BE => true,
            MAGIC_LE => false,
            _ => return None,
        };
        let page_size = be32(b, 8);
        if be32(b, 4) != 3_007_000
            || !page_size.is_power_of_two()
            || !(512..=65536).contains(&page_size)
        {
            return None;
        }
        let checksum = (be32(b, 24), be32(b, 28));
        if wal_checksum(big_endian, (0, 0), &b[..24]) != checksum {
            return None;
        }
        Some(Self {
            big_endian,
            page_size,
            checkpoint_seq: be32(b, 12),
            salts: (be32(b, 16), be32(b, 20)),
            checksum,
        })
    }
}

/// A frame that passed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidFrame {
    /// Page number (from 1).
    pub page: u32,
    /// The database size in pages after this frame's transaction, for a commit frame.
    pub commit: Option<u32>,
    /// The frame's cumulative checksum.
    pub checksum: (u32, u32),
}

/// Validates one frame (`frame` = header and page) against the header and the previous
/// checksum; `None` if it is not a valid frame of this WAL.
pub fn check_frame(h: &WalHeader, prev: (u32, u32), frame: &[u8]) -> Option<ValidFrame> {
    if frame.len() != FRAME_HEADER_LEN + h.page_size as usize {
        return None;
    }
    let page = be32(frame, 0);
    if page == 0 || (be32(frame, 8), be32(frame, 12)) != h.salts {
        return None;
    }
    let c = wal_checksum(h.big_endian, prev, &frame[..8]);
    let c = wal_checksum(h.big_endian, c, &frame[FRAME_HEADER_LEN..]);
    if c != (be32(frame, 16), be32(frame, 20)) {
        return None;
    }
    let size = be32(frame, 4);
    Some(ValidFrame {
        page,
        commit: (size != 0).then_some(size),
        checksum: c,
    })
}

/// Where in a SQLite WAL a snapshot ended: the WAL generation (its salts) and the last
/// commit frame included (`frame`, counted from 1; 0 for an empty WAL), with that frame's
/// cumulative checksum (the header's for frame 0). Every frame up to it is identical
/// whenever a WAL has the same salts and the same checksum at `frame`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalPosition {
    /// Salt-1 and salt-2 of the WAL header.
    pub salts: (u32, u32),
    /// The last commit frame the snapshot included (0: none).
    pub frame: u32,
    /// The cumulative checksum at `frame`.
    pub checksum: (u32, u32),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds a WAL the way SQLite writes it.
    fn build(big_endian: bool, ps: u32, salts: (u32, u32), frames: &[(u32, u32, u8)]) -> Vec<u8> {
        let mut w = Vec::new();
        let magic = if big_endian { MAGIC_BE } else { MAGIC_LE };
        for x in [magic, 3_007_000, ps, 0, salts.0, salts.1] {
            w.extend_from_slice(&x.to_be_bytes());
        }
        let mut c = wal_checksum(big_endian, (0, 0), &w);
        w.extend_from_slice(&c.0.to_be_bytes());
        w.extend_from_slice(&c.1.to_be_bytes());
        for (page, commit, fill) in frames {
            let mut f = Vec::new();
            for x in [*page, *commit, salts.0, salts.1] {
                f.extend_from_slice(&x.to_be_bytes());
            }
            let data = vec![*fill; ps as usize];
            c = wal_checksum(big_endian, c, &f[..8]);
            c = wal_checksum(big_endian, c, &data);
            f.extend_from_slice(&c.0.to_be_bytes());
            f.extend_from_slice(&c.1.to_be_bytes());
            f.extend_from_slice(&data);
            w.extend_from_slice(&f);
        }
        w
    }

    fn frames_of(w: &[u8]) -> Vec<ValidFrame> {
        let Some(h) = WalHeader::parse(w) else {
            return Vec::new();
        };
        let step = FRAME_HEADER_LEN + h.page_size as usize;
        let mut prev = h.checksum;
        let mut out = Vec::new();
        for f in w[WAL_HEADER_LEN..].chunks(step) {
            match check_frame(&h, prev, f) {
                Some(v) => {
                    prev = v.checksum;
                    out.push(v);
                }
                None => break,
            }
        }
        out
    }

    proptest! {
        #[test]
        fn every_flipped_bit_ends_the_valid_prefix_there(
            be in any::<bool>(),
            salts in any::<(u32, u32)>(),
            n in 1usize..5,
            flip in any::<prop::sample::Index>(),
        ) {
            let frames: Vec<(u32, u32, u8)> =
                (0..n).map(|i| (i as u32 + 1, u32::from(i + 1 == n), i as u8)).collect();
            let w = build(be, 512, salts, &frames);
            prop_assert_eq!(frames_of(&w).len(), n);
            let mut bad = w.clone();
            let at = flip.index(bad.len());
            bad[at] ^= 1;
            let got = frames_of(&bad).len();
            if at < WAL_HEADER_LEN {
                prop_assert_eq!(got, 0);
            } else {
                let broken = (at - WAL_HEADER_LEN) / (FRAME_HEADER_LEN + 512);
                prop_assert_eq!(got, broken);
            }
        }
    }
}
