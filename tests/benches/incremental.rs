//! Incremental checkpoint and restore benchmark, repeated, with restic and rclone as
//! reference points.
//!
//! Each run checkpoints a page file (default 1 GiB of 4 KiB pages) in full to the local
//! store, twice (two state directories: page digests, the command line's way, and the
//! engine's dirty pages), next to a disk copy of the file with fsync. Then, ten times, 1% of
//! the pages change at random and both state directories checkpoint again. Then generation
//! 1 and the last generation are restored. The order of the sides compared alternates from
//! run to run, every ratio is taken within a run, and each figure is printed as the median
//! with its min–max over the runs ([`cairn_tests::bench`]).
//!
//! Before each timed step the benchmark runs `sync`, so no step pays for the writeback of
//! the one before.
//!
//! Then the same workload (a file of half the size by default) goes to a local S3 server
//! (moto on 127.0.0.1), and generation 1, the last generation and `rclone copyto` of the
//! same bytes (4 streams, then fsync) are read back from it, in rotating order. rclone and
//! restic are optional: each part is skipped, with the reason printed, when the tool is
//! missing; so is the S3 part without moto.
//!
//! `cargo bench -p cairn-tests --bench incremental`. Environment: `CAIRN_BENCH_MIB` (file
//! size, default 1024), `CAIRN_BENCH_STEPS` (default 10), `CAIRN_BENCH_RUNS` (default and
//! minimum 3), `CAIRN_BENCH_S3_MIB` (file size for the S3 part, default half of
//! `CAIRN_BENCH_MIB`; 0 skips it), `CAIRN_BENCH_DIR` (work directory, default the system
//! temp dir).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_core::{DbId, DirtyTracker, Generation};
use cairn_orchestrator::{CheckpointOptions, Checkpointer, Config, Env, Source};
use cairn_remote_store::{RemoteStore, StoreConfig};
use cairn_tests::bench::{env_or, ratio_line, runs, Goal, Spread};
use cairn_tests::rclone::Rclone;
use cairn_tests::s3::{s3_config, S3Server};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

const PAGE: usize = 4096;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Flushes every dirty page of the machine (`sync`), so a measurement does not pay for
/// the writeback of what ran before it.
fn settle() {
    let _ = Command::new("sync").status();
}

/// Runs `f` after [`settle`] and returns its result and wall time.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    settle();
    let t = Instant::now();
    let v = f();
    (v, t.elapsed().as_secs_f64())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

fn write_random(path: &Path, mib: usize, rng: &mut SmallRng) {
    let mut f = File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rng.fill_bytes(&mut buf);
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// Overwrites 1% of the pages (at least one) at random and marks them in `tracker`.
fn dirty_one_percent(path: &Path, rng: &mut SmallRng, tracker: &DirtyTracker) -> usize {
    let pages = (std::fs::metadata(path).unwrap().len() as usize) / PAGE;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut chosen = std::collections::BTreeSet::new();
    while chosen.len() < (pages / 100).max(1) {
        chosen.insert(rng.gen_range(0..pages));
    }
    let mut page = vec![0u8; PAGE];
    for p in &chosen {
        rng.fill_bytes(&mut page);
        f.write_all_at(&page, (*p * PAGE) as u64).unwrap();
        tracker.mark(*p as u64);
    }
    f.sync_all().unwrap();
    chosen.len()
}

fn copy_with_fsync(from: &Path, to: &Path) -> f64 {
    let ((), t) = timed(|| {
        std::fs::copy(from, to).unwrap();
        File::open(to).unwrap().sync_all().unwrap();
    });
    std::fs::remove_file(to).unwrap();
    t
}

struct Restic {
    repo: PathBuf,
    version: String,
}

impl Restic {
    fn new(dir: &Path) -> Option<Self> {
        let version = Command::new("restic").arg("version").output().ok()?;
        if !version.status.success() {
            return None;
        }
        let version = String::from_utf8_lossy(&version.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap_or("?")
            .to_owned();
        let repo = dir.join("restic-repo");
        let out = Command::new("restic")
            .args(["init", "--repo"])
            .arg(&repo)
            .env("RESTIC_PASSWORD", "bench")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restic init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self { repo, version })
    }

    /// Backs up `path`; returns (bytes added to the repository, seconds).
    fn backup(&self, path: &Path) -> (f64, f64) {
        let (out, t) = timed(|| {
            Command::new("restic")
                .args(["backup", "--json", "--quiet", "--repo"])
                .arg(&self.repo)
                .arg(path)
                .env("RESTIC_PASSWORD", "bench")
                .output()
                .unwrap()
        });
        assert!(
            out.status.success(),
            "restic backup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let added = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message_type"] == "summary")
            .and_then(|v| v["data_added"].as_u64())
            .unwrap_or(0);
        (added as f64, t)
    }
}

