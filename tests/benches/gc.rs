//! Garbage collection figures (issue 10).
//!
//! 1. Store bytes before and after `gc --keep-last 3 --grace 0s` for a ten-generation
//!    history of a page file on the local store: each generation after the first rewrites a
//!    quarter of the chunks and changes a few pages of others (deltas), so old chunk
//!    versions become garbage while old bases stay live under retained deltas.
//! 2. Time and requests of one collection of a store of `CAIRN_BENCH_GC_BLOBS` blobs on
//!    moto (default 2,000; the README's figure uses 100,000): a ten-generation history of
//!    one-page chunks, each generation rewriting a tenth of them, collected with
//!    `keep-last 3`. Requests are counted twice: by Cairn's store statistics (attempts by
//!    operation) and by moto's own request log (HTTP requests by method, so listing pages
//!    and bulk deletes count as the server saw them).
//!
//! Every figure is the median and min–max of `CAIRN_BENCH_RUNS` runs (default 3), each on
//! a fresh history. `cargo bench -p cairn-tests --bench gc`; `CAIRN_BENCH_DIR` sets the
//! work directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use cairn_orchestrator::{
    Checkpointer, Config, DbId, Env, GcOptions, Generation, RemoteStore, Source, StoreConfig,
};
use cairn_tests::s3::S3Server;
use rand::{Rng, RngCore, SeedableRng};

const PAGE: usize = 4096;

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

fn show(v: &[f64], digits: usize) -> String {
    let (m, lo, hi) = spread(v.to_vec());
    format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

fn rt() -> tokio::runtime::Runtime {
    cairn_tests::fixtures::runtime().unwrap()
}

/// Objects and bytes under the store's root.
async fn usage(store: &RemoteStore) -> (u64, u64) {
    let all = store.list("").await.unwrap();
    (all.len() as u64, all.iter().map(|o| o.size).sum())
}

fn keep_last(n: u64) -> GcOptions {
    GcOptions {
        keep_last: Some(n),
        ..Default::default()
    }
}

/// Writes ten generations of a page file of `chunks` chunks of `chunk` bytes: each after
/// the first rewrites `rewrite` of the chunks and changes one page in `touch` others.
async fn history(
    cp: &Checkpointer,
    db: &DbId,
    path: &Path,
    chunks: usize,
    chunk: usize,
    (rewrite, touch): (f64, f64),
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; chunks * chunk];
    rng.fill_bytes(&mut data);
    let source = Source::Pages {
        path: path.to_path_buf(),
        page_size: PAGE as u32,
    };
    for g in 0..10 {
        if g > 0 {
            for c in 0..chunks {
                let at = c * chunk;
                if rng.gen_bool(rewrite) {
                    rng.fill_bytes(&mut data[at..at + chunk]);
                } else if rng.gen_bool(touch) {
                    let p = rng.gen_range(0..chunk / PAGE);
                    rng.fill_bytes(&mut data[at + p * PAGE..at + (p + 1) * PAGE]);
                }
            }
        }
        std::fs::write(path, &data).unwrap();
        cp.checkpoint(db, &source).await.unwrap();
    }
}

/// Part 1: bytes before and after on the local store.
fn local_history(dir: &Path, reps: usize) {
    let rt = rt();
    let (mut before, mut after, mut ratio, mut live) = (vec![], vec![], vec![], vec![]);
    for rep in 0..reps {
        let work = dir.join(format!("local-{rep}"));
        let mut cfg = Config::new(work.join("state")).unwrap();
        cfg.chunk_size = 64 * 1024;
        let cp = Checkpointer::open(cfg).unwrap();
        let db = DbId::new("ten").unwrap();
        rt.block_on(async {
            history(
                &cp,
                &db,
                &work.join("db.pages"),
                256,
                64 * 1024,
                (0.25, 0.25),
                rep as u64,
            )
            .await;
            let (_, b0) = usage(cp.store()).await;
            let r = cp.gc(&db, &keep_last(3)).await.unwrap();
            let (_, b1) = usage(cp.store()).await;
            assert_eq!(r.generations_retained.len(), 3, "{r:?}");
            // Every retained generation still restores.
            for g in &r.generations_retained {
                let out = work.join(format!("restored-{g}"));
                cp.restore(&db, Some(Generation(*g)), &out).await.unwrap();
            }
            before.push(b0 as f64 / 1048576.0);
            after.push(b1 as f64 / 1048576.0);
            ratio.push(b1 as f64 / b0 as f64);
            live.push(r.bytes_kept as f64 / 1048576.0);
        });
    }
    println!("## 1. Ten generations of a 16 MiB page file, keep-last 3, local store ({reps} runs)");
    println!("| store before, MiB | store after, MiB | after ÷ before | blobs kept, MiB |");
    println!("|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} |",
        show(&before, 1),
        show(&after, 1),
        show(&ratio, 3),
        show(&live, 1)
    );
}

