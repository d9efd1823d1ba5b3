//! The blob object format (version 1), shared by base chunks, deltas and segments:
//!
//! ```text
//! header  (32 bytes)  magic "CAIRNBLB" | version u16 LE | kind u8 | 5 zero bytes
//!                     | payload length u64 LE | CRC64-NVME of header bytes 0..24, u64 LE
//! payload (n bytes)
//! footer  (16 bytes)  CRC64-NVME of the payload u64 LE | magic "CAIRNEND"
//! ```
//!
//! The payload's CRC64 and length are the blob's content address, so the same checksum
//! is written at staging, checked after upload and recomputed on every read.
//! [`BlobDecoder`] checks all of it while streaming, without buffering the payload.

use crate::address::{crc64, BlobKind, BlobRef, ContentAddress, Digest128, PayloadHasher};
use crate::error::CoreError;

/// Header length in bytes.
pub const HEADER_LEN: usize = 32;
/// Footer length in bytes.
pub const FOOTER_LEN: usize = 16;
/// Current blob format version.
pub const BLOB_VERSION: u16 = 1;
const HEADER_MAGIC: &[u8; 8] = b"CAIRNBLB";
const FOOTER_MAGIC: &[u8; 8] = b"CAIRNEND";

/// Encodes the header of a blob of `kind` with a payload of `payload_len` bytes.
pub fn encode_header(kind: BlobKind, payload_len: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(HEADER_MAGIC);
    h[8..10].copy_from_slice(&BLOB_VERSION.to_le_bytes());
    h[10] = kind.code();
    h[16..24].copy_from_slice(&payload_len.to_le_bytes());
    let c = crc64(&h[0..24]);
    h[24..32].copy_from_slice(&c.to_le_bytes());
    h
}

/// Encodes the footer for a payload whose CRC64-NVME is `payload_crc`.
pub fn encode_footer(payload_crc: u64) -> [u8; FOOTER_LEN] {
    let mut f = [0u8; FOOTER_LEN];
    f[0..8].copy_from_slice(&payload_crc.to_le_bytes());
    f[8..16].copy_from_slice(FOOTER_MAGIC);
    f
}

/// Encodes a whole blob in memory (small payloads and tests).
pub fn encode_blob(kind: BlobKind, payload: &[u8]) -> (Vec<u8>, BlobRef) {
    let mut h = PayloadHasher::new();
    h.update(payload);
    let (addr, xxh3) = h.finish();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + FOOTER_LEN);
    out.extend_from_slice(&encode_header(kind, payload.len() as u64));
    out.extend_from_slice(payload);
    out.extend_from_slice(&encode_footer(addr.crc64));
    (out, BlobRef::new(kind, addr.crc64, addr.len, xxh3))
}

/// What a fully decoded blob turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedBlob {
    /// Kind from the header.
    pub kind: BlobKind,
    /// Recomputed content address of the payload.
    pub address: ContentAddress,
    /// Recomputed XXH3-128 of the payload.
    pub xxh3: Digest128,
}

enum Stage {
    Header,
    Payload,
    Footer,
}

/// Streaming decoder and verifier of one blob object.
///
/// Feed the object's bytes in any split with [`BlobDecoder::push`], which returns the part
/// of each input that is payload; then call [`BlobDecoder::finish`], which fails unless the
/// header, the footer, the length and both digests all match what was expected.
pub struct BlobDecoder {
    name: String,
    expected: Option<BlobRef>,
    stage: Stage,
    header: Vec<u8>,
    footer: Vec<u8>,
    kind: Option<BlobKind>,
    payload_len: u64,
    hasher: PayloadHasher,
}