/// One figure per run, for every figure of the local part.
#[derive(Default)]
struct Local {
    copy: Vec<f64>,
    full: Vec<f64>,
    full_marks: Vec<f64>,
    inc: Vec<f64>,
    inc_marks: Vec<f64>,
    uploaded_per_changed: Vec<f64>,
    uploaded_mib: Vec<f64>,
    restore_first: Vec<f64>,
    restore_last: Vec<f64>,
    restic_full: Vec<f64>,
    restic_inc: Vec<f64>,
    restic_inc_bytes: Vec<f64>,
}

struct Bench {
    rt: tokio::runtime::Runtime,
    dir: PathBuf,
    steps: usize,
    rng: SmallRng,
    db: DbId,
}

impl Bench {
    fn open_local(&self, state: &Path) -> Checkpointer {
        Checkpointer::open(Config::new(state).unwrap()).unwrap()
    }

    /// Restores `g` to a scratch path and returns the seconds, checking the bytes against
    /// `check` when given.
    fn restore(&self, cp: &Checkpointer, g: Generation, check: Option<&Path>) -> f64 {
        let out = self.dir.join(format!("restore-{g}"));
        let (r, t) = timed(|| self.rt.block_on(cp.restore(&self.db, Some(g), &out)));
        r.unwrap();
        if let Some(src) = check {
            assert!(
                std::fs::read(&out).unwrap() == std::fs::read(src).unwrap(),
                "restore of generation {g} differs from the source"
            );
        }
        std::fs::remove_file(&out).unwrap();
        t
    }

