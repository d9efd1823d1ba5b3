//! Applying shipped SQLite WAL segments to a restored database file, so that a restore to
//! a point gives one ordinary SQLite file (no `-wal` beside it).
//!
//! Contract: [`apply_segments`] writes, in stream order, the pages of every transaction
//! whose LSN (the stream offset just past its commit frame) lies in `(from, to]`, then
//! sets the file's length to the last applied transaction's database size, and fsyncs.
//! A gap segment inside that range is refused (its transactions were never shipped).
//! Crash: the file is a staging copy; applying again from the start gives the same bytes
//! (each frame is a whole page image), so a killed restore simply applies again.
//! Retries: none. Cancellation: none (it is bounded by the segments' size).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cairn_core::sqlite_segment::{transactions, SegmentHeader, SegmentKind};

use crate::error::ExecError;
use crate::fsutil::{fsync_parent, remove_if_exists};

/// One segment to apply: its name, first LSN and where its bytes are.
#[derive(Clone, Debug)]
pub struct SegmentFile {
    /// The segment's name.
    pub name: String,
    /// Its first LSN.
    pub lsn_start: u64,
    /// The restored file holding it.
    pub path: PathBuf,
}

/// What [`apply_segments`] applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Transactions applied.
    pub transactions: u64,
    /// Frames (pages) written.
    pub frames: u64,
    /// The LSN of the last transaction applied (`from` when none was).
    pub lsn: u64,
    /// The capture time of the last segment a transaction was applied from.
    pub captured_ms: Option<u64>,
}

/// Applies the transactions with LSNs in `(from, to]` from `segments` (in stream order) to
/// the SQLite file at `db` (see the module docs).
pub fn apply_segments(
    db: &Path,
    segments: &[SegmentFile],
    from: u64,
    to: u64,
) -> Result<Applied, ExecError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(db)
        .map_err(ExecError::io("open restored database", db))?;
    let mut out = Applied {
        lsn: from,
        ..Default::default()
    };
    let mut size: Option<(u64, u32)> = None;
    for s in segments {
        let bytes = std::fs::read(&s.path).map_err(ExecError::io("read segment", &s.path))?;
        let end = s.lsn_start + bytes.len() as u64;
        if end <= from || s.lsn_start >= to {
            continue;
        }
        let h = SegmentHeader::parse(&s.name, &bytes)?;
        if h.kind == SegmentKind::Gap {
            return Err(ExecError::BadSource {
                path: s.name.clone(),
                reason: format!(
                    "the stream has a gap at LSN {}..{end}: transactions there were lost to a WAL reset outside Cairn and never shipped; restore to LSN {} or earlier, or {end} or later",
                    s.lsn_start, s.lsn_start
                ),
            });
        }
        let ps = u64::from(h.page_size);
        for t in transactions(&s.name, &h, &bytes)? {
            let lsn = s.lsn_start + t.end;
            if lsn <= from {
                continue;
            }
            if lsn > to {
                break;
            }
            for (page, data) in &t.pages {
                file.write_all_at(data, (u64::from(*page) - 1) * ps)
                    .map_err(ExecError::io("write restored page", db))?;
                out.frames += 1;
            }
            out.transactions += 1;
            out.lsn = lsn;
            out.captured_ms = Some(h.captured_ms);
            size = Some((ps, t.db_pages));
        }
    }
    if let Some((ps, pages)) = size {
        file.set_len(ps * u64::from(pages))
            .map_err(ExecError::io("set restored database length", db))?;
    }
    file.sync_all()
        .map_err(ExecError::io("fsync restored database", db))?;
    Ok(out)
}

fn side(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Whether `target` or its `-wal` / `-shm` side files exist (a stale WAL beside a
/// restored file would be replayed over it by SQLite).
pub fn target_occupied(target: &Path) -> Option<PathBuf> {
    [
        target.to_path_buf(),
        side(target, "-wal"),
        side(target, "-shm"),
    ]
    .into_iter()
    .find(|p| std::fs::symlink_metadata(p).is_ok())
}

/// Moves the finished database `staged` to `target` (same file system), removing a
/// `-wal` and `-shm` left beside the target, and makes the rename durable.
pub fn install(staged: &Path, target: &Path) -> Result<(), ExecError> {
    for s in ["-wal", "-shm"] {
        remove_if_exists(&side(target, s), "remove stale SQLite side file")?;
    }
    std::fs::rename(staged, target).map_err(ExecError::io("rename restored database", target))?;
    fsync_parent(target)
}
