//! The remote store's error type.

use cairn_core::{CoreError, ErrorClass};

/// Errors from the object store seam. Every variant names the key, URL or path involved;
/// none ever carries credentials.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL cannot be used.
    #[error("bad store URL {url}: {reason}")]
    BadUrl {
        /// The URL, with any credentials removed.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The object does not exist.
    #[error("object {key} not found in {store}")]
    NotFound {
        /// The object key (relative to the store root).
        key: String,
        /// The store's description.
        store: String,
    },
    /// A conditional create found the object already there.
    #[error("object {key} already exists in {store}")]
    AlreadyExists {
        /// The object key.
        key: String,
        /// The store's description.
        store: String,
    },
    /// The bytes read or about to be written do not match their checksums.
    #[error("{0}")]
    Corrupt(#[from] CoreError),
    /// An object's size differs from what the manifest says.
    #[error("object {key} in {store} has {actual} bytes, expected {expected}")]
    WrongSize {
        /// The object key.
        key: String,
        /// The store's description.
        store: String,
        /// Expected object size.
        expected: u64,
        /// Actual object size.
        actual: u64,
    },
    /// The store refused or failed the request.
    #[error("{op} {key} on {store} failed: {source}")]
    Backend {
        /// The operation (put, get, head, list, delete).
        op: &'static str,
        /// The object key or prefix.
        key: String,
        /// The store's description.
        store: String,
        /// Whether a retry could succeed.
        retryable: bool,
        /// The underlying error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// A range read asked for bytes outside the blob's payload.
    #[error("range {start}..{end} of {key} in {store} is outside its {len}-byte payload")]
    BadRange {
        /// The object key.
        key: String,
        /// The store's description.
        store: String,
        /// Requested start.
        start: u64,
        /// Requested end (exclusive).
        end: u64,
        /// Payload length.
        len: u64,
    },
    /// A store config file cannot be read or used.
    #[error("store config {path}: {reason}")]
    Config {
        /// The config file.
        path: String,
        /// What is wrong (credentials scrubbed).
        reason: String,
    },
    /// The store does not honour conditional create, which publication depends on.
    #[error(
        "store {store} does not honour conditional create: {reason} (probe object {probe}). \
         Cairn publishes each generation with a create-if-absent and relies on the store to \
         refuse the second one; use a store that supports it (AWS S3, MinIO, and most \
         S3-compatible servers with If-None-Match), or, only if exactly one writer will ever \
         publish to this store, set single_writer = true in the store config (single-writer \
         mode, docs/decisions/0012-conditional-create-check.md)"
    )]
    ConditionalCreateUnsupported {
        /// The store's description.
        store: String,
        /// The probe key used.
        probe: String,
        /// What the probe observed.
        reason: String,
    },
    /// A transient failure persisted through every retry.
    #[error(
        "gave up on {op} {key} on {store} after {attempts} attempt(s) in {elapsed_ms} ms: {last}"
    )]
    RetriesExhausted {
        /// The operation.
        op: &'static str,
        /// The object key or prefix.
        key: String,
        /// The store's description.
        store: String,
        /// Attempts made.
        attempts: u32,
        /// Time spent, milliseconds.
        elapsed_ms: u64,
        /// The last error.
        #[source]
        last: Box<StoreError>,
    },
    /// A local file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The local path.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// What a caller may do about this error (see [`ErrorClass`]). A read that still fails
    /// verification after the store's own re-reads is damage at rest, not a transient
    /// failure.
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::Backend { retryable, .. } => {
                if *retryable {
                    ErrorClass::Transient
                } else {
                    ErrorClass::Permanent
                }
            }
            StoreError::Corrupt(_) => ErrorClass::Corrupt,
            StoreError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut => {
                    ErrorClass::Transient
                }
                _ => ErrorClass::Permanent,
            },
            // The cause was transient: a later attempt (a resumed job) may succeed.
            StoreError::RetriesExhausted { last, .. } => last.class(),
            StoreError::BadUrl { .. }
            | StoreError::Config { .. }
            | StoreError::BadRange { .. }
            | StoreError::ConditionalCreateUnsupported { .. }
            | StoreError::NotFound { .. }
            | StoreError::AlreadyExists { .. }
            | StoreError::WrongSize { .. } => ErrorClass::Permanent,
        }
    }

    /// Whether retrying the same operation could succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_transient()
    }

    /// Whether the store refused an operation as unsupported by the backend (e.g. a
    /// conditional create on a store without it).
    pub fn is_unsupported(&self) -> bool {
        match self {
            StoreError::Backend { source, .. } => match source.as_ref() {
                object_store::Error::NotImplemented { .. }
                | object_store::Error::NotSupported { .. } => true,
                object_store::Error::Generic { source, .. } => {
                    matches!(http_status(&source.to_string()), Some(501))
                }
                _ => false,
            },
            StoreError::RetriesExhausted { last, .. } => last.is_unsupported(),
            _ => false,
        }
    }

    /// [`StoreError::backend`] with every occurrence of `secrets` removed from the
    /// underlying error's text (servers echo the access key id in some error bodies).
    pub(crate) fn backend_scrubbed(
        op: &'static str,
        key: &str,
        store: &str,
        e: object_store::Error,
        secrets: &[String],
    ) -> Self {
        Self::backend(op, key, store, scrub_error(e, secrets))
    }

    pub(crate) fn backend(
        op: &'static str,
        key: &str,
        store: &str,
        e: object_store::Error,
    ) -> Self {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound {
                key: key.to_string(),
                store: store.to_string(),
            },
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => StoreError::AlreadyExists {
                key: key.to_string(),
                store: store.to_string(),
            },
            other => {
                let retryable = is_transient(&other);
                StoreError::Backend {
                    op,
                    key: key.to_string(),
                    store: store.to_string(),
                    retryable,
                    source: Box::new(other),
                }
            }
        }
    }
}

