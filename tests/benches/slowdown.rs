//! Writer slowdown: how much an engine that keeps writing loses while Cairn replicates and
//! checkpoints it. Throughput with Cairn running ÷ throughput without it, in one run; the
//! goal is at least 0.97.
//!
//! (a) SQLite: one writer thread commits small transactions (each inserts a ~200-byte row
//! and updates an earlier one; WAL mode, `synchronous=NORMAL`, the usual WAL setting, which
//! makes a commit cost CPU and page-cache writes rather than an fsync, so whatever Cairn
//! takes from the machine shows) as fast as it can for `CAIRN_BENCH_SLOWDOWN_SECS`
//! seconds, alone, and then with [`Checkpointer::replicate`] shipping the same database
//! (interval 1 s, the service's other defaults) to a local `file://` store in the work
//! directory. The replicator runs in this process on its own multi-thread Tokio runtime
//! (as many workers as cores, like the `cairn` binary's): it is the code `cairn replicate`
//! runs, without a binary that `cargo bench` would not rebuild, and sharing the process
//! can only add contention (SQLite's process-wide mutexes, the allocator), so the figure
//! errs against Cairn. Before each timed window with Cairn the replicator starts and
//! finishes one step (shipping what the alone runs committed), so the window measures
//! steady-state replication of the writer's own commits.
//!
//! (b) DirtyTracker: `CAIRN_BENCH_SLOWDOWN_THREADS` threads (default 2) mark random pages
//! of a page file (`CAIRN_BENCH_SLOWDOWN_MIB`, default 64 MiB of 4 KiB pages) at full
//! speed, alone, and then while a checkpoint loop hands the tracker to
//! [`Checkpointer::checkpoint_with`] (which drains it) and checkpoints the page file
//! through the library to a local store, every `CAIRN_BENCH_SLOWDOWN_CHECKPOINT_MS`
//! (default 1000; a checkpoint longer than that is followed by the next at once). The
//! markers mark pages all over the file, so every checkpoint re-reads every chunk: the
//! worst case for the loop's cost.
//!
//! Each side is measured `CAIRN_BENCH_RUNS` times (default and minimum 3), alone and with
//! Cairn in alternating order, the ratio taken within each run, and printed as the median
//! with its min–max ([`cairn_tests::bench`]); the goal is met only if every run meets it.
//!
//! `cargo bench -p cairn-tests --bench slowdown`. Environment: `CAIRN_BENCH_SLOWDOWN_SECS`
//! (seconds per side per run, default 5), `CAIRN_BENCH_SLOWDOWN_THREADS`,
//! `CAIRN_BENCH_SLOWDOWN_MIB`, `CAIRN_BENCH_SLOWDOWN_CHECKPOINT_MS`,
//! `CAIRN_BENCH_SLOWDOWN_PARTS` (`sqlite`, `tracker` or both, default both),
//! `CAIRN_BENCH_SLOWDOWN_AUTOCHECKPOINT` (the writer's `wal_autocheckpoint`, default 1000;
//! 0 leaves every checkpoint of the alone side undone, so both sides skip the copy work),
//! `CAIRN_BENCH_RUNS`, `CAIRN_BENCH_DIR` (work directory, default the system temp dir).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_core::{DbId, DirtyTracker};
use cairn_orchestrator::{
    CheckpointOptions, Checkpointer, Config, ReplicateObserver, ReplicateOptions, ReplicateStatus,
    Source,
};
use cairn_tests::bench::{env_or, ratio_line, runs, Goal, Spread};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

const PAGE: usize = 4096;
const GOAL: Goal = Goal::AtLeast(0.97);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Prints a part's table: each side's throughput and the ratio with its verdict.
fn table(what: &str, unit: &str, alone: &[f64], with: &[f64]) {
    let ratio: Vec<f64> = with.iter().zip(alone).map(|(w, a)| w / a).collect();
    println!("{what} ({} runs, median (min–max)):", alone.len());
    println!(
        "  alone:                 {} {unit}",
        Spread::of(alone).show(0)
    );
    println!(
        "  with Cairn running:    {} {unit}",
        Spread::of(with).show(0)
    );
    println!(
        "{}",
        ratio_line("throughput with Cairn / alone", &ratio, Some(GOAL))
    );
}

