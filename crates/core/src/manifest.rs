//! The manifest: a self-describing description of one published generation, enough to
//! restore it from the store alone.
//!
//! Encoding (version 1):
//!
//! ```text
//! magic "CAIRNMAN" | version u32 LE | flags u32 LE (0) | body length u64 LE
//! | body (UTF-8 JSON) | CRC64-NVME of every preceding byte, u64 LE
//! ```

use serde::{Deserialize, Serialize};

use crate::address::{crc64, BlobKind, BlobRef};
use crate::error::CoreError;
use crate::ids::{DbId, Generation, Lsn, TenantId};

/// Current manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"CAIRNMAN";
const PREFIX_LEN: usize = 24;

/// What kind of source a database is checkpointed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A SQLite database file, snapshotted through SQLite's online backup API.
    Sqlite,
    /// A raw file of fixed-size pages, assumed quiescent while it is read.
    Pages,
    /// A directory of sealed, immutable segment files.
    Segments,
}

impl SourceKind {
    /// The word used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Sqlite => "sqlite",
            SourceKind::Pages => "pages",
            SourceKind::Segments => "segments",
        }
    }
}

impl std::str::FromStr for SourceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sqlite" => Ok(SourceKind::Sqlite),
            "pages" => Ok(SourceKind::Pages),
            "segments" => Ok(SourceKind::Segments),
            other => Err(format!(
                "unknown source kind {other:?} (expected sqlite, pages or segments)"
            )),
        }
    }
}

/// One chunk of a page source at this generation: a base plus an ordered delta chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkState {
    /// Chunk index: the chunk covers bytes `[index * chunk_size, index * chunk_size + len)`.
    pub index: u64,
    /// Length of the chunk at this generation (the base's length if there are no deltas;
    /// a delta may grow or shrink it).
    pub len: u64,
    /// Full bytes of the chunk as of the base.
    pub base: BlobRef,
    /// Deltas to apply on top of the base, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<BlobRef>,
}

/// The state of a page source (SQLite or raw pages) at one generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagesState {
    /// `sqlite` or `pages`.
    pub origin: SourceKind,
    /// Page size in bytes.
    pub page_size: u32,
    /// Chunk size in bytes (a multiple of the page size).
    pub chunk_size: u64,
    /// Length of the file in bytes.
    pub len: u64,
    /// Every chunk, in index order.
    pub chunks: Vec<ChunkState>,
}

/// One sealed segment of a segment source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// File name in the segment directory.
    pub name: String,
    /// First LSN the segment holds.
    pub lsn_start: Lsn,
    /// Length in bytes; the segment covers `[lsn_start, lsn_start + len)`.
    pub len: u64,
    /// The segment blob.
    pub blob: BlobRef,
}

/// The state of a segment source at one generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentsState {
    /// Segments in name (and LSN) order.
    pub segments: Vec<SegmentEntry>,
    /// The LSN up to which this generation is durable.
    pub lsn_end: Lsn,
}

/// The body of a manifest, by source shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "lowercase")]
pub enum ManifestBody {
    /// A file of pages.
    Pages(PagesState),
    /// A directory of segments.
    Segments(SegmentsState),
}

/// One published generation of one database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version that wrote this.
    pub format: u32,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Database.
    pub db: DbId,
    /// This generation.
    pub generation: Generation,
    /// The generation this one was planned on top of.
    pub parent: Option<Generation>,
    /// Identity of the state directory that published it.
    pub writer: String,
    /// Publication time, milliseconds since the Unix epoch (from the injected clock).
    pub created_unix_ms: u64,
    /// The job that published it (16 hex digits), so a job that publishes twice is visible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The source's state.
    pub body: ManifestBody,
}

impl Manifest {
    /// The source kind.
    pub fn kind(&self) -> SourceKind {
        match &self.body {
            ManifestBody::Pages(p) => p.origin,
            ManifestBody::Segments(_) => SourceKind::Segments,
        }
    }

    /// Logical size in bytes: the file length, or the sum of segment lengths.
    pub fn logical_len(&self) -> u64 {
        match &self.body {
            ManifestBody::Pages(p) => p.len,
            ManifestBody::Segments(s) => s.segments.iter().map(|e| e.len).sum(),
        }
    }

