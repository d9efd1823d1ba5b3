//! The blob object format, shared by base chunks, deltas and segments. Version 1 stores the
//! payload as it is; version 2 may store it zstd-compressed:
//!
//! ```text
//! version 1
//! header  (32 bytes)  magic "CAIRNBLB" | version u16 LE = 1 | kind u8 | 5 zero bytes
//!                     | payload length u64 LE | CRC64-NVME of header bytes 0..24, u64 LE
//! payload (n bytes)
//! footer  (16 bytes)  CRC64-NVME of the payload u64 LE | magic "CAIRNEND"
//!
//! version 2
//! header  (48 bytes)  magic "CAIRNBLB" | version u16 LE = 2 | kind u8 | codec u8
//!                     | 4 zero bytes | payload length n u64 LE | CRC64 of bytes 0..24
//!                     | stored length m u64 LE | CRC64 of bytes 0..40
//! body    (m bytes)   the payload, as it is (codec 0, m = n) or one zstd frame (codec 1)
//! footer  (24 bytes)  CRC64 of the body u64 LE | CRC64 of the payload u64 LE | "CAIRNEND"
//! ```
//!
//! The (uncompressed) payload's CRC64 and length are the blob's content address whatever
//! the codec, so names, dedup and manifests do not depend on compression; the body's own
//! CRC64 covers the stored bytes. [`BlobDecoder`] checks both layers while streaming,
//! decompressing on the fly, without buffering the payload.

mod decoder;
#[cfg(test)]
mod tests;

pub use decoder::BlobDecoder;

use crate::address::{crc64, BlobKind, BlobRef, ContentAddress, Digest128, PayloadHasher};
use crate::error::CoreError;

/// Version 1 header length in bytes.
pub const HEADER_LEN: usize = 32;
/// Version 1 footer length in bytes.
pub const FOOTER_LEN: usize = 16;
/// Version 2 header length in bytes (the version 1 header plus the stored length and a
/// second header CRC).
pub const HEADER_LEN_V2: usize = 48;
/// Version 2 footer length in bytes.
pub const FOOTER_LEN_V2: usize = 24;
/// The newest blob format version this build reads and writes (version 1 is still read,
/// and written when compression is off).
pub const BLOB_VERSION: u16 = 2;
/// The uncompressed blob format version.
pub const BLOB_VERSION_PLAIN: u16 = 1;
/// A compressed body is kept only if it is at most this many hundredths of the payload;
/// otherwise the payload is stored as it is (codec 0).
pub const WORTHWHILE_PERCENT: u64 = 97;
/// zstd level used when none is configured.
pub const DEFAULT_LEVEL: i32 = 3;
/// Largest zstd window (log2 bytes) a reader accepts: bounds a decoder's memory.
pub const MAX_WINDOW_LOG: u32 = 27;
const HEADER_MAGIC: &[u8; 8] = b"CAIRNBLB";
const FOOTER_MAGIC: &[u8; 8] = b"CAIRNEND";
const OVERHEAD_V1: u64 = (HEADER_LEN + FOOTER_LEN) as u64;
const OVERHEAD_V2: u64 = (HEADER_LEN_V2 + FOOTER_LEN_V2) as u64;

/// How a version 2 blob stores its payload (header byte 11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// The body is the payload itself (version 1 blobs, and payloads zstd did not shrink).
    Raw,
    /// The body is one zstd frame whose content is the payload.
    Zstd,
}

impl Codec {
    /// The header byte.
    pub fn code(self) -> u8 {
        match self {
            Codec::Raw => 0,
            Codec::Zstd => 1,
        }
    }

    /// The codec of a header byte, if known.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// Name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
        }
    }
}

/// Whether a body of `stored` bytes is worth keeping for a payload of `raw` bytes: at
/// most [`WORTHWHILE_PERCENT`] percent of it.
pub fn worthwhile(raw: u64, stored: u64) -> bool {
    u128::from(stored) * 100 <= u128::from(raw) * u128::from(WORTHWHILE_PERCENT)
}

/// The compression level to write with: `None` (or `Some(0)`) means off, which writes
/// version 1 blobs.
pub fn effective_level(level: Option<i32>) -> Option<i32> {
    level.filter(|l| *l != 0)
}

/// Whether an object of `size` bytes can be a blob of `blob`'s payload: the exact version 1
/// size, or a version 2 size (its body is never larger than the payload). The decoder
/// checks the exact size against the header.
pub fn plausible_object_len(blob: &BlobRef, size: u64) -> bool {
    size == blob.len.saturating_add(OVERHEAD_V1)
        || (OVERHEAD_V2..=blob.len.saturating_add(OVERHEAD_V2)).contains(&size)
}

/// The largest object a blob of a `payload_len`-byte payload can be (a version 2 blob
/// stored raw).
pub fn max_object_len(payload_len: u64) -> u64 {
    payload_len.saturating_add(OVERHEAD_V2)
}

/// Size of a version 1 object of a payload of `payload_len` bytes.
pub fn plain_object_len(payload_len: u64) -> u64 {
    payload_len.saturating_add(OVERHEAD_V1)
}

/// Size of a version 2 object whose body is `stored_len` bytes.
pub fn v2_object_len(stored_len: u64) -> u64 {
    stored_len.saturating_add(OVERHEAD_V2)
}

/// Encodes the version 1 header of a blob of `kind` with a payload of `payload_len` bytes.
pub fn encode_header(kind: BlobKind, payload_len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    base_header(&mut h, BLOB_VERSION_PLAIN, kind, 0, payload_len);
    h
}

