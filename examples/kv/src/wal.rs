//! The write-ahead log: checksummed records appended to an active file and synced at
//! commit, sealed into immutable segments that Cairn ships.
//!
//! LSNs are byte offsets in the WAL stream: a record at LSN `l` with `n` bytes ends at
//! `l + n`, where the next one starts. Files are named by the LSN they start at, zero
//! padded so names sort in LSN order: the active file `active/<lsn>.wal`, sealed segments
//! `segments/<lsn>.seg`. The segment directory is what Cairn checkpoints
//! (`Source::Segments`); the active file is never inside it.
//!
//! ```text
//! record: len u32 | crc64 u64 of (lsn u64 | len u32 | payload) | payload
//! payload: seq u64 | ops u16 | (kind u8: 1 put, 2 delete | klen u16 | key | [vlen u16 | value])*
//! ```
//!
//! Contract: [`Wal::append`] returns once the record is synced (the commit point). A
//! record's checksum covers its own LSN, so stale bytes never pass for a record elsewhere.
//! [`Wal::seal`] renames the active file into the segment directory (syncing both
//! directories) and only then starts a new active file. What a crash leaves: at most a
//! torn last record in the active file, which [`Wal::open`] drops by its checksum and cuts
//! off; or a sealed segment without a new active file, which `open` creates. A damaged
//! sealed segment is an error naming it (segments are complete when sealed). Retries: an
//! append that fails poisons the log ([`KvError::Poisoned`]): the engine must reopen, and
//! recovery decides what was committed. Cancellation: not applicable (synchronous).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{corrupt, invalid, io, KvError, Result};
use crate::page::{crc64, MAX_KEY, MAX_VALUE};
use crate::pagefile::fsync_dir;

/// Bytes of a record before its payload.
pub const RECORD_HEADER: usize = 12;
/// Longest payload of one record.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// One write of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Remove `key` (nothing if absent).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

impl Op {
    /// The key written.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// A decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its LSN (where it starts).
    pub lsn: u64,
    /// Where it ends (the next record's LSN).
    pub end: u64,
    /// Its sequence number: records are numbered 0, 1, 2 … in LSN order.
    pub seq: u64,
    /// The batch.
    pub ops: Vec<Op>,
}

/// Encodes the record of batch `ops` with sequence number `seq` at LSN `lsn`.
pub fn encode_record(lsn: u64, seq: u64, ops: &[Op]) -> Result<Vec<u8>> {
    if ops.is_empty() || ops.len() > usize::from(u16::MAX) {
        return Err(invalid("batch", format!("{} operations", ops.len())));
    }
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&(ops.len() as u16).to_le_bytes());
    for op in ops {
        let k = op.key();
        if k.is_empty() || k.len() > MAX_KEY {
            return Err(invalid("key", format!("{} bytes (1..={MAX_KEY})", k.len())));
        }
        match op {
            Op::Put { value, .. } => {
                if value.len() > MAX_VALUE {
                    return Err(invalid(
                        "value",
                        format!("{} bytes (at most {MAX_VALUE})", value.len()),
                    ));
                }
                p.push(1);
                p.extend_from_slice(&(k.len() as u16).to_le_bytes());
                p.extend_from_slice(k);
                p.extend_from_slice(&(value.len() as u16).to_le_bytes());
                p.extend_from_slice(value);
            }
            Op::Delete { .. } => {
                p.push(2);
                p.extend_from_slice(&(k.len() as u16).to_le_bytes());
                p.extend_from_slice(k);
            }
        }
    }
    if p.len() > MAX_PAYLOAD {
        return Err(invalid(
            "batch",
            format!("{} bytes (at most {MAX_PAYLOAD})", p.len()),
        ));
    }
    let len = (p.len() as u32).to_le_bytes();
    let crc = crc64(&[&lsn.to_le_bytes(), &len, &p]);
    let mut out = Vec::with_capacity(RECORD_HEADER + p.len());
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&p);
    Ok(out)
}

fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if p.len() < n {
        return None;
    }
    let (a, b) = p.split_at(n);
    *p = b;
    Some(a)
}

fn take_u16(p: &mut &[u8]) -> Option<usize> {
    take(p, 2).map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
}

fn decode_payload(mut p: &[u8]) -> Option<(u64, Vec<Op>)> {
    let mut s = [0u8; 8];
    s.copy_from_slice(take(&mut p, 8)?);
    let n = take_u16(&mut p)?;
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        let kind = take(&mut p, 1)?[0];
        let kl = take_u16(&mut p)?;
        let key = take(&mut p, kl)?.to_vec();
        ops.push(match kind {
            1 => {
                let vl = take_u16(&mut p)?;
                Op::Put {
                    key,
                    value: take(&mut p, vl)?.to_vec(),
                }
            }
            2 => Op::Delete { key },
            _ => return None,
        });
    }
    p.is_empty().then_some((u64::from_le_bytes(s), ops))
}

