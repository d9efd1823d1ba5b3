//! The local state crate: the RocksDB state directory that is this machine's source of
//! truth about what is published, and the publication of manifests to the store.
//!
//! Column families (keys join tenant and database names with `\0`, which names never
//! contain; numbers are big-endian so keys sort numerically):
//!
//! | family | key | value |
//! |---|---|---|
//! | `meta` | `writer_id`, `counter/<name>` | writer identity, durable counters |
//! | `dbs` | tenant `\0` db | [`DbRecord`] (JSON) |
//! | `generations` | tenant `\0` db `\0` generation | encoded manifest |
//! | `catalog` | tenant `\0` db `\0` blob name | [`cairn_core::BlobRef`] (JSON) |
//! | `pagedigests` | tenant `\0` db `\0` chunk index | [`ChunkDigests`] of this writer's latest generation |
//! | `walpositions` | tenant `\0` db | generation, then the [`cairn_core::WalPosition`] of its SQLite snapshot |
//! | `jobs` | see [`jobs`] | the durable job queue's records and items |
//! | `leases` | tenant `\0` db `\0` lease id | [`Lease`] (JSON) |
//!
//! Contract: every state change that must be atomic is one synced RocksDB write batch, and
//! one process owns a state directory at a time; others may read it beside the owner
//! through a read-only handle that cannot write ([`readonly`]). Module by module: [`db`]
//! (opening, the lock, batches, counters), [`catalog`] (generations and blobs), [`digests`] (page
//! digests), [`jobs`] (the queue's storage), [`leases`] (WAL leases), [`mod@publish`]
//! (conditional create, then the local batch; importing others' generations) and
//! [`chain`] (materialising a generation from its full manifest and diffs). What a crash leaves and what is retried is
//! said in each module.

pub mod catalog;
pub mod chain;
pub mod db;
pub mod digests;
mod error;
#[cfg(test)]
mod fixtures;
pub mod jobs;
pub mod leases;
pub mod publish;
pub mod readonly;

pub use catalog::{BlobLookup, DbRecord, LocalUpdates};
pub use chain::{materialize, Walk};
pub use db::StateDb;
pub use digests::ChunkDigests;
pub use error::StateError;
pub use jobs::{ItemKey, ItemWrite};
pub use leases::Lease;
pub use publish::{fetch_manifest, publish, publish_with, remote_databases, remote_generations};
