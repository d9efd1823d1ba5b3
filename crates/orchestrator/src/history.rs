//! A database's history as the store holds it: which generations exist, and each one's
//! whole state, materialised from its manifest chain (one full manifest and the diffs
//! after it), fetched on demand and kept in the local state.
//!
//! Nothing here writes but the import of manifests the local state lacks, so a crash
//! leaves only what was imported. Retries: the store's. Cancellation: dropping the future.

use cairn_core::{keys, DbId, DbState, Generation, Manifest};
use cairn_remote_store::StoreError;
use cairn_state::StateError;
use serde::Serialize;

use crate::{CairnError, Checkpointer};

/// Summary of one generation, as `cairn ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GenerationInfo {
    /// The generation.
    pub generation: u64,
    /// Publication time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Source kind: the page origin, or `segments` for a database with only a WAL.
    pub kind: &'static str,
    /// Logical size in bytes (page file plus WAL stream).
    pub logical_bytes: u64,
    /// Distinct blobs referenced.
    pub blobs: usize,
    /// Parent generation.
    pub parent: Option<u64>,
    /// Writer identity.
    pub writer: String,
    /// The job that published it.
    pub job: Option<String>,
    /// Published by garbage collection (its data is its parent's).
    pub gc: bool,
    /// Expired by garbage collection: no longer restorable.
    pub expired: bool,
}

/// A generation's manifest object and the whole state it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerationState {
    /// The manifest object (full or diff).
    pub manifest: Manifest,
    /// The materialised state.
    pub state: DbState,
}

impl Checkpointer {
    /// The database's generations: those the store lists plus those recorded locally.
    pub async fn generations(&self, db: &DbId) -> Result<Vec<Generation>, CairnError> {
        let tenant = &self.cfg.tenant;
        let mut gens = cairn_state::remote_generations(&self.store, tenant, db).await?;
        gens.extend(self.state.generations(tenant, db)?);
        gens.sort();
        gens.dedup();
        Ok(gens)
    }

    /// The newest generation: the newest recorded locally, or a newer one the store
    /// lists after it (listing only the keys after it, so this costs what is new).
    pub(crate) async fn latest_generation(
        &self,
        db: &DbId,
    ) -> Result<Option<Generation>, CairnError> {
        let tenant = &self.cfg.tenant;
        let local = self.state.db_record(tenant, db)?.map(|r| r.latest);
        let prefix = keys::manifests_prefix(tenant, db);
        let listed = match local {
            Some(g) => {
                let after = keys::manifest_key(tenant, db, g);
                self.store.list_after(&prefix, &after).await?
            }
            None => self.store.list(&prefix).await?,
        };
        let newest = listed
            .iter()
            .filter_map(|o| keys::parse_manifest_key(&o.key))
            .max();
        Ok(newest.max(local))
    }

    /// The state of `generation` (the latest if `None`). An expired generation is
    /// [`CairnError::Expired`].
    pub async fn state(
        &self,
        db: &DbId,
        generation: Option<Generation>,
    ) -> Result<GenerationState, CairnError> {
        let tenant = &self.cfg.tenant;
        let latest = self
            .latest_generation(db)
            .await?
            .ok_or_else(|| CairnError::UnknownDb {
                tenant: tenant.clone(),
                db: db.clone(),
                store: self.store.describe().to_string(),
            })?;
        let newest = self.state_of(db, latest, true).await?;
        match generation {
            None => Ok(newest),
            Some(g) if g == latest => Ok(newest),
            Some(g) if newest.state.gc.is_expired(g.0) => Err(CairnError::Expired {
                db: db.clone(),
                generation: g,
            }),
            Some(g) => self.state_of(db, g, false).await,
        }
    }

    /// Generation `g`'s state (no expiry check); with `newest`, kept as the database's
    /// newest materialised state.
    async fn state_of(
        &self,
        db: &DbId,
        g: Generation,
        newest: bool,
    ) -> Result<GenerationState, CairnError> {
        let tenant = &self.cfg.tenant;
        if let Some(hit) = self.cached(db, g) {
            return Ok(hit);
        }
        match cairn_state::fetch_manifest(&self.state, &self.store, tenant, db, g).await {
            Ok(_) => {}
            Err(StateError::Store(StoreError::NotFound { .. })) => {
                let gens = self.generations(db).await?;
                return Err(CairnError::UnknownGeneration {
                    tenant: tenant.clone(),
                    db: db.clone(),
                    generation: g,
                    available: summarize(&gens),
                });
            }
            Err(e) => return Err(e.into()),
        }
        let (manifest, state) =
            cairn_state::materialize(&self.state, &self.store, tenant, db, g).await?;
        let gs = GenerationState { manifest, state };
        if newest {
            self.remember(db, &gs);
        }
        Ok(gs)
    }

    /// The latest generation's state, if the database has any.
    pub(crate) async fn latest_state(
        &self,
        db: &DbId,
    ) -> Result<Option<GenerationState>, CairnError> {
        match self.state(db, None).await {
            Ok(s) => Ok(Some(s)),
            Err(CairnError::UnknownDb { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Keeps `gs` as the database's newest materialised state (after a publication, or a
    /// materialisation of the latest), so the next checkpoint does not rebuild it.
    pub(crate) fn remember(&self, db: &DbId, gs: &GenerationState) {
        self.latest.insert(db.clone(), gs.clone());
    }

    fn cached(&self, db: &DbId, g: Generation) -> Option<GenerationState> {
        self.latest
            .get(db)
            .filter(|c| c.manifest.generation == g)
            .map(|c| c.clone())
    }

    /// Every generation of a database with its summary.
    pub async fn list(&self, db: &DbId) -> Result<Vec<GenerationInfo>, CairnError> {
        let gens = self.generations(db).await?;
        if gens.is_empty() {
            return Err(CairnError::UnknownDb {
                tenant: self.cfg.tenant.clone(),
                db: db.clone(),
                store: self.store.describe().to_string(),
            });
        }
        let newest = self.state(db, None).await?.state.gc;
        let mut walk = cairn_state::Walk::default();
        let mut out = Vec::with_capacity(gens.len());
        for g in gens {
            let (m, st) = walk
                .state(&self.state, &self.store, &self.cfg.tenant, db, g)
                .await?;
            let mut names: Vec<String> = st.blobs().iter().map(|b| b.name()).collect();
            names.sort();
            names.dedup();
            out.push(GenerationInfo {
                generation: g.0,
                created_unix_ms: m.created_unix_ms,
                kind: st.kind().as_str(),
                logical_bytes: st.logical_len(),
                blobs: names.len(),
                parent: m.parent.map(|p| p.0),
                writer: m.writer.clone(),
                job: m.job.clone(),
                gc: m.gc,
                expired: newest.is_expired(g.0),
            });
        }
        Ok(out)
    }

    /// Databases of the tenant that have published generations in the store.
    pub async fn databases(&self) -> Result<Vec<DbId>, CairnError> {
        Ok(cairn_state::remote_databases(&self.store, &self.cfg.tenant).await?)
    }
}

/// `7` or `12 generations, 1..=12`.
pub(crate) fn summarize(gens: &[Generation]) -> String {
    match (gens.first(), gens.last()) {
        (Some(a), Some(b)) if a == b => format!("{a}"),
        (Some(a), Some(b)) => format!("{} generations, {a}..={b}", gens.len()),
        _ => "none".into(),
    }
}
