//! Truncation coordination, what the embedding engine calls: the watermark below which it
//! may delete its local WAL, leases that hold ranges of it, and head and tail truncation of
//! the published WAL stream. The rules are the planner's pure functions
//! ([`cairn_planner::wal`]); this module applies them to the published state.
//!
//! Contract: the watermark counts only published generations and never passes the start
//! of a lease in force. A truncation publishes one new generation (a diff of the stream,
//! by conditional create, fenced like any other), holding the database's publication lock
//! so it never races this process's own checkpoints; the dropped segments' blobs are left
//! to garbage collection.
//!
//! Crash: leases are durable rows of the state directory; a truncation is one publication,
//! so a crash leaves it published (the next run imports it) or not (nothing changed); it is
//! not a job and is not resumed: run it again. Retries: the store's. Cancellation: dropping
//! the future before the publication changes nothing.

use std::ops::Range;
use std::time::Duration;

use cairn_core::{DbId, Generation, JobId, Lsn, WalState};
use cairn_planner::wal::{self, LeaseRange, PageRef};
use cairn_state::Lease;
use serde::Serialize;

use crate::publication::Publisher;
use crate::queue::{JobSpec, JobState, Phase};
use crate::{CairnError, Checkpointer, GenerationState, Source};

/// How long a checkpoint job's lease on the segments it reads lasts without renewal.
const JOB_LEASE_MS: u64 = 60 * 60 * 1000;

/// A lease, as `cairn watermark` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeaseInfo {
    /// Identity, 16 hex digits.
    pub id: String,
    /// First LSN held.
    pub start: u64,
    /// One past the last LSN held.
    pub end: u64,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_unix_ms: u64,
    /// The job holding it, if a job does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

impl From<&Lease> for LeaseInfo {
    fn from(l: &Lease) -> Self {
        Self {
            id: format!("{:016x}", l.id),
            start: l.start.0,
            end: l.end.0,
            expires_unix_ms: l.expires_unix_ms,
            job: l.holder.map(|j| j.to_string()),
        }
    }
}

/// How far the engine may delete its local WAL, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Watermark {
    /// WAL below this LSN is durable in the store and may be deleted.
    pub watermark: u64,
    /// The published stream's start (`null` without a WAL stream).
    pub wal_start: Option<u64>,
    /// The published stream's end (`null` without a WAL stream).
    pub wal_end: Option<u64>,
    /// The newest page checkpoint's LSN (`null` without one).
    pub page_lsn: Option<u64>,
    /// Leases in force.
    pub leases: Vec<LeaseInfo>,
}

/// What a truncation did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TruncateReport {
    /// Database.
    pub db: String,
    /// The generation published (`null`: nothing to drop).
    pub generation: Option<u64>,
    /// Segments dropped from the stream.
    pub segments_dropped: u64,
    /// The stream's start afterwards.
    pub wal_start: u64,
    /// The stream's end afterwards.
    pub wal_end: u64,
    /// The page checkpoint's LSN afterwards (a tail truncation may go back to an older one).
    pub page_lsn: Option<u64>,
}

/// Options of a head truncation.
#[derive(Clone, Debug, Default)]
pub struct HeadOptions {
    /// How long to wait for leases that overlap the dropped range.
    pub timeout: Duration,
    /// Cancel the jobs holding such leases instead of waiting for them.
    pub cancel: bool,
    /// Drop the range even if the newest state is then unrestorable.
    pub force: bool,
}

/// A lease taken through the library: renew it, release it (dropping it keeps it until
/// it expires).
pub struct LeaseHandle<'a> {
    cp: &'a Checkpointer,
    db: DbId,
    lease: Lease,
}

