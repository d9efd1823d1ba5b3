//! [`BlobDecoder`]: streams one blob object of either version, decompressing a zstd body
//! on the fly, and verifies both layers (the stored body's CRC64, then the payload's CRC64
//! and XXH3-128) without buffering the payload.

use super::{
    Codec, DecodedBlob, BLOB_VERSION, BLOB_VERSION_PLAIN, FOOTER_LEN, FOOTER_LEN_V2, FOOTER_MAGIC,
    HEADER_LEN, HEADER_LEN_V2, HEADER_MAGIC, MAX_WINDOW_LOG,
};
use crate::address::{crc64, BlobKind, BlobRef, PayloadHasher};
use crate::error::CoreError;
use zstd::stream::raw::{DParameter, Decoder as ZstdDecoder, Operation};

/// Decompressed bytes handed to the sink at a time (the decoder's only buffer besides
/// zstd's window).
const INFLATE_BUF: usize = 128 << 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Header,
    Body,
    Footer,
}

/// What the header says.
#[derive(Clone, Copy)]
struct Layout {
    version: u16,
    kind: BlobKind,
    codec: Codec,
    payload_len: u64,
    stored_len: u64,
}

impl Layout {
    fn header_len(&self) -> usize {
        if self.version == BLOB_VERSION_PLAIN {
            HEADER_LEN
        } else {
            HEADER_LEN_V2
        }
    }

    fn footer_len(&self) -> usize {
        if self.version == BLOB_VERSION_PLAIN {
            FOOTER_LEN
        } else {
            FOOTER_LEN_V2
        }
    }
}

/// A zstd body being inflated.
struct Inflate {
    dec: ZstdDecoder<'static>,
    out: Vec<u8>,
    frame_done: bool,
}

/// Streaming decoder and verifier of one blob object (version 1 or 2).
///
/// Feed the object's bytes in any split with [`BlobDecoder::push`], which hands every
/// piece of (decompressed) payload to its sink, in order; then call
/// [`BlobDecoder::finish`], which fails unless the header, the footer, the lengths, the
/// stored body's CRC64 and the payload's digests all match what was expected. Memory:
/// a 128 KiB output buffer and zstd's window (at most 2^27 bytes; the frames Cairn
/// writes at levels up to 19 use at most 8 MiB).
pub struct BlobDecoder {
    name: String,
    expected: Option<BlobRef>,
    stage: Stage,
    header: Vec<u8>,
    footer: Vec<u8>,
    layout: Option<Layout>,
    body_seen: u64,
    body_crc: crc64fast_nvme::Digest,
    hasher: PayloadHasher,
    inflate: Option<Inflate>,
}

fn corrupt(name: &str, reason: impl Into<String>) -> CoreError {
    CoreError::CorruptBlob {
        name: name.to_string(),
        reason: reason.into(),
    }
}

impl BlobDecoder {
    /// A decoder for the blob called `name` (used in errors); with `expected`, the decoded
    /// blob must match that reference exactly.
    pub fn new(name: impl Into<String>, expected: Option<BlobRef>) -> Self {
        Self {
            name: name.into(),
            expected,
            stage: Stage::Header,
            header: Vec::with_capacity(HEADER_LEN_V2),
            footer: Vec::with_capacity(FOOTER_LEN_V2),
            layout: None,
            body_seen: 0,
            body_crc: crc64fast_nvme::Digest::new(),
            hasher: PayloadHasher::new(),
            inflate: None,
        }
    }

    /// The object's format version, once the first 32 header bytes were pushed and checked.
    pub fn version(&self) -> Option<u16> {
        self.layout.map(|l| l.version)
    }

