//! Restoring a generation: parallel verified reads assembled beside the target, then one
//! rename over it.
//!
//! Contract: a restore writes exactly the bytes of the published generation to its target,
//! or leaves the target untouched: everything is assembled in `<target>.cairn-restore`
//! and renamed over the target only when complete and synced. Every blob is verified end to
//! end while it is read, and each delta is checked against its chunk, base and page size
//! before it is applied. Crash: each finished chunk or segment is synced and then recorded
//! as a job item, so a resumed restore reopens the partial file and skips what is recorded;
//! a crash before the rename leaves only the partial file (deleted when the job fails or is
//! cancelled). Retries: the store retries requests and re-reads damaged transfers.
//! Cancellation: checked after each restored chunk or segment.

mod chunk;

pub(crate) use chunk::fetch_blob;

use std::path::Path;
use std::time::Instant;

use std::collections::BTreeSet;

use cairn_core::{keys, DbId, Generation, Manifest, ManifestBody};
use cairn_executor::{DirAssembler, FileAssembler};
use futures::stream::{self, StreamExt};
use serde::Serialize;

use crate::queue::{Item, Job, JobSpec, Phase, Progress};
use crate::{CairnError, Checkpointer, JobOutcome};

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    /// Database.
    pub db: String,
    /// The restored generation.
    pub generation: u64,
    /// `sqlite`, `pages` or `segments`.
    pub kind: &'static str,
    /// Bytes written to the target.
    pub bytes_written: u64,
    /// Blobs read (and verified).
    pub blobs_read: u64,
    /// Where it went.
    pub path: String,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

impl Checkpointer {
    /// Restores `generation` of `db` (the latest if `None`) to `to`: a file for page
    /// sources, a directory of segment files for segment sources. Runs as a job, so an
    /// interrupted restore resumes where it stopped.
    pub async fn restore(
        &self,
        db: &DbId,
        generation: Option<Generation>,
        to: &Path,
    ) -> Result<RestoreReport, CairnError> {
        self.ensure_resumed().await?;
        let to = std::path::absolute(to).map_err(|e| CairnError::Config {
            what: format!("restore target {}", to.display()),
            reason: e.to_string(),
        })?;
        let id = self.enqueue(JobSpec::Restore {
            db: db.clone(),
            generation: generation.map(|g| g.0),
            to,
        })?;
        match self.run_job(id).await? {
            JobOutcome::Restore(r) => Ok(r),
            _ => Err(CairnError::UnexpectedOutcome {
                job: id.to_string(),
                expected: "restore",
            }),
        }
    }

