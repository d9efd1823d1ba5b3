//! The state of one database at one generation: its newest page checkpoint and its WAL
//! stream, each optional. A generation's manifest holds this state whole ([`DbState`]) or
//! as a diff against its parent (see [`super::diff`]).

use serde::{Deserialize, Serialize};

use crate::address::{BlobKind, BlobRef};
use crate::ids::{Generation, Lsn};

/// What kind of source a database is checkpointed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A SQLite database file.
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

/// A page checkpoint: the state of a page file (SQLite or raw pages).
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
    /// The LSN (in the engine's WAL stream) this checkpoint covers, if it was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<Lsn>,
    /// The generation that took this checkpoint (later generations carry it unchanged).
    #[serde(default)]
    pub generation: Generation,
    /// Every chunk, in index order.
    pub chunks: Vec<ChunkState>,
}

/// One sealed segment of a WAL stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// File name (the name it is restored under).
    pub name: String,
    /// First LSN the segment holds.
    pub lsn_start: Lsn,
    /// One past the last LSN it holds; version 1 manifests imply `lsn_start + len`.
    pub lsn_end: Lsn,
    /// Length in bytes.
    pub len: u64,
    /// The segment blob.
    pub blob: BlobRef,
}

/// A WAL stream: contiguous sealed segments covering `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalState {
    /// First LSN still in the stream (after head truncation).
    pub start: Lsn,
    /// One past the last LSN published.
    pub end: Lsn,
    /// The name of the newest segment the stream has held (kept when head truncation
    /// drops every segment), so a segment directory's new files are told from old ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    /// Segments in LSN (and name) order.
    pub segments: Vec<SegmentEntry>,
}

/// What garbage collection has done to a database, carried by every generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcState {
    /// The GC epoch: raised by every collection that may delete blobs. Blobs are named
    /// with the epoch they were uploaded in, and a writer reuses a stored blob it did not
    /// inherit from its parent generation only if it carries the current epoch, so a
    /// collection (even a stalled one) never deletes a blob a newer generation uses.
    #[serde(default)]
    pub epoch: u64,
    /// Generations expired by retention, as half-open ranges `[a, b)`, ascending; they are
    /// never restored again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expired: Vec<(u64, u64)>,
}

impl GcState {
    /// Whether generation `g` was expired.
    pub fn is_expired(&self, g: u64) -> bool {
        self.expired.iter().any(|(a, b)| *a <= g && g < *b)
    }

    /// Adds `gens` to the expired ranges (merging adjacent ones).
    pub fn expire(&mut self, gens: &[u64]) {
        let mut all: Vec<u64> = gens.to_vec();
        for (a, b) in &self.expired {
            all.extend(*a..*b);
        }
        all.sort_unstable();
        all.dedup();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for g in all {
            match out.last_mut() {
                Some((_, b)) if *b == g => *b = g + 1,
                _ => out.push((g, g + 1)),
            }
        }
        self.expired = out;
    }
}

/// Everything a generation holds: the newest page checkpoint and the WAL stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbState {
    /// The newest page checkpoint, if the database has pages.
    pub pages: Option<PagesState>,
    /// The WAL stream, if the database has one.
    pub wal: Option<WalState>,
    /// Garbage collection's record.
    #[serde(default, skip_serializing_if = "is_default_gc")]
    pub gc: GcState,
}

fn is_default_gc(g: &GcState) -> bool {
    *g == GcState::default()
}

impl DbState {
    /// The kind shown for the database: the page origin, or `segments` for a database with
    /// only a WAL stream.
    pub fn kind(&self) -> SourceKind {
        match &self.pages {
            Some(p) => p.origin,
            None => SourceKind::Segments,
        }
    }

    /// Logical size: the page file's length plus the WAL stream's bytes.
    pub fn logical_len(&self) -> u64 {
        let pages = self.pages.as_ref().map_or(0, |p| p.len);
        let wal = self
            .wal
            .as_ref()
            .map_or(0, |w| w.segments.iter().map(|s| s.len).sum());
        pages + wal
    }

