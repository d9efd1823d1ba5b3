//! Retention and garbage collection, safe against writers and restores on other machines
//! (the protocol is decision record 0022).
//!
//! A collection is a job: it applies the retention policy to the database's generations,
//! marks every blob that a retained, pinned or leased generation (or an unfinished local
//! checkpoint) references, lists the blobs in the store (no HEAD per blob) and plans to
//! delete the rest, except those younger than the grace period by the store's clock. It
//! then publishes one generation (by conditional create, like any other) that raises the
//! GC epoch and records the expired generations. Writers reuse a stored blob they did not
//! inherit from their parent only if it carries the current epoch, and a writer that
//! planned on an older generation is fenced by this one, so nothing published after the
//! collection's generation can reference a blob it deletes. After it, the collection lists
//! pins and leases again, keeps what they hold, and deletes the rest. Any listing or read
//! error stops it before it deletes anything more; only a definite "not found" counts as
//! absent.
//!
//! Crash: the plan is persisted before the generation is published; a resumed collection
//! that finds its generation published goes on to the deletions (which are idempotent),
//! and one that does not plans again. Retries: the store's, and the runner's for transient
//! failures. Cancellation: before the publication, nothing changed; after it, deletions
//! stop between batches.

mod holds;
mod mark;

use std::time::{Duration, Instant};

use cairn_core::{keys, DbId, Generation};
use cairn_planner::gc::{self as rules, Listed, Reason};
// Keys per bulk delete: the store's own batch size, so one slice is one request.
use cairn_remote_store::DELETE_BATCH;
use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};

pub use holds::Pin;

use crate::publication::Publisher;
use crate::queue::{Item, Job, JobSpec, Phase, Progress};
use crate::{CairnError, Checkpointer, GenerationState, JobOutcome, JobRun};

/// Attempts to publish a collection's generation when writers keep winning the race.
const PUBLISH_ATTEMPTS: usize = 5;

/// Bulk deletes in flight at once.
const DELETE_CONCURRENCY: usize = 4;

/// Options of one collection.
#[derive(Clone, Debug, Default)]
pub struct GcOptions {
    /// Keep the newest N data generations.
    pub keep_last: Option<u64>,
    /// Keep data generations younger than this.
    pub keep_within: Option<Duration>,
    /// Keep unreferenced blobs younger than this by the store's clock (safe at zero).
    pub grace: Duration,
    /// Decide and report only.
    pub dry_run: bool,
    /// Report every kept blob with the reason it is kept.
    pub explain: bool,
}

/// Blobs and bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    /// Blobs.
    pub blobs: u64,
    /// Bytes.
    pub bytes: u64,
}

/// A kept blob and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptBlob {
    /// The blob's name.
    pub name: String,
    /// `retained generation N`, `pin N`, `lease ID`, `in-flight job ID` or `grace period`.
    pub reason: String,
}

/// What a collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Database.
    pub db: String,
    /// The generation the collection published (`null` for a dry run or nothing to do).
    pub generation: Option<u64>,
    /// Whether nothing was published or deleted.
    pub dry_run: bool,
    /// Generations kept.
    pub generations_retained: Vec<u64>,
    /// Generations expired by this collection.
    pub generations_expired: Vec<u64>,
    /// Blobs deleted.
    pub blobs_deleted: u64,
    /// Bytes deleted.
    pub bytes_deleted: u64,
    /// Blobs kept.
    pub blobs_kept: u64,
    /// Bytes kept.
    pub bytes_kept: u64,
    /// Unreferenced blobs kept because they are younger than the grace period.
    pub unreferenced_in_grace: Count,
    /// With `explain`: every kept blob and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<Vec<KeptBlob>>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// A collection's persisted plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct GcPlan {
    /// The generation it publishes, on top of `parent`.
    pub fence: u64,
    pub parent: u64,
    pub created_unix_ms: u64,
    /// Generations it expires.
    pub expired: Vec<u64>,
    /// Generations retention keeps.
    pub retained: Vec<u64>,
    /// Blobs to delete: name and object size.
    pub delete: Vec<(String, u64)>,
    /// Blobs kept, and in the grace period.
    pub kept: Count,
    pub in_grace: Count,
    /// With `explain`: every kept blob and why.
    pub explained: Option<Vec<KeptBlob>>,
}

fn reason_text(r: &Reason) -> String {
    match r {
        Reason::Retained(g) => format!("retained generation {g}"),
        Reason::Pin(g) => format!("pin {g}"),
        Reason::Lease(id) => format!("lease {id}"),
        Reason::InFlight(job) => format!("in-flight job {job}"),
        Reason::Grace => "grace period".into(),
    }
}

impl Checkpointer {
    /// Applies the retention policy of `opts` to `db` and deletes the blobs nothing uses,
    /// as a job.
    pub async fn gc(&self, db: &DbId, opts: &GcOptions) -> Result<GcReport, CairnError> {
        self.gc_job(db, opts).await
    }

