//! Garbage collection against a real S3 server (moto on 127.0.0.1), as processes on two
//! machines: one state directory checkpoints a changing page file in a loop while another
//! runs `cairn gc --keep-last 2 --grace 0s` in a loop. Afterwards every generation that is
//! not expired restores exactly (from a third, fresh state directory) and passes a deep
//! verify, and a final collection leaves nothing unreferenced.
//!
//! The same file also kills collections with SIGKILL at random moments: each is resumed
//! by the next command, nothing retained is lost, and the blobs nothing references are
//! gone after a clean run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_tests::s3::S3Server;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

fn cairn(server: &S3Server, url: &str, state: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.arg("--state")
        .arg(state)
        .arg("--store")
        .arg(url)
        .args(args);
    server.apply_env(&mut c);
    c
}

fn json(server: &S3Server, url: &str, state: &Path, args: &[&str]) -> Value {
    let out = cairn(server, url, state, args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cairn {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Writes version `v` of the page file: a few pages changed since the last one.
fn change(path: &Path, data: &mut [u8], rng: &mut impl RngCore) {
    for _ in 0..4 {
        let p = rng.gen_range(0..data.len() / 4096);
        rng.fill_bytes(&mut data[p * 4096..(p + 1) * 4096]);
    }
    std::fs::write(path, &*data).unwrap();
}

/// Every generation not expired restores exactly to its expected bytes and verifies deep.
fn check_retained(
    server: &S3Server,
    url: &str,
    dir: &Path,
    snapshots: &BTreeMap<u64, Vec<u8>>,
) -> usize {
    let fresh = dir.join(format!("fresh-{}", rand::random::<u32>()));
    let listed = json(server, url, &fresh, &["ls", "--db", "d"]);
    let mut retained = 0;
    let mut last_data: Option<&Vec<u8>> = None;
    for g in listed.as_array().unwrap() {
        let gen = g["generation"].as_u64().unwrap();
        // A collection's generation holds its parent's data.
        let want = if g["gc"] == true {
            last_data
        } else {
            snapshots.get(&gen)
        };
        if g["gc"] != true {
            last_data = snapshots.get(&gen);
        }
        if g["expired"] == true {
            continue;
        }
        retained += 1;
        let out = dir.join(format!("r-{gen}-{}", rand::random::<u32>()));
        let s = gen.to_string();
        json(
            server,
            url,
            &fresh,
            &[
                "restore",
                "--db",
                "d",
                "--generation",
                &s,
                "--to",
                &out.display().to_string(),
            ],
        );
        let want = want.unwrap_or_else(|| panic!("no snapshot for generation {gen}: {listed}"));
        assert!(
            std::fs::read(&out).unwrap() == *want,
            "generation {gen} differs"
        );
        let v = json(
            server,
            url,
            &fresh,
            &["verify", "--db", "d", "--generation", &s, "--deep"],
        );
        assert_eq!(v["ok"], true, "{v}");
    }
    retained
}

#[test]
fn a_writer_and_a_collector_on_two_machines_lose_nothing_retained() {
    let server = S3Server::start().unwrap_or_else(|e| panic!("S3 server: {e}"));
    let url = server.url("gc-two");
    let dir = tempfile::tempdir().unwrap();
    let (writer, collector) = (dir.path().join("writer"), dir.path().join("collector"));
    let src = dir.path().join("db.bin");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut data = vec![0u8; 32 * 4096];
    rng.fill_bytes(&mut data);
    std::fs::write(&src, &data).unwrap();
    let src_s = src.display().to_string();
    let rounds: usize = std::env::var("CAIRN_GC_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let checkpoint = [
        "checkpoint",
        "--db",
        "d",
        "--kind",
        "pages",
        "--chunk-size",
        "16384",
        "--source",
        &src_s,
    ];
    let mut snapshots: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut runs = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            while runs < rounds && Instant::now() < deadline {
                let out = cairn(
                    &server,
                    &url,
                    &collector,
                    &[
                        "gc",
                        "--db",
                        "d",
                        "--keep-last",
                        "2",
                        "--grace",
                        "0s",
                        "--json",
                    ],
                )
                .output()
                .unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                // Before the first checkpoint there is no database yet.
                if out.status.success() || err.contains("unknown database") {
                    runs += 1;
                } else {
                    panic!("gc failed: {err}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            runs
        });
        for _ in 0..rounds {
            change(&src, &mut data, &mut rng);
            let r = json(&server, &url, &writer, &checkpoint);
            snapshots.insert(r["generation"].as_u64().unwrap(), data.clone());
        }
        assert!(gc.join().unwrap() > 0);
    });
    let retained = check_retained(&server, &url, dir.path(), &snapshots);
    assert!(retained >= 2, "keep-last 2 keeps at least two generations");
    // A last collection (nothing else running) leaves no unreferenced blob behind.
    json(
        &server,
        &url,
        &collector,
        &["gc", "--db", "d", "--keep-last", "2", "--grace", "0s"],
    );
    let dry = json(
        &server,
        &url,
        &collector,
        &["gc", "--db", "d", "--keep-last", "2", "--dry-run"],
    );
    assert_eq!(dry["generations_expired"], serde_json::json!([]), "{dry}");
    check_retained(&server, &url, dir.path(), &snapshots);
}

#[test]
fn a_collection_killed_at_random_moments_resumes_and_loses_nothing() {
    let server = S3Server::start().unwrap_or_else(|e| panic!("S3 server: {e}"));
    let url = server.url("gc-kill");
    let dir = tempfile::tempdir().unwrap();
    let state: PathBuf = dir.path().join("state");
    let src = dir.path().join("db.bin");
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut data = vec![0u8; 64 * 4096];
    rng.fill_bytes(&mut data);
    let src_s = src.display().to_string();
    let checkpoint = [
        "checkpoint",
        "--db",
        "d",
        "--kind",
        "pages",
        "--chunk-size",
        "16384",
        "--source",
        &src_s,
    ];
    let mut snapshots: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let kills: usize = std::env::var("CAIRN_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(6, |p: usize| p.div_ceil(3));
    let mut killed = 0;
    let mut calibrate = Duration::from_millis(500);
    for round in 0..kills {
        for _ in 0..3 {
            change(&src, &mut data, &mut rng);
            let r = json(&server, &url, &state, &checkpoint);
            snapshots.insert(r["generation"].as_u64().unwrap(), data.clone());
        }
        let gc = ["gc", "--db", "d", "--keep-last", "2", "--grace", "0s"];
        let mut child = cairn(&server, &url, &state, &gc)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = calibrate.mul_f64(rng.gen_range(0.05..1.0));
        let t = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                calibrate = t.elapsed().max(Duration::from_millis(100));
                break;
            }
            if t.elapsed() >= delay {
                child.kill().unwrap();
                child.wait().unwrap();
                killed += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // The next command resumes the collection first.
        let status = json(&server, &url, &state, &["resume"]);
        for r in status.as_array().unwrap() {
            assert_eq!(r["ok"], true, "round {round}: {r}");
        }
        check_retained(&server, &url, dir.path(), &snapshots);
    }
    json(
        &server,
        &url,
        &state,
        &["gc", "--db", "d", "--keep-last", "2", "--grace", "0s"],
    );
    let dry = json(
        &server,
        &url,
        &state,
        &["gc", "--db", "d", "--keep-last", "2", "--dry-run"],
    );
    assert_eq!(
        dry["blobs_deleted"], 0,
        "unreferenced blobs are gone: {dry}"
    );
    check_retained(&server, &url, dir.path(), &snapshots);
    println!("gc crash harness: {killed} collections killed of {kills}");
}