    /// One run of the local part.
    fn local_run(&mut self, run: usize, src: &Path, restic: Option<&Restic>, m: &mut Local) {
        let flip = !run.is_multiple_of(2);
        let base = self.dir.join(format!("run-{run}"));
        let cp = self.open_local(&base.join("state"));
        let marks_cp = self.open_local(&base.join("state-marks"));
        let source = Source::Pages {
            path: src.to_path_buf(),
            page_size: PAGE as u32,
        };
        let db = self.db.clone();
        let full = |cp: &Checkpointer| {
            let (r, t) = timed(|| self.rt.block_on(cp.checkpoint(&db, &source)));
            r.unwrap();
            t
        };
        let copy = || copy_with_fsync(src, &base.join("copy.bin"));
        let (c, f, fm) = if flip {
            let fm = full(&marks_cp);
            let f = full(&cp);
            (copy(), f, fm)
        } else {
            let c = copy();
            (c, full(&cp), full(&marks_cp))
        };
        m.copy.push(c);
        m.full.push(f);
        m.full_marks.push(fm);
        if let Some(r) = restic {
            m.restic_full.push(r.backup(src).1);
        }
        let tracker =
            DirtyTracker::new((std::fs::metadata(src).unwrap().len() / PAGE as u64).max(1));
        let (mut inc, mut inc_marks, mut up, mut changed) = (vec![], vec![], 0.0, 0.0);
        let (mut restic_t, mut restic_b) = (vec![], vec![]);
        let mut last = 1;
        for step in 0..self.steps {
            let n = dirty_one_percent(src, &mut self.rng, &tracker);
            changed += (n * PAGE) as f64;
            let opts = CheckpointOptions {
                dirty: Some(tracker.drain()),
                ..Default::default()
            };
            let digest = || timed(|| self.rt.block_on(cp.checkpoint(&db, &source)).unwrap());
            let marks = || {
                timed(|| {
                    self.rt
                        .block_on(marks_cp.checkpoint_with(&db, &source, &opts).wait())
                        .unwrap()
                })
            };
            let ((r, t), (_, tm)) = if (step + run).is_multiple_of(2) {
                let d = digest();
                (d, marks())
            } else {
                let k = marks();
                (digest(), k)
            };
            up += (r.bytes_uploaded) as f64;
            last = r.generation;
            inc.push(t);
            inc_marks.push(tm);
            if let Some(rs) = restic {
                let (b, t) = rs.backup(src);
                restic_b.push(b);
                restic_t.push(t);
            }
        }
        m.inc.push(mean(&inc));
        m.inc_marks.push(mean(&inc_marks));
        m.uploaded_per_changed.push(up / changed.max(1.0));
        m.uploaded_mib
            .push(up / self.steps.max(1) as f64 / 1048576.0);
        if restic.is_some() {
            m.restic_inc.push(mean(&restic_t));
            m.restic_inc_bytes.push(mean(&restic_b));
        }
        let (first, last) = (Generation(1), Generation(last));
        // Untimed: brings every blob of both generations into the page cache, so neither
        // side pays for reading the other's blobs from disk.
        self.restore(&cp, last, None);
        let (a, b) = if flip {
            let b = self.restore(&cp, last, Some(src));
            (self.restore(&cp, first, None), b)
        } else {
            let a = self.restore(&cp, first, None);
            (a, self.restore(&cp, last, Some(src)))
        };
        m.restore_first.push(a);
        m.restore_last.push(b);
        drop((cp, marks_cp));
        std::fs::remove_dir_all(&base).unwrap();
        println!(
            "run {}: copy {c:.3} s, full {f:.3} s, incremental {:.3} s (marks {:.3} s), restore generation 1 {a:.3} s, generation {} {b:.3} s",
            run + 1,
            mean(&inc),
            mean(&inc_marks),
            last.0
        );
    }

