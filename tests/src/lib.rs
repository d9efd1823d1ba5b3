//! Shared helpers for Cairn end-to-end tests and benchmarks: a real S3 server on 127.0.0.1,
//! source fixtures, benchmark statistics and the `rclone` reference client.

pub mod bench;
pub mod fixtures;
pub mod gate;
pub mod proxy;
pub mod rclone;
pub mod s3;
