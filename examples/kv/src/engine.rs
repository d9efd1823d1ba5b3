//! The key-value engine: a fixed number of hash-bucket pages kept in memory, a WAL that
//! makes every commit durable, and a page file flushed at LSN boundaries.
//!
//! Contract: [`Kv::commit`] logs a batch, syncs it, then applies it; once it returns the
//! batch survives any crash. A batch that would overflow a page is refused before it is
//! logged ([`KvError::PageFull`]). [`Kv::flush`] writes every page changed since the last
//! flush, atomically, at the current end of the WAL, and marks each page it writes in the
//! [`DirtyTracker`] (at write time, not at commit time, so a mark always means "this page
//! of the file changed since the tracker was drained").
//!
//! What a crash leaves, and [`Kv::open`] recovers: the page file at its last complete
//! flush (see [`crate::pagefile`]), the WAL with at most a torn last record (dropped), and
//! possibly an active file past the segment size that was not sealed yet (sealed by
//! [`Kv::seal_if_full`]). Recovery replays the records from the page file's LSN, checking
//! their sequence numbers are contiguous. The tracker is in memory only: after a restart
//! it is empty although the file may differ from the last page checkpoint, which the
//! Cairn side ([`crate::replica`]) accounts for. Retries: a failed WAL append poisons the
//! engine (reopen); a failed flush keeps the pages dirty for the next one. Cancellation:
//! not applicable (synchronous). One process per data directory (a lock file).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_orchestrator::DirtyTracker;

use crate::error::{corrupt, io, KvError, Result};
use crate::page::{bucket_size, encode_page, page_of, Bucket, Header, PAGE_CAPACITY};
use crate::pagefile::PageFile;
use crate::wal::{encode_record, Op, Record, Recovery, SegmentInfo, Wal};

/// Settings of a new database (an existing one keeps its geometry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Data pages in the page file (the header page comes on top).
    pub data_pages: u32,
    /// The active WAL file is sealed once it holds at least this many bytes.
    pub segment_size: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            data_pages: 512,
            segment_size: 64 * 1024,
        }
    }
}

/// What [`Kv::open`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The database was created.
    pub created: bool,
    /// The LSN of an interrupted flush that was completed from the double-write buffer.
    pub repaired_flush: Option<u64>,
    /// The page file's LSN.
    pub flushed_lsn: u64,
    /// What WAL recovery found.
    pub wal: Recovery,
}

/// A committed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Its sequence number.
    pub seq: u64,
    /// Its record's LSN.
    pub lsn: u64,
    /// Where its record ends: the state after this batch is the state at this LSN.
    pub end: u64,
}

/// A flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flushed {
    /// The LSN the page file is now at.
    pub lsn: u64,
    /// Data pages written.
    pub pages: u64,
}

/// An open database.
#[derive(Debug)]
pub struct Kv {
    dir: PathBuf,
    _lock: File,
    pages: PageFile,
    header: Header,
    buckets: Vec<Bucket>,
    dirty: BTreeSet<u32>,
    wal: Wal,
    next_seq: u64,
    segment_size: u64,
    tracker: Arc<DirtyTracker>,
    opened: Opened,
}

/// Applies one operation to the buckets (`buckets[p - 1]` is page `p`).
fn apply_op(bucket: &mut Bucket, op: &Op) {
    match op {
        Op::Put { key, value } => {
            bucket.insert(key.clone(), value.clone());
        }
        Op::Delete { key } => {
            bucket.remove(key);
        }
    }
}

/// Applies a record to `buckets`, checking it is the one expected next.
pub(crate) fn replay(
    buckets: &mut [Bucket],
    next_seq: &mut u64,
    dirty: &mut BTreeSet<u32>,
    r: &Record,
) -> Result<()> {
    if r.seq != *next_seq {
        return Err(corrupt(
            format!("WAL record at LSN {}", r.lsn),
            format!("sequence number {}, expected {}", r.seq, next_seq),
        ));
    }
    let n = buckets.len() as u32;
    for op in &r.ops {
        let p = page_of(op.key(), n);
        apply_op(&mut buckets[p as usize - 1], op);
        dirty.insert(p);
    }
    *next_seq += 1;
    Ok(())
}