    /// The S3 part: one checkpointed chain on moto, then restores and rclone, rotating.
    fn s3_part(&mut self, mib: usize, runs: usize) {
        println!();
        let server = match S3Server::start() {
            Ok(s) => s,
            Err(e) => {
                println!("S3 part skipped: moto is not available ({e})");
                return;
            }
        };
        let src = self.dir.join("s3-pages.bin");
        write_random(&src, mib, &mut self.rng);
        let url = server.url("cairn");
        let store = RemoteStore::open_with(
            &url,
            s3_config(server.endpoint(), "test", "test", StoreConfig::default()),
        )
        .unwrap();
        let mut cfg = Config::new(self.dir.join("s3-state")).unwrap();
        cfg.store_url = Some(url);
        let cp = Checkpointer::open_with(cfg, store, Env::system()).unwrap();
        let source = Source::Pages {
            path: src.clone(),
            page_size: PAGE as u32,
        };
        let (r, t_full) = timed(|| self.rt.block_on(cp.checkpoint(&self.db, &source)));
        r.unwrap();
        let tracker = DirtyTracker::new((mib * 256).max(1) as u64);
        let mut last = Generation(1);
        for _ in 0..self.steps {
            dirty_one_percent(&src, &mut self.rng, &tracker);
            let opts = CheckpointOptions {
                dirty: Some(tracker.drain()),
                ..Default::default()
            };
            let r = self
                .rt
                .block_on(cp.checkpoint_with(&self.db, &source, &opts).wait())
                .unwrap();
            last = Generation(r.generation);
        }
        println!(
            "S3 (moto at {}): {mib} MiB page file, full checkpoint {t_full:.3} s, {} steps of 1%",
            server.endpoint(),
            self.steps
        );
        let rclone = match Rclone::find(server.endpoint(), &self.dir) {
            Ok(r) => {
                let to = format!("moto:{}/rclone/pages.bin", server.bucket());
                r.copyto(&src.display().to_string(), &to, 4).unwrap();
                Some((r, to))
            }
            Err(reason) => {
                println!("rclone part skipped: {reason}");
                None
            }
        };
        let (mut first, mut newest, mut rc) = (vec![], vec![], vec![]);
        // Untimed warm-up (connections, moto's first reads).
        self.restore(&cp, last, None);
        for run in 0..runs {
            for side in 0..3 {
                match (run + side) % 3 {
                    0 => first.push(self.restore(&cp, Generation(1), None)),
                    1 => newest.push(self.restore(&cp, last, (run == 0).then_some(src.as_path()))),
                    _ => {
                        if let Some((r, from)) = &rclone {
                            let out = self.dir.join("rclone-out.bin");
                            settle();
                            let t = r.copyto(from, &out.display().to_string(), 4).unwrap();
                            // Timed as part of the copy, not settled first.
                            let t_sync = Instant::now();
                            File::open(&out).unwrap().sync_all().unwrap();
                            let sync = secs(t_sync.elapsed());
                            if run == 0 {
                                assert!(
                                    std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap()
                                );
                            }
                            std::fs::remove_file(&out).unwrap();
                            rc.push(secs(t) + sync);
                        }
                    }
                }
            }
            println!(
                "S3 run {}: restore generation 1 {:.3} s, generation {last} {:.3} s{}",
                run + 1,
                first[run],
                newest[run],
                rc.get(run)
                    .map_or(String::new(), |t| format!(", rclone copyto {t:.3} s"))
            );
        }
        let mibs = |t: &[f64]| Spread::of(&t.iter().map(|t| mib as f64 / t).collect::<Vec<_>>());
        println!();
        println!("S3 restores ({runs} runs, median (min–max)):");
        println!(
            "  restore, generation 1 (no deltas):        {} s  ({} MiB/s)",
            Spread::of(&first),
            mibs(&first).show(0)
        );
        println!(
            "  restore, generation {last} ({} deltas deep): {} s  ({} MiB/s)",
            self.steps,
            Spread::of(&newest),
            mibs(&newest).show(0)
        );
        if let Some((r, _)) = &rclone {
            println!(
                "  rclone {} copyto, 4 streams, then fsync:  {} s  ({} MiB/s)",
                r.version(),
                Spread::of(&rc),
                mibs(&rc).show(0)
            );
        }
        println!("S3 ratios (goal in brackets; met only if every run meets it):");
        println!(
            "{}",
            ratio_line(
                &format!("restore generation {last} / generation 1"),
                &ratios(&newest, &first),
                Some(Goal::AtMost(1.1))
            )
        );
        if rclone.is_some() {
            println!(
                "{}",
                ratio_line(
                    "restore generation 1 / rclone copyto",
                    &ratios(&first, &rc),
                    Some(Goal::AtMost(1.0))
                )
            );
            println!(
                "{}",
                ratio_line(
                    &format!("restore generation {last} / rclone copyto"),
                    &ratios(&newest, &rc),
                    Some(Goal::AtMost(1.0))
                )
            );
        }
    }
}

