//! Blob uploads: one PUT, part by part, or as one `ObjectStore` multipart upload.
//!
//! Contract: [`RemoteStore::put_blob_file`] uploads a staged blob file (either format
//! version, compressed or not) and [`RemoteStore::put_blob_range`] the uncompressed
//! (version 1) blob whose payload is a region of an immutable file (header and footer
//! framed on the fly). Either way the bytes are re-verified (header, footer, the stored
//! body's CRC64, the payload's CRC64-NVME and XXH3-128 against the expected `BlobRef`, a
//! compressed body being decompressed to check them) while they are read for upload, and a mismatch aborts the upload before anything becomes visible. Blobs up to
//! `multipart_threshold` go up in one PUT; larger ones through the part-level multipart API
//! (S3, memory) with at most `part_concurrency` parts of `part_size` bytes in memory (grown
//! if the blob would need more than 10,000 parts), or, for stores without that API, as one
//! `ObjectStore` multipart upload. On a `file://` store a staged blob is published by hard
//! link instead (`local.rs`).
//!
//! Crash: an upload becomes visible only when its single PUT or its completion lands, so a
//! crash leaves no object or the whole object, plus at worst an incomplete multipart upload
//! that is never completed (S3 buckets should expire them with a lifecycle rule).
//!
//! Retries: a single PUT, the creation of an upload, each part and an abort are retried by
//! the retry layer (a failed part is re-sent alone, with the same part number). The
//! completion is settled by reading back ([`RemoteStore::settled_write`]): after a lost
//! response, the object being there with the expected size means it landed (the key is
//! content-addressed). An `ObjectStore` multipart upload cannot re-send a part, so a failed
//! one is retried whole, from the source, on the store's retry engine.
//!
//! Cancellation: dropping the future aborts the part tasks it owns (a `JoinSet`) and never
//! completes the upload, so nothing partial is published. An upload that fails is aborted
//! (best effort, once: an unfinished upload is invisible whether or not the abort lands).

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use cairn_core::blob::{encode_footer, encode_header, BlobDecoder};
use cairn_core::BlobRef;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, ObjectStoreExt, WriteMultipart};

use crate::local::{read_full, LOCAL_READ};
use crate::{RemoteStore, StoreError};

/// S3 allows at most this many parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;

impl RemoteStore {
    /// Uploads a staged blob file to `key`, re-verifying its header, footer and digests
    /// against `expected` while the bytes stream out; a mismatch aborts the upload so
    /// nothing unverified becomes visible. Blobs up to `multipart_threshold` go up in one
    /// PUT; larger ones as multipart uploads with at most `part_concurrency` parts of
    /// `part_size` bytes in memory (the part size grows if the blob would need more than
    /// 10,000 parts), each part retried on its own.
    pub async fn put_blob_file(
        &self,
        key: &str,
        file: &FsPath,
        expected: &BlobRef,
    ) -> Result<(), StoreError> {
        let size = tokio::fs::metadata(file)
            .await
            .map_err(|e| StoreError::Io {
                op: "stat staged blob",
                path: file.display().to_string(),
                source: e,
            })?
            .len();
        if !expected.plausible_object_len(size) {
            return Err(StoreError::Corrupt(cairn_core::CoreError::CorruptBlob {
                name: file.display().to_string(),
                reason: format!(
                    "staged file has {size} bytes, which no blob of a {}-byte payload has",
                    expected.len
                ),
            }));
        }
        if let Some(root) = &self.local_root {
            let decoder = BlobDecoder::new(file.display().to_string(), Some(*expected));
            return crate::local::publish_by_link(root, key, file, decoder).await;
        }
        self.put_blob(key, &BlobSource::Staged(file.to_path_buf()), expected, size)
            .await
    }

