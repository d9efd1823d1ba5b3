//! The error kinds shared by every crate: [`ErrorClass`], the one typed answer to "retry
//! this?", and [`CoreError`], the errors of decoding Cairn's formats.

/// What a caller may do about an error, decided once where its cause is known and passed
/// on unchanged by every layer above (each crate's error has a `class()` method).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// A passing condition (a timeout, a reset connection, a 5xx, throttling, a busy
    /// database): the same operation may succeed if it is tried again later.
    Transient,
    /// The operation cannot succeed as asked (bad input, a missing object, a refusal, a
    /// broken invariant): trying again gives the same answer.
    Permanent,
    /// Another writer published first. Repeating the same plan can never succeed; a new
    /// plan on top of the winner's generation can.
    Fenced,
    /// Bytes failed their checksums even after the store's own re-reads: damage at rest.
    Corrupt,
}

impl ErrorClass {
    /// Whether retrying the same operation could succeed (only [`ErrorClass::Transient`]).
    pub fn is_transient(self) -> bool {
        self == ErrorClass::Transient
    }
}

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
    /// zstd failed to compress a payload (a resource failure, not a property of the data).
    #[error("compressing {what} with zstd at level {level}: {source}")]
    Compress {
        /// The blob (its name) being written.
        what: String,
        /// The zstd level asked for.
        level: i32,
        /// zstd's error.
        source: std::io::Error,
    },
    /// A zstd decompression context could not be set up (a resource failure).
    #[error("{name}: cannot set up a zstd decoder: {source}")]
    DecoderSetup {
        /// The object key or name being read.
        name: String,
        /// zstd's error.
        source: std::io::Error,
    },
}

impl CoreError {
    /// Decoding errors describe bytes, not a passing condition: damaged bytes are
    /// [`ErrorClass::Corrupt`], a bad name or an unknown version is permanent. (A caller
    /// that read the bytes from the network re-reads them itself before it reports this.)
    pub fn class(&self) -> ErrorClass {
        match self {
            CoreError::CorruptBlob { .. } | CoreError::CorruptManifest { .. } => {
                ErrorClass::Corrupt
            }
            CoreError::InvalidName { .. }
            | CoreError::UnsupportedVersion { .. }
            | CoreError::Compress { .. }
            | CoreError::DecoderSetup { .. } => ErrorClass::Permanent,
        }
    }
}
