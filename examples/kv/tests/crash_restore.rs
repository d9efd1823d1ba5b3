//! End to end: the example engine runs against moto on 127.0.0.1 for many cycles, each
//! killed with SIGKILL at a random moment (during start-up and recovery, a commit, a seal,
//! a segment or page checkpoint, a truncation, a deletion) and restarted. Then:
//!
//! - no committed batch was lost: every start recovers at least every batch a run
//!   reported committed, at the LSN it reported;
//! - the local WAL stayed bounded (checkpoint interval plus two segments), although many
//!   times that much WAL was written: deletion below the watermark works;
//! - the store's stream lost its head (head truncation works), and restoring to random
//!   LSNs of the restorable range, on a fresh state directory that has only the bucket,
//!   gives exactly the workload's state after the batch ending at each LSN (a model
//!   recomputed here from the seed), and LSNs below the range are refused.
//!
//! `CAIRN_KV_CYCLES` (default 14), `CAIRN_KV_OPS` (batches per cycle, default 250),
//! `CAIRN_KV_RESTORES` (default 10) and `CAIRN_KV_SEED` make a longer or different run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_kv::wal::RECORD_HEADER;
use cairn_kv::workload::{apply, Workload, MAX_BATCH, MAX_WORKLOAD_VALUE};
use cairn_tests::s3::S3Server;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const SEGMENT: u64 = 16 * 1024;
const CHECKPOINT: u64 = 3 * SEGMENT;
const KEYS: u32 = 1500;
const PAGES: u32 = 256;
const DB: &str = "e2e";
/// Page checkpoints whose WAL the store keeps: the restorable range.
const RETAIN: usize = 6;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The longest record the workload can write.
fn max_record() -> u64 {
    let op = 1 + 2 + 10 + 2 + MAX_WORKLOAD_VALUE as u64;
    RECORD_HEADER as u64 + 10 + MAX_BATCH * op
}

struct Rig {
    server: S3Server,
    dir: tempfile::TempDir,
    url: String,
    seed: u64,
}

impl Rig {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn cmd(&self, state: &Path, data: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn-kv"));
        c.arg("--data")
            .arg(data)
            .arg("--state")
            .arg(state)
            .arg("--store")
            .arg(&self.url)
            .args(["--db", DB])
            .args(["--pages", &PAGES.to_string()])
            .args(["--segment-size", &SEGMENT.to_string()]);
        self.server.apply_env(&mut c);
        c
    }

    fn run_cmd(&self, until: u64) -> Command {
        let mut c = self.cmd(&self.dir.path().join("state"), &self.data());
        c.arg("run")
            .args(["--seed", &self.seed.to_string()])
            .args(["--until", &until.to_string()])
            .args(["--keys", &KEYS.to_string()])
            .args(["--checkpoint-bytes", &CHECKPOINT.to_string()])
            .args(["--retain", &RETAIN.to_string()]);
        c
    }
}

/// When a run is killed.
#[derive(Clone, Copy, Debug)]
enum Kill {
    Never,
    /// This long after the start (start-up, recovery, resumption).
    AfterStart(Duration),
    /// After the n-th event (maintenance events only, or any), plus a delay.
    AfterEvent {
        n: u64,
        maintenance_only: bool,
        delay: Duration,
    },
}

/// What the runs reported.
#[derive(Default, Debug)]
struct Seen {
    /// Sequence number → the LSN after that batch.
    commits: BTreeMap<u64, u64>,
    page_lsns: BTreeSet<u64>,
    max_wal: u64,
    kills: u64,
    runs: u64,
    shipped: u64,
    page_checkpoints: u64,
    tracked_checkpoints: u64,
    truncations: u64,
    local_deletions: u64,
    torn: u64,
    torn_injected: u64,
    /// Bytes of a torn record the test appended before the current run.
    expect_torn: Option<u64>,
    repaired_flushes: u64,
    resumed_jobs: u64,
    replayed: u64,
    done: Option<(u64, u64)>,
}

impl Seen {
    fn commit(&mut self, seq: u64, lsn: u64) {
        if let Some(prev) = self.commits.insert(seq, lsn) {
            assert_eq!(prev, lsn, "batch {seq} was reported at two LSNs");
        }
    }

