//! Planning a checkpoint: catch up with the store, open the SQLite snapshot (in place,
//! under a read transaction, with the pages changed since the previous generation's WAL
//! position), ask the pure planner for the work, and persist the plan, the first durable
//! step of the job.
//!
//! Crash: before the plan is persisted nothing durable exists but the record; after it,
//! every attempt executes the same plan: same generation, parent and creation time. A plan
//! whose file changed since ([`CkptPlan::still_valid`]) is dropped and the job plans again,
//! unless its manifest already reached the store, in which case the job adopts that
//! generation. A SQLite plan is valid only in the attempt that holds its snapshot: a new
//! attempt plans again from a new snapshot (blobs already stored are found, not uploaded).
//! Retries: none here. Cancellation: checked before planning.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use cairn_core::{keys, DbId, Generation, Lsn, Manifest};
use std::sync::Arc;

use cairn_executor::{list_segments, JobScratch, PageFile, SqliteSnapshot};
use cairn_planner::{check_page_lsn, plan_pages, plan_segments, PagesInput, SegmentInput};
use cairn_remote_store::StoreError;

use crate::queue::{CkptPlan, Item, Job, JobItems, Phase, PlanBody, Progress, SqlitePlan};
use crate::{CairnError, Checkpointer, Source};

/// Inode and modification time of a file.
pub(super) fn file_stamp(path: &Path) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
}

/// A page file as it was when a checkpoint at an LSN was requested: its length, inode and
/// modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    len: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileStamp {
    /// The stamp of `path` now (`None` if it cannot be read).
    pub(crate) fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| Self {
            len: m.len(),
            ino: m.ino(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }

    /// The modification time it records.
    pub(crate) fn modified(&self) -> std::time::SystemTime {
        let nanos = Duration::from_nanos(self.mtime_nsec.clamp(0, 999_999_999) as u64);
        match u64::try_from(self.mtime) {
            Ok(secs) => std::time::UNIX_EPOCH + Duration::from_secs(secs) + nanos,
            Err(_) => std::time::UNIX_EPOCH,
        }
    }
}

impl CkptPlan {
    /// Whether the plan can still be executed: its page file is there with its length and
    /// unchanged in place, or its segment directory exists.
    pub(crate) fn still_valid(&self) -> bool {
        match &self.body {
            // Its read transaction ended with the attempt that planned it.
            PlanBody::Pages {
                sqlite: Some(_), ..
            } => false,
            PlanBody::Pages {
                file, len, stamp, ..
            } => {
                std::fs::metadata(file)
                    .map(|m| m.len() == *len)
                    .unwrap_or(false)
                    && (stamp.is_none() || file_stamp(file) == *stamp)
            }
            PlanBody::Segments { dir, .. } => dir.is_dir(),
        }
    }
}

