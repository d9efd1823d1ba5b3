//! The manifest: the self-describing object that publishes one generation of one
//! database, enough (with its chain) to restore it from the store alone.
//!
//! Encoding (version 2; version 1 is still read, see the `v1` module):
//!
//! ```text
//! magic "CAIRNMAN" | version u32 LE | flags u32 LE | body length u64 LE
//! | body | CRC64-NVME of every preceding byte, u64 LE
//! ```
//!
//! The body is UTF-8 JSON, zstd-compressed when flag bit 0 is set. A version 2 body holds
//! the generation's whole state ([`Content::Full`]) or its diff against the parent
//! generation ([`Content::Diff`]); a diff says how many diffs lead back to the last full
//! manifest, so materialising any generation reads one full manifest and a bounded number
//! of diffs.

mod diff;
mod state;
mod v1;

use serde::{Deserialize, Serialize};

pub use diff::{PagesDiff, StateDiff, WalDiff};
pub use state::{
    valid_segment_name, ChunkState, DbState, GcState, PagesState, SegmentEntry, SourceKind,
    WalState,
};

use crate::address::{crc64, BlobRef};
use crate::error::CoreError;
use crate::ids::{DbId, Generation, TenantId};

/// The manifest format version this build writes.
pub const MANIFEST_VERSION: u32 = 2;
/// The oldest version this build reads.
pub const OLDEST_MANIFEST_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"CAIRNMAN";
const PREFIX_LEN: usize = 24;
/// Flag bit 0: the body is zstd-compressed.
const FLAG_ZSTD: u32 = 1;
/// zstd level of manifest bodies.
const ZSTD_LEVEL: i32 = 3;
/// Largest body a manifest may claim once decompressed (a bound against garbage).
const MAX_BODY: usize = 1 << 30;

/// What a generation's manifest holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Content {
    /// The whole state.
    Full(DbState),
    /// The change from the parent generation's state.
    Diff(StateDiff),
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
    /// The generation this one was planned on top of (a diff applies to it).
    pub parent: Option<Generation>,
    /// Identity of the state directory that published it.
    pub writer: String,
    /// Publication time, milliseconds since the Unix epoch (from the injected clock).
    pub created_unix_ms: u64,
    /// The job that published it (16 hex digits), so a job that publishes twice is visible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Published by garbage collection: the data state is the parent's, only the GC
    /// record changed (retention does not count such generations).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gc: bool,
    /// The state, whole or as a diff.
    pub content: Content,
}

impl Manifest {
    /// Diffs between this generation and its full manifest: 0 for a full one.
    pub fn chain(&self) -> u32 {
        match &self.content {
            Content::Full(_) => 0,
            Content::Diff(d) => d.chain,
        }
    }

    /// The blobs this object names itself: every blob of a full state, the new ones of a
    /// diff.
    pub fn blobs(&self) -> Vec<BlobRef> {
        match &self.content {
            Content::Full(s) => s.blobs(),
            Content::Diff(d) => {
                let mut out = Vec::new();
                if let Some(p) = &d.pages {
                    for c in &p.chunks {
                        out.push(c.base);
                        out.extend(c.deltas.iter().copied());
                    }
                }
                if let Some(w) = &d.wal {
                    out.extend(w.append.iter().map(|s| s.blob));
                }
                out
            }
        }
    }

    /// Checks the manifest's own consistency; `name` is used in errors. (A diff can only
    /// be checked against its parent's state, by [`DbState::apply`].)
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
        match &self.content {
            Content::Full(s) => s.validate().map_err(bad),
            Content::Diff(d) => {
                let parent = self.parent.map_or(0, |p| p.0);
                if parent + 1 != self.generation.0 {
                    return Err(bad(format!(
                        "a diff must apply to generation {}, not {parent}",
                        self.generation.0.saturating_sub(1)
                    )));
                }
                if d.chain == 0 || u64::from(d.chain) >= self.generation.0 {
                    return Err(bad(format!(
                        "diff chain {} does not lead back to a full generation",
                        d.chain
                    )));
                }
                Ok(())
            }
        }
    }

    /// Encodes the manifest into its object bytes (always the current version).
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data structures to JSON cannot fail.
        let json = serde_json::to_vec(&Body::from(self)).unwrap_or_default();
        let (flags, body) = match zstd::bulk::compress(&json, ZSTD_LEVEL) {
            Ok(z) if z.len() < json.len() => (FLAG_ZSTD, z),
            _ => (0, json),
        };
        let mut out = Vec::with_capacity(PREFIX_LEN + body.len() + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let c = crc64(&out);
        out.extend_from_slice(&c.to_le_bytes());
        out
    }

    /// Decodes and validates manifest object bytes of any readable version; `name` (the
    /// object key) is used in errors.
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
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let version = word(8);
        if !(OLDEST_MANIFEST_VERSION..=MANIFEST_VERSION).contains(&version) {
            return Err(CoreError::UnsupportedVersion {
                name: name.to_string(),
                what: "manifest",
                version,
                supported: MANIFEST_VERSION,
            });
        }
        let flags = word(12);
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
        let raw = &bytes[PREFIX_LEN..end];
        let json = match flags {
            0 => std::borrow::Cow::Borrowed(raw),
            FLAG_ZSTD if version >= 2 => std::borrow::Cow::Owned(
                zstd::bulk::decompress(raw, MAX_BODY)
                    .map_err(|e| bad(format!("compressed body: {e}")))?,
            ),
            other => return Err(bad(format!("unknown flags {other:#x}"))),
        };
        let m = if version == 1 {
            let v1: v1::ManifestV1 =
                serde_json::from_slice(&json).map_err(|e| bad(format!("body: {e}")))?;
            if v1.format != 1 {
                return Err(bad(format!(
                    "body format {} differs from envelope",
                    v1.format
                )));
            }
            Manifest {
                format: 1,
                tenant: v1.tenant.clone(),
                db: v1.db.clone(),
                generation: v1.generation,
                parent: v1.parent,
                writer: v1.writer.clone(),
                created_unix_ms: v1.created_unix_ms,
                job: v1.job.clone(),
                gc: false,
                content: Content::Full(v1.state()),
            }
        } else {
            let b: Body = serde_json::from_slice(&json).map_err(|e| bad(format!("body: {e}")))?;
            if b.format != version {
                return Err(bad(format!(
                    "body format {} differs from envelope",
                    b.format
                )));
            }
            b.into()
        };
        m.validate(name)?;
        Ok(m)
    }
}

