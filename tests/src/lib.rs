//! Shared helpers for Cairn end-to-end tests.

pub mod s3;
