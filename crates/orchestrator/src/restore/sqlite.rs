//! Restore of a replicated SQLite database to a shipped transaction, as one ordinary SQLite
//! file.
//!
//! Contract: the point (the newest shipped commit, an LSN, or a time) is resolved on the
//! newest generation's WAL stream; the newest page generation at or below it and the
//! segments after it are restored as a restore to a point (a resumable job) into
//! `<target>.cairn-sqlite/`, Cairn applies the frames of every transaction up to the
//! point to the page file, and the result is renamed over the target. Crash: the job
//! resumes as any restore; applying frames again gives the same bytes; the target is
//! replaced only by the final rename. Retries: those of the restore job. Cancellation:
//! that of the restore job.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_core::sqlite_segment::{captured_ms_of, uncovered_gap};
use cairn_core::{DbId, Generation, Lsn, SourceKind};
use cairn_executor::sqlite_apply::{install, target_occupied, SegmentFile};
use serde::Serialize;

use super::RestoreOptions;
use crate::{CairnError, Checkpointer};

/// Which shipped transaction to restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlitePoint {
    /// The newest shipped commit.
    Latest,
    /// The newest transaction whose LSN is at most this.
    Lsn(Lsn),
    /// The newest transaction shipped in a segment captured at or before this time (unix
    /// milliseconds).
    Time(u64),
}

/// What a SQLite restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SqliteRestoreReport {
    /// Database.
    pub db: String,
    /// The restored file.
    pub path: String,
    /// The generation whose stream was used.
    pub generation: u64,
    /// The LSN restored to: that of the last transaction applied.
    pub lsn: u64,
    /// The point asked for, as an LSN.
    pub requested_lsn: u64,
    /// The page generation the restore started from, and its LSN.
    pub page_generation: Option<u64>,
    /// Its LSN.
    pub page_lsn: Option<u64>,
    /// Transactions applied on top of it.
    pub transactions: u64,
    /// Frames applied.
    pub frames: u64,
    /// When the segment of the last applied transaction was captured (unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captured_ms: Option<u64>,
    /// Blobs read.
    pub blobs_read: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

fn staging(to: &Path) -> PathBuf {
    let mut s = to.as_os_str().to_os_string();
    s.push(".cairn-sqlite");
    PathBuf::from(s)
}

impl Checkpointer {
    /// Whether generation `generation` (the newest if `None`) of `db` is a SQLite database
    /// with a WAL stream (one `cairn replicate` ships), which restores to one SQLite file.
    pub async fn is_replicated_sqlite(
        &self,
        db: &DbId,
        generation: Option<Generation>,
    ) -> Result<bool, CairnError> {
        let gs = self.state(db, generation).await?;
        Ok(gs.state.wal.is_some()
            && gs
                .state
                .pages
                .as_ref()
                .is_some_and(|p| p.origin == SourceKind::Sqlite))
    }

    /// Restores generation `generation` (the newest if `None`) of the replicated SQLite
    /// database `db` to `point` of its stream as the SQLite file `to`
    /// (see the module docs). `overwrite` replaces an existing file (and removes its
    /// `-wal` and `-shm`); without it any of them existing is refused.
    pub async fn restore_sqlite(
        &self,
        db: &DbId,
        generation: Option<Generation>,
        to: &Path,
        point: SqlitePoint,
        overwrite: bool,
    ) -> Result<SqliteRestoreReport, CairnError> {
        let started = Instant::now();
        let to = std::path::absolute(to).map_err(|e| CairnError::Config {
            what: format!("restore target {}", to.display()),
            reason: e.to_string(),
        })?;
        if let (false, Some(p)) = (overwrite, target_occupied(&to)) {
            return Err(CairnError::TargetExists {
                path: p.display().to_string(),
            });
        }
        let gs = self.state(db, generation).await?;
        let not_replicated = |why: &str| CairnError::Config {
            what: format!("database {db}"),
            reason: format!(
                "{why}; a restore to a transaction needs a database shipped by `cairn replicate`"
            ),
        };
        let wal = match (&gs.state.pages, &gs.state.wal) {
            (Some(p), Some(w)) if p.origin == SourceKind::Sqlite => w,
            (Some(p), _) if p.origin != SourceKind::Sqlite => {
                return Err(not_replicated("it is not a SQLite database"))
            }
            _ => return Err(not_replicated("it has no WAL stream")),
        };
        let lsn = match point {
            // The newest restorable commit: before a gap no page generation covers yet.
            SqlitePoint::Latest => uncovered_gap(&gs.state).map_or(wal.end, |g| g.lsn_start),
            SqlitePoint::Lsn(l) => l,
            SqlitePoint::Time(t) => {
                let shipped = wal
                    .segments
                    .iter()
                    .rfind(|s| captured_ms_of(&s.name).is_some_and(|c| c <= t));
                match shipped {
                    Some(s) => s.lsn_end,
                    None => {
                        let first = wal.segments.iter().find_map(|s| captured_ms_of(&s.name));
                        return Err(CairnError::Config {
                            what: format!("restore of {db} to a time"),
                            reason: match first {
                                Some(f) => format!(
                                    "nothing retained was shipped at or before {t} ms; the oldest retained segment was captured at {f} ms (unix)"
                                ),
                                None => "the stream holds no segment with a capture time".into(),
                            },
                        });
                    }
                }
            }
        };
        let stage = staging(&to);
        let opts = RestoreOptions {
            generation: Some(gs.manifest.generation),
            lsn: Some(lsn),
            overwrite: true,
        };
        let r = self.restore_with(db, &stage, &opts).await?;
        let names = r.segments.clone().unwrap_or_default();
        let lsns = r.segment_lsns.clone().unwrap_or_default();
        let files: Vec<SegmentFile> = names
            .iter()
            .zip(&lsns)
            .map(|(n, (start, _))| SegmentFile {
                name: n.clone(),
                lsn_start: *start,
                path: stage.join("wal").join(n),
            })
            .collect();
        let pages = stage.join("pages");
        if !pages.exists() {
            return Err(CairnError::Config {
                what: format!("restore of {db} to LSN {lsn}"),
                reason: "no page generation is at or below it (the stream's first segment is a gap before the first page generation)".into(),
            });
        }
        let from = r.page_lsn.unwrap_or(0);
        let files_in = files.clone();
        let pages_in = pages.clone();
        let applied = tokio::task::spawn_blocking(move || {
            cairn_executor::apply_segments(&pages_in, &files_in, from, lsn.0)
        })
        .await
        .map_err(|source| CairnError::Join {
            job: "sqlite restore".into(),
            what: "apply WAL frames",
            source,
        })??;
        install(&pages, &to)?;
        std::fs::remove_dir_all(&stage).map_err(|e| CairnError::Config {
            what: format!("restore staging directory {}", stage.display()),
            reason: format!("could not be removed after the restore: {e}"),
        })?;
        Ok(SqliteRestoreReport {
            db: db.to_string(),
            path: to.display().to_string(),
            generation: r.generation,
            lsn: applied.lsn,
            requested_lsn: lsn.0,
            page_generation: r.page_generation,
            page_lsn: r.page_lsn,
            transactions: applied.transactions,
            frames: applied.frames,
            captured_ms: applied.captured_ms,
            blobs_read: r.blobs_read,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }
}
