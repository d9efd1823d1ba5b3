//! Reading a state directory beside the process that owns it: what `cairn status` and
//! `cairn ls` need while `cairn replicate` runs.
//!
//! Contract: [`Checkpointer::open_read_only`] opens the local state as a RocksDB
//! secondary ([`cairn_state::StateDb::open_read_only`]) and the configured store, and
//! returns a [`ReadOnlyCheckpointer`], which offers only reads: the job list, the
//! databases in the store and a database's generations. A state directory that holds no
//! state yet reads as empty state (no jobs; generations from the store alone) and is not
//! created ([`cairn_state::StateDb::read_only_empty`]). Opening it never resumes a job,
//! never sweeps scratch (it does not even create the scratch directory), never creates a
//! writer identity and takes no lock, so it neither waits for the owner nor keeps the
//! owner from starting. Nothing it does writes the state directory (every local write is
//! refused by the state crate with a typed error) or the store (it only lists and reads
//! manifests; opening the embedded local store creates its empty directory if missing,
//! as for any command). Each read first catches up with the owner's latest writes, so it sees
//! every batch the owner had committed when the read began; a job the owner is running
//! shows the progress of its last durable step.
//!
//! Crash: a reader killed at any moment leaves nothing but its secondary's temporary
//! directory (see the state crate). Retries: the store's, and the state crate's brief
//! retry of an open that races the owner. Cancellation: dropping a future; nothing is
//! half-done because nothing is written.

use cairn_core::{DbId, Generation, JobId};
use cairn_executor::Scratch;
use cairn_remote_store::RemoteStore;
use cairn_state::{StateDb, StateError};

use crate::config::{Config, Env};
use crate::history::GenerationInfo;
use crate::queue::JobRecord;
use crate::{configured_store, scratch_budget, CairnError, Checkpointer};

/// The reading half of a [`Checkpointer`]: jobs, databases and generations, nothing that
/// writes (made by [`Checkpointer::open_read_only`]).
#[derive(Debug)]
pub struct ReadOnlyCheckpointer {
    cp: Checkpointer,
}

impl Checkpointer {
    /// Opens the state directory read-only beside its owner, and the configured store
    /// (see the module documentation).
    pub fn open_read_only(cfg: Config) -> Result<ReadOnlyCheckpointer, CairnError> {
        let store = configured_store(&cfg)?;
        Self::open_read_only_with(cfg, store, Env::system())
    }

    /// [`Checkpointer::open_read_only`] with an explicit store and environment.
    pub fn open_read_only_with(
        cfg: Config,
        store: RemoteStore,
        env: Env,
    ) -> Result<ReadOnlyCheckpointer, CairnError> {
        cfg.validate()?;
        let state = match StateDb::open_read_only(&cfg.state_dir) {
            Err(StateError::NoState { .. }) => StateDb::read_only_empty(&cfg.state_dir)?,
            opened => opened?,
        };
        // The owner creates the identity at its first open; a reader never does.
        let writer = state.stored_writer_id()?.unwrap_or_default();
        let tenant = scratch_budget(&cfg);
        let scratch = Scratch::detached(&cfg.state_dir.join("scratch"), tenant);
        let cp = Self::assemble(cfg, env, std::sync::Arc::new(state), store, scratch, writer);
        Ok(ReadOnlyCheckpointer { cp })
    }
}

impl ReadOnlyCheckpointer {
    /// Catches up with the owner's latest writes (every read does this first).
    pub fn catch_up(&self) -> Result<(), CairnError> {
        Ok(self.cp.state.catch_up()?)
    }

    /// Every job recorded in the state directory, oldest first (see
    /// [`Checkpointer::jobs`]).
    pub fn jobs(&self) -> Result<Vec<JobRecord>, CairnError> {
        self.catch_up()?;
        self.cp.jobs()
    }

    /// A job's record (see [`Checkpointer::job`]).
    pub fn job(&self, id: JobId) -> Result<JobRecord, CairnError> {
        self.catch_up()?;
        self.cp.job(id)
    }

