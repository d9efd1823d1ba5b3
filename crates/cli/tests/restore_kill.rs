//! A restore killed with SIGKILL while it composes delta chains resumes and gives exact bytes.
//!
//! A page file of 1 MiB chunks is checkpointed, then changed in every chunk ten times, so
//! each chunk of the last generation is a base and ten deltas. Restores of that generation
//! run through a store that delays each request (`fault+file://…?latency…`), so kills land
//! while chunks are being composed. Each restore is killed, resumed and killed again (up
//! to three kills), then finished by `cairn resume`; the result must equal the source
//! snapshot, and a resumed restore must not read again the chunks recorded before the kill.
//!
//! Two ways to compose a chain are killed: the command line's defaults, which hold these
//! short chains in memory and write each chunk with its base, and a child process running
//! the library with a memory bound too small for that, which streams every chain a few
//! deltas at a time and writes each delta's pages before the base. Only the second leaves chunks half
//! composed on disk (some delta pages written, the base not yet), and the test checks that
//! kills found some.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;

const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;
const CHUNKS: usize = 16;
const STEPS: usize = 10;

struct Rig {
    state: PathBuf,
    store: String,
}

impl Rig {
    fn cmd(&self, store: &str, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.arg("--state")
            .arg(&self.state)
            .arg("--store")
            .arg(store)
            .args(args);
        c
    }

