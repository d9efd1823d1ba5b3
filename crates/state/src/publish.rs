//! Publishing a generation and importing those published by others.
//!
//! Contract: [`publish`] creates the remote manifest object with a conditional create and
//! only then records it locally, so the local state never claims a generation the store
//! lacks; the loser of a race gets [`StateError::Fenced`] and records nothing.
//! [`fetch_manifest`] reads a generation from the store and records it when the local
//! state lacks it (unless the state is open read-only); [`remote_generations`] lists what the store holds.
//!
//! Crash: after the remote create and before the local batch, the store holds a generation
//! the local state does not; whoever next needs it (the orchestrator looks for the latest
//! generation in the store before it plans) fetches and records it, so nothing is lost or
//! published twice. Retries: a conditional create that reports "already exists" is settled
//! by reading the object back: the same manifest means our earlier attempt won (its
//! response was lost). Requests are retried by the store. Cancellation: dropping a future between
//! the two steps is the crash case above.

use bytes::Bytes;
use cairn_core::{keys, DbId, Generation, Manifest, TenantId};
use cairn_remote_store::{CreateOutcome, RemoteStore};

use crate::catalog::LocalUpdates;
use crate::error::StateError;
use crate::StateDb;

/// Publishes `manifest`: conditional create of its object, then one local batch. Returns
/// the size of the manifest object.
///
/// Fails with [`StateError::Fenced`] if another writer already published that
/// generation; nothing is recorded locally in that case.
pub async fn publish(
    state: &StateDb,
    store: &RemoteStore,
    manifest: &Manifest,
) -> Result<u64, StateError> {
    publish_with(state, store, manifest, &LocalUpdates::default()).await
}

/// [`publish`], also committing the writer's local updates (page digests, the job record)
/// in the same local batch (see [`StateDb::record_generation_with`]).
pub async fn publish_with(
    state: &StateDb,
    store: &RemoteStore,
    manifest: &Manifest,
    local: &LocalUpdates<'_>,
) -> Result<u64, StateError> {
    let key = keys::manifest_key(&manifest.tenant, &manifest.db, manifest.generation);
    manifest.validate(&key)?;
    let bytes = manifest.encode();
    match store
        .create_if_absent(&key, Bytes::from(bytes.clone()))
        .await?
    {
        CreateOutcome::Created => {}
        CreateOutcome::AlreadyExists => {
            // Verified read: a damaged transfer is read again rather than mistaken for
            // another writer's manifest.
            let existing = store
                .get_bytes_verified(&key, |b| Manifest::decode(&key, b).map(|_| ()))
                .await?;
            // Compared by content, not bytes: a resumed job built by another release may
            // compress the same manifest differently.
            let theirs = Manifest::decode(&key, &existing)?;
            if theirs.content != manifest.content
                || theirs.writer != manifest.writer
                || theirs.job != manifest.job
                || theirs.created_unix_ms != manifest.created_unix_ms
                || theirs.parent != manifest.parent
            {
                let winner = theirs.writer;
                return Err(StateError::Fenced {
                    tenant: manifest.tenant.clone(),
                    db: manifest.db.clone(),
                    generation: manifest.generation,
                    winner,
                });
            }
            // Our own earlier attempt created it (its response was lost): idempotent.
        }
    }
    state.record_generation_with(manifest, local)?;
    Ok(bytes.len() as u64)
}

/// The generations the store holds for a database, ascending (a listing, no reads).
pub async fn remote_generations(
    store: &RemoteStore,
    tenant: &TenantId,
    db: &DbId,
) -> Result<Vec<Generation>, StateError> {
    let listed = store.list(&keys::manifests_prefix(tenant, db)).await?;
    let mut gens: Vec<Generation> = listed
        .iter()
        .filter_map(|o| keys::parse_manifest_key(&o.key))
        .collect();
    gens.sort();
    Ok(gens)
}

/// Generation `g`'s manifest: from the local state, or read from the store (verified,
/// checked against its key) and recorded locally (not through a read-only handle,
/// [`StateDb::open_read_only`], which records nothing).
pub async fn fetch_manifest(
    state: &StateDb,
    store: &RemoteStore,
    tenant: &TenantId,
    db: &DbId,
    g: Generation,
) -> Result<Manifest, StateError> {
    if let Some(m) = state.manifest(tenant, db, g)? {
        return Ok(m);
    }
    let key = keys::manifest_key(tenant, db, g);
    // A damaged transfer is read again; damage at rest fails naming the key.
    let bytes = store
        .get_bytes_verified(&key, |b| Manifest::decode(&key, b).map(|_| ()))
        .await?;
    let m = Manifest::decode(&key, &bytes)?;
    if &m.tenant != tenant || &m.db != db || m.generation != g {
        return Err(StateError::Corrupt {
            key,
            reason: format!(
                "manifest describes {}/{} generation {}, not the database and generation its key names",
                m.tenant, m.db, m.generation
            ),
        });
    }
    // A read-only handle imports nothing: the manifest is read again next time.
    if !state.is_read_only() {
        state.record_generation(&m)?;
    }
    Ok(m)
}

/// Databases of a tenant that have published manifests in the store.
pub async fn remote_databases(
    store: &RemoteStore,
    tenant: &TenantId,
) -> Result<Vec<DbId>, StateError> {
    let prefix = keys::dbs_prefix(tenant);
    let listed = store.list(&prefix).await?;
    let mut out: Vec<DbId> = listed
        .iter()
        .filter_map(|o| {
            let rest = o.key.strip_prefix(&prefix)?;
            let (db, tail) = rest.split_once('/')?;
            tail.starts_with("manifests/")
                .then(|| DbId::new(db).ok())
                .flatten()
        })
        .collect();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(writer: &str) -> Manifest {
        crate::fixtures::manifest(1, writer, 1)
    }

    #[tokio::test]
    async fn publish_is_fenced_and_idempotent() {
        let store = RemoteStore::open("memory://publish-fence").unwrap();
        let (da, db_) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (
            StateDb::open(da.path()).unwrap(),
            StateDb::open(db_.path()).unwrap(),
        );
        publish(&a, &store, &m("a")).await.unwrap();
        // Same bytes again (a lost response retried): accepted, not published twice.
        publish(&a, &store, &m("a")).await.unwrap();
        let err = publish(&b, &store, &m("b")).await.unwrap_err();
        assert!(matches!(err, StateError::Fenced { .. }), "{err}");
        assert!(err.to_string().contains("another writer (a)"), "{err}");
        let t = TenantId::new("t").unwrap();
        let d = DbId::new("d").unwrap();
        assert!(b.generations(&t, &d).unwrap().is_empty());
        assert_eq!(
            remote_generations(&store, &t, &d).await.unwrap(),
            vec![Generation(1)]
        );
        fetch_manifest(&b, &store, &t, &d, Generation(1))
            .await
            .unwrap();
        assert_eq!(
            b.manifest(&t, &d, Generation(1)).unwrap().unwrap().writer,
            "a"
        );
        assert_eq!(remote_databases(&store, &t).await.unwrap(), vec![d]);
    }
}
