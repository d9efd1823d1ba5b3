//! The executor: reads sources, stages blobs in per-job scratch directories (streamed,
//! checksummed, fsynced, write-then-rename) and assembles restored files. It never talks to
//! RocksDB; the orchestrator decides what to stage and records what was staged.

pub mod assemble;
pub mod compose;
pub mod error;
mod fsutil;
mod kept;
pub mod point;
pub mod scratch;
pub mod source;
pub mod sqlite;
pub mod sqlite_apply;
pub mod sqlite_control;
pub mod sqlite_spool;

pub use assemble::{AssemblyWriter, DirAssembler, FileAssembler};
pub use compose::{held_from, BaseWrite, Composer, DeltaPiece, HeldPiece, Part};
pub use error::ExecError;
pub use point::PointAssembler;
pub use scratch::{JobScratch, Scratch, ScratchUsage, StagedBlob};
pub use source::{
    hash_range, list_segments, page_digest, read_pages, scan_pages, sqlite_integrity_check,
    PageFile, PageScan, ReadAt, SegmentFile,
};
pub use sqlite::{FullScanReason, SqliteSnapshot};
pub use sqlite_apply::{apply_segments, Applied};
pub use sqlite_control::{frames_to_ship, Shipped, SqliteControl, Truncation};
pub use sqlite_spool::{Spool, Spooled};
