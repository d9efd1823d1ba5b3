//! Restoring the database to an LSN on a machine that has only the bucket: Cairn writes
//! the newest page checkpoint at or below the LSN and the segments that overlap
//! `[its LSN, L)`; the engine replays the records in that range into the pages and writes
//! a new data directory flushed at exactly `L`.
//!
//! Contract: [`restore`] leaves either a complete data directory at `to`, whose state is
//! the database's state at LSN `L`, or nothing there. `L` must be a record boundary (the
//! end of a record, or 0); otherwise it is refused. The restored directory is a
//! standalone copy: running the engine on it against the same database in the store
//! would fork the stream, so give it another database name.
//!
//! What a crash leaves: Cairn's restore job (resumed by the next `Checkpointer` on the
//! same state directory) and its staging directory `<to>.cairn-point`, or a half-built
//! `<to>.building`, which the next attempt removes. Retries: Cairn's. Cancellation:
//! dropping the future is a crash.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cairn_orchestrator::{Checkpointer, DbId, Lsn};

use crate::engine::replay;
use crate::error::{corrupt, invalid, io, Result};
use crate::page::{Bucket, Header};
use crate::pagefile::{fsync_dir, PageFile};
use crate::wal::{parse_name, scan, SegmentInfo};

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The LSN restored to.
    pub lsn: u64,
    /// The page checkpoint it started from (`None`: an empty database).
    pub page_lsn: Option<u64>,
    /// That checkpoint's generation.
    pub page_generation: Option<u64>,
    /// Segments Cairn restored.
    pub segments: u64,
    /// Records replayed.
    pub replayed: u64,
    /// Batches in the restored state (its next sequence number).
    pub next_seq: u64,
}