impl LeaseHandle<'_> {
    /// The lease's identity.
    pub fn id(&self) -> u64 {
        self.lease.id
    }

    /// The lease as stored.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Extends the lease to `ttl` from now.
    pub fn renew(&mut self, ttl: Duration) -> Result<(), CairnError> {
        let now = self.cp.env.now_ms();
        self.lease.expires_unix_ms = now + ttl.as_millis() as u64;
        self.cp
            .state
            .put_lease(&self.cp.cfg.tenant, &self.db, &self.lease, now)?;
        Ok(())
    }

    /// Releases the lease now.
    pub fn release(self) -> Result<(), CairnError> {
        self.cp.release(&self.db, self.lease.id)
    }
}

fn no_wal(db: &DbId) -> CairnError {
    CairnError::Config {
        what: format!("database {db}"),
        reason: "it has no published WAL stream to truncate".into(),
    }
}

impl Checkpointer {
    fn lease_ranges(&self, db: &DbId) -> Result<Vec<(Lease, LeaseRange)>, CairnError> {
        Ok(self
            .state
            .leases(&self.cfg.tenant, db)?
            .into_iter()
            .map(|l| {
                let r = LeaseRange {
                    id: l.id,
                    start: l.start,
                    end: l.end,
                    expires_unix_ms: l.expires_unix_ms,
                };
                (l, r)
            })
            .collect())
    }

    /// How far the engine may delete its local WAL of `db` (see [`Watermark`]).
    pub async fn watermark(&self, db: &DbId) -> Result<Watermark, CairnError> {
        let latest = self.latest_state(db).await?;
        self.watermark_of(db, latest.as_ref())
    }

    /// The watermark of `db` given its newest state `latest` (no store request).
    pub(crate) fn watermark_of(
        &self,
        db: &DbId,
        latest: Option<&GenerationState>,
    ) -> Result<Watermark, CairnError> {
        let st = latest.map(|l| &l.state);
        let wal = st.and_then(|s| s.wal.as_ref());
        let page_lsn = st.and_then(|s| s.pages.as_ref()).and_then(|p| p.lsn);
        let now = self.env.now_ms();
        let leases = self.lease_ranges(db)?;
        let ranges: Vec<LeaseRange> = leases.iter().map(|(_, r)| *r).collect();
        let w = wal::watermark(page_lsn, wal.map(|w| w.end), &ranges, now);
        Ok(Watermark {
            watermark: w.0,
            wal_start: wal.map(|w| w.start.0),
            wal_end: wal.map(|w| w.end.0),
            page_lsn: page_lsn.map(|l| l.0),
            leases: leases
                .iter()
                .filter(|(l, _)| l.active(now))
                .map(|(l, _)| LeaseInfo::from(l))
                .collect(),
        })
    }