impl Kv {
    /// Opens (or creates) the database in `dir` and recovers it: completes an interrupted
    /// flush, then replays the WAL from the page file's LSN.
    pub fn open(dir: &Path, opts: &Options) -> Result<Kv> {
        std::fs::create_dir_all(dir).map_err(io("create data directory", dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("open lock file", &lock_path))?;
        if lock.try_lock().is_err() {
            return Err(KvError::Locked {
                path: dir.to_path_buf(),
            });
        }
        let page_path = dir.join("pages");
        let created = !page_path.exists();
        if created {
            if opts.data_pages == 0 {
                return Err(crate::error::invalid("data pages", "at least 1"));
            }
            let header = Header {
                page_count: opts.data_pages + 1,
                flushed_lsn: 0,
                next_seq: 0,
                flushes: 0,
            };
            let empty = vec![Bucket::new(); opts.data_pages as usize];
            PageFile::create(&page_path, &header, &empty)?;
        }
        let (pages, loaded) = PageFile::open(&page_path)?;
        let header = loaded.header;
        let mut buckets = loaded.buckets;
        let mut next_seq = header.next_seq;
        let mut dirty = BTreeSet::new();
        let (wal, recovery) = Wal::open(dir, header.flushed_lsn, |r| {
            replay(&mut buckets, &mut next_seq, &mut dirty, r)
        })?;
        let tracker = Arc::new(DirtyTracker::new(u64::from(header.page_count)));
        let opened = Opened {
            created,
            repaired_flush: loaded.repaired,
            flushed_lsn: header.flushed_lsn,
            wal: recovery,
        };
        Ok(Kv {
            dir: dir.to_path_buf(),
            _lock: lock,
            pages,
            header,
            buckets,
            dirty,
            wal,
            next_seq,
            segment_size: opts.segment_size.max(1),
            tracker,
            opened,
        })
    }

    /// What opening found and did.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let p = page_of(key, self.buckets.len() as u32);
        self.buckets[p as usize - 1].get(key).map(Vec::as_slice)
    }

    /// Logs batch `ops`, syncs it and applies it (see the module header).
    pub fn commit(&mut self, ops: &[Op]) -> Result<Committed> {
        let lsn = self.wal.end();
        let seq = self.next_seq;
        let bytes = encode_record(lsn, seq, ops)?;
        let n = self.buckets.len() as u32;
        let mut touched: BTreeMap<u32, Bucket> = BTreeMap::new();
        for op in ops {
            let p = page_of(op.key(), n);
            let b = touched
                .entry(p)
                .or_insert_with(|| self.buckets[p as usize - 1].clone());
            apply_op(b, op);
            let need = bucket_size(b);
            if need > PAGE_CAPACITY {
                return Err(KvError::PageFull {
                    page: p,
                    key: String::from_utf8_lossy(op.key()).into_owned(),
                    need,
                    free: PAGE_CAPACITY,
                });
            }
        }
        self.wal.append(&bytes)?;
        for (p, b) in touched {
            self.buckets[p as usize - 1] = b;
            self.dirty.insert(p);
        }
        self.next_seq += 1;
        Ok(Committed {
            seq,
            lsn,
            end: self.wal.end(),
        })
    }

    /// Seals the active WAL file if it reached the segment size.
    pub fn seal_if_full(&mut self) -> Result<Option<SegmentInfo>> {
        if self.wal.active_len() >= self.segment_size {
            self.wal.seal()
        } else {
            Ok(None)
        }
    }

    /// Writes every page changed since the last flush, and the header, at the current end
    /// of the WAL; marks each written page in the tracker. Nothing to do: `pages == 0`.
    pub fn flush(&mut self) -> Result<Flushed> {
        let lsn = self.wal.end();
        if self.dirty.is_empty() && lsn == self.header.flushed_lsn {
            return Ok(Flushed { lsn, pages: 0 });
        }
        let header = Header {
            page_count: self.header.page_count,
            flushed_lsn: lsn,
            next_seq: self.next_seq,
            flushes: self.header.flushes + 1,
        };
        let mut pages = Vec::with_capacity(self.dirty.len());
        for &p in &self.dirty {
            pages.push((p, encode_page(p, &self.buckets[p as usize - 1])?));
        }
        // Marked before the write: if it fails half-way, the file may have changed anyway.
        self.tracker.mark(0);
        for &p in &self.dirty {
            self.tracker.mark(u64::from(p));
        }
        self.pages.write(&header, &pages)?;
        self.header = header;
        self.dirty.clear();
        Ok(Flushed {
            lsn,
            pages: pages.len() as u64,
        })
    }

    /// Every entry, sorted by key.
    pub fn entries(&self) -> Vec<(&[u8], &[u8])> {
        let mut out: Vec<(&[u8], &[u8])> = self
            .buckets
            .iter()
            .flat_map(|b| b.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
            .collect();
        out.sort_unstable();
        out
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The page file (what Cairn checkpoints as `Source::Pages`).
    pub fn page_file(&self) -> &Path {
        self.pages.path()
    }

    /// The WAL.
    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// Deletes the sealed segments that end at or below `limit` (never any the page file
    /// still needs: the limit is capped at its LSN). Returns how many and their bytes.
    pub fn delete_wal_through(&mut self, limit: u64) -> Result<(u64, u64)> {
        self.wal.delete_through(limit.min(self.header.flushed_lsn))
    }

    /// The next record's LSN: the state now is the state at this LSN.
    pub fn lsn(&self) -> u64 {
        self.wal.end()
    }

    /// The LSN the page file is flushed to.
    pub fn flushed_lsn(&self) -> u64 {
        self.header.flushed_lsn
    }

    /// The next batch's sequence number (batches committed so far).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Pages in the page file, the header page included.
    pub fn page_count(&self) -> u32 {
        self.header.page_count
    }

    /// The tracker of pages written to the page file.
    pub fn tracker(&self) -> &Arc<DirtyTracker> {
        &self.tracker
    }
}
