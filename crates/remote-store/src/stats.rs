//! The statistics layer: counts what reaches the store, and the store's counters.
//!
//! Contract: [`StatsStore`] forwards every call unchanged and counts, in the [`Stats`]
//! shared by all clones of a store: each request by operation, each failed request by its
//! [`Cause`] (and so by class), payload bytes sent and body bytes received, and a body that
//! ends before its announced length as a [`Cause::CutOff`] error. The other layers and the
//! store logic report into the same [`Stats`]: the retry engine its retries, the read path
//! its damaged and resumed reads, the settled writes their read-back resolutions.
//! [`crate::RemoteStore::stats`] returns a [`StoreStats`] snapshot.
//!
//! Place in the stack: inside the retry and limits layers, right above the fault layer and
//! the backend. Inside retry so that every attempt is counted (a request retried three
//! times is three requests and up to three errors); inside limits so that a request is
//! counted when it is sent, not while it waits for a permit; above the fault layer so that
//! injected faults are counted exactly like real ones.
//!
//! Crash, retries, cancellation: counters live in memory only and are lost with the
//! process; this layer never retries; dropping a call drops the inner call (a dropped body
//! stream is not counted as cut off).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, Stream, StreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};

use crate::classify::{classify, Cause};
use crate::stack::{no_multipart, Layer};

/// The kinds of request the statistics count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Get,
    Head,
    Put,
    List,
    Delete,
    Copy,
    CreateMultipart,
    UploadPart,
    CompleteMultipart,
    AbortMultipart,
}

const OPS: usize = 10;

/// Requests sent, by operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RequestCounts {
    /// GETs, whole or ranged (a multi-range read counts once).
    pub get: u64,
    /// HEADs.
    pub head: u64,
    /// Single PUTs, conditional or not.
    pub put: u64,
    /// Listings (one per listing started, whatever its number of pages).
    pub list: u64,
    /// Delete requests (a batch of up to 1,000 keys counts once).
    pub delete: u64,
    /// Copies and renames.
    pub copy: u64,
    /// Multipart uploads created.
    pub create_multipart: u64,
    /// Parts uploaded.
    pub upload_part: u64,
    /// Multipart completions.
    pub complete_multipart: u64,
    /// Multipart aborts.
    pub abort_multipart: u64,
}

/// Failed requests, by class and by cause ([`Cause`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ErrorCounts {
    /// Failures a retry could overcome (the sum of the transient causes below).
    pub transient: u64,
    /// Failures a retry cannot overcome (the sum of the permanent causes below).
    pub permanent: u64,
    /// [`Cause::Connect`].
    pub connect: u64,
    /// [`Cause::Timeout`].
    pub timeout: u64,
    /// [`Cause::Interrupted`].
    pub interrupted: u64,
    /// [`Cause::ServerError`].
    pub server_error: u64,
    /// [`Cause::Throttled`].
    pub throttled: u64,
    /// [`Cause::CutOff`].
    pub cut_off: u64,
    /// [`Cause::BadResponse`].
    pub bad_response: u64,
    /// [`Cause::Unknown`].
    pub unknown: u64,
    /// [`Cause::NotFound`] (a HEAD of an absent object counts here too).
    pub not_found: u64,
    /// [`Cause::AlreadyExists`] (a refused conditional create counts here too).
    pub already_exists: u64,
    /// [`Cause::Denied`].
    pub denied: u64,
    /// [`Cause::Unsupported`].
    pub unsupported: u64,
    /// [`Cause::Rejected`].
    pub rejected: u64,
    /// [`Cause::LocalIo`].
    pub local_io: u64,
}

impl ErrorCounts {
    /// The count of one cause.
    pub fn of(&self, cause: Cause) -> u64 {
        match cause {
            Cause::Connect => self.connect,
            Cause::Timeout => self.timeout,
            Cause::Interrupted => self.interrupted,
            Cause::ServerError => self.server_error,
            Cause::Throttled => self.throttled,
            Cause::CutOff => self.cut_off,
            Cause::BadResponse => self.bad_response,
            Cause::Unknown => self.unknown,
            Cause::NotFound => self.not_found,
            Cause::AlreadyExists => self.already_exists,
            Cause::Denied => self.denied,
            Cause::Unsupported => self.unsupported,
            Cause::Rejected => self.rejected,
            Cause::LocalIo => self.local_io,
        }
    }
}

/// A snapshot of a store's counters ([`crate::RemoteStore::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Request attempts sent (each retry counts); the sum of `by_op`.
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
    /// Request attempts by operation.
    pub by_op: RequestCounts,
    /// Failed request attempts by class and cause.
    pub errors: ErrorCounts,
}

/// The counters of one store, shared by all its clones and layers.
#[derive(Default)]
pub(crate) struct Stats {
    requests: [AtomicU64; OPS],
    errors: [AtomicU64; Cause::ALL.len()],
    retries: AtomicU64,
    damaged_reads: AtomicU64,
    resumed_reads: AtomicU64,
    resolved_by_read_back: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    pub(crate) fn request(&self, op: Op) {
        bump(&self.requests[op as usize], 1);
    }