    pub(crate) async fn run_restore(
        &self,
        job: &mut Job<'_>,
        db: &DbId,
        generation: Option<u64>,
        to: &Path,
    ) -> Result<RestoreReport, CairnError> {
        let started = Instant::now();
        // The generation is resolved once, so a resumed "latest" restore stays on it.
        let m = match job.rec().generation {
            Some(g) => self.manifest(db, Some(Generation(g))).await?,
            None => {
                let m = self.manifest(db, generation.map(Generation)).await?;
                job.update(
                    |r| {
                        r.generation = Some(m.generation.0);
                        r.phase = Phase::Planned;
                    },
                    &[],
                )?;
                m
            }
        };
        let mut report = self.restore_manifest(&m, to, Some(job)).await?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Restores a manifest to `to`. With a job, each finished chunk or segment is synced
    /// and recorded, and a resumed job skips what is recorded.
    pub(crate) async fn restore_manifest(
        &self,
        m: &Manifest,
        to: &Path,
        mut job: Option<&mut Job<'_>>,
    ) -> Result<RestoreReport, CairnError> {
        let (tenant, db) = (&m.tenant, &m.db);
        let concurrency = self.cfg.download_concurrency;
        let mut report = RestoreReport {
            db: db.to_string(),
            generation: m.generation.0,
            kind: m.kind().as_str(),
            path: to.display().to_string(),
            ..Default::default()
        };
        let mut done: BTreeSet<u64> = match job.as_deref() {
            Some(j) => j.items()?.restored,
            None => BTreeSet::new(),
        };
        let (units, bytes_total): (u64, u64) = match &m.body {
            ManifestBody::Pages(p) => (p.chunks.len() as u64, p.len),
            ManifestBody::Segments(s) => (
                s.segments.len() as u64,
                s.segments.iter().map(|e| e.len).sum(),
            ),
        };
        macro_rules! record_done {
            ($index:expr, $bytes:expr) => {
                if let Some(j) = job.as_deref_mut() {
                    self.check_cancel(j.id())?;
                    j.update(
                        |r| {
                            r.progress.done += 1;
                            r.progress.bytes_done += $bytes;
                        },
                        &[Item::Restored($index)],
                    )?;
                }
            };
        }
        match &m.body {
            ManifestBody::Pages(p) => {
                let (asm, reopened) = FileAssembler::open(to, p.len, !done.is_empty())?;
                if !reopened {
                    done.clear();
                }
                self.start_restore_progress(&mut job, units, bytes_total, &done, |i| {
                    p.chunks.get(i as usize).map_or(0, |c| c.len)
                })?;
                let todo = p.chunks.iter().filter(|c| !done.contains(&c.index));
                let mut stream = stream::iter(todo)
                    .map(|c| {
                        let asm = &asm;
                        async move {
                            let n = self.restore_chunk(tenant, db, p, c, asm).await?;
                            Ok::<_, CairnError>((c.index, c.len, n))
                        }
                    })
                    .buffer_unordered(concurrency);
                let mut failure = None;
                while let Some(r) = stream.next().await {
                    match r {
                        Ok((index, len, n)) => {
                            report.blobs_read += n;
                            if job.is_some() {
                                asm.sync()?;
                            }
                            record_done!(index, len);
                        }
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                drop(stream);
                if let Some(e) = failure {
                    // Keep the partial file for a resumable job; discard it otherwise.
                    if job.is_none() {
                        asm.abort();
                    }
                    return Err(e);
                }
                self.mark_written(&mut job)?;
                asm.commit()?;
                report.bytes_written = p.len;
            }
            ManifestBody::Segments(s) => {
                let (asm, reopened) = DirAssembler::open(to, !done.is_empty())?;
                if reopened {
                    done.retain(|i| {
                        s.segments
                            .get(*i as usize)
                            .is_some_and(|e| asm.has_file(&e.name, e.len))
                    });
                } else {
                    done.clear();
                }
                self.start_restore_progress(&mut job, units, bytes_total, &done, |i| {
                    s.segments.get(i as usize).map_or(0, |e| e.len)
                })?;
                let todo = s
                    .segments
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !done.contains(&(*i as u64)));
                let mut stream = stream::iter(todo)
                    .map(|(i, e)| {
                        let asm = &asm;
                        async move {
                            let w = asm.file(&e.name, e.len)?;
                            let key = keys::blob_key(tenant, db, &e.blob);
                            self.store
                                .get_blob(&key, &e.blob, |off, bytes| w.write_at(off, bytes))
                                .await?;
                            w.finish()?;
                            Ok::<_, CairnError>((i as u64, e.len))
                        }
                    })
                    .buffer_unordered(concurrency);
                while let Some(r) = stream.next().await {
                    let (i, len) = match r {
                        Ok(v) => v,
                        Err(e) => {
                            drop(stream);
                            if job.is_none() {
                                cairn_executor::assemble::discard_partial(to)?;
                            }
                            return Err(e);
                        }
                    };
                    report.blobs_read += 1;
                    if job.is_some() {
                        asm.sync()?;
                    }
                    record_done!(i, len);
                }
                drop(stream);
                self.mark_written(&mut job)?;
                asm.commit()?;
                report.bytes_written = bytes_total;
            }
        }
        if let Some(j) = job {
            j.update(|r| r.phase = Phase::Committed, &[])?;
        }
        Ok(report)
    }

    fn mark_written(&self, job: &mut Option<&mut Job<'_>>) -> Result<(), CairnError> {
        if let Some(j) = job.as_deref_mut() {
            j.update(|r| r.phase = Phase::Written, &[])?;
        }
        Ok(())
    }

    fn start_restore_progress(
        &self,
        job: &mut Option<&mut Job<'_>>,
        units: u64,
        bytes_total: u64,
        done: &BTreeSet<u64>,
        len_of: impl Fn(u64) -> u64,
    ) -> Result<(), CairnError> {
        let Some(j) = job.as_deref_mut() else {
            return Ok(());
        };
        let progress = Progress {
            done: done.len() as u64,
            total: units,
            bytes_done: done.iter().map(|i| len_of(*i)).sum(),
            bytes_total,
        };
        // A fresh assembly forgets progress recorded against an older file.
        let stale: Vec<Item<'_>> = if done.is_empty() {
            j.items()?
                .restored
                .into_iter()
                .map(|i| Item::Delete(cairn_state::ItemKey::Restored(i)))
                .collect()
        } else {
            Vec::new()
        };
        j.update(|r| r.progress = progress, &stale)
    }
}
