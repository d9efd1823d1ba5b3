//! One rule for what a failed request means: its [`Cause`], and from the cause its
//! [`ErrorClass`].
//!
//! Contract: [`classify`] maps an `object_store` error to exactly one [`Cause`]; every cause
//! belongs to exactly one class ([`Cause::class`]). The retry layer, the statistics layer
//! and the conversion into [`crate::StoreError`] all ask this one function, so what is
//! retried, what is counted and what the caller is told can never disagree. The decision is
//! made from types wherever `object_store` offers them, in this order:
//!
//! 1. the `object_store::Error` variant (not found, already exists, precondition, denied,
//!    unauthenticated, not implemented or supported, bad path, task failure);
//! 2. through the error's source chain: this crate's own [`TransientFault`] (cut-off bodies
//!    and injected faults), `object_store::client::HttpError::kind()` (connect, request,
//!    timeout, interrupted, decode), and `std::io::Error::kind()`;
//! 3. only then the error text, for the HTTP status of a failed response and for S3's error
//!    body in a 200 response. `object_store` 0.14 keeps both in `client::retry::RetryError`
//!    (`status()`, `body()`), but that type lives in a private module: it cannot be named,
//!    so it cannot be downcast to, and its `Display` text is all that reaches a caller. The
//!    unit tests below pin those formats.
//!
//! A failure with no detail at all (a `Generic` error whose text carries no status) counts
//! as [`Cause::Unknown`], which is transient: retrying is safe because every operation of
//! this crate is idempotent or settled by reading back.
//!
//! Stateless: no I/O, nothing to crash, retry or cancel.

use cairn_core::ErrorClass;

/// What went wrong with a request, as precisely as the store can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Cause {
    /// No connection could be made (refused, unreachable, connect timeout). Transient, but
    /// an endpoint that never answers is worth telling apart from one that answered once.
    Connect,
    /// The request or its response timed out (also HTTP 408). Transient.
    Timeout,
    /// The connection broke during the request or its response (reset, closed, aborted).
    /// Transient.
    Interrupted,
    /// The server failed (HTTP 5xx other than 501, 503 and 505; an error body in a 200
    /// response). Transient.
    ServerError,
    /// The server asked to slow down (HTTP 429 and 503, S3's `SlowDown`). Transient.
    Throttled,
    /// A response body ended before the length announced for it, without an error.
    /// Transient: the rest is read again (or from where it stopped).
    CutOff,
    /// A response that could not be decoded. Transient.
    BadResponse,
    /// A failure with no detail (a client task failed, an error described only in text).
    /// Transient: retrying is safe because every operation of the store is idempotent or
    /// settled by reading back.
    Unknown,
    /// The object does not exist: a definite absence. Permanent.
    NotFound,
    /// The object already exists, or a precondition failed. Permanent.
    AlreadyExists,
    /// Permission denied or not authenticated (HTTP 401, 403). Permanent.
    Denied,
    /// The store does not support the operation (HTTP 501, 505, not implemented).
    /// Permanent.
    Unsupported,
    /// The store refused the request as it was made (other 4xx, bad path or
    /// configuration, a redirect without a location). Permanent.
    Rejected,
    /// A local file system error of a `file://` store (full disk, a permission, a missing
    /// directory). Permanent.
    LocalIo,
}

impl Cause {
    /// Every cause, in a fixed order (the order of the statistics' counters).
    pub const ALL: [Cause; 14] = [
        Cause::Connect,
        Cause::Timeout,
        Cause::Interrupted,
        Cause::ServerError,
        Cause::Throttled,
        Cause::CutOff,
        Cause::BadResponse,
        Cause::Unknown,
        Cause::NotFound,
        Cause::AlreadyExists,
        Cause::Denied,
        Cause::Unsupported,
        Cause::Rejected,
        Cause::LocalIo,
    ];

    /// The class of every error with this cause.
    pub fn class(self) -> ErrorClass {
        match self {
            Cause::Connect
            | Cause::Timeout
            | Cause::Interrupted
            | Cause::ServerError
            | Cause::Throttled
            | Cause::CutOff
            | Cause::BadResponse
            | Cause::Unknown => ErrorClass::Transient,
            Cause::NotFound
            | Cause::AlreadyExists
            | Cause::Denied
            | Cause::Unsupported
            | Cause::Rejected
            | Cause::LocalIo => ErrorClass::Permanent,
        }
    }

