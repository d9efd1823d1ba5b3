//! Store-wide request concurrency and bandwidth limits, and operation counters.
//!
//! Contract: every request the store sends first takes a permit from one semaphore
//! (`max_concurrent_requests`, held until the request, including a streamed body, is done),
//! and every byte sent or received first takes a token from the matching rate limiter
//! (`upload_bytes_per_sec`, `download_bytes_per_sec`, token bucket with one second of burst).
//! All clones of a store share one [`Limits`], so a checkpoint and a restore in one process
//! together stay under the limits. `0` means unlimited and costs nothing.
//!
//! Retries: a retried request takes a new permit; the permit is released before a backoff
//! sleep, so a sleeping retry never blocks other requests. Cancellation: dropping a future
//! releases its permit; tokens already taken are not returned (the limiter may then be
//! slightly conservative). No state survives a crash.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::StoreConfig;

/// Shared limits of one store.
pub(crate) struct Limits {
    requests: Option<Arc<Semaphore>>,
    upload: Option<Bandwidth>,
    download: Option<Bandwidth>,
    pub(crate) stats: Counters,
}

impl Limits {
    pub(crate) fn new(cfg: &StoreConfig) -> Self {
        Self {
            requests: (cfg.max_concurrent_requests > 0)
                .then(|| Arc::new(Semaphore::new(cfg.max_concurrent_requests))),
            upload: Bandwidth::new(cfg.upload_bytes_per_sec),
            download: Bandwidth::new(cfg.download_bytes_per_sec),
            stats: Counters::default(),
        }
    }

    /// A request slot (or `None` when requests are unlimited).
    pub(crate) async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        match &self.requests {
            // The semaphore is never closed, so acquiring only fails if it were.
            Some(s) => Arc::clone(s).acquire_owned().await.ok(),
            None => None,
        }
    }

    /// Waits until `bytes` may be sent.
    pub(crate) async fn upload(&self, bytes: u64) {
        self.stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        if let Some(b) = &self.upload {
            b.take(bytes).await;
        }
    }

    /// Waits until `bytes` more may be received.
    pub(crate) async fn download(&self, bytes: u64) {
        self.stats
            .bytes_received
            .fetch_add(bytes, Ordering::Relaxed);
        if let Some(b) = &self.download {
            b.take(bytes).await;
        }
    }
}

/// A byte-rate token bucket (cells are bytes; rates above 4 GiB/s are treated as 4 GiB/s).
struct Bandwidth {
    limiter: DefaultDirectRateLimiter,
    burst: u32,
}

impl Bandwidth {
    fn new(bytes_per_sec: u64) -> Option<Self> {
        let rate = NonZeroU32::new(u32::try_from(bytes_per_sec).unwrap_or(u32::MAX))?;
        Some(Self {
            limiter: RateLimiter::direct(Quota::per_second(rate)),
            burst: rate.get(),
        })
    }

    async fn take(&self, mut bytes: u64) {
        while bytes > 0 {
            let n = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.burst);
            if let Some(n) = NonZeroU32::new(n) {
                // `n` never exceeds the burst, so capacity is always sufficient.
                let _ = self.limiter.until_n_ready(n).await;
            }
            bytes -= u64::from(n);
        }
    }
}

/// Counters of what the store did, shared by all clones.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) damaged_reads: AtomicU64,
    pub(crate) resumed_reads: AtomicU64,
    pub(crate) resolved_by_read_back: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
}

/// A snapshot of a store's counters ([`crate::RemoteStore::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Request attempts sent (each retry counts).
    pub requests: u64,
    /// Retries after transient errors (not counting re-reads of damaged blobs).
    pub retries: u64,
    /// Blob reads whose bytes failed verification (corrupt or cut short); each was re-read
    /// or reported.
    pub damaged_reads: u64,
    /// Streamed reads resumed from where a transient error cut them off.
    pub resumed_reads: u64,
    /// Writes whose outcome was lost in transit and resolved by reading the object back.
    pub resolved_by_read_back: u64,
    /// Payload bytes handed to the store (each attempt counts).
    pub bytes_sent: u64,
    /// Bytes received from the store (each attempt counts).
    pub bytes_received: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> StoreStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            requests: g(&self.requests),
            retries: g(&self.retries),
            damaged_reads: g(&self.damaged_reads),
            resumed_reads: g(&self.resumed_reads),
            resolved_by_read_back: g(&self.resolved_by_read_back),
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
        }
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn bandwidth_and_concurrency_are_bounded() {
        let cfg = StoreConfig {
            upload_bytes_per_sec: 1_000_000,
            max_concurrent_requests: 2,
            ..Default::default()
        };
        let l = Limits::new(&cfg);
        let t = Instant::now();
        // The first second's worth is the burst; 1.5 MB more needs about 1.5 s.
        l.upload(1_000_000).await;
        l.upload(1_500_000).await;
        let took = t.elapsed().as_secs_f64();
        assert!((1.3..3.0).contains(&took), "{took}");
        let a = l.permit().await.unwrap();
        let _b = l.permit().await.unwrap();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), l.permit())
                .await
                .is_err()
        );
        drop(a);
        assert!(l.permit().await.is_some());
        assert_eq!(l.stats.snapshot().bytes_sent, 2_500_000);
    }
}
