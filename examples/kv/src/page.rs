//! Page formats: the header page (page 0) and the data pages (1..), each 4 KiB and each
//! protected by a CRC64-NVME of its bytes after the checksum field.
//!
//! A data page is one hash bucket: its entries sorted by key, then zeros. The bytes of a
//! page are therefore a pure function of the set of entries it holds, which makes a page
//! written twice with the same contents byte-identical (and Cairn's page digests see no
//! change). Pure functions, no I/O: nothing here is stateful.
//!
//! ```text
//! data page:   crc64 u64 | page_no u32 | entries u16 | used u16 | (klen u16, vlen u16, key, value)* | 0…
//! header page: crc64 u64 | magic "CAIRNKV1" | version u32 | page_size u32 | page_count u32 |
//!              reserved u32 | flushed_lsn u64 | next_seq u64 | flushes u64 | 0…
//! ```

use std::collections::BTreeMap;

use crate::error::{corrupt, Result};

/// Size of every page.
pub const PAGE_SIZE: usize = 4096;
/// Bytes before a data page's first entry.
pub const PAGE_HEADER: usize = 16;
/// Bytes of a data page available to entries.
pub const PAGE_CAPACITY: usize = PAGE_SIZE - PAGE_HEADER;
/// Bytes an entry needs besides its key and value.
pub const ENTRY_OVERHEAD: usize = 4;
/// Longest key.
pub const MAX_KEY: usize = 255;
/// Longest value.
pub const MAX_VALUE: usize = 1024;

const MAGIC: &[u8; 8] = b"CAIRNKV1";
const VERSION: u32 = 1;

/// One data page's entries.
pub type Bucket = BTreeMap<Vec<u8>, Vec<u8>>;

/// CRC64-NVME of `bytes`.
pub(crate) fn crc64(parts: &[&[u8]]) -> u64 {
    let mut d = crc64fast_nvme::Digest::new();
    for p in parts {
        d.write(p);
    }
    d.sum64()
}