    /// Whether a retry could succeed.
    pub fn is_transient(self) -> bool {
        self.class().is_transient()
    }

    /// Position in [`Cause::ALL`] (the declaration order; a unit test checks it).
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A transient failure this crate detected or injected itself, carried as the source of an
/// `object_store::Error::Generic` so that it is classified by its type, never by its text.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct TransientFault {
    cause: Cause,
    message: String,
}

impl TransientFault {
    /// An `object_store` error from `store` with this cause and message.
    pub(crate) fn error(store: &'static str, cause: Cause, message: String) -> object_store::Error {
        object_store::Error::Generic {
            store,
            source: Box::new(TransientFault { cause, message }),
        }
    }
}

/// The cause of an `object_store` error (see the module documentation for the order).
pub(crate) fn classify(e: &object_store::Error) -> Cause {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Cause::NotFound,
        E::AlreadyExists { .. } | E::Precondition { .. } => Cause::AlreadyExists,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => Cause::Denied,
        E::NotImplemented { .. } | E::NotSupported { .. } => Cause::Unsupported,
        // A task of the client failed or was cancelled: nothing says the request was wrong.
        E::JoinError { .. } => Cause::Unknown,
        E::Generic { source, .. } => match source.downcast_ref::<crate::retry::GaveUp>() {
            // What the retry layer gave up on.
            Some(g) => classify(&g.last),
            None => classify_source(source.as_ref()),
        },
        // Bad paths, "not modified" (never asked for), unknown configuration keys, and
        // variants added later.
        _ => Cause::Rejected,
    }
}

fn classify_source(source: &(dyn std::error::Error + 'static)) -> Cause {
    use object_store::client::{HttpError, HttpErrorKind};
    let mut cur = Some(source);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<TransientFault>() {
            return t.cause;
        }
        if let Some(h) = err.downcast_ref::<HttpError>() {
            return match h.kind() {
                HttpErrorKind::Connect => Cause::Connect,
                HttpErrorKind::Timeout => Cause::Timeout,
                HttpErrorKind::Request | HttpErrorKind::Interrupted => Cause::Interrupted,
                HttpErrorKind::Decode => Cause::BadResponse,
                _ => Cause::Unknown,
            };
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io_cause(io.kind());
        }
        cur = err.source();
    }
    cause_from_text(&source.to_string())
}

/// The cause of a failed local or socket I/O operation.
pub(crate) fn io_cause(kind: std::io::ErrorKind) -> Cause {
    use std::io::ErrorKind as K;
    match kind {
        K::ConnectionRefused | K::NotConnected => Cause::Connect,
        K::TimedOut => Cause::Timeout,
        K::ConnectionReset
        | K::ConnectionAborted
        | K::BrokenPipe
        | K::UnexpectedEof
        | K::Interrupted => Cause::Interrupted,
        K::PermissionDenied => Cause::Denied,
        _ => Cause::LocalIo,
    }
}

/// The one place that reads error text: see the module documentation for why.
fn cause_from_text(text: &str) -> Cause {
    if let Some(status) = http_status(text) {
        return status_cause(status);
    }
    // `RequestError::Response`: S3 reports some failures (InternalError, SlowDown) as an
    // error body in a 200 response.
    if text.contains("Server returned error response") {
        return if text.contains("SlowDown") {
            Cause::Throttled
        } else {
            Cause::ServerError
        };
    }
    // `RequestError::BareRedirect`: a wrong region or endpoint; asking again changes nothing.
    if text.contains("redirect") {
        return Cause::Rejected;
    }
    Cause::Unknown
}

/// The cause of an HTTP status `object_store` reported as a failure.
fn status_cause(status: u16) -> Cause {
    match status {
        408 => Cause::Timeout,
        429 | 503 => Cause::Throttled,
        // Answers, not accidents: not implemented, HTTP version not supported.
        501 | 505 => Cause::Unsupported,
        500..=599 => Cause::ServerError,
        401 | 403 => Cause::Denied,
        // `object_store` turns 404, 409 and 412 answers about an object into typed errors;
        // one seen only in text answered another request (the listing of a missing bucket),
        // and must never pass for a definite absence or presence of the object.
        _ => Cause::Rejected,
    }
}

