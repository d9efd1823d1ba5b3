//! Reading sources: raw page files, SQLite databases (read in place, see [`crate::sqlite`])
//! and directories of sealed segments.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use cairn_core::{ContentAddress, Digest128, PayloadHasher};

use crate::error::ExecError;

/// Read buffer size for streaming reads; memory use per stream does not grow beyond it.
pub const IO_BUF: usize = 1 << 20;

/// A quiescent file of fixed-size pages.
#[derive(Debug)]
pub struct PageFile {
    /// Where it is.
    pub path: PathBuf,
    /// Open handle.
    pub file: File,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
    /// Page size in bytes.
    pub page_size: u32,
}

impl PageFile {
    /// Opens a page file and checks its length is a whole number of pages.
    pub fn open(path: &Path, page_size: u32) -> Result<Self, ExecError> {
        if page_size == 0 || !page_size.is_power_of_two() || !(512..=65536).contains(&page_size) {
            return Err(ExecError::BadSource {
                path: path.display().to_string(),
                reason: format!(
                    "page size {page_size} is not a power of two between 512 and 65536"
                ),
            });
        }
        let file = File::open(path).map_err(ExecError::io("open source", path))?;
        let meta = file
            .metadata()
            .map_err(ExecError::io("stat source", path))?;
        if !meta.is_file() {
            return Err(ExecError::BadSource {
                path: path.display().to_string(),
                reason: "not a regular file".into(),
            });
        }
        let len = meta.len();
        if len % u64::from(page_size) != 0 {
            return Err(ExecError::BadSource {
                path: path.display().to_string(),
                reason: format!(
                    "length {len} is not a multiple of the page size {page_size} (wrong --page-size?)"
                ),
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len,
            page_size,
        })
    }
}

/// Something page bytes are read from by offset: a plain file, or a SQLite snapshot read
/// in place ([`crate::SqliteSnapshot`]: the main file with the WAL's frames laid over it).
pub trait ReadAt: Send + Sync {
    /// Fills `buf` with the bytes at `offset`; `UnexpectedEof` if they are not all there.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for std::sync::Arc<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// Reads `len` bytes at `offset` in `IO_BUF` pieces, handing each to `f`.
pub fn read_range<R: ReadAt + ?Sized>(
    file: &R,
    path: &Path,
    offset: u64,
    len: u64,
    mut f: impl FnMut(&[u8]) -> Result<(), ExecError>,
) -> Result<(), ExecError> {
    let mut buf = vec![0u8; IO_BUF.min(usize::try_from(len).unwrap_or(IO_BUF)).max(1)];
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let piece = &mut buf[..want];
        file.read_exact_at(piece, offset + done).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ExecError::SourceChanged {
                    path: path.display().to_string(),
                    detail: format!("file ended before byte {}", offset + len),
                }
            } else {
                ExecError::Io {
                    op: "read source",
                    path: path.display().to_string(),
                    source: e,
                }
            }
        })?;
        f(piece)?;
        done += want as u64;
    }
    Ok(())
}

/// Computes the content address and confirming digest of a byte range of a file.
pub fn hash_range<R: ReadAt + ?Sized>(
    file: &R,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<(ContentAddress, Digest128), ExecError> {
    let mut h = PayloadHasher::new();
    read_range(file, path, offset, len, |p| {
        h.update(p);
        Ok(())
    })?;
    Ok(h.finish())
}

/// One file of a segment directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentFile {
    /// File name.
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// Full path.
    pub path: PathBuf,
}

