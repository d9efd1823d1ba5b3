//! The limits layer: request concurrency and bandwidth, store-wide.
//!
//! Contract: [`LimitStore`] makes every request take a permit from one semaphore
//! (`max_concurrent_requests`) before it is sent and hold it until it is done, a GET or a
//! listing until its body or stream is finished or dropped; and every payload byte sent
//! (PUT, part) first takes a token from the upload limiter, every body byte received one
//! from the download limiter (`upload_bytes_per_sec`, `download_bytes_per_sec`; token
//! buckets with one second of burst). All clones of a store share one [`Limits`], so a
//! checkpoint and a restore in one process together stay under them. `0` means unlimited
//! and costs nothing. Part-level uploads (`MultipartStore`) and parts of an `ObjectStore`
//! multipart upload take a permit and tokens each.
//!
//! Place in the stack: inside the retry layer, so a retry takes a new permit and a retry
//! sleeping through its backoff holds none (it never blocks other requests); outside the
//! statistics layer, so a request is counted when it is sent, not while it queues. Upload
//! tokens are taken before the permit, so a throttled upload does not hold a request slot.
//!
//! Crash, retries, cancellation: no state survives a crash; this layer never retries;
//! dropping a future or a body releases its permit, and tokens already taken are not
//! returned (the limiter may then be slightly conservative).

use std::num::NonZeroU32;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::stack::{no_multipart, Layer};
use crate::StoreConfig;

/// Shared limits of one store.
pub(crate) struct Limits {
    requests: Option<Arc<Semaphore>>,
    upload: Option<Bandwidth>,
    download: Option<Bandwidth>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("requests", &self.requests.is_some())
            .field("upload", &self.upload.as_ref().map(|b| b.burst))
            .field("download", &self.download.as_ref().map(|b| b.burst))
            .finish()
    }
}

impl Limits {
    pub(crate) fn new(cfg: &StoreConfig) -> Self {
        Self {
            requests: (cfg.max_concurrent_requests > 0)
                .then(|| Arc::new(Semaphore::new(cfg.max_concurrent_requests))),
            upload: Bandwidth::new(cfg.upload_bytes_per_sec),
            download: Bandwidth::new(cfg.download_bytes_per_sec),
        }
    }

    /// A request slot (or `None` when requests are unlimited).
    async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        match &self.requests {
            // The semaphore is never closed, so acquiring only fails if it were.
            Some(s) => Arc::clone(s).acquire_owned().await.ok(),
            None => None,
        }
    }

    /// Waits until `bytes` may be sent.
    async fn upload(&self, bytes: u64) {
        if let Some(b) = &self.upload {
            b.take(bytes).await;
        }
    }

    /// Waits until `bytes` more may be received.
    async fn download(&self, bytes: u64) {
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

/// The limits layer; see the module documentation.
#[derive(Debug)]
pub(crate) struct LimitStore {
    inner: Layer,
    limits: Arc<Limits>,
}

impl std::fmt::Display for LimitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LimitStore({})", self.inner.store)
    }
}

impl LimitStore {
    /// `inner` (and its multipart side, if any) under `limits`.
    pub(crate) fn wrap(inner: Layer, limits: Limits) -> Layer {
        let has_multipart = inner.multipart.is_some();
        let limits = Arc::new(limits);
        Layer::of(Arc::new(Self { inner, limits }), has_multipart)
    }

    fn multipart(&self) -> object_store::Result<&Arc<dyn MultipartStore>> {
        self.inner
            .multipart
            .as_ref()
            .ok_or_else(|| no_multipart("LimitStore"))
    }

    /// The stream `make` opens, opened under a permit held for the stream's life.
    fn permitted<T: Send + 'static>(
        &self,
        make: impl FnOnce() -> BoxStream<'static, T> + Send + 'static,
    ) -> BoxStream<'static, T> {
        let limits = Arc::clone(&self.limits);
        futures::stream::once(async move {
            let permit = limits.permit().await;
            make().map(move |item| {
                let _held = &permit;
                item
            })
        })
        .flatten()
        .boxed()
    }
}

