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
//! Layout. Every request goes through a stack of wrappers, one concern each (see `stack.rs`
//! for the order and why): the retry layer (`retry.rs`), the limits layer (`limits.rs`),
//! the statistics layer (`stats.rs`) and, for tests, the fault layer ([`fault`]), around a
//! back end (`backend.rs`). What a per-request wrapper cannot do lives in the store logic,
//! one module per job: uploads (`upload.rs`), verified reads with resume and re-read
//! (`read.rs`), writes settled by reading back (`write.rs`), publishing local blobs by hard
//! link and reading local files (`local.rs`). `classify.rs` is the one rule for what a
//! failure means, `redact.rs` keeps credentials out of errors, `config.rs` holds the
//! tunables, `error.rs` the crate's error.
//!
//! Crash behaviour: every write is a single object put (local: write to a temporary file,
//! fsync, link/rename into place; S3: single PUT or multipart upload completed at the end),
//! so a crash leaves either no object or the whole object, plus at worst an abandoned
//! temporary file or multipart upload that never becomes visible under the key (S3 buckets
//! should expire incomplete uploads with a lifecycle rule).
//!
//! Retries: this crate is the one retry layer (`object_store`'s own HTTP retries are off by
//! default, [`StoreConfig::http_retries`]). Transient failures (timeouts, connection resets,
//! 5xx, throttling) are retried with exponential backoff and jitter, bounded by attempts and
//! total time; permanent ones (not found, exists, precondition, access denied, unsupported
//! operation) are returned at once. A write whose response is lost is settled by reading
//! back: a conditional create compares the bytes found with its own, a multipart completion
//! checks the object's size. A streamed read cut off by a transient error resumes from the
//! byte it reached; a blob whose bytes fail verification is read again up to
//! [`StoreConfig::verify_read_attempts`] times before it is reported corrupt. Limits on
//! concurrent requests and bandwidth apply to every attempt.
//!
//! Cancellation: every operation is a future; dropping it abandons the request (part uploads
//! run as tasks owned by the upload and are aborted with it), and an abandoned multipart
//! upload is never completed, so nothing partial is published.

mod backend;
mod batch;
pub use batch::DELETE_BATCH;
mod classify;
mod config;
mod error;
pub mod fault;
mod limits;
mod local;
mod probe;
mod read;
mod redact;
mod retry;
mod stack;
mod stats;
#[cfg(test)]
mod testutil;
mod upload;
mod write;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

pub use classify::Cause;
pub use config::{S3Settings, Secret, StoreConfig, TransportChecksum, CONFIG_ENV};
pub use error::StoreError;
pub use probe::READY_PROBE_KEY;
pub use redact::redact;
pub use stats::{ErrorCounts, RequestCounts, StoreStats};
pub use write::PROBE_PREFIX;

use backend::open_backend;
use fault::{FaultConfig, FaultStore};
use redact::Secrets;
use stack::{Layer, Stack};

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
    /// When the store last wrote the object, by the store's own clock, in milliseconds since
    /// the Unix epoch (0 if the store reports a time before it). Its precision is the
    /// store's: whole seconds on S3, the file's modification time on a local directory
    /// (for a blob published by hard link, when it was staged).
    pub last_modified_unix_ms: u64,
}

