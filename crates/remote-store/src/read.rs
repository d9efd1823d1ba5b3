//! Verified reads: whole small objects, streamed blobs, and ranges of blobs.
//!
//! Contract: [`RemoteStore::get_bytes`] returns a whole object, or an error; a body shorter
//! than the object is read again. [`RemoteStore::get_blob`] streams a blob through a
//! decoder that recomputes its CRC64-NVME and XXH3-128 and checks header, footer and
//! length against the manifest's `BlobRef`, handing each verified payload piece with its
//! offset to a sink; a compressed (version 2) blob is decompressed on the way, and both its
//! stored body's CRC64 and the payload's digests are checked. The object's size comes from
//! the store, bounded by what a blob of the payload's length can be, and must equal what
//! its header says. [`RemoteStore::get_blob_range`] reads part of a payload: of a version 1
//! blob by ranged GETs, checking what a range can be checked by (the header, the footer,
//! which must carry the content address, and the exact length); of a version 2 blob, whose
//! body may be compressed, by streaming the whole blob through the verifying decoder and
//! keeping the range. [`RemoteStore::get_bytes_verified`] checks a whole object
//! with the caller's own check (a manifest's checksum). Damage that survives every re-read
//! is [`StoreError::Corrupt`] naming the key; a missing object is
//! [`StoreError::NotFound`], a definite absence, never retried.
//!
//! Retries: two kinds, neither of them the retry layer's. A transfer cut off by a transient
//! error, or a body that ends early, resumes with a range GET from the byte reached (the
//! decoder's running checksums carry over), on the store's retry engine over the layers
//! below the retry layer, so one budget bounds a read. Bytes that fail verification are a
//! damaged transfer until proven otherwise: the whole read is made again, up to
//! `verify_read_attempts` passes ([`RemoteStore::until_verified`], the one re-read loop),
//! then reported corrupt. Each failed pass counts as a damaged read, each resumption as a
//! resumed read.
//!
//! Crash, cancellation: reads change nothing in the store. A sink may be called again from
//! offset 0 on a re-read pass, so it must write at the offsets given (overwrite), not
//! append. Dropping the future abandons the request and its body.

use std::ops::Range;

use bytes::Bytes;
use cairn_core::blob::{
    encode_footer, BlobDecoder, DecodedBlob, BLOB_VERSION_PLAIN, FOOTER_LEN, HEADER_LEN,
};
use cairn_core::BlobRef;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use crate::{RemoteStore, StoreError};

