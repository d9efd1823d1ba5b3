//! The engine's side of the Cairn contract, through the public `cairn-orchestrator` API
//! only: ship sealed segments, take page checkpoints at LSNs with the dirty-page tracker,
//! delete local WAL below the watermark, and drop old segments from the store.
//!
//! Contract (one process per state directory, one database, calls in sequence):
//! - [`Replica::open`] resumes every unfinished Cairn job (resuming is explicit).
//! - [`Replica::ship`] checkpoints the segment directory with each file's LSN range when
//!   a sealed segment is not published yet.
//! - [`Replica::checkpoint_pages`] flushes the page file at the current end of the WAL
//!   (a record boundary) and publishes it as a page checkpoint at that LSN, so the page
//!   checkpoint holds exactly the records below its LSN. Before writing the file it runs
//!   any unfinished page checkpoint of the database to its end: Cairn reads the file when
//!   a job plans, and a job re-planned after the file changed would publish the new pages
//!   under its old LSN. The file is not written while a checkpoint of it runs (calls are
//!   sequential), as Cairn requires of a raw page file.
//! - Every page checkpoint passes the tracker, which Cairn drains and gives back if the job
//!   fails. The tracker is in memory and misses pages written before a crash but not
//!   checkpointed; Cairn knows it is a new tracker and compares page digests for the first
//!   checkpoint made with it.
//! - [`Replica::trim_local`] deletes local segments ending at or below
//!   `min(watermark, page file LSN, published stream end)`: the watermark honours leases,
//!   local recovery needs the WAL from its own page file's LSN, and a segment that was
//!   never shipped must not go even when a page checkpoint passes it (the stream would
//!   then have a gap that no later segment checkpoint can bridge).
//! - [`Replica::trim_store`] drops from the store the segments below the published page
//!   checkpoint `retain` checkpoints before the newest (found by walking the generations
//!   back), so the store can restore every LSN from that checkpoint on.
//!
//! What a crash leaves: whatever Cairn leaves (a job that [`Replica::open`] resumes, or a
//! truncation published or not); local deletions happen only after what they depend on is
//! published, so a crash between the two only leaves files to delete next time.
//! Retries: Cairn's (store requests, transient job failures); a failed call returns the
//! error and may be made again. Cancellation: dropping a future is a crash of that call.

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_orchestrator::{
    CheckpointOptions, Checkpointer, Config, DbId, HeadOptions, JobSpec, Lsn, Source,
};

use crate::engine::Kv;
use crate::error::{invalid, Result};
use crate::page::PAGE_SIZE;

/// A job [`Replica::open`] resumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// Its id.
    pub job: String,
    /// Its error, if it did not complete.
    pub error: Option<String>,
}

/// A segment checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shipped {
    /// The generation published.
    pub generation: u64,
    /// Segments it added.
    pub segments: u64,
    /// The published stream's end now.
    pub through: u64,
}

/// A page checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageCheckpoint {
    /// The generation published.
    pub generation: u64,
    /// The LSN it covers.
    pub lsn: u64,
    /// Pages the flush wrote.
    pub pages_written: u64,
    /// Pages Cairn found changed.
    pub pages_dirty: u64,
    /// Bytes sent to the store.
    pub bytes_uploaded: u64,
    /// Whether the tracker's pages were used (otherwise Cairn compared digests).
    pub tracked: bool,
}

/// A deletion of local WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalTrim {
    /// The watermark Cairn gave.
    pub watermark: u64,
    /// What the engine deleted up to.
    pub limit: u64,
    /// Segments deleted.
    pub deleted: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// A head truncation of the store's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreTrim {
    /// The generation published (`None`: nothing to drop).
    pub generation: Option<u64>,
    /// The LSN asked for.
    pub before: u64,
    /// Segments dropped.
    pub dropped: u64,
    /// The stream's start afterwards.
    pub wal_start: u64,
}

/// The engine's connection to Cairn.
pub struct Replica {
    cp: Checkpointer,
    db: DbId,
    /// The published stream's end, as last learned (`None`: no stream yet).
    shipped_end: Option<u64>,
    /// The newest published page checkpoint's LSN.
    page_lsn: Option<u64>,
    /// The newest LSN a head truncation was asked for (nothing below it is left).
    truncated_before: Option<u64>,
    truncate_timeout: Duration,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("db", &self.db)
            .field("shipped_end", &self.shipped_end)
            .field("page_lsn", &self.page_lsn)
            .finish()
    }
}

impl Replica {
    /// Opens the checkpointer, resumes its unfinished jobs and learns the published state.
    pub async fn open(cfg: Config, db: DbId) -> Result<(Replica, Vec<Resumed>)> {
        let cp = Checkpointer::open(cfg)?;
        let resumed = cp
            .resume()
            .await?
            .into_iter()
            .map(|(id, r)| Resumed {
                job: id.to_string(),
                error: r.err().map(|e| e.to_string()),
            })
            .collect();
        let w = cp.watermark(&db).await?;
        let rep = Replica {
            cp,
            db,
            shipped_end: w.wal_end,
            page_lsn: w.page_lsn,
            truncated_before: None,
            truncate_timeout: Duration::from_secs(10),
        };
        Ok((rep, resumed))
    }

    /// The checkpointer.
    pub fn checkpointer(&self) -> &Checkpointer {
        &self.cp
    }

    /// The database.
    pub fn db(&self) -> &DbId {
        &self.db
    }

    /// The published stream's end, as last learned.
    pub fn shipped_end(&self) -> Option<u64> {
        self.shipped_end
    }

