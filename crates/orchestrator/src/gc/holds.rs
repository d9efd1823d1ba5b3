//! What keeps generations alive beyond retention, held in the store so every machine
//! sees it: operator pins (`pins/<generation>.pin`) and the leases restores and verifies
//! take (`leases/<id>.lease`).
//!
//! Contract: a pin keeps its generation until it is removed. A store lease keeps its
//! generations while it is in force: its object's timestamp on the store's own clock plus
//! its TTL is past the store's "now" (read by writing `gc/clock`), so machines' clocks do
//! not matter. A restore renews its lease as it goes and removes it when it ends; one that
//! outlives its lease may find blobs gone and fails naming the generation. Crash: a lease
//! left by a dead process lapses by its TTL. Retries: the store's. Cancellation: dropping
//! the future (a lease being written may then exist and lapse).

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use cairn_core::{keys, DbId, Generation, TenantId};
use cairn_remote_store::RemoteStore;
use serde::{Deserialize, Serialize};

use crate::{CairnError, Checkpointer};

/// How long a restore's lease lasts without renewal.
pub(crate) const RESTORE_LEASE: Duration = Duration::from_secs(600);

/// A pin, as the store holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// The pinned generation.
    pub generation: u64,
    /// The operator's note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// When it was pinned (the pinning process's clock, ms since the Unix epoch).
    pub created_unix_ms: u64,
}

/// A lease in the store, as GC reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoreLeaseBody {
    /// Generations it keeps.
    pub generations: Vec<u64>,
    /// How long it lasts after its object was last written, ms.
    pub ttl_ms: u64,
    /// Who holds it (the writer identity and job).
    pub holder: String,
}

/// A lease in force, found by GC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeldLease {
    pub id: String,
    pub generations: Vec<u64>,
}

/// A lease this process holds in the store, renewed every third of its TTL by a
/// background task until it is released (or dropped, after which it lapses).
pub(crate) struct StoreLease {
    store: RemoteStore,
    key: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl Drop for StoreLease {
    /// A lease dropped without [`StoreLease::release`] (its job was cancelled, or failed
    /// before it could release) stops being renewed and is removed in the background; if
    /// that fails too, it lapses by its TTL. Either way GC only ever keeps more.
    fn drop(&mut self) {
        self.renewal.abort();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (store, key) = (self.store.clone(), std::mem::take(&mut self.key));
            rt.spawn(async move { remove(&store, &key).await });
        }
    }
}

async fn remove(store: &RemoteStore, key: &str) {
    if key.is_empty() {
        return;
    }
    if let Err(e) = store.delete(key).await {
        tracing::warn!(lease = %key, error = %e, "could not remove a restore lease; it lapses by its TTL");
    }
}

impl StoreLease {
    /// Removes it. Never fails the work it protected: a lease that cannot be removed
    /// lapses by its TTL (and is logged).
    pub(crate) async fn release(mut self) {
        self.renewal.abort();
        let key = std::mem::take(&mut self.key);
        remove(&self.store, &key).await;
    }
}

impl Checkpointer {
    /// Pins `generation` of `db` (kept by every garbage collection until unpinned).
    pub async fn pin(
        &self,
        db: &DbId,
        generation: Generation,
        note: Option<String>,
    ) -> Result<Pin, CairnError> {
        // Refuses an unknown or expired generation, naming it.
        self.state(db, Some(generation)).await?;
        let pin = Pin {
            generation: generation.0,
            note,
            created_unix_ms: self.env.now_ms(),
        };
        let body = serde_json::to_vec(&pin).map_err(|source| CairnError::Encode {
            job: format!("pin of {db}"),
            item: "pin",
            source,
        })?;
        let key = keys::pin_key(&self.cfg.tenant, db, generation);
        self.store.put_bytes(&key, Bytes::from(body)).await?;
        Ok(pin)
    }

    /// Removes the pin of `generation`; an unknown pin is an error naming it.
    pub async fn unpin(&self, db: &DbId, generation: Generation) -> Result<(), CairnError> {
        let key = keys::pin_key(&self.cfg.tenant, db, generation);
        if self.store.head(&key).await?.is_none() {
            return Err(CairnError::UnknownPin {
                db: db.clone(),
                generation,
            });
        }
        Ok(self.store.delete(&key).await?)
    }

