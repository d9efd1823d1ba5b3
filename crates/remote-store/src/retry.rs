//! The retry engine and the retry layer.
//!
//! Contract: [`Retry`] is the one retry engine of a store. A [`Budget`] allows at most
//! `retry_max_attempts` attempts of one operation and no retry that would start after
//! `retry_total_ms`; between attempts it sleeps an exponential backoff with full jitter
//! (`retry_initial_backoff_ms` doubling up to `retry_max_backoff_ms`); a connection
//! failure of an endpoint that has never answered gets only a few attempts, so a dead or
//! mistyped endpoint fails fast. Only failures whose
//! [`Cause`] is transient are retried ([`crate::classify`] decides, once, for everyone);
//! a permanent failure ends the operation at once. Every retry is counted in the store's
//! statistics and logged at debug level; giving up is logged as a warning.
//!
//! [`RetryStore`] is the retry layer: an `ObjectStore` (and `MultipartStore`) that retries
//! each request whose repetition is harmless and means the same thing: GET, HEAD, ranged
//! GET, overwriting PUT, delete, listing (restarted, skipping what it already yielded),
//! multipart create, part upload (the same part number again) and abort. It passes through
//! once, unretried, what a blind repeat could get wrong: a conditional PUT or copy (after a
//! lost response the repeat is refused by our own object, which looks exactly like losing to
//! another writer) and a multipart completion (the repeat finds the upload gone); those are
//! retried and settled by reading back in the store logic, on this same engine. A body
//! stream is not retried here either: the reader knows how far it got and resumes itself.
//! When the budget is spent, the last error goes up inside a [`GaveUp`] so the store can
//! report [`crate::StoreError::RetriesExhausted`] with the attempts and time spent.
//!
//! Place in the stack: outermost, above the limits layer, so a retry sleeping through its
//! backoff holds no request permit and no bandwidth, and above the statistics layer, so
//! every attempt is counted. `object_store`'s own HTTP retries are off by default
//! ([`crate::StoreConfig::http_retries`]) so that the two never multiply.
//!
//! Crash, cancellation: no state survives a crash (a retried write is an idempotent request
//! or settled by its caller); dropping a call cancels the attempt in flight or the backoff
//! sleep, and nothing else is left running.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyMode, CopyOptions, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload,
    ObjectMeta, ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    RenameOptions,
};

use crate::classify::{classify, Cause};
use crate::stack::{no_multipart, Layer};
use crate::stats::Stats;
use crate::{StoreConfig, StoreError};

/// An error the engine can classify: its transient cause, or `None` if it is permanent.
pub(crate) trait Classified: std::fmt::Display {
    fn transient_cause(&self) -> Option<Cause>;
}

impl Classified for object_store::Error {
    fn transient_cause(&self) -> Option<Cause> {
        let c = classify(self);
        c.is_transient().then_some(c)
    }
}

impl Classified for StoreError {
    fn transient_cause(&self) -> Option<Cause> {
        match self {
            // A budget already spent stays spent: retrying it again would nest retries.
            StoreError::RetriesExhausted { .. } => None,
            e if e.is_retryable() => Some(e.cause().unwrap_or(Cause::Unknown)),
            _ => None,
        }
    }
}

/// The retry engine of one store; see the module documentation.
#[derive(Debug)]
pub(crate) struct Retry {
    max_attempts: u32,
    initial: Duration,
    max_backoff: Duration,
    total: Duration,
    /// The store's description, for logs.
    store: String,
    stats: Arc<Stats>,
    /// The endpoint has answered at least once (any response, even an error).
    answered: std::sync::atomic::AtomicBool,
}

/// Attempts of one operation against an endpoint that has never accepted a connection: a
/// dead or mistyped endpoint fails within seconds instead of the whole budget.
const UNANSWERED_CONNECT_ATTEMPTS: u32 = 3;