    /// Uploads the blob whose payload is bytes `offset..offset + expected.len` of `source`,
    /// framing its header and footer on the fly, so an immutable source (a sealed segment)
    /// needs no staged copy. Verified while it streams exactly like
    /// [`RemoteStore::put_blob_file`]: if the source no longer holds the bytes `expected`
    /// describes (its CRC64-NVME or XXH3-128 differ), the upload is aborted and nothing
    /// becomes visible. Same single-PUT/multipart split, memory bound and retries.
    pub async fn put_blob_range(
        &self,
        key: &str,
        source: &FsPath,
        offset: u64,
        expected: &BlobRef,
    ) -> Result<(), StoreError> {
        let len = tokio::fs::metadata(source)
            .await
            .map_err(|e| StoreError::Io {
                op: "stat blob source",
                path: source.display().to_string(),
                source: e,
            })?
            .len();
        if len < offset.saturating_add(expected.len) {
            return Err(StoreError::Io {
                op: "read blob source",
                path: source.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{len} bytes, the blob needs {}..{}",
                        offset,
                        offset.saturating_add(expected.len)
                    ),
                ),
            });
        }
        let src = BlobSource::Range {
            file: source.to_path_buf(),
            offset,
        };
        let size = cairn_core::blob::plain_object_len(expected.len);
        self.put_blob(key, &src, expected, size).await
    }

    /// Uploads the object of `size` bytes `src` yields (single PUT or multipart), verifying
    /// it on the way.
    async fn put_blob(
        &self,
        key: &str,
        src: &BlobSource,
        expected: &BlobRef,
        size: u64,
    ) -> Result<(), StoreError> {
        if size <= self.cfg.multipart_threshold {
            let (s, e) = (src.clone(), *expected);
            let buf = blocking(src, move || {
                let mut r = s.open(&e)?;
                let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
                let n = read_full(&mut r, &mut buf)?;
                buf.truncate(n);
                Ok(buf)
            })
            .await?;
            let mut decoder = BlobDecoder::new(src.shown(), Some(*expected));
            decoder.check(&buf)?;
            decoder.finish()?;
            return self.put_bytes(key, Bytes::from(buf)).await;
        }
        let (top, once) = (&self.stack.top.multipart, &self.stack.once.multipart);
        match (top, once) {
            (Some(mp), Some(once)) => {
                self.upload_parts(key, src, expected, size, Arc::clone(mp), once)
                    .await
            }
            _ => {
                self.retrying("multipart put", key, || {
                    self.upload_whole(key, src, expected)
                })
                .await
            }
        }
    }

    /// Part size for an object of `size` bytes: the configured one, grown to whole MiB if
    /// the object would otherwise need more than S3's 10,000 parts.
    fn part_size_for(&self, size: u64) -> usize {
        let configured = self.cfg.part_size.max(5 << 20) as u64;
        let needed = size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
        usize::try_from(configured.max(needed)).unwrap_or(usize::MAX)
    }

    /// Multipart upload through the part-level API: parts read from the source one at a
    /// time, verified, and uploaded by at most `part_concurrency` tasks through `mp` (the top
    /// of the stack), each part retried alone; then the completion through `once` (below
    /// the retry layer), settled by reading back.
    async fn upload_parts(
        &self,
        key: &str,
        src: &BlobSource,
        expected: &BlobRef,
        size: u64,
        mp: Arc<dyn MultipartStore>,
        once: &Arc<dyn MultipartStore>,
    ) -> Result<(), StoreError> {
        let path = self.path(key);
        let id: MultipartId = mp
            .create_multipart(&path)
            .await
            .map_err(|e| self.err("create multipart upload", key, e))?;
        let part_size = self.part_size_for(size);
        let concurrency = self.cfg.part_concurrency.max(1);
        let expected = *expected;
        let mut decoder = BlobDecoder::new(src.shown(), Some(expected));
        let uploaded: Result<Vec<PartId>, StoreError> = async {
            let opened = src.clone();
            let mut f = Some(blocking(src, move || opened.open(&expected)).await?);
            let mut tasks = tokio::task::JoinSet::new();
            let mut parts: Vec<Option<PartId>> = Vec::new();
            for idx in 0.. {
                let Some(handle) = f.take() else { break };
                let (handle, buf) = blocking(src, move || {
                    let mut handle = handle;
                    let mut buf = vec![0u8; part_size];
                    let n = read_full(&mut handle, &mut buf)?;
                    buf.truncate(n);
                    Ok((handle, buf))
                })
                .await?;
                if buf.is_empty() {
                    break;
                }
                decoder.check(&buf)?;
                while tasks.len() >= concurrency {
                    collect_part(&mut tasks, &mut parts, key).await?;
                }
                let (this, mp, key, path, id) = (
                    self.clone(),
                    Arc::clone(&mp),
                    key.to_string(),
                    path.clone(),
                    id.clone(),
                );
                tasks.spawn(async move {
                    let part = mp
                        .put_part(&path, &id, idx, Bytes::from(buf).into())
                        .await
                        .map_err(|e| this.err("upload part", &key, e))?;
                    Ok((idx, part))
                });
                f = Some(handle);
            }
            decoder.finish()?;
            while !tasks.is_empty() {
                collect_part(&mut tasks, &mut parts, key).await?;
            }
            parts
                .into_iter()
                .enumerate()
                .map(|(part, p)| {
                    p.ok_or_else(|| StoreError::UploadIncomplete {
                        key: key.to_string(),
                        store: self.describe.clone(),
                        part,
                    })
                })
                .collect()
        }
        .await;
        let parts = match uploaded {
            Ok(parts) => parts,
            Err(e) => {
                // Once, best effort: an unfinished upload is invisible whether or not the
                // abort lands.
                if let Err(abort) = once.abort_multipart(&path, &id).await {
                    let abort = self.err("abort multipart upload", key, abort);
                    tracing::debug!(key, store = %self.describe, error = %abort, "could not abort an upload");
                }
                return Err(e);
            }
        };
        self.complete_upload(key, size, &path, &id, parts, once)
            .await
    }

    /// Completes a multipart upload; a completion whose response was lost is recognised by
    /// the object being there with the expected size (the key is content-addressed).
    async fn complete_upload(
        &self,
        key: &str,
        size: u64,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
        mp: &Arc<dyn MultipartStore>,
    ) -> Result<(), StoreError> {
        let op = "complete multipart upload";
        let parts = &parts;
        self.settled_write(
            op,
            key,
            || async move {
                mp.complete_multipart(path, id, parts.clone())
                    .await
                    .map(|_| ())
                    .map_err(|e| self.err(op, key, e))
            },
            // After a lost response, or when the upload is gone: maybe it completed.
            |e, uncertain| uncertain || matches!(e, StoreError::NotFound { .. }),
            || async move {
                Ok(matches!(self.head(key).await, Ok(Some(found)) if found == size).then_some(()))
            },
        )
        .await
    }

    /// One whole multipart upload through the `ObjectStore` API (stores without the
    /// part-level API), on the layers below the retry layer; its caller retries it whole.
    async fn upload_whole(
        &self,
        key: &str,
        src: &BlobSource,
        expected: &BlobRef,
    ) -> Result<(), StoreError> {
        let mut decoder = BlobDecoder::new(src.shown(), Some(*expected));
        let (opened, e) = (src.clone(), *expected);
        let mut reader = Some(blocking(src, move || opened.open(&e)).await?);
        let upload = self
            .stack
            .once
            .store
            .put_multipart(&self.path(key))
            .await
            .map_err(|e| self.err("multipart put", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.cfg.part_size);
        let piece = self.cfg.part_size.min(LOCAL_READ);
        let result: Result<(), StoreError> = async {
            while let Some(r) = reader.take() {
                let (r, buf) = blocking(src, move || {
                    let mut r = r;
                    let mut buf = vec![0u8; piece];
                    let n = read_full(&mut r, &mut buf)?;
                    buf.truncate(n);
                    Ok((r, buf))
                })
                .await?;
                if buf.is_empty() {
                    break;
                }
                decoder.check(&buf)?;
                writer
                    .wait_for_capacity(self.cfg.part_concurrency)
                    .await
                    .map_err(|e| self.err("multipart put", key, e))?;
                writer.write(&buf);
                reader = Some(r);
            }
            Ok(())
        }
        .await;
        let verified = result.and_then(|()| decoder.finish().map(|_| ()).map_err(StoreError::from));
        match verified {
            Ok(()) => writer
                .finish()
                .await
                .map(|_| ())
                .map_err(|e| self.err("multipart put", key, e)),
            Err(e) => {
                // Best effort: the upload is invisible whether or not the abort reaches the store.
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }
}

/// Where the bytes of a blob object come from.
#[derive(Clone)]
enum BlobSource {
    /// A staged file holding the whole object (header, payload, footer).
    Staged(std::path::PathBuf),
    /// The payload is a region of an immutable file; header and footer are framed on the fly.
    Range {
        file: std::path::PathBuf,
        offset: u64,
    },
}

impl BlobSource {
    fn shown(&self) -> String {
        match self {
            BlobSource::Staged(p) => p.display().to_string(),
            BlobSource::Range { file, offset } => format!("{}@{offset}", file.display()),
        }
    }

    /// A reader of the whole object (blocking I/O).
    fn open(&self, expected: &BlobRef) -> std::io::Result<ObjectReader> {
        use std::io::{Seek, SeekFrom};
        match self {
            BlobSource::Staged(p) => Ok(ObjectReader {
                header: Vec::new(),
                file: std::fs::File::open(p)?,
                remaining: u64::MAX,
                footer: Vec::new(),
            }),
            BlobSource::Range { file, offset } => {
                let mut f = std::fs::File::open(file)?;
                f.seek(SeekFrom::Start(*offset))?;
                Ok(ObjectReader {
                    header: encode_header(expected.kind, expected.len).to_vec(),
                    file: f,
                    remaining: expected.len,
                    footer: encode_footer(expected.crc64).to_vec(),
                })
            }
        }
    }
}

/// Header bytes, then at most `remaining` bytes of the file, then footer bytes.
struct ObjectReader {
    header: Vec<u8>,
    file: std::fs::File,
    remaining: u64,
    footer: Vec<u8>,
}

impl std::io::Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.header.is_empty() {
            let n = self.header.len().min(buf.len());
            buf[..n].copy_from_slice(&self.header[..n]);
            self.header.drain(..n);
            return Ok(n);
        }
        if self.remaining > 0 {
            let want = usize::try_from(self.remaining)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let n = self.file.read(&mut buf[..want])?;
            if n > 0 || self.footer.is_empty() {
                self.remaining -= n as u64;
                return Ok(n);
            }
            // The file ended early: the footer follows and the decoder reports the shortfall.
            self.remaining = 0;
        }
        let n = self.footer.len().min(buf.len());
        buf[..n].copy_from_slice(&self.footer[..n]);
        self.footer.drain(..n);
        Ok(n)
    }
}