impl Checkpointer {
    /// Whether the store holds this job's manifest for the planned generation; if so it is
    /// imported and the job recorded as published.
    pub(super) async fn adopt_published(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        plan: &CkptPlan,
    ) -> Result<bool, CairnError> {
        let key = keys::manifest_key(&self.cfg.tenant, db, Generation(plan.generation));
        let bytes = match self
            .store
            .get_bytes_verified(&key, |b| Manifest::decode(&key, b).map(|_| ()))
            .await
        {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let m = Manifest::decode(&key, &bytes)?;
        if m.job.as_deref() != Some(job.id().to_string().as_str()) {
            return Ok(false);
        }
        self.state.record_generation(&m)?;
        job.update(|r| r.phase = Phase::Published, &[])?;
        Ok(true)
    }

    /// Opens the snapshot (SQLite), plans, and persists the plan: the first durable step.
    /// For SQLite it also returns the snapshot (held until the job's reads are done) and,
    /// when the WAL named them, the changed pages (persisted with the plan).
    pub(super) async fn plan_checkpoint(
        &self,
        job: &mut Job<'_>,
        what: &PlanRequest<'_>,
        items: &JobItems,
        _scratch: &JobScratch,
    ) -> Result<Planned, CairnError> {
        let PlanRequest {
            db,
            source,
            chunk_size,
            lsn,
        } = *what;
        let tenant = self.cfg.tenant.clone();
        self.check_cancel(job.id())?;
        let prev = self.latest_state(db).await?;
        let prev_state = prev.as_ref().map(|p| &p.state);
        let prev_pages = prev_state.and_then(|s| s.pages.as_ref());
        if let (Some(p), Source::Sqlite(_) | Source::Pages { .. }) = (prev_pages, source) {
            if p.origin != source.kind() {
                return Err(CairnError::KindMismatch {
                    tenant,
                    db: db.clone(),
                    recorded: p.origin.as_str(),
                    given: source.kind().as_str(),
                });
            }
        }
        let generation = prev
            .as_ref()
            .map_or(Generation(1), |m| m.manifest.generation.next());
        let plan_err = |e| CairnError::Plan {
            db: db.clone(),
            source: e,
        };
        let page_body = |path: &Path, len: u64, page_size: u32, sqlite: Option<SqlitePlan>| {
            check_page_lsn(prev_pages, lsn).map_err(plan_err)?;
            let input = PagesInput {
                origin: source.kind(),
                len,
                page_size,
                chunk_size,
            };
            let plan =
                plan_pages(prev_pages.map(|p| (p.generation.0, p)), &input).map_err(plan_err)?;
            let units = plan.chunks.len() as u64;
            let body = PlanBody::Pages {
                origin: source.kind(),
                file: path.to_path_buf(),
                page_size: plan.page_size,
                chunk_size: plan.chunk_size,
                len: plan.len,
                lsn,
                stamp: file_stamp(path),
                chunks: plan.chunks,
                sqlite,
            };
            Ok::<_, CairnError>((body, units, plan.len))
        };
        let mut snapshot = None;
        let mut changed = None;
        let (body, units, bytes) = match source {
            Source::Sqlite(p) => {
                // The WAL position is usable only for the page snapshot this state
                // directory published last, whose page digests it also holds.
                let since = self
                    .state
                    .wal_position(&tenant, db)?
                    .filter(|(g, _)| prev_pages.map(|p| p.generation.0) == Some(*g))
                    .map(|(_, pos)| pos);
                let lent = self.lent.get(&job.id()).map(|e| Arc::clone(e.value()));
                let snap = match lent {
                    Some(s) => s,
                    None if lsn.is_some() => {
                        return Err(CairnError::SourceChanged {
                            db: db.clone(),
                            path: p.display().to_string(),
                            lsn: lsn.map_or(0, |l| l.0),
                            job: job.id().to_string(),
                        })
                    }
                    None => {
                        let path = p.clone();
                        let open = move || SqliteSnapshot::open(&path, since);
                        Arc::new(tokio::task::spawn_blocking(open).await.map_err(|source| {
                            CairnError::Join {
                                job: job.id().to_string(),
                                what: "SQLite snapshot",
                                source,
                            }
                        })??)
                    }
                };
                let info = SqlitePlan {
                    position: snap.position(),
                    full_scan_reason: snap.changed().err(),
                    wal_frames: snap.frames(),
                };
                changed = snap.changed().ok().map(<[u64]>::to_vec);
                let out = page_body(p, snap.len(), snap.page_size(), Some(info))?;
                snapshot = Some(snap);
                out
            }
            Source::Pages { path, page_size } => {
                let f = PageFile::open(path, *page_size)?;
                page_body(path, f.len, f.page_size, None)?
            }
            Source::Segments(dir) => {
                let files = list_segments(dir)?;
                let ranges = items.ranges.as_ref();
                let inputs: Vec<SegmentInput> = files
                    .iter()
                    .map(|f| SegmentInput {
                        name: f.name.clone(),
                        len: f.len,
                        lsn: ranges.and_then(|r| r.get(&f.name).copied()),
                    })
                    .collect();
                let prev_wal = prev_state.and_then(|s| s.wal.as_ref());
                let plan = plan_segments(prev_wal, &inputs).map_err(plan_err)?;
                let bytes = plan.new.iter().map(|n| n.len).sum();
                let units = plan.new.len() as u64;
                let body = PlanBody::Segments {
                    dir: dir.clone(),
                    new: plan.new,
                    start: plan.start,
                    end: plan.end,
                };
                (body, units, bytes)
            }
        };
        let plan = CkptPlan {
            generation: generation.0,
            parent: prev.as_ref().map(|m| m.manifest.generation.0),
            created_unix_ms: self.env.now_ms(),
            body,
        };
        if let PlanBody::Segments { start, end, .. } = &plan.body {
            // The segments it reads stay in the engine's WAL until it publishes or stops.
            let from = prev_state
                .and_then(|s| s.wal.as_ref())
                .map_or(*start, |w| w.end);
            self.hold_lease(db, from..*end, job.id())?;
        }
        let mut saved = vec![Item::Plan(&plan)];
        match (&changed, &snapshot) {
            (Some(pages), _) => saved.push(Item::Dirty(pages)),
            (None, Some(_)) => saved.push(Item::Delete(cairn_state::ItemKey::Dirty)),
            (None, None) => {}
        }
        job.update(
            |r| {
                r.phase = Phase::Planned;
                r.generation = Some(generation.0);
                r.progress = Progress {
                    done: 0,
                    total: units,
                    bytes_done: 0,
                    bytes_total: bytes,
                };
            },
            &saved,
        )?;
        Ok(Planned {
            plan,
            snapshot,
            changed,
        })
    }
}

/// A persisted plan, with what only the planning attempt has.
pub(super) struct Planned {
    pub plan: CkptPlan,
    /// The SQLite snapshot the plan reads (its read transaction is held while it lives).
    pub snapshot: Option<Arc<SqliteSnapshot>>,
    /// The SQLite pages the WAL says changed since the previous generation.
    pub changed: Option<Vec<u64>>,
}

/// What a checkpoint job asks to plan.
#[derive(Clone, Copy)]
pub(super) struct PlanRequest<'a> {
    pub db: &'a DbId,
    pub source: &'a Source,
    pub chunk_size: u64,
    pub lsn: Option<Lsn>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::SourceKind;
    use cairn_planner::ChunkPlan;

    #[test]
    fn a_plan_goes_stale_when_its_file_changes_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pages");
        std::fs::write(&file, vec![1u8; 8192]).unwrap();
        let plan = CkptPlan {
            generation: 3,
            parent: Some(2),
            created_unix_ms: 7,
            body: PlanBody::Pages {
                origin: SourceKind::Pages,
                file: file.clone(),
                page_size: 4096,
                chunk_size: 8192,
                len: 8192,
                lsn: None,
                stamp: file_stamp(&file),
                chunks: vec![ChunkPlan {
                    index: 0,
                    offset: 0,
                    len: 8192,
                }],
                sqlite: None,
            },
        };
        assert!(plan.still_valid());
        // Same length, rewritten in place (a new file under the name).
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, vec![2u8; 8192]).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert!(!plan.still_valid());
        std::fs::remove_file(&file).unwrap();
        assert!(!plan.still_valid());
    }
}
