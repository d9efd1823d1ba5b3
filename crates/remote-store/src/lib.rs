//! The object store seam: the only crate that knows `object_store`.
//!
//! Contract: [`RemoteStore`] turns a URL (`file:///abs/dir`, `s3://bucket/prefix`,
//! `memory://name`) into a store rooted at that location and offers exactly the operations
//! Cairn needs: streamed blob upload that re-verifies the staged bytes while sending them,
//! verified blob reads that recompute the CRC64-NVME of every byte received, conditional
//! create for manifests, head, list and delete.
//!
//! Crash behaviour: every write is a single object put (local: write to a temporary file,
//! fsync, link/rename into place; S3: single PUT or multipart upload completed at the end),
//! so a crash leaves either no object or the whole object, plus at worst an abandoned
//! temporary file or multipart upload that never becomes visible under the key.
//!
//! Retries: HTTP stores use `object_store`'s own retry with backoff for transient failures;
//! errors say whether they are worth retrying ([`StoreError::is_retryable`]).
//!
//! Cancellation: every operation is a future; dropping it abandons the request, and an
//! abandoned multipart upload is never completed, so nothing partial is published.

mod error;

use std::collections::HashMap;
use std::path::Path as FsPath;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use cairn_core::blob::{BlobDecoder, DecodedBlob};
use cairn_core::BlobRef;
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;

pub use error::StoreError;

/// Tunables of a store. The defaults suit S3 and a local directory alike.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Blobs larger than this are uploaded as multipart uploads.
    pub multipart_threshold: u64,
    /// Multipart part size (S3 requires at least 5 MiB for all but the last part).
    pub part_size: usize,
    /// Parts of one upload in flight at once.
    pub part_concurrency: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            multipart_threshold: 16 * 1024 * 1024,
            part_size: 8 * 1024 * 1024,
            part_concurrency: 4,
        }
    }
}

/// Outcome of a conditional create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The object was created by this call.
    Created,
    /// An object already existed under the key; nothing was written.
    AlreadyExists,
}

/// An object listed under a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Key relative to the store root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// A store rooted at a prefix, shared cheaply by cloning.
#[derive(Clone)]
pub struct RemoteStore {
    inner: Arc<dyn ObjectStore>,
    root: String,
    describe: String,
    cfg: StoreConfig,
    /// For `file://` stores: the directory, so staged blobs can be published by hard link
    /// instead of a second copy.
    local_root: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("store", &self.describe)
            .finish()
    }
}

fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(|| Mutex::new(HashMap::new()))
}

fn is_loopback(endpoint: &str) -> bool {
    url::Url::parse(endpoint)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .is_some_and(|h| h == "127.0.0.1" || h == "localhost" || h == "[::1]" || h == "::1")
}

