//! How a store's layers are put together.
//!
//! Every request of a [`crate::RemoteStore`] passes through the same wrappers, each with one
//! concern, each an `ObjectStore` (and a `MultipartStore` when the store below has one, so
//! part-level uploads take the same path as everything else):
//!
//! ```text
//! RemoteStore logic   verify and re-read, settle lost writes, resume reads, uploads
//!   RetryStore        retry.rs   transient failures of one request, backoff with jitter
//!     LimitStore      limits.rs  request permits, upload and download bandwidth
//!       StatsStore    stats.rs   requests by operation, errors by cause, bytes
//!         FaultStore  fault.rs   injected faults (tests, `fault+` URLs only)
//!           backend   backend.rs S3, local directory, memory
//! ```
//!
//! Why this order: retry outside limits, so a retry sleeping through its backoff holds no
//! permit and no bandwidth; stats inside retry, so every attempt is counted, and inside
//! limits, so a request counts when it is sent rather than while it queues; faults
//! innermost, so everything above sees an injected fault exactly as it would see the real
//! one, and the retry, limit and statistics code under test is the production code.
//!
//! [`Stack::once`] is the same stack without the retry layer. The store logic uses it for
//! work whose unit of retry is more than one request (a streamed read that resumes, a whole
//! small read, a multipart upload without the part-level API, a write settled by reading
//! back); that work runs its own loop on the same retry engine ([`crate::retry::Retry`]), so
//! retries never nest and one budget bounds the attempts.
//!
//! Stateless: building the stack does no I/O.

use std::sync::Arc;

use object_store::multipart::MultipartStore;
use object_store::ObjectStore;

use crate::limits::{LimitStore, Limits};
use crate::retry::{Retry, RetryStore};
use crate::stats::{Stats, StatsStore};
use crate::StoreConfig;

/// A store and, when it has one, its part-level multipart side (one object behind both).
#[derive(Clone)]
pub(crate) struct Layer {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) multipart: Option<Arc<dyn MultipartStore>>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("store", &self.store)
            .field("multipart", &self.multipart.is_some())
            .finish()
    }
}

impl Layer {
    /// `s` as a layer; its multipart side is used only when `has_multipart`.
    pub(crate) fn of<S: ObjectStore + MultipartStore>(s: Arc<S>, has_multipart: bool) -> Self {
        let multipart: Option<Arc<dyn MultipartStore>> =
            if has_multipart { Some(s.clone()) } else { None };
        Self {
            store: s,
            multipart,
        }
    }

    /// A store without a part-level multipart side.
    pub(crate) fn plain(store: Arc<dyn ObjectStore>) -> Self {
        Self {
            store,
            multipart: None,
        }
    }
}

/// The error a wrapper returns for a `MultipartStore` call when the store below has none.
pub(crate) fn no_multipart(wrapper: &str) -> object_store::Error {
    object_store::Error::NotImplemented {
        operation: "MultipartStore (the store below has no part-level multipart API)".into(),
        implementer: wrapper.into(),
    }
}

/// The layers of one store, shared by all its clones.
#[derive(Clone, Debug)]
pub(crate) struct Stack {
    /// Every layer: what single requests go through.
    pub(crate) top: Layer,
    /// Every layer but retry: for work that runs its own retry loop on [`Stack::retry`].
    pub(crate) once: Layer,
    /// The retry engine (the one inside [`Stack::top`]'s retry layer).
    pub(crate) retry: Arc<Retry>,
    /// The counters every layer reports into.
    pub(crate) stats: Arc<Stats>,
    /// The back end alone (no retry, limits or statistics): for the reachability probe
    /// (`probe.rs`), which must answer at once and is not workload.
    pub(crate) base: Layer,
}

impl Stack {
    /// Puts the layers around `base` (the backend, or the fault layer around it), with the
    /// limits and retry bounds of `cfg`; `store` names the store in logs.
    pub(crate) fn build(base: Layer, cfg: &StoreConfig, store: &str) -> Self {
        let stats = Arc::new(Stats::default());
        let counted = StatsStore::wrap(base.clone(), Arc::clone(&stats));
        let once = LimitStore::wrap(counted, Limits::new(cfg));
        let retry = Arc::new(Retry::new(cfg, store.to_string(), Arc::clone(&stats)));
        let top = RetryStore::wrap(once.clone(), Arc::clone(&retry));
        Self {
            top,
            once,
            retry,
            stats,
            base,
        }
    }
}
