//! The executor's error type.

use cairn_core::ErrorClass;

/// Errors from reading sources, staging blobs and assembling restored files.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The source cannot be checkpointed as asked.
    #[error("source {path}: {reason}")]
    BadSource {
        /// The source path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// SQLite refused an operation on a database.
    #[error("SQLite database {path}: {source}")]
    Sqlite {
        /// The database path.
        path: String,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },
    /// A source changed between two reads of the same checkpoint.
    #[error("source {path} changed while it was being checkpointed: {detail}")]
    SourceChanged {
        /// The source path.
        path: String,
        /// What changed.
        detail: String,
    },
    /// The scratch space budget is exhausted.
    #[error("scratch space: {0}")]
    Quota(#[from] cairn_quota::QuotaError),
    /// A segment that does not decode (its error names it).
    #[error(transparent)]
    Format(#[from] cairn_core::CoreError),
    /// A payload could not be encoded as a blob (zstd failed to compress it).
    #[error("staging a blob in {dir}: {source}")]
    Encode {
        /// The job's scratch directory.
        dir: String,
        /// The encoder's error.
        #[source]
        source: cairn_core::CoreError,
    },
}

impl ExecError {
    /// What a caller may do about this error. Interrupted or timed-out I/O and a full
    /// disk are transient (the condition may pass), as are a busy SQLite database and a
    /// source that changed between two reads (a new attempt plans again); the rest is
    /// permanent.
    pub fn class(&self) -> ErrorClass {
        match self {
            ExecError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::Interrupted
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::StorageFull => ErrorClass::Transient,
                _ => ErrorClass::Permanent,
            },
            ExecError::Sqlite { source, .. } => match source.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                    ErrorClass::Transient
                }
                _ => ErrorClass::Permanent,
            },
            ExecError::SourceChanged { .. } => ErrorClass::Transient,
            ExecError::Quota(q) => q.class(),
            ExecError::Format(e) => e.class(),
            ExecError::BadSource { .. } => ErrorClass::Permanent,
            ExecError::Encode { source, .. } => source.class(),
        }
    }

    pub(crate) fn io(
        op: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> ExecError {
        let path = path.display().to_string();
        move |source| ExecError::Io { op, path, source }
    }
}