    fn note(&mut self, ev: &Value) {
        let u = |k: &str| ev[k].as_u64().unwrap_or(0);
        match ev["event"].as_str().unwrap_or("") {
            "recovered" => {
                let (next, lsn) = (u("next_seq"), u("lsn"));
                if let Some((&last, _)) = self.commits.last_key_value() {
                    assert!(
                        next > last,
                        "batch {last} was reported committed, but recovery ends at {next}: {ev}"
                    );
                }
                if next > 0 {
                    self.commit(next - 1, lsn);
                } else {
                    assert_eq!(lsn, 0, "{ev}");
                }
                self.max_wal = self.max_wal.max(u("wal_bytes"));
                if let Some(n) = self.expect_torn.take() {
                    assert_eq!(u("torn_bytes"), n, "the torn record is cut exactly: {ev}");
                }
                self.torn += u64::from(u("torn_bytes") > 0);
                self.repaired_flushes += u64::from(!ev["repaired_flush"].is_null());
                self.resumed_jobs += u("resumed");
                self.replayed += u("replayed");
            }
            "commit" => self.commit(u("seq"), u("lsn")),
            "sealed" => self.max_wal = self.max_wal.max(u("wal_bytes")),
            "shipped" => self.shipped += 1,
            "pages" => {
                self.page_lsns.insert(u("lsn"));
                self.page_checkpoints += 1;
                self.tracked_checkpoints += u64::from(ev["tracked"] == true);
            }
            "truncated_store" => self.truncations += u64::from(!ev["generation"].is_null()),
            "trimmed_local" => self.local_deletions += u("deleted"),
            "done" => self.done = Some((u("next_seq"), u("lsn"))),
            other => panic!("unknown event {other:?}: {ev}"),
        }
    }
}

fn wal_bytes(data: &Path) -> u64 {
    let mut n = 0;
    for sub in ["segments", "active"] {
        if let Ok(rd) = std::fs::read_dir(data.join(sub)) {
            for e in rd {
                n += e.unwrap().metadata().unwrap().len();
            }
        }
    }
    n
}

/// Appends the start of a record that never finished to the active WAL file: the torn
/// write a power loss can leave (a SIGKILL cannot tear a single `write`).
fn tear_tail(data: &Path, rng: &mut impl Rng) -> Option<u64> {
    use std::io::Write;
    let active = std::fs::read_dir(data.join("active"))
        .unwrap()
        .next()
        .map(|e| e.unwrap().path());
    // None: the crash came between a seal and the next active file.
    let active = active?;
    let mut torn = 300u32.to_le_bytes().to_vec();
    torn.extend((0..rng.gen_range(0..200)).map(|_| rng.gen::<u8>()));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(active)
        .unwrap();
    f.write_all(&torn).unwrap();
    Some(torn.len() as u64)
}

fn kill(child: &mut Child) {
    // The child may have exited by now; `wait` tells.
    let _ = child.kill();
}

/// Runs the engine until `until` batches, killing it as `plan` says; returns whether it
/// was killed.
fn cycle(rig: &Rig, seen: &mut Seen, until: u64, plan: Kill) -> bool {
    let err_path = rig.dir.path().join("stderr.log");
    let mut child = rig
        .run_cmd(until)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    if let Kill::AfterStart(d) = plan {
        std::thread::sleep(d);
        kill(&mut child);
    }
    let mut first = true;
    let (mut all, mut maintenance) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let ev: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if first {
            assert_eq!(ev["event"], "recovered", "{ev}");
            first = false;
        }
        seen.note(&ev);
        all += 1;
        maintenance += u64::from(!matches!(
            ev["event"].as_str(),
            Some("commit" | "recovered")
        ));
        if let Kill::AfterEvent {
            n,
            maintenance_only,
            delay,
        } = plan
        {
            let count = if maintenance_only { maintenance } else { all };
            if count == n {
                std::thread::sleep(delay);
                kill(&mut child);
            }
        }
    }
    let status = child.wait().unwrap();
    seen.runs += 1;
    seen.max_wal = seen.max_wal.max(wal_bytes(&rig.data()));
    if status.signal() == Some(9) {
        seen.kills += 1;
        return true;
    }
    assert!(
        status.success(),
        "cairn-kv run failed ({status}): {}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    false
}

