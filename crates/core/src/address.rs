//! Content addresses. A blob is named by the CRC64-NVME of its uncompressed payload plus the
//! payload's length, whatever codec stores it; a second, independent digest (XXH3-128) is kept
//! beside it in the manifest so that a (crc, len) match is confirmed before two payloads are
//! treated as one.

use std::fmt;

use serde::{Deserialize, Serialize};

/// CRC64-NVME of a payload plus its length: the name-giving part of every blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ContentAddress {
    /// CRC64-NVME of the payload bytes.
    pub crc64: u64,
    /// Payload length in bytes.
    pub len: u64,
}

/// A 128-bit digest (XXH3-128), serialised as 32 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest128(pub u128);

impl fmt::Display for Digest128 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Serialize for Digest128 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Digest128 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() != 32 {
            return Err(serde::de::Error::custom(format!(
                "digest {s:?} is not 32 hex digits"
            )));
        }
        u128::from_str_radix(&s, 16)
            .map(Digest128)
            .map_err(|e| serde::de::Error::custom(format!("digest {s:?}: {e}")))
    }
}

/// Streaming hasher computing both digests of a payload in one pass.
pub struct PayloadHasher {
    crc: crc64fast_nvme::Digest,
    xxh: xxhash_rust::xxh3::Xxh3,
    len: u64,
}

impl Default for PayloadHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl PayloadHasher {
    /// A hasher over zero bytes.
    pub fn new() -> Self {
        Self {
            crc: crc64fast_nvme::Digest::new(),
            xxh: xxhash_rust::xxh3::Xxh3::new(),
            len: 0,
        }
    }

    /// Feeds more payload bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.crc.write(bytes);
        self.xxh.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte has been fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The content address and confirming digest of everything fed.
    pub fn finish(&self) -> (ContentAddress, Digest128) {
        (
            ContentAddress {
                crc64: self.crc.sum64(),
                len: self.len,
            },
            Digest128(self.xxh.digest128()),
        )
    }
}

/// CRC64-NVME of a byte slice.
pub fn crc64(bytes: &[u8]) -> u64 {
    let mut d = crc64fast_nvme::Digest::new();
    d.write(bytes);
    d.sum64()
}

/// Packs 128-bit digests as 16-byte little-endian values.
pub fn digests_to_bytes(digests: &[u128]) -> Vec<u8> {
    digests.iter().flat_map(|d| d.to_le_bytes()).collect()
}

/// Unpacks [`digests_to_bytes`]; `None` if the length is not a multiple of 16.
pub fn digests_from_bytes(bytes: &[u8]) -> Option<Vec<u128>> {
    if !bytes.len().is_multiple_of(16) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(16)
            .map(|c| {
                let mut a = [0u8; 16];
                a.copy_from_slice(c);
                u128::from_le_bytes(a)
            })
            .collect(),
    )
}

/// What a blob holds; part of its name and of its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    /// The full bytes of one chunk of a page source.
    Base,
    /// Changed pages of one chunk on top of a base (and earlier deltas).
    Delta,
    /// One sealed segment of a segment source.
    Segment,
}

impl BlobKind {
    /// The byte stored in the blob header.
    pub fn code(self) -> u8 {
        match self {
            BlobKind::Base => 1,
            BlobKind::Delta => 2,
            BlobKind::Segment => 3,
        }
    }

    /// The kind for a header byte.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(BlobKind::Base),
            2 => Some(BlobKind::Delta),
            3 => Some(BlobKind::Segment),
            _ => None,
        }
    }

    /// The short word used in blob names.
    pub fn as_str(self) -> &'static str {
        match self {
            BlobKind::Base => "base",
            BlobKind::Delta => "delta",
            BlobKind::Segment => "seg",
        }
    }
}

/// A reference to one immutable blob, as recorded in manifests and in the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    /// What the blob holds.
    pub kind: BlobKind,
    /// CRC64-NVME of the payload.
    pub crc64: u64,
    /// Payload length.
    pub len: u64,
    /// XXH3-128 of the payload, confirming dedup hits.
    pub xxh3: Digest128,
    /// 0 normally; n > 0 makes the name distinct from other blobs with the same name
    /// base (see [`BlobRef::name`]): a payload whose base collided with another's, or a copy
    /// uploaded again while garbage collection deletes the original.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub alias: u32,
    /// How the name is formed: 0 for names written before they carried the second digest
    /// (`<kind>-<crc64>-<len>`), 1 for `<kind>-<crc64>-<len>-<xxh3 high 64 bits>`.
    #[serde(default, skip_serializing_if = "is_zero_u8")]
    pub scheme: u8,
    /// The garbage-collection epoch the blob was uploaded in (part of its name when not
    /// 0): a collection deletes only names of epochs before the one it starts.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub epoch: u64,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_zero_u8(v: &u8) -> bool {
    *v == 0
}

