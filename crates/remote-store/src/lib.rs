//! The object store seam: the only crate that knows `object_store`.
//!
//! Contract: [`RemoteStore`] turns a URL (`file:///abs/dir`, `s3://bucket/prefix`,
//! `memory://name`, and `fault+<url>?…` for tests) into a store rooted at that location and
//! offers exactly the operations Cairn needs: streamed blob upload that re-verifies the
//! staged bytes while sending them (multipart with bounded memory for large blobs), verified
//! blob reads that recompute the CRC64-NVME and XXH3-128 of every byte received, verified
//! range reads, conditional create for manifests, head, list and delete. S3 uploads carry a
//! transport checksum (`x-amz-checksum-crc64nvme` by default) that the server checks; the
//! payload's own CRC64-NVME travels in the blob footer and is recomputed on every read.
//!
//! Crash behaviour: every write is a single object put (local: write to a temporary file,
//! fsync, link/rename into place; S3: single PUT or multipart upload completed at the end),
//! so a crash leaves either no object or the whole object, plus at worst an abandoned
//! temporary file or multipart upload that never becomes visible under the key (S3 buckets
//! should expire incomplete uploads with a lifecycle rule).
//!
//! Retries: this crate is the one retry layer (`object_store`'s own HTTP retries are off by
//! default, [`StoreConfig::http_retries`]). Every request is retried on transient errors
//! (timeouts, connection resets, 5xx, throttling) with exponential backoff and jitter,
//! bounded by attempts and total time; permanent errors (not found, exists, precondition,
//! access denied, unsupported operation) are returned at once. A write whose response is lost is
//! resolved by reading back: a conditional create compares the bytes found with its own, a
//! multipart completion checks the object's size. A streamed read cut off by a transient
//! error resumes from the byte it reached; a blob whose bytes fail verification is read
//! again up to [`StoreConfig::verify_read_attempts`] times before it is reported corrupt.
//! Limits on concurrent requests and bandwidth apply to every attempt (see `limits`).
//!
//! Cancellation: every operation is a future; dropping it abandons the request (part uploads
//! run as tasks owned by the upload and are aborted with it), and an abandoned multipart
//! upload is never completed, so nothing partial is published.

mod config;
mod error;
pub mod fault;
mod limits;

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::path::Path as FsPath;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use bytes::Bytes;
use cairn_core::blob::{
    encode_footer, encode_header, BlobDecoder, DecodedBlob, FOOTER_LEN, HEADER_LEN,
};
use cairn_core::BlobRef;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, Checksum};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, GetOptions, GetRange, GetResultPayload, MultipartId,
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};

pub use config::{S3Settings, Secret, StoreConfig, TransportChecksum, CONFIG_ENV};
pub use error::StoreError;
pub use limits::StoreStats;

use fault::{FaultConfig, FaultStore};
use limits::{Counters, Limits};

/// Prefix of the probe objects [`RemoteStore::check_conditional_create`] writes (and removes).
pub const PROBE_PREFIX: &str = "_cairn/probe-";

/// S3 allows at most this many parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;

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

/// A store rooted at a prefix, shared cheaply by cloning (clones share limits and counters).
#[derive(Clone)]
pub struct RemoteStore {
    inner: Arc<dyn ObjectStore>,
    /// Part-level multipart API of the same store (S3, memory): lets a failed part be
    /// retried on its own instead of restarting the whole upload.
    multipart: Option<Arc<dyn MultipartStore>>,
    root: String,
    describe: String,
    cfg: Arc<StoreConfig>,
    /// For `file://` stores: the directory, so staged blobs can be published by hard link
    /// instead of a second copy.
    local_root: Option<std::path::PathBuf>,
    limits: Arc<Limits>,
    /// Credential values to scrub from every error (config and `AWS_*` environment).
    secrets: Arc<Vec<String>>,
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

fn env_var(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn env_bool(k: &str) -> Option<bool> {
    env_var(k).map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// What a URL opens to, before limits and retries are put around it.
struct Backend {
    inner: Arc<dyn ObjectStore>,
    multipart: Option<Arc<dyn MultipartStore>>,
    root: String,
    describe: String,
    local_root: Option<std::path::PathBuf>,
}

/// Exponential backoff with jitter, bounded by attempts and total time.
struct RetryState {
    delays: ExponentialBackoff,
    started: Instant,
    attempts: u32,
    max_attempts: u32,
    total: Duration,
}

impl RetryState {
    /// After a failed attempt: how long to wait before the next, or `None` when the
    /// attempts or the time are used up.
    fn next_delay(&mut self) -> Option<Duration> {
        if self.attempts >= self.max_attempts {
            return None;
        }
        let d = self.delays.next()?;
        if self.started.elapsed() + d > self.total {
            return None;
        }
        self.attempts += 1;
        Some(d)
    }
}

/// Whether a store error is a transient failure of one request.
fn transient(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Backend {
            retryable: true,
            ..
        }
    )
}

/// A cut-off or otherwise damaged response, as a transient backend error.
fn short_read(what: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "cairn",
        source: what.into(),
    }
}

impl RemoteStore {
    /// Opens the store a URL names, with the tunables of `$CAIRN_STORE_CONFIG` (a TOML or
    /// JSON file, see [`StoreConfig::from_file`]) or the defaults.
    ///
    /// * `file:///abs/dir`: a local directory (created if missing), fsynced writes.
    /// * `s3://bucket/prefix`: endpoint, region and credentials from the config file's `[s3]`
    ///   table, else the standard `AWS_*` environment variables; path-style requests unless
    ///   `virtual_hosted`; plain http is allowed for a loopback endpoint or with `allow_http`.
    /// * `memory://name`: an in-process store shared by every open of the same name (tests).
    /// * `fault+<url>?transient=0.1&seed=7&…`: `<url>` behind a [`FaultStore`] (tests; see
    ///   [`fault::parse_fault_query`] for the parameters).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, StoreConfig::from_env()?)
    }

    /// Opens a store with explicit tunables.
    pub fn open_with(url: &str, cfg: StoreConfig) -> Result<Self, StoreError> {
        if let Some(rest) = url.strip_prefix("fault+") {
            let bad = |reason: String| StoreError::BadUrl {
                url: redact(url),
                reason,
            };
            let mut parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
            let fault = fault::parse_fault_query(parsed.query_pairs()).map_err(bad)?;
            parsed.set_query(None);
            let inner_url = parsed
                .as_str()
                .strip_prefix("fault+")
                .map(str::to_string)
                .unwrap_or_else(|| rest.to_string());
            let (store, _) = Self::open_faulty(&inner_url, cfg, fault)?;
            return Ok(store);
        }
        let b = open_backend(url, &cfg)?;
        let mut store = Self::from_object_store(b.inner, &b.root, b.describe, cfg);
        store.multipart = b.multipart;
        store.local_root = b.local_root;
        Ok(store)
    }

