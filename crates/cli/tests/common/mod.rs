//! What the tests of `cairn replicate` as a service share: a SQLite writer, the running
//! service with its HTTP address, and reading one sample of a scrape.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};

/// A bound on each wait, so a broken build fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Commits to `db` until `stop` is set.
pub fn writer(db: PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.execute_batch("create table if not exists t(n integer primary key, v text)")
            .unwrap();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if c.execute(
                "insert into t(v) values (?1)",
                [format!("row {n} {}", "x".repeat(200))],
            )
            .is_ok()
            {
                n += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        n
    })
}

/// A running `cairn replicate --listen 127.0.0.1:0` and the address it printed.
pub struct Replicator {
    child: Child,
    base: String,
    rt: tokio::runtime::Runtime,
}

impl Replicator {
    /// Starts `cmd` with `--listen 127.0.0.1:0` and reads the address it prints.
    pub fn start(cmd: Command) -> Self {
        Self::start_listening(cmd, true)
    }

    /// Starts `cmd` (adding `--listen 127.0.0.1:0` if `add_listen`) and reads the
    /// address it prints.
    pub fn start_listening(mut cmd: Command, add_listen: bool) -> Self {
        if add_listen {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads the address line, then keeps draining stderr (shown on failure).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.trim().to_string());
                }
                eprintln!("[cairn] {line}");
            }
        });
        let base = rx
            .recv_timeout(PATIENCE)
            .expect("cairn replicate printed no `listening on` line");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Self { child, base, rt }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let url = format!("{}{path}", self.base);
        self.rt.block_on(async {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let r = client.get(&url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        })
    }

    pub fn scrape(&self) -> Scrape {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    /// Polls `path` until `done` holds for its answer; the last answer.
    pub fn wait_for(&self, path: &str, what: &str, done: impl Fn(u16, &str) -> bool) -> String {
        let t = Instant::now();
        loop {
            let (status, body) = self.get(path);
            if done(status, &body) {
                return body;
            }
            assert!(t.elapsed() < PATIENCE, "{what}: still {status} {body}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGINT; it must exit cleanly.
    pub fn stop(self) {
        self.stop_with("-INT");
    }

    /// Sends `signal` (`-INT`, `-TERM`); it must exit cleanly. Its stdout, and how long it
    /// took to exit.
    pub fn stop_with(mut self, signal: &str) -> (String, Duration) {
        Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < PATIENCE,
                "replicate did not stop after {signal}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let took = t.elapsed();
        assert!(status.success(), "replicate exited with {status}");
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            std::io::Read::read_to_string(&mut o, &mut out).unwrap();
        }
        (out, took)
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .find(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.last().map_or(0.0, |c| c.count),
            Value::Summary(_) => f64::NAN,
        })
}
