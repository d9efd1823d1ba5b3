//! A fault-injecting [`ObjectStore`] wrapper for tests: the bad network in a box.
//!
//! Contract: [`FaultStore`] forwards every call to an inner store and, with the rates of its
//! [`FaultConfig`] drawn from one seeded generator (so a run is reproducible given the same
//! order of calls), injects:
//! * transient errors before a request is sent (nothing reaches the inner store);
//! * added latency before a request;
//! * truncated bodies (the stream ends early without an error) and corrupted bodies (one
//!   byte flipped) on GETs, at most one of the two per GET (a multi-range read merges
//!   nearby ranges into one GET, like `object_store`'s default, and a GET cut short yields
//!   short ranges), optionally only on keys containing [`FaultConfig::body_fault_keys`];
//! * lost responses after a successful write (PUT, part upload, multipart completion): the
//!   write lands, the caller gets an error;
//! * with [`FaultConfig::ignore_conditional_create`], a store that silently turns
//!   create-if-absent into an overwrite.
//!
//! Every injected fault is counted by kind ([`FaultStore::counts`]); a body fault counts only
//! once its damaged byte (or cut) is actually delivered to the reader.
//!
//! Injected errors are typed with the cause they simulate (a transient error before a
//! request as throttling, a lost response as an interrupted connection), so the layers above
//! classify, retry and count them exactly like the real ones.
//!
//! Place in the stack: innermost, right around the backend, below the statistics, limits
//! and retry layers, so the code under test is the production stack (see `stack.rs`).
//!
//! Crash behaviour, retries: none of its own; it only makes the inner store look worse.
//! Cancellation: dropping a call drops the inner call. [`FaultStore`] also implements
//! [`MultipartStore`] when built with [`FaultStore::with_multipart`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::classify::{Cause, TransientFault};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod multipart;
use multipart::FaultUpload;

/// What to inject and how often (probabilities in `0.0..=1.0`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultConfig {
    /// Seed of the generator that draws every decision.
    pub seed: u64,
    /// Probability that a request fails before it is sent.
    pub transient_errors: f64,
    /// Probability that a request is delayed.
    pub latency: f64,
    /// Longest added delay (uniform in `0..=max_latency`).
    pub max_latency: Duration,
    /// Probability that a GET body ends early.
    pub truncated_bodies: f64,
    /// Probability that a GET body has one byte flipped.
    pub corrupted_bodies: f64,
    /// Probability that a successful write is reported as failed.
    pub lost_write_responses: f64,
    /// Turn create-if-absent into a plain overwrite (a store without conditional create).
    pub ignore_conditional_create: bool,
    /// Only keys containing this string get body faults (`None`: every key).
    pub body_fault_keys: Option<String>,
}

impl FaultConfig {
    /// Transient errors at `rate`, everything else off.
    pub fn transient(rate: f64, seed: u64) -> Self {
        Self {
            seed,
            transient_errors: rate,
            ..Default::default()
        }
    }
}

/// Faults injected so far, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Requests failed before they were sent.
    pub transient_errors: u64,
    /// Requests delayed.
    pub delayed: u64,
    /// GET bodies cut short (counted when the cut was reached).
    pub truncated: u64,
    /// GET bodies with a flipped byte (counted when that byte was delivered).
    pub corrupted: u64,
    /// Writes that landed but were reported as failed.
    pub lost_responses: u64,
    /// Conditional creates turned into overwrites.
    pub ignored_conditional_creates: u64,
}

#[derive(Default)]
struct Counts {
    transient_errors: AtomicU64,
    delayed: AtomicU64,
    truncated: AtomicU64,
    corrupted: AtomicU64,
    lost_responses: AtomicU64,
    ignored_conditional_creates: AtomicU64,
}

struct State {
    cfg: FaultConfig,
    rng: Mutex<StdRng>,
    enabled: AtomicBool,
    counts: Counts,
}

impl State {
    fn roll(&self, p: f64) -> bool {
        if !self.enabled.load(Ordering::Relaxed) || p <= 0.0 {
            return false;
        }
        let mut rng = match self.rng.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        rng.gen_bool(p.min(1.0))
    }

    fn below(&self, n: u64) -> u64 {
        let mut rng = match self.rng.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        rng.gen_range(0..n.max(1))
    }