    fn json(&self, store: &str, args: &[&str]) -> Value {
        let out = self.cmd(store, args).arg("--json").output().unwrap();
        assert!(
            out.status.success(),
            "cairn {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("cairn {args:?}: {e}"))
    }

    /// A store that delays every request by up to 40 ms.
    fn slow(&self, seed: u64) -> String {
        format!("fault+{}?latency=1&latency_ms=40&seed={seed}", self.store)
    }

    /// The unfinished restore job's (done, total) chunks, if there is one.
    fn unfinished_restore(&self) -> Option<(u64, u64)> {
        let jobs = self.json(&self.store, &["status"]);
        jobs.as_array().unwrap().iter().find_map(|j| {
            (j["kind"] == "restore" && (j["state"] == "running" || j["state"] == "queued")).then(
                || {
                    (
                        j["progress"]["done"].as_u64().unwrap(),
                        j["progress"]["total"].as_u64().unwrap(),
                    )
                },
            )
        })
    }
}

/// Chunks of a partial restore that hold some of their final pages but not all: composed
/// part way (some delta pages written, not the rest). The source is random, so a page
/// not yet written never equals its final bytes.
fn half_composed_chunks(partial: &[u8], want: &[u8]) -> usize {
    partial
        .chunks(CHUNK)
        .zip(want.chunks(CHUNK))
        .filter(|(got, want)| {
            let same = got
                .chunks(PAGE)
                .zip(want.chunks(PAGE))
                .filter(|(a, b)| a == b)
                .count();
            same > 0 && same < CHUNK / PAGE
        })
        .count()
}

fn partial(to: &Path) -> PathBuf {
    let mut s = to.as_os_str().to_os_string();
    s.push(".cairn-restore");
    PathBuf::from(s)
}

/// The chained database of the module documentation, and what a whole restore of its last
/// generation through the slow store costs here.
struct Chained {
    _dir: tempfile::TempDir,
    root: PathBuf,
    rig: Rig,
    data: Vec<u8>,
    last: String,
    took: Duration,
    full_read: u64,
}

fn chained() -> Chained {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let rig = Rig {
        state: root.join("state"),
        store: format!("file://{}", root.join("store").display()),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let src = root.join("db.bin");
    let src_s = src.display().to_string();
    let mut data = vec![0u8; CHUNKS * CHUNK];
    rng.fill_bytes(&mut data);
    let checkpoint = [
        "checkpoint",
        "--db",
        "db",
        "--kind",
        "pages",
        "--chunk-size",
        "1048576",
        "--source",
        &src_s,
    ];
    std::fs::write(&src, &data).unwrap();
    rig.json(&rig.store, &checkpoint);
    for _ in 0..STEPS {
        // A few random pages in every chunk: deltas of one chain often share pages, and
        // the newer one must win.
        for c in 0..CHUNKS {
            for _ in 0..3 {
                let p = c * CHUNK / PAGE + rng.gen_range(0..CHUNK / PAGE);
                rng.fill_bytes(&mut data[p * PAGE..(p + 1) * PAGE]);
            }
        }
        std::fs::write(&src, &data).unwrap();
        let r = rig.json(&rig.store, &checkpoint);
        assert_eq!(r["chunks_delta"], CHUNKS as u64, "{r}");
    }
    let last = (STEPS + 1).to_string();
    let calibration = root.join("calibration");
    let t = Instant::now();
    let full = rig.json(
        &rig.slow(1),
        &[
            "restore",
            "--db",
            "db",
            "--generation",
            &last,
            "--to",
            &calibration.display().to_string(),
        ],
    );
    let took = t.elapsed();
    let full_read = full["blobs_read"].as_u64().unwrap();
    assert_eq!(full_read, (CHUNKS * (STEPS + 1)) as u64, "{full}");
    assert!(std::fs::read(&calibration).unwrap() == data);
    Chained {
        _dir: dir,
        root,
        rig,
        data,
        last,
        took,
        full_read,
    }
}

/// How a killed restore attempt runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runner {
    /// `cairn restore`, then `cairn resume`, with the defaults: these chains are held.
    Cli,
    /// A child process running the library with a small memory bound: every chain is
    /// streamed a few deltas at a time.
    Streamed,
}

/// The streamed runs' memory bound: a chunk's share (an eighth) is below its chain of ten
/// deltas of about 12 KiB, so chains are streamed; yet some twenty deltas fit at once, so
/// the eight chunks in flight still fetch ahead.
const STREAMED_MEMORY: u64 = 256 << 10;

/// Env variable that turns the child test below into the streamed restore process.
const CHILD: &str = "CAIRN_RESTORE_KILL_CHILD";

/// Not a test of its own: with [`CHILD`] set (`state|store|generation|target|first`), this
/// is the process the streamed runs kill. It restores (first attempt) or resumes with a
/// restore memory bound of [`STREAMED_MEMORY`]. Without it, it does nothing.
#[test]
fn streamed_restore_child_process() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let v: Vec<&str> = spec.split('|').collect();
    let mut cfg = cairn_orchestrator::Config::new(v[0]).unwrap();
    cfg.restore_memory = STREAMED_MEMORY;
    let store = cairn_remote_store::RemoteStore::open(v[1]).unwrap();
    let cp =
        cairn_orchestrator::Checkpointer::open_with(cfg, store, cairn_orchestrator::Env::system())
            .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = cairn_core::DbId::new("db").unwrap();
    let generation = cairn_core::Generation(v[2].parse().unwrap());
    rt.block_on(async {
        if v[4] == "first" {
            cp.restore(&db, Some(generation), Path::new(v[3]))
                .await
                .unwrap();
        } else {
            for (_, r) in cp.resume().await.unwrap() {
                r.unwrap();
            }
        }
    });
}

