//! Interleavings of garbage collection with writers and restores on other machines, over
//! one in-memory store with an injected clock.
//!
//! Each interleaving has three machines (state directories) sharing the store through a
//! gate that lets one store request through at a time, chosen by the seed (see
//! `cairn_tests::gate`):
//! - a writer that truncates the head of its WAL stream (expiring what only older
//!   generations held) and then seals segments, one with the very bytes of a segment the
//!   truncation dropped, so its checkpoint deduplicates against a blob the collector is
//!   deleting; its writes lose responses now and then;
//! - a collector running `gc` with keep-last 1 and a grace period of zero;
//! - a reader restoring an old generation and the newest one.
//!
//! After all of them: every generation that is not expired restores exactly from a fresh
//! state directory; a restore that succeeded gave exactly its generation's bytes, and one
//! that failed said its generation expired. `CAIRN_GC_INTERLEAVINGS` sets the number of
//! seeds (default 1000), `CAIRN_GC_SEED` the first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_orchestrator::{
    CairnError, Checkpointer, Config, DbId, Env, GcOptions, Generation, HeadOptions, Lsn,
    RemoteStore, Source, StoreConfig,
};
use cairn_remote_store::fault::{FaultConfig, FaultStore};
use cairn_tests::gate::{Gate, GateStore};
use object_store::memory::InMemory;
use object_store::ObjectStore;
use rand::{Rng, RngCore, SeedableRng};

type Files = BTreeMap<String, Vec<u8>>;

fn store_cfg() -> StoreConfig {
    StoreConfig {
        retry_initial_backoff_ms: 1,
        retry_max_backoff_ms: 2,
        ..StoreConfig::default()
    }
}

fn open(dir: &Path, name: &str, inner: Arc<dyn ObjectStore>, seed: u64) -> Checkpointer {
    let mut cfg = Config::new(dir.join(name)).unwrap();
    cfg.upload_concurrency = 1;
    cfg.download_concurrency = 1;
    cfg.scan_concurrency = 1;
    cfg.single_writer = true;
    let store = RemoteStore::from_object_store(inner, "", format!("memory ({name})"), store_cfg());
    Checkpointer::open_with(cfg, store, Env::fixed(1_000_000, seed)).unwrap()
}

fn segment(rng: &mut impl RngCore) -> Vec<u8> {
    let mut b = vec![0u8; rng.gen_range(64..512)];
    rng.fill_bytes(&mut b);
    b
}

fn read_dir(dir: &Path) -> Files {
    cairn_tests::fixtures::read_dir_files(dir).unwrap()
}

/// The machines of the interleavings: opened once, each interleaving on its own database.
struct Machines {
    dir: tempfile::TempDir,
    gate: Gate,
    writer: Checkpointer,
    collector: Checkpointer,
    reader: Checkpointer,
    checker: Checkpointer,
}

impl Machines {
    fn new(base: &Path) -> Self {
        let dir = tempfile::tempdir_in(base).unwrap();
        let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let gate = Gate::default();
        let lossy = FaultConfig {
            seed: 7,
            lost_write_responses: 0.15,
            ..FaultConfig::default()
        };
        let writer_store: Arc<dyn ObjectStore> = Arc::new(FaultStore::new(
            Arc::new(GateStore::new(Arc::clone(&mem), &gate, 0)),
            lossy,
        ));
        let gated =
            |id| -> Arc<dyn ObjectStore> { Arc::new(GateStore::new(Arc::clone(&mem), &gate, id)) };
        Self {
            writer: open(dir.path(), "writer", writer_store, 1),
            collector: open(dir.path(), "collector", gated(1), 2),
            reader: open(dir.path(), "reader", gated(2), 3),
            checker: open(dir.path(), "checker", Arc::clone(&mem), 4),
            dir,
            gate,
        }
    }
}