/// The valid records at the start of a file.
#[derive(Debug)]
pub struct Scan {
    /// The records, in order.
    pub records: Vec<Record>,
    /// Bytes they take (the file is valid up to here).
    pub valid: u64,
    /// Why the bytes after `valid` are not a record, if there are any.
    pub stop: Option<String>,
}

/// Decodes the records of a file that starts at LSN `start`, up to the first that fails
/// its length, checksum or structure.
pub fn scan(bytes: &[u8], start: u64) -> Scan {
    let mut records = Vec::new();
    let mut at = 0usize;
    let stop = loop {
        let rest = &bytes[at..];
        if rest.is_empty() {
            break None;
        }
        let lsn = start + at as u64;
        if rest.len() < RECORD_HEADER {
            break Some(format!(
                "{} bytes at LSN {lsn} are a partial header",
                rest.len()
            ));
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len == 0 || len > MAX_PAYLOAD || rest.len() < RECORD_HEADER + len {
            break Some(format!("the record at LSN {lsn} is incomplete"));
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&rest[4..12]);
        let payload = &rest[RECORD_HEADER..RECORD_HEADER + len];
        if crc64(&[&lsn.to_le_bytes(), &rest[..4], payload]) != u64::from_le_bytes(c) {
            break Some(format!("the record at LSN {lsn} fails its checksum"));
        }
        let Some((seq, ops)) = decode_payload(payload) else {
            break Some(format!("the record at LSN {lsn} is malformed"));
        };
        at += RECORD_HEADER + len;
        records.push(Record {
            lsn,
            end: start + at as u64,
            seq,
            ops,
        });
    };
    Scan {
        records,
        valid: at as u64,
        stop,
    }
}

/// A sealed segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// File name in the segment directory.
    pub name: String,
    /// First LSN.
    pub start: u64,
    /// Length in bytes (the LSNs it spans).
    pub len: u64,
}