impl RemoteStore {
    /// Reads a whole (small) object; a body shorter than the object is read again.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = &self.path(key);
        self.retrying("get", key, || self.get_bytes_once(key, path))
            .await
    }

    /// One GET of a whole object and its body.
    async fn get_bytes_once(&self, key: &str, path: &Path) -> Result<Bytes, StoreError> {
        let res = self
            .stack
            .once
            .store
            .get(path)
            .await
            .map_err(|e| self.err("get", key, e))?;
        let size = res.meta.size;
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let mut stream = res.into_stream();
        while let Some(piece) = stream.next().await {
            buf.extend_from_slice(&piece.map_err(|e| self.err("get", key, e))?);
        }
        if buf.len() as u64 != size {
            self.stack.stats.damaged_read();
            return Err(StoreError::ShortBody {
                op: "get",
                key: key.to_string(),
                store: self.describe.clone(),
                received: buf.len() as u64,
                expected: size,
            });
        }
        Ok(Bytes::from(buf))
    }

    /// Reads a whole (small) object and checks it with `verify` (e.g. a manifest's own
    /// checksum). Bytes that fail are read again, up to `verify_read_attempts` reads, since a
    /// damaged transfer heals on a re-read; then the last failure is returned as
    /// [`StoreError::Corrupt`].
    pub async fn get_bytes_verified<V>(&self, key: &str, mut verify: V) -> Result<Bytes, StoreError>
    where
        V: FnMut(&[u8]) -> Result<(), cairn_core::CoreError>,
    {
        let mut rereads = self.rereads(key, "object");
        loop {
            let pass = async {
                let bytes = self.get_bytes(key).await?;
                verify(&bytes)?;
                Ok(bytes)
            };
            match pass.await {
                Err(StoreError::Corrupt(e)) => rereads.again(e)?,
                other => return other,
            }
        }
    }

    /// Streams the blob at `key`, verifying it against `expected`, and hands each payload
    /// piece with its offset to `sink`. Fails, naming the key, on any mismatch.
    ///
    /// A read cut off by a transient error resumes at the byte it reached (the sink sees
    /// each offset once per pass). A blob whose bytes fail verification (a damaged transfer)
    /// is read again from the start, up to `verify_read_attempts` passes: the sink is then
    /// called again from offset 0, so it must write at the offsets given (overwrite), not
    /// append. Only when every pass fails is [`StoreError::Corrupt`] returned.
    pub async fn get_blob<F>(
        &self,
        key: &str,
        expected: &BlobRef,
        mut sink: F,
    ) -> Result<DecodedBlob, StoreError>
    where
        F: FnMut(u64, &[u8]) -> std::io::Result<()>,
    {
        let mut rereads = self.rereads(key, "blob");
        loop {
            match self.read_blob_pass(key, expected, &mut sink).await {
                Err(StoreError::Corrupt(e)) => rereads.again(e)?,
                other => return other,
            }
        }
    }

    /// Reads bytes `payload_range` of the payload of the blob at `key`.
    ///
    /// A first ranged GET reads the header's version. A version 2 blob (its body may be
    /// compressed, so payload offsets are not object offsets) is streamed whole through the
    /// verifying decoder, every layer checked, and only the range kept. For a version 1
    /// blob, what is verified: the blob header (magic, header checksum, kind and payload length
    /// against `expected`), the footer (whose CRC64-NVME must be `expected`'s), and that
    /// exactly the requested number of bytes arrived. What cannot be: a range cannot
    /// recompute the whole payload's CRC64, so the bytes of the range themselves are the
    /// caller's to check at chunk or page level (restore does, with the page and delta
    /// checksums). Damaged headers, footers or short reads are read again like
    /// [`RemoteStore::get_blob`].
    pub async fn get_blob_range(
        &self,
        key: &str,
        expected: &BlobRef,
        payload_range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        if payload_range.start > payload_range.end || payload_range.end > expected.len {
            return Err(StoreError::BadRange {
                key: key.to_string(),
                store: self.describe.clone(),
                start: payload_range.start,
                end: payload_range.end,
                len: expected.len,
            });
        }
        if payload_range.is_empty() {
            return Ok(Bytes::new());
        }
        if self.blob_version(key, expected).await? != BLOB_VERSION_PLAIN {
            return self
                .get_blob_range_whole(key, expected, payload_range)
                .await;
        }
        let h = HEADER_LEN as u64;
        let footer_at = h + expected.len;
        let ranges = [
            0..h,
            h + payload_range.start..h + payload_range.end,
            footer_at..footer_at + FOOTER_LEN as u64,
        ];
        let path = &self.path(key);
        let mut rereads = self.rereads(key, "range read");
        loop {
            let pass = async {
                let got = self
                    .stack
                    .top
                    .store
                    .get_ranges(path, &ranges)
                    .await
                    .map_err(|e| self.err("range get", key, e))?;
                verify_range(key, expected, &ranges, &got)?;
                Ok(got[1].clone())
            };
            match pass.await {
                Err(StoreError::Corrupt(e)) => rereads.again(e)?,
                other => return other,
            }
        }
    }

    /// The format version of the blob at `key`, from its first 32 header bytes (checked
    /// like any header; a damaged one is read again).
    async fn blob_version(&self, key: &str, expected: &BlobRef) -> Result<u16, StoreError> {
        let path = &self.path(key);
        let mut rereads = self.rereads(key, "header read");
        loop {
            let pass = async {
                let got = self
                    .stack
                    .top
                    .store
                    .get_range(path, 0..HEADER_LEN as u64)
                    .await
                    .map_err(|e| self.err("range get", key, e))?;
                let mut header = BlobDecoder::new(key, Some(*expected));
                header.check(&got)?;
                header.version().ok_or_else(|| {
                    StoreError::Corrupt(cairn_core::CoreError::CorruptBlob {
                        name: key.to_string(),
                        reason: "truncated header".into(),
                    })
                })
            };
            match pass.await {
                Err(StoreError::Corrupt(e)) => rereads.again(e)?,
                other => return other,
            }
        }
    }

    /// A range of a version 2 blob: its body may be compressed, so no payload offset maps
    /// to an object offset. The whole blob streams through the verifying decoder and only
    /// the range is kept (memory: the range, plus the decoder's bounded buffers).
    async fn get_blob_range_whole(
        &self,
        key: &str,
        expected: &BlobRef,
        range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let mut buf = vec![0u8; usize::try_from(range.end - range.start).unwrap_or(0)];
        self.get_blob(key, expected, |off, piece| {
            let end = off + piece.len() as u64;
            let (from, to) = (off.max(range.start), end.min(range.end));
            if from < to {
                let src = (from - off) as usize..(to - off) as usize;
                let dst = (from - range.start) as usize..(to - range.start) as usize;
                buf[dst].copy_from_slice(&piece[src]);
            }
            Ok(())
        })
        .await?;
        Ok(Bytes::from(buf))
    }

    /// The one re-read rule for a read of `key`: see [`Rereads::again`].
    fn rereads<'a>(&'a self, key: &'a str, what: &'static str) -> Rereads<'a> {
        Rereads {
            store: self,
            key,
            what,
            pass: 1,
            passes: self.cfg.verify_read_attempts.max(1),
        }
    }

    /// One verified pass over a blob, resuming after transient errors and early ends.
    async fn read_blob_pass<F>(
        &self,
        key: &str,
        expected: &BlobRef,
        sink: &mut F,
    ) -> Result<DecodedBlob, StoreError>
    where
        F: FnMut(u64, &[u8]) -> std::io::Result<()>,
    {
        let mut st = ReadState {
            decoder: BlobDecoder::new(key, Some(*expected)),
            expected: *expected,
            received: 0,
            offset: 0,
            total: None,
        };
        let path = self.path(key);
        let mut budget = self.stack.retry.budget();
        loop {
            let before = st.received;
            let e = match self.read_from(key, &path, &mut st, sink).await {
                Ok(()) if Some(st.received) == st.total => return Ok(st.decoder.finish()?),
                // The body ended early without an error: resume where it stopped.
                Ok(()) => StoreError::ShortBody {
                    op: "get",
                    key: key.to_string(),
                    store: self.describe.clone(),
                    received: st.received,
                    expected: st.total.unwrap_or(0),
                },
                Err(e) if e.is_retryable() => e,
                Err(e) => return Err(e),
            };
            if !budget.wait("get", key, &e).await {
                return Err(budget.exhausted("get", key, e));
            }
            if st.received > before || matches!(e, StoreError::ShortBody { .. }) {
                self.stack.stats.resumed_read();
            }
        }
    }

    /// One GET of the blob from `st.received` on, fed through the decoder into the sink.
    async fn read_from<F>(
        &self,
        key: &str,
        path: &Path,
        st: &mut ReadState,
        sink: &mut F,
    ) -> Result<(), StoreError>
    where
        F: FnMut(u64, &[u8]) -> std::io::Result<()>,
    {
        let opts = GetOptions {
            range: st
                .total
                .filter(|_| st.received > 0)
                .map(|total| GetRange::Bounded(st.received..total)),
            ..Default::default()
        };
        let res = self
            .stack
            .once
            .store
            .get_opts(path, opts)
            .await
            .map_err(|e| self.err("get", key, e))?;
        match st.total {
            // The object's size comes from the store, bounded by what a blob of this payload
            // can be; its header says the exact size, which the decoder checks.
            None if !st.expected.plausible_object_len(res.meta.size) => {
                return Err(StoreError::WrongSize {
                    key: key.to_string(),
                    store: self.describe.clone(),
                    payload_len: st.expected.len,
                    actual: res.meta.size,
                });
            }
            None => st.total = Some(res.meta.size),
            // Resuming: a content-addressed object only changes size if another writer
            // replaced it (with another codec or level); read it again from the start.
            Some(total) if total != res.meta.size => {
                return Err(StoreError::Corrupt(cairn_core::CoreError::CorruptBlob {
                    name: key.to_string(),
                    reason: format!(
                        "object changed from {total} to {} bytes during the read",
                        res.meta.size
                    ),
                }));
            }
            Some(_) => {}
        }
        let mut stream = res.into_stream();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| self.err("get", key, e))?;
            st.feed(key, &piece, sink)?;
        }
        Ok(())
    }
}