impl BlobRef {
    /// A reference to a new payload, named with both digests (scheme 1).
    pub fn new(kind: BlobKind, crc64: u64, len: u64, xxh3: Digest128) -> Self {
        Self {
            kind,
            crc64,
            len,
            xxh3,
            alias: 0,
            scheme: 1,
            epoch: 0,
        }
    }

    /// The name without its alias suffix: what two blobs share when their names collide.
    pub fn name_base(&self) -> String {
        let core = match self.scheme {
            0 => format!("{}-{:016x}-{:x}", self.kind.as_str(), self.crc64, self.len),
            _ => format!(
                "{}-{:016x}-{:x}-{:016x}",
                self.kind.as_str(),
                self.crc64,
                self.len,
                (self.xxh3.0 >> 64) as u64
            ),
        };
        if self.epoch == 0 {
            core
        } else {
            format!("{core}-g{}", self.epoch)
        }
    }

    /// The content address part.
    pub fn address(&self) -> ContentAddress {
        ContentAddress {
            crc64: self.crc64,
            len: self.len,
        }
    }

    /// The blob's name, unique within a database's blob space:
    /// `<kind>-<crc64 as 16 hex>-<len as hex>-<xxh3's high 64 bits as 16 hex>[-g<epoch>][-<alias>]`
    /// (scheme 1), or without the XXH3 part for blobs named before it was added (scheme
    /// 0). Two different payloads get the same scheme-1 name base only if their CRC64,
    /// length and XXH3 high half all agree; a writer that still finds one (checked against
    /// the full XXH3-128) gives the newcomer an alias.
    pub fn name(&self) -> String {
        if self.alias == 0 {
            self.name_base()
        } else {
            format!("{}-{}", self.name_base(), self.alias)
        }
    }

    /// Whether an object of `size` bytes can hold this payload: a version 1 blob has
    /// exactly `len + 48` bytes, a version 2 blob (possibly compressed) at most `len + 72`
    /// (see [`crate::blob::plausible_object_len`]). The exact size is in the object's
    /// header, which every read checks.
    pub fn plausible_object_len(&self, size: u64) -> bool {
        crate::blob::plausible_object_len(self, size)
    }

    /// Whether `other` names the same payload (all digests equal).
    pub fn same_payload(&self, other: &BlobRef) -> bool {
        self.kind == other.kind
            && self.crc64 == other.crc64
            && self.len == other.len
            && self.xxh3 == other.xxh3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_nvme_check_value() {
        // The standard check value of CRC-64/NVME over "123456789".
        assert_eq!(crc64(b"123456789"), 0xae8b_1486_0a79_9888);
    }

    #[test]
    fn hasher_streams_like_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = PayloadHasher::new();
        for part in data.chunks(333) {
            h.update(part);
        }
        let (addr, xxh) = h.finish();
        assert_eq!(addr.crc64, crc64(&data));
        assert_eq!(addr.len, data.len() as u64);
        assert_eq!(xxh.0, xxhash_rust::xxh3::xxh3_128(&data));
    }

    #[test]
    fn digest_packing_roundtrips() {
        let d = vec![0u128, 1, u128::MAX, 0x0123_4567_89ab_cdef];
        assert_eq!(digests_from_bytes(&digests_to_bytes(&d)), Some(d));
        assert_eq!(digests_from_bytes(&[0u8; 15]), None);
    }

    #[test]
    fn names_and_digest_serde() {
        let r = BlobRef {
            kind: BlobKind::Base,
            crc64: 0xab,
            len: 4096,
            xxh3: Digest128(7),
            alias: 0,
            scheme: 0,
            epoch: 0,
        };
        assert_eq!(r.name(), "base-00000000000000ab-1000");
        let r2 = BlobRef { alias: 2, ..r };
        assert_eq!(r2.name(), "base-00000000000000ab-1000-2");
        let n = BlobRef::new(BlobKind::Delta, 0xab, 4096, Digest128(0x1234 << 64 | 7));
        assert_eq!(n.name(), "delta-00000000000000ab-1000-0000000000001234");
        assert_eq!(BlobRef { alias: 3, ..n }.name(), format!("{}-3", n.name()));
        let j = serde_json::to_string(&n).unwrap();
        assert!(j.contains("\"scheme\":1"), "{j}");
        assert_eq!(serde_json::from_str::<BlobRef>(&j).unwrap(), n);
        let j = serde_json::to_string(&r).unwrap();
        assert!(!j.contains("alias"));
        let back: BlobRef = serde_json::from_str(&j).unwrap();
        assert_eq!(back, r);
        assert!(serde_json::from_str::<Digest128>("\"zz\"").is_err());
    }
}