#[async_trait]
impl ObjectStore for LimitStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.limits.upload(payload.content_length() as u64).await;
        let _permit = self.limits.permit().await;
        self.inner.store.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let upload = {
            let _permit = self.limits.permit().await;
            self.inner.store.put_multipart_opts(location, opts).await?
        };
        Ok(Box::new(LimitUpload {
            inner: upload,
            limits: Arc::clone(&self.limits),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let head = options.head;
        let permit = self.limits.permit().await;
        let r = self.inner.store.get_opts(location, options).await?;
        if head {
            return Ok(r);
        }
        let limits = Arc::clone(&self.limits);
        Ok(crate::local::map_body(r, |body, _| {
            body.then(move |item| {
                let limits = Arc::clone(&limits);
                // The permit lives as long as the body does.
                let _held = &permit;
                async move {
                    if let Ok(b) = &item {
                        limits.download(b.len() as u64).await;
                    }
                    item
                }
            })
            .boxed()
        }))
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let got = {
            let _permit = self.limits.permit().await;
            self.inner.store.get_ranges(location, ranges).await?
        };
        self.limits
            .download(got.iter().map(|b| b.len() as u64).sum())
            .await;
        Ok(got)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let inner = Arc::clone(&self.inner.store);
        let limits = Arc::clone(&self.limits);
        // One permit per batch: the batch is one request.
        crate::batch::batched(locations, move |paths| {
            let (inner, limits) = (Arc::clone(&inner), Arc::clone(&limits));
            async move {
                let _permit = limits.permit().await;
                crate::batch::forward(&inner, paths).await
            }
        })
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let (inner, prefix) = (Arc::clone(&self.inner.store), prefix.cloned());
        self.permitted(move || inner.list(prefix.as_ref()))
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
        self.permitted(move || inner.list_with_offset(prefix.as_ref(), &offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let _permit = self.limits.permit().await;
        self.inner.store.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let _permit = self.limits.permit().await;
        self.inner.store.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        let _permit = self.limits.permit().await;
        self.inner.store.rename_opts(from, to, options).await
    }
}

#[async_trait]
impl MultipartStore for LimitStore {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        let mp = self.multipart()?;
        let _permit = self.limits.permit().await;
        mp.create_multipart(path).await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        let mp = self.multipart()?;
        self.limits.upload(data.content_length() as u64).await;
        let _permit = self.limits.permit().await;
        mp.put_part(path, id, part_idx, data).await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        let mp = self.multipart()?;
        let _permit = self.limits.permit().await;
        mp.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        let mp = self.multipart()?;
        let _permit = self.limits.permit().await;
        mp.abort_multipart(path, id).await
    }
}

/// A multipart upload through the `ObjectStore` API under the store's limits, part by part.
#[derive(Debug)]
struct LimitUpload {
    inner: Box<dyn MultipartUpload>,
    limits: Arc<Limits>,
}

#[async_trait]
impl MultipartUpload for LimitUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let limits = Arc::clone(&self.limits);
        let len = data.content_length() as u64;
        let part = self.inner.put_part(data);
        Box::pin(async move {
            limits.upload(len).await;
            let _permit = limits.permit().await;
            part.await
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let _permit = self.limits.permit().await;
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        let _permit = self.limits.permit().await;
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;
    use std::time::{Duration, Instant};

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
        assert!(tokio::time::timeout(Duration::from_millis(50), l.permit())
            .await
            .is_err());
        drop(a);
        assert!(l.permit().await.is_some());
    }

    #[tokio::test]
    async fn a_streamed_body_holds_its_permit_until_it_is_dropped() {
        let cfg = StoreConfig {
            max_concurrent_requests: 1,
            ..Default::default()
        };
        let layer = LimitStore::wrap(
            Layer::of(Arc::new(InMemory::new()), true),
            Limits::new(&cfg),
        );
        let p = Path::from("k");
        layer
            .store
            .put(&p, Bytes::from_static(b"body").into())
            .await
            .unwrap();
        let body = layer.store.get(&p).await.unwrap();
        let blocked = tokio::time::timeout(Duration::from_millis(50), layer.store.head(&p));
        assert!(blocked.await.is_err());
        assert_eq!(body.bytes().await.unwrap(), "body");
        layer.store.head(&p).await.unwrap();
    }
}
