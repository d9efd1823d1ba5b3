//! The delta payload format (version 1): the changed pages of one chunk.
//!
//! A delta is the payload of a blob of kind `delta`; the blob envelope (see [`crate::blob`])
//! supplies the CRC64-NVME footer that every reader checks before the payload is parsed.
//!
//! ```text
//! header (56 bytes)
//!   0  magic "CAIRNDLT"
//!   8  version u16 LE (1) | reserved u16 (0) | page size u32 LE
//!  16  chunk index u64 LE
//!  24  generation that wrote it u64 LE
//!  32  CRC64-NVME of the chain's base payload u64 LE
//!  40  chunk length after applying this delta u64 LE
//!  48  page count n u32 LE | reserved u32 (0)
//! directory (4n bytes): page numbers within the chunk, u32 LE, strictly ascending
//! pages (n × page size bytes): page bytes in directory order
//! ```
//!
//! Looking a page up is a binary search of the directory.

use crate::error::CoreError;

/// Delta format version.
pub const DELTA_VERSION: u16 = 1;
/// Header length.
pub const DELTA_HEADER_LEN: usize = 56;
const MAGIC: &[u8; 8] = b"CAIRNDLT";

/// The identifying fields of a delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeltaHeader {
    /// Page size in bytes.
    pub page_size: u32,
    /// Chunk index.
    pub chunk: u64,
    /// Generation that wrote the delta.
    pub generation: u64,
    /// CRC64-NVME of the base payload this delta applies on top of.
    pub base_crc64: u64,
    /// Chunk length after applying it (a chunk may grow or shrink).
    pub chunk_len: u64,
}

/// Size of a delta payload holding `pages` pages.
pub fn delta_len(page_size: u32, pages: usize) -> u64 {
    DELTA_HEADER_LEN as u64 + 4 * pages as u64 + pages as u64 * u64::from(page_size)
}

/// Encodes a delta. `pages` are page numbers within the chunk, strictly ascending, and
/// `bytes` their contents concatenated in the same order.
pub fn encode_delta(h: &DeltaHeader, pages: &[u32], bytes: &[u8]) -> Result<Vec<u8>, CoreError> {
    let bad = |reason: String| CoreError::CorruptBlob {
        name: format!("delta for chunk {}", h.chunk),
        reason,
    };
    if bytes.len() as u64 != pages.len() as u64 * u64::from(h.page_size) {
        return Err(bad(format!(
            "{} page bytes for {} pages",
            bytes.len(),
            pages.len()
        )));
    }
    if pages.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad("page numbers not strictly ascending".into()));
    }
    let count = u32::try_from(pages.len()).map_err(|_| bad("too many pages".into()))?;
    let mut out =
        Vec::with_capacity(usize::try_from(delta_len(h.page_size, pages.len())).unwrap_or(0));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&DELTA_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&h.page_size.to_le_bytes());
    out.extend_from_slice(&h.chunk.to_le_bytes());
    out.extend_from_slice(&h.generation.to_le_bytes());
    out.extend_from_slice(&h.base_crc64.to_le_bytes());
    out.extend_from_slice(&h.chunk_len.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    out.extend_from_slice(bytes);
    Ok(out)
}

