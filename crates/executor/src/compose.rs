//! Composing a chunk from its base and its delta chain, newest delta first.
//!
//! Contract: [`Composer`] is pure bookkeeping, with no I/O. Fed a chunk's deltas newest
//! first, it decides which source supplies each page: the newest delta that holds the page,
//! else the base, and nothing at or past the chunk's current length. Every page is then
//! written at most once, and the sources can be written in any order. The result equals
//! the oldest-first application of `docs/FORMATS.md` (the base clamped to the chunk's
//! length, then each delta's pages, oldest first, clamped the same way) for every chain
//! that parses. That application leaves in each page the bytes of its last writer, and the
//! last writer is the newest delta holding the page, or else the base. Pages the base does
//! not reach (a chunk that grew) and that no delta holds are not written at all; in a
//! freshly sized assembly file they read as zeros, as with the oldest-first application.
//!
//! A caller either writes each delta's pieces as it claims them (streaming the chain) or
//! keeps the deltas and hands their pieces to [`Composer::base_writes`], which cuts each
//! streamed piece of the base into contiguous writes with the held pages in place (one
//! vectored write each); [`held_from`] gives what the base stream does not reach.
//!
//! Memory: one bit per page of the chunk (2 KiB for 64 MiB of 4 KiB pages) and the
//! pieces of the deltas being written. State lives only in memory: a crash loses it, and a
//! resumed restore composes the chunk again from the start.

use std::ops::Range;

use cairn_core::delta::{DeltaView, DELTA_HEADER_LEN};

/// A run of bytes of one delta to write: `len` bytes from `src` in the delta's payload to
/// offset `at` within the chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaPiece {
    /// Offset within the chunk.
    pub at: u64,
    /// Offset within the delta's payload.
    pub src: usize,
    /// Length in bytes.
    pub len: usize,
}

impl DeltaPiece {
    /// The piece's bytes within the delta's payload.
    pub fn src_range(&self) -> Range<usize> {
        self.src..self.src + self.len
    }
}

/// Which source supplies each page of one chunk; see the module documentation.
#[derive(Clone, Debug)]
pub struct Composer {
    page_size: u64,
    len: u64,
    pages: u64,
    /// One bit per page: set once a (newer) delta supplies it.
    claimed: Vec<u64>,
    claimed_count: u64,
}

impl Composer {
    /// A chunk of `len` bytes (its length in the manifest) with pages of `page_size` bytes.
    pub fn new(len: u64, page_size: u32) -> Self {
        let page_size = u64::from(page_size.max(1));
        let pages = len.div_ceil(page_size);
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
        Self {
            page_size,
            len,
            pages,
            claimed: vec![0; words],
            claimed_count: 0,
        }
    }