    pub(crate) fn error(&self, cause: Cause) {
        bump(&self.errors[cause.index()], 1);
    }

    pub(crate) fn retry(&self) {
        bump(&self.retries, 1);
    }

    pub(crate) fn damaged_read(&self) {
        bump(&self.damaged_reads, 1);
    }

    pub(crate) fn resumed_read(&self) {
        bump(&self.resumed_reads, 1);
    }

    pub(crate) fn resolved_by_read_back(&self) {
        bump(&self.resolved_by_read_back, 1);
    }

    pub(crate) fn sent(&self, bytes: u64) {
        bump(&self.bytes_sent, bytes);
    }

    pub(crate) fn received(&self, bytes: u64) {
        bump(&self.bytes_received, bytes);
    }

    /// Counts `r`'s error, if it is one.
    fn outcome<T>(&self, r: object_store::Result<T>) -> object_store::Result<T> {
        if let Err(e) = &r {
            self.error(classify(e));
        }
        r
    }

    pub(crate) fn snapshot(&self) -> StoreStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let op = |o: Op| g(&self.requests[o as usize]);
        let by_op = RequestCounts {
            get: op(Op::Get),
            head: op(Op::Head),
            put: op(Op::Put),
            list: op(Op::List),
            delete: op(Op::Delete),
            copy: op(Op::Copy),
            create_multipart: op(Op::CreateMultipart),
            upload_part: op(Op::UploadPart),
            complete_multipart: op(Op::CompleteMultipart),
            abort_multipart: op(Op::AbortMultipart),
        };
        let cause = |c: Cause| g(&self.errors[c.index()]);
        let mut errors = ErrorCounts {
            connect: cause(Cause::Connect),
            timeout: cause(Cause::Timeout),
            interrupted: cause(Cause::Interrupted),
            server_error: cause(Cause::ServerError),
            throttled: cause(Cause::Throttled),
            cut_off: cause(Cause::CutOff),
            bad_response: cause(Cause::BadResponse),
            unknown: cause(Cause::Unknown),
            not_found: cause(Cause::NotFound),
            already_exists: cause(Cause::AlreadyExists),
            denied: cause(Cause::Denied),
            unsupported: cause(Cause::Unsupported),
            rejected: cause(Cause::Rejected),
            local_io: cause(Cause::LocalIo),
            ..Default::default()
        };
        for c in Cause::ALL {
            if c.is_transient() {
                errors.transient += errors.of(c);
            } else {
                errors.permanent += errors.of(c);
            }
        }
        StoreStats {
            requests: self.requests.iter().map(g).sum(),
            retries: g(&self.retries),
            damaged_reads: g(&self.damaged_reads),
            resumed_reads: g(&self.resumed_reads),
            resolved_by_read_back: g(&self.resolved_by_read_back),
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
            by_op,
            errors,
        }
    }
}

/// The statistics layer; see the module documentation.
#[derive(Debug)]
pub(crate) struct StatsStore {
    inner: Layer,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl std::fmt::Display for StatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StatsStore({})", self.inner.store)
    }
}

impl StatsStore {
    /// `inner` (and its multipart side, if any) with statistics in `stats`.
    pub(crate) fn wrap(inner: Layer, stats: Arc<Stats>) -> Layer {
        let has_multipart = inner.multipart.is_some();
        Layer::of(Arc::new(Self { inner, stats }), has_multipart)
    }

    fn multipart(&self) -> object_store::Result<&Arc<dyn MultipartStore>> {
        self.inner
            .multipart
            .as_ref()
            .ok_or_else(|| no_multipart("StatsStore"))
    }

    fn counted_list(
        &self,
        s: BoxStream<'static, object_store::Result<ObjectMeta>>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.stats.request(Op::List);
        let stats = Arc::clone(&self.stats);
        s.map(move |r| stats.outcome(r)).boxed()
    }
}

/// A GET body that counts the bytes it delivers, its error, and a cut-off end.
struct CountedBody {
    inner: BoxStream<'static, object_store::Result<Bytes>>,
    stats: Arc<Stats>,
    expected: u64,
    received: u64,
    ended: bool,
}

impl Stream for CountedBody {
    type Item = object_store::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let item = std::task::ready!(self.inner.poll_next_unpin(cx));
        match &item {
            Some(Ok(b)) => {
                self.received += b.len() as u64;
                self.stats.received(b.len() as u64);
            }
            Some(Err(e)) => {
                self.ended = true;
                self.stats.error(classify(e));
            }
            None => {
                self.ended = true;
                if self.received < self.expected {
                    self.stats.error(Cause::CutOff);
                }
            }
        }
        Poll::Ready(item)
    }
}