    /// The size of the whole object, once its header was pushed and checked.
    pub fn object_len(&self) -> Option<u64> {
        match (self.stage, self.layout) {
            (Stage::Header, _) | (_, None) => None,
            (_, Some(l)) => Some((l.header_len() + l.footer_len()) as u64 + l.stored_len),
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> CoreError {
        corrupt(&self.name, reason)
    }

    /// Checks bytes 0..32, common to both versions.
    fn parse_base(&mut self) -> Result<(), CoreError> {
        let h = &self.header;
        if &h[0..8] != HEADER_MAGIC {
            return Err(self.corrupt("bad header magic (not a Cairn blob)"));
        }
        let stored = u64::from_le_bytes(le8(&h[24..32]));
        if stored != crc64(&h[0..24]) {
            return Err(self.corrupt("header checksum mismatch"));
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != BLOB_VERSION_PLAIN && version != BLOB_VERSION {
            return Err(CoreError::UnsupportedVersion {
                name: self.name.clone(),
                what: "blob",
                version: u32::from(version),
                supported: u32::from(BLOB_VERSION),
            });
        }
        let kind = BlobKind::from_code(h[10])
            .ok_or_else(|| self.corrupt(format!("unknown blob kind byte {}", h[10])))?;
        let codec = match version {
            BLOB_VERSION_PLAIN => Codec::Raw,
            _ => Codec::from_code(h[11])
                .ok_or_else(|| self.corrupt(format!("unknown codec byte {}", h[11])))?,
        };
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
        self.layout = Some(Layout {
            version,
            kind,
            codec,
            payload_len: len,
            stored_len: len,
        });
        if version == BLOB_VERSION_PLAIN {
            self.start_body()?;
        }
        Ok(())
    }

    /// Checks the version 2 header extension (bytes 32..48: stored length and CRC).
    fn parse_extension(&mut self) -> Result<(), CoreError> {
        let h = &self.header;
        if u64::from_le_bytes(le8(&h[40..48])) != crc64(&h[0..40]) {
            return Err(self.corrupt("header extension checksum mismatch"));
        }
        let m = u64::from_le_bytes(le8(&h[32..40]));
        let Some(layout) = self.layout.as_mut() else {
            return Err(corrupt(&self.name, "header extension before the header"));
        };
        let n = layout.payload_len;
        match layout.codec {
            Codec::Raw if m != n => {
                return Err(corrupt(
                    &self.name,
                    format!("raw body of {m} bytes for a payload of {n}"),
                ))
            }
            Codec::Zstd if m == 0 || m > n => {
                return Err(corrupt(
                    &self.name,
                    format!("zstd body of {m} bytes for a payload of {n}"),
                ))
            }
            _ => {}
        }
        layout.stored_len = m;
        self.start_body()
    }

    fn start_body(&mut self) -> Result<(), CoreError> {
        if let Some(Layout {
            codec: Codec::Zstd, ..
        }) = self.layout
        {
            let setup = |source| CoreError::DecoderSetup {
                name: self.name.clone(),
                source,
            };
            let mut dec = ZstdDecoder::new().map_err(setup)?;
            dec.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG))
                .map_err(setup)?;
            self.inflate = Some(Inflate {
                dec,
                out: vec![0u8; INFLATE_BUF],
                frame_done: false,
            });
        }
        self.stage = Stage::Body;
        self.end_body_if_complete(&mut |_| Ok::<(), CoreError>(()))
    }

    /// Feeds the next bytes of the object, handing each piece of payload they complete to
    /// `sink` (in order; decompressed for a zstd body).
    pub fn push<E, F>(&mut self, data: &[u8], mut sink: F) -> Result<(), E>
    where
        E: From<CoreError>,
        F: FnMut(&[u8]) -> Result<(), E>,
    {
        let mut rest = data;
        while self.stage == Stage::Header && !rest.is_empty() {
            let want = match self.layout {
                None => HEADER_LEN,
                Some(_) => HEADER_LEN_V2,
            };
            let take = (want - self.header.len()).min(rest.len());
            self.header.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.header.len() == HEADER_LEN && self.layout.is_none() {
                self.parse_base()?;
            } else if self.header.len() == HEADER_LEN_V2 {
                self.parse_extension()?;
            }
        }
        if self.stage == Stage::Body {
            let Some(layout) = self.layout else {
                return Err(self.corrupt("body before the header").into());
            };
            let remaining = layout.stored_len - self.body_seen;
            let take = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(rest.len());
            let body = &rest[..take];
            rest = &rest[take..];
            self.body_seen += take as u64;
            match layout.codec {
                Codec::Raw => {
                    self.hasher.update(body);
                    if !body.is_empty() {
                        sink(body)?;
                    }
                }
                Codec::Zstd => {
                    self.body_crc.write(body);
                    self.inflate(body, &mut sink)?;
                }
            }
            self.end_body_if_complete(&mut sink)?;
        }
        if self.stage == Stage::Footer {
            let need = self.layout.map_or(FOOTER_LEN, |l| l.footer_len()) - self.footer.len();
            if rest.len() > need {
                return Err(self
                    .corrupt(format!(
                        "{} trailing bytes after the footer",
                        rest.len() - need
                    ))
                    .into());
            }
            self.footer.extend_from_slice(rest);
        }
        Ok(())
    }

    /// [`BlobDecoder::push`] for a caller that only verifies (the payload is still
    /// decompressed and hashed, then dropped).
    pub fn check(&mut self, data: &[u8]) -> Result<(), CoreError> {
        self.push(data, |_| Ok::<(), CoreError>(()))
    }

    /// Runs `input` (body bytes) through zstd, handing the output to `sink`.
    fn inflate<E, F>(&mut self, mut input: &[u8], sink: &mut F) -> Result<(), E>
    where
        E: From<CoreError>,
        F: FnMut(&[u8]) -> Result<(), E>,
    {
        let name = self.name.as_str();
        let n = self.layout.map_or(0, |l| l.payload_len);
        let Some(z) = self.inflate.as_mut() else {
            return Ok(());
        };
        loop {
            if z.frame_done && !input.is_empty() {
                return Err(corrupt(name, "body bytes after the end of the zstd frame").into());
            }
            let st = z
                .dec
                .run_on_buffers(input, &mut z.out)
                .map_err(|e| corrupt(name, format!("zstd body does not decompress: {e}")))?;
            input = &input[st.bytes_read..];
            let out = &z.out[..st.bytes_written];
            if !out.is_empty() {
                if self.hasher.len() + out.len() as u64 > n {
                    return Err(corrupt(
                        name,
                        format!("zstd body decompresses to more than the {n} payload bytes"),
                    )
                    .into());
                }
                self.hasher.update(out);
                sink(out)?;
            }
            if st.remaining == 0 {
                z.frame_done = true;
            }
            if input.is_empty() && st.bytes_written < z.out.len() {
                return Ok(());
            }
        }
    }

    /// Moves on to the footer once the whole body arrived; a zstd body must have been one
    /// complete frame of exactly the payload length.
    fn end_body_if_complete<E, F>(&mut self, sink: &mut F) -> Result<(), E>
    where
        E: From<CoreError>,
        F: FnMut(&[u8]) -> Result<(), E>,
    {
        let Some(layout) = self.layout else {
            return Ok(());
        };
        if self.stage != Stage::Body || self.body_seen != layout.stored_len {
            return Ok(());
        }
        if layout.codec == Codec::Zstd {
            self.inflate(&[], sink)?;
            let done = self.inflate.as_ref().is_some_and(|z| z.frame_done);
            if !done {
                return Err(self.corrupt("zstd body ends inside its frame").into());
            }
            if self.hasher.len() != layout.payload_len {
                return Err(self
                    .corrupt(format!(
                        "zstd body decompresses to {} bytes, header says {}",
                        self.hasher.len(),
                        layout.payload_len
                    ))
                    .into());
            }
            self.inflate = None;
        }
        self.stage = Stage::Footer;
        Ok(())
    }

    /// Checks the footer and the digests once every byte was pushed.
    pub fn finish(self) -> Result<DecodedBlob, CoreError> {
        let layout = match (self.stage, self.layout) {
            (Stage::Footer, Some(l)) if self.footer.len() == l.footer_len() => l,
            (Stage::Header, _) => {
                return Err(self.corrupt(format!(
                    "truncated: {} of {} header bytes",
                    self.header.len(),
                    self.layout.map_or(HEADER_LEN, |l| l.header_len())
                )))
            }
            (Stage::Body, Some(l)) => {
                let what = if l.codec == Codec::Raw {
                    "payload"
                } else {
                    "body"
                };
                return Err(self.corrupt(format!(
                    "truncated: {} of {} {what} bytes",
                    self.body_seen, l.stored_len
                )));
            }
            (_, l) => {
                return Err(self.corrupt(format!(
                    "truncated: {} of {} footer bytes",
                    self.footer.len(),
                    l.map_or(FOOTER_LEN, |l| l.footer_len())
                )))
            }
        };
        let f = &self.footer;
        if &f[f.len() - 8..] != FOOTER_MAGIC {
            return Err(self.corrupt("bad footer magic"));
        }
        let (address, xxh3) = self.hasher.finish();
        let payload_crc_at = if layout.version == BLOB_VERSION_PLAIN {
            0
        } else {
            let body_crc = match layout.codec {
                Codec::Raw => address.crc64,
                Codec::Zstd => self.body_crc.sum64(),
            };
            let stored = u64::from_le_bytes(le8(&f[0..8]));
            if stored != body_crc {
                return Err(self.corrupt(format!(
                    "stored body CRC64 {body_crc:016x} does not match footer {stored:016x}"
                )));
            }
            8
        };
        let stored = u64::from_le_bytes(le8(&f[payload_crc_at..payload_crc_at + 8]));
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
            kind: layout.kind,
            address,
            xxh3,
            version: layout.version,
            codec: layout.codec,
            object_len: (layout.header_len() + layout.footer_len()) as u64 + layout.stored_len,
        })
    }
}

fn le8(s: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&s[..8]);
    a
}