// ---- (a) SQLite ----

/// Counts finished replication steps.
#[derive(Default)]
struct Steps(AtomicU64);

impl ReplicateObserver for Steps {
    fn step_finished(&self, _: &ReplicateStatus) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn open_writer(db: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.pragma_update(None, "synchronous", "normal").unwrap();
    c.pragma_update(None, "wal_autocheckpoint", autocheckpoint())
        .unwrap();
    c
}

/// The writer's `wal_autocheckpoint` (pages; 0 turns SQLite's own checkpoints off):
/// `CAIRN_BENCH_SLOWDOWN_AUTOCHECKPOINT`, default SQLite's 1000.
fn autocheckpoint() -> i64 {
    env_or("CAIRN_BENCH_SLOWDOWN_AUTOCHECKPOINT", 1000)
}

/// Creates the table with `rows` rows.
fn populate(db: &Path, rows: i64) {
    let mut c = open_writer(db);
    c.execute_batch("create table if not exists t(n integer primary key, v text)")
        .unwrap();
    let tx = c.transaction().unwrap();
    for n in 1..=rows {
        tx.execute(
            "insert into t(n, v) values (?1, ?2)",
            rusqlite::params![n, format!("row {n} {}", "x".repeat(200))],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

/// What a writer did in one window.
#[derive(Clone, Copy)]
struct Written {
    /// Commits per second.
    rate: f64,
    /// The longest commit (BEGIN to COMMIT), seconds: a stall of the writer.
    worst: f64,
}

/// Commits as fast as it can for `secs`.
fn write_for(c: &mut rusqlite::Connection, secs: f64, rng: &mut SmallRng) -> Written {
    let mut next: i64 = c
        .query_row("select coalesce(max(n), 0) from t", [], |r| r.get(0))
        .unwrap();
    let t = Instant::now();
    let mut commits = 0u64;
    let mut worst = Duration::ZERO;
    while t.elapsed().as_secs_f64() < secs {
        next += 1;
        let began = Instant::now();
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        tx.prepare_cached("insert into t(n, v) values (?1, ?2)")
            .unwrap()
            .execute(rusqlite::params![
                next,
                format!("row {next} {}", "x".repeat(200))
            ])
            .unwrap();
        let target = rng.gen_range(1..next);
        tx.prepare_cached("update t set v = ?1 where n = ?2")
            .unwrap()
            .execute(rusqlite::params![
                format!("upd {next} {}", "y".repeat(150)),
                target
            ])
            .unwrap();
        tx.commit().unwrap();
        worst = worst.max(began.elapsed());
        commits += 1;
    }
    Written {
        rate: commits as f64 / t.elapsed().as_secs_f64(),
        worst: worst.as_secs_f64(),
    }
}

/// What the replicator did during one window with Cairn.
struct Shipped {
    steps: u64,
    mib: f64,
    page_generations: u64,
    wal_truncations: u64,
}

/// One window with the replicator running: started, one step finished, then the writer
/// for `secs`, then stopped (its final step ships the rest).
fn with_replicator(
    rt: &tokio::runtime::Runtime,
    cp: &Arc<Checkpointer>,
    db: &Path,
    c: &mut rusqlite::Connection,
    secs: f64,
    rng: &mut SmallRng,
) -> (Written, Shipped) {
    let steps = Arc::new(Steps::default());
    let (tx, rx) = tokio::sync::watch::channel(false);
    // The replicate future is not `Send` (it holds a SQLite connection), so it runs on a
    // thread of its own that blocks on the runtime, as `cairn replicate`'s main thread does.
    let task = {
        let (cp, steps, db) = (Arc::clone(cp), Arc::clone(&steps), db.to_path_buf());
        let handle = rt.handle().clone();
        std::thread::spawn(move || {
            let opts = ReplicateOptions {
                interval: Duration::from_secs(1),
                ..Default::default()
            };
            let id = DbId::new("app").unwrap();
            handle.block_on(cp.replicate_observed(&id, &db, &opts, rx, steps.as_ref()))
        })
    };
    let t = Instant::now();
    while steps.0.load(Ordering::Relaxed) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the replicator finished no step"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = steps.0.load(Ordering::Relaxed);
    let written = write_for(c, secs, rng);
    let during = steps.0.load(Ordering::Relaxed) - before;
    tx.send(true).unwrap();
    let report = task.join().unwrap().unwrap();
    (
        written,
        Shipped {
            steps: during,
            mib: report.bytes_shipped as f64 / 1048576.0,
            page_generations: report.page_generations,
            wal_truncations: report.wal_truncations,
        },
    )
}

fn sqlite_part(dir: &Path, secs: f64, runs: usize) {
    println!();
    println!(
        "(a) SQLite writer: small transactions (insert a row, update another), WAL, synchronous=NORMAL, wal_autocheckpoint={}, {secs} s per side, replicate --interval 1s to a local file:// store in the same process",
        autocheckpoint()
    );
    let db = dir.join("app.db");
    populate(&db, 10_000);
    let mut rng = SmallRng::seed_from_u64(7);
    let rt = runtime();
    let cp = Arc::new(Checkpointer::open(Config::new(dir.join("state")).unwrap()).unwrap());
    let mut c = open_writer(&db);
    // Warm-up, untimed: the first replication of the database (its first page
    // generation) and the page cache.
    write_for(&mut c, 1.0, &mut rng);
    with_replicator(&rt, &cp, &db, &mut c, 1.0, &mut rng);
    let (mut alone, mut with) = (vec![], vec![]);
    for run in 0..runs {
        let mut shipped = None;
        let mut cairn = |c: &mut rusqlite::Connection, rng: &mut SmallRng| {
            let (r, s) = with_replicator(&rt, &cp, &db, c, secs, rng);
            shipped = Some(s);
            r
        };
        let (a, w) = if run.is_multiple_of(2) {
            let a = write_for(&mut c, secs, &mut rng);
            (a, cairn(&mut c, &mut rng))
        } else {
            let w = cairn(&mut c, &mut rng);
            (write_for(&mut c, secs, &mut rng), w)
        };
        let s = shipped.unwrap();
        println!(
            "run {}: alone {:.0} commits/s (longest commit {:.0} ms), with Cairn {:.0} commits/s (longest commit {:.0} ms; ratio {:.3}; {} steps finished in the window; the replicator's whole run, catch-up and last step included: {:.1} MiB of WAL shipped, {} page generations, {} WAL resets)",
            run + 1,
            a.rate,
            a.worst * 1e3,
            w.rate,
            w.worst * 1e3,
            w.rate / a.rate,
            s.steps,
            s.mib,
            s.page_generations,
            s.wal_truncations
        );
        alone.push(a.rate);
        with.push(w.rate);
    }
    table("SQLite commits", "commits/s", &alone, &with);
}

// ---- (b) DirtyTracker ----

/// `threads` threads mark random pages below `pages` for `secs`; marks per second, all
/// threads together.
fn mark_for(tracker: &Arc<DirtyTracker>, pages: u64, threads: usize, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (tr, stop) = (Arc::clone(tracker), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut x = (i as u64 + 1) * 0x9e37_79b9_7f4a_7c15;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..4096 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        black_box(tr.mark(x % pages));
                    }
                    n += 4096;
                }
                n
            })
        })
        .collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let marks: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    marks as f64 / t.elapsed().as_secs_f64()
}