impl Retry {
    pub(crate) fn new(cfg: &StoreConfig, store: String, stats: Arc<Stats>) -> Self {
        Self {
            max_attempts: cfg.retry_max_attempts.max(1),
            initial: Duration::from_millis(cfg.retry_initial_backoff_ms),
            max_backoff: Duration::from_millis(
                cfg.retry_max_backoff_ms.max(cfg.retry_initial_backoff_ms),
            ),
            total: Duration::from_millis(cfg.retry_total_ms),
            store,
            stats,
            answered: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn answered(&self) {
        self.answered
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A fresh budget for one operation, starting now with its first attempt.
    pub(crate) fn budget(self: &Arc<Self>) -> Budget {
        let delays = ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max_backoff)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
            .build();
        Budget {
            retry: Arc::clone(self),
            delays,
            started: Instant::now(),
            attempts: 1,
        }
    }

    /// Runs `attempt` until it succeeds, fails permanently, or the budget is spent.
    pub(crate) async fn run<T, E, F, Fut>(
        self: &Arc<Self>,
        op: &'static str,
        target: &str,
        mut attempt: F,
    ) -> Result<T, Failure<E>>
    where
        E: Classified,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut budget = self.budget();
        loop {
            match attempt().await {
                Ok(v) => {
                    self.answered();
                    return Ok(v);
                }
                Err(e) if e.transient_cause().is_none() => return Err(Failure::Final(e)),
                Err(e) => {
                    if !budget.wait(op, target, &e).await {
                        return Err(budget.give_up(op, target, e));
                    }
                }
            }
        }
    }
}

/// The attempts and time one operation has left.
pub(crate) struct Budget {
    retry: Arc<Retry>,
    delays: ExponentialBackoff,
    started: Instant,
    attempts: u32,
}

impl Budget {
    /// After a failed attempt with the transient error `e`: sleeps the backoff and returns
    /// `true` (the caller makes the next attempt), or returns `false` when the attempts or
    /// the time are spent. A connection failure of an endpoint that never answered gets
    /// only [`UNANSWERED_CONNECT_ATTEMPTS`] attempts.
    pub(crate) async fn wait(
        &mut self,
        op: &'static str,
        target: &str,
        e: &impl Classified,
    ) -> bool {
        let cause = e.transient_cause();
        if cause != Some(Cause::Connect) {
            self.retry.answered();
        }
        let never_answered = !self
            .retry
            .answered
            .load(std::sync::atomic::Ordering::Relaxed);
        if cause == Some(Cause::Connect)
            && never_answered
            && self.attempts >= UNANSWERED_CONNECT_ATTEMPTS
        {
            return false;
        }
        let Some(delay) = self.next_delay() else {
            return false;
        };
        self.retry.stats.retry();
        tracing::debug!(
            op,
            key = target,
            store = %self.retry.store,
            attempt = self.attempts,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            cause = ?e.transient_cause(),
            error = %e,
            "retrying after a transient error"
        );
        tokio::time::sleep(delay).await;
        true
    }

    fn next_delay(&mut self) -> Option<Duration> {
        if self.attempts >= self.retry.max_attempts {
            return None;
        }
        let d = self.delays.next()?;
        if self.started.elapsed() + d > self.retry.total {
            return None;
        }
        self.attempts += 1;
        Some(d)
    }

    /// Time since the first attempt, in milliseconds.
    pub(crate) fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The budget is spent: logs it and wraps the last error.
    pub(crate) fn give_up<E: Classified>(
        &self,
        op: &'static str,
        target: &str,
        last: E,
    ) -> Failure<E> {
        tracing::warn!(
            op,
            key = target,
            store = %self.retry.store,
            attempts = self.attempts,
            error = %last,
            "giving up after retries"
        );
        Failure::Exhausted {
            attempts: self.attempts,
            elapsed_ms: self.elapsed_ms(),
            last,
        }
    }