/// Runs blocking source I/O off the async threads; errors name the source.
async fn blocking<T: Send + 'static>(
    src: &BlobSource,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    let shown = src.shown();
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError::Io {
            op: "read blob source",
            path: shown,
            source: e,
        }),
        Err(e) => Err(StoreError::Io {
            op: "read blob source",
            path: shown,
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

type PartTasks = tokio::task::JoinSet<Result<(usize, PartId), StoreError>>;

/// Waits for one part upload and records its id.
async fn collect_part(
    tasks: &mut PartTasks,
    parts: &mut Vec<Option<PartId>>,
    key: &str,
) -> Result<(), StoreError> {
    match tasks.join_next().await {
        Some(Ok(Ok((idx, part)))) => {
            if parts.len() <= idx {
                parts.resize(idx + 1, None);
            }
            parts[idx] = Some(part);
            Ok(())
        }
        Some(Ok(Err(e))) => Err(e),
        Some(Err(join)) => Err(StoreError::Io {
            op: "upload part of",
            path: key.to_string(),
            source: std::io::Error::other(join.to_string()),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::fault::FaultConfig;
    use crate::testutil::{fast_cfg, roundtrip, rt, staged};
    use crate::StoreConfig;
    use cairn_core::blob::encode_blob;
    use cairn_core::BlobKind;

    #[test]
    fn file_store_single_and_multipart() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("s").display());
        let cfg = StoreConfig {
            multipart_threshold: 1 << 20,
            part_size: 5 << 20,
            part_concurrency: 2,
            ..Default::default()
        };
        let store = RemoteStore::open_with(&url, cfg).unwrap();
        rt().block_on(async {
            roundtrip(&store, 1000).await;
            roundtrip(&store, (11 << 20) + 17).await;
            assert_eq!(store.list("a").await.unwrap().len(), 1);
        });
    }

    #[test]
    fn staged_file_corruption_is_not_uploaded() {
        let store = RemoteStore::open("memory://staged-corrupt").unwrap();
        let (mut obj, r) = encode_blob(BlobKind::Base, &[7u8; 4096]);
        obj[100] ^= 1;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("blob");
        std::fs::write(&f, &obj).unwrap();
        rt().block_on(async {
            assert!(store.put_blob_file("k", &f, &r).await.is_err());
            assert_eq!(store.head("k").await.unwrap(), None);
        });
    }

    #[test]
    fn faulty_store_uploads_parts_alone_and_heals_damaged_reads() {
        let fault = FaultConfig {
            seed: 11,
            transient_errors: 0.2,
            lost_write_responses: 0.2,
            corrupted_bodies: 0.2,
            truncated_bodies: 0.2,
            // get_bytes has no checksum to catch a flipped byte with (callers with one use
            // get_bytes_verified); body faults go to the blob only.
            body_fault_keys: Some("big".into()),
            ..Default::default()
        };
        let (store, faults) =
            RemoteStore::open_faulty("memory://faulty-parts", fast_cfg(), fault).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let payload: Vec<u8> = (0..(17 << 20) + 5)
            .map(|i: usize| (i % 253) as u8)
            .collect();
        let (f, r, _) = staged(dir.path(), &payload);
        rt().block_on(async {
            store.put_blob_file("big", &f, &r).await.unwrap();
            for i in 0..10 {
                let k = format!("small/{i}");
                store
                    .put_bytes(&k, Bytes::from(vec![i as u8; 100]))
                    .await
                    .unwrap();
                assert_eq!(store.get_bytes(&k).await.unwrap(), vec![i as u8; 100]);
            }
            for _ in 0..5 {
                let mut back = vec![0u8; payload.len()];
                store
                    .get_blob("big", &r, |off, p| {
                        back[off as usize..off as usize + p.len()].copy_from_slice(p);
                        Ok(())
                    })
                    .await
                    .unwrap();
                assert!(back == payload);
                let piece = store.get_blob_range("big", &r, 100..5000).await.unwrap();
                assert_eq!(&piece[..], &payload[100..5000]);
            }
        });
        let c = faults.counts();
        let s = store.stats();
        assert!(c.transient_errors > 0 && c.lost_responses > 0, "{c:?}");
        assert!(s.retries > 0, "{s:?}");
        // Every corrupted byte delivered to get_blob was caught (range reads verify only
        // the header and footer, so corruption inside a range is the caller's to catch).
        assert!(s.damaged_reads > 0, "{s:?} {c:?}");
    }

    #[test]
    fn blobs_upload_straight_from_an_immutable_source_region() {
        let dir = tempfile::tempdir().unwrap();
        let file_url = format!("file://{}", dir.path().join("fs").display());
        let src = dir.path().join("segment");
        let data: Vec<u8> = (0..(13 << 20) + 99)
            .map(|i: usize| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&src, &data).unwrap();
        rt().block_on(async {
            for url in ["memory://from-range", file_url.as_str()] {
                let store = RemoteStore::open_with(url, fast_cfg()).unwrap();
                // A small region (single PUT) and a large one (multipart).
                for (k, range) in [("small", 100..5000usize), ("large", 1000..data.len())] {
                    let (obj, r) = encode_blob(BlobKind::Segment, &data[range.clone()]);
                    store
                        .put_blob_range(k, &src, range.start as u64, &r)
                        .await
                        .unwrap();
                    assert_eq!(store.get_bytes(k).await.unwrap(), obj, "{url} {k}");
                }
                // The source changed since its digests were taken: refused, nothing visible.
                let (_, r) = encode_blob(BlobKind::Segment, &data[1..(7 << 20)]);
                let e = store
                    .put_blob_range("changed", &src, 0, &r)
                    .await
                    .unwrap_err();
                assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
                assert_eq!(store.head("changed").await.unwrap(), None);
                let e = store
                    .put_blob_range("short", &src, data.len() as u64 - 10, &r)
                    .await
                    .unwrap_err();
                assert!(e.to_string().contains("segment"), "{e}");
            }
        });
    }
}