fn write_random(path: &Path, mib: usize, rng: &mut SmallRng) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rng.fill_bytes(&mut buf);
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn tracker_part(dir: &Path, secs: f64, runs: usize) {
    let threads: usize = env_or("CAIRN_BENCH_SLOWDOWN_THREADS", 2).max(1);
    let mib: usize = env_or("CAIRN_BENCH_SLOWDOWN_MIB", 64).max(1);
    let every = Duration::from_millis(env_or("CAIRN_BENCH_SLOWDOWN_CHECKPOINT_MS", 1000));
    println!();
    println!(
        "(b) DirtyTracker: {threads} threads marking random pages of a {mib} MiB page file, {secs} s per side; a checkpoint loop every {} ms drains the tracker and checkpoints the file to a local store",
        every.as_millis()
    );
    let path: PathBuf = dir.join("pages.bin");
    write_random(&path, mib, &mut SmallRng::seed_from_u64(42));
    let pages = (mib * 1024 * 1024 / PAGE) as u64;
    let tracker = Arc::new(DirtyTracker::new(pages));
    let rt = runtime();
    let cp = Arc::new(Checkpointer::open(Config::new(dir.join("state-pages")).unwrap()).unwrap());
    let db = DbId::new("pages").unwrap();
    let source = Source::Pages {
        path: path.clone(),
        page_size: PAGE as u32,
    };
    let opts = CheckpointOptions {
        tracker: Some(Arc::clone(&tracker)),
        ..Default::default()
    };
    // Untimed: the first checkpoint with this tracker compares page digests; from then
    // on the checkpoints use its marks.
    rt.block_on(cp.checkpoint_with(&db, &source, &opts).wait())
        .unwrap();

    let with_loop = |secs: f64| -> (f64, u64) {
        let stop = Arc::new(AtomicBool::new(false));
        let looping = {
            let (cp, db, source, opts, stop) = (
                Arc::clone(&cp),
                db.clone(),
                source.clone(),
                opts.clone(),
                Arc::clone(&stop),
            );
            let handle = rt.handle().clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    handle
                        .block_on(cp.checkpoint_with(&db, &source, &opts).wait())
                        .unwrap();
                    n += 1;
                    while t.elapsed() < every && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                n
            })
        };
        let rate = mark_for(&tracker, pages, threads, secs);
        stop.store(true, Ordering::Relaxed);
        (rate, looping.join().unwrap())
    };
    let (mut alone, mut with) = (vec![], vec![]);
    for run in 0..runs {
        let alone_side = || mark_for(&tracker, pages, threads, secs);
        let (a, (w, n)) = if run.is_multiple_of(2) {
            let a = alone_side();
            (a, with_loop(secs))
        } else {
            let w = with_loop(secs);
            (alone_side(), w)
        };
        tracker.drain();
        println!(
            "run {}: alone {:.1} M marks/s, with the checkpoint loop {:.1} M marks/s (ratio {:.3}; {n} checkpoints)",
            run + 1,
            a / 1e6,
            w / 1e6,
            w / a
        );
        alone.push(a / 1e6);
        with.push(w / 1e6);
    }
    table("DirtyTracker marks", "M marks/s", &alone, &with);
}

fn main() {
    let secs: f64 = env_or("CAIRN_BENCH_SLOWDOWN_SECS", 5.0f64).max(0.1);
    let parts = std::env::var("CAIRN_BENCH_SLOWDOWN_PARTS").unwrap_or_else(|_| "both".into());
    let runs = runs();
    let base = std::env::var("CAIRN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(base).unwrap();
    println!(
        "writer slowdown benchmark: {runs} runs, {secs} s per side, {} cores; goal: throughput with Cairn / alone {GOAL}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("work directory: {}", dir.path().display());
    if parts != "tracker" {
        sqlite_part(dir.path(), secs, runs);
    }
    if parts != "sqlite" {
        tracker_part(dir.path(), secs, runs);
    }
}
