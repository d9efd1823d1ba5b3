//! The remote store's error type: one enum for the crate.
//!
//! Contract: every variant names the key, URL or path involved and never carries a
//! credential. [`StoreError::class`] answers "retry this?" with a
//! [`cairn_core::ErrorClass`]; for a failed request the class was decided once, from the
//! request's [`Cause`], when the `object_store` error was converted
//! ([`StoreError::from_object_store`], using `classify.rs`), and it is stored in
//! [`StoreError::Backend`] rather than derived again from text.
//!
//! Stateless: no I/O, nothing to crash, retry or cancel.

use cairn_core::{CoreError, ErrorClass};

use crate::classify::{classify, Cause};
use crate::redact::Secrets;
use crate::retry::GaveUp;

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
    /// An object's size is not one a blob of the manifest's payload length can have.
    #[error("object {key} in {store} has {actual} bytes, which no blob of a {payload_len}-byte payload has")]
    WrongSize {
        /// The object key.
        key: String,
        /// The store's description.
        store: String,
        /// The payload length the manifest records.
        payload_len: u64,
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
        /// What a caller may do about it, decided from `cause` where the error arose.
        class: ErrorClass,
        /// What went wrong, as precisely as the store can tell.
        cause: Cause,
        /// The underlying error (credentials scrubbed).
        #[source]
        source: Box<object_store::Error>,
    },
    /// A response body ended before the length announced for it (a cut-off transfer).
    #[error("{op} {key} on {store}: the body ended after {received} of {expected} bytes")]
    ShortBody {
        /// The operation.
        op: &'static str,
        /// The object key.
        key: String,
        /// The store's description.
        store: String,
        /// Bytes received.
        received: u64,
        /// Bytes announced.
        expected: u64,
    },
    /// A multipart upload finished without a part it sent (a bug, never a store answer).
    #[error("multipart upload of {key} to {store} has no id for part {part}")]
    UploadIncomplete {
        /// The object key.
        key: String,
        /// The store's description.
        store: String,
        /// The part number (from 0).
        part: usize,
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
    /// The reachability probe ([`crate::RemoteStore::probe`]) got no good answer.
    #[error("store {store} is unreachable: {reason}")]
    Unreachable {
        /// The store's description, with its endpoint when it has one.
        store: String,
        /// What the probe saw (an error, or no answer within its timeout).
        reason: String,
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
            StoreError::Backend { class, .. } => *class,
            StoreError::ShortBody { .. } | StoreError::Unreachable { .. } => ErrorClass::Transient,
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
            | StoreError::WrongSize { .. }
            | StoreError::UploadIncomplete { .. } => ErrorClass::Permanent,
        }
    }

    /// Whether retrying the same operation could succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_transient()
    }

    /// What went wrong with the request behind this error, when one was made.
    pub fn cause(&self) -> Option<Cause> {
        match self {
            StoreError::Backend { cause, .. } => Some(*cause),
            StoreError::ShortBody { .. } => Some(Cause::CutOff),
            StoreError::NotFound { .. } => Some(Cause::NotFound),
            StoreError::AlreadyExists { .. } => Some(Cause::AlreadyExists),
            StoreError::RetriesExhausted { last, .. } => last.cause(),
            _ => None,
        }
    }

    /// Whether the store refused an operation as unsupported by the backend (e.g. a
    /// conditional create on a store without it).
    pub fn is_unsupported(&self) -> bool {
        self.cause() == Some(Cause::Unsupported)
    }

    /// Converts an `object_store` error of `op` on `key`: classified once, here, from the
    /// error as it arrived ([`crate::classify`]), then scrubbed of `secrets` (servers echo
    /// the access key id in some error bodies). A retry layer that gave up is reported as
    /// [`StoreError::RetriesExhausted`] around its last error.
    pub(crate) fn from_object_store(
        op: &'static str,
        key: &str,
        store: &str,
        e: object_store::Error,
        secrets: &Secrets,
    ) -> Self {
        let e = match GaveUp::take(e) {
            Ok(g) => {
                let last = Self::from_object_store(op, key, store, g.last, secrets);
                return StoreError::RetriesExhausted {
                    op,
                    key: key.to_string(),
                    store: store.to_string(),
                    attempts: g.attempts,
                    elapsed_ms: g.elapsed_ms,
                    last: Box::new(last),
                };
            }
            Err(e) => e,
        };
        // Only the typed variants are definite answers about the object itself; a 404 that
        // `classify` found in text belongs to another request (a listing of a missing
        // bucket) and stays a backend error.
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
                let cause = classify(&other);
                StoreError::Backend {
                    op,
                    key: key.to_string(),
                    store: store.to_string(),
                    class: cause.class(),
                    cause,
                    source: Box::new(secrets.scrub_error(other)),
                }
            }
        }
    }
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

    fn convert(e: object_store::Error) -> StoreError {
        StoreError::from_object_store("get", "a/b", "memory://m", e, &Secrets::default())
    }

    #[test]
    fn credentials_echoed_by_a_server_are_scrubbed() {
        let e = generic(
            "Server returned non-2xx status code: 403 Forbidden: <AWSAccessKeyId>AKIDSECRETISH</AWSAccessKeyId>",
        );
        let e = StoreError::from_object_store(
            "put",
            "k",
            "s3://b",
            e,
            &Secrets::of(&["AKIDSECRETISH"]),
        );
        let shown = format!("{e} {e:?}");
        assert!(
            !shown.contains("AKIDSECRETISH") && shown.contains("403"),
            "{shown}"
        );
        assert!(!e.is_retryable());
        assert_eq!(e.cause(), Some(Cause::Denied));
    }

    #[test]
    fn transient_and_permanent_errors_are_told_apart() {
        let status = |s: &str| {
            generic(&format!(
                "Error performing PUT http://h/b/k in 1ms - Server returned non-2xx status code: {s}: <Error/>"
            ))
        };
        for transient in [
            status("503 Service Unavailable"),
            status("500 Internal Server Error"),
            status("429 Too Many Requests"),
            generic("Server returned error response: SlowDown"),
            object_store::Error::Generic {
                store: "S3",
                source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            },
        ] {
            let e = convert(transient);
            assert!(e.is_retryable(), "{e}");
            assert_eq!(e.class(), ErrorClass::Transient);
        }
        for permanent in [
            status("400 Bad Request"),
            status("405 Method Not Allowed"),
            status("404 Not Found"),
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
            let e = convert(permanent);
            assert!(!e.is_retryable(), "{e}");
        }
        // A 404 found only in text is not a definite absence of the object.
        assert!(matches!(
            convert(status("404 Not Found")),
            StoreError::Backend {
                cause: Cause::Rejected,
                ..
            }
        ));
        assert!(matches!(
            convert(object_store::Error::NotFound {
                path: "k".into(),
                source: "x".into(),
            }),
            StoreError::NotFound { .. }
        ));
        assert!(convert(status("501 Not Implemented")).is_unsupported());
    }
}