    /// Opens `url` behind a [`FaultStore`] configured by `fault`; returns the store and the
    /// wrapper (for its counters). Local directories lose their hard-link fast path so that
    /// every write goes through the faults.
    pub fn open_faulty(
        url: &str,
        cfg: StoreConfig,
        fault: FaultConfig,
    ) -> Result<(Self, Arc<FaultStore>), StoreError> {
        let b = open_backend(url, &cfg)?;
        let mut f = FaultStore::new(b.inner, fault);
        if let Some(mp) = b.multipart {
            f = f.with_multipart(mp);
        }
        let f = Arc::new(f);
        let describe = format!("fault+{}", b.describe);
        let mut store = Self::from_object_store(f.clone(), &b.root, describe, cfg);
        if f.has_multipart() {
            store.multipart = Some(f.clone());
        }
        Ok((store, f))
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
            multipart: None,
            root: root.trim_matches('/').to_string(),
            describe: describe.into(),
            limits: Arc::new(Limits::new(&cfg)),
            secrets: Arc::new(known_credentials(&cfg)),
            cfg: Arc::new(cfg),
            local_root: None,
        }
    }

    /// Uploads large blobs through `multipart` (normally the same store as the inner
    /// `ObjectStore`), part by part, retrying a failed part on its own.
    pub fn with_multipart_store(mut self, multipart: Arc<dyn MultipartStore>) -> Self {
        self.multipart = Some(multipart);
        self
    }

    /// A human description of the store (URL without credentials).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The tunables in use.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// Counters of requests, retries, damaged reads and bytes moved, shared by all clones.
    pub fn stats(&self) -> StoreStats {
        self.limits.stats.snapshot()
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
        StoreError::backend_scrubbed(op, key, &self.describe, e, &self.secrets)
    }

    fn retry_state(&self) -> RetryState {
        let cfg = &self.cfg;
        let delays = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(cfg.retry_initial_backoff_ms))
            .with_max_delay(Duration::from_millis(
                cfg.retry_max_backoff_ms.max(cfg.retry_initial_backoff_ms),
            ))
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(cfg.retry_max_attempts.saturating_sub(1) as usize)
            .build();
        RetryState {
            delays,
            started: Instant::now(),
            attempts: 1,
            max_attempts: cfg.retry_max_attempts.max(1),
            total: Duration::from_millis(cfg.retry_total_ms),
        }
    }

    fn gave_up(
        &self,
        op: &'static str,
        key: &str,
        rs: &RetryState,
        last: StoreError,
    ) -> StoreError {
        tracing::warn!(
            op,
            key,
            store = %self.describe,
            attempts = rs.attempts,
            error = %last,
            "giving up after retries"
        );
        StoreError::RetriesExhausted {
            op,
            key: key.to_string(),
            store: self.describe.clone(),
            attempts: rs.attempts,
            elapsed_ms: u64::try_from(rs.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            last: Box::new(last),
        }
    }

    /// Waits before the next attempt, or says to give up (`None`).
    async fn backoff(
        &self,
        op: &'static str,
        key: &str,
        rs: &mut RetryState,
        e: &StoreError,
    ) -> bool {
        match rs.next_delay() {
            Some(d) => {
                Counters::bump(&self.limits.stats.retries);
                tracing::debug!(
                    op,
                    key,
                    store = %self.describe,
                    attempt = rs.attempts,
                    delay_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                    error = %e,
                    "retrying after a transient error"
                );
                tokio::time::sleep(d).await;
                true
            }
            None => false,
        }
    }

    /// Runs `attempt` until it succeeds, fails permanently, or the retry budget is spent.
    async fn retry<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        mut attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut rs = self.retry_state();
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) => {
                    if !self.backoff(op, key, &mut rs, &e).await {
                        return Err(self.gave_up(op, key, &rs, e));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One request under the store's concurrency limit.
    async fn request<T>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, StoreError> {
        let _permit = self.limits.permit().await;
        Counters::bump(&self.limits.stats.requests);
        fut.await.map_err(|e| self.err(op, key, e))
    }

    /// Size of the object, or `None` if it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let path = &self.path(key);
        let r = self
            .retry("head", key, || {
                self.request("head", key, self.inner.head(path))
            })
            .await;
        match r {
            Ok(meta) => Ok(Some(meta.size)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a small object, replacing any existing one.
    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = &self.path(key);
        let len = bytes.len() as u64;
        self.retry("put", key, || {
            let payload = PutPayload::from(bytes.clone());
            async move {
                self.limits.upload(len).await;
                self.request("put", key, self.inner.put(path, payload))
                    .await
            }
        })
        .await
        .map(|_| ())
    }

    /// Creates an object only if none exists under `key` (the store decides atomically).
    ///
    /// When an attempt fails in a way that may have happened after the object landed (its
    /// response was lost), the outcome is settled by reading the object back: our exact
    /// bytes mean the create took effect ([`CreateOutcome::Created`]; an identical create by
    /// someone else is indistinguishable and equivalent), other bytes mean someone else's
    /// object ([`CreateOutcome::AlreadyExists`]). Nothing is guessed: if the read-back
    /// fails too, the error is returned.
    pub async fn create_if_absent(
        &self,
        key: &str,
        bytes: Bytes,
    ) -> Result<CreateOutcome, StoreError> {
        let path = &self.path(key);
        let op = "conditional create";
        let mut rs = self.retry_state();
        let mut uncertain = false;
        loop {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            self.limits.upload(bytes.len() as u64).await;
            let r = self
                .request(
                    op,
                    key,
                    self.inner.put_opts(path, bytes.clone().into(), opts),
                )
                .await;
            match r {
                Ok(_) => return Ok(CreateOutcome::Created),
                Err(StoreError::AlreadyExists { .. }) if uncertain => {
                    return self.resolve_create(key, &bytes).await
                }
                Err(StoreError::AlreadyExists { .. }) => return Ok(CreateOutcome::AlreadyExists),
                Err(e) if transient(&e) => {
                    uncertain = true;
                    if !self.backoff(op, key, &mut rs, &e).await {
                        // Out of retries: one last look settles it if the object is there.
                        return match self.resolve_create(key, &bytes).await {
                            Ok(outcome) => Ok(outcome),
                            Err(_) => Err(self.gave_up(op, key, &rs, e)),
                        };
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn resolve_create(&self, key: &str, ours: &Bytes) -> Result<CreateOutcome, StoreError> {
        let existing = self.get_bytes(key).await?;
        Counters::bump(&self.limits.stats.resolved_by_read_back);
        let outcome = if existing == *ours {
            CreateOutcome::Created
        } else {
            CreateOutcome::AlreadyExists
        };
        tracing::info!(key, store = %self.describe, ?outcome, "conditional create settled by reading back");
        Ok(outcome)
    }

    /// Reads a whole (small) object; a body shorter than the object is read again.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = &self.path(key);
        self.retry("get", key, || async move {
            let _permit = self.limits.permit().await;
            Counters::bump(&self.limits.stats.requests);
            let res = self
                .inner
                .get(path)
                .await
                .map_err(|e| self.err("get", key, e))?;
            let size = res.meta.size;
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            let mut stream = res.into_stream();
            while let Some(piece) = stream.next().await {
                let piece = piece.map_err(|e| self.err("get", key, e))?;
                self.limits.download(piece.len() as u64).await;
                buf.extend_from_slice(&piece);
            }
            if buf.len() as u64 != size {
                Counters::bump(&self.limits.stats.damaged_reads);
                let what = format!("body ended after {} of {size} bytes", buf.len());
                return Err(self.err("get", key, short_read(what)));
            }
            Ok(Bytes::from(buf))
        })
        .await
    }

    /// Reads a whole (small) object and checks it with `verify` (e.g. a manifest's own
    /// checksum). Bytes that fail are read again, up to `verify_read_attempts` reads, since a
    /// damaged transfer heals on a re-read; then the last failure is returned as
    /// [`StoreError::Corrupt`].
    pub async fn get_bytes_verified<V>(&self, key: &str, mut verify: V) -> Result<Bytes, StoreError>
    where
        V: FnMut(&[u8]) -> Result<(), cairn_core::CoreError>,
    {
        let mut pass = 1;
        loop {
            let bytes = self.get_bytes(key).await?;
            match verify(&bytes) {
                Ok(()) => return Ok(bytes),
                Err(e) => {
                    Counters::bump(&self.limits.stats.damaged_reads);
                    if pass >= self.cfg.verify_read_attempts {
                        return Err(StoreError::Corrupt(e));
                    }
                    tracing::warn!(key, store = %self.describe, pass, error = %e, "object failed verification; reading it again");
                    pass += 1;
                }
            }
        }
    }

    /// Checks that the store honours conditional create, which publication depends on: a
    /// unique probe object under `_cairn/probe-<random>` is created twice with
    /// create-if-absent, and the second must be refused. The probe is removed afterwards.
    /// Skipped (with a warning) in single-writer mode ([`StoreConfig::single_writer`]).
    ///
    /// Fails with [`StoreError::ConditionalCreateUnsupported`] naming the store.
    pub async fn check_conditional_create(&self) -> Result<(), StoreError> {
        if self.cfg.single_writer {
            tracing::warn!(
                store = %self.describe,
                "single-writer mode: conditional create not checked; only one writer may publish"
            );
            return Ok(());
        }
        let key = format!("{PROBE_PREFIX}{:016x}", rand::random::<u64>());
        let unsupported = |reason: String| StoreError::ConditionalCreateUnsupported {
            store: self.describe.clone(),
            probe: key.clone(),
            reason,
        };
        let first = Bytes::from(format!("cairn conditional-create probe {key} (1)"));
        let second = Bytes::from(format!("cairn conditional-create probe {key} (2)"));
        let outcome = match self.create_if_absent(&key, first).await {
            Ok(CreateOutcome::Created) => match self.create_if_absent(&key, second).await {
                Ok(CreateOutcome::AlreadyExists) => Ok(()),
                Ok(CreateOutcome::Created) => Err(unsupported(
                    "a second create-if-absent of the same key succeeded".into(),
                )),
                Err(e) if e.is_unsupported() => Err(unsupported(e.to_string())),
                Err(e) => Err(e),
            },
            Ok(CreateOutcome::AlreadyExists) => Err(unsupported(
                "create-if-absent of a fresh random key reported that it already exists".into(),
            )),
            Err(e) if e.is_unsupported() => Err(unsupported(e.to_string())),
            Err(e) => Err(e),
        };
        if let Err(e) = self.delete(&key).await {
            tracing::warn!(key, store = %self.describe, error = %e, "could not remove the probe object");
        }
        outcome
    }

    /// Uploads a staged blob file to `key`, re-verifying its header, footer and digests
    /// against `expected` while the bytes stream out; a mismatch aborts the upload so
    /// nothing unverified becomes visible. Blobs up to `multipart_threshold` go up in one
    /// PUT; larger ones as multipart uploads with at most `part_concurrency` parts of
    /// `part_size` bytes in memory (the part size grows if the blob would need more than
    /// 10,000 parts), each part retried on its own.
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
        let size = tokio::fs::metadata(file)
            .await
            .map_err(io("stat staged blob"))?
            .len();
        if size != expected.object_len() {
            return Err(StoreError::Corrupt(cairn_core::CoreError::CorruptBlob {
                name: file.display().to_string(),
                reason: format!(
                    "staged file has {size} bytes, expected {}",
                    expected.object_len()
                ),
            }));
        }
        if let Some(root) = &self.local_root {
            let decoder = BlobDecoder::new(file.display().to_string(), Some(*expected));
            return self.link_blob_file(root, key, file, decoder).await;
        }
        self.put_blob(key, &BlobSource::Staged(file.to_path_buf()), expected)
            .await
    }

    /// Whether this is a local directory store (where a staged blob is published by hard
    /// link, so staging costs no extra copy).
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    /// Uploads the blob whose payload is bytes `offset..offset + expected.len` of `source`,
    /// framing its header and footer on the fly, so an immutable source (a sealed segment)
    /// needs no staged copy. Verified while it streams exactly like
    /// [`RemoteStore::put_blob_file`]: if the source no longer holds the bytes `expected`
    /// describes (its CRC64-NVME or XXH3-128 differ), the upload is aborted and nothing
    /// becomes visible. Same single-PUT/multipart split, memory bound and retries.
    pub async fn put_blob_range(
        &self,
        key: &str,
        source: &FsPath,
        offset: u64,
        expected: &BlobRef,
    ) -> Result<(), StoreError> {
        let len = tokio::fs::metadata(source)
            .await
            .map_err(|e| StoreError::Io {
                op: "stat blob source",
                path: source.display().to_string(),
                source: e,
            })?
            .len();
        if len < offset.saturating_add(expected.len) {
            return Err(StoreError::Io {
                op: "read blob source",
                path: source.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{len} bytes, the blob needs {}..{}",
                        offset,
                        offset.saturating_add(expected.len)
                    ),
                ),
            });
        }
        let src = BlobSource::Range {
            file: source.to_path_buf(),
            offset,
        };
        self.put_blob(key, &src, expected).await
    }

    /// Uploads the object `src` yields (single PUT or multipart), verifying it on the way.
    async fn put_blob(
        &self,
        key: &str,
        src: &BlobSource,
        expected: &BlobRef,
    ) -> Result<(), StoreError> {
        let size = expected.object_len();
        let decoder = BlobDecoder::new(src.shown(), Some(*expected));
        if size <= self.cfg.multipart_threshold {
            let (s, e) = (src.clone(), *expected);
            let buf = blocking(src, move || {
                let mut r = s.open(&e)?;
                let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
                let n = read_full(&mut r, &mut buf)?;
                buf.truncate(n);
                Ok(buf)
            })
            .await?;
            let mut decoder = decoder;
            decoder.push(&buf)?;
            decoder.finish()?;
            return self.put_bytes(key, Bytes::from(buf)).await;
        }
        match &self.multipart {
            Some(mp) => {
                self.upload_parts(key, src, expected, size, decoder, mp.clone())
                    .await
            }
            None => {
                // Whole-upload retries: without the part-level API a failed part dooms
                // its upload, so the attempt starts over from the source.
                let op = "multipart put";
                self.retry(op, key, || async move {
                    let decoder = BlobDecoder::new(src.shown(), Some(*expected));
                    self.upload_whole(key, src, expected, decoder).await
                })
                .await
            }
        }
    }

    /// Part size for an object of `size` bytes: the configured one, grown to whole MiB if
    /// the object would otherwise need more than S3's 10,000 parts.
    fn part_size_for(&self, size: u64) -> usize {
        let configured = self.cfg.part_size.max(5 << 20) as u64;
        let needed = size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
        usize::try_from(configured.max(needed)).unwrap_or(usize::MAX)
    }

    /// Multipart upload through the part-level API: parts read from the file one at a time,
    /// verified, and uploaded by at most `part_concurrency` tasks, each part retried alone.
    async fn upload_parts(
        &self,
        key: &str,
        src: &BlobSource,
        expected: &BlobRef,
        size: u64,
        mut decoder: BlobDecoder,
        mp: Arc<dyn MultipartStore>,
    ) -> Result<(), StoreError> {
        let path = self.path(key);
        let id: MultipartId = self
            .retry("create multipart upload", key, || {
                self.request("create multipart upload", key, mp.create_multipart(&path))
            })
            .await?;
        let part_size = self.part_size_for(size);
        let concurrency = self.cfg.part_concurrency.max(1);
        let expected = *expected;
        let uploaded: Result<Vec<PartId>, StoreError> = async {
            let opened = src.clone();
            let mut f = Some(blocking(src, move || opened.open(&expected)).await?);
            let mut tasks = tokio::task::JoinSet::new();
            let mut parts: Vec<Option<PartId>> = Vec::new();
            for idx in 0.. {
                let Some(handle) = f.take() else { break };
                let (handle, buf) = blocking(src, move || {
                    let mut handle = handle;
                    let mut buf = vec![0u8; part_size];
                    let n = read_full(&mut handle, &mut buf)?;
                    buf.truncate(n);
                    Ok((handle, buf))
                })
                .await?;
                if buf.is_empty() {
                    break;
                }
                decoder.push(&buf)?;
                while tasks.len() >= concurrency {
                    collect_part(&mut tasks, &mut parts, key).await?;
                }
                tasks.spawn(self.clone().upload_part(
                    mp.clone(),
                    key.to_string(),
                    path.clone(),
                    id.clone(),
                    idx,
                    Bytes::from(buf),
                ));
                f = Some(handle);
            }
            decoder.finish()?;
            while !tasks.is_empty() {
                collect_part(&mut tasks, &mut parts, key).await?;
            }
            parts
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    p.ok_or_else(|| {
                        self.err(
                            "multipart put",
                            key,
                            short_read(format!("part {i} missing")),
                        )
                    })
                })
                .collect()
        }
        .await;
        let parts = match uploaded {
            Ok(parts) => parts,
            Err(e) => {
                // Best effort: an unfinished upload is invisible whether or not this lands.
                let _ = self
                    .request(
                        "abort multipart upload",
                        key,
                        mp.abort_multipart(&path, &id),
                    )
                    .await;
                return Err(e);
            }
        };
        self.complete_upload(key, size, &path, &id, parts, &mp)
            .await
    }

    /// Uploads one part, retrying it alone on transient errors.
    async fn upload_part(
        self,
        mp: Arc<dyn MultipartStore>,
        key: String,
        path: Path,
        id: MultipartId,
        idx: usize,
        data: Bytes,
    ) -> Result<(usize, PartId), StoreError> {
        let this = &self;
        let (mp, path, id, key) = (&mp, &path, &id, key.as_str());
        let len = data.len() as u64;
        let part = this
            .retry("upload part", key, || {
                let payload = PutPayload::from(data.clone());
                async move {
                    this.limits.upload(len).await;
                    this.request("upload part", key, mp.put_part(path, id, idx, payload))
                        .await
                }
            })
            .await?;
        Ok((idx, part))
    }

    /// Completes a multipart upload; a completion whose response was lost is recognised by
    /// the object being there with the expected size (the key is content-addressed).
    async fn complete_upload(
        &self,
        key: &str,
        size: u64,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
        mp: &Arc<dyn MultipartStore>,
    ) -> Result<(), StoreError> {
        let op = "complete multipart upload";
        let mut rs = self.retry_state();
        let mut uncertain = false;
        loop {
            let r = self
                .request(op, key, mp.complete_multipart(path, id, parts.clone()))
                .await;
            let e = match r {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if uncertain || matches!(e, StoreError::NotFound { .. }) {
                if let Ok(Some(found)) = self.head(key).await {
                    if found == size {
                        Counters::bump(&self.limits.stats.resolved_by_read_back);
                        return Ok(());
                    }
                }
            }
            if !transient(&e) {
                return Err(e);
            }
            uncertain = true;
            if !self.backoff(op, key, &mut rs, &e).await {
                return Err(self.gave_up(op, key, &rs, e));
            }
        }
    }

    /// One whole multipart upload through the `ObjectStore` API (stores without the
    /// part-level API); holds one request permit for its duration.
    async fn upload_whole(
        &self,
        key: &str,
        src: &BlobSource,
        expected: &BlobRef,
        mut decoder: BlobDecoder,
    ) -> Result<(), StoreError> {
        let (opened, e) = (src.clone(), *expected);
        let mut reader = Some(blocking(src, move || opened.open(&e)).await?);
        let _permit = self.limits.permit().await;
        Counters::bump(&self.limits.stats.requests);
        let upload = self
            .inner
            .put_multipart(&self.path(key))
            .await
            .map_err(|e| self.err("multipart put", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.cfg.part_size);
        let piece = self.cfg.part_size.min(LOCAL_READ);
        let result: Result<(), StoreError> = async {
            while let Some(r) = reader.take() {
                let (r, buf) = blocking(src, move || {
                    let mut r = r;
                    let mut buf = vec![0u8; piece];
                    let n = read_full(&mut r, &mut buf)?;
                    buf.truncate(n);
                    Ok((r, buf))
                })
                .await?;
                if buf.is_empty() {
                    break;
                }
                decoder.push(&buf)?;
                writer
                    .wait_for_capacity(self.cfg.part_concurrency)
                    .await
                    .map_err(|e| self.err("multipart put", key, e))?;
                self.limits.upload(buf.len() as u64).await;
                writer.write(&buf);
                reader = Some(r);
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
    /// piece with its offset to `sink`. Fails, naming the key, on any mismatch.
    ///
    /// A read cut off by a transient error resumes at the byte it reached (the sink sees
    /// each offset once per pass). A blob whose bytes fail verification (a damaged transfer)
    /// is read again from the start, up to `verify_read_attempts` passes: the sink is then
    /// called again from offset 0, so it must write at the offsets given (overwrite), not
    /// append. Only when every pass fails is [`StoreError::Corrupt`] returned.
    pub async fn get_blob<F>(
        &self,
        key: &str,
        expected: &BlobRef,
        mut sink: F,
    ) -> Result<DecodedBlob, StoreError>
    where
        F: FnMut(u64, &[u8]) -> std::io::Result<()>,
    {
        let mut pass = 1;
        loop {
            match self.read_blob_pass(key, expected, &mut sink).await {
                Err(StoreError::Corrupt(e)) => {
                    Counters::bump(&self.limits.stats.damaged_reads);
                    if pass >= self.cfg.verify_read_attempts {
                        return Err(StoreError::Corrupt(e));
                    }
                    tracing::warn!(
                        key,
                        store = %self.describe,
                        pass,
                        error = %e,
                        "blob failed verification; reading it again"
                    );
                    pass += 1;
                }
                other => return other,
            }
        }
    }

    /// One verified pass over a blob, resuming after transient errors.
    async fn read_blob_pass<F>(
        &self,
        key: &str,
        expected: &BlobRef,
        sink: &mut F,
    ) -> Result<DecodedBlob, StoreError>
    where
        F: FnMut(u64, &[u8]) -> std::io::Result<()>,
    {
        let mut st = ReadState {
            decoder: BlobDecoder::new(key, Some(*expected)),
            received: 0,
            offset: 0,
            total: expected.object_len(),
        };
        let path = self.path(key);
        let mut rs = self.retry_state();
        loop {
            let before = st.received;
            match self.read_from(key, &path, &mut st, sink).await {
                Ok(()) if st.received == st.total => return Ok(st.decoder.finish()?),
                Ok(()) => {
                    // The body ended early without an error: resume where it stopped.
                    let what = format!("body ended after {} of {} bytes", st.received, st.total);
                    let e = self.err("get", key, short_read(what));
                    if !self.backoff("get", key, &mut rs, &e).await {
                        return Err(self.gave_up("get", key, &rs, e));
                    }
                    Counters::bump(&self.limits.stats.resumed_reads);
                }
                Err(e) if transient(&e) => {
                    if !self.backoff("get", key, &mut rs, &e).await {
                        return Err(self.gave_up("get", key, &rs, e));
                    }
                    if st.received > before {
                        Counters::bump(&self.limits.stats.resumed_reads);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One GET of the blob from `st.received` on, fed through the decoder into the sink.
    async fn read_from<F>(
        &self,
        key: &str,
        path: &Path,
        st: &mut ReadState,
        sink: &mut F,
    ) -> Result<(), StoreError>
    where
        F: FnMut(u64, &[u8]) -> std::io::Result<()>,
    {
        let _permit = self.limits.permit().await;
        Counters::bump(&self.limits.stats.requests);
        let opts = GetOptions {
            range: (st.received > 0).then_some(GetRange::Bounded(st.received..st.total)),
            ..Default::default()
        };
        let res = self
            .inner
            .get_opts(path, opts)
            .await
            .map_err(|e| self.err("get", key, e))?;
        if res.meta.size != st.total {
            return Err(StoreError::WrongSize {
                key: key.to_string(),
                store: self.describe.clone(),
                expected: st.total,
                actual: res.meta.size,
            });
        }
        let range = res.range.clone();
        if let GetResultPayload::File(file, fpath) = res.payload {
            // Local files: large reads on a blocking thread instead of 8 KiB stream pieces.
            let shown = fpath.display().to_string();
            let mut file = Some(file);
            let mut pos = range.start;
            while pos < range.end {
                let Some(f) = file.take() else { break };
                let p = shown.clone();
                let want = usize::try_from(range.end - pos)
                    .unwrap_or(LOCAL_READ)
                    .min(LOCAL_READ);
                let (f, piece) = tokio::task::spawn_blocking(move || {
                    use std::io::{Seek, SeekFrom};
                    let mut f = f;
                    let mut buf = vec![0u8; want];
                    let n = f
                        .seek(SeekFrom::Start(pos))
                        .and_then(|_| read_full(&f, &mut buf))
                        .map_err(|e| StoreError::Io {
                            op: "read blob",
                            path: p,
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
                pos += piece.len() as u64;
                self.limits.download(piece.len() as u64).await;
                st.feed(key, &piece, sink)?;
                file = Some(f);
            }
            return Ok(());
        }
        let mut stream = res.into_stream();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| self.err("get", key, e))?;
            self.limits.download(piece.len() as u64).await;
            st.feed(key, &piece, sink)?;
        }
        Ok(())
    }

    /// Reads bytes `payload_range` of the payload of the blob at `key`.
    ///
    /// What is verified: the blob header (magic, header checksum, kind and payload length
    /// against `expected`), the footer (whose CRC64-NVME must be `expected`'s), and that
    /// exactly the requested number of bytes arrived. What cannot be: a range cannot
    /// recompute the whole payload's CRC64, so the bytes of the range themselves are the
    /// caller's to check at chunk or page level (restore does, with the page and delta
    /// checksums). Damaged headers, footers or short reads are read again like
    /// [`RemoteStore::get_blob`].
    pub async fn get_blob_range(
        &self,
        key: &str,
        expected: &BlobRef,
        payload_range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        if payload_range.start > payload_range.end || payload_range.end > expected.len {
            return Err(StoreError::BadRange {
                key: key.to_string(),
                store: self.describe.clone(),
                start: payload_range.start,
                end: payload_range.end,
                len: expected.len,
            });
        }
        if payload_range.is_empty() {
            return Ok(Bytes::new());
        }
        let h = HEADER_LEN as u64;
        let footer_at = h + expected.len;
        let ranges = [
            0..h,
            h + payload_range.start..h + payload_range.end,
            footer_at..footer_at + FOOTER_LEN as u64,
        ];
        let path = &self.path(key);
        let ranges = &ranges;
        let mut pass = 1;
        loop {
            let got = self
                .retry("range get", key, || async move {
                    let _permit = self.limits.permit().await;
                    Counters::bump(&self.limits.stats.requests);
                    let got = self
                        .inner
                        .get_ranges(path, ranges)
                        .await
                        .map_err(|e| self.err("range get", key, e))?;
                    let n: usize = got.iter().map(Bytes::len).sum();
                    self.limits.download(n as u64).await;
                    Ok(got)
                })
                .await?;
            match verify_range(key, expected, ranges, &got) {
                Ok(()) => return Ok(got[1].clone()),
                Err(e) => {
                    Counters::bump(&self.limits.stats.damaged_reads);
                    if pass >= self.cfg.verify_read_attempts {
                        return Err(e);
                    }
                    tracing::warn!(key, store = %self.describe, pass, error = %e, "range read failed verification; reading it again");
                    pass += 1;
                }
            }
        }
    }

    /// Lists every object under `prefix` (keys relative to the store root), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StoreError> {
        let p = &self.path(prefix.trim_end_matches('/'));
        let mut out = self
            .retry("list", prefix, || async move {
                let _permit = self.limits.permit().await;
                Counters::bump(&self.limits.stats.requests);
                let mut stream = self.inner.list(Some(p));
                let mut out = Vec::new();
                while let Some(meta) = stream.next().await {
                    let meta = meta.map_err(|e| self.err("list", prefix, e))?;
                    out.push(Listed {
                        key: self.rel(&meta.location),
                        size: meta.size,
                    });
                }
                Ok(out)
            })
            .await?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes an object; deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = &self.path(key);
        let r = self
            .retry("delete", key, || {
                self.request("delete", key, self.inner.delete(path))
            })
            .await;
        match r {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Progress of one verified pass over a blob.
struct ReadState {
    decoder: BlobDecoder,
    /// Object bytes received and verified so far.
    received: u64,
    /// Payload bytes handed to the sink so far.
    offset: u64,
    total: u64,
}

impl ReadState {
    fn feed<F>(&mut self, key: &str, piece: &[u8], sink: &mut F) -> Result<(), StoreError>
    where
        F: FnMut(u64, &[u8]) -> std::io::Result<()>,
    {
        if self.received + piece.len() as u64 > self.total {
            return Err(StoreError::Corrupt(cairn_core::CoreError::CorruptBlob {
                name: key.to_string(),
                reason: format!("more than the {} bytes the object has", self.total),
            }));
        }
        self.received += piece.len() as u64;
        let payload = self.decoder.push(piece)?;
        if !payload.is_empty() {
            sink(self.offset, payload).map_err(|e| StoreError::Io {
                op: "write restored bytes of",
                path: key.to_string(),
                source: e,
            })?;
            self.offset += payload.len() as u64;
        }
        Ok(())
    }
}

/// Checks the header, footer and lengths of a range read (see `get_blob_range`).
fn verify_range(
    key: &str,
    expected: &BlobRef,
    ranges: &[Range<u64>; 3],
    got: &[Bytes],
) -> Result<(), StoreError> {
    let corrupt = |reason: String| {
        StoreError::Corrupt(cairn_core::CoreError::CorruptBlob {
            name: key.to_string(),
            reason,
        })
    };
    if got.len() != ranges.len() {
        return Err(corrupt(format!("{} ranges returned, 3 asked", got.len())));
    }
    for (r, b) in ranges.iter().zip(got) {
        if b.len() as u64 != r.end - r.start {
            return Err(corrupt(format!(
                "range {}..{} returned {} bytes",
                r.start,
                r.end,
                b.len()
            )));
        }
    }
    let mut header = BlobDecoder::new(key, Some(*expected));
    header.push(&got[0])?;
    if got[2].as_ref() != encode_footer(expected.crc64) {
        return Err(corrupt(format!(
            "footer does not carry the content address CRC64 {:016x}",
            expected.crc64
        )));
    }
    Ok(())
}

/// Where the bytes of a blob object come from.
#[derive(Clone)]
enum BlobSource {
    /// A staged file holding the whole object (header, payload, footer).
    Staged(std::path::PathBuf),
    /// The payload is a region of an immutable file; header and footer are framed on the fly.
    Range {
        file: std::path::PathBuf,
        offset: u64,
    },
}

impl BlobSource {
    fn shown(&self) -> String {
        match self {
            BlobSource::Staged(p) => p.display().to_string(),
            BlobSource::Range { file, offset } => format!("{}@{offset}", file.display()),
        }
    }

    /// A reader of the whole object (blocking I/O).
    fn open(&self, expected: &BlobRef) -> std::io::Result<ObjectReader> {
        use std::io::{Seek, SeekFrom};
        match self {
            BlobSource::Staged(p) => Ok(ObjectReader {
                header: Vec::new(),
                file: std::fs::File::open(p)?,
                remaining: u64::MAX,
                footer: Vec::new(),
            }),
            BlobSource::Range { file, offset } => {
                let mut f = std::fs::File::open(file)?;
                f.seek(SeekFrom::Start(*offset))?;
                Ok(ObjectReader {
                    header: encode_header(expected.kind, expected.len).to_vec(),
                    file: f,
                    remaining: expected.len,
                    footer: encode_footer(expected.crc64).to_vec(),
                })
            }
        }
    }
}

/// Header bytes, then at most `remaining` bytes of the file, then footer bytes.
struct ObjectReader {
    header: Vec<u8>,
    file: std::fs::File,
    remaining: u64,
    footer: Vec<u8>,
}

impl std::io::Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.header.is_empty() {
            let n = self.header.len().min(buf.len());
            buf[..n].copy_from_slice(&self.header[..n]);
            self.header.drain(..n);
            return Ok(n);
        }
        if self.remaining > 0 {
            let want = usize::try_from(self.remaining)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let n = self.file.read(&mut buf[..want])?;
            if n > 0 || self.footer.is_empty() {
                self.remaining -= n as u64;
                return Ok(n);
            }
            // The file ended early: the footer follows and the decoder reports the shortfall.
            self.remaining = 0;
        }
        let n = self.footer.len().min(buf.len());
        buf[..n].copy_from_slice(&self.footer[..n]);
        self.footer.drain(..n);
        Ok(n)
    }
}

/// Runs blocking source I/O off the async threads; errors name the source.
async fn blocking<T: Send + 'static>(
    src: &BlobSource,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    let shown = src.shown();
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::Io {
            op: "read blob source",
            path: shown,
            source: e,
        }),
        Err(e) => Err(StoreError::Io {
            op: "read blob source",
            path: shown,
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

type PartTasks = tokio::task::JoinSet<Result<(usize, PartId), StoreError>>;

/// Waits for one part upload and records its id.
async fn collect_part(
    tasks: &mut PartTasks,
    parts: &mut Vec<Option<PartId>>,
    key: &str,
) -> Result<(), StoreError> {
    match tasks.join_next().await {
        Some(Ok(Ok((idx, part)))) => {
            if parts.len() <= idx {
                parts.resize(idx + 1, None);
            }
            parts[idx] = Some(part);
            Ok(())
        }
        Some(Ok(Err(e))) => Err(e),
        Some(Err(join)) => Err(StoreError::Io {
            op: "upload part of",
            path: key.to_string(),
            source: std::io::Error::other(join.to_string()),
        }),
        None => Ok(()),
    }
}

/// Opens what a (non-fault) URL names.
fn open_backend(url: &str, cfg: &StoreConfig) -> Result<Backend, StoreError> {
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
            "credentials do not belong in the URL; use the AWS_* environment variables or the [s3] table of the store config".into(),
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
            Ok(Backend {
                inner: Arc::new(fs),
                multipart: None,
                root: String::new(),
                describe,
                local_root: Some(dir),
            })
        }
        "s3" => {
            let bucket = parsed
                .host_str()
                .filter(|b| !b.is_empty())
                .ok_or_else(|| bad("missing bucket: s3://bucket/prefix".into()))?;
            let prefix = parsed.path().trim_matches('/').to_string();
            let s3 = s3_builder(bucket, cfg)
                .map_err(bad)?
                .build()
                .map_err(|e| bad(scrub_credentials(&e.to_string(), cfg)))?;
            let s3 = Arc::new(s3);
            Ok(Backend {
                inner: s3.clone(),
                multipart: Some(s3),
                root: prefix,
                describe,
                local_root: None,
            })
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
            Ok(Backend {
                inner: mem.clone(),
                multipart: Some(mem),
                root: String::new(),
                describe,
                local_root: None,
            })
        }
        other => Err(bad(format!(
            "unsupported scheme {other:?} (use file://, s3://, memory:// or fault+<url>)"
        ))),
    }
}

/// The S3 client for `bucket`: `AWS_*` environment first, the config's `[s3]` table over it,
/// then Cairn's retry, timeout and checksum settings.
fn s3_builder(bucket: &str, cfg: &StoreConfig) -> Result<AmazonS3Builder, String> {
    let s3 = &cfg.s3;
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let region = s3
        .region
        .clone()
        .or_else(|| env_var("AWS_REGION"))
        .or_else(|| env_var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".to_string());
    b = b.with_region(region);
    if let Some(k) = &s3.access_key_id {
        b = b.with_access_key_id(k.expose());
    }
    if let Some(k) = &s3.secret_access_key {
        b = b.with_secret_access_key(k.expose());
    }
    if let Some(k) = &s3.session_token {
        b = b.with_token(k.expose());
    }
    let virtual_hosted = s3
        .virtual_hosted
        .or_else(|| env_bool("AWS_VIRTUAL_HOSTED_STYLE_REQUEST"))
        .unwrap_or(false);
    b = b.with_virtual_hosted_style_request(virtual_hosted);
    match cfg.checksum {
        TransportChecksum::Crc64nvme => b = b.with_checksum_algorithm(Checksum::CRC64NVME),
        TransportChecksum::Sha256 => b = b.with_checksum_algorithm(Checksum::SHA256),
        TransportChecksum::None => {}
    }
    b = b.with_retry(RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(cfg.retry_initial_backoff_ms),
            max_backoff: Duration::from_millis(cfg.retry_max_backoff_ms),
            base: 2.0,
        },
        max_retries: cfg.http_retries,
        retry_timeout: Duration::from_millis(cfg.retry_total_ms),
    });
    // Individual client keys, never `with_client_options`, which would replace every client
    // option at once (allow_http included).
    if let Some(ms) = cfg.request_timeout_ms {
        b = b.with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
            format!("{ms}ms"),
        );
    }
    if let Some(ms) = cfg.connect_timeout_ms {
        b = b.with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
            format!("{ms}ms"),
        );
    }
    let endpoint = s3
        .endpoint
        .clone()
        .or_else(|| env_var("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env_var("AWS_ENDPOINT_URL"))
        .or_else(|| env_var("AWS_ENDPOINT"));
    let mut allow_http = s3
        .allow_http
        .or_else(|| env_bool("AWS_ALLOW_HTTP"))
        .unwrap_or(false);
    if let Some(ep) = endpoint {
        if ep.starts_with("http://") {
            if is_loopback(&ep) {
                allow_http = true;
            } else if !allow_http {
                return Err(format!(
                    "endpoint {} is plain http and not on this machine; set allow_http = true in the [s3] table (or AWS_ALLOW_HTTP=true) to allow it",
                    redact(&ep)
                ));
            }
        }
        b = b.with_endpoint(ep);
    }
    // Last, so nothing above can reset it.
    Ok(b.with_allow_http(allow_http))
}

/// Every credential value this process knows of (config and `AWS_*` environment); values
/// under 8 characters (test dummies like `test`, which would mangle ordinary words) are left
/// alone: real access key ids have 16 or more, secrets 40.
fn known_credentials(cfg: &StoreConfig) -> Vec<String> {
    let s3 = &cfg.s3;
    let known = [
        s3.access_key_id.as_ref().map(|s| s.expose().to_string()),
        s3.secret_access_key
            .as_ref()
            .map(|s| s.expose().to_string()),
        s3.session_token.as_ref().map(|s| s.expose().to_string()),
        env_var("AWS_ACCESS_KEY_ID"),
        env_var("AWS_SECRET_ACCESS_KEY"),
        env_var("AWS_SESSION_TOKEN"),
    ];
    known
        .into_iter()
        .flatten()
        .filter(|s| s.len() >= 8)
        .collect()
}

/// Removes every credential value this process knows of from a message.
fn scrub_credentials(message: &str, cfg: &StoreConfig) -> String {
    let mut m = message.to_string();
    for s in known_credentials(cfg) {
        m = m.replace(&s, "<redacted>");
    }
    m
}

const LOCAL_READ: usize = 4 << 20;

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(mut f: impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
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
    use crate::fault::FaultConfig;
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
            ..Default::default()
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

    fn fast_cfg() -> StoreConfig {
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

    fn staged(dir: &std::path::Path, payload: &[u8]) -> (std::path::PathBuf, BlobRef, Vec<u8>) {
        let (obj, r) = encode_blob(BlobKind::Segment, payload);
        let f = dir.join(format!("blob-{:x}", r.crc64));
        std::fs::write(&f, &obj).unwrap();
        (f, r, obj)
    }

    #[test]
    fn faulty_store_uploads_parts_alone_and_heals_damaged_reads() {
        let fault = FaultConfig {
            seed: 11,
            transient_errors: 0.2,
            lost_write_responses: 0.2,
            corrupted_bodies: 0.2,
            truncated_bodies: 0.2,
            // get_bytes has no checksum to catch a flipped byte with (callers with one use
            // get_bytes_verified); body faults go to the blob only.
            body_fault_keys: Some("big".into()),
            ..Default::default()
        };
        let (store, faults) =
            RemoteStore::open_faulty("memory://faulty-parts", fast_cfg(), fault).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let payload: Vec<u8> = (0..(17 << 20) + 5)
            .map(|i: usize| (i % 253) as u8)
            .collect();
        let (f, r, _) = staged(dir.path(), &payload);
        rt().block_on(async {
            store.put_blob_file("big", &f, &r).await.unwrap();
            for i in 0..10 {
                let k = format!("small/{i}");
                store
                    .put_bytes(&k, Bytes::from(vec![i as u8; 100]))
                    .await
                    .unwrap();
                assert_eq!(store.get_bytes(&k).await.unwrap(), vec![i as u8; 100]);
            }
            for _ in 0..5 {
                let mut back = vec![0u8; payload.len()];
                store
                    .get_blob("big", &r, |off, p| {
                        back[off as usize..off as usize + p.len()].copy_from_slice(p);
                        Ok(())
                    })
                    .await
                    .unwrap();
                assert!(back == payload);
                let piece = store.get_blob_range("big", &r, 100..5000).await.unwrap();
                assert_eq!(&piece[..], &payload[100..5000]);
            }
        });
        let c = faults.counts();
        let s = store.stats();
        assert!(c.transient_errors > 0 && c.lost_responses > 0, "{c:?}");
        assert!(s.retries > 0, "{s:?}");
        // Every corrupted byte delivered to get_blob was caught (range reads verify only
        // the header and footer, so corruption inside a range is the caller's to catch).
        assert!(s.damaged_reads > 0, "{s:?} {c:?}");
    }

    #[test]
    fn lost_create_response_is_settled_by_reading_back() {
        let fault = FaultConfig {
            lost_write_responses: 1.0,
            ..Default::default()
        };
        let (store, faults) =
            RemoteStore::open_faulty("memory://lost-create", fast_cfg(), fault).unwrap();
        rt().block_on(async {
            let b = Bytes::from_static(b"manifest");
            assert_eq!(
                store.create_if_absent("m/1", b.clone()).await.unwrap(),
                CreateOutcome::Created
            );
            faults.set_enabled(false);
            let other = RemoteStore::open_with("memory://lost-create", fast_cfg()).unwrap();
            assert_eq!(other.get_bytes("m/1").await.unwrap(), b);
            faults.set_enabled(true);
            // Someone else's object under the key: the read-back says so.
            assert_eq!(
                store
                    .create_if_absent("m/1", Bytes::from_static(b"other"))
                    .await
                    .unwrap(),
                CreateOutcome::AlreadyExists
            );
        });
        assert!(store.stats().resolved_by_read_back >= 1);
        assert!(faults.counts().lost_responses >= 1);
    }

    #[test]
    fn startup_check_passes_refuses_and_is_skipped_in_single_writer_mode() {
        rt().block_on(async {
            let good = RemoteStore::open_with("memory://check-good", fast_cfg()).unwrap();
            good.check_conditional_create().await.unwrap();
            assert!(good.list("_cairn").await.unwrap().is_empty());
            let bad_url = "fault+memory://check-bad?ignore_conditional_create=true";
            let bad = RemoteStore::open_with(bad_url, fast_cfg()).unwrap();
            let e = bad.check_conditional_create().await.unwrap_err();
            assert!(
                matches!(e, StoreError::ConditionalCreateUnsupported { .. }),
                "{e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains("memory://check-bad") && msg.contains("single_writer"),
                "{msg}"
            );
            assert!(bad.list("_cairn").await.unwrap().is_empty());
            let cfg = StoreConfig {
                single_writer: true,
                ..fast_cfg()
            };
            let single = RemoteStore::open_with(bad_url, cfg).unwrap();
            single.check_conditional_create().await.unwrap();
        });
    }

    #[test]
    fn permanent_errors_are_not_retried_and_ranges_are_checked() {
        let store = RemoteStore::open_with("memory://permanent", fast_cfg()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (f, r, mut obj) = staged(dir.path(), b"0123456789");
        rt().block_on(async {
            let e = store.get_bytes("missing").await.unwrap_err();
            assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
            assert_eq!(store.stats().retries, 0);
            store.put_blob_file("b", &f, &r).await.unwrap();
            assert_eq!(
                &store.get_blob_range("b", &r, 2..5).await.unwrap()[..],
                b"234"
            );
            assert!(store.get_blob_range("b", &r, 5..11).await.is_err());
            // A footer that does not carry the content address is refused.
            let n = obj.len();
            obj[n - 16] ^= 1;
            store.put_bytes("b", Bytes::from(obj)).await.unwrap();
            let e = store.get_blob_range("b", &r, 2..5).await.unwrap_err();
            assert!(
                e.to_string().contains('b') && matches!(e, StoreError::Corrupt(_)),
                "{e}"
            );
        });
    }

    #[test]
    fn transient_errors_give_up_within_bounds() {
        let cfg = StoreConfig {
            retry_max_attempts: 4,
            ..fast_cfg()
        };
        let (store, faults) =
            RemoteStore::open_faulty("memory://always-down", cfg, FaultConfig::transient(1.0, 1))
                .unwrap();
        rt().block_on(async {
            let e = store.head("k").await.unwrap_err();
            assert!(
                matches!(e, StoreError::RetriesExhausted { attempts: 4, .. }),
                "{e}"
            );
            assert!(e.is_retryable() && e.to_string().contains('k'));
        });
        assert_eq!(faults.counts().transient_errors, 4);
    }

    #[test]
    fn blobs_upload_straight_from_an_immutable_source_region() {
        let dir = tempfile::tempdir().unwrap();
        let file_url = format!("file://{}", dir.path().join("fs").display());
        let src = dir.path().join("segment");
        let data: Vec<u8> = (0..(13 << 20) + 99)
            .map(|i: usize| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&src, &data).unwrap();
        rt().block_on(async {
            for url in ["memory://from-range", file_url.as_str()] {
                let store = RemoteStore::open_with(url, fast_cfg()).unwrap();
                // A small region (single PUT) and a large one (multipart).
                for (k, range) in [("small", 100..5000usize), ("large", 1000..data.len())] {
                    let (obj, r) = encode_blob(BlobKind::Segment, &data[range.clone()]);
                    store
                        .put_blob_range(k, &src, range.start as u64, &r)
                        .await
                        .unwrap();
                    assert_eq!(store.get_bytes(k).await.unwrap(), obj, "{url} {k}");
                }
                // The source changed since its digests were taken: refused, nothing visible.
                let (_, r) = encode_blob(BlobKind::Segment, &data[1..(7 << 20)]);
                let e = store
                    .put_blob_range("changed", &src, 0, &r)
                    .await
                    .unwrap_err();
                assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
                assert_eq!(store.head("changed").await.unwrap(), None);
                let e = store
                    .put_blob_range("short", &src, data.len() as u64 - 10, &r)
                    .await
                    .unwrap_err();
                assert!(e.to_string().contains("segment"), "{e}");
            }
        });
    }
}
