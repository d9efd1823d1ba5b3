//! Differential manifests (issue 9): manifest bytes and publish time per generation as a
//! database grows to `CAIRN_BENCH_SEGMENTS` segments (default 10,000) and a page file of
//! `CAIRN_BENCH_CHUNKS` chunks (default 1,000), on the local store; and `restore_at` of the
//! newest point against a restore of its page generation alone.
//!
//! The database gets one small segment per generation (the engine deletes its local copy
//! once it is published, as it may below the watermark) and, every 100 segments, a page
//! checkpoint that changes two pages. Publications are grouped by the stream's size; each
//! group shows the median and min–max of the diff publications, and the full manifests
//! (written every 64 generations) with their amortised cost per publication.
//!
//! `cargo bench -p cairn-tests --bench manifests`. Environment: `CAIRN_BENCH_SEGMENTS`,
//! `CAIRN_BENCH_CHUNKS`, `CAIRN_BENCH_RUNS` (restore repetitions, default 3),
//! `CAIRN_BENCH_DIR` (work directory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use cairn_orchestrator::{
    CheckpointOptions, Checkpointer, Config, DbId, Generation, Lsn, Source, MAX_DIFF_CHAIN,
};
use rand::{Rng, RngCore, SeedableRng};

const PAGE: usize = 4096;
const CHUNK: usize = 4 * PAGE;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Median, min and max.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

struct Publish {
    segments: usize,
    bytes: u64,
    ms: f64,
    full: bool,
}

fn main() {
    let segments = env_usize("CAIRN_BENCH_SEGMENTS", 10_000);
    let chunks = env_usize("CAIRN_BENCH_CHUNKS", 1_000);
    let reps = env_usize("CAIRN_BENCH_RUNS", 3).max(1);
    let base = std::env::var_os("CAIRN_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = Config::new(dir.path().join("state")).unwrap();
    cfg.chunk_size = CHUNK as u64;
    let cp = Checkpointer::open(cfg).unwrap();
    let db = DbId::new("grow").unwrap();
    let wal = dir.path().join("wal");
    std::fs::create_dir_all(&wal).unwrap();
    let pages_path = dir.path().join("pages");
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut data = vec![0u8; chunks * CHUNK];
    rng.fill_bytes(&mut data);
    std::fs::write(&pages_path, &data).unwrap();
    let pages = Source::Pages {
        path: pages_path.clone(),
        page_size: PAGE as u32,
    };
    let mut log: Vec<Publish> = Vec::new();
    let mut end = 0u64;
    let mut last_page_gen = 0u64;
    let started = Instant::now();
    rt.block_on(async {
        let opts = CheckpointOptions {
            lsn: Some(Lsn(0)),
            ..Default::default()
        };
        let r = cp.checkpoint_with(&db, &pages, &opts).await.unwrap();
        last_page_gen = r.generation;
        for i in 0..segments {
            let name = format!("{i:08}.seg");
            let mut seg = vec![0u8; 256];
            rng.fill_bytes(&mut seg);
            std::fs::write(wal.join(&name), &seg).unwrap();
            end += seg.len() as u64;
            let t = Instant::now();
            let r = cp
                .checkpoint(&db, &Source::Segments(wal.clone()))
                .await
                .unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            std::fs::remove_file(wal.join(&name)).unwrap();
            let full = cp.state(&db, None).await.unwrap().manifest.chain() == 0;
            log.push(Publish {
                segments: i + 1,
                bytes: r.manifest_bytes,
                ms,
                full,
            });
            if (i + 1) % 100 == 0 {
                for _ in 0..2 {
                    let p = rng.gen_range(0..chunks * CHUNK / PAGE);
                    rng.fill_bytes(&mut data[p * PAGE..(p + 1) * PAGE]);
                }
                std::fs::write(&pages_path, &data).unwrap();
                let opts = CheckpointOptions {
                    lsn: Some(Lsn(end)),
                    ..Default::default()
                };
                let r = cp.checkpoint_with(&db, &pages, &opts).await.unwrap();
                last_page_gen = r.generation;
            }
        }
    });
    let grown = started.elapsed();
    println!(
        "grew to {segments} segments and {chunks} chunks ({} generations) in {:.1} s; a full manifest every {MAX_DIFF_CHAIN} generations",
        log.len() + 1 + segments / 100,
        grown.as_secs_f64()
    );
    println!(
        "| segments in the stream | diff publications: manifest bytes, median (min–max) | publish ms, median (min–max) | full manifests: bytes, max | amortised bytes per publication |"
    );
    println!("|---|---|---|---|---|");
    let mut lo = 0usize;
    for hi in [100usize, 1_000, 5_000, 10_000, usize::MAX] {
        let group: Vec<&Publish> = log
            .iter()
            .filter(|p| p.segments > lo && p.segments <= hi)
            .collect();
        if group.is_empty() {
            break;
        }
        let diffs: Vec<&&Publish> = group.iter().filter(|p| !p.full).collect();
        let (b, bmin, bmax) = spread(diffs.iter().map(|p| p.bytes as f64).collect());
        let (t, tmin, tmax) = spread(diffs.iter().map(|p| p.ms).collect());
        let full_max = group
            .iter()
            .filter(|p| p.full)
            .map(|p| p.bytes)
            .max()
            .unwrap_or(0);
        let amortised = group.iter().map(|p| p.bytes).sum::<u64>() as f64 / group.len() as f64;
        let last = group.last().map_or(0, |p| p.segments);
        println!(
            "| {}–{last} | {b:.0} ({bmin:.0}–{bmax:.0}) | {t:.1} ({tmin:.1}–{tmax:.1}) | {full_max} | {amortised:.0} |",
            lo + 1
        );
        lo = hi;
        if last < hi {
            break;
        }
    }
    // Restore of the newest point against its page generation alone, sides alternating.
    let (mut at, mut alone) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for rep in 0..reps {
            for side in [rep % 2, (rep + 1) % 2] {
                let out = dir.path().join(format!("r-{rep}-{side}"));
                let t = Instant::now();
                if side == 0 {
                    let r = cp.restore_at(&db, Lsn(end), &out).await.unwrap();
                    assert_eq!(r.page_generation, Some(last_page_gen));
                    at.push(t.elapsed());
                } else {
                    cp.restore(&db, Some(Generation(last_page_gen)), &out)
                        .await
                        .unwrap();
                    alone.push(t.elapsed());
                }
                let _ = std::fs::remove_dir_all(&out);
                let _ = std::fs::remove_file(&out);
            }
        }
    });
    let ms = |v: &[Duration]| spread(v.iter().map(|d| d.as_secs_f64() * 1e3).collect());
    let ratios: Vec<f64> = at
        .iter()
        .zip(&alone)
        .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64().max(1e-9))
        .collect();
    let (a, amin, amax) = ms(&at);
    let (p, pmin, pmax) = ms(&alone);
    let (r, rmin, rmax) = spread(ratios);
    println!(
        "restore_at(newest LSN): {a:.1} ms ({amin:.1}–{amax:.1}); restore of its page generation alone: {p:.1} ms ({pmin:.1}–{pmax:.1}); ratio {r:.2} ({rmin:.2}–{rmax:.2}) over {reps} runs"
    );
}