#[async_trait]
impl ObjectStore for StatsStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.stats.request(Op::Put);
        self.stats.sent(payload.content_length() as u64);
        let r = self.inner.store.put_opts(location, payload, opts).await;
        self.stats.outcome(r)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.stats.request(Op::CreateMultipart);
        let r = self.inner.store.put_multipart_opts(location, opts).await;
        let upload = self.stats.outcome(r)?;
        Ok(Box::new(StatsUpload {
            inner: upload,
            stats: Arc::clone(&self.stats),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let head = options.head;
        self.stats.request(if head { Op::Head } else { Op::Get });
        let r = self.inner.store.get_opts(location, options).await;
        let r = self.stats.outcome(r)?;
        if head {
            return Ok(r);
        }
        let stats = Arc::clone(&self.stats);
        Ok(crate::local::map_body(r, |inner, range| {
            CountedBody {
                inner,
                stats,
                expected: range.end.saturating_sub(range.start),
                received: 0,
                ended: false,
            }
            .boxed()
        }))
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.stats.request(Op::Get);
        let r = self.inner.store.get_ranges(location, ranges).await;
        let got = self.stats.outcome(r)?;
        self.stats
            .received(got.iter().map(|b| b.len() as u64).sum::<u64>());
        Ok(got)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let inner = Arc::clone(&self.inner.store);
        let stats = Arc::clone(&self.stats);
        // A batch is one request (one `DeleteObjects` on S3); each key's failure counts.
        crate::batch::batched(locations, move |paths| {
            let (inner, stats) = (Arc::clone(&inner), Arc::clone(&stats));
            async move {
                stats.request(Op::Delete);
                crate::batch::forward(&inner, paths)
                    .await
                    .into_iter()
                    .map(|r| stats.outcome(r))
                    .collect()
            }
        })
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.counted_list(self.inner.store.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.counted_list(self.inner.store.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.stats.request(Op::List);
        let r = self.inner.store.list_with_delimiter(prefix).await;
        self.stats.outcome(r)
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.stats.request(Op::Copy);
        let r = self.inner.store.copy_opts(from, to, options).await;
        self.stats.outcome(r)
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.stats.request(Op::Copy);
        let r = self.inner.store.rename_opts(from, to, options).await;
        self.stats.outcome(r)
    }
}

#[async_trait]
impl MultipartStore for StatsStore {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        let mp = self.multipart()?;
        self.stats.request(Op::CreateMultipart);
        let r = mp.create_multipart(path).await;
        self.stats.outcome(r)
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        let mp = self.multipart()?;
        self.stats.request(Op::UploadPart);
        self.stats.sent(data.content_length() as u64);
        let r = mp.put_part(path, id, part_idx, data).await;
        self.stats.outcome(r)
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        let mp = self.multipart()?;
        self.stats.request(Op::CompleteMultipart);
        let r = mp.complete_multipart(path, id, parts).await;
        self.stats.outcome(r)
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        let mp = self.multipart()?;
        self.stats.request(Op::AbortMultipart);
        let r = mp.abort_multipart(path, id).await;
        self.stats.outcome(r)
    }
}

/// A multipart upload through the `ObjectStore` API, counted part by part.
#[derive(Debug)]
struct StatsUpload {
    inner: Box<dyn MultipartUpload>,
    stats: Arc<Stats>,
}

#[async_trait]
impl MultipartUpload for StatsUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let stats = Arc::clone(&self.stats);
        let len = data.content_length() as u64;
        let part = self.inner.put_part(data);
        Box::pin(async move {
            stats.request(Op::UploadPart);
            stats.sent(len);
            stats.outcome(part.await)
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.stats.request(Op::CompleteMultipart);
        let r = self.inner.complete().await;
        self.stats.outcome(r)
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.stats.request(Op::AbortMultipart);
        let r = self.inner.abort().await;
        self.stats.outcome(r)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn requests_errors_bytes_and_cut_offs_are_counted() {
        let stats = Arc::new(Stats::default());
        let mem = Arc::new(InMemory::new());
        let layer = StatsStore::wrap(Layer::of(mem.clone(), true), Arc::clone(&stats));
        let p = Path::from("a/b");
        layer
            .store
            .put(&p, Bytes::from_static(b"hello").into())
            .await
            .unwrap();
        let got = layer.store.get(&p).await.unwrap().bytes().await.unwrap();
        assert_eq!(got, "hello");
        assert!(layer.store.head(&Path::from("none")).await.is_err());
        let mp = layer.multipart.as_ref().unwrap();
        let id = mp.create_multipart(&p).await.unwrap();
        mp.put_part(&p, &id, 0, Bytes::from_static(b"xy").into())
            .await
            .unwrap();
        let s = stats.snapshot();
        assert_eq!(
            (s.by_op.put, s.by_op.get, s.by_op.head, s.by_op.upload_part),
            (1, 1, 1, 1)
        );
        assert_eq!(s.requests, 5);
        assert_eq!((s.bytes_sent, s.bytes_received), (7, 5));
        assert_eq!((s.errors.not_found, s.errors.permanent), (1, 1));

        // A body that ends early counts as a cut-off error.
        let short = CountedBody {
            inner: futures::stream::once(async { Ok(Bytes::from_static(b"abc")) }).boxed(),
            stats: Arc::clone(&stats),
            expected: 10,
            received: 0,
            ended: false,
        };
        let _: Vec<_> = short.collect().await;
        let s = stats.snapshot();
        assert_eq!((s.errors.cut_off, s.errors.transient), (1, 1));
    }
}
