//! The fault wrapper's multipart paths: a [`MultipartUpload`] whose parts and completion
//! meet the same faults as single requests, and [`MultipartStore`] for a [`FaultStore`]
//! built with [`FaultStore::with_multipart`]. Same place in the stack, crash behaviour and
//! cancellation as the wrapper itself (see the parent module).

use std::sync::Arc;

use async_trait::async_trait;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, MultipartUpload, PutPayload, PutResult, UploadPart};

use super::{bump, injected, FaultStore, State};
use crate::classify::Cause;

/// A multipart upload through the `ObjectStore` API with faults on each part.
pub(super) struct FaultUpload {
    pub(super) inner: Box<dyn MultipartUpload>,
    pub(super) location: String,
    pub(super) state: Arc<State>,
}

impl std::fmt::Debug for FaultUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultUpload")
            .field("location", &self.location)
            .finish()
    }
}

#[async_trait]
impl MultipartUpload for FaultUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        // Decided when the part is sent (first polled), so a part whose upload is dropped
        // before it starts is neither sent nor counted as failed.
        let state = Arc::clone(&self.state);
        let location = self.location.clone();
        let part = self.inner.put_part(data);
        Box::pin(async move {
            if state.roll(state.cfg.transient_errors) {
                bump(&state.counts.transient_errors);
                return Err(injected(
                    Cause::Throttled,
                    format!(
                        "injected transient error: part upload of {location} failed before it was sent"
                    ),
                ));
            }
            part.await
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.state
            .before("complete multipart upload", &self.location)
            .await?;
        let r = self.inner.complete().await;
        self.state
            .after_write("complete multipart upload", &self.location, r)
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

impl FaultStore {
    fn mp(&self) -> object_store::Result<&Arc<dyn MultipartStore>> {
        self.multipart
            .as_ref()
            .ok_or_else(|| object_store::Error::NotImplemented {
                operation: "MultipartStore (FaultStore built without with_multipart)".into(),
                implementer: "FaultStore".into(),
            })
    }
}

#[async_trait]
impl MultipartStore for FaultStore {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        let mp = self.mp()?;
        self.state
            .before("create multipart upload", path.as_ref())
            .await?;
        mp.create_multipart(path).await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        let mp = self.mp()?;
        self.state.before("upload part", path.as_ref()).await?;
        let r = mp.put_part(path, id, part_idx, data).await;
        self.state.after_write("upload part", path.as_ref(), r)
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        let mp = self.mp()?;
        self.state
            .before("complete multipart upload", path.as_ref())
            .await?;
        let r = mp.complete_multipart(path, id, parts).await;
        self.state
            .after_write("complete multipart upload", path.as_ref(), r)
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        let mp = self.mp()?;
        self.state
            .before("abort multipart upload", path.as_ref())
            .await?;
        mp.abort_multipart(path, id).await
    }
}
