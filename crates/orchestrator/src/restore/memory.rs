//! The memory bound of one restore: bytes of delta payloads held at once, across every
//! chunk being composed.
//!
//! Contract: [`MemoryBound::reserve`] waits until the bytes are free and returns a permit
//! that gives them back when dropped. A request larger than the whole bound is cut down to
//! the bound, so it waits for everything else and then runs alone: a single oversized delta
//! slows a restore but never stalls it. Requests are served first come, first served, and a
//! chunk reserves its deltas one after the other in the order it consumes them, so the
//! head of every chunk's queue always holds its bytes and the bound cannot deadlock.
//!
//! It also takes turns for fetching chains: at most [`CHAINS_FETCHED_AT_ONCE`] chunks fetch
//! their deltas at once, first come first served, in chunk order. The first chunks of a
//! restore thus get their deltas quickly and start streaming their bases while the next
//! ones fetch theirs, instead of every chunk waiting for its deltas at the same time
//! (with a store that pays per request, such as S3, that wait is most of the cost of a
//! deep chain). A turn is taken after the chunk's memory and never waits for memory held
//! by another chunk's turn. In memory only: nothing survives a crash, and dropping a
//! waiting call cancels it.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Accounting unit: 1 KiB, so a `u32` request covers up to 4 TiB.
const UNIT: u64 = 1024;

/// Chunks of one restore that fetch their delta chains at once.
pub(crate) const CHAINS_FETCHED_AT_ONCE: usize = 2;

/// Bytes a restore may hold in delta payloads at once, and turns for fetching chains.
#[derive(Clone, Debug)]
pub(crate) struct MemoryBound {
    units: u32,
    sem: Arc<Semaphore>,
    share: u64,
    turns: Arc<Semaphore>,
}

impl MemoryBound {
    /// A bound of `bytes` (at least one unit), shared by up to `chunks` chunks at once.
    pub(crate) fn new(bytes: u64, chunks: usize) -> Self {
        let units = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX));
        Self {
            units,
            sem: Arc::new(Semaphore::new(units as usize)),
            share: bytes / chunks.max(1) as u64,
            turns: Arc::new(Semaphore::new(CHAINS_FETCHED_AT_ONCE)),
        }
    }

    /// Waits for a turn to fetch a chunk's chain; the turn ends when the result is dropped.
    pub(crate) async fn chain_turn(&self) -> Reservation {
        let permit = Arc::clone(&self.turns).acquire_owned().await.ok();
        Reservation { _permit: permit }
    }

    /// One chunk's share of the bound: a chain whose deltas fit in it may be held whole,
    /// since every chunk in flight can hold that much at once.
    pub(crate) fn chunk_share(&self) -> u64 {
        self.share
    }

    /// Waits until `bytes` (cut down to the whole bound) are free and reserves them.
    pub(crate) async fn reserve(&self, bytes: u64) -> Reservation {
        let want = u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .min(self.units);
        // The semaphore is never closed, so acquiring cannot fail; if it ever did, the
        // restore would go on without a reservation rather than fail.
        let permit = Arc::clone(&self.sem).acquire_many_owned(want).await.ok();
        Reservation { _permit: permit }
    }

    /// Bytes free right now (tests).
    #[cfg(test)]
    pub(crate) fn available(&self) -> u64 {
        self.sem.available_permits() as u64 * UNIT
    }
}

/// Reserved bytes, given back on drop.
#[derive(Debug)]
pub(crate) struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_space_and_oversized_ones_run_alone() {
        let m = MemoryBound::new(10 * UNIT, 4);
        assert_eq!(m.chunk_share(), 10 * UNIT / 4);
        let a = m.reserve(4 * UNIT).await;
        let b = m.reserve(5 * UNIT + 1).await;
        assert_eq!(m.available(), 0);
        let m2 = m.clone();
        let big = tokio::spawn(async move { m2.reserve(1 << 40).await });
        tokio::task::yield_now().await;
        assert!(!big.is_finished(), "waits while anything else is held");
        drop(a);
        tokio::task::yield_now().await;
        assert!(!big.is_finished());
        drop(b);
        let big = big.await.unwrap();
        assert_eq!(
            m.available(),
            0,
            "an oversized request takes the whole bound"
        );
        drop(big);
        assert_eq!(m.available(), 10 * UNIT);
        let _none = m.reserve(0).await;
        assert_eq!(m.available(), 10 * UNIT);
    }

    #[tokio::test]
    async fn a_few_chains_are_fetched_at_once_in_turn() {
        let m = MemoryBound::new(UNIT, 8);
        let turns: Vec<Reservation> =
            futures::future::join_all((0..CHAINS_FETCHED_AT_ONCE).map(|_| m.chain_turn())).await;
        let m2 = m.clone();
        let next = tokio::spawn(async move { m2.chain_turn().await });
        tokio::task::yield_now().await;
        assert!(!next.is_finished(), "waits for a turn");
        drop(turns);
        next.await.unwrap();
    }
}
