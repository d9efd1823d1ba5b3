//! Crash harness: `cairn checkpoint` and `cairn restore` run as child processes against a
//! real S3 server (moto) on 127.0.0.1 and are killed with SIGKILL at random moments, then
//! restarted. Afterwards every published generation must restore to exactly the source
//! snapshot it was taken from, verify clean, have been published by exactly one job, and
//! blobs must not have been uploaded again beyond what was in flight at each kill.
//!
//! `CAIRN_CRASH_POINTS` sets the number of checkpoint kills (default 20; a restore kill is
//! added for every four); `CAIRN_CRASH_SEED` the random seed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_tests::s3::S3Server;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

/// Blob uploads a checkpoint keeps in flight (the library default).
const UPLOAD_CONCURRENCY: usize = 4;
const PAGE: usize = 4096;
const CHUNK: usize = 64 * 1024;

struct Rig {
    server: S3Server,
    dir: tempfile::TempDir,
    state: PathBuf,
    url: String,
    rng: rand::rngs::StdRng,
    kills: usize,
    phases: BTreeMap<String, usize>,
    /// Duration of the last run that completed: kill delays are drawn below it.
    last: Duration,
}

impl Rig {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.arg("--state")
            .arg(&self.state)
            .arg("--store")
            .arg(&self.url)
            .args(args);
        self.server.apply_env(&mut c);
        c
    }

    fn run_json(&self, args: &[&str]) -> Value {
        let out = self.cmd(args).arg("--json").output().unwrap();
        assert!(
            out.status.success(),
            "cairn {args:?} failed: {}\nS3 log tail:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.server.log_tail()
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("cairn {args:?}: bad JSON: {e}"))
    }

    /// Runs `args`, killing the process with SIGKILL after `delay` if it is still running.
    /// Returns whether it was killed; a run that completes updates `self.last`.
    fn run_or_kill(&mut self, args: &[&str], delay: Duration) -> bool {
        let started = Instant::now();
        let err = self.dir.path().join("stderr.txt");
        let mut child = self
            .cmd(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + delay;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "cairn {args:?} failed: {}",
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
                self.last = started.elapsed();
                return false;
            }
            if Instant::now() >= deadline {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                self.kills += 1;
                let jobs = self.run_json(&["status"]);
                let phase = jobs
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .rfind(|j| j["state"] == "running" || j["state"] == "queued")
                    })
                    .map(|j| {
                        let (kind, phase) = (
                            j["kind"].as_str().unwrap_or("?"),
                            j["phase"].as_str().unwrap_or("?"),
                        );
                        let (done, total) = (
                            j["progress"]["done"].as_u64().unwrap_or(0),
                            j["progress"]["total"].as_u64().unwrap_or(0),
                        );
                        let step = match (kind, phase) {
                            ("checkpoint", "new") => "before the plan",
                            ("checkpoint", "planned") if done == 0 => "planned, nothing staged",
                            ("checkpoint", "planned") if done < total => "staging and uploading",
                            ("checkpoint", "planned" | "staged" | "uploaded") => {
                                "around publication"
                            }
                            ("checkpoint", _) => "after publication",
                            ("restore", "written" | "planned") if done < total => "writing",
                            ("restore", _) => "around the final rename",
                            _ => phase,
                        };
                        format!("{kind}: {step}")
                    })
                    .unwrap_or_else(|| "before any job was recorded".into());
                *self.phases.entry(phase).or_default() += 1;
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn write_version(path: &Path, data: &mut Vec<u8>, rng: &mut impl RngCore, version: usize) {
    if version > 0 {
        let pages = data.len() / PAGE;
        for _ in 0..rng.gen_range(20..120) {
            let p = rng.gen_range(0..pages);
            rng.fill_bytes(&mut data[p * PAGE..(p + 1) * PAGE]);
        }
        if version.is_multiple_of(3) {
            let mut extra = vec![0u8; rng.gen_range(1..30) * PAGE];
            rng.fill_bytes(&mut extra);
            data.extend_from_slice(&extra);
        }
    }
    std::fs::write(path, &data).unwrap();
}