/// Progress of one verified pass over a blob.
struct ReadState {
    decoder: BlobDecoder,
    expected: BlobRef,
    /// Object bytes received and verified so far.
    received: u64,
    /// Payload bytes handed to the sink so far.
    offset: u64,
    /// The object's size, from the first response.
    total: Option<u64>,
}

impl ReadState {
    fn feed<F>(&mut self, key: &str, piece: &[u8], sink: &mut F) -> Result<(), StoreError>
    where
        F: FnMut(u64, &[u8]) -> std::io::Result<()>,
    {
        let corrupt = |reason: String| {
            StoreError::Corrupt(cairn_core::CoreError::CorruptBlob {
                name: key.to_string(),
                reason,
            })
        };
        let total = self.total.unwrap_or(0);
        if self.received + piece.len() as u64 > total {
            return Err(corrupt(format!(
                "more than the {total} bytes the object has"
            )));
        }
        self.received += piece.len() as u64;
        let offset = &mut self.offset;
        self.decoder.push(piece, |payload| {
            sink(*offset, payload).map_err(|e| StoreError::Io {
                op: "write restored bytes of",
                path: key.to_string(),
                source: e,
            })?;
            *offset += payload.len() as u64;
            Ok::<(), StoreError>(())
        })?;
        match self.decoder.object_len() {
            Some(len) if len != total => Err(corrupt(format!(
                "header says the object has {len} bytes, the store says {total}"
            ))),
            _ => Ok(()),
        }
    }
}

