//! Test fixtures shared by the crate's unit tests.
#![allow(clippy::unwrap_used)]

use cairn_core::{Content, DbId, DbState, Generation, Manifest, TenantId, WalState};

/// Generation `g` of database `t/d` by `writer`: an empty WAL stream, full content.
pub(crate) fn manifest(g: u64, writer: &str, created_unix_ms: u64) -> Manifest {
    Manifest {
        format: 2,
        tenant: TenantId::new("t").unwrap(),
        db: DbId::new("d").unwrap(),
        generation: Generation(g),
        parent: (g > 1).then(|| Generation(g - 1)),
        writer: writer.into(),
        created_unix_ms,
        job: None,
        content: Content::Full(DbState {
            pages: None,
            wal: Some(WalState {
                start: cairn_core::Lsn(0),
                end: cairn_core::Lsn(0),
                last_name: None,
                segments: vec![],
            }),
            gc: Default::default(),
        }),
        gc: false,
    }
}