    /// [`Checkpointer::gc`] as a handle: the job is enqueued at once, its progress can be
    /// watched (the deletions, once they are planned), and it runs when the handle is
    /// awaited.
    pub fn gc_job(&self, db: &DbId, opts: &GcOptions) -> JobRun<'_, GcReport> {
        let job = self.enqueue(JobSpec::Gc {
            db: db.clone(),
            keep_last: opts.keep_last,
            keep_within_ms: opts.keep_within.map(|d| d.as_millis() as u64),
            grace_ms: opts.grace.as_millis() as u64,
            dry_run: opts.dry_run,
            explain: opts.explain,
        });
        JobRun::new(self, job, "gc", |o| match o {
            JobOutcome::Gc(r) => Some(r),
            _ => None,
        })
    }

    pub(crate) async fn run_gc(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        opts: &GcOptions,
    ) -> Result<GcReport, CairnError> {
        let started = Instant::now();
        for _ in 0..PUBLISH_ATTEMPTS {
            let plan = match (job.rec().phase, job.items()?.gc) {
                (Phase::Planned | Phase::Published, Some(p)) => p,
                _ => match self.plan_gc(job, db, opts).await? {
                    Planned::Done(mut report) => {
                        report.duration_ms = started.elapsed().as_millis() as u64;
                        return Ok(report);
                    }
                    Planned::Plan(p) => p,
                },
            };
            if job.rec().phase == Phase::Planned && !self.publish_fence(job, db, &plan).await? {
                // A writer published that generation first: plan again on top of it.
                job.clear_items()?;
                job.update(|r| r.phase = Phase::New, &[])?;
                continue;
            }
            let mut report = self.sweep_plan(job, db, &plan).await?;
            report.duration_ms = started.elapsed().as_millis() as u64;
            return Ok(report);
        }
        Err(CairnError::Busy {
            db: db.clone(),
            what: format!(
                "writers published before the collection's generation {PUBLISH_ATTEMPTS} times"
            ),
        })
    }

    /// Decides what to expire and delete, and persists it (unless a dry run).
    async fn plan_gc(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        opts: &GcOptions,
    ) -> Result<Planned, CairnError> {
        let tenant = self.cfg.tenant.clone();
        let mut report = GcReport {
            db: db.to_string(),
            dry_run: opts.dry_run,
            ..Default::default()
        };
        let Some(latest) = self.latest_state(db).await? else {
            return Ok(Planned::Done(report));
        };
        let marks = mark::Marks::collect(self, job, db, &latest, opts).await?;
        let listed: Vec<Listed> = self
            .store
            .list(&keys::blobs_prefix(&tenant, db))
            .await?
            .into_iter()
            .map(|o| Listed {
                name: o.key.rsplit('/').next().unwrap_or(&o.key).to_string(),
                size: o.size,
                modified_ms: o.last_modified_unix_ms,
            })
            .collect();
        let sweep = rules::sweep(
            &listed,
            &marks.reasons,
            opts.grace.as_millis() as u64,
            marks.store_now_ms,
        );
        let mut kept = Count::default();
        let mut in_grace = Count::default();
        for (l, r) in &sweep.kept {
            kept.blobs += 1;
            kept.bytes += l.size;
            if *r == Reason::Grace {
                in_grace.blobs += 1;
                in_grace.bytes += l.size;
            }
        }
        let explained = opts.explain.then(|| {
            sweep
                .kept
                .iter()
                .map(|(l, r)| KeptBlob {
                    name: l.name.clone(),
                    reason: reason_text(r),
                })
                .collect()
        });
        let plan = GcPlan {
            fence: latest.manifest.generation.0 + 1,
            parent: latest.manifest.generation.0,
            created_unix_ms: self.env.now_ms(),
            expired: marks.kept.expired.clone(),
            retained: marks.kept.retained.clone(),
            delete: sweep
                .delete
                .iter()
                .map(|l| (l.name.clone(), l.size))
                .collect(),
            kept,
            in_grace,
            explained,
        };
        // A dry run, or nothing to expire or delete: report, publish nothing (a collection
        // with nothing to do costs no generation and fences no writer).
        if opts.dry_run || (plan.delete.is_empty() && plan.expired.is_empty()) {
            report.generations_retained = plan.retained;
            report.generations_expired = plan.expired;
            report.blobs_kept = plan.kept.blobs;
            report.bytes_kept = plan.kept.bytes;
            report.unreferenced_in_grace = plan.in_grace;
            report.kept = plan.explained;
            return Ok(Planned::Done(report));
        }
        let bytes: u64 = plan.delete.iter().map(|(_, s)| s).sum();
        job.update(
            |r| {
                r.phase = Phase::Planned;
                r.generation = Some(plan.fence);
                r.progress = Progress {
                    done: 0,
                    total: plan.delete.len() as u64,
                    bytes_done: 0,
                    bytes_total: bytes,
                };
            },
            &[Item::Gc(&plan)],
        )?;
        Ok(Planned::Plan(plan))
    }

    /// Publishes the collection's generation; false when another writer took it.
    async fn publish_fence(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        plan: &GcPlan,
    ) -> Result<bool, CairnError> {
        self.check_store().await?;
        let parent = self.state(db, Some(Generation(plan.parent))).await?;
        let mut next = parent.state.clone();
        next.gc.epoch += 1;
        next.gc.expire(&plan.expired);
        let mut manifest = Publisher {
            tenant: &self.cfg.tenant,
            db,
            writer: &self.writer,
            created_unix_ms: plan.created_unix_ms,
            job: Some(job.id()),
        }
        .manifest(Generation(plan.fence), Some(&parent), next.clone());
        manifest.gc = true;
        let lock = self.db_lock(db);
        let _publishing = lock.lock().await;
        // From here a cancel is not honoured: it could land after the create.
        self.enter_publication(job.id())?;
        match cairn_state::publish(&self.state, &self.store, &manifest).await {
            Ok(_) => {}
            Err(cairn_state::StateError::Fenced { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        self.remember(
            db,
            &GenerationState {
                manifest,
                state: next,
            },
        );
        job.update(|r| r.phase = Phase::Published, &[])?;
        Ok(true)
    }

    /// After the collection's generation: keeps what pins and leases taken meanwhile hold,
    /// and deletes the rest.
    async fn sweep_plan(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        plan: &GcPlan,
    ) -> Result<GcReport, CairnError> {
        let tenant = self.cfg.tenant.clone();
        let rescued = mark::rescue(self, db, plan).await?;
        let todo: Vec<&(String, u64)> = plan
            .delete
            .iter()
            .filter(|(n, _)| !rescued.contains(n))
            .collect();
        let blobs = keys::blobs_prefix(&tenant, db);
        let sizes: std::collections::HashMap<&str, u64> =
            todo.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        // Batches of bulk deletes, a few at once; progress and the catalog follow each.
        let batches: Vec<Vec<String>> = todo
            .chunks(DELETE_BATCH)
            .map(|c| c.iter().map(|(n, _)| format!("{blobs}{n}")).collect())
            .collect();
        let batches = &batches;
        let mut deletions = stream::iter(0..batches.len())
            .map(|i| async move { self.store.delete_many(&batches[i]).await })
            .buffer_unordered(DELETE_CONCURRENCY);
        let mut deleted = Count::default();
        while let Some((keys, failed)) = deletions.next().await {
            let names: Vec<String> = keys
                .iter()
                .map(|k| k.strip_prefix(blobs.as_str()).unwrap_or(k).to_string())
                .collect();
            deleted.blobs += names.len() as u64;
            deleted.bytes += names
                .iter()
                .map(|n| sizes.get(n.as_str()).copied().unwrap_or(0))
                .sum::<u64>();
            self.state.forget_blobs(&tenant, db, &names)?;
            if let Some(e) = failed {
                return Err(e.into());
            }
            self.check_cancel(job.id())?;
            let (n, b) = (deleted.blobs, deleted.bytes);
            job.update(
                |r| {
                    r.progress.done = n;
                    r.progress.bytes_done = b;
                },
                &[],
            )?;
        }
        drop(deletions);
        let kept_extra: Vec<&(String, u64)> = plan
            .delete
            .iter()
            .filter(|(n, _)| rescued.contains(n))
            .collect();
        let (n, b) = (deleted.blobs, deleted.bytes);
        job.update(
            |r| {
                r.phase = Phase::Swept;
                r.progress.done = n;
                r.progress.bytes_done = b;
            },
            &[],
        )?;
        let mut explained = plan.explained.clone();
        if let Some(list) = explained.as_mut() {
            list.extend(kept_extra.iter().map(|(name, _)| KeptBlob {
                name: name.clone(),
                reason: "lease or pin taken during the collection".into(),
            }));
        }
        Ok(GcReport {
            db: db.to_string(),
            generation: Some(plan.fence),
            dry_run: false,
            generations_retained: plan.retained.clone(),
            generations_expired: plan.expired.clone(),
            blobs_deleted: deleted.blobs,
            bytes_deleted: deleted.bytes,
            blobs_kept: plan.kept.blobs + kept_extra.len() as u64,
            bytes_kept: plan.kept.bytes + kept_extra.iter().map(|(_, s)| s).sum::<u64>(),
            unreferenced_in_grace: plan.in_grace.clone(),
            kept: explained,
            duration_ms: 0,
        })
    }
}

/// A plan, or the report of a collection that had nothing to publish.
enum Planned {
    Plan(GcPlan),
    Done(GcReport),
}
