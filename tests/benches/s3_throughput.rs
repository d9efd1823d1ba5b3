//! S3 upload benchmark (issue 5): Cairn's full checkpoint of one large segment to a local S3
//! server (moto on 127.0.0.1), against a plain `object_store` multipart upload of the same
//! bytes to the same server in the same run.
//!
//! Each side runs in its own child process (this binary re-executed with
//! `CAIRN_BENCH_ROLE`), so each one's peak resident memory (VmHWM) is its own. Cairn uses its
//! defaults (8 MiB parts, 4 in flight, CRC64-NVME transport checksums); the baseline uses the
//! same part size and concurrency with `WriteMultipart` and no checksum header. Cairn's time
//! includes everything a checkpoint does: hashing the segment, the upload re-verifying it
//! while it streams (sealed segments go to remote stores straight from their file, see
//! docs/decisions/0016), the job bookkeeping and the manifest publish.
//!
//! A third child measures the remote store alone uploading the segment from its file
//! (`RemoteStore::put_blob_range`), without the rest of the checkpoint.
//!
//! Each side runs `CAIRN_BENCH_RUNS` times (default and minimum 3), in an order that
//! rotates from run to run; the throughput ratio is taken within each run, and every figure
//! is printed as the median with its min–max ([`cairn_tests::bench`]).
//!
//! `cargo bench -p cairn-tests --bench s3_throughput`. Environment: `CAIRN_BENCH_MIB`
//! (segment size, default 1024), `CAIRN_BENCH_DIR` (work directory, default the system temp
//! dir), `CAIRN_BENCH_RUNS` (`CAIRN_BENCH_REPS` is read too).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use cairn_core::DbId;
use cairn_orchestrator::{Checkpointer, Config, Env, Source};
use cairn_remote_store::{RemoteStore, StoreConfig};
use cairn_tests::bench::{ratio_line, Goal, Spread};
use cairn_tests::s3::{s3_config, S3Server};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use rand::{RngCore, SeedableRng};

const PART: usize = 8 << 20;
const PARTS_IN_FLIGHT: usize = 4;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Cairn's store config: defaults, with `CAIRN_BENCH_CHECKSUM` (`crc64nvme`, `sha256`,
/// `none`) overriding the transport checksum.
fn cairn_store_config(endpoint: &str) -> StoreConfig {
    let mut cfg = StoreConfig::default();
    if let Ok(c) = std::env::var("CAIRN_BENCH_CHECKSUM") {
        cfg.checksum = match c.as_str() {
            "none" => cairn_remote_store::TransportChecksum::None,
            "sha256" => cairn_remote_store::TransportChecksum::Sha256,
            _ => cairn_remote_store::TransportChecksum::Crc64nvme,
        };
    }
    s3_config(endpoint, "test", "test", cfg)
}

/// Peak resident set of this process in KiB.
fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Run {
    secs: f64,
    hwm_kib: u64,
}

fn child(role: &str, endpoint: &str, bucket: &str, segments: &Path, work: &Path) -> Run {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("CAIRN_BENCH_ROLE", role)
        .env("CAIRN_BENCH_ENDPOINT", endpoint)
        .env("CAIRN_BENCH_BUCKET", bucket)
        .env("CAIRN_BENCH_SEGMENTS", segments)
        .env("CAIRN_BENCH_WORK", work)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{role} run failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("{role} printed no result: {stdout}"));
    let mut it = line.split_whitespace();
    let secs = it.next().unwrap().parse().unwrap();
    let hwm_kib = it.next().unwrap().parse().unwrap();
    Run { secs, hwm_kib }
}

fn var(k: &str) -> String {
    std::env::var(k).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Child: Cairn's checkpoint of the segment directory with default settings.
fn run_cairn() {
    let (endpoint, bucket) = (var("CAIRN_BENCH_ENDPOINT"), var("CAIRN_BENCH_BUCKET"));
    let segments = PathBuf::from(var("CAIRN_BENCH_SEGMENTS"));
    let work = PathBuf::from(var("CAIRN_BENCH_WORK"));
    let url = format!("s3://{bucket}/cairn");
    let store = RemoteStore::open_with(&url, cairn_store_config(&endpoint)).unwrap();
    let mut cfg = Config::new(work.join("state")).unwrap();
    cfg.store_url = Some(url);
    let cp = Checkpointer::open_with(cfg, store.clone(), Env::system()).unwrap();
    let db = DbId::new("bench").unwrap();
    let t = Instant::now();
    let report = rt()
        .block_on(cp.checkpoint(&db, &Source::Segments(segments)))
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!("cairn: {report:?}\nstore: {:?}", store.stats());
    println!("RESULT {secs} {}", vm_hwm_kib());
}

/// Child: the remote store alone, uploading the segment straight from its file
/// (`put_blob_range`, no staging copy), including the hashing pass that names the blob.
fn run_direct() {
    let (endpoint, bucket) = (var("CAIRN_BENCH_ENDPOINT"), var("CAIRN_BENCH_BUCKET"));
    let segments = PathBuf::from(var("CAIRN_BENCH_SEGMENTS"));
    let file = std::fs::read_dir(&segments)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let store = RemoteStore::open_with(
        &format!("s3://{bucket}/direct"),
        cairn_store_config(&endpoint),
    )
    .unwrap();
    let t = Instant::now();
    let mut h = cairn_core::PayloadHasher::new();
    let mut f = File::open(&file).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let (addr, xxh3) = h.finish();
    let blob = cairn_core::BlobRef {
        kind: cairn_core::BlobKind::Segment,
        crc64: addr.crc64,
        len: addr.len,
        xxh3,
        alias: 0,
        scheme: 0,
        epoch: 0,
    };
    rt().block_on(store.put_blob_range("segment", &file, 0, &blob))
        .unwrap();
    println!("RESULT {} {}", t.elapsed().as_secs_f64(), vm_hwm_kib());
}

/// Child: a plain `object_store` multipart upload of the same file.
fn run_plain() {
    let (endpoint, bucket) = (var("CAIRN_BENCH_ENDPOINT"), var("CAIRN_BENCH_BUCKET"));
    let segments = PathBuf::from(var("CAIRN_BENCH_SEGMENTS"));
    let file = std::fs::read_dir(&segments)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let s3 = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_endpoint(endpoint)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_allow_http(true)
        .build()
        .unwrap();
    let t = Instant::now();
    rt().block_on(async {
        let upload = s3
            .put_multipart(&ObjPath::from("plain/segment"))
            .await
            .unwrap();
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut f = File::open(&file).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            w.wait_for_capacity(PARTS_IN_FLIGHT).await.unwrap();
            w.write(&buf[..n]);
        }
        w.finish().await.unwrap();
        let size = s3.head(&ObjPath::from("plain/segment")).await.unwrap().size;
        assert_eq!(size, std::fs::metadata(&file).unwrap().len());
    });
    println!("RESULT {} {}", t.elapsed().as_secs_f64(), vm_hwm_kib());
}