impl SegmentInfo {
    /// One past its last LSN.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The name of the segment that starts at `lsn`.
pub fn segment_name(lsn: u64) -> String {
    format!("{lsn:020}.seg")
}

/// The LSN a file name (`<20 digits>.<ext>`) starts at.
pub fn parse_name(name: &str, ext: &str) -> Option<u64> {
    let digits = name.strip_suffix(ext)?.strip_suffix('.')?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn list(dir: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io("list WAL directory", dir))? {
        let e = e.map_err(io("list WAL directory", dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let lsn = parse_name(&name, ext).ok_or_else(|| {
            corrupt(
                format!("WAL directory {}", dir.display()),
                format!("{name:?} is not a <20-digit LSN>.{ext} file"),
            )
        })?;
        out.push((lsn, e.path()));
    }
    out.sort();
    Ok(out)
}

/// What [`Wal::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The first LSN the local WAL holds.
    pub start: u64,
    /// Records replayed (those at or past the given LSN).
    pub replayed: u64,
    /// Bytes of a torn tail cut off the active file.
    pub torn_bytes: u64,
}

/// An open WAL.
#[derive(Debug)]
pub struct Wal {
    segments_dir: PathBuf,
    active_dir: PathBuf,
    sealed: Vec<SegmentInfo>,
    active: File,
    active_path: PathBuf,
    active_start: u64,
    active_len: u64,
    poisoned: bool,
}

fn create_active(dir: &Path, start: u64) -> Result<(File, PathBuf)> {
    let path = dir.join(format!("{start:020}.wal"));
    let f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io("create active WAL file", &path))?;
    fsync_dir(dir)?;
    Ok((f, path))
}

impl Wal {
    /// Opens the WAL under `data` (creating its directories), cuts a torn tail off the
    /// active file and passes every record at or past LSN `from` to `apply`, in order.
    /// `from` (the page file's LSN) must be a record boundary the local WAL holds.
    pub fn open(
        data: &Path,
        from: u64,
        mut apply: impl FnMut(&Record) -> Result<()>,
    ) -> Result<(Wal, Recovery)> {
        let segments_dir = data.join("segments");
        let active_dir = data.join("active");
        for d in [&segments_dir, &active_dir] {
            std::fs::create_dir_all(d).map_err(io("create WAL directory", d))?;
        }
        let mut sealed = Vec::new();
        for (start, path) in list(&segments_dir, "seg")? {
            let len = std::fs::metadata(&path)
                .map_err(io("stat segment", &path))?
                .len();
            let name = segment_name(start);
            if let Some(prev) = sealed.last().map(SegmentInfo::end) {
                if prev != start {
                    return Err(corrupt(
                        format!("segment {name}"),
                        format!("it starts at LSN {start} but the segment before ends at {prev}"),
                    ));
                }
            }
            sealed.push(SegmentInfo { name, start, len });
        }
        let mut actives = list(&active_dir, "wal")?;
        if actives.len() > 1 {
            return Err(corrupt(
                format!("WAL directory {}", active_dir.display()),
                format!("{} active files (one expected)", actives.len()),
            ));
        }
        let sealed_end = sealed.last().map(SegmentInfo::end);
        let (active_start, active_path, active) = match actives.pop() {
            Some((s, path)) => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io("open active WAL file", &path))?;
                (s, path, f)
            }
            // Sealed, and the crash came before the next active file was created.
            None => {
                let s = sealed_end.unwrap_or(from);
                let (f, path) = create_active(&active_dir, s)?;
                (s, path, f)
            }
        };
        if let Some(end) = sealed_end.filter(|e| *e != active_start) {
            return Err(corrupt(
                format!("active WAL file {}", active_path.display()),
                format!("it starts at LSN {active_start} but the last segment ends at {end}"),
            ));
        }
        let start = sealed.first().map_or(active_start, |s| s.start);
        if from < start {
            return Err(corrupt(
                format!("WAL in {}", data.display()),
                format!("the page file is at LSN {from} but the local WAL starts at {start}"),
            ));
        }
        let mut rec = Recovery {
            start,
            ..Recovery::default()
        };
        let mut visit = |r: &Record| -> Result<()> {
            if r.lsn < from && r.end > from {
                return Err(corrupt(
                    format!("WAL record at LSN {}", r.lsn),
                    format!("the page file's LSN {from} falls inside it"),
                ));
            }
            if r.lsn >= from {
                rec.replayed += 1;
                apply(r)?;
            }
            Ok(())
        };
        for s in sealed.iter().filter(|s| s.end() > from) {
            let path = segments_dir.join(&s.name);
            let bytes = std::fs::read(&path).map_err(io("read segment", &path))?;
            let sc = scan(&bytes, s.start);
            if let Some(why) = sc.stop {
                return Err(corrupt(format!("segment {}", s.name), why));
            }
            sc.records.iter().try_for_each(&mut visit)?;
        }
        let bytes =
            std::fs::read(&active_path).map_err(io("read active WAL file", &active_path))?;
        let sc = scan(&bytes, active_start);
        sc.records.iter().try_for_each(&mut visit)?;
        if sc.stop.is_some() {
            // A torn tail: the crash came while the last record was being written.
            rec.torn_bytes = bytes.len() as u64 - sc.valid;
            active
                .set_len(sc.valid)
                .and_then(|()| active.sync_all())
                .map_err(io("cut torn tail of", &active_path))?;
        }
        let end = active_start + sc.valid;
        if end < from {
            return Err(corrupt(
                format!("WAL in {}", data.display()),
                format!("it ends at LSN {end}, before the page file's LSN {from}"),
            ));
        }
        let wal = Wal {
            segments_dir,
            active_dir,
            sealed,
            active,
            active_path,
            active_start,
            active_len: sc.valid,
            poisoned: false,
        };
        Ok((wal, rec))
    }

    /// One past the last LSN written (the next record's LSN).
    pub fn end(&self) -> u64 {
        self.active_start + self.active_len
    }

    /// Bytes in the active file.
    pub fn active_len(&self) -> u64 {
        self.active_len
    }

    /// The sealed segments still on disk, in LSN order.
    pub fn sealed(&self) -> &[SegmentInfo] {
        &self.sealed
    }

    /// The directory of sealed segments (what Cairn checkpoints).
    pub fn segments_dir(&self) -> &Path {
        &self.segments_dir
    }

    /// Bytes of WAL on disk: sealed segments plus the active file.
    pub fn local_bytes(&self) -> u64 {
        self.sealed.iter().map(|s| s.len).sum::<u64>() + self.active_len
    }

    /// Appends an encoded record at the end and syncs it: the commit point.
    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        if self.poisoned {
            return Err(KvError::Poisoned {
                path: self.active_path.clone(),
            });
        }
        let written = self
            .active
            .write_all_at(bytes, self.active_len)
            .and_then(|()| self.active.sync_data());
        if let Err(e) = written {
            // Whether any of it reached the disk is for recovery to decide.
            self.poisoned = true;
            let _ = self.active.set_len(self.active_len);
            return Err(io("append to WAL file", &self.active_path)(e));
        }
        self.active_len += bytes.len() as u64;
        Ok(())
    }

    /// Seals the active file into a segment and starts a new one; `None` if it is empty.
    pub fn seal(&mut self) -> Result<Option<SegmentInfo>> {
        if self.poisoned {
            return Err(KvError::Poisoned {
                path: self.active_path.clone(),
            });
        }
        if self.active_len == 0 {
            return Ok(None);
        }
        let seg = SegmentInfo {
            name: segment_name(self.active_start),
            start: self.active_start,
            len: self.active_len,
        };
        let target = self.segments_dir.join(&seg.name);
        std::fs::rename(&self.active_path, &target).map_err(io("seal WAL file", &target))?;
        fsync_dir(&self.segments_dir)?;
        fsync_dir(&self.active_dir)?;
        self.sealed.push(seg.clone());
        let (f, path) = create_active(&self.active_dir, seg.end())?;
        self.active = f;
        self.active_path = path;
        self.active_start = seg.end();
        self.active_len = 0;
        Ok(Some(seg))
    }

    /// Deletes the sealed segments that end at or below `limit`; returns how many and
    /// their bytes.
    pub fn delete_through(&mut self, limit: u64) -> Result<(u64, u64)> {
        let n = self.sealed.iter().take_while(|s| s.end() <= limit).count();
        let mut bytes = 0;
        for s in self.sealed.drain(..n) {
            let path = self.segments_dir.join(&s.name);
            std::fs::remove_file(&path).map_err(io("delete segment", &path))?;
            bytes += s.len;
        }
        if n > 0 {
            fsync_dir(&self.segments_dir)?;
        }
        Ok((n as u64, bytes))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Op {
        Op::Put {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_or_moved_record_stops_the_scan() {
        let a = encode_record(100, 0, &[put("a", "1")]).unwrap();
        let b = encode_record(
            100 + a.len() as u64,
            1,
            &[Op::Delete { key: b"a".to_vec() }],
        )
        .unwrap();
        let mut bytes = [a.clone(), b.clone()].concat();
        let sc = scan(&bytes, 100);
        assert_eq!(sc.records.len(), 2);
        assert_eq!(sc.records[1].lsn, 100 + a.len() as u64);
        assert_eq!(sc.valid, bytes.len() as u64);
        assert!(sc.stop.is_none());
        bytes.truncate(bytes.len() - 1);
        let sc = scan(&bytes, 100);
        assert_eq!((sc.records.len(), sc.valid), (1, a.len() as u64));
        assert!(sc.stop.is_some());
        // The same bytes at another LSN are not records.
        assert!(scan(&a, 101).records.is_empty());
    }

    #[test]
    fn names_sort_in_lsn_order_and_parse_back() {
        assert!(segment_name(9) < segment_name(10));
        assert_eq!(parse_name(&segment_name(12345), "seg"), Some(12345));
        assert_eq!(parse_name("12.seg", "seg"), None);
        assert_eq!(parse_name(&segment_name(1), "wal"), None);
    }

    #[test]
    fn a_crash_between_seal_and_new_active_file_and_a_torn_tail_recover() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 0, |_| Ok(())).unwrap();
        let r0 = encode_record(0, 0, &[put("a", "1")]).unwrap();
        wal.append(&r0).unwrap();
        let seg = wal.seal().unwrap().unwrap();
        let r1 = encode_record(seg.end(), 1, &[put("b", "2")]).unwrap();
        wal.append(&r1).unwrap();
        let end = wal.end();
        wal.seal().unwrap();
        drop(wal);
        // The new active file never got created; then a torn write arrives in a new one.
        for e in std::fs::read_dir(dir.path().join("active")).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        let mut seen = Vec::new();
        let (mut wal, rec) = Wal::open(dir.path(), 0, |r| {
            seen.push(r.seq);
            Ok(())
        })
        .unwrap();
        assert_eq!((seen, wal.end()), (vec![0, 1], end));
        assert_eq!(rec.torn_bytes, 0);
        let r2 = encode_record(end, 2, &[put("c", "3")]).unwrap();
        wal.append(&r2[..r2.len() - 3]).unwrap();
        drop(wal);
        let (wal, rec) = Wal::open(dir.path(), seg.end(), |r| {
            assert_eq!(r.seq, 1);
            Ok(())
        })
        .unwrap();
        assert_eq!((rec.replayed, rec.torn_bytes), (1, r2.len() as u64 - 3));
        assert_eq!(wal.end(), end);
        // A page LSN inside a record is refused.
        drop(wal);
        assert!(Wal::open(dir.path(), 3, |_| Ok(())).is_err());
    }
}
