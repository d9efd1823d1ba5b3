//! `cairn-kv`: a small key-value storage engine that checkpoints itself with Cairn, using
//! only the public API of `cairn-orchestrator` (the example engine of the repository).
//!
//! - Data: a page file of fixed-size 4 KiB pages (page 0 a header holding the LSN the
//!   file is flushed to, the others hash buckets), flushed atomically through a
//!   double-write buffer ([`pagefile`]).
//! - WAL: checksummed records synced at commit, LSN = byte offset, sealed into segments
//!   named by their first LSN ([`wal`]).
//! - Engine: commits, recovery after `kill -9`, flushes that mark written pages in the
//!   [`cairn_orchestrator::DirtyTracker`] ([`engine`]).
//! - Cairn: segments shipped, page checkpoints at LSNs, local WAL deleted below the
//!   watermark, the store's head truncated ([`replica`]); restore to any LSN on a fresh
//!   machine by replaying the restored segments ([`restore`]).
//! - The `cairn-kv` binary runs a deterministic workload ([`workload`], [`driver`]).

pub mod driver;
pub mod engine;
pub mod error;
pub mod page;
pub mod pagefile;
pub mod replica;
pub mod restore;
pub mod wal;
pub mod workload;

pub use engine::{Committed, Flushed, Kv, Opened, Options};
pub use error::{KvError, Result};
pub use wal::Op;
pub use workload::Workload;