    /// Every blob this state references (a blob may appear more than once).
    pub fn blobs(&self) -> Vec<BlobRef> {
        let mut out = Vec::new();
        if let Some(p) = &self.pages {
            for c in &p.chunks {
                out.push(c.base);
                out.extend(c.deltas.iter().copied());
            }
        }
        if let Some(w) = &self.wal {
            out.extend(w.segments.iter().map(|s| s.blob));
        }
        out
    }

    /// Checks internal consistency; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(p) = &self.pages {
            validate_pages(p)?;
        }
        if let Some(w) = &self.wal {
            validate_wal(w)?;
        }
        Ok(())
    }
}

fn validate_pages(p: &PagesState) -> Result<(), String> {
    if p.origin == SourceKind::Segments {
        return Err("a page checkpoint cannot have origin segments".into());
    }
    if p.page_size == 0 || p.chunk_size == 0 || !p.chunk_size.is_multiple_of(u64::from(p.page_size))
    {
        return Err(format!(
            "chunk size {} is not a positive multiple of page size {}",
            p.chunk_size, p.page_size
        ));
    }
    let n = p.len.div_ceil(p.chunk_size);
    if p.chunks.len() as u64 != n {
        return Err(format!(
            "{} chunks listed, a file of {} bytes needs {n}",
            p.chunks.len(),
            p.len
        ));
    }
    for (i, c) in p.chunks.iter().enumerate() {
        let want = p.chunk_size.min(p.len - i as u64 * p.chunk_size);
        if c.index != i as u64 {
            return Err(format!("chunk at position {i} has index {}", c.index));
        }
        if c.len != want {
            return Err(format!("chunk {i} has length {}, expected {want}", c.len));
        }
        if c.base.kind != BlobKind::Base
            || c.base.len > p.chunk_size
            || (c.deltas.is_empty() && c.base.len != want)
        {
            return Err(format!(
                "chunk {i}: base {} must be a base blob of {want} bytes",
                c.base.name()
            ));
        }
        if let Some(d) = c.deltas.iter().find(|d| d.kind != BlobKind::Delta) {
            return Err(format!("chunk {i}: {} is not a delta", d.name()));
        }
    }
    Ok(())
}

fn validate_wal(w: &WalState) -> Result<(), String> {
    if w.start > w.end {
        return Err(format!(
            "stream starts at {} after its end {}",
            w.start, w.end
        ));
    }
    let mut at = w.start;
    let mut prev_name: Option<&str> = None;
    for e in &w.segments {
        if !valid_segment_name(&e.name) {
            return Err(format!(
                "segment name {:?} is not a plain file name",
                e.name
            ));
        }
        if prev_name.is_some_and(|p| p >= e.name.as_str()) {
            return Err(format!("segment {:?} is out of name order", e.name));
        }
        if e.lsn_start != at {
            return Err(format!(
                "segment {:?} starts at {}, not where the stream reached ({at})",
                e.name, e.lsn_start
            ));
        }
        if e.lsn_end < e.lsn_start {
            return Err(format!("segment {:?} ends before it starts", e.name));
        }
        if e.blob.kind != BlobKind::Segment || e.blob.len != e.len {
            return Err(format!(
                "segment {:?}: blob {} must be a segment blob of {} bytes",
                e.name,
                e.blob.name(),
                e.len
            ));
        }
        at = e.lsn_end;
        prev_name = Some(&e.name);
    }
    if at != w.end {
        return Err(format!(
            "the stream's segments end at {at}, its end says {}",
            w.end
        ));
    }
    if let Some(last) = w.segments.last() {
        if w.last_name.as_deref() != Some(last.name.as_str()) {
            return Err(format!(
                "the stream's newest segment is {:?}, its last name says {:?}",
                last.name, w.last_name
            ));
        }
    }
    Ok(())
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
