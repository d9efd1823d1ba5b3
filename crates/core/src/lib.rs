//! Cairn's core vocabulary: identifiers, content addresses, and the byte layout of every
//! blob and manifest Cairn writes (see `docs/FORMATS.md`).
//!
//! This crate is pure: no async, no I/O backends. Everything here is a function of its
//! inputs, so the planner, the executor and the store can share it without pulling in
//! RocksDB or `object_store`.

pub mod address;
pub mod blob;
pub mod delta;
pub mod dirty;
pub mod error;
pub mod ids;
pub mod keys;
pub mod manifest;
pub mod sqlite_segment;
pub mod sqlite_wal;

pub use address::{BlobKind, BlobRef, ContentAddress, Digest128, PayloadHasher};
pub use dirty::{DirtySet, DirtyTracker};
pub use error::{CoreError, ErrorClass};
pub use ids::{DbId, Generation, JobId, Lsn, TenantId};
pub use manifest::{
    ChunkState, Content, DbState, GcState, Manifest, PagesDiff, PagesState, SegmentEntry,
    SourceKind, StateDiff, WalDiff, WalState,
};
pub use sqlite_wal::WalPosition;