fn main() {
    let size_mib: usize = env_or("CAIRN_BENCH_MIB", 1024);
    let steps: usize = env_or("CAIRN_BENCH_STEPS", 10);
    let s3_mib: usize = env_or("CAIRN_BENCH_S3_MIB", size_mib / 2);
    let runs = runs();
    let base = std::env::var("CAIRN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(base).unwrap();
    let pages = size_mib * 1024 * 1024 / PAGE;
    println!(
        "incremental benchmark: {size_mib} MiB page file ({pages} pages of {PAGE} B), {steps} steps of 1% dirty pages, {runs} runs"
    );
    println!("work directory: {}", dir.path().display());
    let mut bench = Bench {
        rt: tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap(),
        dir: dir.path().to_path_buf(),
        steps,
        rng: SmallRng::seed_from_u64(42),
        db: DbId::new("bench").unwrap(),
    };
    let src = dir.path().join("pages.bin");
    write_random(&src, size_mib, &mut bench.rng);
    let restic = Restic::new(dir.path());
    if restic.is_none() {
        println!("restic not found (apt-get install restic): reference figures skipped");
    }
    let mut m = Local::default();
    for run in 0..runs {
        bench.local_run(run, &src, restic.as_ref(), &mut m);
    }
    println!();
    println!("local store ({runs} runs, median (min–max)):");
    let line =
        |label: &str, v: &[f64], unit: &str| println!("  {label:<44} {} {unit}", Spread::of(v));
    line("disk copy of the file, with fsync:", &m.copy, "s");
    line("full checkpoint:", &m.full, "s");
    line(
        "full checkpoint (engine marks state dir):",
        &m.full_marks,
        "s",
    );
    line(
        &format!("incremental, digest scan (mean of {steps}):"),
        &m.inc,
        "s",
    );
    line(
        &format!("incremental, engine marks (mean of {steps}):"),
        &m.inc_marks,
        "s",
    );
    line("uploaded per incremental:", &m.uploaded_mib, "MiB");
    line("restore, generation 1 (no deltas):", &m.restore_first, "s");
    line(
        &format!("restore, generation {} ({steps} deltas deep):", steps + 1),
        &m.restore_last,
        "s",
    );
    println!("local ratios (goal in brackets; met only if every run meets it):");
    let r = |label: &str, v: Vec<f64>, goal| println!("{}", ratio_line(label, &v, goal));
    r(
        "bytes uploaded / bytes changed, per incremental",
        m.uploaded_per_changed.clone(),
        Some(Goal::AtMost(1.15)),
    );
    r(
        "incremental / full time, digest scan",
        ratios(&m.inc, &m.full),
        Some(Goal::AtMost(0.10)),
    );
    r(
        "incremental / full time, engine marks",
        ratios(&m.inc_marks, &m.full_marks),
        None,
    );
    r(
        &format!("restore generation {} / generation 1", steps + 1),
        ratios(&m.restore_last, &m.restore_first),
        Some(Goal::AtMost(1.1)),
    );
    r(
        "full checkpoint / disk copy",
        ratios(&m.full, &m.copy),
        None,
    );
    r(
        "restore generation 1 / disk copy",
        ratios(&m.restore_first, &m.copy),
        None,
    );
    if let Some(rs) = &restic {
        println!(
            "restic {} (reference, same workload, local repository):",
            rs.version
        );
        line("restic full backup:", &m.restic_full, "s");
        line(
            &format!("restic incremental (mean of {steps}):"),
            &m.restic_inc,
            "s",
        );
        let added: Vec<f64> = m.restic_inc_bytes.iter().map(|b| b / 1048576.0).collect();
        line("restic added per incremental:", &added, "MiB");
        let cairn_bytes: Vec<f64> = m.uploaded_mib.iter().map(|b| b * 1048576.0).collect();
        r(
            "cairn / restic, bytes per incremental",
            ratios(&cairn_bytes, &m.restic_inc_bytes),
            None,
        );
        r(
            "cairn / restic, time per incremental (digest scan)",
            ratios(&m.inc, &m.restic_inc),
            None,
        );
        r(
            "cairn / restic, time per incremental (engine marks)",
            ratios(&m.inc_marks, &m.restic_inc),
            None,
        );
    }
    if s3_mib > 0 {
        bench.s3_part(s3_mib, runs);
    } else {
        println!("S3 part skipped: CAIRN_BENCH_S3_MIB=0");
    }
}
