//! Restoring a generation: parallel verified reads assembled beside the target, then one
//! rename over it.

use std::path::Path;
use std::time::Instant;

use cairn_core::delta::DeltaView;
use cairn_core::{
    keys, BlobRef, ChunkState, DbId, Generation, Manifest, ManifestBody, PagesState, TenantId,
};
use cairn_executor::{DirAssembler, FileAssembler};
use cairn_remote_store::RemoteStore;
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

/// Fetches a whole blob into memory, verified.
pub(crate) async fn fetch_blob(
    store: &RemoteStore,
    key: &str,
    blob: &BlobRef,
) -> Result<Vec<u8>, CairnError> {
    let mut buf = Vec::with_capacity(usize::try_from(blob.len).unwrap_or(0));
    store
        .get_blob(key, blob, |_, bytes| {
            buf.extend_from_slice(bytes);
            Ok(())
        })
        .await?;
    Ok(buf)
}

impl Checkpointer {
    /// Restores one chunk: the base streamed into place (clamped to the chunk's length),
    /// its deltas fetched concurrently and applied oldest first. Returns blobs read.
    async fn restore_chunk(
        &self,
        tenant: &TenantId,
        db: &DbId,
        p: &PagesState,
        c: &ChunkState,
        asm: &FileAssembler,
    ) -> Result<u64, CairnError> {
        let offset = c.index * p.chunk_size;
        let limit = c.len;
        let base_key = keys::blob_key(tenant, db, &c.base);
        let base = self.store.get_blob(&base_key, &c.base, |off, bytes| {
            if off >= limit {
                return Ok(());
            }
            let n = usize::try_from(limit - off)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            asm.write_at(offset + off, &bytes[..n])
        });
        let deltas = futures::future::try_join_all(c.deltas.iter().map(|d| async move {
            let key = keys::blob_key(tenant, db, d);
            let payload = fetch_blob(&self.store, &key, d).await?;
            Ok::<_, CairnError>((key, payload))
        }));
        let (_, deltas) =
            futures::try_join!(async { base.await.map_err(CairnError::from) }, deltas)?;
        let ps = u64::from(p.page_size);
        for (i, (key, payload)) in deltas.iter().enumerate() {
            let view = DeltaView::parse(key, payload, c.index, c.base.crc64, p.page_size)?;
            if i + 1 == deltas.len() && view.header.chunk_len != c.len {
                return Err(CairnError::Core(cairn_core::CoreError::CorruptBlob {
                    name: key.clone(),
                    reason: format!(
                        "delta says chunk {} is {} bytes long, the manifest says {}",
                        c.index, view.header.chunk_len, c.len
                    ),
                }));
            }
            for (page, bytes) in view.iter() {
                let at = u64::from(page) * ps;
                if at < limit {
                    let n = usize::try_from(limit - at)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    asm.write_at(offset + at, &bytes[..n]).map_err(|e| {
                        cairn_executor::ExecError::Io {
                            op: "write restored page",
                            path: key.clone(),
                            source: e,
                        }
                    })?;
                }
            }
        }
        Ok(1 + c.deltas.len() as u64)
    }

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
                    .map_ok(|c| self.restore_chunk(tenant, db, p, c, &asm))
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