/// Rebuilds `e` with a plain-text source if its text contains any of `secrets`.
fn scrub_error(e: object_store::Error, secrets: &[String]) -> object_store::Error {
    let text = e.to_string();
    if !secrets.iter().any(|s| text.contains(s.as_str())) {
        return e;
    }
    if !matches!(
        e,
        object_store::Error::Generic { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
    ) {
        return e;
    }
    let clean = |t: String| -> Box<dyn std::error::Error + Send + Sync> {
        let mut t = t;
        for s in secrets {
            t = t.replace(s.as_str(), "<redacted>");
        }
        t.into()
    };
    match e {
        object_store::Error::Generic { store, source } => object_store::Error::Generic {
            store,
            source: clean(source.to_string()),
        },
        object_store::Error::PermissionDenied { path, source } => {
            object_store::Error::PermissionDenied {
                path,
                source: clean(source.to_string()),
            }
        }
        object_store::Error::Unauthenticated { path, source } => {
            object_store::Error::Unauthenticated {
                path,
                source: clean(source.to_string()),
            }
        }
        // The rest never carry a server's response body (and not-found, exists and
        // precondition errors are reported without their source): keep them as they are so
        // their classification stays intact.
        other => other,
    }
}

/// Whether an `object_store` error is worth retrying: timeouts, connection failures and
/// resets, 5xx, throttling (429, 503 SlowDown) and error bodies in 200 responses. Never:
/// not found, already exists, precondition failed, permission denied, unauthenticated,
/// unsupported operations, bad paths or configuration, and other 4xx.
pub(crate) fn is_transient(e: &object_store::Error) -> bool {
    use object_store::client::HttpErrorKind;
    match e {
        object_store::Error::Generic { source, .. } => {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
            while let Some(err) = cur {
                if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
                    return matches!(
                        h.kind(),
                        HttpErrorKind::Connect
                            | HttpErrorKind::Request
                            | HttpErrorKind::Timeout
                            | HttpErrorKind::Interrupted
                            | HttpErrorKind::Decode
                            | HttpErrorKind::Unknown
                    );
                }
                if let Some(io) = err.downcast_ref::<std::io::Error>() {
                    use std::io::ErrorKind as K;
                    return matches!(
                        io.kind(),
                        K::ConnectionReset
                            | K::ConnectionAborted
                            | K::ConnectionRefused
                            | K::BrokenPipe
                            | K::TimedOut
                            | K::Interrupted
                            | K::UnexpectedEof
                            | K::NotConnected
                    );
                }
                cur = err.source();
            }
            match http_status(&source.to_string()) {
                // 501 Not Implemented and 505 are answers, not accidents.
                Some(s) => (s >= 500 && s != 501 && s != 505) || s == 429 || s == 408,
                // Not an HTTP status failure: a malformed or cut-off response, an injected
                // fault, a dropped connection described only in text. Retrying is safe: every
                // operation is idempotent or resolved by reading back.
                None => !source.to_string().contains("redirect"),
            }
        }
        object_store::Error::JoinError { .. } => true,
        _ => false,
    }
}

/// The HTTP status `object_store` reports in its error text ("status code: 503 ...").
fn http_status(text: &str) -> Option<u16> {
    let rest = &text[text.find("status code: ")? + "status code: ".len()..];
    rest.get(..3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn generic(msg: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: msg.to_string().into(),
        }
    }

    #[test]
    fn credentials_echoed_by_a_server_are_scrubbed() {
        let e = generic(
            "Server returned non-2xx status code: 403 Forbidden: <AWSAccessKeyId>AKIDSECRETISH</AWSAccessKeyId>",
        );
        let e = StoreError::backend_scrubbed("put", "k", "s3://b", e, &["AKIDSECRETISH".into()]);
        let shown = format!("{e} {e:?}");
        assert!(
            !shown.contains("AKIDSECRETISH") && shown.contains("403"),
            "{shown}"
        );
        assert!(!e.is_retryable());
    }

    #[test]
    fn transient_and_permanent_errors_are_told_apart() {
        let status = |s: &str| {
            generic(&format!(
                "Error performing PUT http://h/b/k in 1ms - Server returned non-2xx status code: {s}: <Error/>"
            ))
        };
        assert!(is_transient(&status("503 Service Unavailable")));
        assert!(is_transient(&status("500 Internal Server Error")));
        assert!(is_transient(&status("429 Too Many Requests")));
        assert!(!is_transient(&status("400 Bad Request")));
        assert!(!is_transient(&status("405 Method Not Allowed")));
        assert!(is_transient(&generic(
            "Server returned error response: SlowDown"
        )));
        assert!(is_transient(&object_store::Error::Generic {
            store: "S3",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        }));
        for permanent in [
            object_store::Error::NotFound {
                path: "k".into(),
                source: "x".into(),
            },
            object_store::Error::Precondition {
                path: "k".into(),
                source: "x".into(),
            },
            object_store::Error::AlreadyExists {
                path: "k".into(),
                source: "x".into(),
            },
            object_store::Error::PermissionDenied {
                path: "k".into(),
                source: "x".into(),
            },
            object_store::Error::Unauthenticated {
                path: "k".into(),
                source: "x".into(),
            },
            object_store::Error::NotImplemented {
                operation: "x".into(),
                implementer: "y".into(),
            },
        ] {
            assert!(!is_transient(&permanent), "{permanent}");
            let e = StoreError::backend("get", "a/b", "memory://m", permanent);
            assert!(!e.is_retryable(), "{e}");
        }
    }
}
