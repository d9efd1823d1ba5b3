//! Verifying a generation: every referenced blob exists with a size a blob of its payload
//! can have (the exact size of a compressed blob is in its header); deep mode re-reads
//! every blob and re-checks both layers (a compressed body's stored CRC64, then the
//! payload's CRC64 and XXH3-128 after decompression), and for SQLite sources restores into
//! scratch and runs `PRAGMA integrity_check`.
//!
//! Contract: problems are collected, not raised: each names the object key, and the report
//! is `ok` only without any. Nothing is written but the deep SQLite check's scratch copy,
//! removed when the check ends. Progress (blobs checked, and in deep mode their payload
//! bytes) is recorded in the job after each blob, unsynced. Crash: a verify job resumes by
//! running again from the start. Retries: the store's. Cancellation: dropping the future.

use std::time::Instant;

use cairn_core::delta::DeltaView;
use cairn_core::{keys, BlobRef, DbId, Generation, SourceKind};
use futures::stream::{self, StreamExt};
use serde::Serialize;

use crate::queue::{Job, Phase, Progress};
use crate::{CairnError, Checkpointer, JobOutcome, JobRun};

/// What a verify found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Database.
    pub db: String,
    /// Generation checked.
    pub generation: u64,
    /// Whether everything checked out.
    pub ok: bool,
    /// Whether blobs were re-read and checksummed.
    pub deep: bool,
    /// Distinct blobs checked.
    pub blobs_checked: u64,
    /// Object bytes re-read (deep mode): as stored, so compressed blobs count their
    /// compressed size.
    pub bytes_read: u64,
    /// One line per problem, each naming the blob's key.
    pub errors: Vec<String>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// What a delta blob is checked against.
struct DeltaCtx {
    chunk: u64,
    base_crc64: u64,
    page_size: u32,
}

impl Checkpointer {
    /// Verifies `generation` of `db` (latest if `None`), as a job.
    pub async fn verify(
        &self,
        db: &DbId,
        generation: Option<Generation>,
        deep: bool,
    ) -> Result<VerifyReport, CairnError> {
        self.verify_job(db, generation, deep).await
    }

