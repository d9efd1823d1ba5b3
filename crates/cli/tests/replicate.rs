//! `cairn replicate` against a writer process that commits continuously (and rolls some
//! transactions back, and runs its own `wal_checkpoint(TRUNCATE)` now and then), with
//! either killed by SIGKILL at random moments. Every commit's content is a function of
//! its number, so a restored database is checked row by row against the state right
//! after commit `k`: every restore must be exactly one commit's state, a restore to an
//! LSN seen earlier must give the same commit later, and the newest restore after a
//! graceful stop must equal the source. A second test resets the WAL behind a stopped
//! replicator: the gap is detected and named, and every point outside it restores exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;

const WRITER: &str = r#"
import os, sqlite3, sys, time
db = sys.argv[1]
limit = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 60
c = sqlite3.connect(db, timeout=30, isolation_level=None)
c.execute('pragma journal_mode=wal')
c.execute('create table if not exists t(seq integer primary key, v text)')
n = c.execute('select coalesce(max(seq), 0) from t').fetchone()[0]
while n < limit:
    n += 1
    c.execute('begin immediate')
    c.execute('insert into t values (?, ?)', (n, 'i%d' % n + 'x' * (n * 37 % 3000)))
    target = 1 + (n * 2654435761 % (1 << 32)) % n
    c.execute('update t set v = ? where seq = ?', ('u%d' % n + 'y' * (n % 500), target))
    c.execute('commit')
    if n % 7 == 0:
        c.execute('begin immediate')
        c.execute('insert into t values (?, ?)', (-n, 'rolled back'))
        c.execute('rollback')
    if n % 150 == 0:
        # The application's own reset: while replicate holds the WAL it waits for its busy
        # timeout and reports busy, or resets a WAL that holds nothing unshipped.
        c.execute('pragma busy_timeout=50')
        c.execute('pragma wal_checkpoint(TRUNCATE)').fetchall()
        c.execute('pragma busy_timeout=30000')
    time.sleep(0.002)
"#;

/// The rows right after commit `k`, by the writer's rule.
fn expected(k: i64) -> Vec<(i64, String)> {
    let mut rows: Vec<(i64, String)> = (1..=k)
        .map(|n| (n, format!("i{n}{}", "x".repeat((n * 37 % 3000) as usize))))
        .collect();
    for n in 1..=k {
        let target = 1 + (n * 2_654_435_761 % (1 << 32)) % n;
        rows[(target - 1) as usize].1 = format!("u{n}{}", "y".repeat((n % 500) as usize));
    }
    rows
}