fn sibling(to: &Path, suffix: &str) -> PathBuf {
    let mut s = to.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Restores database `db` to LSN `lsn` into a new data directory `to`. Without a page
/// checkpoint at or below `lsn`, the database starts empty with `data_pages` pages.
pub async fn restore(
    cp: &Checkpointer,
    db: &DbId,
    lsn: u64,
    to: &Path,
    data_pages: u32,
) -> Result<Restored> {
    if to.exists() {
        return Err(invalid(
            format!("restore target {}", to.display()),
            "it exists; a restore writes a new data directory",
        ));
    }
    let staging = sibling(to, ".cairn-point");
    let report = cp.restore_at(db, Lsn(lsn), &staging).await?;
    let built = replay_staged(&staging, report.page_lsn.unwrap_or(0), lsn, data_pages, to);
    // Cairn's copy is not needed any more, whether the replay worked or not.
    std::fs::remove_dir_all(&staging).map_err(io("remove restore staging", &staging))?;
    let (segments, replayed, next_seq) = built?;
    Ok(Restored {
        lsn,
        page_lsn: report.page_lsn,
        page_generation: report.page_generation,
        segments,
        replayed,
        next_seq,
    })
}

/// Lists what Cairn restored into `staging` and builds `to` from it; returns the
/// segments, records replayed and next sequence number.
fn replay_staged(
    staging: &Path,
    page_lsn: u64,
    lsn: u64,
    data_pages: u32,
    to: &Path,
) -> Result<(u64, u64, u64)> {
    let pages = staging.join("pages");
    let pages = pages.exists().then_some(pages);
    let mut segments = Vec::new();
    let wal_dir = staging.join("wal");
    for e in std::fs::read_dir(&wal_dir).map_err(io("list restored WAL", &wal_dir))? {
        let e = e.map_err(io("list restored WAL", &wal_dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let start = parse_name(&name, "seg").ok_or_else(|| {
            corrupt(
                format!("restored WAL {}", wal_dir.display()),
                format!("{name:?} is not a segment of this engine"),
            )
        })?;
        let len = e.metadata().map_err(io("stat segment", &e.path()))?.len();
        segments.push((SegmentInfo { name, start, len }, e.path()));
    }
    segments.sort_by_key(|(s, _)| s.start);
    let (replayed, next_seq) = build(pages.as_deref(), page_lsn, &segments, lsn, data_pages, to)?;
    Ok((segments.len() as u64, replayed, next_seq))
}

/// Replays `segments` from `page_lsn` to exactly `lsn` on top of the page file `pages`
/// (or an empty database) and writes the data directory `to`, flushed at `lsn`. Returns
/// the records replayed and the next sequence number.
pub fn build(
    pages: Option<&Path>,
    page_lsn: u64,
    segments: &[(SegmentInfo, PathBuf)],
    lsn: u64,
    data_pages: u32,
    to: &Path,
) -> Result<(u64, u64)> {
    let (header, mut buckets) = match pages {
        Some(p) => {
            let (_, loaded) = PageFile::open(p)?;
            (loaded.header, loaded.buckets)
        }
        None => (
            Header {
                page_count: data_pages + 1,
                flushed_lsn: 0,
                next_seq: 0,
                flushes: 0,
            },
            vec![Bucket::new(); data_pages as usize],
        ),
    };
    if header.flushed_lsn != page_lsn {
        return Err(corrupt(
            "restored page file",
            format!(
                "its header says LSN {}, the page checkpoint says {page_lsn}",
                header.flushed_lsn
            ),
        ));
    }
    let mut next_seq = header.next_seq;
    let mut dirty = BTreeSet::new();
    let mut at = page_lsn;
    let mut replayed = 0;
    let mut expect_start: Option<u64> = None;
    for (s, path) in segments {
        if s.start > at || expect_start.is_some_and(|e| e != s.start) {
            return Err(corrupt(
                format!("restored segment {}", s.name),
                format!("it starts at LSN {}; the replay is at {at}", s.start),
            ));
        }
        expect_start = Some(s.end());
        let bytes = std::fs::read(path).map_err(io("read restored segment", path))?;
        let sc = scan(&bytes, s.start);
        if let Some(why) = sc.stop {
            return Err(corrupt(format!("restored segment {}", s.name), why));
        }
        for r in &sc.records {
            if r.end <= at {
                continue;
            }
            if r.lsn < at {
                return Err(corrupt(
                    format!("WAL record at LSN {}", r.lsn),
                    format!("the page checkpoint's LSN {at} falls inside it"),
                ));
            }
            if r.lsn >= lsn {
                break;
            }
            if r.end > lsn {
                return Err(invalid(
                    format!("LSN {lsn}"),
                    format!(
                        "not a record boundary: the record at LSN {} ends at {}",
                        r.lsn, r.end
                    ),
                ));
            }
            replay(&mut buckets, &mut next_seq, &mut dirty, r)?;
            replayed += 1;
            at = r.end;
        }
    }
    if at != lsn {
        return Err(invalid(
            format!("LSN {lsn}"),
            format!("the restored WAL ends at LSN {at}"),
        ));
    }
    write_dir(to, &header, &buckets, lsn, next_seq)?;
    Ok((replayed, next_seq))
}

/// Writes a data directory flushed at `lsn` with an empty WAL that starts there.
fn write_dir(to: &Path, h: &Header, buckets: &[Bucket], lsn: u64, next_seq: u64) -> Result<()> {
    let tmp = sibling(to, ".building");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io("remove stale build directory", &tmp))?;
    }
    for d in [tmp.join("segments"), tmp.join("active")] {
        std::fs::create_dir_all(&d).map_err(io("create directory", &d))?;
    }
    let header = Header {
        page_count: h.page_count,
        flushed_lsn: lsn,
        next_seq,
        flushes: h.flushes,
    };
    PageFile::create(&tmp.join("pages"), &header, buckets)?;
    let active = tmp.join("active").join(format!("{lsn:020}.wal"));
    std::fs::File::create(&active)
        .and_then(|f| f.sync_all())
        .map_err(io("create active WAL file", &active))?;
    for d in [tmp.join("segments"), tmp.join("active"), tmp.clone()] {
        fsync_dir(&d)?;
    }
    std::fs::rename(&tmp, to).map_err(io("move restored directory into place", to))?;
    if let Some(parent) = to.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}