    fn is_claimed(&self, page: u64) -> bool {
        let (w, b) = ((page / 64) as usize, page % 64);
        self.claimed.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn set_claimed(&mut self, page: u64) {
        let (w, b) = ((page / 64) as usize, page % 64);
        if let Some(x) = self.claimed.get_mut(w) {
            *x |= 1 << b;
        }
        self.claimed_count += 1;
    }

    /// Pages supplied by the deltas claimed so far.
    pub fn claimed_pages(&self) -> u64 {
        self.claimed_count
    }

    /// Takes the next delta of the chain, newest first. Claims the pages it holds that no
    /// newer delta holds and that lie inside the chunk, and returns the pieces to write,
    /// with adjacent pages merged into one piece. `view` must be the parsed payload the
    /// pieces will be cut from.
    pub fn claim(&mut self, view: &DeltaView<'_>) -> Vec<DeltaPiece> {
        let ps = self.page_size;
        let data = DELTA_HEADER_LEN + 4 * view.len();
        let mut out: Vec<DeltaPiece> = Vec::new();
        for (entry, (page, _)) in view.iter().enumerate() {
            let page = u64::from(page);
            if page >= self.pages || self.is_claimed(page) {
                continue;
            }
            self.set_claimed(page);
            let at = page * ps;
            let len = usize::try_from(ps.min(self.len - at)).unwrap_or(usize::MAX);
            let src = data + entry * ps as usize;
            match out.last_mut() {
                Some(last) if last.at + last.len as u64 == at && last.src + last.len == src => {
                    last.len += len;
                }
                _ => out.push(DeltaPiece { at, src, len }),
            }
        }
        out
    }

    /// Where the base's bytes stop counting: its length, or the chunk's if that is shorter.
    pub fn base_end(&self, base_len: u64) -> u64 {
        base_len.min(self.len)
    }

    /// Whether the base supplies any byte, once every delta has been claimed: some page
    /// below [`Composer::base_end`] that no delta holds.
    pub fn needs_base(&self, base_len: u64) -> bool {
        let end = self.base_end(base_len).div_ceil(self.page_size);
        (0..end).any(|p| !self.is_claimed(p))
    }

    /// How to write a streamed piece of the base, `len` bytes at payload offset `off`, once
    /// every delta has been claimed: runs of contiguous chunk bytes, each made of base bytes
    /// (pages no delta holds) and of `held` delta bytes (pages claimed by deltas kept in
    /// memory, sorted by offset). Claimed pages that are not held were written already and
    /// are skipped, which ends a run; so are bytes past [`Composer::base_end`].
    pub fn base_writes(
        &self,
        held: &[HeldPiece],
        base_len: u64,
        off: u64,
        len: usize,
    ) -> Vec<BaseWrite> {
        let ps = self.page_size;
        let end = (off + len as u64).min(self.base_end(base_len));
        let mut out: Vec<BaseWrite> = Vec::new();
        let mut run: Option<BaseWrite> = None;
        let mut next = held.partition_point(|h| h.piece.at + h.piece.len as u64 <= off);
        let mut pos = off;
        while pos < end {
            let page = pos / ps;
            let held_here = held
                .get(next)
                .filter(|h| h.piece.at <= pos && pos < h.piece.at + h.piece.len as u64);
            let part = if let Some(h) = held_here {
                let stop = (h.piece.at + h.piece.len as u64).min(end);
                let from = h.piece.src + (pos - h.piece.at) as usize;
                let part = Part::Delta {
                    delta: h.delta,
                    src: from..from + (stop - pos) as usize,
                };
                if stop == h.piece.at + h.piece.len as u64 {
                    next += 1;
                }
                pos = stop;
                Some(part)
            } else if self.is_claimed(page) {
                pos = ((page + 1) * ps).min(end);
                None
            } else {
                let mut q = page + 1;
                while q * ps < end && !self.is_claimed(q) {
                    q += 1;
                }
                let stop = (q * ps).min(end);
                let part = Part::Base((pos - off) as usize..(stop - off) as usize);
                pos = stop;
                Some(part)
            };
            match part {
                Some(part) => {
                    let at = pos - part.len() as u64;
                    run.get_or_insert_with(|| BaseWrite {
                        at,
                        parts: Vec::new(),
                    })
                    .parts
                    .push(part);
                }
                None => out.extend(run.take()),
            }
        }
        out.extend(run.take());
        out
    }
}

/// A delta's piece kept in memory to be written together with the base: `delta` says which
/// of the caller's held payloads it is cut from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldPiece {
    /// The piece.
    pub piece: DeltaPiece,
    /// Index of the payload it is cut from, in the caller's list of held deltas.
    pub delta: usize,
}

/// The held pieces, or the parts of them, at or past `from` (within the chunk): what is
/// left to write directly when the base stream does not reach it (`from` is the base's
/// end, or 0 when the base is not read at all).
pub fn held_from(held: &[HeldPiece], from: u64) -> impl Iterator<Item = HeldPiece> + '_ {
    held.iter().filter_map(move |h| {
        let end = h.piece.at + h.piece.len as u64;
        (end > from).then(|| {
            let skip = from.saturating_sub(h.piece.at);
            HeldPiece {
                piece: DeltaPiece {
                    at: h.piece.at + skip,
                    src: h.piece.src + skip as usize,
                    len: h.piece.len - skip as usize,
                },
                delta: h.delta,
            }
        })
    })
}

/// One write of contiguous chunk bytes, starting at `at` (within the chunk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseWrite {
    /// Offset within the chunk.
    pub at: u64,
    /// The bytes, in order.
    pub parts: Vec<Part>,
}

/// Where the bytes of a part of a [`BaseWrite`] come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// A range of the streamed base piece.
    Base(Range<usize>),
    /// A range of a held delta's payload.
    Delta {
        /// Index of the payload in the caller's list of held deltas.
        delta: usize,
        /// The range within it.
        src: Range<usize>,
    },
}