/// The HTTP status in `RetryError`'s text ("... status code: 503 Service Unavailable ...").
fn http_status(text: &str) -> Option<u16> {
    const MARK: &str = "status code: ";
    let rest = &text[text.find(MARK)? + MARK.len()..];
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

    /// The formats `object_store` 0.14's `RetryError` prints (client/retry.rs).
    fn status(s: &str) -> object_store::Error {
        generic(&format!(
            "Error performing PUT http://h/b/k in 1ms - Server returned non-2xx status code: {s}: <Error/>"
        ))
    }

    #[test]
    fn statuses_in_text_are_classified() {
        for (s, want) in [
            ("503 Service Unavailable", Cause::Throttled),
            ("500 Internal Server Error", Cause::ServerError),
            ("502 Bad Gateway", Cause::ServerError),
            ("429 Too Many Requests", Cause::Throttled),
            ("408 Request Timeout", Cause::Timeout),
            ("400 Bad Request", Cause::Rejected),
            ("405 Method Not Allowed", Cause::Rejected),
            ("501 Not Implemented", Cause::Unsupported),
        ] {
            assert_eq!(classify(&status(s)), want, "{s}");
        }
        assert_eq!(
            classify(&generic(
                "Error performing PUT http://h/b/k in 1ms - Server returned error response: <Code>SlowDown</Code>"
            )),
            Cause::Throttled
        );
        assert_eq!(
            classify(&generic("Server returned error response: InternalError")),
            Cause::ServerError
        );
        assert_eq!(
            classify(&generic(
                "Error performing GET in 1ms - Received redirect without LOCATION, this normally indicates an incorrectly configured region"
            )),
            Cause::Rejected
        );
        assert_eq!(classify(&generic("something odd")), Cause::Unknown);
    }

    #[test]
    fn typed_causes_need_no_text() {
        use object_store::client::{HttpError, HttpErrorKind};
        let http = |kind| object_store::Error::Generic {
            store: "S3",
            source: Box::new(HttpError::new(
                kind,
                std::io::Error::other("the text says 503 status code: 503"),
            )),
        };
        assert_eq!(classify(&http(HttpErrorKind::Connect)), Cause::Connect);
        assert_eq!(classify(&http(HttpErrorKind::Timeout)), Cause::Timeout);
        assert_eq!(classify(&http(HttpErrorKind::Request)), Cause::Interrupted);
        assert_eq!(classify(&http(HttpErrorKind::Decode)), Cause::BadResponse);
        assert_eq!(
            classify(&object_store::Error::Generic {
                store: "S3",
                source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            }),
            Cause::Interrupted
        );
        assert_eq!(
            classify(&object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(std::io::Error::from(std::io::ErrorKind::StorageFull)),
            }),
            Cause::LocalIo
        );
        // Our own faults say what they are, whatever their text claims.
        let cut = TransientFault::error("t", Cause::CutOff, "status code: 404".into());
        assert_eq!(classify(&cut), Cause::CutOff);
        for (e, want) in [
            (
                object_store::Error::NotFound {
                    path: "k".into(),
                    source: "x".into(),
                },
                Cause::NotFound,
            ),
            (
                object_store::Error::Precondition {
                    path: "k".into(),
                    source: "x".into(),
                },
                Cause::AlreadyExists,
            ),
            (
                object_store::Error::AlreadyExists {
                    path: "k".into(),
                    source: "x".into(),
                },
                Cause::AlreadyExists,
            ),
            (
                object_store::Error::PermissionDenied {
                    path: "k".into(),
                    source: "x".into(),
                },
                Cause::Denied,
            ),
            (
                object_store::Error::Unauthenticated {
                    path: "k".into(),
                    source: "x".into(),
                },
                Cause::Denied,
            ),
            (
                object_store::Error::NotImplemented {
                    operation: "x".into(),
                    implementer: "y".into(),
                },
                Cause::Unsupported,
            ),
        ] {
            assert_eq!(classify(&e), want, "{e}");
            assert!(!want.is_transient());
        }
    }

    #[test]
    fn causes_are_indexed_and_classed() {
        for (i, c) in Cause::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        assert!(Cause::Connect.is_transient() && !Cause::NotFound.is_transient());
    }
}