    /// Latency and transient errors, before a request.
    async fn before(&self, op: &str, location: &str) -> object_store::Result<()> {
        if self.roll(self.cfg.latency) {
            bump(&self.counts.delayed);
            let max = u64::try_from(self.cfg.max_latency.as_micros()).unwrap_or(u64::MAX);
            tokio::time::sleep(Duration::from_micros(self.below(max.saturating_add(1)))).await;
        }
        if self.roll(self.cfg.transient_errors) {
            bump(&self.counts.transient_errors);
            return Err(injected(
                Cause::Throttled,
                format!(
                    "injected transient error: {op} {location} failed before it was sent (503 SlowDown)"
                ),
            ));
        }
        Ok(())
    }

    /// After a write that landed: maybe pretend its response was lost.
    fn after_write<T>(
        &self,
        op: &str,
        location: &str,
        r: object_store::Result<T>,
    ) -> object_store::Result<T> {
        match r {
            Ok(v) if self.roll(self.cfg.lost_write_responses) => {
                bump(&self.counts.lost_responses);
                drop(v);
                Err(injected(
                    Cause::Interrupted,
                    format!(
                        "injected lost response: {op} {location} landed but the connection was reset before the response"
                    ),
                ))
            }
            other => other,
        }
    }

    fn body_fault_applies(&self, location: &Path) -> bool {
        match &self.cfg.body_fault_keys {
            Some(k) => location.as_ref().contains(k.as_str()),
            None => true,
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// An injected fault, typed with the cause it simulates so it is classified like the real one.
fn injected(cause: Cause, message: String) -> object_store::Error {
    TransientFault::error("FaultStore", cause, message)
}

/// The fault-injecting wrapper; see the module documentation.
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    multipart: Option<Arc<dyn MultipartStore>>,
    state: Arc<State>,
}

impl std::fmt::Debug for FaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultStore")
            .field("inner", &self.inner)
            .field("cfg", &self.state.cfg)
            .finish()
    }
}

impl std::fmt::Display for FaultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultStore({})", self.inner)
    }
}

impl FaultStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, cfg: FaultConfig) -> Self {
        let rng = Mutex::new(StdRng::seed_from_u64(cfg.seed));
        Self {
            inner,
            multipart: None,
            state: Arc::new(State {
                cfg,
                rng,
                enabled: AtomicBool::new(true),
                counts: Counts::default(),
            }),
        }
    }

    /// Also wraps the inner store's [`MultipartStore`] side (S3, memory), so part-level
    /// uploads go through the faults too.
    pub fn with_multipart(mut self, multipart: Arc<dyn MultipartStore>) -> Self {
        self.multipart = Some(multipart);
        self
    }

    /// Whether [`MultipartStore`] calls reach an inner multipart store.
    pub fn has_multipart(&self) -> bool {
        self.multipart.is_some()
    }

    /// Turns injection on or off (e.g. off while seeding data); counts are kept.
    pub fn set_enabled(&self, enabled: bool) {
        self.state.enabled.store(enabled, Ordering::Relaxed);
    }

    /// The configuration.
    pub fn config(&self) -> &FaultConfig {
        &self.state.cfg
    }

    /// Faults injected so far.
    pub fn counts(&self) -> FaultCounts {
        let c = &self.state.counts;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultCounts {
            transient_errors: g(&c.transient_errors),
            delayed: g(&c.delayed),
            truncated: g(&c.truncated),
            corrupted: g(&c.corrupted),
            lost_responses: g(&c.lost_responses),
            ignored_conditional_creates: g(&c.ignored_conditional_creates),
        }
    }
}

#[derive(Clone, Copy)]
enum BodyFault {
    Truncate,
    Corrupt,
}

