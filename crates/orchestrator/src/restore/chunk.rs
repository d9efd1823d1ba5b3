//! Restoring one chunk of a page file: its base and delta chain, verified, composed into
//! place in the assembly file. Stateless: the caller syncs and records each finished chunk.

use cairn_core::delta::DeltaView;
use cairn_core::{keys, BlobRef, ChunkState, DbId, PagesState, TenantId};
use cairn_executor::FileAssembler;
use cairn_remote_store::RemoteStore;

use crate::{CairnError, Checkpointer};

/// Fetches a whole blob into memory, verified.
pub(crate) async fn fetch_blob(
    store: &RemoteStore,
    key: &str,
    blob: &BlobRef,
) -> Result<Vec<u8>, CairnError> {
    let mut buf = Vec::with_capacity(usize::try_from(blob.len).unwrap_or(0));
    store
        .get_blob(key, blob, |off, bytes| {
            // A re-read after a damaged transfer starts again from offset 0.
            buf.truncate(usize::try_from(off).unwrap_or(usize::MAX));
            buf.extend_from_slice(bytes);
            Ok(())
        })
        .await?;
    Ok(buf)
}

impl Checkpointer {
    /// Restores one chunk: the base streamed into place (clamped to the chunk's length),
    /// its deltas fetched concurrently and applied oldest first. Returns blobs read.
    pub(super) async fn restore_chunk(
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
}