/// Checks the header, footer and lengths of a range read (see `get_blob_range`).
fn verify_range(
    key: &str,
    expected: &BlobRef,
    ranges: &[Range<u64>; 3],
    got: &[Bytes],
) -> Result<(), StoreError> {
    let corrupt = |reason: String| {
        StoreError::Corrupt(cairn_core::CoreError::CorruptBlob {
            name: key.to_string(),
            reason,
        })
    };
    if got.len() != ranges.len() {
        return Err(corrupt(format!("{} ranges returned, 3 asked", got.len())));
    }
    for (r, b) in ranges.iter().zip(got) {
        if b.len() as u64 != r.end - r.start {
            return Err(corrupt(format!(
                "range {}..{} returned {} bytes",
                r.start,
                r.end,
                b.len()
            )));
        }
    }
    let mut header = BlobDecoder::new(key, Some(*expected));
    header.check(&got[0])?;
    if got[2].as_ref() != encode_footer(expected.crc64) {
        return Err(corrupt(format!(
            "footer does not carry the content address CRC64 {:016x}",
            expected.crc64
        )));
    }
    Ok(())
}

/// Counts the passes of a read whose bytes must verify. (Each read loops over its own
/// pass; the decision to read again lives here. A plain loop rather than a closure keeps
/// the read futures `Send` for every lifetime.)
struct Rereads<'a> {
    store: &'a RemoteStore,
    key: &'a str,
    what: &'static str,
    pass: u32,
    passes: u32,
}