    /// Leases `range` of `db`'s WAL for `ttl` (durable in the state directory).
    pub fn lease(
        &self,
        db: &DbId,
        range: Range<Lsn>,
        ttl: Duration,
    ) -> Result<LeaseHandle<'_>, CairnError> {
        if range.end < range.start {
            return Err(CairnError::Config {
                what: format!("lease on {db}"),
                reason: format!("range {}..{} ends before it starts", range.start, range.end),
            });
        }
        let now = self.env.now_ms();
        let lease = Lease {
            id: self.env.next_u64(),
            start: range.start,
            end: range.end,
            expires_unix_ms: now + ttl.as_millis() as u64,
            holder: None,
        };
        self.state.put_lease(&self.cfg.tenant, db, &lease, now)?;
        Ok(LeaseHandle {
            cp: self,
            db: db.clone(),
            lease,
        })
    }

    /// A lease held by a job until it ends (released by the runner).
    pub(crate) fn hold_lease(
        &self,
        db: &DbId,
        range: Range<Lsn>,
        job: JobId,
    ) -> Result<(), CairnError> {
        let now = self.env.now_ms();
        let lease = Lease {
            id: job.0,
            start: range.start,
            end: range.end,
            expires_unix_ms: now + JOB_LEASE_MS,
            holder: Some(job),
        };
        Ok(self.state.put_lease(&self.cfg.tenant, db, &lease, now)?)
    }

    /// Releases lease `id` of `db`; an unknown lease is an error naming it.
    pub fn release(&self, db: &DbId, id: u64) -> Result<(), CairnError> {
        if self.state.delete_lease(&self.cfg.tenant, db, id)? {
            Ok(())
        } else {
            Err(CairnError::UnknownLease {
                db: db.clone(),
                lease: format!("{id:016x}"),
            })
        }
    }

    /// Every page checkpoint of `db` with an LSN that is still restorable, ascending (an
    /// engine picks the one to restore or truncate to from these).
    pub async fn page_checkpoints(&self, db: &DbId) -> Result<Vec<PageRef>, CairnError> {
        let latest = self.state(db, None).await?;
        self.page_refs(db, &latest, Lsn(0)).await
    }

    /// Page checkpoints with an LSN, walking back from the latest generation's until one
    /// is below `down_to` (older ones are not needed), ascending.
    pub(crate) async fn page_refs(
        &self,
        db: &DbId,
        latest: &GenerationState,
        down_to: Lsn,
    ) -> Result<Vec<PageRef>, CairnError> {
        let mut out = Vec::new();
        let mut cur = latest.state.pages.clone();
        while let Some(p) = cur {
            if let Some(lsn) = p.lsn {
                out.push(PageRef {
                    lsn,
                    generation: p.generation,
                });
                if lsn < down_to {
                    break;
                }
            }
            if p.generation.0 <= 1 {
                break;
            }
            cur = match self.state(db, Some(Generation(p.generation.0 - 1))).await {
                Ok(s) => s.state.pages,
                // An older generation that is gone or expired ends the walk.
                Err(CairnError::UnknownGeneration { .. } | CairnError::Expired { .. }) => None,
                Err(e) => return Err(e),
            };
        }
        out.sort();
        Ok(out)
    }

    /// The leases in force now that overlap `range`.
    fn blocking_leases(
        &self,
        db: &DbId,
        range: &std::ops::Range<Lsn>,
    ) -> Result<Vec<Lease>, CairnError> {
        let now = self.env.now_ms();
        Ok(self
            .lease_ranges(db)?
            .into_iter()
            .filter(|(_, r)| r.blocks(range, now))
            .map(|(l, _)| l)
            .collect())
    }

    /// Drops the published segments of `db` that end at or below `before`, in one new
    /// generation (see [`HeadOptions`]).
    pub async fn truncate_head(
        &self,
        db: &DbId,
        before: Lsn,
        opts: &HeadOptions,
    ) -> Result<TruncateReport, CairnError> {
        let deadline = tokio::time::Instant::now() + opts.timeout;
        let latest = self.latest_state(db).await?.ok_or_else(|| no_wal(db))?;
        let wal = latest.state.wal.as_ref().ok_or_else(|| no_wal(db))?;
        let range = wal.start..before.max(wal.start);
        let mut cancelled = false;
        let lock = self.db_lock(db);
        // Leases are checked again once the database's publication lock is held, so a
        // lease taken while this waited for the lock is honoured too.
        let _publishing = loop {
            let blocking = self.blocking_leases(db, &range)?;
            if let Some(first) = blocking.first() {
                if opts.cancel && !cancelled {
                    for l in &blocking {
                        if let Some(job) = l.holder {
                            self.cancel(job)?;
                        }
                    }
                    cancelled = true;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(CairnError::LeaseHeld {
                        db: db.clone(),
                        lease: format!("{:016x}", first.id),
                        start: first.start,
                        end: first.end,
                        expires_unix_ms: first.expires_unix_ms,
                        waited_ms: opts.timeout.as_millis() as u64,
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let wait_until = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
            let guard = tokio::time::timeout_at(wait_until, lock.lock())
                .await
                .map_err(|_| CairnError::Busy {
                    db: db.clone(),
                    what: "a checkpoint of this database is publishing".into(),
                })?;
            if self.blocking_leases(db, &range)?.is_empty() {
                break guard;
            }
        };
        let latest = self.latest_state(db).await?.ok_or_else(|| no_wal(db))?;
        let wal = latest.state.wal.clone().ok_or_else(|| no_wal(db))?;
        let pages = self.page_refs(db, &latest, wal.start).await?;
        let cut =
            wal::plan_head(&wal, &pages, before, opts.force).map_err(|e| CairnError::Wal {
                db: db.clone(),
                source: e,
            })?;
        let mut next = latest.state.clone();
        let mut new_wal = wal;
        new_wal.segments.drain(..cut.drop);
        new_wal.start = cut.new_start;
        next.wal = Some(new_wal);
        self.publish_truncation(db, &latest, next, cut.drop as u64)
            .await
    }

    /// Cuts `db`'s WAL stream at `after` (which must be a segment boundary): in-flight
    /// segment checkpoints of the database are cancelled first, and published state past
    /// `after` (segments, or a page checkpoint, which goes back to the newest one at or
    /// below `after`) is refused unless `force`.
    pub async fn truncate_tail(
        &self,
        db: &DbId,
        after: Lsn,
        force: bool,
    ) -> Result<TruncateReport, CairnError> {
        // Jobs that would publish segments past `after` publish nothing.
        for rec in self.jobs()? {
            let JobSpec::Checkpoint {
                db: jdb,
                source: Source::Segments(_),
                ..
            } = &rec.spec
            else {
                continue;
            };
            if jdb == db && rec.state.is_unfinished() {
                self.cancel(rec.id)?;
                if rec.state == JobState::Queued && rec.phase != Phase::New {
                    // Queued for a retry: it would run again later.
                    self.end_queued(rec.id)?;
                }
            }
        }
        let lock = self.db_lock(db);
        let _publishing = lock.lock().await;
        let latest = self.latest_state(db).await?.ok_or_else(|| no_wal(db))?;
        let wal = latest.state.wal.clone();
        let newest = latest.state.pages.as_ref().and_then(|p| p.lsn);
        let pages = self.page_refs(db, &latest, after).await?;
        let cut = wal::plan_tail(wal.as_ref(), &pages, newest, after, force).map_err(|e| {
            CairnError::Wal {
                db: db.clone(),
                source: e,
            }
        })?;
        let mut next = latest.state.clone();
        if let Some(mut w) = wal {
            let keep = w.segments.len() - cut.drop;
            w.segments.truncate(keep);
            w.end = cut.new_end;
            if cut.drop > 0 {
                w.last_name = w.segments.last().map(|s| s.name.clone());
            }
            next.wal = Some(w);
        }
        if let Some(back) = cut.pages_back_to {
            next.pages = match back {
                Some(p) => self.state(db, Some(p.generation)).await?.state.pages,
                None => None,
            };
        }
        self.publish_truncation(db, &latest, next, cut.drop as u64)
            .await
    }

    async fn publish_truncation(
        &self,
        db: &DbId,
        latest: &GenerationState,
        next: cairn_core::DbState,
        dropped: u64,
    ) -> Result<TruncateReport, CairnError> {
        let report = |generation: Option<u64>, s: &cairn_core::DbState| {
            let w: Option<&WalState> = s.wal.as_ref();
            TruncateReport {
                db: db.to_string(),
                generation,
                segments_dropped: dropped,
                wal_start: w.map_or(0, |w| w.start.0),
                wal_end: w.map_or(0, |w| w.end.0),
                page_lsn: s.pages.as_ref().and_then(|p| p.lsn).map(|l| l.0),
            }
        };
        if next == latest.state {
            return Ok(report(None, &next));
        }
        self.check_store().await?;
        let generation = latest.manifest.generation.next();
        let manifest = Publisher {
            tenant: &self.cfg.tenant,
            db,
            writer: &self.writer,
            created_unix_ms: self.env.now_ms(),
            job: None,
        }
        .manifest(generation, Some(latest), next.clone());
        cairn_state::publish(&self.state, &self.store, &manifest).await?;
        let r = report(Some(generation.0), &next);
        self.remember(
            db,
            &GenerationState {
                manifest,
                state: next,
            },
        );
        Ok(r)
    }
}
