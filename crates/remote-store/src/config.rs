//! Store tunables and S3 connection settings, from code, a TOML/JSON file or the environment.
//!
//! Contract: [`StoreConfig::default`] suits S3 and a local directory alike;
//! [`StoreConfig::from_file`] reads a TOML file (or JSON when the name ends in `.json`) whose
//! keys are the field names below, every key optional, unknown keys refused;
//! [`StoreConfig::from_env`] reads the file `$CAIRN_STORE_CONFIG` names, if any. S3 settings
//! given here override the standard `AWS_*` environment variables.
//!
//! Credentials live in [`Secret`], whose `Debug` prints `<redacted>` and which has neither
//! `Display` nor `Serialize`; parse errors are scrubbed of every credential value before they
//! are reported, so no error, log line or JSON output can carry one.
//!
//! Stateless: nothing here touches the store; no crash, retry or cancellation concerns.

use std::path::Path;

use serde::Deserialize;

use crate::StoreError;

/// Environment variable naming a store config file that [`StoreConfig::from_env`] (and so
/// [`crate::RemoteStore::open`]) reads.
pub const CONFIG_ENV: &str = "CAIRN_STORE_CONFIG";

/// A credential: its `Debug` never shows the value and it cannot be displayed or serialized.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, for handing to the client that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Transport checksum S3 is asked to verify on every upload request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChecksum {
    /// `x-amz-checksum-crc64nvme` on every PUT and part (the default).
    #[default]
    Crc64nvme,
    /// `x-amz-checksum-sha256` (stores without CRC64-NVME support).
    Sha256,
    /// No checksum header (stores that reject checksum headers).
    None,
}

/// S3 connection settings; each one overrides the matching `AWS_*` environment variable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    /// Endpoint URL (`AWS_ENDPOINT_URL`), e.g. `http://127.0.0.1:9000` for MinIO.
    pub endpoint: Option<String>,
    /// Region (`AWS_REGION`); `us-east-1` when neither is set.
    pub region: Option<String>,
    /// Access key id (`AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<Secret>,
    /// Secret access key (`AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<Secret>,
    /// Session token (`AWS_SESSION_TOKEN`).
    pub session_token: Option<Secret>,
    /// Allow plain `http://` endpoints (`AWS_ALLOW_HTTP`). A loopback `http://` endpoint is
    /// always allowed.
    pub allow_http: Option<bool>,
    /// Virtual-hosted-style requests (`bucket.host/key`); the default is path-style
    /// (`host/bucket/key`), which every S3-compatible server accepts.
    pub virtual_hosted: Option<bool>,
}

/// Tunables of a store. The defaults suit S3 and a local directory alike; `0` means
/// unlimited for every limit.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Blobs larger than this are uploaded as multipart uploads; smaller ones in one PUT.
    pub multipart_threshold: u64,
    /// Multipart part size (S3 requires at least 5 MiB for all but the last part).
    pub part_size: usize,
    /// Parts of one upload in flight at once (each holds one part buffer in memory).
    pub part_concurrency: usize,
    /// Requests in flight at once across the whole store (clones share it); 0 = unlimited.
    pub max_concurrent_requests: usize,
    /// Upload bandwidth limit in bytes per second across the store; 0 = unlimited.
    pub upload_bytes_per_sec: u64,
    /// Download bandwidth limit in bytes per second across the store; 0 = unlimited.
    pub download_bytes_per_sec: u64,
    /// Attempts of one request before giving up on transient errors (at least 1).
    pub retry_max_attempts: u32,
    /// First backoff delay in milliseconds (doubled per retry, with jitter).
    pub retry_initial_backoff_ms: u64,
    /// Largest backoff delay in milliseconds.
    pub retry_max_backoff_ms: u64,
    /// Bound on the total time of one operation's retries in milliseconds; no retry starts
    /// after it.
    pub retry_total_ms: u64,
    /// Reads of a blob whose bytes fail verification before it is reported corrupt (a
    /// damaged transfer heals on a re-read; damage at rest does not).
    pub verify_read_attempts: u32,
    /// HTTP request timeout in milliseconds (`None`: `object_store`'s default of 30 s).
    pub request_timeout_ms: Option<u64>,
    /// HTTP connect timeout in milliseconds (`None`: `object_store`'s default of 5 s).
    pub connect_timeout_ms: Option<u64>,
    /// Retries `object_store`'s HTTP client makes on its own; 0 so that they do not multiply
    /// with this crate's retry layer.
    pub http_retries: usize,
    /// Transport checksum of S3 uploads.
    pub checksum: TransportChecksum,
    /// Skip the conditional-create startup check: the operator guarantees that exactly one
    /// writer ever publishes to this store (see docs/decisions).
    pub single_writer: bool,
    /// S3 connection settings.
    pub s3: S3Settings,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            multipart_threshold: 16 * 1024 * 1024,
            part_size: 8 * 1024 * 1024,
            part_concurrency: 4,
            max_concurrent_requests: 64,
            upload_bytes_per_sec: 0,
            download_bytes_per_sec: 0,
            retry_max_attempts: 10,
            retry_initial_backoff_ms: 100,
            retry_max_backoff_ms: 10_000,
            retry_total_ms: 120_000,
            verify_read_attempts: 3,
            request_timeout_ms: None,
            connect_timeout_ms: None,
            http_retries: 0,
            checksum: TransportChecksum::Crc64nvme,
            single_writer: false,
            s3: S3Settings::default(),
        }
    }
}

