//! Incremental checkpoint benchmark (issue 3), with restic as the reference point.
//!
//! A page file (default 1 GiB of 4 KiB pages) is checkpointed in full to the local store,
//! then 1% of its pages change at random and it is checkpointed again, ten times; the last
//! generation and the first are restored. The same workload goes through `restic` into a
//! local repository. Everything is measured in this one run and printed as ratios.
//!
//! `cargo bench -p cairn-tests --bench incremental`.
//! Environment: `CAIRN_BENCH_MIB` (file size, default 1024), `CAIRN_BENCH_STEPS` (default
//! 10), `CAIRN_BENCH_DIR` (work directory, default the system temp dir).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_core::{DbId, DirtyTracker, Generation};
use cairn_orchestrator::{CheckpointOptions, CheckpointReport, Checkpointer, Config, Source};
use rand::{Rng, RngCore, SeedableRng};

const PAGE: usize = 4096;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn copy_with_fsync(from: &Path, to: &Path) -> Duration {
    let t = Instant::now();
    std::fs::copy(from, to).unwrap();
    File::open(to).unwrap().sync_all().unwrap();
    t.elapsed()
}

struct Restic {
    repo: PathBuf,
}

impl Restic {
    fn new(dir: &Path) -> Option<Self> {
        let ok = Command::new("restic")
            .arg("version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            println!("restic not found (apt-get install restic): reference figures skipped");
            return None;
        }
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
        Some(Self { repo })
    }

    /// Backs up `path`; returns (bytes added to the repository, wall time).
    fn backup(&self, path: &Path) -> (u64, Duration) {
        let t = Instant::now();
        let out = Command::new("restic")
            .args(["backup", "--json", "--quiet", "--repo"])
            .arg(&self.repo)
            .arg(path)
            .env("RESTIC_PASSWORD", "bench")
            .output()
            .unwrap();
        let elapsed = t.elapsed();
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
        (added, elapsed)
    }
}