/// One interleaving; panics with the seed and schedule when a check fails.
async fn interleaving(seed: u64, m: &Machines) {
    let dir = tempfile::tempdir_in(m.dir.path()).unwrap();
    let db = DbId::new(format!("g{seed}")).unwrap();
    let wal = dir.path().join("wal");
    std::fs::create_dir_all(&wal).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Before the race: three generations, one segment each after the first two.
    let mut expect: BTreeMap<u64, Files> = BTreeMap::new();
    let mut files = Files::new();
    let mut sizes = Vec::new();
    {
        let w = &m.writer;
        for (g, names) in [(1u64, vec!["s0", "s1"]), (2, vec!["s2"]), (3, vec!["s3"])] {
            for n in names {
                let b = segment(&mut rng);
                sizes.push(b.len() as u64);
                std::fs::write(wal.join(n), &b).unwrap();
                files.insert(n.to_string(), b);
            }
            let r = w
                .checkpoint(&db, &Source::Segments(wal.clone()))
                .await
                .unwrap();
            assert_eq!(r.generation, g);
            expect.insert(g, files.clone());
        }
    }
    let s1 = files["s1"].clone();
    let before = Lsn(sizes[0] + sizes[1]);

    let (gate, writer, collector, reader) = (&m.gate, &m.writer, &m.collector, &m.reader);
    gate.arm();
    let old = Generation(rng.gen_range(1..=3));
    let writer_run = async {
        let mut published: Vec<(u64, Files)> = Vec::new();
        let opts = HeadOptions {
            force: true,
            ..HeadOptions::default()
        };
        let mut stream = files.clone();
        match writer.truncate_head(&db, before, &opts).await {
            Ok(r) => {
                stream.remove("s0");
                stream.remove("s1");
                if let Some(g) = r.generation {
                    published.push((g, stream.clone()));
                }
            }
            // The collector took the generation first: the writer goes on without it.
            Err(CairnError::State(cairn_state::StateError::Fenced { .. })) => {}
            Err(e) => panic!("seed {seed}: truncation: {e}"),
        }
        for (name, bytes) in [("s4", s1.clone()), ("s5", vec![7u8; 300])] {
            std::fs::write(wal.join(name), &bytes).unwrap();
            stream.insert(name.to_string(), bytes);
        }
        let r = writer.checkpoint(&db, &Source::Segments(wal.clone())).await;
        match r {
            Ok(r) => published.push((r.generation, stream.clone())),
            Err(e) => panic!("seed {seed}: checkpoint: {e}"),
        }
        gate.done(0);
        published
    };
    let collector_run = async {
        let opts = GcOptions {
            keep_last: Some(1),
            grace: Duration::ZERO,
            ..GcOptions::default()
        };
        let r = collector.gc(&db, &opts).await;
        gate.done(1);
        r.map_err(|e| format!("seed {seed}: gc: {e}"))
    };
    let reader_run = async {
        let mut out = Vec::new();
        for (i, g) in [Some(old), None].into_iter().enumerate() {
            let to = dir.path().join(format!("read-{i}"));
            out.push((
                g,
                reader
                    .restore(&db, g, &to)
                    .await
                    .map(|r| (r, read_dir(&to))),
            ));
        }
        gate.done(2);
        out
    };
    let (published, gc, reads, ()) =
        tokio::join!(writer_run, collector_run, reader_run, gate.schedule(seed));
    if std::env::var_os("CAIRN_GC_TRACE").is_some() {
        eprintln!(
            "seed {seed}: {} steps, gc {:?}",
            gate.log().len(),
            gc.as_ref()
                .map(|g| (g.generation, g.blobs_deleted, g.generations_expired.clone()))
        );
    }
    let schedule = gate.log().join("\n  ");
    let gc = gc.unwrap_or_else(|e| panic!("{e}\nschedule:\n  {schedule}"));
    for (g, files) in &published {
        expect.insert(*g, files.clone());
    }
    // Generations the collector published hold their parent's data.
    let fresh = &m.checker;
    let gens = fresh.generations(&db).await.unwrap();
    for g in &gens {
        if !expect.contains_key(&g.0) {
            let parent = expect.range(..g.0).next_back().map(|(_, f)| f.clone());
            expect.insert(g.0, parent.unwrap());
        }
    }
    // What the reader got is exact, or it was told its generation expired.
    for (g, r) in reads {
        match r {
            Ok((rep, got)) => assert!(
                got == expect[&rep.generation],
                "seed {seed}: restore of {g:?} (generation {}) differs\nschedule:\n  {schedule}",
                rep.generation
            ),
            Err(CairnError::Expired { .. }) => {}
            Err(e) => panic!("seed {seed}: restore of {g:?}: {e}\nschedule:\n  {schedule}"),
        }
    }
    // Every generation not expired restores exactly from the bucket alone.
    let latest = fresh.state(&db, None).await.unwrap();
    let mut retained = 0;
    for g in &gens {
        if latest.state.gc.is_expired(g.0) {
            assert!(
                gc.generations_expired.contains(&g.0) || g.0 < 4,
                "seed {seed}: {g} expired unasked"
            );
            continue;
        }
        retained += 1;
        let to = dir.path().join(format!("check-{g}"));
        if let Err(e) = fresh.restore(&db, Some(*g), &to).await {
            panic!("seed {seed}: retained generation {g}: {e}\nschedule:\n  {schedule}");
        }
        assert!(
            read_dir(&to) == expect[&g.0],
            "seed {seed}: retained generation {g} differs\nschedule:\n  {schedule}"
        );
    }
    assert!(retained >= 1);
}

#[test]
fn collection_interleaved_with_writers_and_readers_never_loses_live_data() {
    let n: u64 = std::env::var("CAIRN_GC_INTERLEAVINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let first: u64 = std::env::var("CAIRN_GC_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    // State directories on tmpfs when there is one: RocksDB syncs are then cheap.
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let machines = Machines::new(&base);
    for seed in first..first + n {
        rt.block_on(interleaving(seed, &machines));
    }
    println!("{n} interleavings passed");
}