    /// [`Budget::give_up`] as the store's error.
    pub(crate) fn exhausted(&self, op: &'static str, key: &str, last: StoreError) -> StoreError {
        self.give_up(op, key, last)
            .into_store_error(op, key, &self.retry.store)
    }
}

/// How a retried operation failed.
pub(crate) enum Failure<E> {
    /// A permanent error (possibly after transient ones).
    Final(E),
    /// Transient errors until the budget was spent.
    Exhausted {
        attempts: u32,
        elapsed_ms: u64,
        last: E,
    },
}

impl Failure<StoreError> {
    pub(crate) fn into_store_error(self, op: &'static str, key: &str, store: &str) -> StoreError {
        match self {
            Failure::Final(e) => e,
            Failure::Exhausted {
                attempts,
                elapsed_ms,
                last,
            } => StoreError::RetriesExhausted {
                op,
                key: key.to_string(),
                store: store.to_string(),
                attempts,
                elapsed_ms,
                last: Box::new(last),
            },
        }
    }
}

impl Failure<object_store::Error> {
    pub(crate) fn into_error(self) -> object_store::Error {
        match self {
            Failure::Final(e) => e,
            Failure::Exhausted {
                attempts,
                elapsed_ms,
                last,
            } => object_store::Error::Generic {
                store: "RetryStore",
                source: Box::new(GaveUp {
                    attempts,
                    elapsed_ms,
                    last,
                }),
            },
        }
    }
}

/// The retry layer gave up: the source of the `Generic` error it returns.
#[derive(Debug, thiserror::Error)]
#[error("gave up after {attempts} attempt(s) in {elapsed_ms} ms: {last}")]
pub(crate) struct GaveUp {
    pub(crate) attempts: u32,
    pub(crate) elapsed_ms: u64,
    #[source]
    pub(crate) last: object_store::Error,
}

impl GaveUp {
    /// The [`GaveUp`] inside `e`, or `e` itself.
    pub(crate) fn take(e: object_store::Error) -> Result<GaveUp, object_store::Error> {
        match e {
            object_store::Error::Generic { store, source } => match source.downcast::<GaveUp>() {
                Ok(g) => Ok(*g),
                Err(source) => Err(object_store::Error::Generic { store, source }),
            },
            other => Err(other),
        }
    }
}

/// The retry layer; see the module documentation.
#[derive(Debug)]
pub(crate) struct RetryStore {
    inner: Layer,
    retry: Arc<Retry>,
}

impl std::fmt::Display for RetryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RetryStore({})", self.inner.store)
    }
}

impl RetryStore {
    /// `inner` (and its multipart side, if any) with per-request retries by `retry`.
    pub(crate) fn wrap(inner: Layer, retry: Arc<Retry>) -> Layer {
        let has_multipart = inner.multipart.is_some();
        Layer::of(Arc::new(Self { inner, retry }), has_multipart)
    }

    fn multipart(&self) -> object_store::Result<&Arc<dyn MultipartStore>> {
        self.inner
            .multipart
            .as_ref()
            .ok_or_else(|| no_multipart("RetryStore"))
    }

    async fn run<T, F, Fut>(
        &self,
        op: &'static str,
        path: &Path,
        attempt: F,
    ) -> object_store::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        self.retry
            .run(op, path.as_ref(), attempt)
            .await
            .map_err(Failure::into_error)
    }

    /// A listing `open` starts, restarted after a transient error; entries it already
    /// yielded are skipped on the restarted listing (so the order of the backend's listing
    /// does not matter).
    fn restartable(
        &self,
        shown: String,
        open: impl Fn() -> BoxStream<'static, object_store::Result<ObjectMeta>> + Send + 'static,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        struct Listing<O> {
            open: O,
            current: BoxStream<'static, object_store::Result<ObjectMeta>>,
            seen: HashSet<Path>,
            budget: Budget,
            shown: String,
            done: bool,
        }
        let current = open();
        let state = Listing {
            open,
            current,
            seen: HashSet::new(),
            budget: self.retry.budget(),
            shown,
            done: false,
        };
        futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            loop {
                match st.current.next().await {
                    None => return None,
                    Some(Ok(meta)) => {
                        if st.seen.insert(meta.location.clone()) {
                            return Some((Ok(meta), st));
                        }
                    }
                    Some(Err(e)) => {
                        // Drop the failed listing first: it may hold a request permit,
                        // which a retry must not keep through its backoff.
                        st.current = futures::stream::empty().boxed();
                        let failure = if e.transient_cause().is_none() {
                            Failure::Final(e)
                        } else if st.budget.wait("list", &st.shown, &e).await {
                            st.current = (st.open)();
                            continue;
                        } else {
                            st.budget.give_up("list", &st.shown, e)
                        };
                        st.done = true;
                        return Some((Err(failure.into_error()), st));
                    }
                }
            }
        })
        .boxed()
    }
}