/// Applies `fault` at byte `at` of the stream, counting it when it is delivered.
fn damage(
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    fault: BodyFault,
    at: u64,
    state: Arc<State>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    let mut pos = 0u64;
    let mut done = false;
    stream
        .scan((), move |_, item| {
            if done {
                return futures::future::ready(None);
            }
            let out = match item {
                Err(e) => Err(e),
                Ok(chunk) => {
                    let start = pos;
                    pos += chunk.len() as u64;
                    if (start..pos).contains(&at) {
                        let i = usize::try_from(at - start).unwrap_or(0);
                        match fault {
                            BodyFault::Corrupt => {
                                let mut b = BytesMut::from(&chunk[..]);
                                b[i] ^= 0xA5;
                                bump(&state.counts.corrupted);
                                Ok(b.freeze())
                            }
                            BodyFault::Truncate => {
                                done = true;
                                bump(&state.counts.truncated);
                                Ok(chunk.slice(..i))
                            }
                        }
                    } else {
                        Ok(chunk)
                    }
                }
            };
            futures::future::ready(Some(out))
        })
        .boxed()
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.state.before("PUT", location.as_ref()).await?;
        if self.state.cfg.ignore_conditional_create && matches!(opts.mode, PutMode::Create) {
            bump(&self.state.counts.ignored_conditional_creates);
            opts.mode = PutMode::Overwrite;
        }
        let r = self.inner.put_opts(location, payload, opts).await;
        self.state.after_write("PUT", location.as_ref(), r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.state
            .before("create multipart upload", location.as_ref())
            .await?;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultUpload {
            inner,
            location: location.to_string(),
            state: Arc::clone(&self.state),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let head = options.head;
        self.state.before("GET", location.as_ref()).await?;
        let r = self.inner.get_opts(location, options).await?;
        if head || !self.state.body_fault_applies(location) {
            return Ok(r);
        }
        let len = r.range.end.saturating_sub(r.range.start);
        let fault = if self.state.roll(self.state.cfg.corrupted_bodies) {
            Some(BodyFault::Corrupt)
        } else if self.state.roll(self.state.cfg.truncated_bodies) {
            Some(BodyFault::Truncate)
        } else {
            None
        };
        let (Some(fault), true) = (fault, len > 0) else {
            return Ok(r);
        };
        let at = self.state.below(len);
        let state = Arc::clone(&self.state);
        Ok(crate::local::map_body(r, |body, _| {
            damage(body, fault, at, state)
        }))
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let inner = Arc::clone(&self.inner);
        let state = Arc::clone(&self.state);
        // Each key's fault is decided before the batch goes on without the faulted keys.
        crate::batch::batched(locations, move |paths| {
            let (inner, state) = (Arc::clone(&inner), Arc::clone(&state));
            async move {
                let mut faults = Vec::with_capacity(paths.len());
                let mut sent = Vec::with_capacity(paths.len());
                for p in paths {
                    match state.before("DELETE", p.as_ref()).await {
                        Ok(()) => {
                            sent.push(p);
                            faults.push(None);
                        }
                        Err(e) => faults.push(Some(e)),
                    }
                }
                let mut answers = if sent.is_empty() {
                    Vec::new()
                } else {
                    crate::batch::forward(&inner, sent).await
                }
                .into_iter();
                // In the input's order: a faulted key's error in its own place.
                faults
                    .into_iter()
                    .filter_map(|f| match f {
                        Some(e) => Some(Err(e)),
                        None => answers.next(),
                    })
                    .collect()
            }
        })
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let shown = prefix.map(|p| p.to_string()).unwrap_or_default();
        if self.state.roll(self.state.cfg.transient_errors) {
            bump(&self.state.counts.transient_errors);
            let e = injected(
                Cause::Throttled,
                format!("injected transient error: LIST {shown} failed before it was sent"),
            );
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let shown = prefix.map(|p| p.to_string()).unwrap_or_default();
        if self.state.roll(self.state.cfg.transient_errors) {
            bump(&self.state.counts.transient_errors);
            let e = injected(
                Cause::Throttled,
                format!("injected transient error: LIST {shown} failed before it was sent"),
            );
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let shown = prefix.map(|p| p.to_string()).unwrap_or_default();
        self.state.before("LIST", &shown).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        // Like the default implementation: nearby ranges are merged into one GET (each GET
        // with its own faults) and the ranges sliced out of it. Unlike it, a GET that was
        // silently cut short yields short ranges, which the reader must notice, instead of
        // a panic on slicing past its end.
        let merged = merge_ranges(ranges, object_store::OBJECT_STORE_COALESCE_DEFAULT);
        let mut fetched = Vec::with_capacity(merged.len());
        for r in &merged {
            fetched.push(self.get_range(location, r.clone()).await?);
        }
        Ok(ranges
            .iter()
            .map(|r| {
                let i = merged
                    .partition_point(|m| m.start <= r.start)
                    .saturating_sub(1);
                let (m, bytes) = (&merged[i], &fetched[i]);
                let clamp = |at: u64| {
                    usize::try_from(at - m.start)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len())
                };
                bytes.slice(clamp(r.start)..clamp(r.end))
            })
            .collect())
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.state.before("COPY", to.as_ref()).await?;
        let r = self.inner.copy_opts(from, to, options).await;
        self.state.after_write("COPY", to.as_ref(), r)
    }
}

/// Sorted ranges covering `ranges`, merging those less than `coalesce` bytes apart (the
/// rule of `object_store`'s default `get_ranges`).
fn merge_ranges(ranges: &[std::ops::Range<u64>], coalesce: u64) -> Vec<std::ops::Range<u64>> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<std::ops::Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(last) if r.start.saturating_sub(last.end) <= coalesce => {
                last.end = last.end.max(r.end);
            }
            _ => out.push(r),
        }
    }
    out
}

