//! The remote store's error type.

use cairn_core::CoreError;

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
    /// Whether retrying the operation could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Backend { retryable, .. } => *retryable,
            // A corrupt read may be a damaged transfer; reading again is worth a try.
            StoreError::Corrupt(_) => true,
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            ),
            StoreError::BadUrl { .. }
            | StoreError::NotFound { .. }
            | StoreError::AlreadyExists { .. }
            | StoreError::WrongSize { .. } => false,
        }
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
                let retryable = matches!(
                    other,
                    object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
                );
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
