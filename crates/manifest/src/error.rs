//! The manifest crate's error type.

use cairn_core::{CoreError, DbId, Generation, TenantId};
use cairn_remote_store::StoreError;

/// Errors of the local catalog and of publishing.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Another process holds the state directory.
    #[error("state directory {path} is in use by another cairn process (RocksDB lock held)")]
    Locked {
        /// The state directory.
        path: String,
    },
    /// RocksDB failed.
    #[error("state database {path}: {op}: {source}")]
    Rocks {
        /// What was being done.
        op: &'static str,
        /// The RocksDB directory.
        path: String,
        /// The underlying error.
        #[source]
        source: rocksdb::Error,
    },
    /// A local record or remote manifest is unreadable or inconsistent.
    #[error("corrupt state record {key}: {reason}")]
    Corrupt {
        /// The record key or object key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Another writer published this generation first.
    #[error("fenced: another writer ({winner}) already published generation {generation} of database {tenant}/{db}; nothing was published, retry to build on the new latest generation")]
    Fenced {
        /// Tenant.
        tenant: TenantId,
        /// Database.
        db: DbId,
        /// The contested generation.
        generation: Generation,
        /// The winning writer's identity.
        winner: String,
    },
    /// A format error.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A store error.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ManifestError {
    /// Whether retrying could succeed. A fenced publish is retryable: the retry plans on
    /// top of the winner's generation.
    pub fn is_retryable(&self) -> bool {
        match self {
            ManifestError::Fenced { .. } => true,
            ManifestError::Store(e) => e.is_retryable(),
            ManifestError::Core(e) => e.is_retryable(),
            ManifestError::Locked { .. } => true,
            ManifestError::Rocks { .. } | ManifestError::Corrupt { .. } => false,
        }
    }
}