#[test]
fn kill_minus_nine_at_random_points_loses_nothing_and_repeats_nothing() {
    let points: usize = std::env::var("CAIRN_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("CAIRN_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xC4A5);
    let server = S3Server::start().unwrap_or_else(|e| panic!("S3 server: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("crash");
    let mut rig = Rig {
        state: dir.path().join("state"),
        server,
        dir,
        url,
        rng: rand::rngs::StdRng::seed_from_u64(seed),
        kills: 0,
        phases: BTreeMap::new(),
        last: Duration::ZERO,
    };
    let src = rig.dir.path().join("db.bin");
    let src_s = src.display().to_string();
    let mut data = vec![0u8; 96 * CHUNK];
    rig.rng.fill_bytes(&mut data);
    let checkpoint = [
        "checkpoint",
        "--db",
        "db",
        "--kind",
        "pages",
        "--chunk-size",
        "65536",
        "--source",
        &src_s,
    ];

    // Calibrate: how long a full checkpoint of this source takes here.
    std::fs::write(&src, &data).unwrap();
    let t = Instant::now();
    rig.run_json(&[
        "checkpoint",
        "--db",
        "calibration",
        "--kind",
        "pages",
        "--chunk-size",
        "65536",
        "--source",
        &src_s,
    ]);
    let full = t.elapsed().max(Duration::from_millis(50));
    rig.last = full;

    let versions = (points / 4).max(3);
    let mut snapshots: Vec<Vec<u8>> = Vec::new();
    let mut generation_version: BTreeMap<u64, usize> = BTreeMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 1);
    for v in 0..versions {
        write_version(&src, &mut data, &mut rng, v);
        snapshots.push(data.clone());
        let kills_goal = points * (v + 1) / versions;
        // Kill attempts until this version's share of kills happened (a run that finishes
        // first publishes another generation of the same snapshot), then one clean run.
        while rig.kills < kills_goal {
            let delay = rig.last.mul_f64(rig.rng.gen_range(0.02..1.0));
            rig.run_or_kill(&checkpoint, delay);
        }
        rig.run_or_kill(&checkpoint, Duration::from_secs(600));
        for g in rig.run_json(&["ls", "--db", "db"]).as_array().unwrap() {
            generation_version
                .entry(g["generation"].as_u64().unwrap())
                .or_insert(v);
        }
    }
    let checkpoint_kills = rig.kills;

    // Restores killed at random and finished by `cairn resume`: each must continue where it
    // stopped and still be exact.
    let gens: Vec<u64> = generation_version.keys().copied().collect();
    for i in 0..(points / 4).max(1) {
        let g = gens[i % gens.len()];
        let to = rig.dir.path().join(format!("killed-restore-{i}"));
        let to_s = to.display().to_string();
        let g_s = g.to_string();
        let delay = full.mul_f64(rig.rng.gen_range(0.0..1.0));
        if rig.run_or_kill(
            &["restore", "--db", "db", "--generation", &g_s, "--to", &to_s],
            delay,
        ) {
            let before = rig.run_json(&["status"]);
            let done_before = before
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|j| j["kind"] == "restore" && j["state"] == "running")
                })
                .map_or(0, |j| j["progress"]["done"].as_u64().unwrap_or(0));
            let resumed = rig.run_json(&["resume"]);
            if let Some(r) = resumed.as_array().and_then(|a| a.first()) {
                assert_eq!(r["ok"], true, "{resumed}");
                let read = r["outcome"]["blobs_read"].as_u64().unwrap_or(0);
                let fresh = rig.dir.path().join(format!("fresh-restore-{i}"));
                let full = rig.run_json(&[
                    "restore",
                    "--db",
                    "db",
                    "--generation",
                    &g_s,
                    "--to",
                    &fresh.display().to_string(),
                ]);
                let full_read = full["blobs_read"].as_u64().unwrap_or(0);
                // Chunks recorded before the kill are not read again.
                assert!(read <= full_read, "{resumed} vs {full}");
                if done_before > 0 {
                    assert!(
                        read < full_read,
                        "resumed restore re-read everything: {resumed} vs {full}"
                    );
                }
            }
        }
        if to.exists() {
            assert!(
                std::fs::read(&to).unwrap() == snapshots[generation_version[&g]],
                "killed restore of generation {g} differs"
            );
        }
    }

    // No job is left unfinished.
    for j in rig.run_json(&["status"]).as_array().unwrap() {
        assert!(
            j["state"] != "running" && j["state"] != "queued",
            "unfinished job: {j}"
        );
    }
    // Every generation restores exactly to its snapshot and verifies clean; each was
    // published by exactly one job.
    let listed = rig.run_json(&["ls", "--db", "db"]);
    let listed = listed.as_array().unwrap();
    let mut jobs = HashMap::new();
    for (i, g) in listed.iter().enumerate() {
        let gen = g["generation"].as_u64().unwrap();
        assert_eq!(gen, i as u64 + 1, "generations are contiguous");
        let job = g["job"].as_str().unwrap().to_string();
        assert!(
            jobs.insert(job.clone(), gen).is_none(),
            "job {job} published twice"
        );
        let out = rig.dir.path().join(format!("restore-{gen}"));
        let out_s = out.display().to_string();
        rig.run_json(&[
            "restore",
            "--db",
            "db",
            "--generation",
            &gen.to_string(),
            "--to",
            &out_s,
        ]);
        let want = &snapshots[generation_version[&gen]];
        assert!(
            std::fs::read(&out).unwrap() == *want,
            "generation {gen} differs from its snapshot"
        );
        let v = rig.run_json(&["verify", "--db", "db", "--generation", &gen.to_string()]);
        assert_eq!(v["ok"], true, "{v}");
    }
    // Blobs uploaded more than once: at most what was in flight at each kill.
    let log = std::fs::read_to_string(rig.server.log_path()).unwrap();
    let mut puts: HashMap<&str, usize> = HashMap::new();
    for line in log.lines() {
        if let Some(rest) = line.split("\"PUT ").nth(1) {
            let path = rest.split(' ').next().unwrap_or("");
            if path.contains("/dbs/db/blobs/") && !path.contains('?') {
                *puts.entry(path).or_default() += 1;
            }
        }
    }
    let again: usize = puts.values().map(|n| n - 1).sum();
    println!(
        "crash harness: {} generations, {checkpoint_kills} checkpoint kills, {} restore kills, {} blob uploads, {again} repeated",
        listed.len(),
        rig.kills - checkpoint_kills,
        puts.values().sum::<usize>()
    );
    println!("kills by job phase: {:?}", rig.phases);
    assert!(!puts.is_empty(), "no blob upload seen in the S3 log");
    assert!(
        again <= checkpoint_kills * UPLOAD_CONCURRENCY,
        "{again} blobs uploaded again after {checkpoint_kills} kills"
    );
    assert!(rig.kills >= points, "only {} kills happened", rig.kills);
}