impl Part {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Part::Base(r) | Part::Delta { src: r, .. } => r.len(),
        }
    }

    /// Whether the part is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use cairn_core::delta::{encode_delta, DeltaHeader};
    use proptest::prelude::*;

    const BASE_CRC: u64 = 0xba5e;

    /// One delta of a random chain: the chunk length after it and its pages.
    #[derive(Clone, Debug)]
    struct Step {
        len: u64,
        pages: Vec<u32>,
        seed: u8,
    }

    fn page_bytes(ps: usize, page: u32, seed: u8, gen: usize) -> Vec<u8> {
        (0..ps)
            .map(|i| (i as u8) ^ seed ^ (page as u8).wrapping_mul(31) ^ (gen as u8) << 3)
            .collect()
    }

    fn encode(ps: u32, gen: usize, s: &Step) -> Vec<u8> {
        let bytes: Vec<u8> = s
            .pages
            .iter()
            .flat_map(|p| page_bytes(ps as usize, *p, s.seed, gen))
            .collect();
        let h = DeltaHeader {
            page_size: ps,
            chunk: 0,
            generation: gen as u64,
            base_crc64: BASE_CRC,
            chunk_len: s.len,
        };
        encode_delta(&h, &s.pages, &bytes).unwrap()
    }

    /// The reference: base clamped to the final length, then every delta's pages, oldest
    /// first, clamped (docs/FORMATS.md, "Applying a chain").
    fn oldest_first(ps: u32, base: &[u8], deltas: &[Vec<u8>], len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        let n = base.len().min(len as usize);
        out[..n].copy_from_slice(&base[..n]);
        for d in deltas {
            let v = DeltaView::parse("d", d, 0, BASE_CRC, ps).unwrap();
            for (page, bytes) in v.iter() {
                let at = page as usize * ps as usize;
                if at < out.len() {
                    let n = bytes.len().min(out.len() - at);
                    out[at..at + n].copy_from_slice(&bytes[..n]);
                }
            }
        }
        out
    }

    /// Newest first through the composer, holding the deltas `hold` says and writing the
    /// others straight away; counts how often each byte is written.
    fn newest_first(
        ps: u32,
        base: &[u8],
        deltas: &[Vec<u8>],
        len: u64,
        hold: &[bool],
    ) -> (Vec<u8>, Vec<u8>) {
        let mut out = vec![0u8; len as usize];
        let mut writes = vec![0u8; len as usize];
        let mut put = |at: usize, bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            for w in &mut writes[at..at + bytes.len()] {
                *w += 1;
            }
        };
        let mut c = Composer::new(len, ps);
        let (mut payloads, mut held): (Vec<&[u8]>, Vec<HeldPiece>) = (vec![], vec![]);
        for (i, d) in deltas.iter().enumerate().rev() {
            let v = DeltaView::parse("d", d, 0, BASE_CRC, ps).unwrap();
            let pieces = c.claim(&v);
            if hold.get(i).copied().unwrap_or(false) {
                let delta = payloads.len();
                payloads.push(d);
                held.extend(pieces.into_iter().map(|piece| HeldPiece { piece, delta }));
            } else {
                for piece in pieces {
                    put(piece.at as usize, &d[piece.src_range()]);
                }
            }
        }
        held.sort_by_key(|h| h.piece.at);
        let base_len = base.len() as u64;
        let mut from = 0;
        if c.needs_base(base_len) {
            // Stream the base in uneven pieces, as a store would.
            let mut off = 0usize;
            let mut step = 1 + (base.len() % 7);
            while off < base.len() {
                let n = step.min(base.len() - off);
                let piece = &base[off..off + n];
                for w in c.base_writes(&held, base_len, off as u64, n) {
                    let mut at = w.at as usize;
                    for part in &w.parts {
                        let bytes = match part {
                            Part::Base(r) => &piece[r.clone()],
                            Part::Delta { delta, src } => &payloads[*delta][src.clone()],
                        };
                        put(at, bytes);
                        at += bytes.len();
                    }
                }
                off += n;
                step = step * 3 % 97 + 1;
            }
            from = c.base_end(base_len);
        }
        for h in held_from(&held, from) {
            put(h.piece.at as usize, &payloads[h.delta][h.piece.src_range()]);
        }
        (out, writes)
    }

    fn chain() -> impl Strategy<Value = (u32, u64, Vec<Step>)> {
        (prop_oneof![Just(16u32), Just(64u32)], 1u64..40).prop_flat_map(|(ps, base_pages)| {
            let step = (1u64..48).prop_flat_map(move |pages| {
                (
                    Just(pages * u64::from(ps)),
                    proptest::collection::btree_set(0u32..pages as u32, 0..=pages as usize),
                    any::<u8>(),
                )
                    .prop_map(|(len, set, seed)| Step {
                        len,
                        pages: set.into_iter().collect(),
                        seed,
                    })
            });
            (
                Just(ps),
                Just(base_pages * u64::from(ps)),
                proptest::collection::vec(step, 0..12),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        /// Random chains: random pages per delta, growth and shrinking at any step, bases
        /// longer or shorter than the chunk (a re-based or shrunk chunk).
        #[test]
        fn newest_first_equals_oldest_first_and_writes_each_byte_once(
            (ps, base_len, steps) in chain(), seed in any::<u8>(),
            hold in proptest::collection::vec(any::<bool>(), 12),
        ) {
            let base: Vec<u8> = (0..base_len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
            let deltas: Vec<Vec<u8>> = steps.iter().enumerate().map(|(g, s)| encode(ps, g + 2, s)).collect();
            let len = steps.last().map_or(base_len, |s| s.len);
            let want = oldest_first(ps, &base, &deltas, len);
            let (got, writes) = newest_first(ps, &base, &deltas, len, &hold);
            prop_assert_eq!(got, want);
            prop_assert!(writes.iter().all(|w| *w <= 1), "a byte was written twice");
        }
    }

    #[test]
    fn pieces_merge_adjacent_pages_and_skip_claimed_ones() {
        let ps = 16u32;
        let step = |pages: Vec<u32>, seed| Step {
            len: 160,
            pages,
            seed,
        };
        let newer = encode(ps, 3, &step(vec![2, 3], 1));
        let older = encode(ps, 2, &step(vec![1, 2, 3, 4, 9], 2));
        let mut c = Composer::new(160, ps);
        let v = DeltaView::parse("n", &newer, 0, BASE_CRC, ps).unwrap();
        let data = DELTA_HEADER_LEN + 8;
        assert_eq!(
            c.claim(&v),
            vec![DeltaPiece {
                at: 32,
                src: data,
                len: 32
            }]
        );
        let v = DeltaView::parse("o", &older, 0, BASE_CRC, ps).unwrap();
        let data = DELTA_HEADER_LEN + 20;
        assert_eq!(
            c.claim(&v),
            vec![
                DeltaPiece {
                    at: 16,
                    src: data,
                    len: 16
                },
                DeltaPiece {
                    at: 64,
                    src: data + 48,
                    len: 16
                },
                DeltaPiece {
                    at: 144,
                    src: data + 64,
                    len: 16
                },
            ]
        );
        assert_eq!(c.claimed_pages(), 5);
        assert!(c.needs_base(128));
        assert!(!c.needs_base(0) && c.needs_base(1), "page 0 is the base's");
        // Pages 2 and 3 held (delta 0), 1, 4 and 9 written already.
        let held = [HeldPiece {
            piece: DeltaPiece {
                at: 32,
                src: 100,
                len: 32,
            },
            delta: 0,
        }];
        let w = c.base_writes(&held, 128, 8, 100);
        assert_eq!(
            w,
            vec![
                BaseWrite {
                    at: 8,
                    parts: vec![Part::Base(0..8)]
                },
                BaseWrite {
                    at: 32,
                    parts: vec![Part::Delta {
                        delta: 0,
                        src: 100..132
                    }]
                },
                BaseWrite {
                    at: 80,
                    parts: vec![Part::Base(72..100)]
                },
            ]
        );
        let w = c.base_writes(&held, 128, 40, 100);
        assert_eq!(
            w[0].parts[0],
            Part::Delta {
                delta: 0,
                src: 108..132
            }
        );
        assert_eq!(
            w[1],
            BaseWrite {
                at: 80,
                parts: vec![Part::Base(40..88)]
            }
        );
        let rest: Vec<_> = held_from(&held, 40).collect();
        assert_eq!(
            (rest[0].piece.at, rest[0].piece.src, rest[0].piece.len),
            (40, 108, 24)
        );
        assert_eq!(held_from(&held, 64).count(), 0);
    }
}