    /// Every blob this generation references (a blob may appear more than once).
    pub fn blobs(&self) -> Vec<BlobRef> {
        match &self.body {
            ManifestBody::Pages(p) => p
                .chunks
                .iter()
                .flat_map(|c| std::iter::once(c.base).chain(c.deltas.iter().copied()))
                .collect(),
            ManifestBody::Segments(s) => s.segments.iter().map(|e| e.blob).collect(),
        }
    }

    /// Checks the manifest's internal consistency; `name` is used in errors.
    pub fn validate(&self, name: &str) -> Result<(), CoreError> {
        let bad = |reason: String| CoreError::CorruptManifest {
            name: name.to_string(),
            reason,
        };
        if self.generation.0 == 0 {
            return Err(bad("generation 0 is not a valid generation".into()));
        }
        if let Some(p) = self.parent {
            if p >= self.generation {
                return Err(bad(format!(
                    "parent generation {p} is not older than {}",
                    self.generation
                )));
            }
        }
        match &self.body {
            ManifestBody::Pages(p) => {
                if p.origin == SourceKind::Segments {
                    return Err(bad("a page body cannot have origin segments".into()));
                }
                if p.page_size == 0
                    || p.chunk_size == 0
                    || p.chunk_size % u64::from(p.page_size) != 0
                {
                    return Err(bad(format!(
                        "chunk size {} is not a positive multiple of page size {}",
                        p.chunk_size, p.page_size
                    )));
                }
                let n = p.len.div_ceil(p.chunk_size);
                if p.chunks.len() as u64 != n {
                    return Err(bad(format!(
                        "{} chunks listed, a file of {} bytes needs {n}",
                        p.chunks.len(),
                        p.len
                    )));
                }
                for (i, c) in p.chunks.iter().enumerate() {
                    let want = p.chunk_size.min(p.len - i as u64 * p.chunk_size);
                    if c.index != i as u64 {
                        return Err(bad(format!("chunk at position {i} has index {}", c.index)));
                    }
                    if c.len != want {
                        return Err(bad(format!(
                            "chunk {i} has length {}, expected {want}",
                            c.len
                        )));
                    }
                    if c.base.kind != BlobKind::Base
                        || c.base.len > p.chunk_size
                        || (c.deltas.is_empty() && c.base.len != want)
                    {
                        return Err(bad(format!(
                            "chunk {i}: base {} must be a base blob of {want} bytes",
                            c.base.name()
                        )));
                    }
                    if let Some(d) = c.deltas.iter().find(|d| d.kind != BlobKind::Delta) {
                        return Err(bad(format!("chunk {i}: {} is not a delta", d.name())));
                    }
                }
            }
            ManifestBody::Segments(s) => {
                let mut prev_end: Option<u64> = None;
                let mut prev_name: Option<&str> = None;
                for e in &s.segments {
                    if !valid_segment_name(&e.name) {
                        return Err(bad(format!(
                            "segment name {:?} is not a plain file name",
                            e.name
                        )));
                    }
                    if prev_name.is_some_and(|p| p >= e.name.as_str()) {
                        return Err(bad(format!("segment {:?} is out of name order", e.name)));
                    }
                    if prev_end.is_some_and(|end| end != e.lsn_start.0) {
                        return Err(bad(format!(
                            "segment {:?} does not start where the previous one ends",
                            e.name
                        )));
                    }
                    if e.blob.kind != BlobKind::Segment || e.blob.len != e.len {
                        return Err(bad(format!(
                            "segment {:?}: blob {} must be a segment blob of {} bytes",
                            e.name,
                            e.blob.name(),
                            e.len
                        )));
                    }
                    prev_end = Some(e.lsn_start.0 + e.len);
                    prev_name = Some(&e.name);
                }
                if let Some(end) = prev_end {
                    if end != s.lsn_end.0 {
                        return Err(bad(format!(
                            "lsn_end {} differs from the end of the last segment {end}",
                            s.lsn_end
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Encodes the manifest into its object bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data structures to JSON cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(PREFIX_LEN + body.len() + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let c = crc64(&out);
        out.extend_from_slice(&c.to_le_bytes());
        out
    }

    /// Decodes and validates manifest object bytes; `name` (the object key) is used in errors.
    pub fn decode(name: &str, bytes: &[u8]) -> Result<Manifest, CoreError> {
        let bad = |reason: String| CoreError::CorruptManifest {
            name: name.to_string(),
            reason,
        };
        if bytes.len() < PREFIX_LEN + 8 {
            return Err(bad(format!("truncated: only {} bytes", bytes.len())));
        }
        if &bytes[0..8] != MAGIC {
            return Err(bad("bad magic (not a Cairn manifest)".into()));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != MANIFEST_VERSION {
            return Err(CoreError::UnsupportedVersion {
                name: name.to_string(),
                what: "manifest",
                version,
                supported: MANIFEST_VERSION,
            });
        }
        let mut l = [0u8; 8];
        l.copy_from_slice(&bytes[16..24]);
        let body_len = u64::from_le_bytes(l);
        let expected_total = (PREFIX_LEN as u64)
            .saturating_add(body_len)
            .saturating_add(8);
        if expected_total != bytes.len() as u64 {
            return Err(bad(format!(
                "length mismatch: header says {expected_total} bytes, object has {}",
                bytes.len()
            )));
        }
        let end = bytes.len() - 8;
        let mut c = [0u8; 8];
        c.copy_from_slice(&bytes[end..]);
        if u64::from_le_bytes(c) != crc64(&bytes[..end]) {
            return Err(bad("checksum mismatch".into()));
        }
        let m: Manifest = serde_json::from_slice(&bytes[PREFIX_LEN..end])
            .map_err(|e| bad(format!("body: {e}")))?;
        if m.format != MANIFEST_VERSION {
            return Err(bad(format!(
                "body format {} differs from envelope",
                m.format
            )));
        }
        m.validate(name)?;
        Ok(m)
    }
}

/// Whether `name` can be used as a segment file name (no path separators, not `.`/`..`,
/// printable ASCII).
pub fn valid_segment_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Digest128;

    fn blob(kind: BlobKind, len: u64, c: u64) -> BlobRef {
        BlobRef {
            kind,
            crc64: c,
            len,
            xxh3: Digest128(u128::from(c)),
            alias: 0,
        }
    }

    pub(crate) fn sample_pages() -> Manifest {
        Manifest {
            format: MANIFEST_VERSION,
            tenant: TenantId::new("t").unwrap(),
            db: DbId::new("d").unwrap(),
            generation: Generation(2),
            parent: Some(Generation(1)),
            writer: "w".into(),
            created_unix_ms: 5,
            job: None,
            body: ManifestBody::Pages(PagesState {
                origin: SourceKind::Pages,
                page_size: 4096,
                chunk_size: 8192,
                len: 12288,
                chunks: vec![
                    ChunkState {
                        index: 0,
                        len: 8192,
                        base: blob(BlobKind::Base, 8192, 1),
                        deltas: vec![],
                    },
                    ChunkState {
                        index: 1,
                        len: 4096,
                        base: blob(BlobKind::Base, 4096, 2),
                        deltas: vec![],
                    },
                ],
            }),
        }
    }

    #[test]
    fn roundtrip_and_corruption() {
        let m = sample_pages();
        let bytes = m.encode();
        assert_eq!(Manifest::decode("k", &bytes).unwrap(), m);
        for i in [0, 9, 20, 30, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            let err = Manifest::decode("gen-2", &bad).unwrap_err().to_string();
            assert!(err.contains("gen-2"), "{err}");
        }
        let err = Manifest::decode("gen-2", &bytes[..bytes.len() - 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains("gen-2") && err.contains("length"), "{err}");
    }

    #[test]
    fn validation_catches_inconsistency() {
        let mut m = sample_pages();
        if let ManifestBody::Pages(p) = &mut m.body {
            p.len = 20000;
        }
        assert!(m.validate("x").is_err());
        let seg = Manifest {
            body: ManifestBody::Segments(SegmentsState {
                segments: vec![
                    SegmentEntry {
                        name: "a".into(),
                        lsn_start: Lsn(0),
                        len: 3,
                        blob: blob(BlobKind::Segment, 3, 1),
                    },
                    SegmentEntry {
                        name: "b".into(),
                        lsn_start: Lsn(4),
                        len: 3,
                        blob: blob(BlobKind::Segment, 3, 2),
                    },
                ],
                lsn_end: Lsn(7),
            }),
            ..sample_pages()
        };
        let err = seg.validate("x").unwrap_err().to_string();
        assert!(err.contains("does not start"), "{err}");
        assert!(!valid_segment_name("../x"));
    }
}