impl BlobDecoder {
    /// A decoder for the blob called `name` (used in errors); with `expected`, the decoded
    /// blob must match that reference exactly.
    pub fn new(name: impl Into<String>, expected: Option<BlobRef>) -> Self {
        Self {
            name: name.into(),
            expected,
            stage: Stage::Header,
            header: Vec::with_capacity(HEADER_LEN),
            footer: Vec::with_capacity(FOOTER_LEN),
            kind: None,
            payload_len: 0,
            hasher: PayloadHasher::new(),
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> CoreError {
        CoreError::CorruptBlob {
            name: self.name.clone(),
            reason: reason.into(),
        }
    }

    fn parse_header(&mut self) -> Result<(), CoreError> {
        let h = &self.header;
        if &h[0..8] != HEADER_MAGIC {
            return Err(self.corrupt("bad header magic (not a Cairn blob)"));
        }
        let stored = u64::from_le_bytes(le8(&h[24..32]));
        if stored != crc64(&h[0..24]) {
            return Err(self.corrupt("header checksum mismatch"));
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != BLOB_VERSION {
            return Err(CoreError::UnsupportedVersion {
                name: self.name.clone(),
                what: "blob",
                version: u32::from(version),
                supported: u32::from(BLOB_VERSION),
            });
        }
        let kind = BlobKind::from_code(h[10])
            .ok_or_else(|| self.corrupt(format!("unknown blob kind byte {}", h[10])))?;
        let len = u64::from_le_bytes(le8(&h[16..24]));
        if let Some(exp) = &self.expected {
            if exp.kind != kind {
                return Err(self.corrupt(format!(
                    "header says kind {}, expected {}",
                    kind.as_str(),
                    exp.kind.as_str()
                )));
            }
            if exp.len != len {
                return Err(self.corrupt(format!(
                    "header says payload length {len}, expected {}",
                    exp.len
                )));
            }
        }
        self.kind = Some(kind);
        self.payload_len = len;
        self.stage = Stage::Payload;
        Ok(())
    }

    /// Feeds the next bytes of the object; returns the slice of `data` that is payload.
    pub fn push<'a>(&mut self, data: &'a [u8]) -> Result<&'a [u8], CoreError> {
        let mut rest = data;
        let mut payload: &'a [u8] = &[];
        if let Stage::Header = self.stage {
            let need = HEADER_LEN - self.header.len();
            let take = need.min(rest.len());
            self.header.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.header.len() == HEADER_LEN {
                self.parse_header()?;
            }
        }
        if let Stage::Payload = self.stage {
            let remaining = self.payload_len - self.hasher.len();
            let take = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(rest.len());
            payload = &rest[..take];
            self.hasher.update(payload);
            rest = &rest[take..];
            if self.hasher.len() == self.payload_len {
                self.stage = Stage::Footer;
            }
        }
        if let Stage::Footer = self.stage {
            let need = FOOTER_LEN - self.footer.len();
            if rest.len() > need {
                return Err(self.corrupt(format!(
                    "{} trailing bytes after the footer",
                    rest.len() - need
                )));
            }
            self.footer.extend_from_slice(rest);
        }
        Ok(payload)
    }

    /// Checks the footer and the digests once every byte was pushed.
    pub fn finish(self) -> Result<DecodedBlob, CoreError> {
        let kind = match (&self.stage, self.kind) {
            (Stage::Footer, Some(kind)) if self.footer.len() == FOOTER_LEN => kind,
            (Stage::Header, _) => {
                return Err(self.corrupt(format!(
                    "truncated: {} of {HEADER_LEN} header bytes",
                    self.header.len()
                )))
            }
            (Stage::Payload, _) => {
                return Err(self.corrupt(format!(
                    "truncated: {} of {} payload bytes",
                    self.hasher.len(),
                    self.payload_len
                )))
            }
            _ => {
                return Err(self.corrupt(format!(
                    "truncated: {} of {FOOTER_LEN} footer bytes",
                    self.footer.len()
                )))
            }
        };
        if &self.footer[8..16] != FOOTER_MAGIC {
            return Err(self.corrupt("bad footer magic"));
        }
        let (address, xxh3) = self.hasher.finish();
        let stored = u64::from_le_bytes(le8(&self.footer[0..8]));
        if stored != address.crc64 {
            return Err(self.corrupt(format!(
                "payload CRC64 {:016x} does not match footer {stored:016x}",
                address.crc64
            )));
        }
        if let Some(exp) = &self.expected {
            if exp.crc64 != address.crc64 {
                return Err(self.corrupt(format!(
                    "payload CRC64 {:016x} does not match the content address {:016x}",
                    address.crc64, exp.crc64
                )));
            }
            if exp.xxh3 != xxh3 {
                return Err(self.corrupt("payload XXH3-128 does not match the manifest"));
            }
        }
        Ok(DecodedBlob {
            kind,
            address,
            xxh3,
        })
    }
}

/// Decodes and verifies a whole blob held in memory, returning its payload.
pub fn decode_blob(
    name: &str,
    bytes: &[u8],
    expected: Option<BlobRef>,
) -> Result<(Vec<u8>, DecodedBlob), CoreError> {
    let mut d = BlobDecoder::new(name, expected);
    let payload = d.push(bytes)?.to_vec();
    let decoded = d.finish()?;
    Ok((payload, decoded))
}

fn le8(s: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&s[..8]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_and_every_single_byte_flip_is_caught() {
        let payload: Vec<u8> = (0..300u32).map(|i| (i % 256) as u8).collect();
        let (obj, r) = encode_blob(BlobKind::Base, &payload);
        let (back, dec) = decode_blob("b", &obj, Some(r)).unwrap();
        assert_eq!(back, payload);
        assert_eq!(dec.address, r.address());
        for i in 0..obj.len() {
            let mut bad = obj.clone();
            bad[i] ^= 0x40;
            assert!(
                decode_blob("b", &bad, Some(r)).is_err(),
                "flip at {i} not caught"
            );
        }
    }

    #[test]
    fn truncation_and_trailing_bytes_are_named() {
        let (obj, r) = encode_blob(BlobKind::Segment, b"hello world");
        for cut in [0, 5, HEADER_LEN, HEADER_LEN + 3, obj.len() - 1] {
            let err = decode_blob("k/seg", &obj[..cut], Some(r))
                .unwrap_err()
                .to_string();
            assert!(err.contains("k/seg") && err.contains("truncated"), "{err}");
        }
        let mut long = obj.clone();
        long.push(0);
        let err = decode_blob("k/seg", &long, Some(r))
            .unwrap_err()
            .to_string();
        assert!(err.contains("trailing"), "{err}");
    }

    #[test]
    fn wrong_expectation_is_rejected() {
        let (obj, r) = encode_blob(BlobKind::Base, b"abc");
        let other = BlobRef {
            kind: BlobKind::Delta,
            ..r
        };
        assert!(decode_blob("x", &obj, Some(other)).is_err());
        let other = BlobRef {
            xxh3: Digest128(r.xxh3.0 ^ 1),
            ..r
        };
        let err = decode_blob("x", &obj, Some(other)).unwrap_err().to_string();
        assert!(err.contains("XXH3"), "{err}");
    }

    proptest! {
        #[test]
        fn streaming_decode_in_any_split(payload in proptest::collection::vec(any::<u8>(), 0..2000),
                                         splits in proptest::collection::vec(1usize..97, 1..40)) {
            let (obj, r) = encode_blob(BlobKind::Delta, &payload);
            let mut d = BlobDecoder::new("p", Some(r));
            let mut out = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < obj.len() {
                let n = splits[i % splits.len()].min(obj.len() - pos);
                out.extend_from_slice(d.push(&obj[pos..pos + n]).unwrap());
                pos += n;
                i += 1;
            }
            d.finish().unwrap();
            prop_assert_eq!(out, payload);
        }
    }
}