/// Lists the sealed segments of a directory, in name order. Every entry must be a regular
/// file with a plain name; anything else is an error naming it.
pub fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>, ExecError> {
    let meta = std::fs::metadata(dir).map_err(ExecError::io("open segment directory", dir))?;
    if !meta.is_dir() {
        return Err(ExecError::BadSource {
            path: dir.display().to_string(),
            reason: "not a directory (a segments source is a directory of segment files)".into(),
        });
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(ExecError::io("list segment directory", dir))? {
        let entry = entry.map_err(ExecError::io("list segment directory", dir))?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| ExecError::BadSource {
                path: dir.display().to_string(),
                reason: format!("segment name {n:?} is not UTF-8"),
            })?;
        if !cairn_core::manifest::valid_segment_name(&name) {
            return Err(ExecError::BadSource {
                path: path.display().to_string(),
                reason: "segment names must be printable ASCII without separators".into(),
            });
        }
        let m = std::fs::metadata(&path).map_err(ExecError::io("stat segment", &path))?;
        if !m.is_file() {
            return Err(ExecError::BadSource {
                path: path.display().to_string(),
                reason: "not a regular file (segment directories hold only segment files)".into(),
            });
        }
        out.push(SegmentFile {
            name,
            len: m.len(),
            path,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Runs `PRAGMA integrity_check` on a SQLite file and returns its findings (empty = ok).
pub fn sqlite_integrity_check(path: &Path) -> Result<Vec<String>, ExecError> {
    use rusqlite::{Connection, OpenFlags};
    let err = |source| ExecError::Sqlite {
        path: path.display().to_string(),
        source,
    };
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
    let mut stmt = c.prepare("PRAGMA integrity_check").map_err(err)?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(err)?
        .collect::<Result<_, _>>()
        .map_err(err)?;
    Ok(rows.into_iter().filter(|r| r != "ok").collect())
}

/// The digest of one page used to find changed pages: XXH3-128.
pub fn page_digest(page: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(page)
}

/// What one read of a chunk found, against the page digests of its previous state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageScan {
    /// One digest per page of the chunk now.
    pub digests: Vec<u128>,
    /// Pages whose digest differs from the previous one (or that had none), ascending.
    pub changed: Vec<u32>,
    /// The changed pages' bytes in `changed` order, if there were at most `capture` of
    /// them; `None` once more changed (the chunk will be rewritten, not patched).
    pub captured: Option<Vec<u8>>,
}

/// Smallest part of a chunk that [`scan_pages`] hands to a thread of its own.
pub const MIN_SCAN_PART: u64 = 8 << 20;

/// Reads a chunk once, computing every page's digest, comparing it with `known` (the
/// digests of the chunk's previous state) and keeping the bytes of up to `capture` changed
/// pages, so a delta needs no second read. `len` must be a multiple of `page_size`.
///
/// The chunk is cut into page-aligned parts of at least [`MIN_SCAN_PART`] bytes, one per
/// available core, each read and hashed by a thread of its own: every byte is still read
/// once, in [`IO_BUF`] pieces. The threads share one count of changed pages and stop
/// keeping bytes once it passes `capture`, so at most `capture` pages are held whatever
/// the number of threads.
pub fn scan_pages<R: ReadAt + ?Sized>(
    file: &R,
    path: &Path,
    offset: u64,
    len: u64,
    page_size: u32,
    known: &[u128],
    capture: usize,
) -> Result<PageScan, ExecError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let parts = (len / MIN_SCAN_PART).clamp(1, threads);
    let scan = Scan {
        file,
        path,
        page_size,
        capture,
    };
    scan_in_parts(&scan, offset, len, known, parts)
}

/// What every part of one [`scan_pages`] call shares.
struct Scan<'a, R: ?Sized> {
    file: &'a R,
    path: &'a Path,
    page_size: u32,
    capture: usize,
}

/// [`scan_pages`] cut into `parts` parts (at most one per page).
fn scan_in_parts<R: ReadAt + ?Sized>(
    scan: &Scan<'_, R>,
    offset: u64,
    len: u64,
    known: &[u128],
    parts: u64,
) -> Result<PageScan, ExecError> {
    let (path, capture) = (scan.path, scan.capture);
    let ps = u64::from(scan.page_size);
    let pages = len / ps;
    let parts = parts.clamp(1, pages.max(1));
    let per_part = pages.div_ceil(parts);
    let changed_so_far = AtomicUsize::new(0);
    let part = |i: u64| {
        let first = (i * per_part).min(pages);
        let end = ((i + 1) * per_part).min(pages);
        let known = known.get(first as usize..).unwrap_or(&[]);
        scan_part(
            scan,
            offset + first * ps,
            (end - first) * ps,
            known,
            &changed_so_far,
        )
        .map(|part| (first, part))
    };
    if parts == 1 {
        return part(0).map(|(_, scan)| scan);
    }
    let results: Vec<Result<(u64, PageScan), ExecError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..parts).map(|i| s.spawn(move || part(i))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ExecError::Io {
                        op: "scan pages (a scanning thread panicked)",
                        path: path.display().to_string(),
                        source: std::io::Error::other("scanning thread panicked"),
                    })
                })
            })
            .collect()
    });
    let mut out = PageScan {
        digests: Vec::with_capacity(usize::try_from(pages).unwrap_or(0)),
        changed: Vec::new(),
        captured: Some(Vec::new()),
    };
    for r in results {
        let (first, scan) = r?;
        out.digests.extend_from_slice(&scan.digests);
        let base = u32::try_from(first).unwrap_or(u32::MAX);
        out.changed
            .extend(scan.changed.iter().map(|p| p.saturating_add(base)));
        match (out.captured.as_mut(), scan.captured) {
            (Some(c), Some(more)) => c.extend_from_slice(&more),
            _ => out.captured = None,
        }
    }
    if out.changed.len() > capture {
        out.captured = None;
    }
    Ok(out)
}

