//! Crash harness for the WAL stream: `cairn checkpoint` of a growing segment directory and
//! `cairn truncate --head-before` run as child processes against moto on 127.0.0.1 and are
//! killed with SIGKILL at random moments, then run again. Afterwards no generation is
//! lost or half-applied: every generation restores to exactly one of the stream's states
//! in the order they happened, and the newest to the last one. A lease taken between
//! operations survives the restarts, blocks a truncation that overlaps it (the error names
//! the lease), and lapses by its TTL.
//!
//! `CAIRN_CRASH_POINTS` sets the number of kills (default 12); `CAIRN_CRASH_SEED` the seed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_tests::s3::S3Server;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

type Files = BTreeMap<String, Vec<u8>>;

struct Rig {
    server: S3Server,
    dir: tempfile::TempDir,
    state: PathBuf,
    url: String,
    kills: usize,
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
            "cairn {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs `args`, killing it after `delay` if it still runs; returns whether it was killed.
    fn run_or_kill(&mut self, args: &[&str], delay: Duration) -> bool {
        let mut child = self
            .cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + delay;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "cairn {args:?} failed");
                return false;
            }
            if Instant::now() >= deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                self.kills += 1;
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn read_dir(dir: &std::path::Path) -> Files {
    let mut out = Files::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.insert(
            e.file_name().into_string().unwrap(),
            std::fs::read(e.path()).unwrap(),
        );
    }
    out
}

#[test]
fn kill_minus_nine_during_checkpoints_and_truncations_loses_no_generation() {
    let points: usize = std::env::var("CAIRN_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(12, |p: usize| p.div_ceil(2));
    let seed: u64 = std::env::var("CAIRN_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EA1);
    let server = S3Server::start().unwrap_or_else(|e| panic!("S3 server: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("wal-crash");
    let mut rig = Rig {
        state: dir.path().join("state"),
        server,
        dir,
        url,
        kills: 0,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let wal = rig.dir.path().join("wal");
    std::fs::create_dir_all(&wal).unwrap();
    let wal_s = wal.display().to_string();
    let checkpoint = [
        "checkpoint",
        "--db",
        "w",
        "--kind",
        "segments",
        "--source",
        &wal_s,
    ];
    // The stream as it should be after each operation, in order.
    let mut states: Vec<Files> = Vec::new();
    let mut stream = Files::new();
    let mut next_seg = 0u32;
    let mut lsn_of: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut end = 0u64;
    let mut calibrated = Duration::from_millis(300);
    for round in 0..points.max(4) {
        // The engine seals a few segments.
        for _ in 0..rng.gen_range(1..4) {
            let name = format!("{next_seg:08}.seg");
            next_seg += 1;
            let mut bytes = vec![0u8; rng.gen_range(1..200) * 1024];
            rng.fill_bytes(&mut bytes);
            std::fs::write(wal.join(&name), &bytes).unwrap();
            lsn_of.insert(name.clone(), (end, end + bytes.len() as u64));
            end += bytes.len() as u64;
            stream.insert(name, bytes);
        }
        let delay = calibrated.mul_f64(rng.gen_range(0.05..1.2));
        rig.run_or_kill(&checkpoint, delay);
        let t = Instant::now();
        rig.run_json(&checkpoint);
        calibrated = t.elapsed().max(Duration::from_millis(50));
        states.push(stream.clone());
        // The engine deletes local WAL below the watermark (it stays published).
        let w = rig.run_json(&["watermark", "--db", "w"]);
        let mark = w["watermark"].as_u64().unwrap();
        assert_eq!(w["wal_end"].as_u64(), Some(end), "{w}");
        for (name, (_, e)) in &lsn_of {
            if *e <= mark && rng.gen_bool(0.5) {
                let _ = std::fs::remove_file(wal.join(name));
            }
        }
        if round % 2 == 1 && stream.len() > 1 {
            // Truncate the published head below the second-newest segment's end.
            let names: Vec<&String> = stream.keys().collect();
            let cut = names[rng.gen_range(0..names.len() - 1)].clone();
            let before = lsn_of[&cut].1;
            let before_s = before.to_string();
            let truncate = [
                "truncate",
                "--db",
                "w",
                "--head-before",
                &before_s,
                "--force",
            ];
            let delay = calibrated.mul_f64(rng.gen_range(0.05..1.0));
            rig.run_or_kill(&truncate, delay);
            rig.run_json(&truncate);
            stream.retain(|n, _| lsn_of[n].1 > before);
            states.push(stream.clone());
        }
    }
    // A lease survives a restart and blocks an overlapping truncation, naming itself.
    let first_end = stream.keys().next().map(|n| lsn_of[n].1).unwrap();
    let lease = rig.run_json(&[
        "lease",
        "--db",
        "w",
        "--start",
        "0",
        "--end",
        "999999999",
        "--ttl",
        "3s",
    ]);
    let id = lease["lease"].as_str().unwrap().to_string();
    let w = rig.run_json(&["watermark", "--db", "w"]);
    assert!(
        w["leases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["id"] == id.as_str()),
        "{w}"
    );
    assert_eq!(
        w["watermark"], 0,
        "the lease holds the watermark at its start: {w}"
    );
    let out = rig
        .cmd(&[
            "truncate",
            "--db",
            "w",
            "--head-before",
            &first_end.to_string(),
            "--timeout",
            "200ms",
            "--force",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&id) && err.contains("w"), "{err}");
    std::thread::sleep(Duration::from_millis(3_200));
    let w = rig.run_json(&["watermark", "--db", "w"]);
    assert!(
        w["leases"].as_array().unwrap().is_empty(),
        "lapsed by its TTL: {w}"
    );

    // Every generation is one of the states, in order; the newest is the last one.
    let listed = rig.run_json(&["ls", "--db", "w"]);
    let listed = listed.as_array().unwrap();
    let mut at = 0usize;
    for (i, g) in listed.iter().enumerate() {
        let gen = g["generation"].as_u64().unwrap();
        assert_eq!(gen, i as u64 + 1, "generations are contiguous");
        let out = rig.dir.path().join(format!("restore-{gen}"));
        rig.run_json(&[
            "restore",
            "--db",
            "w",
            "--generation",
            &gen.to_string(),
            "--to",
            &out.display().to_string(),
        ]);
        let got = read_dir(&out);
        let pos = states[at..]
            .iter()
            .position(|s| *s == got)
            .unwrap_or_else(|| {
                panic!("generation {gen} is no state of the stream (half-applied?)")
            });
        at += pos;
    }
    assert_eq!(
        at,
        states.len() - 1,
        "the newest generation is the last state"
    );
    println!(
        "WAL crash harness: {} generations, {} states, {} kills",
        listed.len(),
        states.len(),
        rig.kills
    );
    assert!(rig.kills > 0, "no kill happened");
}
