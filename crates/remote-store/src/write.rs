//! Writes that must not be repeated blindly, and the conditional-create check.
//!
//! Contract: [`RemoteStore::create_if_absent`] creates an object only if none exists (the
//! store decides atomically) and says which happened. A conditional create, like a
//! multipart completion (`upload.rs`), cannot simply be sent again when its response is
//! lost: the repeat is refused by our own object (or finds the upload gone), which looks
//! exactly like losing to another writer. [`RemoteStore::settled_write`] is the one place
//! that handles this: it retries the write on the store's retry engine and, once an attempt
//! may have landed unseen, settles the outcome by reading the object back. Nothing is
//! guessed: a read-back that cannot decide leaves the write's error in place.
//! [`RemoteStore::check_conditional_create`] probes whether the store honours conditional
//! create at all (decision record 0012).
//!
//! Crash: a create is one atomic request, so a crash leaves the object or no object; the
//! conditional-create probe may leave one `_cairn/probe-<random>` object if the process dies
//! between creating and deleting it (harmless, never read). Retries: transient failures,
//! on the store's retry engine, through the layers below the retry layer (so retries never
//! nest). Cancellation: dropping the future abandons the request in flight or the backoff;
//! a create already sent may still land, which a later create of the same key settles.

use std::fmt::Debug;
use std::future::Future;

use bytes::Bytes;
use object_store::{PutMode, PutOptions};

use crate::{CreateOutcome, RemoteStore, StoreError};

/// Prefix of the probe objects [`RemoteStore::check_conditional_create`] writes (and removes).
pub const PROBE_PREFIX: &str = "_cairn/probe-";

impl RemoteStore {
    /// Creates an object only if none exists under `key` (the store decides atomically).
    ///
    /// When an attempt fails in a way that may have happened after the object landed (its
    /// response was lost), the outcome is settled by reading the object back: our exact
    /// bytes mean the create took effect ([`CreateOutcome::Created`]; an identical create by
    /// someone else is indistinguishable and equivalent), other bytes mean someone else's
    /// object ([`CreateOutcome::AlreadyExists`]). Nothing is guessed: if the read-back
    /// fails too, the error is returned.
    pub async fn create_if_absent(
        &self,
        key: &str,
        bytes: Bytes,
    ) -> Result<CreateOutcome, StoreError> {
        let path = &self.path(key);
        let op = "conditional create";
        let once = &self.stack.once.store;
        let bytes = &bytes;
        let created = self
            .settled_write(
                op,
                key,
                || async move {
                    let opts = PutOptions {
                        mode: PutMode::Create,
                        ..Default::default()
                    };
                    once.put_opts(path, bytes.clone().into(), opts)
                        .await
                        .map(|_| CreateOutcome::Created)
                        .map_err(|e| self.err(op, key, e))
                },
                // Refused after an attempt whose response was lost: maybe by our own object.
                |e, uncertain| uncertain && matches!(e, StoreError::AlreadyExists { .. }),
                || async move {
                    let found = self.get_bytes(key).await?;
                    Ok(Some(if found == *bytes {
                        CreateOutcome::Created
                    } else {
                        CreateOutcome::AlreadyExists
                    }))
                },
            )
            .await;
        match created {
            Err(StoreError::AlreadyExists { .. }) => Ok(CreateOutcome::AlreadyExists),
            other => other,
        }
    }

    /// A write that must not be repeated blindly (see the module documentation).
    ///
    /// `attempt` makes one attempt. After a failed one, if `may_be_ours(error, uncertain)`
    /// (`uncertain`: an earlier attempt failed in a way that may have landed), `read_back`
    /// looks at the object: `Some(outcome)` settles the write, `None` leaves the error.
    /// Transient errors are retried on the store's budget; when it is spent, one last
    /// read-back settles the write if it can, else the retries are reported exhausted.
    pub(crate) async fn settled_write<T, A, AF, R, RF>(
        &self,
        op: &'static str,
        key: &str,
        mut attempt: A,
        may_be_ours: impl Fn(&StoreError, bool) -> bool,
        read_back: R,
    ) -> Result<T, StoreError>
    where
        T: Debug,
        A: FnMut() -> AF,
        AF: Future<Output = Result<T, StoreError>>,
        R: Fn() -> RF,
        RF: Future<Output = Result<Option<T>, StoreError>>,
    {
        let mut budget = self.stack.retry.budget();
        let mut uncertain = false;
        loop {
            let e = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let looked = may_be_ours(&e, uncertain);
            if looked {
                match read_back().await {
                    Ok(Some(v)) => return Ok(self.settled(op, key, v)),
                    Ok(None) => {}
                    Err(unreadable) if !e.is_retryable() => return Err(unreadable),
                    Err(_) => {}
                }
            }
            if !e.is_retryable() {
                return Err(e);
            }
            uncertain = true;
            if !budget.wait(op, key, &e).await {
                if !looked {
                    if let Ok(Some(v)) = read_back().await {
                        return Ok(self.settled(op, key, v));
                    }
                }
                return Err(budget.exhausted(op, key, e));
            }
        }
    }

    fn settled<T: Debug>(&self, op: &'static str, key: &str, outcome: T) -> T {
        self.stack.stats.resolved_by_read_back();
        tracing::info!(key, op, store = %self.describe, ?outcome, "write settled by reading back");
        outcome
    }