impl StoreConfig {
    /// Reads a config file: TOML, or JSON when the name ends in `.json`. Errors name the file
    /// and the line, never a credential.
    pub fn from_file(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| StoreError::Io {
            op: "read store config",
            path: shown.clone(),
            source: e,
        })?;
        let json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let cfg = if json {
            Self::from_json_str(&text)
        } else {
            Self::from_toml_str(&text)
        };
        cfg.map_err(|reason| StoreError::Config {
            path: shown,
            reason,
        })?
        .validated()
        .map_err(|reason| StoreError::Config {
            path: path.display().to_string(),
            reason,
        })
    }

    /// The file `$CAIRN_STORE_CONFIG` names, or the defaults when it is unset or empty.
    pub fn from_env() -> Result<Self, StoreError> {
        match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            Some(p) => Self::from_file(Path::new(&p)),
            None => Ok(Self::default()),
        }
    }

    /// Parses TOML text; the error (line and message) is scrubbed of credentials.
    pub fn from_toml_str(text: &str) -> Result<Self, String> {
        let value: toml::Value = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        let secrets = toml_secrets(&value);
        // Typed deserialization from the same text so the span (line) stays meaningful.
        toml::from_str::<Self>(text).map_err(|e| scrub(&toml_error(text, &e), &secrets))
    }

    /// Parses JSON text; the error (line and message) is scrubbed of credentials.
    pub fn from_json_str(text: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let secrets = json_secrets(&value);
        serde_json::from_value::<Self>(value).map_err(|e| scrub(&e.to_string(), &secrets))
    }

    /// Checks the values that would make the store misbehave.
    pub fn validated(self) -> Result<Self, String> {
        if self.part_size < 5 * 1024 * 1024 {
            return Err(format!(
                "part_size {} is below the 5 MiB S3 minimum",
                self.part_size
            ));
        }
        if self.part_concurrency == 0 {
            return Err("part_concurrency must be at least 1".into());
        }
        if self.retry_max_attempts == 0 || self.verify_read_attempts == 0 {
            return Err("retry_max_attempts and verify_read_attempts must be at least 1".into());
        }
        Ok(self)
    }
}

const SECRET_KEYS: [&str; 3] = ["access_key_id", "secret_access_key", "session_token"];

fn toml_error(text: &str, e: &toml::de::Error) -> String {
    // Only the message and the position: the default rendering quotes the offending line,
    // which may hold a credential.
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {}", e.message().trim())
        }
        None => e.message().trim().to_string(),
    }
}

fn toml_secrets(v: &toml::Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(s3) = v.get("s3").and_then(toml::Value::as_table) {
        for k in SECRET_KEYS {
            if let Some(x) = s3.get(k) {
                out.push(match x {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
        }
    }
    out
}

fn json_secrets(v: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(s3) = v.get("s3").and_then(serde_json::Value::as_object) {
        for k in SECRET_KEYS {
            if let Some(x) = s3.get(k) {
                out.push(match x {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
        }
    }
    out
}

fn scrub(message: &str, secrets: &[String]) -> String {
    let mut m = message.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        m = m.replace(s.as_str(), "<redacted>");
    }
    m
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn toml_and_json_files_parse_with_defaults() {
        let cfg = StoreConfig::from_toml_str(
            r#"
            part_size = 5242880
            max_concurrent_requests = 8
            upload_bytes_per_sec = 1000000
            checksum = "sha256"
            [s3]
            endpoint = "http://127.0.0.1:9000"
            access_key_id = "AKIAEXAMPLE"
            secret_access_key = "SUPERSECRET"
            allow_http = true
            "#,
        )
        .unwrap();
        assert_eq!(cfg.part_size, 5 << 20);
        assert_eq!(cfg.part_concurrency, 4);
        assert_eq!(cfg.checksum, TransportChecksum::Sha256);
        assert_eq!(
            cfg.s3.secret_access_key.as_ref().unwrap().expose(),
            "SUPERSECRET"
        );
        let dbg = format!("{cfg:?}");
        assert!(
            !dbg.contains("SUPERSECRET") && !dbg.contains("AKIAEXAMPLE"),
            "{dbg}"
        );

        let json = StoreConfig::from_json_str(r#"{"single_writer": true, "s3": {"region": "eu"}}"#)
            .unwrap();
        assert!(json.single_writer);
        assert_eq!(json.s3.region.as_deref(), Some("eu"));
    }

    #[test]
    fn errors_name_the_line_but_never_a_credential() {
        let e = StoreConfig::from_toml_str("part_size = 1\n[s3]\nsecret_access_key = 12345678\n")
            .unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        assert!(!e.contains("12345678"), "{e}");
        let e = StoreConfig::from_toml_str("[s3]\nsecret_access_key = \"abc\ndef\"\n").unwrap_err();
        assert!(!e.contains("abc"), "{e}");
        let e = StoreConfig::from_toml_str("unknown_key = 1").unwrap_err();
        assert!(e.contains("unknown_key"), "{e}");
        let e =
            StoreConfig::from_json_str(r#"{"s3": {"secret_access_key": 987654321}}"#).unwrap_err();
        assert!(!e.contains("987654321"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("store.toml");
        std::fs::write(&p, "part_size = 1024\n").unwrap();
        let e = StoreConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("store.toml") && e.contains("5 MiB"), "{e}");
    }
}