    /// Every generation of a database with its summary (see [`Checkpointer::list`]).
    pub async fn list(&self, db: &DbId) -> Result<Vec<GenerationInfo>, CairnError> {
        self.catch_up()?;
        self.cp.list(db).await
    }

    /// A database's generations (see [`Checkpointer::generations`]).
    pub async fn generations(&self, db: &DbId) -> Result<Vec<Generation>, CairnError> {
        self.catch_up()?;
        self.cp.generations(db).await
    }

    /// Databases of the tenant with published generations in the store (see
    /// [`Checkpointer::databases`]).
    pub async fn databases(&self) -> Result<Vec<DbId>, CairnError> {
        self.cp.databases().await
    }

    /// The store in use.
    pub fn store(&self) -> &RemoteStore {
        self.cp.store()
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        self.cp.config()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Source;

    fn store(dir: &std::path::Path) -> RemoteStore {
        RemoteStore::open(&format!("file://{}", dir.join("store").display())).unwrap()
    }

    #[tokio::test]
    async fn a_reader_beside_the_owner_lists_its_work_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let segs = dir.path().join("segs");
        std::fs::create_dir_all(&segs).unwrap();
        std::fs::write(segs.join("000001.seg"), vec![1u8; 5000]).unwrap();
        let owner = Checkpointer::open_with(
            Config::new(&state).unwrap(),
            store(dir.path()),
            Env::fixed(1_000, 1),
        )
        .unwrap();
        let db = DbId::new("d").unwrap();
        owner
            .checkpoint(&db, &Source::Segments(segs.clone()))
            .await
            .unwrap();
        // A vanished job's scratch: an owner's open would sweep it, a reader's must not.
        let leftover = state.join("scratch").join(JobId(0xa1).to_string());
        std::fs::create_dir_all(&leftover).unwrap();

        let reader = Checkpointer::open_read_only_with(
            Config::new(&state).unwrap(),
            store(dir.path()),
            Env::fixed(1_000, 2),
        )
        .unwrap();
        assert!(leftover.is_dir(), "the reader swept scratch");
        assert_eq!(reader.databases().await.unwrap(), vec![db.clone()]);
        let listed = reader.list(&db).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].writer, owner.writer_id());
        let jobs = reader.jobs().unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(reader.job(jobs[0].id).unwrap().id, jobs[0].id);

        // The owner publishes again: the reader's next reads see it.
        std::fs::write(segs.join("000002.seg"), vec![2u8; 3000]).unwrap();
        owner
            .checkpoint(&db, &Source::Segments(segs))
            .await
            .unwrap();
        assert_eq!(
            reader.generations(&db).await.unwrap(),
            vec![Generation(1), Generation(2)]
        );
        assert_eq!(reader.list(&db).await.unwrap().len(), 2);
        assert_eq!(reader.jobs().unwrap().len(), 2);
        assert!(reader.cp.state.is_read_only());
    }

    #[tokio::test]
    async fn a_fresh_machine_lists_the_store_and_creates_no_state() {
        let dir = tempfile::tempdir().unwrap();
        let segs = dir.path().join("segs");
        std::fs::create_dir_all(&segs).unwrap();
        std::fs::write(segs.join("000001.seg"), vec![1u8; 5000]).unwrap();
        let db = DbId::new("d").unwrap();
        Checkpointer::open_with(
            Config::new(dir.path().join("a")).unwrap(),
            store(dir.path()),
            Env::fixed(1_000, 1),
        )
        .unwrap()
        .checkpoint(&db, &Source::Segments(segs))
        .await
        .unwrap();
        let fresh = dir.path().join("fresh");
        let reader = Checkpointer::open_read_only_with(
            Config::new(&fresh).unwrap(),
            store(dir.path()),
            Env::fixed(1_000, 2),
        )
        .unwrap();
        assert!(reader.jobs().unwrap().is_empty());
        assert_eq!(reader.databases().await.unwrap(), vec![db.clone()]);
        assert_eq!(reader.list(&db).await.unwrap().len(), 1);
        assert!(!fresh.exists(), "nothing is created");
    }
}