    /// Checks that the store honours conditional create, which publication depends on: a
    /// unique probe object under `_cairn/probe-<random>` is created twice with
    /// create-if-absent, and the second must be refused. The probe is removed afterwards.
    /// Skipped (with a warning) in single-writer mode ([`crate::StoreConfig::single_writer`]).
    ///
    /// Fails with [`StoreError::ConditionalCreateUnsupported`] naming the store.
    pub async fn check_conditional_create(&self) -> Result<(), StoreError> {
        if self.cfg.single_writer {
            tracing::warn!(
                store = %self.describe,
                "single-writer mode: conditional create not checked; only one writer may publish"
            );
            return Ok(());
        }
        let key = format!("{PROBE_PREFIX}{:016x}", rand::random::<u64>());
        let unsupported = |reason: String| StoreError::ConditionalCreateUnsupported {
            store: self.describe.clone(),
            probe: key.clone(),
            reason,
        };
        let first = Bytes::from(format!("cairn conditional-create probe {key} (1)"));
        let second = Bytes::from(format!("cairn conditional-create probe {key} (2)"));
        let outcome = match self.create_if_absent(&key, first).await {
            Ok(CreateOutcome::Created) => match self.create_if_absent(&key, second).await {
                Ok(CreateOutcome::AlreadyExists) => Ok(()),
                Ok(CreateOutcome::Created) => Err(unsupported(
                    "a second create-if-absent of the same key succeeded".into(),
                )),
                Err(e) if e.is_unsupported() => Err(unsupported(e.to_string())),
                Err(e) => Err(e),
            },
            Ok(CreateOutcome::AlreadyExists) => Err(unsupported(
                "create-if-absent of a fresh random key reported that it already exists".into(),
            )),
            Err(e) if e.is_unsupported() => Err(unsupported(e.to_string())),
            Err(e) => Err(e),
        };
        if let Err(e) = self.delete(&key).await {
            tracing::warn!(key, store = %self.describe, error = %e, "could not remove the probe object");
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::fault::FaultConfig;
    use crate::StoreConfig;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn fast_cfg() -> StoreConfig {
        StoreConfig {
            retry_max_attempts: 30,
            retry_initial_backoff_ms: 1,
            retry_max_backoff_ms: 5,
            ..Default::default()
        }
    }

    #[test]
    fn lost_create_response_is_settled_by_reading_back() {
        let fault = FaultConfig {
            lost_write_responses: 1.0,
            ..Default::default()
        };
        let (store, faults) =
            RemoteStore::open_faulty("memory://lost-create", fast_cfg(), fault).unwrap();
        rt().block_on(async {
            let b = Bytes::from_static(b"manifest");
            assert_eq!(
                store.create_if_absent("m/1", b.clone()).await.unwrap(),
                CreateOutcome::Created
            );
            faults.set_enabled(false);
            let other = RemoteStore::open_with("memory://lost-create", fast_cfg()).unwrap();
            assert_eq!(other.get_bytes("m/1").await.unwrap(), b);
            faults.set_enabled(true);
            // Someone else's object under the key: the read-back says so.
            assert_eq!(
                store
                    .create_if_absent("m/1", Bytes::from_static(b"other"))
                    .await
                    .unwrap(),
                CreateOutcome::AlreadyExists
            );
        });
        assert!(store.stats().resolved_by_read_back >= 1);
        assert!(faults.counts().lost_responses >= 1);
    }

    #[test]
    fn startup_check_passes_refuses_and_is_skipped_in_single_writer_mode() {
        rt().block_on(async {
            let good = RemoteStore::open_with("memory://check-good", fast_cfg()).unwrap();
            good.check_conditional_create().await.unwrap();
            assert!(good.list("_cairn").await.unwrap().is_empty());
            let bad_url = "fault+memory://check-bad?ignore_conditional_create=true";
            let bad = RemoteStore::open_with(bad_url, fast_cfg()).unwrap();
            let e = bad.check_conditional_create().await.unwrap_err();
            assert!(
                matches!(e, StoreError::ConditionalCreateUnsupported { .. }),
                "{e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains("memory://check-bad") && msg.contains("single_writer"),
                "{msg}"
            );
            assert!(bad.list("_cairn").await.unwrap().is_empty());
            let cfg = StoreConfig {
                single_writer: true,
                ..fast_cfg()
            };
            let single = RemoteStore::open_with(bad_url, cfg).unwrap();
            single.check_conditional_create().await.unwrap();
        });
    }

    #[test]
    fn a_write_that_cannot_be_settled_keeps_its_error() {
        let cfg = StoreConfig {
            retry_max_attempts: 3,
            ..fast_cfg()
        };
        // Every request fails before it is sent: nothing lands, the read-back finds nothing,
        // and the create reports its exhausted retries (not a guess).
        let (store, faults) =
            RemoteStore::open_faulty("memory://unsettled", cfg, FaultConfig::transient(1.0, 2))
                .unwrap();
        rt().block_on(async {
            let e = store
                .create_if_absent("m/1", Bytes::from_static(b"x"))
                .await
                .unwrap_err();
            assert!(
                matches!(e, StoreError::RetriesExhausted { attempts: 3, .. }),
                "{e}"
            );
            assert!(e.is_retryable());
        });
        assert_eq!(store.stats().resolved_by_read_back, 0);
        assert!(faults.counts().transient_errors >= 3);
    }
}
