//! Version 1 manifest bodies, read for compatibility: every version 1 object holds a whole
//! state of one stream, either a page file or a segment directory, and becomes a full
//! version 2 state when decoded. This build never writes version 1.

use serde::Deserialize;

use crate::address::BlobRef;
use crate::ids::{DbId, Generation, Lsn, TenantId};
use crate::manifest::state::{ChunkState, DbState, PagesState, SegmentEntry, SourceKind, WalState};

#[derive(Deserialize)]
struct PagesV1 {
    origin: SourceKind,
    page_size: u32,
    chunk_size: u64,
    len: u64,
    chunks: Vec<ChunkState>,
}

#[derive(Deserialize)]
struct SegmentV1 {
    name: String,
    lsn_start: Lsn,
    len: u64,
    blob: BlobRef,
}

#[derive(Deserialize)]
struct SegmentsV1 {
    segments: Vec<SegmentV1>,
    lsn_end: Lsn,
}

#[derive(Deserialize)]
#[serde(tag = "shape", rename_all = "lowercase")]
enum BodyV1 {
    Pages(PagesV1),
    Segments(SegmentsV1),
}

/// The JSON body of a version 1 manifest.
#[derive(Deserialize)]
pub(super) struct ManifestV1 {
    pub format: u32,
    pub tenant: TenantId,
    pub db: DbId,
    pub generation: Generation,
    pub parent: Option<Generation>,
    pub writer: String,
    pub created_unix_ms: u64,
    #[serde(default)]
    pub job: Option<String>,
    body: BodyV1,
}

impl ManifestV1 {
    /// The whole state this version 1 object describes. Each version 1 page generation is
    /// its own page checkpoint, without an LSN; segment LSNs are byte offsets.
    pub(super) fn state(self) -> DbState {
        match self.body {
            BodyV1::Pages(p) => DbState {
                pages: Some(PagesState {
                    origin: p.origin,
                    page_size: p.page_size,
                    chunk_size: p.chunk_size,
                    len: p.len,
                    lsn: None,
                    generation: self.generation,
                    chunks: p.chunks,
                }),
                wal: None,
                gc: Default::default(),
            },
            BodyV1::Segments(s) => {
                let start = s.segments.first().map_or(s.lsn_end, |e| e.lsn_start);
                DbState {
                    pages: None,
                    wal: Some(WalState {
                        start,
                        end: s.lsn_end,
                        last_name: s.segments.last().map(|e| e.name.clone()),
                        segments: s
                            .segments
                            .into_iter()
                            .map(|e| SegmentEntry {
                                lsn_end: Lsn(e.lsn_start.0 + e.len),
                                name: e.name,
                                lsn_start: e.lsn_start,
                                len: e.len,
                                blob: e.blob,
                            })
                            .collect(),
                    }),
                    gc: Default::default(),
                }
            }
        }
    }
}
