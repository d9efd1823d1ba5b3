//! The page file: a header page and a fixed number of data pages, written in place at
//! flushes through a double-write buffer, so a flush is atomic.
//!
//! Contract: [`PageFile::write`] moves the file from the state at one LSN to the state at a
//! later one; after a crash at any instant the file is wholly at one of the two. The
//! header page records that LSN ([`Header::flushed_lsn`]): the file holds exactly the WAL
//! records below it.
//!
//! How (the double-write buffer `pages.dwb` beside the file): a flush first writes every
//! page it changes, the header page included, to the buffer with one checksum over all of
//! it and syncs it; then writes them in place and syncs the file; then empties the buffer.
//! What a crash leaves: a buffer that fails its checksum (the crash came before the file
//! was touched: ignored), or a complete buffer, which [`PageFile::open`] writes in place
//! again when the header is torn or not newer than the buffer (so a crash during the
//! in-place writes, even one that tore a page, is repaired). A stale buffer (older than
//! the header) is ignored. Retries: none; a failed flush leaves the file at its old state
//! or repairable, and the engine keeps its pages dirty. Cancellation: not applicable
//! (synchronous).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{corrupt, io, Result};
use crate::page::{crc64, PAGE_SIZE};
use crate::page::{decode_header, decode_page, encode_header, encode_page, Bucket, Header};

const DWB_MAGIC: &[u8; 8] = b"KVDWB001";

/// Encoded pages by number.
type Pages = Vec<(u32, Vec<u8>)>;

/// Syncs a directory (after creating, renaming or removing entries in it).
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

/// The page file of an open engine.
#[derive(Debug)]
pub struct PageFile {
    path: PathBuf,
    dwb: PathBuf,
    file: File,
}

/// What [`PageFile::open`] read.
#[derive(Debug)]
pub struct Loaded {
    /// The header page.
    pub header: Header,
    /// Data pages 1.. (index `i` is page `i + 1`).
    pub buckets: Vec<Bucket>,
    /// The LSN of a double-write buffer that was written in place again, if one was.
    pub repaired: Option<u64>,
}

/// The double-write buffer's path for a page file.
pub fn dwb_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".dwb");
    PathBuf::from(s)
}

impl PageFile {
    /// Writes a new page file at `path` holding `buckets` (data pages 1..) and `header`,
    /// through a temporary file renamed into place.
    pub fn create(path: &Path, header: &Header, buckets: &[Bucket]) -> Result<()> {
        if buckets.len() != header.data_pages() as usize {
            return Err(corrupt(
                format!("page file {}", path.display()),
                format!(
                    "{} buckets for {} data pages",
                    buckets.len(),
                    header.data_pages()
                ),
            ));
        }
        let mut tmp = path.as_os_str().to_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut bytes = encode_header(header);
        for (i, b) in buckets.iter().enumerate() {
            bytes.extend_from_slice(&encode_page(i as u32 + 1, b)?);
        }
        std::fs::write(&tmp, &bytes).map_err(io("write page file", &tmp))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("sync page file", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("rename page file into place", path))?;
        if let Some(parent) = path.parent() {
            fsync_dir(parent)?;
        }
        Ok(())
    }