#[async_trait]
impl ObjectStore for RetryStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let inner = &self.inner.store;
        if !matches!(opts.mode, PutMode::Overwrite) {
            return inner.put_opts(location, payload, opts).await;
        }
        self.run("put", location, || {
            inner.put_opts(location, payload.clone(), opts.clone())
        })
        .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        // Creating the upload is retried; its parts cannot be: a part of an `ObjectStore`
        // multipart upload is numbered by the call, so a repeat would be a new part.
        let inner = &self.inner.store;
        self.run("create multipart upload", location, || {
            inner.put_multipart_opts(location, opts.clone())
        })
        .await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let inner = &self.inner.store;
        let op = if options.head { "head" } else { "get" };
        self.run(op, location, || inner.get_opts(location, options.clone()))
            .await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let inner = &self.inner.store;
        self.run("range get", location, || inner.get_ranges(location, ranges))
            .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let inner = Arc::clone(&self.inner.store);
        let retry = Arc::clone(&self.retry);
        crate::batch::batched(locations, move |paths| {
            let (inner, retry) = (Arc::clone(&inner), Arc::clone(&retry));
            async move { crate::batch::retried(&inner, &retry, paths).await }
        })
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let (inner, prefix) = (Arc::clone(&self.inner.store), prefix.cloned());
        let shown = prefix.as_ref().map(Path::to_string).unwrap_or_default();
        self.restartable(shown, move || inner.list(prefix.as_ref()))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let (inner, prefix, offset) = (
            Arc::clone(&self.inner.store),
            prefix.cloned(),
            offset.clone(),
        );
        let shown = prefix.as_ref().map(Path::to_string).unwrap_or_default();
        self.restartable(shown, move || {
            inner.list_with_offset(prefix.as_ref(), &offset)
        })
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let inner = &self.inner.store;
        let shown = prefix.cloned().unwrap_or_default();
        self.run("list", &shown, || inner.list_with_delimiter(prefix))
            .await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let inner = &self.inner.store;
        if options.mode != CopyMode::Overwrite {
            return inner.copy_opts(from, to, options).await;
        }
        self.run("copy", to, || inner.copy_opts(from, to, options.clone()))
            .await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        // A rename is a copy and a delete; repeating it after a lost response would fail on
        // the missing source, so it is passed through once.
        self.inner.store.rename_opts(from, to, options).await
    }
}

#[async_trait]
impl MultipartStore for RetryStore {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        let mp = self.multipart()?;
        self.run("create multipart upload", path, || {
            mp.create_multipart(path)
        })
        .await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        let mp = self.multipart()?;
        self.run("upload part", path, || {
            mp.put_part(path, id, part_idx, data.clone())
        })
        .await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        // Settled by its caller (a repeat after a lost response finds the upload gone).
        self.multipart()?.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        let mp = self.multipart()?;
        self.run("abort multipart upload", path, || {
            mp.abort_multipart(path, id)
        })
        .await
    }
}

#[cfg(test)]
#[path = "retry_tests.rs"]
mod tests;