fn output(mut c: Command) -> (bool, Value, String) {
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v, stderr)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn killed_again_and_again_it_keeps_its_wal_bounded_and_restores_to_any_lsn() {
    let started = Instant::now();
    let cycles: u64 = env_or("CAIRN_KV_CYCLES", 14);
    let ops: u64 = env_or("CAIRN_KV_OPS", 250);
    let restores: usize = env_or("CAIRN_KV_RESTORES", 10);
    let seed: u64 = env_or("CAIRN_KV_SEED", 0x6b76);
    let server = S3Server::start().unwrap_or_else(|e| panic!("S3 server: {e}"));
    let url = server.url("kv-e2e");
    let rig = Rig {
        server,
        dir: tempfile::tempdir().unwrap(),
        url,
        seed,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen = Seen::default();

    let mut killed = false;
    // Wall time and batches of each cycle (reported, not asserted).
    let mut pace: Vec<(Duration, usize)> = Vec::new();
    for c in 0..=cycles {
        let plan = match rng.gen_range(0..100) {
            _ if c == cycles => Kill::Never,
            0..10 => Kill::AfterStart(Duration::from_millis(rng.gen_range(0..400))),
            10..50 => Kill::AfterEvent {
                n: rng.gen_range(1..ops * 11 / 10),
                maintenance_only: false,
                delay: Duration::from_micros(rng.gen_range(0..3000)),
            },
            50..90 => Kill::AfterEvent {
                n: rng.gen_range(1..(ops / 8).max(2)),
                maintenance_only: true,
                delay: Duration::from_micros(rng.gen_range(0..40_000)),
            },
            _ => Kill::Never,
        };
        // Sometimes the crash also tore the record being written (before a run that
        // reports its recovery).
        if killed && !matches!(plan, Kill::AfterStart(_)) && rng.gen_bool(0.3) {
            seen.expect_torn = tear_tail(&rig.data(), &mut rng);
            seen.torn_injected += u64::from(seen.expect_torn.is_some());
        }
        let (t, before) = (Instant::now(), seen.commits.len());
        killed = cycle(&rig, &mut seen, (c + 1) * ops, plan);
        assert!(seen.expect_torn.is_none(), "the run reported no recovery");
        pace.push((t.elapsed(), seen.commits.len() - before));
    }
    // The last run reached its target.
    let total = (cycles + 1) * ops;
    assert!(!killed);
    let (next_seq, end) = seen.done.expect("the last run reports done");
    assert_eq!(next_seq, total);

    // The local WAL stayed bounded although much more was written.
    let bound = CHECKPOINT + 2 * (SEGMENT + max_record());
    assert!(
        seen.max_wal <= bound,
        "local WAL reached {} bytes (bound {bound}): {seen:?}",
        seen.max_wal
    );
    assert!(end >= 10 * bound, "too little WAL written to tell: {end}");
    assert!(seen.local_deletions > 0 && seen.truncations > 0, "{seen:?}");
    assert!(seen.tracked_checkpoints > 0, "{seen:?}");

    let (ok, status, err) = output({
        let mut c = rig.cmd(&rig.dir.path().join("state"), &rig.data());
        c.arg("status");
        c
    });
    assert!(ok, "status: {err}");
    let wal_start = status["watermark"]["wal_start"].as_u64().unwrap();
    let wal_end = status["watermark"]["wal_end"].as_u64().unwrap();
    assert!(
        wal_start > 0,
        "the store's head was never truncated: {status}"
    );
    assert_eq!(
        status["watermark"]["page_lsn"].as_u64(),
        Some(end),
        "{status}"
    );

    // Restorable: from the oldest page checkpoint inside the stream to the stream's end
    // (past it, only the page checkpoints' own LSNs, such as the last one).
    let from = *seen
        .page_lsns
        .range(wal_start..)
        .next()
        .expect("a page checkpoint in the stream");
    let by_lsn: BTreeMap<u64, u64> = seen.commits.iter().map(|(s, l)| (*l, *s)).collect();
    let mut inside: Vec<u64> = by_lsn.range(from..=wal_end).map(|(l, _)| *l).collect();
    inside.shuffle(&mut rng);
    let mut targets: BTreeSet<u64> = inside.into_iter().take(restores).collect();
    targets.insert(end);
    if by_lsn.contains_key(&from) {
        targets.insert(from);
    }
    let below: Vec<u64> = by_lsn
        .range(..wal_start)
        .map(|(l, _)| *l)
        .filter(|l| !seen.page_lsns.contains(l))
        .collect();
    let refused_targets: Vec<u64> = below.choose_multiple(&mut rng, 2).copied().collect();

    // The expected state after each target batch, recomputed from the seed.
    let wl = Workload { seed, keys: KEYS };
    let want_seqs: BTreeSet<u64> = targets.iter().map(|l| by_lsn[l]).collect();
    let mut expected: BTreeMap<u64, Vec<(String, String)>> = BTreeMap::new();
    let mut model = BTreeMap::new();
    for s in 0..=want_seqs.last().copied().unwrap_or(0) {
        apply(&mut model, &wl.batch(s));
        if want_seqs.contains(&s) {
            let entries = model.iter().map(|(k, v)| (hex(k), hex(v))).collect();
            expected.insert(s, entries);
        }
    }

    let fresh = rig.dir.path().join("fresh-state");
    let (mut replayed, mut refused) = (0, 0);
    for (i, lsn) in targets.iter().chain(&refused_targets).enumerate() {
        let to = rig.dir.path().join(format!("restore-{i}"));
        let (ok, r, err) = output({
            let mut c = rig.cmd(&fresh, &to);
            c.args(["restore", "--lsn", &lsn.to_string(), "--to"])
                .arg(&to);
            c
        });
        if !targets.contains(lsn) {
            // Below the stream's start: refused, unless it is exactly a page checkpoint's.
            if !ok {
                assert!(err.contains("cannot be restored"), "LSN {lsn}: {err}");
                refused += 1;
                continue;
            }
            assert_eq!(r["page_lsn"].as_u64(), Some(*lsn), "{r}");
        }
        assert!(ok, "restore to LSN {lsn} failed: {err}");
        assert_eq!(r["lsn"].as_u64(), Some(*lsn), "{r}");
        replayed += r["replayed"].as_u64().unwrap_or(0);
        let (ok, dump, err) = output({
            let mut c = rig.cmd(&fresh, &to);
            c.args(["dump", "--entries"]);
            c
        });
        assert!(ok, "dump of the restore to {lsn}: {err}");
        let seq = by_lsn[lsn];
        assert_eq!(dump["lsn"].as_u64(), Some(*lsn), "{dump}");
        assert_eq!(dump["next_seq"].as_u64(), Some(seq + 1), "{dump}");
        let got: Vec<(String, String)> = dump["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let s = |i: usize| e[i].as_str().unwrap().to_owned();
                (s(0), s(1))
            })
            .collect();
        assert!(
            got == expected[&seq],
            "the restore to LSN {lsn} (after batch {seq}) differs from the model: {} entries, want {}",
            got.len(),
            expected[&seq].len()
        );
    }
    let quarter = (pace.len() / 4).max(1);
    let ms_per_batch = |p: &[(Duration, usize)]| {
        let (t, n) = p
            .iter()
            .fold((0.0, 0), |(t, n), (d, b)| (t + d.as_secs_f64(), n + b));
        1000.0 * t / n.max(1) as f64
    };
    eprintln!(
        "cairn-kv e2e: {:.2} ms per batch in the first quarter of the cycles, {:.2} in the last",
        ms_per_batch(&pace[..quarter]),
        ms_per_batch(&pace[pace.len() - quarter..])
    );
    eprintln!(
        "cairn-kv e2e: {} runs, {} kills, {} batches, {end} bytes of WAL; max local WAL {} bytes (bound {bound}); \
         {} segment and {} page checkpoints ({} with the tracker), {} head truncations, {} segments deleted locally; \
         recovery: {} records replayed, {} torn tails cut ({} written by the test), {} flushes repaired, {} jobs resumed; \
         restored {} LSNs in {from}..={end} ({replayed} records replayed), {refused} of {} below {wal_start} refused; {:.1} s",
        seen.runs,
        seen.kills,
        total,
        seen.max_wal,
        seen.shipped,
        seen.page_checkpoints,
        seen.tracked_checkpoints,
        seen.truncations,
        seen.local_deletions,
        seen.replayed,
        seen.torn,
        seen.torn_injected,
        seen.repaired_flushes,
        seen.resumed_jobs,
        targets.len(),
        refused_targets.len(),
        started.elapsed().as_secs_f64()
    );
}
