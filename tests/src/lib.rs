//! Shared helpers for Cairn end-to-end tests: a real S3 server on 127.0.0.1 and source
//! fixtures.

pub mod fixtures;
pub mod gate;
pub mod s3;