/// The JSON body as written: the manifest with its format set to this build's version.
#[derive(Serialize, Deserialize)]
struct Body {
    format: u32,
    tenant: TenantId,
    db: DbId,
    generation: Generation,
    parent: Option<Generation>,
    writer: String,
    created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    job: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    gc: bool,
    content: Content,
}

impl From<&Manifest> for Body {
    fn from(m: &Manifest) -> Self {
        Body {
            format: MANIFEST_VERSION,
            tenant: m.tenant.clone(),
            db: m.db.clone(),
            generation: m.generation,
            parent: m.parent,
            writer: m.writer.clone(),
            created_unix_ms: m.created_unix_ms,
            job: m.job.clone(),
            gc: m.gc,
            content: m.content.clone(),
        }
    }
}

impl From<Body> for Manifest {
    fn from(b: Body) -> Self {
        Manifest {
            format: b.format,
            tenant: b.tenant,
            db: b.db,
            generation: b.generation,
            parent: b.parent,
            writer: b.writer,
            created_unix_ms: b.created_unix_ms,
            job: b.job,
            gc: b.gc,
            content: b.content,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::{BlobKind, Digest128};
    use crate::ids::Lsn;

    fn blob(kind: BlobKind, len: u64, c: u64) -> BlobRef {
        BlobRef {
            kind,
            crc64: c,
            len,
            xxh3: Digest128(u128::from(c)),
            alias: 0,
            scheme: 0,
            epoch: 0,
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
            content: Content::Full(DbState {
                pages: Some(PagesState {
                    origin: SourceKind::Pages,
                    page_size: 4096,
                    chunk_size: 8192,
                    len: 12288,
                    lsn: Some(Lsn(40)),
                    generation: Generation(2),
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
                wal: None,
                gc: Default::default(),
            }),
            gc: false,
        }
    }

    #[test]
    fn roundtrip_and_corruption() {
        let m = sample_pages();
        let bytes = m.encode();
        assert_eq!(Manifest::decode("k", &bytes).unwrap(), m);
        for i in [0, 9, 13, 20, 30, bytes.len() - 1] {
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
        if let Content::Full(s) = &mut m.content {
            if let Some(p) = &mut s.pages {
                p.len = 20000;
            }
        }
        assert!(m.validate("x").is_err());
        let seg = |name: &str, start, len, c| SegmentEntry {
            name: name.into(),
            lsn_start: Lsn(start),
            lsn_end: Lsn(start + len),
            len,
            blob: blob(BlobKind::Segment, len, c),
        };
        let wal = Manifest {
            content: Content::Full(DbState {
                pages: None,
                wal: Some(WalState {
                    start: Lsn(0),
                    end: Lsn(7),
                    last_name: Some("b".into()),
                    segments: vec![seg("a", 0, 3, 1), seg("b", 4, 3, 2)],
                }),
                gc: Default::default(),
            }),
            ..sample_pages()
        };
        let err = wal.validate("x").unwrap_err().to_string();
        assert!(err.contains("starts at 4"), "{err}");
        assert!(!valid_segment_name("../x"));
        let diff = Manifest {
            generation: Generation(5),
            parent: Some(Generation(3)),
            content: Content::Diff(StateDiff {
                chain: 1,
                pages: None,
                wal: None,
                gc: None,
            }),
            ..sample_pages()
        };
        assert!(diff
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("apply to generation 4"));
    }
}