/// `l` without ANSI colour sequences (`ESC [ … m`).
fn strip_colour(l: &str) -> String {
    let mut out = String::with_capacity(l.len());
    let mut chars = l.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// HTTP requests in moto's log after line `from`, by method.
fn moto_requests(log: &Path, from: usize) -> (usize, BTreeMap<String, usize>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut by = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for l in lines.iter().skip(from) {
        // werkzeug: `127.0.0.1 - - [date] "METHOD /path HTTP/1.1" status -`, with colour
        // codes around some requests.
        let l = strip_colour(l);
        if let Some(m) = l.split('"').nth(1).and_then(|r| r.split(' ').next()) {
            let path = l.split('"').nth(1).unwrap_or("");
            let what = if m == "POST" && path.contains("?delete") {
                "POST ?delete (bulk)".to_string()
            } else if m == "GET" && path.contains("list-type") {
                "GET listing page".to_string()
            } else {
                m.to_string()
            };
            *by.entry(what).or_insert(0) += 1;
        }
    }
    (lines.len(), by)
}

/// Part 2: one collection of a large store on moto.
fn moto_store(dir: &Path, reps: usize, blobs: usize) {
    let server = match S3Server::start() {
        Ok(s) => s,
        Err(e) => {
            println!("## 2. skipped: no S3 server: {e}");
            return;
        }
    };
    let rt = rt();
    // One-page chunks; ten generations rewriting a tenth each: chunks × 1.9 blobs.
    let chunks = (blobs as f64 / 1.9).ceil() as usize;
    let (mut secs, mut objects, mut deleted, mut cairn_reqs, mut http) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut last_by = BTreeMap::new();
    let mut last_ops = String::new();
    for rep in 0..reps {
        let work = dir.join(format!("moto-{rep}"));
        let prefix = format!("gc-{rep}");
        let store = server.open_store(&prefix, StoreConfig::default()).unwrap();
        let mut cfg = Config::new(work.join("state")).unwrap();
        cfg.chunk_size = PAGE as u64;
        cfg.store_url = Some(server.url(&prefix));
        let cp = Checkpointer::open_with(cfg, store.clone(), Env::system()).unwrap();
        let db = DbId::new("big").unwrap();
        let t = Instant::now();
        rt.block_on(history(
            &cp,
            &db,
            &work.join("db.pages"),
            chunks,
            PAGE,
            (0.1, 0.0),
            100 + rep as u64,
        ));
        let (n, _) = rt.block_on(usage(&store));
        eprintln!(
            "run {rep}: history of {n} objects written in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        // The collection runs on a fresh state directory, as on another machine.
        let mut cfg = Config::new(work.join("collector")).unwrap();
        cfg.store_url = Some(server.url(&prefix));
        let store = server.open_store(&prefix, StoreConfig::default()).unwrap();
        let gc = Checkpointer::open_with(cfg, store.clone(), Env::system()).unwrap();
        let (from, _) = moto_requests(server.log_path(), 0);
        let s0 = store.stats();
        let t = Instant::now();
        let r = rt.block_on(gc.gc(&db, &keep_last(3))).unwrap();
        secs.push(t.elapsed().as_secs_f64());
        let s1 = store.stats();
        let (_, by) = moto_requests(server.log_path(), from);
        objects.push(n as f64);
        deleted.push(r.blobs_deleted as f64);
        cairn_reqs.push((s1.requests - s0.requests) as f64);
        http.push(by.values().sum::<usize>() as f64);
        last_ops = format!(
            "get {}, head {}, put {}, list {}, delete {}",
            s1.by_op.get - s0.by_op.get,
            s1.by_op.head - s0.by_op.head,
            s1.by_op.put - s0.by_op.put,
            s1.by_op.list - s0.by_op.list,
            s1.by_op.delete - s0.by_op.delete
        );
        last_by = by;
        assert_eq!(s1.by_op.head - s0.by_op.head, 0, "no HEAD per blob");
    }
    println!("\n## 2. One collection on moto, fresh state directory, keep-last 3 ({reps} runs)");
    println!("| objects in the store | blobs deleted | seconds | Cairn request attempts | HTTP requests at moto |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} |",
        show(&objects, 0),
        show(&deleted, 0),
        show(&secs, 1),
        show(&cairn_reqs, 0),
        show(&http, 0)
    );
    println!("last run, Cairn's attempts by operation: {last_ops}");
    println!("last run, moto's requests: {last_by:?}");
}

fn main() {
    let reps = env_usize("CAIRN_BENCH_RUNS", 3).max(1);
    let blobs = env_usize("CAIRN_BENCH_GC_BLOBS", 2_000);
    let base = std::env::var_os("CAIRN_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    local_history(dir.path(), reps);
    moto_store(dir.path(), reps, blobs);
}