fn u16_at(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The data page (1-based) a key lives in, with `data_pages` data pages.
pub fn page_of(key: &[u8], data_pages: u32) -> u32 {
    let h = xxhash_rust::xxh3::xxh3_64(key);
    1 + (h % u64::from(data_pages.max(1))) as u32
}

/// Bytes one entry takes in a page.
pub fn entry_size(key: &[u8], value: &[u8]) -> usize {
    ENTRY_OVERHEAD + key.len() + value.len()
}

/// Bytes a bucket's entries take.
pub fn bucket_size(b: &Bucket) -> usize {
    b.iter().map(|(k, v)| entry_size(k, v)).sum()
}

/// Encodes data page `page_no` (the bucket must fit, see [`bucket_size`]).
pub fn encode_page(page_no: u32, b: &Bucket) -> Result<Vec<u8>> {
    let used = bucket_size(b);
    if used > PAGE_CAPACITY || b.len() > usize::from(u16::MAX) {
        return Err(corrupt(
            format!("page {page_no}"),
            format!("{used} bytes of entries do not fit in {PAGE_CAPACITY}"),
        ));
    }
    let mut out = vec![0u8; PAGE_SIZE];
    out[8..12].copy_from_slice(&page_no.to_le_bytes());
    out[12..14].copy_from_slice(&(b.len() as u16).to_le_bytes());
    out[14..16].copy_from_slice(&(used as u16).to_le_bytes());
    let mut at = PAGE_HEADER;
    for (k, v) in b {
        out[at..at + 2].copy_from_slice(&(k.len() as u16).to_le_bytes());
        out[at + 2..at + 4].copy_from_slice(&(v.len() as u16).to_le_bytes());
        at += ENTRY_OVERHEAD;
        out[at..at + k.len()].copy_from_slice(k);
        at += k.len();
        out[at..at + v.len()].copy_from_slice(v);
        at += v.len();
    }
    let crc = crc64(&[&out[8..]]);
    out[..8].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Decodes data page `page_no`, checking its checksum, number and structure.
pub fn decode_page(page_no: u32, bytes: &[u8]) -> Result<Bucket> {
    let what = || format!("page {page_no}");
    if bytes.len() != PAGE_SIZE {
        return Err(corrupt(
            what(),
            format!("{} bytes, not {PAGE_SIZE}", bytes.len()),
        ));
    }
    if crc64(&[&bytes[8..]]) != u64_at(bytes, 0) {
        return Err(corrupt(
            what(),
            "checksum mismatch (a torn or damaged page)",
        ));
    }
    if u32_at(bytes, 8) != page_no {
        return Err(corrupt(
            what(),
            format!("it holds page {} (misplaced)", u32_at(bytes, 8)),
        ));
    }
    let (count, used) = (u16_at(bytes, 12), u16_at(bytes, 14));
    if used > PAGE_CAPACITY {
        return Err(corrupt(
            what(),
            format!("{used} bytes used of {PAGE_CAPACITY}"),
        ));
    }
    let body = &bytes[PAGE_HEADER..PAGE_HEADER + used];
    let mut b = Bucket::new();
    let mut at = 0;
    let mut prev: Option<&[u8]> = None;
    for i in 0..count {
        if at + ENTRY_OVERHEAD > body.len() {
            return Err(corrupt(
                what(),
                format!("entry {i} runs past the used bytes"),
            ));
        }
        let (kl, vl) = (u16_at(body, at), u16_at(body, at + 2));
        at += ENTRY_OVERHEAD;
        if at + kl + vl > body.len() {
            return Err(corrupt(
                what(),
                format!("entry {i} runs past the used bytes"),
            ));
        }
        let k = &body[at..at + kl];
        if prev.is_some_and(|p| p >= k) {
            return Err(corrupt(what(), format!("entry {i} is out of key order")));
        }
        prev = Some(k);
        b.insert(k.to_vec(), body[at + kl..at + kl + vl].to_vec());
        at += kl + vl;
    }
    if at != used {
        return Err(corrupt(
            what(),
            format!("{used} bytes used, entries take {at}"),
        ));
    }
    Ok(b)
}

/// The header page: the page file's geometry and the LSN it is flushed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Pages in the file, the header page included.
    pub page_count: u32,
    /// The page file holds exactly the WAL records below this LSN.
    pub flushed_lsn: u64,
    /// The sequence number of the first record at or past `flushed_lsn`.
    pub next_seq: u64,
    /// Flushes so far (informational).
    pub flushes: u64,
}

impl Header {
    /// Data pages (all but the header page).
    pub fn data_pages(&self) -> u32 {
        self.page_count.saturating_sub(1)
    }
}

/// Encodes the header page.
pub fn encode_header(h: &Header) -> Vec<u8> {
    let mut out = vec![0u8; PAGE_SIZE];
    out[8..16].copy_from_slice(MAGIC);
    out[16..20].copy_from_slice(&VERSION.to_le_bytes());
    out[20..24].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    out[24..28].copy_from_slice(&h.page_count.to_le_bytes());
    out[32..40].copy_from_slice(&h.flushed_lsn.to_le_bytes());
    out[40..48].copy_from_slice(&h.next_seq.to_le_bytes());
    out[48..56].copy_from_slice(&h.flushes.to_le_bytes());
    let crc = crc64(&[&out[8..]]);
    out[..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes the header page.
pub fn decode_header(bytes: &[u8]) -> Result<Header> {
    let what = "header page 0";
    if bytes.len() != PAGE_SIZE {
        return Err(corrupt(
            what,
            format!("{} bytes, not {PAGE_SIZE}", bytes.len()),
        ));
    }
    if crc64(&[&bytes[8..]]) != u64_at(bytes, 0) {
        return Err(corrupt(what, "checksum mismatch (a torn or damaged page)"));
    }
    if &bytes[8..16] != MAGIC {
        return Err(corrupt(what, "not a cairn-kv page file (bad magic)"));
    }
    if u32_at(bytes, 16) != VERSION || u32_at(bytes, 20) as usize != PAGE_SIZE {
        return Err(corrupt(
            what,
            format!(
                "version {} with {}-byte pages; this build reads version {VERSION} with {PAGE_SIZE}",
                u32_at(bytes, 16),
                u32_at(bytes, 20)
            ),
        ));
    }
    let h = Header {
        page_count: u32_at(bytes, 24),
        flushed_lsn: u64_at(bytes, 32),
        next_seq: u64_at(bytes, 40),
        flushes: u64_at(bytes, 48),
    };
    if h.page_count < 2 {
        return Err(corrupt(what, format!("{} pages", h.page_count)));
    }
    Ok(h)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_trip_and_are_a_function_of_their_entries() {
        let mut a = Bucket::new();
        a.insert(b"k2".to_vec(), b"two".to_vec());
        a.insert(b"k1".to_vec(), vec![]);
        let bytes = encode_page(7, &a).unwrap();
        assert_eq!(decode_page(7, &bytes).unwrap(), a);
        let mut b = Bucket::new();
        b.insert(b"k1".to_vec(), vec![]);
        b.insert(b"k2".to_vec(), b"two".to_vec());
        assert_eq!(encode_page(7, &b).unwrap(), bytes);
        assert!(decode_page(8, &bytes).is_err(), "misplaced page");
        let mut torn = bytes.clone();
        torn[20] ^= 1;
        assert!(decode_page(7, &torn).is_err());
    }

    #[test]
    fn a_full_bucket_is_refused() {
        let mut b = Bucket::new();
        for i in 0..4u8 {
            b.insert(vec![i], vec![0; MAX_VALUE]);
        }
        assert!(encode_page(1, &b).is_err());
    }

    #[test]
    fn headers_round_trip() {
        let h = Header {
            page_count: 513,
            flushed_lsn: 12345,
            next_seq: 99,
            flushes: 3,
        };
        assert_eq!(decode_header(&encode_header(&h)).unwrap(), h);
        let mut bad = encode_header(&h);
        bad[40] ^= 1;
        assert!(decode_header(&bad).is_err());
    }
}