/// One part of [`scan_pages`]: page numbers in the result are relative to the part.
fn scan_part<R: ReadAt + ?Sized>(
    s: &Scan<'_, R>,
    offset: u64,
    len: u64,
    known: &[u128],
    changed_so_far: &AtomicUsize,
) -> Result<PageScan, ExecError> {
    let (file, path, page_size, capture) = (s.file, s.path, s.page_size, s.capture);
    let ps = page_size as usize;
    let pages = usize::try_from(len / u64::from(page_size)).unwrap_or(0);
    let mut scan = PageScan {
        digests: Vec::with_capacity(pages),
        changed: Vec::new(),
        captured: Some(Vec::new()),
    };
    // IO_BUF is a multiple of every supported page size, so pieces hold whole pages.
    read_range(file, path, offset, len, |piece| {
        for page in piece.chunks(ps) {
            let index = scan.digests.len();
            let d = page_digest(page);
            if known.get(index) != Some(&d) {
                scan.changed.push(u32::try_from(index).unwrap_or(u32::MAX));
                let total = changed_so_far.fetch_add(1, Ordering::Relaxed) + 1;
                if total > capture {
                    scan.captured = None;
                } else if let Some(c) = scan.captured.as_mut() {
                    c.extend_from_slice(page);
                }
            }
            scan.digests.push(d);
        }
        Ok(())
    })?;
    Ok(scan)
}