impl RemoteStore {
    /// Opens the store a URL names, with default tunables.
    ///
    /// * `file:///abs/dir`: a local directory (created if missing), fsynced writes.
    /// * `s3://bucket/prefix`: endpoint, region and credentials from the standard `AWS_*`
    ///   environment variables; plain http is allowed for a loopback endpoint.
    /// * `memory://name`: an in-process store shared by every open of the same name (tests).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, StoreConfig::default())
    }

    /// Opens a store with explicit tunables.
    pub fn open_with(url: &str, cfg: StoreConfig) -> Result<Self, StoreError> {
        let parsed = url::Url::parse(url).map_err(|e| StoreError::BadUrl {
            url: redact(url),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| StoreError::BadUrl {
            url: redact(url),
            reason,
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad(
                "credentials do not belong in the URL; use the AWS_* environment variables".into(),
            ));
        }
        let describe = redact(url);
        match parsed.scheme() {
            "file" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(bad(
                        "a file URL needs an absolute path: file:///abs/dir".into()
                    ));
                }
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| bad("not an absolute local path".into()))?;
                std::fs::create_dir_all(&dir).map_err(|e| StoreError::Io {
                    op: "create store directory",
                    path: dir.display().to_string(),
                    source: e,
                })?;
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?
                    .with_fsync(true);
                let mut store = Self::from_object_store(Arc::new(fs), "", describe, cfg);
                store.local_root = Some(dir);
                Ok(store)
            }
            "s3" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| bad("missing bucket: s3://bucket/prefix".into()))?;
                let prefix = parsed.path().trim_matches('/').to_string();
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(false);
                let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
                if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
                    builder = builder.with_region("us-east-1");
                }
                if let Some(ep) = env("AWS_ENDPOINT_URL_S3")
                    .or_else(|| env("AWS_ENDPOINT_URL"))
                    .or_else(|| env("AWS_ENDPOINT"))
                {
                    if is_loopback(&ep) && ep.starts_with("http://") {
                        // Set after any client options: plain http only for a loopback server.
                        builder = builder.with_allow_http(true);
                    }
                    builder = builder.with_endpoint(ep);
                }
                let s3 = builder.build().map_err(|e| bad(redact(&e.to_string())))?;
                Ok(Self::from_object_store(
                    Arc::new(s3),
                    &prefix,
                    describe,
                    cfg,
                ))
            }
            "memory" => {
                let name = parsed.host_str().unwrap_or_default().to_string();
                let mut stores = memory_stores()
                    .lock()
                    .map_err(|_| bad("memory store registry poisoned".into()))?;
                let mem = stores
                    .entry(name)
                    .or_insert_with(|| Arc::new(InMemory::new()))
                    .clone();
                Ok(Self::from_object_store(mem, "", describe, cfg))
            }
            other => Err(bad(format!(
                "unsupported scheme {other:?} (use file://, s3:// or memory://)"
            ))),
        }
    }

    /// Wraps an existing `object_store` implementation (fault injection, tests).
    pub fn from_object_store(
        inner: Arc<dyn ObjectStore>,
        root: &str,
        describe: impl Into<String>,
        cfg: StoreConfig,
    ) -> Self {
        Self {
            inner,
            root: root.trim_matches('/').to_string(),
            describe: describe.into(),
            cfg,
            local_root: None,
        }
    }

    /// A human description of the store (URL without credentials).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn path(&self, key: &str) -> Path {
        if self.root.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.root))
        }
    }

    fn rel(&self, p: &Path) -> String {
        let s = p.as_ref();
        if self.root.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&self.root)
                .map(|r| r.trim_start_matches('/').to_string())
                .unwrap_or_else(|| s.to_string())
        }
    }

    fn err(&self, op: &'static str, key: &str, e: object_store::Error) -> StoreError {
        StoreError::backend(op, key, &self.describe, e)
    }

    /// Size of the object, or `None` if it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self.inner.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("head", key, e)),
        }
    }

    /// Writes a small object, replacing any existing one.
    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.inner
            .put(&self.path(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.err("put", key, e))
    }

    /// Creates an object only if none exists under `key` (the store decides atomically).
    pub async fn create_if_absent(
        &self,
        key: &str,
        bytes: Bytes,
    ) -> Result<CreateOutcome, StoreError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&self.path(key), PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => Ok(CreateOutcome::Created),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(CreateOutcome::AlreadyExists),
            Err(e) => Err(self.err("conditional create", key, e)),
        }
    }

    /// Reads a whole (small) object.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, StoreError> {
        let res = self
            .inner
            .get(&self.path(key))
            .await
            .map_err(|e| self.err("get", key, e))?;
        res.bytes().await.map_err(|e| self.err("get", key, e))
    }

    /// Uploads a staged blob file to `key`, re-verifying its header, footer and digests
    /// against `expected` while the bytes stream out; a mismatch aborts the upload so
    /// nothing unverified becomes visible. Large files go up as multipart uploads with at
    /// most `part_concurrency` parts of `part_size` bytes in memory.
    pub async fn put_blob_file(
        &self,
        key: &str,
        file: &FsPath,
        expected: &BlobRef,
    ) -> Result<(), StoreError> {
        let io = |op: &'static str| {
            let path = file.display().to_string();
            move |e| StoreError::Io {
                op,
                path,
                source: e,
            }
        };
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(io("open staged blob"))?;
        let size = f.metadata().await.map_err(io("stat staged blob"))?.len();
        if size != expected.object_len() {
            return Err(StoreError::Corrupt(cairn_core::CoreError::CorruptBlob {
                name: file.display().to_string(),
                reason: format!(
                    "staged file has {size} bytes, expected {}",
                    expected.object_len()
                ),
            }));
        }
        let mut decoder = BlobDecoder::new(file.display().to_string(), Some(*expected));
        if let Some(root) = &self.local_root {
            return self.link_blob_file(root, key, file, decoder).await;
        }
        if size <= self.cfg.multipart_threshold {
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            f.read_to_end(&mut buf)
                .await
                .map_err(io("read staged blob"))?;
            decoder.push(&buf)?;
            decoder.finish()?;
            return self.put_bytes(key, Bytes::from(buf)).await;
        }
        let path = self.path(key);
        let upload = self
            .inner
            .put_multipart(&path)
            .await
            .map_err(|e| self.err("multipart put", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.cfg.part_size);
        let mut buf = vec![0u8; self.cfg.part_size.min(4 * 1024 * 1024)];
        let result: Result<(), StoreError> = async {
            loop {
                let n = f.read(&mut buf).await.map_err(io("read staged blob"))?;
                if n == 0 {
                    break;
                }
                decoder.push(&buf[..n])?;
                writer
                    .wait_for_capacity(self.cfg.part_concurrency)
                    .await
                    .map_err(|e| self.err("multipart put", key, e))?;
                writer.write(&buf[..n]);
            }
            Ok(())
        }
        .await;
        let verified = result.and_then(|()| decoder.finish().map(|_| ()).map_err(StoreError::from));
        match verified {
            Ok(()) => writer
                .finish()
                .await
                .map(|_| ())
                .map_err(|e| self.err("multipart put", key, e)),
            Err(e) => {
                // Best effort: the upload is invisible whether or not the abort reaches the store.
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Local-directory publication of a staged blob: re-verify it, hard-link it into the
    /// store under a temporary name, fsync, then rename into place (atomic, and a
    /// concurrent identical publication is harmless: same name, same bytes).
    async fn link_blob_file(
        &self,
        root: &FsPath,
        key: &str,
        file: &FsPath,
        mut decoder: BlobDecoder,
    ) -> Result<(), StoreError> {
        let io = |op: &'static str, p: &FsPath| {
            let path = p.display().to_string();
            move |e| StoreError::Io {
                op,
                path,
                source: e,
            }
        };
        let (src, dest) = (file.to_path_buf(), root.join(key));
        let tmp = dest.with_extension(format!("link-{:016x}", rand::random::<u64>()));
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let f = std::fs::File::open(&src).map_err(io("open staged blob", &src))?;
            read_chunks(&f, &src, |piece| {
                decoder.push(piece).map(|_| ()).map_err(StoreError::from)
            })?;
            decoder.finish()?;
            let parent = dest.parent().unwrap_or(FsPath::new("/")).to_path_buf();
            std::fs::create_dir_all(&parent).map_err(io("create store directory", &parent))?;
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(&src, &tmp).is_err() {
                // Another filesystem (or no link support): copy instead.
                std::fs::copy(&src, &tmp).map_err(io("copy staged blob into store", &tmp))?;
                std::fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(io("fsync blob", &tmp))?;
            }
            std::fs::rename(&tmp, &dest).map_err(io("rename blob into place", &dest))?;
            std::fs::File::open(&parent)
                .and_then(|d| d.sync_all())
                .map_err(io("fsync store directory", &parent))
        })
        .await
        .map_err(|e| StoreError::Io {
            op: "publish staged blob",
            path: file.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?
    }

    /// Streams the blob at `key`, verifying it against `expected`, and hands each payload
    /// piece with its offset to `sink`. Fails, naming the key, on any mismatch; the sink may
    /// have received bytes by then, so callers write into scratch or overwrite on retry.
    pub async fn get_blob<F>(
        &self,
        key: &str,
        expected: &BlobRef,
        mut sink: F,
    ) -> Result<DecodedBlob, StoreError>
    where
        F: FnMut(u64, &[u8]) -> std::io::Result<()>,
    {
        let res = self
            .inner
            .get(&self.path(key))
            .await
            .map_err(|e| self.err("get", key, e))?;
        if res.meta.size != expected.object_len() {
            return Err(StoreError::WrongSize {
                key: key.to_string(),
                store: self.describe.clone(),
                expected: expected.object_len(),
                actual: res.meta.size,
            });
        }
        let mut decoder = BlobDecoder::new(key, Some(*expected));
        let mut offset = 0u64;
        if let object_store::GetResultPayload::File(file, path) = res.payload {
            // Local files: large reads on a blocking thread instead of 8 KiB stream pieces.
            let mut file = Some(file);
            loop {
                let Some(f) = file.take() else { break };
                let p = path.clone();
                let (f, piece) = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; LOCAL_READ];
                    let n = read_full(&f, &mut buf).map_err(|e| StoreError::Io {
                        op: "read blob",
                        path: p.display().to_string(),
                        source: e,
                    })?;
                    buf.truncate(n);
                    Ok::<_, StoreError>((f, buf))
                })
                .await
                .map_err(|e| StoreError::Io {
                    op: "read blob",
                    path: key.to_string(),
                    source: std::io::Error::other(e.to_string()),
                })??;
                if piece.is_empty() {
                    break;
                }
                let payload = decoder.push(&piece)?;
                if !payload.is_empty() {
                    sink(offset, payload).map_err(|e| StoreError::Io {
                        op: "write restored bytes of",
                        path: key.to_string(),
                        source: e,
                    })?;
                    offset += payload.len() as u64;
                }
                file = Some(f);
            }
            return Ok(decoder.finish()?);
        }
        let mut stream = res.into_stream();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| self.err("get", key, e))?;
            let payload = decoder.push(&piece)?;
            if !payload.is_empty() {
                sink(offset, payload).map_err(|e| StoreError::Io {
                    op: "write restored bytes of",
                    path: key.to_string(),
                    source: e,
                })?;
                offset += payload.len() as u64;
            }
        }
        Ok(decoder.finish()?)
    }

    /// Lists every object under `prefix` (keys relative to the store root), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StoreError> {
        let p = self.path(prefix.trim_end_matches('/'));
        let mut stream = self.inner.list(Some(&p));
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(|e| self.err("list", prefix, e))?;
            out.push(Listed {
                key: self.rel(&meta.location),
                size: meta.size,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes an object; deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }
}

