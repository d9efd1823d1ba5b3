//! A consistent snapshot of a live SQLite database, read in place: no copy into scratch.
//!
//! Contract: [`SqliteSnapshot::open`] holds a read transaction on its own connection for as
//! long as the snapshot lives, and reads the database's pages as that transaction sees
//! them: the main file, with the newest committed WAL frame of each page laid over it.
//! To know exactly which frames the transaction sees, it begins the transaction while a
//! second connection holds the write lock (`BEGIN IMMEDIATE`, waiting up to
//! [`WRITE_LOCK_WAIT`] for the application's writer) and reads the WAL index's `mxFrame`,
//! then lets writers go on, and parses and validates the WAL up to that frame (salts and
//! cumulative checksums; it must be a commit frame). Frames up to `mxFrame` cannot change
//! while the read transaction holds them (see below), so writers wait only for the
//! transaction to begin, not for the parse; a snapshot whose frames may be reused (every
//! one backfilled) is parsed before the lock is let go. [`SqliteSnapshot::open_after`]
//! parses only the frames committed after an earlier snapshot of the same WAL, so a step
//! costs what was written since the last one, not the whole WAL.
//! While the read transaction is held SQLite neither restarts the WAL nor copies frames
//! past the snapshot into the main file, so the pages read are the snapshot's whatever
//! the application does meanwhile. The one exception is a snapshot whose every frame was
//! already copied into the main file (`nBackfill` = last commit frame): SQLite then reads
//! the main file alone and may restart the WAL, so the snapshot does too.
//!
//! Changed pages: given the [`WalPosition`] of the previous snapshot, the pages of the
//! frames committed after it are the pages that changed; when that position is gone (the
//! WAL was reset or rewritten, the database is not in WAL mode, or there is none) the
//! caller must compare page digests instead, and [`FullScanReason`] says why.
//!
//! Crash: nothing is written; the locks die with the process. Retries: none here (a busy
//! database or a WAL that disagrees with its index is a transient error the caller may
//! retry). Cancellation: dropping the snapshot ends its read transaction.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_core::sqlite_wal::{check_frame, WalHeader, FRAME_HEADER_LEN, WAL_HEADER_LEN};
use cairn_core::WalPosition;
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use crate::error::ExecError;
use crate::source::{ReadAt, IO_BUF};

/// How long a snapshot waits for the application's writer to release the write lock.
pub const WRITE_LOCK_WAIT: Duration = Duration::from_secs(10);

/// Why a checkpoint of a SQLite database compared every page's digest instead of taking
/// the changed pages from the WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullScanReason {
    /// No WAL position was recorded for the previous generation in this state directory
    /// (the first checkpoint, a fresh state directory, or a crash before it was recorded).
    NoPosition,
    /// The WAL's salts changed or it is gone: SQLite reset it (after a checkpoint that
    /// copied every frame, e.g. the application's `wal_checkpoint(TRUNCATE)` or a restart
    /// of the WAL by its next writer), so frames written since the position may be lost.
    WalReset,
    /// Same salts, but the frame at the position is gone or has another checksum.
    WalRewritten,
    /// The database is not in WAL mode.
    NotWal,
}

impl FullScanReason {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FullScanReason::NoPosition => "no_position",
            FullScanReason::WalReset => "wal_reset",
            FullScanReason::WalRewritten => "wal_rewritten",
            FullScanReason::NotWal => "not_wal",
        }
    }
}

/// A SQLite database's snapshot under a held read transaction (see the module docs).
pub struct SqliteSnapshot {
    path: PathBuf,
    main: Arc<File>,
    main_len: u64,
    wal: Option<(PathBuf, Arc<File>)>,
    page_size: u32,
    len: u64,
    /// Page index (from 0) → offset in the WAL of its newest committed frame's page.
    overlay: BTreeMap<u64, u64>,
    position: Option<WalPosition>,
    changed: Result<Vec<u64>, FullScanReason>,
    frames: u32,
    header: Option<WalHeader>,
    /// Committed frames: (offset of the frame header in the WAL, its checksum).
    committed: Vec<(u64, (u32, u32))>,
    backfilled: bool,
    _reader: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSnapshot")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("page_size", &self.page_size)
            .field("overlay_pages", &self.overlay.len())
            .field("position", &self.position)
            .finish()
    }
}