fn main() {
    let size_mib = env_usize("CAIRN_BENCH_MIB", 1024);
    let steps = env_usize("CAIRN_BENCH_STEPS", 10);
    let base = std::env::var("CAIRN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(base).unwrap();
    let src = dir.path().join("pages.bin");
    let pages = size_mib * 1024 * 1024 / PAGE;
    println!("incremental benchmark: {size_mib} MiB page file ({pages} pages of {PAGE} B), {steps} steps of 1% dirty pages");
    println!("work directory: {}", dir.path().display());

    let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
    {
        let mut f = File::create(&src).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..size_mib {
            rng.fill_bytes(&mut buf);
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }
    let t_copy = copy_with_fsync(&src, &dir.path().join("copy.bin"));
    std::fs::remove_file(dir.path().join("copy.bin")).unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cp = Checkpointer::open(Config::new(dir.path().join("state")).unwrap()).unwrap();
    let tracked_cp =
        Checkpointer::open(Config::new(dir.path().join("state-tracked")).unwrap()).unwrap();
    let db = DbId::new("bench").unwrap();
    let source = Source::Pages {
        path: src.clone(),
        page_size: PAGE as u32,
    };
    let restic = Restic::new(dir.path());

    let t = Instant::now();
    let full: CheckpointReport = rt.block_on(cp.checkpoint(&db, &source)).unwrap();
    let t_full = t.elapsed();
    let tracker = DirtyTracker::new(pages as u64);
    let t = Instant::now();
    rt.block_on(tracked_cp.checkpoint(&db, &source)).unwrap();
    let t_full_tracked = t.elapsed();
    let restic_full = restic.as_ref().map(|r| r.backup(&src));

    let dirty_per_step = (pages / 100).max(1);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    let mut inc = Vec::new();
    let mut inc_tracked = Vec::new();
    let mut restic_inc = Vec::new();
    let mut page_buf = vec![0u8; PAGE];
    for _ in 0..steps {
        let mut chosen = std::collections::BTreeSet::new();
        while chosen.len() < dirty_per_step {
            chosen.insert(rng.gen_range(0..pages));
        }
        for p in &chosen {
            rng.fill_bytes(&mut page_buf);
            f.write_all_at(&page_buf, (*p * PAGE) as u64).unwrap();
            tracker.mark(*p as u64);
        }
        f.sync_all().unwrap();
        let t = Instant::now();
        let r = rt.block_on(cp.checkpoint(&db, &source)).unwrap();
        inc.push((r, t.elapsed()));
        let opts = CheckpointOptions {
            dirty: Some(tracker.drain()),
            ..Default::default()
        };
        let t = Instant::now();
        let r = rt
            .block_on(tracked_cp.checkpoint_with(&db, &source, &opts).wait())
            .unwrap();
        inc_tracked.push((r, t.elapsed()));
        if let Some(r) = &restic {
            restic_inc.push(r.backup(&src));
        }
    }
    let last = Generation(inc.last().map_or(1, |(r, _)| r.generation));
    let restore = |g: Generation| {
        let out = dir.path().join(format!("restore-{g}"));
        let t = Instant::now();
        rt.block_on(cp.restore(&db, Some(g), &out)).unwrap();
        let e = t.elapsed();
        std::fs::remove_file(&out).unwrap();
        e
    };
    restore(Generation(1));
    let (mut t_base, mut t_last) = (Duration::MAX, Duration::MAX);
    for _ in 0..2 {
        t_base = t_base.min(restore(Generation(1)));
        t_last = t_last.min(restore(last));
    }
    // Restored bytes equal the source.
    let check = dir.path().join("check");
    rt.block_on(cp.restore(&db, Some(last), &check)).unwrap();
    assert!(
        std::fs::read(&check).unwrap() == std::fs::read(&src).unwrap(),
        "restore differs from source"
    );

    let n = inc.len().max(1) as f64;
    let avg = |v: &[(CheckpointReport, Duration)],
               f: &dyn Fn(&(CheckpointReport, Duration)) -> f64| {
        v.iter().map(f).sum::<f64>() / n
    };
    let up = avg(&inc, &|(r, _)| r.bytes_uploaded as f64);
    let dirty = avg(&inc, &|(r, _)| r.bytes_dirty as f64);
    let t_inc = avg(&inc, &|(_, d)| secs(*d));
    let up_tr = avg(&inc_tracked, &|(r, _)| r.bytes_uploaded as f64);
    let t_inc_tr = avg(&inc_tracked, &|(_, d)| secs(*d));
    let changed = (dirty_per_step * PAGE) as f64;

    println!();
    println!(
        "disk copy of the file (with fsync):       {:>8.3} s",
        secs(t_copy)
    );
    println!(
        "full checkpoint:                          {:>8.3} s, {:.1} MiB uploaded",
        secs(t_full),
        mib(full.bytes_uploaded)
    );
    println!("incremental checkpoint (digest scan):     {:>8.3} s, {:.2} MiB uploaded, {:.2} MiB dirty (avg of {steps})", t_inc, up / 1048576.0, dirty / 1048576.0);
    println!("incremental checkpoint (engine marks):    {:>8.3} s, {:.2} MiB uploaded (avg of {steps}; full took {:.3} s)", t_inc_tr, up_tr / 1048576.0, secs(t_full_tracked));
    println!(
        "restore, generation 1 (no deltas):        {:>8.3} s",
        secs(t_base)
    );
    println!(
        "restore, generation {last} ({} deltas deep): {:>6.3} s",
        steps,
        secs(t_last)
    );
    println!();
    println!("ratios (goal in brackets):");
    println!(
        "  bytes uploaded / bytes changed, per incremental:     {:.3}  [<= 1.15]",
        up / changed
    );
    println!(
        "  incremental time / full time (digest scan):          {:.3}  [<= 0.10]",
        t_inc / secs(t_full)
    );
    println!(
        "  incremental time / full time (engine marks):         {:.3}",
        t_inc_tr / secs(t_full_tracked)
    );
    println!(
        "  restore last / restore generation without deltas:    {:.3}  [<= 1.3]",
        secs(t_last) / secs(t_base)
    );
    println!(
        "  full checkpoint time / disk copy time:               {:.3}",
        secs(t_full) / secs(t_copy)
    );
    println!(
        "  restore time / disk copy time:                       {:.3}",
        secs(t_base) / secs(t_copy)
    );
    if let (Some((rf_bytes, rf_time)), false) = (restic_full, restic_inc.is_empty()) {
        let rn = restic_inc.len() as f64;
        let r_bytes = restic_inc.iter().map(|(b, _)| *b as f64).sum::<f64>() / rn;
        let r_time = restic_inc.iter().map(|(_, d)| secs(*d)).sum::<f64>() / rn;
        println!();
        println!(
            "restic {} (reference, same workload, local repository):",
            restic_version()
        );
        println!(
            "  full backup: {:.3} s, {:.1} MiB added",
            secs(rf_time),
            mib(rf_bytes)
        );
        println!(
            "  incremental: {:.3} s, {:.2} MiB added (avg of {steps})",
            r_time,
            r_bytes / 1048576.0
        );
        println!(
            "  cairn / restic, bytes per incremental (digest scan): {:.3}",
            up / r_bytes.max(1.0)
        );
        println!(
            "  cairn / restic, time per incremental (digest scan):  {:.3}",
            t_inc / r_time
        );
        println!(
            "  cairn / restic, time per incremental (engine marks): {:.3}",
            t_inc_tr / r_time
        );
    }
}

fn restic_version() -> String {
    Command::new("restic")
        .arg("version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .unwrap_or("?")
                .to_string()
        })
        .unwrap_or_default()
}
