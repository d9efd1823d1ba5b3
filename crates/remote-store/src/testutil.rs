//! Helpers shared by the unit tests.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use async_trait::async_trait;
use cairn_core::blob::encode_blob;
use cairn_core::{BlobKind, BlobRef};
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::classify::Cause;
use crate::{RemoteStore, StoreConfig};

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub(crate) fn fast_cfg() -> StoreConfig {
    StoreConfig {
        multipart_threshold: 1 << 20,
        part_size: 5 << 20,
        part_concurrency: 3,
        retry_max_attempts: 30,
        retry_initial_backoff_ms: 1,
        retry_max_backoff_ms: 5,
        ..Default::default()
    }
}

pub(crate) fn staged(
    dir: &std::path::Path,
    payload: &[u8],
) -> (std::path::PathBuf, BlobRef, Vec<u8>) {
    let (obj, r) = encode_blob(BlobKind::Segment, payload);
    let f = dir.join(format!("blob-{:x}", r.crc64));
    std::fs::write(&f, &obj).unwrap();
    (f, r, obj)
}

pub(crate) async fn roundtrip(store: &RemoteStore, size: usize) {
    let payload: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let (obj, r) = encode_blob(BlobKind::Segment, &payload);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("blob");
    std::fs::write(&f, &obj).unwrap();
    store.put_blob_file("a/b", &f, &r).await.unwrap();
    assert_eq!(store.head("a/b").await.unwrap(), Some(obj.len() as u64));
    let mut back = vec![0u8; size];
    store
        .get_blob("a/b", &r, |off, p| {
            back[off as usize..off as usize + p.len()].copy_from_slice(p);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(back, payload);
}

/// Lists its inner store, failing once after the first entry of the first listing.
#[derive(Debug)]
pub(crate) struct FlakyList {
    inner: Arc<dyn ObjectStore>,
    failed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Display for FlakyList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlakyList")
    }
}

#[async_trait]
impl ObjectStore for FlakyList {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let all = self.inner.list(prefix);
        if self.failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return all;
        }
        let cut = crate::classify::TransientFault::error(
            "FlakyList",
            Cause::Interrupted,
            "listing cut off".into(),
        );
        all.take(1)
            .chain(futures::stream::once(async move { Err(cut) }))
            .boxed()
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

impl FlakyList {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            failed: false.into(),
        }
    }
}
