//! Restoring a generation: parallel verified reads assembled beside the target, then one
//! rename over it.

use std::path::Path;
use std::time::Instant;

use cairn_core::{keys, DbId, Generation, Manifest, ManifestBody};
use cairn_executor::{DirAssembler, FileAssembler};
use futures::stream::{self, TryStreamExt};
use serde::Serialize;

use crate::{CairnError, Checkpointer};

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
    /// sources, a directory of segment files for segment sources.
    pub async fn restore(
        &self,
        db: &DbId,
        generation: Option<Generation>,
        to: &Path,
    ) -> Result<RestoreReport, CairnError> {
        let started = Instant::now();
        let m = self.manifest(db, generation).await?;
        let mut report = self.restore_manifest(&m, to).await?;
        report.duration_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    pub(crate) async fn restore_manifest(
        &self,
        m: &Manifest,
        to: &Path,
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
        match &m.body {
            ManifestBody::Pages(p) => {
                let asm = FileAssembler::create(to, p.len)?;
                let result = stream::iter(p.chunks.iter().map(Ok::<_, CairnError>))
                    .map_ok(|c| {
                        let asm = &asm;
                        async move {
                            let offset = c.index * p.chunk_size;
                            let key = keys::blob_key(tenant, db, &c.base);
                            self.store
                                .get_blob(&key, &c.base, |off, bytes| {
                                    asm.write_at(offset + off, bytes)
                                })
                                .await?;
                            Ok::<u64, CairnError>(1 + c.deltas.len() as u64)
                        }
                    })
                    .try_buffer_unordered(concurrency)
                    .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
                    .await;
                match result {
                    Ok(n) => {
                        report.blobs_read = n;
                        asm.commit()?;
                    }
                    Err(e) => {
                        asm.abort();
                        return Err(e);
                    }
                }
                report.bytes_written = p.len;
            }
            ManifestBody::Segments(s) => {
                let asm = DirAssembler::create(to)?;
                stream::iter(s.segments.iter().map(Ok::<_, CairnError>))
                    .map_ok(|e| {
                        let asm = &asm;
                        async move {
                            let w = asm.file(&e.name, e.len)?;
                            let key = keys::blob_key(tenant, db, &e.blob);
                            self.store
                                .get_blob(&key, &e.blob, |off, bytes| w.write_at(off, bytes))
                                .await?;
                            w.finish()?;
                            Ok::<(), CairnError>(())
                        }
                    })
                    .try_buffer_unordered(concurrency)
                    .try_collect::<Vec<()>>()
                    .await?;
                asm.commit()?;
                report.blobs_read = s.segments.len() as u64;
                report.bytes_written = s.segments.iter().map(|e| e.len).sum();
            }
        }
        Ok(report)
    }
}