    /// The pinned generations of `db`.
    pub async fn pins(&self, db: &DbId) -> Result<BTreeSet<u64>, CairnError> {
        let listed = self
            .store
            .list(&keys::pins_prefix(&self.cfg.tenant, db))
            .await?;
        Ok(listed
            .iter()
            .filter_map(|o| keys::parse_pin_key(&o.key))
            .map(|g| g.0)
            .collect())
    }

    /// Takes a lease in the store on `generations` for the job `id`.
    pub(crate) async fn take_store_lease(
        &self,
        db: &DbId,
        id: u64,
        generations: Vec<u64>,
    ) -> Result<StoreLease, CairnError> {
        let body = StoreLeaseBody {
            generations,
            ttl_ms: RESTORE_LEASE.as_millis() as u64,
            holder: format!("{}/{id:016x}", self.writer),
        };
        let body = Bytes::from(
            serde_json::to_vec(&body).map_err(|source| CairnError::Encode {
                job: format!("{id:016x}"),
                item: "store lease",
                source,
            })?,
        );
        let key = keys::store_lease_key(&self.cfg.tenant, db, id);
        self.store.put_bytes(&key, body.clone()).await?;
        let (store, k) = (self.store.clone(), key.clone());
        let renewal = tokio::spawn(async move {
            loop {
                tokio::time::sleep(RESTORE_LEASE / 3).await;
                if let Err(e) = store.put_bytes(&k, body.clone()).await {
                    tracing::warn!(lease = %k, error = %e, "could not renew a restore lease");
                }
            }
        });
        Ok(StoreLease {
            store: self.store.clone(),
            key,
            renewal,
        })
    }

    /// Fails with [`CairnError::Expired`] if the newest generation records any of `gens`
    /// as expired.
    pub(crate) async fn check_live(&self, db: &DbId, gens: &[u64]) -> Result<(), CairnError> {
        if let Some(latest) = self.latest_state(db).await? {
            if let Some(g) = gens.iter().find(|g| latest.state.gc.is_expired(**g)) {
                return Err(CairnError::Expired {
                    db: db.clone(),
                    generation: Generation(*g),
                });
            }
        }
        Ok(())
    }

    /// The store's clock, read by writing a small object and listing it.
    pub(crate) async fn store_now_ms(
        &self,
        tenant: &TenantId,
        db: &DbId,
    ) -> Result<u64, CairnError> {
        let key = keys::gc_clock_key(tenant, db);
        self.store
            .put_bytes(&key, Bytes::from(self.writer.clone()))
            .await?;
        let parent = key.rsplit_once('/').map_or(key.as_str(), |(p, _)| p);
        let listed = self.store.list(&format!("{parent}/")).await?;
        listed
            .iter()
            .find(|o| o.key == key)
            .map(|o| o.last_modified_unix_ms)
            .ok_or_else(|| CairnError::Config {
                what: format!("store clock object {key}"),
                reason: "written but not listed".into(),
            })
    }

    /// The store leases of `db` in force at the store's `now_ms`. An unreadable lease
    /// counts as in force for nothing it names: GC stops rather than guess.
    pub(crate) async fn held_leases(
        &self,
        db: &DbId,
        now_ms: u64,
    ) -> Result<Vec<HeldLease>, CairnError> {
        let listed = self
            .store
            .list(&keys::store_leases_prefix(&self.cfg.tenant, db))
            .await?;
        let mut out = Vec::new();
        for o in listed {
            let bytes = match self.store.get_bytes(&o.key).await {
                Ok(b) => b,
                // Released between the listing and the read.
                Err(cairn_remote_store::StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let body: StoreLeaseBody =
                serde_json::from_slice(&bytes).map_err(|e| CairnError::CorruptJob {
                    job: "gc".into(),
                    item: format!("store lease {}", o.key),
                    reason: e.to_string(),
                })?;
            if o.last_modified_unix_ms.saturating_add(body.ttl_ms) > now_ms {
                out.push(HeldLease {
                    id: o.key.rsplit('/').next().unwrap_or(&o.key).to_string(),
                    generations: body.generations,
                });
            }
        }
        Ok(out)
    }
}
