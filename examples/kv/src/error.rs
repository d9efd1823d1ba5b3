//! The engine's error type: every error names the file, page, segment or LSN it is about.

use std::path::{Path, PathBuf};

use cairn_orchestrator::CairnError;

/// Errors of the key-value engine.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// A file system operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Stored bytes fail their checks (checksum, structure, sequence).
    #[error("{what} is damaged: {reason}")]
    Corrupt {
        /// The page, segment, record or file.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A write does not fit in its page (nothing was logged).
    #[error("page {page} is full: key {key:?} needs {need} bytes, {free} are free")]
    PageFull {
        /// The page the key hashes to.
        page: u32,
        /// The key (lossily decoded).
        key: String,
        /// Bytes the page's entries would need.
        need: usize,
        /// Bytes the page can hold.
        free: usize,
    },
    /// An argument or setting that cannot work.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The argument or setting.
        what: String,
        /// Why.
        reason: String,
    },
    /// Another process holds the data directory.
    #[error("data directory {} is in use by another process", path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// An earlier WAL write failed; the engine refuses further writes until it is reopened.
    #[error("the WAL {} failed an earlier write; reopen the engine to recover", path.display())]
    Poisoned {
        /// The active WAL file.
        path: PathBuf,
    },
    /// Cairn (checkpointing, watermark, truncation, restore) failed.
    #[error("cairn: {0}")]
    Cairn(Box<CairnError>),
}

impl From<CairnError> for KvError {
    fn from(e: CairnError) -> Self {
        KvError::Cairn(Box::new(e))
    }
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, KvError>;

/// Maps an I/O error to [`KvError::Io`] naming `path`.
pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KvError {
    let path = path.to_path_buf();
    move |source| KvError::Io { what, path, source }
}

/// A [`KvError::Corrupt`].
pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> KvError {
    KvError::Corrupt {
        what: what.into(),
        reason: reason.into(),
    }
}

/// A [`KvError::Invalid`].
pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> KvError {
    KvError::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}