    /// Opens the page file, first writing a complete double-write buffer in place again
    /// if the last flush may not have finished, then reads and checks every page.
    pub fn open(path: &Path) -> Result<(PageFile, Loaded)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("open page file", path))?;
        let dwb = dwb_path(path);
        let mut pf = PageFile {
            path: path.to_path_buf(),
            dwb,
            file,
        };
        let header = pf.read_page(0).and_then(|b| decode_header(&b));
        let mut repaired = None;
        if let Some((lsn, pages)) = read_dwb(&pf.dwb)? {
            let newer = match &header {
                Ok(h) => lsn >= h.flushed_lsn,
                Err(_) => true,
            };
            if newer {
                pf.write_in_place(&pages)?;
                repaired = Some(lsn);
            }
            pf.clear_dwb()?;
        }
        let header = pf.read_page(0).and_then(|b| decode_header(&b))?;
        let len = pf
            .file
            .metadata()
            .map_err(io("stat page file", path))?
            .len();
        let want = u64::from(header.page_count) * PAGE_SIZE as u64;
        if len != want {
            return Err(corrupt(
                format!("page file {}", path.display()),
                format!(
                    "{len} bytes; its header says {} pages ({want} bytes)",
                    header.page_count
                ),
            ));
        }
        let mut buckets = Vec::with_capacity(header.data_pages() as usize);
        for p in 1..header.page_count {
            buckets.push(decode_page(p, &pf.read_page(p)?)?);
        }
        Ok((
            pf,
            Loaded {
                header,
                buckets,
                repaired,
            },
        ))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes: writes `pages` (encoded data pages by number) and `header`, atomically
    /// through the double-write buffer (see the module header).
    pub fn write(&mut self, header: &Header, pages: &[(u32, Vec<u8>)]) -> Result<()> {
        let mut all: Pages = Vec::with_capacity(pages.len() + 1);
        all.extend(pages.iter().cloned());
        all.push((0, encode_header(header)));
        write_dwb(&self.dwb, header.flushed_lsn, &all)?;
        self.write_in_place(&all)?;
        self.clear_dwb()
    }

    fn read_page(&self, page: u32) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; PAGE_SIZE];
        self.file
            .read_exact_at(&mut buf, u64::from(page) * PAGE_SIZE as u64)
            .map_err(io("read page file", &self.path))?;
        Ok(buf)
    }

    fn write_in_place(&mut self, pages: &[(u32, Vec<u8>)]) -> Result<()> {
        // Data pages first, the header page last (one sync covers all of them; the
        // double-write buffer covers a crash in between).
        let mut order: Vec<&(u32, Vec<u8>)> = pages.iter().collect();
        order.sort_by_key(|(p, _)| if *p == 0 { u32::MAX } else { *p });
        for (p, bytes) in order {
            self.file
                .write_all_at(bytes, u64::from(*p) * PAGE_SIZE as u64)
                .map_err(io("write page file", &self.path))?;
        }
        self.file
            .sync_data()
            .map_err(io("sync page file", &self.path))
    }

    fn clear_dwb(&self) -> Result<()> {
        match OpenOptions::new().write(true).open(&self.dwb) {
            Ok(f) => f
                .set_len(0)
                .and_then(|()| f.sync_all())
                .map_err(io("empty double-write buffer", &self.dwb)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("open double-write buffer", &self.dwb)(e)),
        }
    }
}