impl Rereads<'_> {
    /// After a pass whose bytes failed verification: `Ok` to read again (a damaged
    /// transfer heals on a re-read), or [`StoreError::Corrupt`] once `verify_read_attempts`
    /// passes failed.
    fn again(&mut self, e: cairn_core::CoreError) -> Result<(), StoreError> {
        self.store.stack.stats.damaged_read();
        if self.pass >= self.passes {
            return Err(StoreError::Corrupt(e));
        }
        tracing::warn!(
            key = self.key,
            store = %self.store.describe,
            pass = self.pass,
            error = %e,
            "{} failed verification; reading it again",
            self.what
        );
        self.pass += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testutil::{fast_cfg, rt, staged};
    use crate::CreateOutcome;
    use cairn_core::blob::encode_blob;
    use cairn_core::BlobKind;

    #[test]
    fn conditional_create_and_corrupt_reads() {
        let store = RemoteStore::open("memory://cc-test").unwrap();
        rt().block_on(async {
            let b = Bytes::from_static(b"x");
            assert_eq!(
                store.create_if_absent("m/1", b.clone()).await.unwrap(),
                CreateOutcome::Created
            );
            assert_eq!(
                store.create_if_absent("m/1", b).await.unwrap(),
                CreateOutcome::AlreadyExists
            );
            let (mut obj, r) = encode_blob(BlobKind::Base, b"hello");
            obj[33] ^= 1;
            store.put_bytes("blobs/x", Bytes::from(obj)).await.unwrap();
            let err = store
                .get_blob("blobs/x", &r, |_, _| Ok(()))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("blobs/x"), "{err}");
            let err = store
                .get_blob("blobs/none", &r, |_, _| Ok(()))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("blobs/none") && err.contains("not found"),
                "{err}"
            );
        });
    }

    /// Half noise, half repetition: compresses to about half, so a multi-MiB payload
    /// still needs a multipart upload.
    fn half_compressible(n: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .map(|i| {
                if (i / 4096) % 2 == 0 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                } else {
                    (i % 7) as u8
                }
            })
            .collect()
    }

    #[test]
    fn compressed_blobs_resume_heal_serve_ranges_and_name_damage() {
        let fault = crate::fault::FaultConfig {
            seed: 5,
            transient_errors: 0.2,
            corrupted_bodies: 0.1,
            truncated_bodies: 0.1,
            ..Default::default()
        };
        let (store, _) =
            RemoteStore::open_faulty("memory://zstd-faulty", fast_cfg(), fault).unwrap();
        let payload = half_compressible((9 << 20) + 123);
        let (obj, r) =
            cairn_core::blob::encode_blob_with(BlobKind::Base, &payload, Some(3)).unwrap();
        assert!(obj.len() < payload.len() * 6 / 10 && obj.len() > 2 << 20);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("z");
        std::fs::write(&f, &obj).unwrap();
        rt().block_on(async {
            store.put_blob_file("z", &f, &r).await.unwrap();
            assert_eq!(store.head("z").await.unwrap(), Some(obj.len() as u64));
            for _ in 0..4 {
                let mut back = vec![0u8; payload.len()];
                let d = store
                    .get_blob("z", &r, |off, p| {
                        back[off as usize..off as usize + p.len()].copy_from_slice(p);
                        Ok(())
                    })
                    .await
                    .unwrap();
                assert_eq!(d.object_len, obj.len() as u64);
                assert!(back == payload);
                let piece = store
                    .get_blob_range("z", &r, 5_000_000..5_100_000)
                    .await
                    .unwrap();
                assert!(piece[..] == payload[5_000_000..5_100_000]);
            }
        });
        let st = store.stats();
        assert!(st.damaged_reads > 0 && st.retries > 0, "{st:?}");
        // Damage at rest in the compressed body: every pass fails, the key is named.
        let clean = RemoteStore::open_with("memory://zstd-damaged", fast_cfg()).unwrap();
        let mut bad = obj.clone();
        bad[obj.len() / 2] ^= 4;
        rt().block_on(async {
            clean
                .put_bytes("blobs/bad", Bytes::from(bad))
                .await
                .unwrap();
            let e = clean
                .get_blob("blobs/bad", &r, |_, _| Ok(()))
                .await
                .unwrap_err();
            assert!(
                matches!(e, StoreError::Corrupt(_)) && e.to_string().contains("blobs/bad"),
                "{e}"
            );
            let e = clean
                .get_blob_range("blobs/bad", &r, 0..10)
                .await
                .unwrap_err();
            assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
            // A size no blob of this payload can have is refused before decoding.
            clean
                .put_bytes("blobs/small", Bytes::from_static(b"tiny"))
                .await
                .unwrap();
            let e = clean
                .get_blob("blobs/small", &r, |_, _| Ok(()))
                .await
                .unwrap_err();
            assert!(matches!(e, StoreError::WrongSize { .. }), "{e}");
        });
    }

    #[test]
    fn permanent_errors_are_not_retried_and_ranges_are_checked() {
        let store = RemoteStore::open_with("memory://permanent", fast_cfg()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (f, r, mut obj) = staged(dir.path(), b"0123456789");
        rt().block_on(async {
            let e = store.get_bytes("missing").await.unwrap_err();
            assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
            assert_eq!(store.stats().retries, 0);
            store.put_blob_file("b", &f, &r).await.unwrap();
            assert_eq!(
                &store.get_blob_range("b", &r, 2..5).await.unwrap()[..],
                b"234"
            );
            assert!(store.get_blob_range("b", &r, 5..11).await.is_err());
            // A footer that does not carry the content address is refused.
            let n = obj.len();
            obj[n - 16] ^= 1;
            store.put_bytes("b", Bytes::from(obj)).await.unwrap();
            let e = store.get_blob_range("b", &r, 2..5).await.unwrap_err();
            assert!(
                e.to_string().contains('b') && matches!(e, StoreError::Corrupt(_)),
                "{e}"
            );
        });
    }
}