/// Removes everything under `prefix` so moto's memory does not grow across runs.
fn clear(endpoint: &str, bucket: &str, prefix: &str) {
    let s3 = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_endpoint(endpoint)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_allow_http(true)
        .build()
        .unwrap();
    rt().block_on(async {
        use futures::TryStreamExt;
        let keys: Vec<_> = s3
            .list(Some(&ObjPath::from(prefix)))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .unwrap();
        for k in keys {
            s3.delete(&k).await.unwrap();
        }
    });
}

fn main() {
    match std::env::var("CAIRN_BENCH_ROLE").as_deref() {
        Ok("cairn") => return run_cairn(),
        Ok("plain") => return run_plain(),
        Ok("direct") => return run_direct(),
        _ => {}
    }
    let size_mib = env_usize("CAIRN_BENCH_MIB", 1024);
    let reps = env_usize("CAIRN_BENCH_RUNS", env_usize("CAIRN_BENCH_REPS", 3)).max(3);
    let base = std::env::var("CAIRN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(base).unwrap();
    let segments = dir.path().join("segments");
    std::fs::create_dir_all(&segments).unwrap();
    {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut f = File::create(segments.join("seg-00000000")).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..size_mib {
            rng.fill_bytes(&mut buf);
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }
    let bytes = (size_mib as u64) << 20;
    let server = S3Server::start().unwrap_or_else(|e| panic!("{e}"));
    println!(
        "s3 throughput benchmark: one {size_mib} MiB segment to moto at {}, {reps} runs of each side",
        server.endpoint()
    );
    let (mut plain, mut cairn, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let work = dir.path().join(format!("cairn-{rep}"));
        std::fs::create_dir_all(&work).unwrap();
        for side in 0..3 {
            let (role, prefix, out) = match (rep + side) % 3 {
                0 => ("plain", "plain", &mut plain),
                1 => ("cairn", "cairn", &mut cairn),
                _ => ("direct", "direct", &mut direct),
            };
            let r = child(role, server.endpoint(), server.bucket(), &segments, &work);
            clear(server.endpoint(), server.bucket(), prefix);
            out.push(r);
        }
        let show = |r: &Run| {
            format!(
                "{:.2} s ({:.0} MiB/s, peak RSS {:.0} MiB)",
                r.secs,
                mib(bytes) / r.secs,
                r.hwm_kib as f64 / 1024.0
            )
        };
        println!(
            "run {}: object_store {}; cairn {}; remote store straight from the segment {}",
            rep + 1,
            show(&plain[rep]),
            show(&cairn[rep]),
            show(&direct[rep])
        );
    }
    let rate = |v: &[Run]| Spread::of(&v.iter().map(|r| mib(bytes) / r.secs).collect::<Vec<_>>());
    let rss = |v: &[Run]| {
        Spread::of(
            &v.iter()
                .map(|r| r.hwm_kib as f64 / 1024.0)
                .collect::<Vec<_>>(),
        )
    };
    println!();
    println!("{reps} runs, median (min–max):");
    println!(
        "  object_store multipart upload:           {} MiB/s, peak RSS {} MiB",
        rate(&plain).show(0),
        rss(&plain).show(0)
    );
    println!(
        "  cairn full checkpoint:                   {} MiB/s, peak RSS {} MiB",
        rate(&cairn).show(0),
        rss(&cairn).show(0)
    );
    println!(
        "  remote store straight from the segment:  {} MiB/s, peak RSS {} MiB",
        rate(&direct).show(0),
        rss(&direct).show(0)
    );
    let ratio =
        |v: &[Run]| -> Vec<f64> { plain.iter().zip(v).map(|(p, c)| p.secs / c.secs).collect() };
    println!("ratios (goal in brackets; met only if every run meets it):");
    println!(
        "{}",
        ratio_line(
            "throughput cairn / object_store",
            &ratio(&cairn),
            Some(Goal::AtLeast(0.9))
        )
    );
    println!(
        "{}",
        ratio_line(
            "throughput remote store alone / object_store",
            &ratio(&direct),
            None
        )
    );
    let peak: Vec<f64> = cairn.iter().map(|r| r.hwm_kib as f64 / 1024.0).collect();
    let goal = Goal::AtMost(256.0);
    println!(
        "  cairn peak resident memory: {} MiB  [goal {goal} MiB for a 1 GiB segment: {}]",
        Spread::of(&peak).show(0),
        goal.verdict(&Spread::of(&peak))
    );
}