/// `magic | lsn u64 | count u32 | 0 u32 | page_no u32 × count | pages | crc64 u64`.
fn write_dwb(path: &Path, lsn: u64, pages: &[(u32, Vec<u8>)]) -> Result<()> {
    let mut buf = Vec::with_capacity(24 + pages.len() * (4 + PAGE_SIZE) + 8);
    buf.extend_from_slice(DWB_MAGIC);
    buf.extend_from_slice(&lsn.to_le_bytes());
    buf.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    for (p, _) in pages {
        buf.extend_from_slice(&p.to_le_bytes());
    }
    for (_, bytes) in pages {
        buf.extend_from_slice(bytes);
    }
    let crc = crc64(&[&buf]);
    buf.extend_from_slice(&crc.to_le_bytes());
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(io("create double-write buffer", path))?;
    f.write_all_at(&buf, 0)
        .and_then(|()| f.sync_all())
        .map_err(io("write double-write buffer", path))?;
    if let Some(parent) = path.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// A complete double-write buffer (its LSN and pages), or `None` when it is absent, empty
/// or incomplete (fails its checksum or structure: the crash came before the page file
/// was touched).
fn read_dwb(path: &Path) -> Result<Option<(u64, Pages)>> {
    let mut buf = Vec::new();
    match File::open(path) {
        Ok(mut f) => f
            .read_to_end(&mut buf)
            .map_err(io("read double-write buffer", path))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("open double-write buffer", path)(e)),
    };
    if buf.len() < 32 || &buf[..8] != DWB_MAGIC {
        return Ok(None);
    }
    let (body, tail) = buf.split_at(buf.len() - 8);
    let mut crc = [0u8; 8];
    crc.copy_from_slice(tail);
    if crc64(&[body]) != u64::from_le_bytes(crc) {
        return Ok(None);
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&body[8..16]);
    let lsn = u64::from_le_bytes(l);
    let count = u32::from_le_bytes([body[16], body[17], body[18], body[19]]) as usize;
    let dir_end = 24 + count * 4;
    if body.len() != dir_end + count * PAGE_SIZE {
        return Ok(None);
    }
    let mut pages = Vec::with_capacity(count);
    for i in 0..count {
        let at = 24 + i * 4;
        let p = u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        let start = dir_end + i * PAGE_SIZE;
        pages.push((p, body[start..start + PAGE_SIZE].to_vec()));
    }
    // A complete buffer always carries the header page of the LSN it names.
    let header_ok = pages
        .iter()
        .find(|(p, _)| *p == 0)
        .and_then(|(_, b)| decode_header(b).ok())
        .is_some_and(|h| h.flushed_lsn == lsn);
    Ok(header_ok.then_some((lsn, pages)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header(lsn: u64) -> Header {
        Header {
            page_count: 4,
            flushed_lsn: lsn,
            next_seq: lsn / 10,
            flushes: 0,
        }
    }

    fn bucket(v: &[u8]) -> Bucket {
        let mut b = Bucket::new();
        b.insert(b"k".to_vec(), v.to_vec());
        b
    }

    #[test]
    fn an_interrupted_flush_is_completed_from_the_buffer_and_a_torn_buffer_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages");
        let empty = vec![Bucket::new(); 3];
        PageFile::create(&path, &header(0), &empty).unwrap();
        // The buffer of a flush to LSN 100 was written, then the crash tore page 2 in
        // place and the header never got there.
        let pages = vec![
            (2, encode_page(2, &bucket(b"new")).unwrap()),
            (0, encode_header(&header(100))),
        ];
        write_dwb(&dwb_path(&path), 100, &pages).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xAB; 100], 2 * PAGE_SIZE as u64 + 50)
            .unwrap();
        let (_, loaded) = PageFile::open(&path).unwrap();
        assert_eq!(loaded.repaired, Some(100));
        assert_eq!(loaded.header.flushed_lsn, 100);
        assert_eq!(loaded.buckets[1], bucket(b"new"));
        // A buffer cut short (the crash came while writing it) leaves the file as it was.
        let (mut pf, _) = PageFile::open(&path).unwrap();
        pf.write(&header(200), &[(1, encode_page(1, &bucket(b"x")).unwrap())])
            .unwrap();
        write_dwb(&dwb_path(&path), 300, &pages).unwrap();
        let dwb = std::fs::read(dwb_path(&path)).unwrap();
        std::fs::write(dwb_path(&path), &dwb[..dwb.len() - 9]).unwrap();
        let (_, loaded) = PageFile::open(&path).unwrap();
        assert_eq!(loaded.repaired, None);
        assert_eq!(loaded.header.flushed_lsn, 200);
        assert_eq!(loaded.buckets[0], bucket(b"x"));
    }

    #[test]
    fn a_stale_buffer_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages");
        PageFile::create(&path, &header(500), &vec![Bucket::new(); 3]).unwrap();
        let pages = vec![
            (1, encode_page(1, &bucket(b"old")).unwrap()),
            (0, encode_header(&header(100))),
        ];
        write_dwb(&dwb_path(&path), 100, &pages).unwrap();
        let (_, loaded) = PageFile::open(&path).unwrap();
        assert_eq!(loaded.repaired, None);
        assert_eq!(loaded.header.flushed_lsn, 500);
        assert!(loaded.buckets[0].is_empty());
    }
}