/// What parsing the WAL found.
pub(crate) struct WalScan {
    header: WalHeader,
    /// Last commit frame (0: none) and its checksum.
    last_commit: (u32, (u32, u32)),
    overlay: BTreeMap<u64, u64>,
    /// Pages of committed frames after `since`, or why they are unknown.
    changed: Result<Vec<u64>, FullScanReason>,
    /// Every committed frame: (offset of its header, its checksum).
    committed: Vec<(u64, (u32, u32))>,
}

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> ExecError + '_ {
    move |source| ExecError::Sqlite {
        path: path.display().to_string(),
        source,
    }
}

fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Reads a file from the start with `pread`, leaving the descriptor's offset alone.
struct PosReader<'f> {
    file: &'f File,
    pos: u64,
}

impl Read for PosReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = FileExt::read_at(self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// How far [`scan_wal`] reads, and where it may start.
struct ScanBounds {
    /// Pages changed after this position are collected (see [`WalScan::changed`]).
    since: Option<WalPosition>,
    /// Stop after this frame (the snapshot's `mxFrame`); `None`: at the last valid frame.
    upto: Option<u32>,
    /// An earlier scan of the same WAL (same header) whose committed frames are taken as
    /// they are; only used without `since`.
    from: Option<WalScan>,
}

/// Parses the WAL at `wal_path` up to its last commit frame, or up to `bounds.upto`
/// (frames up to it are held stable by the caller's read transaction or the write lock);
/// `None` if it has no valid header.
fn scan_wal(
    wal_path: &Path,
    file: &File,
    bounds: ScanBounds,
) -> Result<Option<WalScan>, ExecError> {
    let since = bounds.since;
    let mut head = [0u8; WAL_HEADER_LEN];
    match FileExt::read_exact_at(file, &mut head, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(ExecError::io("read WAL", wal_path)(e)),
    }
    let Some(header) = WalHeader::parse(&head) else {
        return Ok(None);
    };
    let ps = header.page_size as usize;
    let frame_len = (FRAME_HEADER_LEN + ps) as u64;
    // Committed frames never change while their WAL lives (same header: not restarted).
    let from = bounds.from.filter(|f| {
        since.is_none() && f.header == header && bounds.upto.is_none_or(|u| u >= f.last_commit.0)
    });
    let mut frame = vec![0u8; FRAME_HEADER_LEN + ps];
    let (mut overlay, mut committed, mut last_commit) = match from {
        Some(f) => (f.overlay, f.committed, f.last_commit),
        None => (BTreeMap::new(), Vec::new(), (0u32, header.checksum)),
    };
    let (mut prev, mut n) = (last_commit.1, last_commit.0);
    // Positional reads: the descriptor is shared (see `crate::kept`), its offset is not ours.
    let start = WAL_HEADER_LEN as u64 + u64::from(n) * frame_len;
    let mut r = BufReader::with_capacity(IO_BUF, PosReader { file, pos: start });
    let mut pending: Vec<(u64, u64)> = Vec::new();
    let mut pending_frames = Vec::new();
    let mut changed = Vec::new();
    let mut pending_changed = Vec::new();
    // Whether `since` is in this WAL: decided at its frame (or at once for frame 0).
    let mut since_ok = match since {
        None => Err(FullScanReason::NoPosition),
        Some(p) if p.salts != header.salts => Err(FullScanReason::WalReset),
        Some(p) if p.frame == 0 && p.checksum == header.checksum => Ok(true),
        Some(p) if p.frame == 0 => Err(FullScanReason::WalRewritten),
        Some(_) => Ok(false),
    };
    loop {
        if bounds.upto.is_some_and(|u| n >= u) {
            break;
        }
        match r.read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(ExecError::io("read WAL", wal_path)(e)),
        }
        let Some(f) = check_frame(&header, prev, &frame) else {
            break;
        };
        n += 1;
        prev = f.checksum;
        let at = WAL_HEADER_LEN as u64 + u64::from(n - 1) * frame_len + FRAME_HEADER_LEN as u64;
        let page = u64::from(f.page - 1);
        pending.push((page, at));
        pending_frames.push((at - FRAME_HEADER_LEN as u64, f.checksum));
        if since_ok == Ok(true) {
            pending_changed.push(page);
        }
        if f.commit.is_some() {
            overlay.extend(pending.drain(..));
            committed.append(&mut pending_frames);
            changed.append(&mut pending_changed);
            last_commit = (n, f.checksum);
        }
        if let (Ok(false), Some(p)) = (since_ok, since) {
            if p.frame == n {
                since_ok = if p.checksum == f.checksum && f.commit.is_some() {
                    Ok(true)
                } else {
                    Err(FullScanReason::WalRewritten)
                };
            }
        }
    }
    let changed = match since_ok {
        Ok(true) => {
            changed.sort_unstable();
            changed.dedup();
            Ok(changed)
        }
        // The position lies past the WAL's last valid frame.
        Ok(false) => Err(FullScanReason::WalRewritten),
        Err(r) => Err(r),
    };
    Ok(Some(WalScan {
        header,
        last_commit,
        overlay,
        changed,
        committed,
    }))
}

