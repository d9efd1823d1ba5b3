//! Back ends: what a store URL opens to, before any layer is put around it.
//!
//! Contract: [`open_backend`] turns `file:///abs/dir` into a `LocalFileSystem` rooted at the
//! directory (created if missing, fsynced writes), `s3://bucket/prefix` into an `AmazonS3`
//! client configured from the store config's `[s3]` table over the `AWS_*` environment,
//! and `memory://name` into an in-process store shared by every open of that name (tests).
//! S3 and memory stores also offer the part-level multipart API. Credentials in the URL are
//! refused without being echoed; errors name the URL with any userinfo removed and are
//! scrubbed of every known credential. The S3 client is built with Cairn's timeouts, the
//! transport checksum, and `object_store`'s own HTTP retries set to
//! [`StoreConfig::http_retries`] (0 by default: the retry layer is the only one, see
//! `retry.rs`). Client options are set key by key, never with `with_client_options` (which
//! replaces all of them, `allow_http` included), and `with_allow_http` comes last.
//!
//! Stateless apart from the registry of named memory stores; opening does no request, so
//! there is nothing to crash, retry or cancel (a `file://` open creates the directory).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, Checksum};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::{BackoffConfig, ClientConfigKey, RetryConfig};

use crate::redact::{env_var, redact, Secrets};
use crate::stack::Layer;
use crate::{StoreConfig, StoreError, TransportChecksum};

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

fn env_bool(k: &str) -> Option<bool> {
    env_var(k).map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The S3 endpoint a store with `cfg` talks to: the config's, else the `AWS_*`
/// environment's; `None` for the AWS default.
pub(crate) fn s3_endpoint(cfg: &StoreConfig) -> Option<String> {
    cfg.s3
        .endpoint
        .clone()
        .or_else(|| env_var("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env_var("AWS_ENDPOINT_URL"))
        .or_else(|| env_var("AWS_ENDPOINT"))
}

/// What a URL opens to.
pub(crate) struct Backend {
    /// The store (and its part-level multipart side, if any).
    pub(crate) layer: Layer,
    /// The key prefix every key is relative to.
    pub(crate) root: String,
    /// The URL without credentials.
    pub(crate) describe: String,
    /// For `file://` stores: the directory, so staged blobs can be published by hard link.
    pub(crate) local_root: Option<std::path::PathBuf>,
    /// For S3 stores: the endpoint URL the client talks to (credentials removed), if one
    /// is configured (none: the AWS default for the region).
    pub(crate) endpoint: Option<String>,
}

/// Opens what a (non-fault) URL names.
pub(crate) fn open_backend(url: &str, cfg: &StoreConfig) -> Result<Backend, StoreError> {
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
                layer: Layer::plain(Arc::new(fs)),
                root: String::new(),
                describe,
                local_root: Some(dir),
                endpoint: None,
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
                .map_err(|e| bad(Secrets::known(cfg).scrub(&e.to_string())))?;
            Ok(Backend {
                layer: Layer::of(Arc::new(s3), true),
                root: prefix,
                describe,
                local_root: None,
                endpoint: s3_endpoint(cfg).map(|e| redact(&e)),
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
                layer: Layer::of(mem, true),
                root: String::new(),
                describe,
                local_root: None,
                endpoint: None,
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
    let endpoint = s3_endpoint(cfg);
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