/// The commit whose state `db` holds exactly, checked row by row; panics otherwise.
fn commit_of(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok", "{}", db.display());
    let mut st = c.prepare("SELECT seq, v FROM t ORDER BY seq").unwrap();
    let rows: Vec<(i64, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let k = rows.len() as i64;
    assert!(
        rows == expected(k),
        "{} is not the state of commit {k} (a rolled-back, partial or mixed state)",
        db.display()
    );
    k
}

struct Rig {
    dir: tempfile::TempDir,
    state: PathBuf,
    src: PathBuf,
    writer: PathBuf,
    n: usize,
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let writer = dir.path().join("writer.py");
        std::fs::write(&writer, WRITER).unwrap();
        Self {
            state: dir.path().join("state"),
            src: dir.path().join("app.db"),
            writer,
            dir,
            n: 0,
        }
    }

    fn write(&self, limit: Option<i64>) -> Child {
        let mut c = Command::new("python3");
        c.arg(&self.writer).arg(&self.src);
        if let Some(l) = limit {
            c.arg(l.to_string());
        }
        c.stdout(Stdio::null()).spawn().unwrap()
    }

    fn replicate(&self) -> Child {
        Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("--state")
            .arg(&self.state)
            .args(["--json", "replicate", "--db", "app", "--source"])
            .arg(&self.src)
            .args(["--interval", "100ms", "--wal-limit", "200000"])
            .args(["--page-every-bytes", "3000000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Stops a replicator with SIGINT; it must exit cleanly within 5 s. Its report.
    fn stop(&self, mut child: Child) -> Value {
        let t = Instant::now();
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        let out = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "replicate did not exit within 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(out.success(), "replicate exited with {out}");
        let mut s = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut s).unwrap();
        serde_json::from_str(&s).unwrap()
    }

    /// Restores (`--lsn` if given) to a fresh file; its report and the commit it holds.
    fn restore(&mut self, lsn: Option<u64>) -> Result<(Value, i64), String> {
        self.n += 1;
        let to = self.dir.path().join(format!("restored-{}.db", self.n));
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.arg("--state")
            .arg(&self.state)
            .args(["--json", "restore", "--db", "app", "--to"])
            .arg(&to);
        if let Some(l) = lsn {
            c.args(["--lsn", &l.to_string()]);
        }
        let out = c.output().unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        Ok((v, commit_of(&to)))
    }
}

fn kill9(c: &mut Child) {
    c.kill().unwrap();
    c.wait().unwrap();
}

#[test]
fn a_writer_and_replicate_killed_at_random_lose_no_acknowledged_commit() {
    let kills: usize = std::env::var("CAIRN_REPLICATE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let mut rig = Rig::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5e9);
    let mut writer = rig.write(None);
    std::thread::sleep(Duration::from_millis(300));
    let mut rep = rig.replicate();
    // (LSN, commit) pairs the store held at some moment.
    let mut seen: Vec<(u64, i64)> = Vec::new();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1200)));
        if rng.gen_bool(0.5) {
            kill9(&mut rep);
            let (v, k) = rig.restore(None).expect("restore after a killed replicate");
            seen.push((v["lsn"].as_u64().unwrap(), k));
            rep = rig.replicate();
        } else {
            kill9(&mut writer);
            writer = rig.write(None);
        }
    }
    kill9(&mut writer);
    std::thread::sleep(Duration::from_millis(500));
    let report = rig.stop(rep);
    assert!(report["steps"].as_u64().unwrap() > 0, "{report}");
    // After a graceful stop every commit is shipped.
    let (_, k) = rig.restore(None).unwrap();
    let source = commit_of(&rig.src);
    assert_eq!(k, source, "the newest restore lacks commits the source has");
    // What the store acknowledged then restores the same now.
    for (lsn, k) in seen {
        let (v, again) = rig.restore(Some(lsn)).unwrap();
        assert_eq!(again, k, "LSN {lsn} held commit {k}, now {again}: {v}");
    }
}

#[test]
fn a_wal_reset_behind_a_stopped_replicator_is_a_named_gap_and_nothing_else_is_lost() {
    let mut rig = Rig::new();
    let mut w = rig.write(Some(120));
    w.wait().unwrap();
    let rep = rig.replicate();
    std::thread::sleep(Duration::from_millis(800));
    let first = rig.stop(rep);
    assert_eq!(first["gaps"], 1, "the first run starts with a gap: {first}");
    let (before, k_before) = rig.restore(None).unwrap();
    assert_eq!(k_before, 120);
    // Behind Cairn's back: more commits, then the application's own TRUNCATE checkpoint
    // copies them into the file and resets the WAL; then a few more.
    let c = rusqlite::Connection::open(&rig.src).unwrap();
    rig.write(Some(170)).wait().unwrap();
    let _: (i64, i64, i64) = c
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    drop(c);
    rig.write(Some(190)).wait().unwrap();
    let rep = rig.replicate();
    std::thread::sleep(Duration::from_millis(800));
    rig.write(Some(200)).wait().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let second = rig.stop(rep);
    assert_eq!(second["gaps"], 1, "{second}");
    assert_eq!(second["last_gap_reason"], "wal_reset", "{second}");
    let (_, k) = rig.restore(None).unwrap();
    assert_eq!(k, 200);
    let lsn = before["lsn"].as_u64().unwrap();
    let (_, k) = rig.restore(Some(lsn)).unwrap();
    assert_eq!(k, 120, "the point before the gap");
    let err = rig.restore(Some(lsn + 1)).unwrap_err();
    assert!(
        err.contains("gap"),
        "a point inside the gap is refused by name: {err}"
    );
}