/// Fails if the WAL's header is no longer the one `scan` parsed: the WAL restarted while
/// it was parsed (a restart writes the header before any frame), so frames read may be
/// the next WAL's.
fn same_wal(wal_path: &Path, file: &File, scan: Option<&WalScan>) -> Result<(), ExecError> {
    let Some(scan) = scan else {
        return Ok(());
    };
    let mut head = [0u8; WAL_HEADER_LEN];
    FileExt::read_exact_at(file, &mut head, 0).map_err(ExecError::io("read WAL", wal_path))?;
    if WalHeader::parse(&head) == Some(scan.header) {
        return Ok(());
    }
    Err(ExecError::SourceChanged {
        path: wal_path.display().to_string(),
        detail: "the WAL was restarted while it was being read".into(),
    })
}

/// The WAL index's `nBackfill` and `mxFrame` (`-shm`, native byte order), if readable.
fn wal_index(shm: &Path) -> Option<(u32, u32)> {
    let f = crate::kept::open(shm).ok()?;
    let mut b = [0u8; 100];
    FileExt::read_exact_at(&*f, &mut b, 0).ok()?;
    let word = |at: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&b[at..at + 4]);
        u32::from_ne_bytes(w)
    };
    Some((word(96), word(16)))
}

impl SqliteSnapshot {
    /// Opens a snapshot of the SQLite database at `src` and finds the pages changed since
    /// `since` (the previous snapshot's position), see the module docs.
    pub fn open(src: &Path, since: Option<WalPosition>) -> Result<Self, ExecError> {
        Self::open_locked(src, since, None, None)
    }

    /// [`SqliteSnapshot::open`] (without changed pages) that parses only the WAL frames
    /// committed after `earlier`, a snapshot of the same WAL still held (or any earlier
    /// snapshot: if the WAL was restarted since, it is parsed whole).
    pub fn open_after(src: &Path, earlier: &SqliteSnapshot) -> Result<Self, ExecError> {
        Self::open_locked(src, None, None, earlier.resume())
    }

    /// What a later scan of the same WAL can start from: this snapshot's committed frames.
    /// (A backfilled snapshot has no overlay: its frames' pages are all in the main file,
    /// where a later snapshot of the same WAL finds them too.)
    pub(crate) fn resume(&self) -> Option<WalScan> {
        let header = self.header?;
        let position = self.position?;
        Some(WalScan {
            header,
            last_commit: (position.frame, position.checksum),
            overlay: self.overlay.clone(),
            changed: Err(FullScanReason::NoPosition),
            committed: self.committed.clone(),
        })
    }