    /// Publishes the sealed segments the store lacks; `None` if it has them all.
    pub async fn ship(&mut self, kv: &Kv) -> Result<Option<Shipped>> {
        let shipped = self.shipped_end.unwrap_or(0);
        let sealed = kv.wal().sealed();
        let new = sealed.iter().filter(|s| s.end() > shipped).count() as u64;
        let Some(last) = sealed.last().filter(|_| new > 0) else {
            return Ok(None);
        };
        // Every file of the directory gets its range (Cairn wants all or none).
        let ranges: BTreeMap<String, (Lsn, Lsn)> = sealed
            .iter()
            .map(|s| (s.name.clone(), (Lsn(s.start), Lsn(s.end()))))
            .collect();
        let opts = CheckpointOptions {
            segment_lsns: Some(ranges),
            ..CheckpointOptions::default()
        };
        let source = Source::Segments(kv.wal().segments_dir().to_path_buf());
        let report = self.cp.checkpoint_with(&self.db, &source, &opts).await?;
        self.shipped_end = Some(last.end());
        Ok(Some(Shipped {
            generation: report.generation,
            segments: new,
            through: last.end(),
        }))
    }

    /// Runs this database's unfinished page checkpoints to their end (see the module
    /// header); refuses to go on while one stays unfinished.
    async fn finish_page_jobs(&mut self) -> Result<()> {
        for rec in self.cp.jobs()? {
            let ours = matches!(&rec.spec, JobSpec::Checkpoint { db, source: Source::Pages { .. }, .. } if *db == self.db);
            if !ours || !rec.state.is_unfinished() {
                continue;
            }
            if let Ok(cairn_orchestrator::JobOutcome::Checkpoint(_)) = self.cp.run_job(rec.id).await
            {
                self.page_lsn = self.cp.watermark(&self.db).await?.page_lsn;
            }
            if self.cp.job(rec.id)?.state.is_unfinished() {
                return Err(invalid(
                    format!("page checkpoint job {}", rec.id),
                    "it is unfinished; the page file is not written until it ends",
                ));
            }
        }
        Ok(())
    }

    /// Flushes the page file at the end of the WAL and publishes it as a page checkpoint
    /// at that LSN; `None` if the newest page checkpoint already is at that LSN.
    pub async fn checkpoint_pages(&mut self, kv: &mut Kv) -> Result<Option<PageCheckpoint>> {
        self.finish_page_jobs().await?;
        if self.page_lsn == Some(kv.lsn()) && kv.flushed_lsn() == kv.lsn() {
            return Ok(None);
        }
        let flushed = kv.flush()?;
        let opts = CheckpointOptions {
            lsn: Some(Lsn(flushed.lsn)),
            tracker: Some(std::sync::Arc::clone(kv.tracker())),
            ..CheckpointOptions::default()
        };
        let source = Source::Pages {
            path: kv.page_file().to_path_buf(),
            page_size: PAGE_SIZE as u32,
        };
        let report = self.cp.checkpoint_with(&self.db, &source, &opts).await?;
        self.page_lsn = Some(flushed.lsn);
        Ok(Some(PageCheckpoint {
            generation: report.generation,
            lsn: flushed.lsn,
            pages_written: flushed.pages,
            pages_dirty: report.pages_dirty,
            bytes_uploaded: report.bytes_uploaded,
            tracked: report.dirty_used,
        }))
    }

    /// Deletes the local segments nothing needs any more (see the module header); asks
    /// Cairn for the watermark only when some segment could go.
    pub async fn trim_local(&mut self, kv: &mut Kv) -> Result<Option<LocalTrim>> {
        let candidate = kv.flushed_lsn().min(self.shipped_end.unwrap_or(0));
        if !kv.wal().sealed().iter().any(|s| s.end() <= candidate) {
            return Ok(None);
        }
        let w = self.cp.watermark(&self.db).await?;
        self.shipped_end = w.wal_end;
        let limit = w
            .watermark
            .min(kv.flushed_lsn())
            .min(w.wal_end.unwrap_or(0));
        let (deleted, bytes) = kv.delete_wal_through(limit)?;
        Ok(Some(LocalTrim {
            watermark: w.watermark,
            limit,
            deleted,
            bytes,
        }))
    }

    /// The LSN of the published page checkpoint `back` checkpoints before the newest
    /// (0: the newest).
    pub async fn page_checkpoint_back(&self, back: usize) -> Result<Option<u64>> {
        let all = self.cp.page_checkpoints(&self.db).await?;
        Ok(all.iter().rev().nth(back).map(|p| p.lsn.0))
    }

    /// Drops from the store the segments that end at or below the published page
    /// checkpoint `retain` checkpoints before the newest; `None` if there is no such
    /// checkpoint, it was done already, or the published stream does not reach it.
    pub async fn trim_store(&mut self, retain: usize) -> Result<Option<StoreTrim>> {
        let Some(before) = self.page_checkpoint_back(retain).await? else {
            return Ok(None);
        };
        if self.truncated_before.is_some_and(|t| t >= before)
            || self.shipped_end.is_none_or(|e| e < before)
        {
            return Ok(None);
        }
        let opts = HeadOptions {
            timeout: self.truncate_timeout,
            cancel: false,
            force: false,
        };
        let r = self.cp.truncate_head(&self.db, Lsn(before), &opts).await?;
        self.truncated_before = Some(before);
        Ok(Some(StoreTrim {
            generation: r.generation,
            before,
            dropped: r.segments_dropped,
            wal_start: r.wal_start,
        }))
    }
}
