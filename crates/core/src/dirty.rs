//! The engine-facing dirty-page tracker.
//!
//! Contract: [`DirtyTracker::mark`] records that a page changed. It is wait-free on the hot
//! path (one relaxed load to find the page's block, one `fetch_or` on one word) and safe from
//! any number of threads. [`DirtyTracker::drain`] atomically swaps every word to zero and
//! returns the pages it saw, so a mark that races with a drain lands either in this drain or
//! in the next one, never nowhere.
//!
//! Memory: pages are grouped in blocks of 32 Ki pages (4 KiB of bits); a block is allocated
//! the first time one of its pages is marked, by `OnceLock`, which may briefly make a second
//! thread marking the same brand-new block wait for the first. Pages at or beyond the
//! tracker's capacity cannot be recorded; marking one sets an overflow flag so the next
//! drain says "treat every page as dirty" instead of silently losing it.
//!
//! Crash: the tracker is in memory only, and its marks say nothing about writes made before
//! it existed (by an earlier process, say). Each tracker therefore has an identity
//! ([`DirtyTracker::id`], unique within the process), and the checkpointer trusts a
//! tracker's marks only once a checkpoint that compared page digests has succeeded with
//! that same tracker: the first checkpoint with a new tracker (after every restart) reads
//! the pages, so nothing is lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

const WORDS_PER_BLOCK: usize = 512;
const PAGES_PER_BLOCK: u64 = (WORDS_PER_BLOCK * 64) as u64;

type Block = Box<[AtomicU64]>;

/// A lock-free set of dirty page numbers.
pub struct DirtyTracker {
    id: u64,
    blocks: Box<[OnceLock<Block>]>,
    capacity: u64,
    overflow: AtomicBool,
}

/// The pages drained from a tracker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// Dirty page numbers, ascending, without duplicates.
    pub pages: Vec<u64>,
    /// A page beyond the tracker's capacity was marked: every page must be treated as dirty.
    pub overflow: bool,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl DirtyTracker {
    /// A tracker for pages `0..capacity_pages`.
    pub fn new(capacity_pages: u64) -> Self {
        let n = usize::try_from(capacity_pages.div_ceil(PAGES_PER_BLOCK)).unwrap_or(usize::MAX);
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            blocks: (0..n).map(|_| OnceLock::new()).collect(),
            capacity: capacity_pages,
            overflow: AtomicBool::new(false),
        }
    }

    /// This tracker's identity, unique among the trackers of this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Pages this tracker can record.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Records that `page` changed. Returns `false` if the page is beyond the capacity (the
    /// next drain then reports an overflow).
    #[inline]
    pub fn mark(&self, page: u64) -> bool {
        if page >= self.capacity {
            self.overflow.store(true, Ordering::Release);
            return false;
        }
        let block = (page / PAGES_PER_BLOCK) as usize;
        let within = page % PAGES_PER_BLOCK;
        let words = self.blocks[block]
            .get_or_init(|| (0..WORDS_PER_BLOCK).map(|_| AtomicU64::new(0)).collect());
        words[(within / 64) as usize].fetch_or(1u64 << (within % 64), Ordering::Release);
        true
    }

    /// Removes and returns every page marked so far.
    pub fn drain(&self) -> DirtySet {
        let overflow = self.overflow.swap(false, Ordering::AcqRel);
        let mut pages = Vec::new();
        for (b, block) in self.blocks.iter().enumerate() {
            let Some(words) = block.get() else { continue };
            for (w, word) in words.iter().enumerate() {
                let mut bits = word.swap(0, Ordering::AcqRel);
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    pages.push(b as u64 * PAGES_PER_BLOCK + w as u64 * 64 + bit);
                    bits &= bits - 1;
                }
            }
        }
        DirtySet { pages, overflow }
    }

    /// Puts pages back (for example after a checkpoint that used them failed), so the next
    /// drain sees them again.
    pub fn restore(&self, set: &DirtySet) {
        for &p in &set.pages {
            self.mark(p);
        }
        if set.overflow {
            self.overflow.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    #[test]
    fn every_tracker_has_its_own_identity() {
        let (a, b) = (DirtyTracker::new(1), DirtyTracker::new(1));
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn marks_drain_sorted_and_once() {
        let t = DirtyTracker::new(100_000);
        for p in [99_999, 5, 64, 5, 70_000] {
            assert!(t.mark(p));
        }
        assert_eq!(t.drain().pages, vec![5, 64, 70_000, 99_999]);
        assert!(t.drain().pages.is_empty());
        assert!(!t.mark(100_000));
        assert!(t.drain().overflow);
        assert!(!t.drain().overflow);
    }

    #[test]
    fn no_mark_is_lost_under_concurrent_drains() {
        let t = Arc::new(DirtyTracker::new(1 << 20));
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    let mut marked = BTreeSet::new();
                    let mut x = w.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    for _ in 0..200_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let p = x % (1 << 20);
                        t.mark(p);
                        marked.insert(p);
                    }
                    marked
                })
            })
            .collect();
        let mut drained = BTreeSet::new();
        while writers.iter().any(|w| !w.is_finished()) {
            drained.extend(t.drain().pages);
        }
        let mut expected = BTreeSet::new();
        for w in writers {
            expected.extend(w.join().unwrap());
        }
        drained.extend(t.drain().pages);
        assert_eq!(drained, expected);
    }
}
