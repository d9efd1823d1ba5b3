//! The reachability probe: does the store answer at all, right now?
//!
//! Contract: [`RemoteStore::probe`] sends one HEAD of [`READY_PROBE_KEY`] straight to the
//! back end, past the retry, limits and statistics layers, and waits at most its timeout.
//! A found object or a definite "not found" means the store answers; any other error
//! (refused connection, timeout, denied, 5xx) or no answer in time is
//! [`StoreError::Unreachable`], naming the store and, for S3, its endpoint. It is what a
//! readiness check calls; it is not workload, so it is neither counted in
//! [`crate::RemoteStore::stats`] nor held back by the request limits.
//!
//! Crash: the probe writes nothing. Retries: none, on purpose: the caller asks again.
//! Cancellation: dropping the future abandons the request.

use std::time::Duration;

use object_store::ObjectStoreExt;

use crate::{RemoteStore, StoreError};

/// The key the probe HEADs (it need not exist).
pub const READY_PROBE_KEY: &str = "_cairn/ready-probe";

impl RemoteStore {
    /// For an S3 store, the endpoint URL in use (without credentials), when one is
    /// configured; `None` for local, memory and default-AWS stores.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The store's description with its endpoint, as the probe's errors name it.
    pub fn describe_with_endpoint(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("{} (endpoint {e})", self.describe),
            None => self.describe.clone(),
        }
    }

    /// One HEAD straight to the back end, answered within `timeout` (see the module docs).
    pub async fn probe(&self, timeout: Duration) -> Result<(), StoreError> {
        let unreachable = |reason: String| StoreError::Unreachable {
            store: self.describe_with_endpoint(),
            reason,
        };
        let path = self.path(READY_PROBE_KEY);
        let head = self.stack.base.store.head(&path);
        match tokio::time::timeout(timeout, head).await {
            Err(_) => Err(unreachable(format!(
                "no answer within {} ms",
                timeout.as_millis()
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => match self.err("head", READY_PROBE_KEY, e) {
                StoreError::NotFound { .. } => Ok(()),
                e => Err(unreachable(e.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_store_that_answers_not_found_is_reachable_and_a_refused_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let local = RemoteStore::open(&url).unwrap();
        local.probe(Duration::from_secs(2)).await.unwrap();
        assert_eq!(local.stats().requests, 0, "the probe is not counted");

        // Port 1 on loopback refuses connections.
        let mut cfg = crate::StoreConfig::default();
        cfg.s3.endpoint = Some("http://127.0.0.1:1".into());
        cfg.s3.region = Some("us-east-1".into());
        cfg.s3.access_key_id = Some(crate::Secret::new("k"));
        cfg.s3.secret_access_key = Some(crate::Secret::new("s"));
        let dead = RemoteStore::open_with("s3://bucket/p", cfg).unwrap();
        assert_eq!(dead.endpoint(), Some("http://127.0.0.1:1"));
        let e = dead.probe(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(e, StoreError::Unreachable { .. }), "{e:?}");
        let shown = e.to_string();
        assert!(shown.contains("http://127.0.0.1:1"), "{shown}");
        assert!(e.class().is_transient());
    }
}