const LOCAL_READ: usize = 4 << 20;

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(mut f: &std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads a whole file in `LOCAL_READ` pieces.
fn read_chunks(
    f: &std::fs::File,
    path: &FsPath,
    mut each: impl FnMut(&[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut buf = vec![0u8; LOCAL_READ];
    loop {
        let n = read_full(f, &mut buf).map_err(|e| StoreError::Io {
            op: "read staged blob",
            path: path.display().to_string(),
            source: e,
        })?;
        if n == 0 {
            return Ok(());
        }
        each(&buf[..n])?;
    }
}

/// Removes any userinfo from a URL-like string so credentials never reach logs or errors.
pub fn redact(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(_) => s.to_string(),
        Err(_) => s.split('@').next_back().unwrap_or_default().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::blob::encode_blob;
    use cairn_core::BlobKind;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn roundtrip(store: &RemoteStore, size: usize) {
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

    #[test]
    fn file_store_single_and_multipart() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("s").display());
        let cfg = StoreConfig {
            multipart_threshold: 1 << 20,
            part_size: 5 << 20,
            part_concurrency: 2,
        };
        let store = RemoteStore::open_with(&url, cfg).unwrap();
        rt().block_on(async {
            roundtrip(&store, 1000).await;
            roundtrip(&store, (11 << 20) + 17).await;
            assert_eq!(store.list("a").await.unwrap().len(), 1);
        });
    }

    #[test]
    fn conditional_create_and_corrupt_reads() {
        let store = RemoteStore::open("memory://cc-test").unwrap();
        rt().block_on(async {
            let b = Bytes::from_static(b"x");
            assert_eq!(
                store.create_if_absent("m/1", b.clone()).await.unwrap(),
                CreateOutcome::Created
            );
            assert_eq!(
                store.create_if_absent("m/1", b).await.unwrap(),
                CreateOutcome::AlreadyExists
            );
            let (mut obj, r) = encode_blob(BlobKind::Base, b"hello");
            obj[33] ^= 1;
            store.put_bytes("blobs/x", Bytes::from(obj)).await.unwrap();
            let err = store
                .get_blob("blobs/x", &r, |_, _| Ok(()))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("blobs/x"), "{err}");
            let err = store
                .get_blob("blobs/none", &r, |_, _| Ok(()))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("blobs/none") && err.contains("not found"),
                "{err}"
            );
        });
    }

    #[test]
    fn staged_file_corruption_is_not_uploaded() {
        let store = RemoteStore::open("memory://staged-corrupt").unwrap();
        let (mut obj, r) = encode_blob(BlobKind::Base, &[7u8; 4096]);
        obj[100] ^= 1;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("blob");
        std::fs::write(&f, &obj).unwrap();
        rt().block_on(async {
            assert!(store.put_blob_file("k", &f, &r).await.is_err());
            assert_eq!(store.head("k").await.unwrap(), None);
        });
    }

    #[test]
    fn bad_urls_are_named_and_credentials_redacted() {
        for (u, want) in [
            ("ftp://x/y", "unsupported scheme"),
            ("s3://", "bucket"),
            ("not a url", "bad store URL"),
            ("file://host/x", "absolute"),
        ] {
            let e = RemoteStore::open(u).unwrap_err().to_string();
            assert!(e.contains(want), "{u}: {e}");
        }
        let e = RemoteStore::open("s3://AKIA:SECRET@bucket/p")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("SECRET") && !e.contains("AKIA"), "{e}");
    }
}