/// A store rooted at a prefix, shared cheaply by cloning (clones share limits and counters).
#[derive(Clone)]
pub struct RemoteStore {
    stack: Stack,
    root: String,
    describe: String,
    cfg: Arc<StoreConfig>,
    /// For `file://` stores: the directory, so staged blobs can be published by hard link
    /// instead of a second copy.
    local_root: Option<std::path::PathBuf>,
    /// Credential values to scrub from every error (config and `AWS_*` environment).
    secrets: Arc<Secrets>,
    /// For S3: the endpoint URL in use, if configured (see [`RemoteStore::endpoint`]).
    endpoint: Option<String>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("store", &self.describe)
            .finish()
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
        let mut store = Self::assemble(b.layer, &b.root, b.describe, cfg, b.local_root);
        store.endpoint = b.endpoint;
        Ok(store)
    }

    /// Opens `url` behind a [`FaultStore`] configured by `fault` (the innermost layer, so
    /// retries, limits and statistics see injected faults exactly as real ones); returns the
    /// store and the wrapper (for its counters). Local directories lose their hard-link
    /// fast path so that every write goes through the faults.
    pub fn open_faulty(
        url: &str,
        cfg: StoreConfig,
        fault: FaultConfig,
    ) -> Result<(Self, Arc<FaultStore>), StoreError> {
        let b = open_backend(url, &cfg)?;
        let mut f = FaultStore::new(b.layer.store, fault);
        if let Some(mp) = b.layer.multipart {
            f = f.with_multipart(mp);
        }
        let f = Arc::new(f);
        let has_multipart = f.has_multipart();
        let describe = format!("fault+{}", b.describe);
        let mut store = Self::assemble(
            Layer::of(Arc::clone(&f), has_multipart),
            &b.root,
            describe,
            cfg,
            None,
        );
        store.endpoint = b.endpoint;
        Ok((store, f))
    }

    /// Wraps an existing `object_store` implementation (fault injection, tests) in the
    /// store's layers. It is used through the `ObjectStore` API only: large blobs go up as
    /// `ObjectStore` multipart uploads, retried whole.
    pub fn from_object_store(
        inner: Arc<dyn ObjectStore>,
        root: &str,
        describe: impl Into<String>,
        cfg: StoreConfig,
    ) -> Self {
        Self::assemble(Layer::plain(inner), root, describe.into(), cfg, None)
    }

    fn assemble(
        base: Layer,
        root: &str,
        describe: String,
        cfg: StoreConfig,
        local_root: Option<std::path::PathBuf>,
    ) -> Self {
        Self {
            stack: Stack::build(base, &cfg, &describe),
            root: root.trim_matches('/').to_string(),
            describe,
            secrets: Arc::new(Secrets::known(&cfg)),
            cfg: Arc::new(cfg),
            local_root,
            endpoint: None,
        }
    }

    /// A human description of the store (URL without credentials).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The tunables in use.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// Counters of requests (by operation), retries, errors (by class and cause), damaged
    /// and resumed reads, read-back resolutions and bytes moved, shared by all clones.
    pub fn stats(&self) -> StoreStats {
        self.stack.stats.snapshot()
    }

    /// Whether this is a local directory store (where a staged blob is published by hard
    /// link, so staging costs no extra copy).
    pub fn is_local(&self) -> bool {
        self.local_root.is_some()
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

    /// The store's error for `op` on `key` failing with `e`.
    fn err(&self, op: &'static str, key: &str, e: object_store::Error) -> StoreError {
        StoreError::from_object_store(op, key, &self.describe, e, &self.secrets)
    }

    /// Runs `attempt` (work of more than one request, on [`Stack::once`]) on the store's
    /// retry engine until it succeeds, fails permanently, or the budget is spent.
    async fn retrying<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.stack
            .retry
            .run(op, key, attempt)
            .await
            .map_err(|f| f.into_store_error(op, key, &self.describe))
    }

    /// Size of the object, or `None` if it does not exist (a definite absence: any other
    /// failure is an error).
    pub async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self.stack.top.store.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) => match self.err("head", key, e) {
                StoreError::NotFound { .. } => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Writes a small object, replacing any existing one.
    pub async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.stack
            .top
            .store
            .put(&self.path(key), bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| self.err("put", key, e))
    }

    /// Lists every object under `prefix` (keys relative to the store root), sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StoreError> {
        self.list_from(prefix, None).await
    }

    /// The objects under `prefix` whose keys sort after `after` (a key under the same
    /// prefix), in key order: what a store that lists in key order (S3's `start-after`)
    /// returns without walking the keys before it.
    pub async fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<Listed>, StoreError> {
        self.list_from(prefix, Some(after)).await
    }

    async fn list_from(
        &self,
        prefix: &str,
        after: Option<&str>,
    ) -> Result<Vec<Listed>, StoreError> {
        let p = self.path(prefix.trim_end_matches('/'));
        let mut stream = match after {
            Some(a) => self
                .stack
                .top
                .store
                .list_with_offset(Some(&p), &self.path(a)),
            None => self.stack.top.store.list(Some(&p)),
        };
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(|e| self.err("list", prefix, e))?;
            out.push(Listed {
                key: self.rel(&meta.location),
                size: meta.size,
                last_modified_unix_ms: u64::try_from(meta.last_modified.timestamp_millis())
                    .unwrap_or(0),
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Deletes objects in bulk (one `DeleteObjects` request per 1,000 keys on S3). Returns
    /// the keys whose deletion was confirmed (a missing object counts as deleted) and the
    /// first failure, if any; keys neither confirmed nor failed were not deleted as far as
    /// the caller may assume.
    pub async fn delete_many(&self, keys: &[String]) -> (Vec<String>, Option<StoreError>) {
        let paths: Vec<object_store::Result<Path>> =
            keys.iter().map(|k| Ok(self.path(k))).collect();
        let mut results = self
            .stack
            .top
            .store
            .delete_stream(futures::stream::iter(paths).boxed());
        // Every layer keeps the input's order, and a key's own failure takes its place.
        let mut done = Vec::with_capacity(keys.len());
        let mut next = keys.iter();
        while let Some(r) = results.next().await {
            let key = next.next().map_or("", String::as_str);
            match r {
                Ok(_) => done.push(key.to_string()),
                Err(e) => match self.err("delete", key, e) {
                    StoreError::NotFound { .. } => done.push(key.to_string()),
                    e => return (done, Some(e)),
                },
            }
        }
        (done, None)
    }

    /// Deletes an object; deleting a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.stack.top.store.delete(&self.path(key)).await {
            Ok(()) => Ok(()),
            Err(e) => match self.err("delete", key, e) {
                StoreError::NotFound { .. } => Ok(()),
                e => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::fault::FaultConfig;
    use crate::testutil::{fast_cfg, rt};

    #[test]
    fn bulk_deletes_go_in_batches_survive_faults_and_count_missing_keys_as_deleted() {
        let (store, _) =
            RemoteStore::open_faulty("memory://bulk", fast_cfg(), FaultConfig::transient(0.2, 3))
                .unwrap();
        rt().block_on(async {
            let keys: Vec<String> = (0..2500).map(|i| format!("b/{i:05}")).collect();
            for k in &keys[..2400] {
                store.put_bytes(k, Bytes::from_static(b"x")).await.unwrap();
            }
            let before = store.stats();
            let (done, err) = store.delete_many(&keys).await;
            assert!(err.is_none(), "{err:?}");
            assert_eq!(
                done, keys,
                "every key confirmed, the missing ones too, in order"
            );
            assert!(store.list("b/").await.unwrap().is_empty());
            let s = store.stats();
            // Three batches, each repeated whole after a transient failure of any key.
            let batches = s.by_op.delete - before.by_op.delete;
            assert!(
                batches >= 3 && batches == 3 + (s.retries - before.retries),
                "{s:?}"
            );
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
    fn listing_after_a_key_skips_the_keys_before_it() {
        let dir = tempfile::tempdir().unwrap();
        for url in [
            "memory://list-after".to_string(),
            format!("file://{}", dir.path().display()),
        ] {
            let store = RemoteStore::open(&url).unwrap();
            rt().block_on(async {
                for k in ["m/001", "m/002", "m/003", "n/001"] {
                    store.put_bytes(k, Bytes::from_static(b"x")).await.unwrap();
                }
                let keys = |l: Vec<Listed>| l.into_iter().map(|o| o.key).collect::<Vec<_>>();
                assert_eq!(
                    keys(store.list_after("m/", "m/001").await.unwrap()),
                    ["m/002", "m/003"]
                );
                assert!(store.list_after("m/", "m/003").await.unwrap().is_empty());
                assert_eq!(store.list("m/").await.unwrap().len(), 3, "{url}");
            });
        }
    }
}
