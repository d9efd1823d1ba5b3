//! Local files: publishing a staged blob into a `file://` store by hard link, and reading
//! local files in large pieces.
//!
//! Contract: [`publish_by_link`] re-verifies a staged blob (header, footer, CRC64-NVME and
//! XXH3-128) and only then links it into the store under a temporary name, fsyncs, renames
//! it into place and fsyncs the directory; a concurrent identical publication is harmless
//! (same name, same bytes). Where a hard link is impossible (another filesystem) the file is
//! copied and fsynced instead. [`body`] turns a `GetResult` payload into a stream, reading a
//! local file in 4 MiB pieces on the blocking pool (instead of `object_store`'s 8 KiB), so
//! every layer above sees one kind of body.
//!
//! Crash: before the rename nothing is visible under the key; at worst a
//! `<blob>.link-<random>` file is left next to it, never read as a blob. After the rename
//! and the directory fsync the blob is durable. Retries: none (local I/O errors are
//! permanent, except interruptions, which callers may retry). Cancellation: dropping the
//! future does not stop the blocking task already running, which finishes or fails on its
//! own and leaves the same states as a crash.

use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cairn_core::blob::BlobDecoder;
use futures::stream::{BoxStream, StreamExt};
use object_store::{GetResult, GetResultPayload};

use crate::StoreError;

/// Size of one local read.
pub(crate) const LOCAL_READ: usize = 4 << 20;

/// Reads until `buf` is full or the file ends; returns the bytes read.
pub(crate) fn read_full(mut f: impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A `GetResult` payload as a stream of the bytes of `range`.
pub(crate) fn body(
    payload: GetResultPayload,
    range: &Range<u64>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    match payload {
        GetResultPayload::Stream(s) => s,
        GetResultPayload::File(file, path) => file_stream(file, path, range.clone()),
    }
}

/// `r` with its body replaced by `f(body, range)`.
pub(crate) fn map_body(
    r: GetResult,
    f: impl FnOnce(
        BoxStream<'static, object_store::Result<Bytes>>,
        &Range<u64>,
    ) -> BoxStream<'static, object_store::Result<Bytes>>,
) -> GetResult {
    let GetResult {
        payload,
        meta,
        range,
        attributes,
        extensions,
    } = r;
    let stream = f(body(payload, &range), &range);
    GetResult {
        payload: GetResultPayload::Stream(stream),
        meta,
        range,
        attributes,
        extensions,
    }
}

/// Bytes `range` of `file` in [`LOCAL_READ`] pieces; a file shorter than the range ends
/// the stream early (the reader sees a cut-off body).
fn file_stream(
    file: std::fs::File,
    path: PathBuf,
    range: Range<u64>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    let end = range.end;
    futures::stream::try_unfold((Some(file), range.start), move |(file, pos)| {
        let path = path.clone();
        async move {
            let Some(f) = file.filter(|_| pos < end) else {
                return Ok(None);
            };
            let want = usize::try_from(end - pos)
                .unwrap_or(LOCAL_READ)
                .min(LOCAL_READ);
            let (f, piece) = tokio::task::spawn_blocking(move || {
                let mut f = f;
                let mut buf = vec![0u8; want];
                f.seek(SeekFrom::Start(pos))?;
                let n = read_full(&f, &mut buf)?;
                buf.truncate(n);
                Ok::<_, std::io::Error>((f, buf))
            })
            .await?
            .map_err(|e| object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(std::io::Error::new(
                    e.kind(),
                    format!("read {}: {e}", path.display()),
                )),
            })?;
            if piece.is_empty() {
                return Ok(None);
            }
            let next = pos + piece.len() as u64;
            Ok(Some((Bytes::from(piece), (Some(f), next))))
        }
    })
    .boxed()
}

/// Reads a whole file in [`LOCAL_READ`] pieces.
fn read_chunks(
    f: &std::fs::File,
    path: &Path,
    mut each: impl FnMut(&[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut buf = vec![0u8; LOCAL_READ];
    loop {
        let n = read_full(f, &mut buf).map_err(|e| StoreError::Io {
            op: "read staged blob",
            path: path.display().to_string(),
            source: e,
        })?;
        if n == 0 {
            return Ok(());
        }
        each(&buf[..n])?;
    }
}

/// Publishes the staged blob `file` as `root/key` after verifying it with `decoder` (see
/// the module documentation).
pub(crate) async fn publish_by_link(
    root: &Path,
    key: &str,
    file: &Path,
    mut decoder: BlobDecoder,
) -> Result<(), StoreError> {
    let io = |op: &'static str, p: &Path| {
        let path = p.display().to_string();
        move |e| StoreError::Io {
            op,
            path,
            source: e,
        }
    };
    let (src, dest) = (file.to_path_buf(), root.join(key));
    let tmp = dest.with_extension(format!("link-{:016x}", rand::random::<u64>()));
    tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
        let f = std::fs::File::open(&src).map_err(io("open staged blob", &src))?;
        read_chunks(&f, &src, |piece| {
            decoder.check(piece).map_err(StoreError::from)
        })?;
        decoder.finish()?;
        let parent = dest.parent().unwrap_or(Path::new("/")).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io("create store directory", &parent))?;
        let _ = std::fs::remove_file(&tmp);
        if std::fs::hard_link(&src, &tmp).is_err() {
            // Another filesystem (or no link support): copy instead.
            std::fs::copy(&src, &tmp).map_err(io("copy staged blob into store", &tmp))?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io("fsync blob", &tmp))?;
        }
        std::fs::rename(&tmp, &dest).map_err(io("rename blob into place", &dest))?;
        std::fs::File::open(&parent)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync store directory", &parent))
    })
    .await
    .map_err(|e| StoreError::Io {
        op: "publish staged blob",
        path: file.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn files_stream_in_large_pieces_and_short_files_end_early() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..(9 << 20) + 5).map(|i: usize| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let pieces: Vec<Bytes> = file_stream(f, p.clone(), 10..data.len() as u64)
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(pieces.len(), 3);
        assert!(pieces.concat() == data[10..]);
        // A range past the end of the file: the stream just stops.
        let f = std::fs::File::open(&p).unwrap();
        let n: usize = file_stream(f, p, 0..data.len() as u64 + 100)
            .map(|b| b.unwrap().len())
            .collect::<Vec<_>>()
            .await
            .iter()
            .sum();
        assert_eq!(n, data.len());
    }
}