    /// [`SqliteSnapshot::open`] while `held` (a connection of the caller's, see
    /// [`crate::SqliteControl`]) already holds the write lock; it stays held.
    pub(crate) fn open_locked(
        src: &Path,
        since: Option<WalPosition>,
        held: Option<&Connection>,
        from: Option<WalScan>,
    ) -> Result<Self, ExecError> {
        let sql = sql_err(src);
        let meta = std::fs::metadata(src).map_err(ExecError::io("open source", src))?;
        if !meta.is_file() {
            return Err(ExecError::BadSource {
                path: src.display().to_string(),
                reason: "not a regular file".into(),
            });
        }
        let reader = Connection::open_with_flags(
            src,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(&sql)?;
        reader.busy_timeout(WRITE_LOCK_WAIT).map_err(&sql)?;
        // Fails with "file is not a database" for anything that is not SQLite.
        let page_size: u32 = reader
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(&sql)?;
        let mode: String = reader
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(&sql)?;
        let wal_mode = mode.eq_ignore_ascii_case("wal");
        let begin = |c: &Connection| -> Result<u64, ExecError> {
            c.execute_batch("BEGIN").map_err(&sql)?;
            c.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(&sql)?;
            c.query_row("PRAGMA page_count", [], |r| r.get(0))
                .map_err(&sql)
        };
        let main = crate::kept::open(src).map_err(ExecError::io("open source", src))?;
        let mut backfilled = true;
        let (pages, wal, scan) = if wal_mode {
            let mut writer = match held {
                Some(_) => None,
                None => {
                    let w = Connection::open_with_flags(
                        src,
                        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .map_err(&sql)?;
                    w.busy_timeout(WRITE_LOCK_WAIT).map_err(&sql)?;
                    w.execute_batch("BEGIN IMMEDIATE").map_err(&sql)?;
                    Some(w)
                }
            };
            let pages = begin(&reader)?;
            let index = wal_index(&side_file(src, "-shm"));
            // Frames up to mxFrame are held by our read transaction, so writers may go on
            // while they are parsed; unless every one was backfilled (read mark 0): the
            // WAL may then restart under us, which its header tells after the parse.
            let mut unheld = false;
            if index.is_some() {
                if let Some(w) = writer.take() {
                    w.execute_batch("ROLLBACK").map_err(&sql)?;
                    unheld = index.is_some_and(|(b, mx)| b >= mx);
                }
            }
            let wal_path = side_file(src, "-wal");
            let bounds = ScanBounds {
                since,
                upto: index.map(|(_, mx)| mx),
                from,
            };
            let (wal, scan) = match crate::kept::open(&wal_path) {
                Ok(f) => {
                    let scan = scan_wal(&wal_path, &f, bounds)?;
                    if unheld {
                        same_wal(&wal_path, &f, scan.as_ref())?;
                    }
                    (Some((wal_path, f)), scan)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
                Err(e) => return Err(ExecError::io("open WAL", &wal_path)(e)),
            };
            if let Some(w) = writer {
                w.execute_batch("ROLLBACK").map_err(&sql)?;
            }
            let last = scan.as_ref().map_or(0, |s| s.last_commit.0);
            backfilled = index.map_or(last == 0, |(b, _)| b >= last);
            let scan = match (scan, index) {
                (Some(mut s), Some((backfilled, mx_frame))) => {
                    if mx_frame != last {
                        return Err(ExecError::SourceChanged {
                            path: src.display().to_string(),
                            detail: format!(
                                "its WAL's last commit frame is {last}, its WAL index says {mx_frame}"
                            ),
                        });
                    }
                    if backfilled >= last {
                        // Every frame is in the main file: SQLite reads that alone.
                        s.overlay.clear();
                    }
                    Some(s)
                }
                (Some(s), None) if s.last_commit.0 > 0 => {
                    return Err(ExecError::BadSource {
                        path: src.display().to_string(),
                        reason: "its WAL has frames but its WAL index (-shm) cannot be read".into(),
                    })
                }
                (s, _) => s,
            };
            (pages, wal, scan)
        } else {
            (begin(&reader)?, None, None)
        };
        let main_len = main
            .metadata()
            .map_err(ExecError::io("stat source", src))?
            .len();
        let position = scan.as_ref().map(|s| WalPosition {
            salts: s.header.salts,
            frame: s.last_commit.0,
            checksum: s.last_commit.1,
        });
        let changed = match (&scan, wal_mode) {
            (_, false) => Err(FullScanReason::NotWal),
            (None, _) if since.is_none() => Err(FullScanReason::NoPosition),
            (None, _) => Err(FullScanReason::WalReset),
            (Some(s), _) => s.changed.clone(),
        };
        if let Some(s) = &scan {
            if s.header.page_size != page_size {
                return Err(ExecError::BadSource {
                    path: src.display().to_string(),
                    reason: format!(
                        "its WAL has page size {}, the database {page_size}",
                        s.header.page_size
                    ),
                });
            }
        }
        let frames = scan.as_ref().map_or(0, |s| s.last_commit.0);
        Ok(Self {
            path: src.to_path_buf(),
            main,
            main_len,
            wal,
            page_size,
            len: pages * u64::from(page_size),
            header: scan.as_ref().map(|s| s.header),
            committed: scan
                .as_ref()
                .map(|s| s.committed.clone())
                .unwrap_or_default(),
            backfilled,
            overlay: scan.map(|s| s.overlay).unwrap_or_default(),
            position,
            changed,
            frames,
            _reader: Mutex::new(reader),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Length of the snapshot in bytes (pages × page size).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the snapshot has no pages.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Page size.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// The WAL position of this snapshot (`None` without a valid WAL header).
    pub fn position(&self) -> Option<WalPosition> {
        self.position
    }

    /// Committed WAL frames the snapshot includes.
    pub fn frames(&self) -> u32 {
        self.frames
    }

    /// The WAL's header, if it has a valid one.
    pub fn wal_header(&self) -> Option<WalHeader> {
        self.header
    }

    /// Whether every committed frame had been copied into the main file when the snapshot
    /// began (SQLite then reads the main file alone, and may restart the WAL once).
    pub fn backfilled(&self) -> bool {
        self.backfilled
    }

    /// Replaces the changed pages with `changed` (a caller that followed every frame since
    /// the previous page checkpoint knows them better than a WAL position can say).
    pub fn set_changed(&mut self, changed: Result<Vec<u64>, FullScanReason>) {
        self.changed = changed;
    }

    /// The checksum of committed frame `n` (from 1), if the snapshot includes it.
    pub fn frame_checksum(&self, n: u32) -> Option<(u32, u32)> {
        let i = usize::try_from(n).ok()?.checked_sub(1)?;
        self.committed.get(i).map(|(_, c)| *c)
    }

    /// The bytes of committed frames `first..=last` (from 1) as they are in the WAL.
    pub fn read_frames(&self, first: u32, last: u32) -> Result<Vec<u8>, ExecError> {
        let (Some((path, wal)), Some(h)) = (&self.wal, &self.header) else {
            return Ok(Vec::new());
        };
        let range = usize::try_from(first.max(1) - 1).unwrap_or(usize::MAX)
            ..usize::try_from(last).unwrap_or(usize::MAX);
        let Some(frames) = self.committed.get(range) else {
            return Err(ExecError::SourceChanged {
                path: self.path.display().to_string(),
                detail: format!("frames {first}..={last} are not all in its snapshot"),
            });
        };
        let Some(&(start, _)) = frames.first() else {
            return Ok(Vec::new());
        };
        let step = (FRAME_HEADER_LEN + h.page_size as usize) as u64;
        let mut out = vec![0u8; frames.len() * step as usize];
        FileExt::read_exact_at(&**wal, &mut out, start).map_err(ExecError::io("read WAL", path))?;
        Ok(out)
    }

    /// Writes the WAL's dirty pages to disk (`fdatasync`). The shipper calls it before it
    /// lets SQLite checkpoint what it shipped: a checkpoint syncs the WAL first, and
    /// would otherwise write back, inside the application's commit that runs it, every
    /// frame written since the last sync (gigabytes, after a fast writer's long step).
    pub fn sync_wal(&self) -> Result<(), ExecError> {
        match &self.wal {
            Some((path, f)) => f.sync_data().map_err(ExecError::io("sync WAL", path)),
            None => Ok(()),
        }
    }

    /// Pages (from 0, ascending) changed since the position given to
    /// [`SqliteSnapshot::open`], or why they are not known.
    pub fn changed(&self) -> Result<&[u64], FullScanReason> {
        self.changed.as_deref().map_err(|r| *r)
    }
}

impl ReadAt for SqliteSnapshot {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        let eof = |what: String| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what);
        if end > self.len {
            return Err(eof(format!("the snapshot ends at byte {}", self.len)));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let from_main = usize::try_from(self.main_len.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        FileExt::read_exact_at(&*self.main, &mut buf[..from_main], offset)?;
        buf[from_main..].fill(0);
        let ps = u64::from(self.page_size);
        let (first, last) = (offset / ps, (end - 1) / ps);
        for (&page, &at) in self.overlay.range(first..=last) {
            let Some((_, wal)) = &self.wal else { break };
            let start = page * ps;
            let (s, e) = (start.max(offset), (start + ps).min(end));
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            FileExt::read_exact_at(&**wal, dst, at + (s - start))?;
        }
        // Pages past the main file's end exist only as frames.
        let past = self.main_len.div_ceil(ps).max(first);
        if let Some(p) = (past..=last).find(|p| !self.overlay.contains_key(p)) {
            return Err(eof(format!(
                "page {} is neither in the main file nor in the WAL",
                p + 1
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "sqlite_tests.rs"]
mod tests;