    /// [`Checkpointer::verify`] as a handle: the job is enqueued at once, its progress can
    /// be watched (blobs checked, and in deep mode their bytes), and it runs when the
    /// handle is awaited.
    pub fn verify_job(
        &self,
        db: &DbId,
        generation: Option<Generation>,
        deep: bool,
    ) -> JobRun<'_, VerifyReport> {
        let job = self.enqueue(crate::queue::JobSpec::Verify {
            db: db.clone(),
            generation: generation.map(|g| g.0),
            deep,
        });
        JobRun::new(self, job, "verify", |o| match o {
            JobOutcome::Verify(r) => Some(r),
            _ => None,
        })
    }

    pub(crate) async fn run_verify(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        generation: Option<u64>,
        deep: bool,
    ) -> Result<VerifyReport, CairnError> {
        // Held in the store while it reads, like a restore.
        let gs = self.state(db, generation.map(Generation)).await?;
        let g = gs.manifest.generation.0;
        let lease = self.take_store_lease(db, job.id().0, vec![g]).await?;
        self.check_live(db, &[g]).await?;
        let result = self.verify_now(job, db, Some(Generation(g)), deep).await;
        lease.release().await;
        let report = result?;
        job.update(
            |r| {
                r.generation = Some(report.generation);
                r.phase = Phase::Checked;
            },
            &[],
        )?;
        Ok(report)
    }

    /// Checks every blob of the generation, recording progress in `job` after each: blobs,
    /// and in deep mode their payload bytes (the report counts the bytes as stored).
    pub(crate) async fn verify_now(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        generation: Option<Generation>,
        deep: bool,
    ) -> Result<VerifyReport, CairnError> {
        let started = Instant::now();
        let gs = self.state(db, generation).await?;
        let tenant = &self.cfg.tenant;
        // Every distinct blob, with what a delta must be checked against.
        let mut blobs: Vec<(BlobRef, Option<DeltaCtx>)> = Vec::new();
        if let Some(p) = &gs.state.pages {
            for c in &p.chunks {
                blobs.push((c.base, None));
                for d in &c.deltas {
                    let ctx = DeltaCtx {
                        chunk: c.index,
                        base_crc64: c.base.crc64,
                        page_size: p.page_size,
                    };
                    blobs.push((*d, Some(ctx)));
                }
            }
        }
        if let Some(w) = &gs.state.wal {
            blobs.extend(w.segments.iter().map(|s| (s.blob, None)));
        }
        blobs.sort_by_key(|(b, _)| b.name());
        blobs.dedup_by_key(|(b, _)| b.name());
        let blobs = &blobs;
        let progress = Progress {
            done: 0,
            total: blobs.len() as u64,
            bytes_done: 0,
            bytes_total: match deep {
                true => blobs.iter().map(|(b, _)| b.len).sum(),
                false => 0,
            },
        };
        job.progress(|r| r.progress = progress, &[])?;
        let mut checks = stream::iter(0..blobs.len())
            .map(|i| async move {
                let (b, delta) = &blobs[i];
                let key = keys::blob_key(tenant, db, b);
                let read = if deep { b.len } else { 0 };
                let check = if deep {
                    match delta {
                        None => match self.store.get_blob(&key, b, |_, _| Ok(())).await {
                            Ok(d) => Ok(d.object_len),
                            Err(e) => Err(format!("{key}: {e}")),
                        },
                        Some(ctx) => {
                            match crate::restore::fetch_blob_decoded(&self.store, &key, b).await {
                                Ok((payload, decoded)) => DeltaView::parse(
                                    &key,
                                    &payload,
                                    ctx.chunk,
                                    ctx.base_crc64,
                                    ctx.page_size,
                                )
                                .map(|_| decoded.object_len)
                                .map_err(|e| format!("{key}: {e}")),
                                Err(e) => Err(format!("{key}: {e}")),
                            }
                        }
                    }
                } else {
                    match self.store.head(&key).await {
                        Ok(Some(size)) if b.plausible_object_len(size) => Ok(0),
                        Ok(Some(size)) => Err(format!(
                            "{key}: size {size} bytes, which no blob of a {}-byte payload has \
                             ({} uncompressed, at most {} in format version 2)",
                            b.len,
                            cairn_core::blob::plain_object_len(b.len),
                            cairn_core::blob::max_object_len(b.len)
                        )),
                        Ok(None) => Err(format!("{key}: missing")),
                        Err(e) => Err(format!("{key}: {e}")),
                    }
                };
                (read, check)
            })
            .buffer_unordered(self.cfg.download_concurrency);
        let mut results = Vec::with_capacity(blobs.len());
        while let Some((read, check)) = checks.next().await {
            job.progress(
                |r| {
                    r.progress.done += 1;
                    r.progress.bytes_done += read;
                },
                &[],
            )?;
            results.push(check);
        }
        drop(checks);
        let mut report = VerifyReport {
            db: db.to_string(),
            generation: gs.manifest.generation.0,
            deep,
            blobs_checked: blobs.len() as u64,
            ..Default::default()
        };
        for c in results {
            match c {
                Ok(n) => report.bytes_read += n,
                Err(e) => report.errors.push(e),
            }
        }
        report.errors.sort();
        let sqlite = gs
            .state
            .pages
            .as_ref()
            .filter(|p| p.origin == SourceKind::Sqlite);
        if let (true, true, Some(pages)) = (deep, report.errors.is_empty(), sqlite) {
            let job = cairn_core::JobId(self.env.next_u64());
            let scratch = self.scratch.job(job)?;
            let target = scratch.dir().join("verify.sqlite");
            // The restored copy is scratch like any staged blob: it must fit the budgets.
            let outcome = async {
                let _space = scratch.reserve(pages.len)?;
                let parts = crate::restore::Parts {
                    pages: Some(pages),
                    segments: &[],
                    layout: crate::restore::Layout::File,
                };
                self.restore_parts(&gs, &parts, &target, None).await?;
                let t = target.clone();
                tokio::task::spawn_blocking(move || cairn_executor::sqlite_integrity_check(&t))
                    .await
                    .map_err(|source| CairnError::Join {
                        job: job.to_string(),
                        what: "PRAGMA integrity_check",
                        source,
                    })?
                    .map_err(CairnError::from)
            }
            .await;
            self.scratch.remove_job(job)?;
            for finding in outcome? {
                report.errors.push(format!(
                    "PRAGMA integrity_check on restored generation {}: {finding}",
                    gs.manifest.generation
                ));
            }
        }
        report.ok = report.errors.is_empty();
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }
}