/// Reads the given pages (numbers within the chunk at `chunk_offset`, ascending) and
/// returns their bytes concatenated; runs of adjacent pages are read with one call.
pub fn read_pages<R: ReadAt + ?Sized>(
    file: &R,
    path: &Path,
    chunk_offset: u64,
    page_size: u32,
    pages: &[u32],
) -> Result<Vec<u8>, ExecError> {
    let ps = u64::from(page_size);
    let mut out = Vec::with_capacity(pages.len() * page_size as usize);
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[j - 1] + 1 && (j - i) < 256 {
            j += 1;
        }
        let start = chunk_offset + u64::from(pages[i]) * ps;
        read_range(file, path, start, (j - i) as u64 * ps, |piece| {
            out.extend_from_slice(piece);
            Ok(())
        })?;
        i = j;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_changed_pages_and_reads_them_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut data: Vec<u8> = (0..(3 << 20) + 8192)
            .map(|i| (i % 241) as u8 ^ (i >> 12) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let off = 4096 * 3;
        let len = (data.len() - off) as u64;
        let first = scan_pages(&f, &p, off as u64, len, 4096, &[], 0).unwrap();
        assert_eq!(first.digests.len() as u64, len / 4096);
        assert_eq!(
            first.changed.len(),
            first.digests.len(),
            "no known digests: all changed"
        );
        assert_eq!(
            first.captured, None,
            "more than 0 changed: nothing captured"
        );
        assert_eq!(
            first.digests[5],
            page_digest(&data[off + 5 * 4096..off + 6 * 4096])
        );
        for pg in [1usize, 9, 700] {
            data[off + pg * 4096 + 17] ^= 0xff;
        }
        std::fs::write(&p, &data).unwrap();
        let again = scan_pages(&f, &p, off as u64, len, 4096, &first.digests, 3).unwrap();
        assert_eq!(again.changed, vec![1, 9, 700]);
        let want: Vec<u8> = [1usize, 9, 700]
            .iter()
            .flat_map(|pg| data[off + pg * 4096..off + (pg + 1) * 4096].to_vec())
            .collect();
        assert_eq!(again.captured.as_deref(), Some(&want[..]));
        assert_eq!(
            read_pages(&f, &p, off as u64, 4096, &[1, 9, 700]).unwrap(),
            want
        );
        let over = scan_pages(&f, &p, off as u64, len, 4096, &first.digests, 2).unwrap();
        assert_eq!((over.changed.len(), over.captured), (3, None));
        let got = read_pages(&f, &p, off as u64, 4096, &[0, 1, 2, 9, 700]).unwrap();
        let want: Vec<u8> = [0usize, 1, 2, 9, 700]
            .iter()
            .flat_map(|pg| data[off + pg * 4096..off + (pg + 1) * 4096].to_vec())
            .collect();
        assert_eq!(got, want);
        assert!(matches!(
            read_pages(&f, &p, off as u64, 4096, &[100_000]),
            Err(ExecError::SourceChanged { .. })
        ));
    }

    #[test]
    fn a_scan_split_across_threads_finds_what_one_thread_finds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut data: Vec<u8> = (0..(2 << 20) + 4096 * 12)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let f = File::open(&p).unwrap();
        let len = data.len() as u64;
        let first = scan_in_parts(
            &Scan {
                file: &f,
                path: &p,
                page_size: 4096,
                capture: 0,
            },
            0,
            len,
            &[],
            1,
        )
        .unwrap();
        // Changes near every part boundary, and pages past the known digests.
        for pg in [0usize, 130, 131, 260, 389, 520, 517] {
            data[pg * 4096 + 9] ^= 0x33;
        }
        std::fs::write(&p, &data).unwrap();
        let known = &first.digests[..first.digests.len() - 2];
        let want = scan_in_parts(
            &Scan {
                file: &f,
                path: &p,
                page_size: 4096,
                capture: 9,
            },
            0,
            len,
            known,
            1,
        )
        .unwrap();
        assert_eq!(
            want.changed,
            vec![0, 130, 131, 260, 389, 517, 520, 522, 523]
        );
        assert!(want.captured.is_some());
        for parts in 2..=5 {
            for capture in [0usize, 8, 9, 10] {
                let one = scan_in_parts(
                    &Scan {
                        file: &f,
                        path: &p,
                        page_size: 4096,
                        capture,
                    },
                    0,
                    len,
                    known,
                    1,
                )
                .unwrap();
                let many = scan_in_parts(
                    &Scan {
                        file: &f,
                        path: &p,
                        page_size: 4096,
                        capture,
                    },
                    0,
                    len,
                    known,
                    parts,
                )
                .unwrap();
                assert_eq!(many, one, "{parts} parts, capture {capture}");
            }
        }
        assert_eq!(scan_pages(&f, &p, 0, len, 4096, known, 9).unwrap(), want);
    }
}
