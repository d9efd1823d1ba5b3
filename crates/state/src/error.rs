//! The state crate's error type.

use cairn_core::{CoreError, DbId, ErrorClass, Generation, TenantId};
use cairn_remote_store::StoreError;

/// Errors of the local state database and of publishing.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another process holds the state directory.
    #[error("state directory {path} is in use by another cairn process (RocksDB lock held)")]
    Locked {
        /// The state directory.
        path: String,
    },
    /// A write through a read-only handle ([`crate::StateDb::open_read_only`]).
    #[error(
        "state directory {path} is open read-only (beside the process that owns it): cannot {op}"
    )]
    ReadOnly {
        /// The state directory.
        path: String,
        /// The refused operation.
        op: &'static str,
    },
    /// A read-only open of a state directory that holds no state database.
    #[error("state directory {path} holds no state database (no cairn command has used it yet)")]
    NoState {
        /// The state directory.
        path: String,
    },
    /// The state directory cannot be created.
    #[error("cannot create state directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
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
    /// A record could not be encoded.
    #[error("cannot encode state record {key}: {source}")]
    Encode {
        /// The record key.
        key: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
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

impl StateError {
    /// What a caller may do about this error. A fenced publish is [`ErrorClass::Fenced`]:
    /// the same plan can never publish, a new one on top of the winner can. A held lock
    /// is transient (the other process may exit); RocksDB's own busy and try-again
    /// answers are transient, its other failures permanent.
    pub fn class(&self) -> ErrorClass {
        match self {
            StateError::Fenced { .. } => ErrorClass::Fenced,
            StateError::Store(e) => e.class(),
            StateError::Core(e) => e.class(),
            StateError::Locked { .. } => ErrorClass::Transient,
            StateError::Rocks { source, .. } => match source.kind() {
                rocksdb::ErrorKind::Busy
                | rocksdb::ErrorKind::TryAgain
                | rocksdb::ErrorKind::TimedOut => ErrorClass::Transient,
                _ => ErrorClass::Permanent,
            },
            StateError::Corrupt { .. } => ErrorClass::Corrupt,
            StateError::CreateDir { .. }
            | StateError::Encode { .. }
            | StateError::ReadOnly { .. }
            | StateError::NoState { .. } => ErrorClass::Permanent,
        }
    }
}