/// Starts one attempt of the restore to `to`.
fn start(c: &Chained, runner: Runner, to: &str, first: bool, seed: u64) -> std::process::Child {
    let slow = c.rig.slow(seed);
    let mut cmd = match runner {
        Runner::Cli if first => c.rig.cmd(
            &slow,
            &["restore", "--db", "db", "--generation", &c.last, "--to", to],
        ),
        Runner::Cli => c.rig.cmd(&slow, &["resume"]),
        Runner::Streamed => {
            let mut cmd = Command::new(std::env::current_exe().unwrap());
            cmd.args(["--exact", "streamed_restore_child_process", "--nocapture"])
                .env(
                    CHILD,
                    format!(
                        "{}|{slow}|{}|{to}|{}",
                        c.rig.state.display(),
                        c.last,
                        if first { "first" } else { "again" }
                    ),
                );
            cmd
        }
    };
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Kills restores run by `runner` (three targets, up to three kills each), finishes each
/// with `cairn resume` and checks the bytes; returns (kills with some chunks recorded and
/// some not, kills that found a chunk half composed on disk).
fn kill_and_resume(c: &Chained, runner: Runner) -> (usize, usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let (mut mid_restore, mut half_composed) = (0, 0);
    for target in 0..3u64 {
        let to = c.root.join(format!("restored-{runner:?}-{target}"));
        let to_s = to.display().to_string();
        let mut done_before = 0;
        for kill in 0..3u64 {
            // A share of what is left to do (a resumed run skips the recorded chunks).
            let left = 1.0 - done_before as f64 / CHUNKS as f64;
            let delay = c.took.mul_f64(rng.gen_range(0.3..0.9) * left.max(0.4));
            let child = start(c, runner, &to_s, kill == 0, 10 * target + kill + 2);
            if !kill_after(child, delay) {
                break;
            }
            match c.rig.unfinished_restore() {
                Some((done, total)) => {
                    println!("{runner:?} restore {target}, kill {kill} after {delay:?}: {done} of {total} chunks done");
                    // 0 of 0: killed before the restore had sized its work.
                    assert!(total == 0 || total == CHUNKS as u64, "{total} chunks");
                    if done > 0 && done < total {
                        mid_restore += 1;
                    }
                    done_before = done;
                    // Sized at creation (a kill in between leaves it empty).
                    let p = partial(&to);
                    if p.exists() {
                        let bytes = std::fs::read(&p).unwrap();
                        assert!(bytes.is_empty() || bytes.len() == c.data.len());
                        if !bytes.is_empty() && half_composed_chunks(&bytes, &c.data) > 0 {
                            half_composed += 1;
                        }
                    }
                }
                // Killed after the job finished: nothing left to resume.
                None => break,
            }
        }
        if c.rig.unfinished_restore().is_none() && !to.exists() {
            // Killed before the job was recorded: restore it in one go.
            c.rig.json(
                &c.rig.store,
                &[
                    "restore",
                    "--db",
                    "db",
                    "--generation",
                    &c.last,
                    "--to",
                    &to_s,
                ],
            );
        }
        if c.rig.unfinished_restore().is_some() {
            let resumed = c.rig.json(&c.rig.store, &["resume"]);
            let r = &resumed.as_array().unwrap()[0];
            assert_eq!(r["ok"], true, "{resumed}");
            let read = r["outcome"]["blobs_read"].as_u64().unwrap();
            assert!(read <= c.full_read, "{resumed}");
            if done_before > 0 {
                assert!(
                    read <= c.full_read - done_before * (STEPS as u64 + 1),
                    "chunks recorded before the kill were read again: {resumed}"
                );
            }
        }
        assert!(
            std::fs::read(&to).unwrap() == c.data,
            "{runner:?} restore {target}, killed and resumed, differs from the source"
        );
        assert!(!partial(&to).exists(), "partial file left behind");
    }
    println!("{runner:?}: {mid_restore} kills between chunks recorded, {half_composed} with a chunk half composed");
    (mid_restore, half_composed)
}

/// Kills `child` with SIGKILL after `delay`; returns whether it was still running.
fn kill_after(mut child: std::process::Child, delay: Duration) -> bool {
    let deadline = Instant::now() + delay;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "restore attempt failed");
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

#[test]
fn a_restore_killed_mid_chain_resumes_and_gives_exact_bytes() {
    let c = chained();
    let (mid_restore, _) = kill_and_resume(&c, Runner::Cli);
    assert!(mid_restore > 0, "no kill landed mid-restore");
}

#[test]
fn a_streamed_restore_killed_with_chunks_half_composed_resumes_and_gives_exact_bytes() {
    let c = chained();
    let (mid_restore, half_composed) = kill_and_resume(&c, Runner::Streamed);
    assert!(mid_restore > 0, "no kill landed mid-restore");
    assert!(half_composed > 0, "no kill found a chunk half composed");
}
