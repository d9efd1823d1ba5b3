//! The error kinds shared by every crate that decodes Cairn's formats.

/// Errors raised while validating identifiers or decoding blobs and manifests.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A tenant or database name that cannot be used as part of an object key.
    #[error("invalid {what} name {name:?}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.'")]
    InvalidName {
        /// Which kind of name (tenant, database).
        what: &'static str,
        /// The rejected name.
        name: String,
    },
    /// A blob whose bytes do not match its format or its content address.
    #[error("corrupt blob {name}: {reason}")]
    CorruptBlob {
        /// The blob's object key or name.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// A manifest that cannot be decoded or is internally inconsistent.
    #[error("corrupt manifest {name}: {reason}")]
    CorruptManifest {
        /// The manifest's object key or name.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// A format version newer than this build understands.
    #[error("{name}: {what} format version {version} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The object key or name.
        name: String,
        /// Blob or manifest.
        what: &'static str,
        /// The version found.
        version: u32,
        /// The version this build reads.
        supported: u32,
    },
}

impl CoreError {
    /// Whether retrying the operation that produced this error could succeed.
    ///
    /// Decoding errors describe bytes, not a transient condition; a caller that read the
    /// bytes from the network may still choose to read them again.
    pub fn is_retryable(&self) -> bool {
        false
    }
}