/// Writes bytes 0..32 (the version 1 header layout, with `codec` in byte 11).
fn base_header(h: &mut [u8], version: u16, kind: BlobKind, codec: u8, payload_len: u64) {
    h[0..8].copy_from_slice(HEADER_MAGIC);
    h[8..10].copy_from_slice(&version.to_le_bytes());
    h[10] = kind.code();
    h[11] = codec;
    h[16..24].copy_from_slice(&payload_len.to_le_bytes());
    let c = crc64(&h[0..24]);
    h[24..32].copy_from_slice(&c.to_le_bytes());
}

/// Encodes the version 2 header of a blob of `kind` whose payload of `payload_len` bytes
/// is stored with `codec` in a body of `stored_len` bytes.
pub fn encode_header_v2(
    kind: BlobKind,
    codec: Codec,
    payload_len: u64,
    stored_len: u64,
) -> [u8; HEADER_LEN_V2] {
    let mut h = [0u8; HEADER_LEN_V2];
    base_header(&mut h, BLOB_VERSION, kind, codec.code(), payload_len);
    h[32..40].copy_from_slice(&stored_len.to_le_bytes());
    let c = crc64(&h[0..40]);
    h[40..48].copy_from_slice(&c.to_le_bytes());
    h
}

/// Encodes the version 1 footer for a payload whose CRC64-NVME is `payload_crc`.
pub fn encode_footer(payload_crc: u64) -> [u8; FOOTER_LEN] {
    let mut f = [0u8; FOOTER_LEN];
    f[0..8].copy_from_slice(&payload_crc.to_le_bytes());
    f[8..16].copy_from_slice(FOOTER_MAGIC);
    f
}

/// Encodes the version 2 footer: the CRC64-NVME of the stored body, then of the payload.
pub fn encode_footer_v2(body_crc: u64, payload_crc: u64) -> [u8; FOOTER_LEN_V2] {
    let mut f = [0u8; FOOTER_LEN_V2];
    f[0..8].copy_from_slice(&body_crc.to_le_bytes());
    f[8..16].copy_from_slice(&payload_crc.to_le_bytes());
    f[16..24].copy_from_slice(FOOTER_MAGIC);
    f
}

/// Encodes a whole version 1 (uncompressed) blob in memory (small payloads and tests).
pub fn encode_blob(kind: BlobKind, payload: &[u8]) -> (Vec<u8>, BlobRef) {
    let r = blob_ref(kind, payload);
    let mut out = Vec::with_capacity(payload.len() + OVERHEAD_V1 as usize);
    out.extend_from_slice(&encode_header(kind, payload.len() as u64));
    out.extend_from_slice(payload);
    out.extend_from_slice(&encode_footer(r.crc64));
    (out, r)
}

/// Encodes a whole blob in memory with compression `level` (see [`effective_level`]):
/// off gives a version 1 blob; on, a version 2 blob whose body is the zstd frame if that
/// is worthwhile ([`worthwhile`]), the payload as it is otherwise.
pub fn encode_blob_with(
    kind: BlobKind,
    payload: &[u8],
    level: Option<i32>,
) -> Result<(Vec<u8>, BlobRef), CoreError> {
    let Some(level) = effective_level(level) else {
        return Ok(encode_blob(kind, payload));
    };
    let r = blob_ref(kind, payload);
    let n = payload.len() as u64;
    let z = zstd::bulk::compress(payload, level).map_err(|e| CoreError::Compress {
        what: r.name(),
        level,
        source: e,
    })?;
    let (codec, body) = if worthwhile(n, z.len() as u64) {
        (Codec::Zstd, z.as_slice())
    } else {
        (Codec::Raw, payload)
    };
    let mut out = Vec::with_capacity(body.len() + OVERHEAD_V2 as usize);
    out.extend_from_slice(&encode_header_v2(kind, codec, n, body.len() as u64));
    out.extend_from_slice(body);
    out.extend_from_slice(&encode_footer_v2(crc64(body), r.crc64));
    Ok((out, r))
}

fn blob_ref(kind: BlobKind, payload: &[u8]) -> BlobRef {
    let mut h = PayloadHasher::new();
    h.update(payload);
    let (addr, xxh3) = h.finish();
    BlobRef::new(kind, addr.crc64, addr.len, xxh3)
}

/// What a fully decoded blob turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedBlob {
    /// Kind from the header.
    pub kind: BlobKind,
    /// Recomputed content address of the (uncompressed) payload.
    pub address: ContentAddress,
    /// Recomputed XXH3-128 of the payload.
    pub xxh3: Digest128,
    /// Format version of the object.
    pub version: u16,
    /// How the payload was stored ([`Codec::Raw`] for version 1).
    pub codec: Codec,
    /// Size of the whole object in bytes (header, body, footer).
    pub object_len: u64,
}

/// Decodes and verifies a whole blob held in memory, returning its payload.
pub fn decode_blob(
    name: &str,
    bytes: &[u8],
    expected: Option<BlobRef>,
) -> Result<(Vec<u8>, DecodedBlob), CoreError> {
    let mut d = BlobDecoder::new(name, expected);
    let mut payload = Vec::new();
    d.push(bytes, |p| {
        payload.extend_from_slice(p);
        Ok::<(), CoreError>(())
    })?;
    let decoded = d.finish()?;
    Ok((payload, decoded))
}