/// Parses fault settings from URL query pairs (`fault+memory://name?transient=0.1&seed=7`):
/// `seed`, `transient`, `latency`, `latency_ms`, `truncate`, `corrupt`, `lost`,
/// `ignore_conditional_create`, `body_keys`.
pub fn parse_fault_query<'a>(
    pairs: impl Iterator<Item = (std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
) -> Result<FaultConfig, String> {
    let mut cfg = FaultConfig::default();
    for (k, v) in pairs {
        let rate = |v: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| format!("fault parameter {k}={v} is not a rate in 0..=1"))
        };
        let int = |v: &str| -> Result<u64, String> {
            v.parse::<u64>()
                .map_err(|_| format!("fault parameter {k}={v} is not a whole number"))
        };
        match k.as_ref() {
            "seed" => cfg.seed = int(&v)?,
            "transient" | "rate" => cfg.transient_errors = rate(&v)?,
            "latency" => cfg.latency = rate(&v)?,
            "latency_ms" => cfg.max_latency = Duration::from_millis(int(&v)?),
            "truncate" => cfg.truncated_bodies = rate(&v)?,
            "corrupt" => cfg.corrupted_bodies = rate(&v)?,
            "lost" => cfg.lost_write_responses = rate(&v)?,
            "ignore_conditional_create" => {
                cfg.ignore_conditional_create = matches!(v.as_ref(), "1" | "true" | "yes")
            }
            "body_keys" => cfg.body_fault_keys = Some(v.into_owned()),
            other => return Err(format!("unknown fault parameter {other:?}")),
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn faults_are_injected_counted_and_reproducible() {
        let run = |seed| async move {
            let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            let f = FaultStore::new(
                Arc::clone(&mem),
                FaultConfig {
                    seed,
                    transient_errors: 0.3,
                    corrupted_bodies: 0.3,
                    truncated_bodies: 0.3,
                    lost_write_responses: 0.3,
                    ..Default::default()
                },
            );
            let p = Path::from("a/b");
            let data = Bytes::from(vec![7u8; 1000]);
            let mut outcomes = Vec::new();
            for _ in 0..50 {
                outcomes.push(f.put(&p, data.clone().into()).await.is_ok());
                match f.get(&p).await {
                    Ok(r) => {
                        assert_eq!(r.range, 0..1000);
                        let got = r.bytes().await.unwrap();
                        outcomes.push(got == data);
                    }
                    Err(_) => outcomes.push(false),
                }
            }
            (outcomes, f.counts())
        };
        let (a, ca) = run(7).await;
        let (b, cb) = run(7).await;
        assert_eq!((a, ca), (b, cb));
        assert!(ca.transient_errors > 0 && ca.corrupted > 0 && ca.truncated > 0);
        assert!(ca.lost_responses > 0);
    }

    #[tokio::test]
    async fn lost_responses_land_and_ignored_creates_overwrite() {
        let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let f = FaultStore::new(
            Arc::clone(&mem),
            FaultConfig {
                lost_write_responses: 1.0,
                ignore_conditional_create: true,
                ..Default::default()
            },
        );
        let p = Path::from("k");
        assert!(f.put(&p, Bytes::from_static(b"1").into()).await.is_err());
        assert_eq!(mem.get(&p).await.unwrap().bytes().await.unwrap(), "1");
        f.set_enabled(false);
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        f.put_opts(&p, Bytes::from_static(b"2").into(), create)
            .await
            .unwrap();
        assert_eq!(mem.get(&p).await.unwrap().bytes().await.unwrap(), "2");
        assert_eq!(f.counts().ignored_conditional_creates, 1);
        let q = parse_fault_query(
            url::Url::parse("fault+memory://x?transient=0.25&seed=9&lost=0.1")
                .unwrap()
                .query_pairs(),
        )
        .unwrap();
        assert_eq!(
            (q.transient_errors, q.seed, q.lost_write_responses),
            (0.25, 9, 0.1)
        );
        assert!(parse_fault_query(url::Url::parse("m://x?nope=1").unwrap().query_pairs()).is_err());
    }
}