/// A parsed, validated view of a delta payload.
#[derive(Debug)]
pub struct DeltaView<'a> {
    /// The header.
    pub header: DeltaHeader,
    directory: &'a [u8],
    pages: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl<'a> DeltaView<'a> {
    /// Parses `payload` (named `name` in errors) and checks it is a delta for `chunk` on top
    /// of the base with CRC64 `base_crc64`, with pages of `page_size` bytes, every page
    /// number inside the chunk.
    pub fn parse(
        name: &str,
        payload: &'a [u8],
        chunk: u64,
        base_crc64: u64,
        page_size: u32,
    ) -> Result<Self, CoreError> {
        let bad = |reason: String| CoreError::CorruptBlob {
            name: name.to_string(),
            reason: format!("delta: {reason}"),
        };
        if payload.len() < DELTA_HEADER_LEN {
            return Err(bad(format!("truncated header: {} bytes", payload.len())));
        }
        if &payload[0..8] != MAGIC {
            return Err(bad("bad magic".into()));
        }
        let version = u16::from_le_bytes([payload[8], payload[9]]);
        if version != DELTA_VERSION {
            return Err(CoreError::UnsupportedVersion {
                name: name.to_string(),
                what: "delta",
                version: u32::from(version),
                supported: u32::from(DELTA_VERSION),
            });
        }
        let header = DeltaHeader {
            page_size: u32_at(payload, 12),
            chunk: u64_at(payload, 16),
            generation: u64_at(payload, 24),
            base_crc64: u64_at(payload, 32),
            chunk_len: u64_at(payload, 40),
        };
        if header.page_size != page_size {
            return Err(bad(format!(
                "page size {} differs from the manifest's {page_size}",
                header.page_size
            )));
        }
        if header.chunk != chunk {
            return Err(bad(format!(
                "written for chunk {}, referenced by chunk {chunk}",
                header.chunk
            )));
        }
        if header.base_crc64 != base_crc64 {
            return Err(bad(format!(
                "applies to base {:016x}, but the chain's base is {base_crc64:016x}",
                header.base_crc64
            )));
        }
        let count = u32_at(payload, 48) as usize;
        let dir_end = DELTA_HEADER_LEN + 4 * count;
        let expected = delta_len(page_size, count);
        if payload.len() as u64 != expected {
            return Err(bad(format!(
                "directory of {count} pages needs {expected} bytes, payload has {} (truncated directory or pages)",
                payload.len()
            )));
        }
        let directory = &payload[DELTA_HEADER_LEN..dir_end];
        let pages_in_chunk = header.chunk_len.div_ceil(u64::from(page_size));
        let mut prev: Option<u32> = None;
        for i in 0..count {
            let p = u32_at(directory, 4 * i);
            if prev.is_some_and(|q| q >= p) {
                return Err(bad(format!(
                    "directory not strictly ascending at entry {i} (page {p})"
                )));
            }
            if u64::from(p) >= pages_in_chunk {
                return Err(bad(format!(
                    "page {p} out of range: the chunk has {pages_in_chunk} pages"
                )));
            }
            prev = Some(p);
        }
        Ok(Self {
            header,
            directory,
            pages: &payload[dir_end..],
        })
    }

    /// Number of pages in the delta.
    pub fn len(&self) -> usize {
        self.directory.len() / 4
    }

    /// Whether the delta holds no page.
    pub fn is_empty(&self) -> bool {
        self.directory.is_empty()
    }

    fn page_no(&self, i: usize) -> u32 {
        u32_at(self.directory, 4 * i)
    }

    fn bytes(&self, i: usize) -> &'a [u8] {
        let ps = self.header.page_size as usize;
        &self.pages[i * ps..(i + 1) * ps]
    }

    /// The bytes of page `page` (within the chunk), if the delta holds it.
    pub fn page(&self, page: u32) -> Option<&'a [u8]> {
        let (mut lo, mut hi) = (0usize, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.page_no(mid).cmp(&page) {
                std::cmp::Ordering::Equal => return Some(self.bytes(mid)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        None
    }

    /// Every page with its number, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &'a [u8])> + '_ {
        (0..self.len()).map(move |i| (self.page_no(i), self.bytes(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(chunk_len: u64) -> DeltaHeader {
        DeltaHeader {
            page_size: 16,
            chunk: 3,
            generation: 9,
            base_crc64: 0xfeed,
            chunk_len,
        }
    }

    #[test]
    fn rejects_malformed_deltas() {
        let pages = [1u32, 4];
        let bytes = [7u8; 32];
        let d = encode_delta(&header(160), &pages, &bytes).unwrap();
        assert!(DeltaView::parse("d", &d, 3, 0xfeed, 16).is_ok());
        let msg = |r: Result<DeltaView<'_>, CoreError>| r.unwrap_err().to_string();
        assert!(msg(DeltaView::parse("d", &d[..d.len() - 1], 3, 0xfeed, 16)).contains("truncated"));
        assert!(msg(DeltaView::parse("d", &d[..60], 3, 0xfeed, 16)).contains("truncated"));
        assert!(msg(DeltaView::parse("d", &d, 4, 0xfeed, 16)).contains("chunk"));
        assert!(msg(DeltaView::parse("d", &d, 3, 0xbeef, 16)).contains("base"));
        assert!(msg(DeltaView::parse("d", &d, 3, 0xfeed, 32)).contains("page size"));
        let out_of_range = encode_delta(&header(64), &pages, &bytes).unwrap();
        assert!(msg(DeltaView::parse("d", &out_of_range, 3, 0xfeed, 16)).contains("out of range"));
        let mut unsorted = d.clone();
        unsorted[DELTA_HEADER_LEN..DELTA_HEADER_LEN + 4].copy_from_slice(&9u32.to_le_bytes());
        assert!(msg(DeltaView::parse("d", &unsorted, 3, 0xfeed, 16)).contains("ascending"));
        assert!(encode_delta(&header(160), &[4, 1], &bytes).is_err());
    }

    proptest! {
        #[test]
        fn roundtrip_and_lookup(set in proptest::collection::btree_set(0u32..500, 0..60), seed in any::<u8>()) {
            let pages: Vec<u32> = set.iter().copied().collect();
            let bytes: Vec<u8> = pages.iter().flat_map(|p| std::iter::repeat_n((*p as u8) ^ seed, 16)).collect();
            let d = encode_delta(&header(500 * 16), &pages, &bytes).unwrap();
            prop_assert_eq!(d.len() as u64, delta_len(16, pages.len()));
            let v = DeltaView::parse("d", &d, 3, 0xfeed, 16).unwrap();
            for p in 0..500u32 {
                match v.page(p) {
                    Some(b) => { prop_assert!(set.contains(&p)); prop_assert_eq!(b, &[(p as u8) ^ seed; 16][..]); }
                    None => prop_assert!(!set.contains(&p)),
                }
            }
            prop_assert_eq!(v.iter().map(|(p, _)| p).collect::<Vec<_>>(), pages);
        }
    }
}
