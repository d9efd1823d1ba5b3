//! `cairn replicate --config`: one service running a SQLite database, a page file and a
//! segment directory, each on its own schedule, with GC for one of them; scraped and
//! asked for readiness while it runs, stopped by SIGTERM, and every database restored
//! exactly afterwards. And its degradation: the scratch file system made read-only, then
//! full, while the service runs; it says not ready naming scratch, keeps going, and
//! recovers by itself once the fault is gone. No timing is asserted: every wait polls
//! until its condition holds, within a bound that only keeps a broken build from hanging.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{value, writer, Replicator, PATIENCE};

fn cairn(state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.arg("--state").arg(state);
    c
}

fn service(state: &Path, config: &Path) -> Command {
    let mut c = cairn(state);
    c.args(["--json", "replicate", "--config"]).arg(config);
    c
}

fn run_ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Rewrites every page of the page file at `path` with bytes derived from `round` (so a
/// checkpoint rewrites its chunks, and the older blobs become garbage).
fn touch_pages(path: &Path, round: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    for p in 0..len / 4096 {
        let page: Vec<u8> = (0..4096u64)
            .map(|i| (i * 31 + p * 7 + round * 131) as u8)
            .collect();
        f.write_all_at(&page, p * 4096).unwrap();
    }
    f.sync_all().unwrap();
}

/// Restores database `db` of `state` to `to`; `to`.
fn restore(state: &Path, db: &str, to: &Path) -> PathBuf {
    let mut c = cairn(state);
    c.args(["restore", "--db", db, "--to"]).arg(to);
    run_ok(c);
    to.to_path_buf()
}

fn until(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < PATIENCE, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_configured_service_runs_every_kind_and_restores_each_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let app = dir.path().join("app.db");
    let heap = dir.path().join("heap.pages");
    std::fs::write(&heap, vec![7u8; 64 * 4096]).unwrap();
    let wal = dir.path().join("wal");
    std::fs::create_dir(&wal).unwrap();
    std::fs::write(wal.join("000001"), vec![1u8; 10_000]).unwrap();
    let config = dir.path().join("cairn.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:0"

[quota]
scratch = "256MiB"
job_scratch = "64MiB"

[janitor]
every = "1s"
min_age = "1s"

[[database]]
name = "app"
kind = "sqlite"
source = "{app}"
interval = "200ms"
page_every = "1s"

[[database]]
name = "heap"
kind = "pages"
source = "{heap}"
interval = "200ms"
[database.retention]
keep_last = 2
grace = "0s"
gc_every = "1s"

[[database]]
name = "log"
kind = "segments"
source = "{wal}"
interval = "200ms"
"#,
            app = app.display(),
            heap = heap.display(),
            wal = wal.display(),
        ),
    )
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(app.clone(), Arc::clone(&stop));
    until("the writer created its database", || app.exists());
    let svc = Replicator::start_listening(service(&state, &config), false);

    let heap_db = [("db", "heap"), ("kind", "pages")];
    let log_db = [("db", "log"), ("kind", "segments")];
    let checkpoints = |labels: &[(&str, &str)]| {
        value(&svc.scrape(), "cairn_checkpoints_succeeded_total", labels).unwrap_or(0.0)
    };
    // Changes to the page file and new segments are each checkpointed.
    for round in 1..=4u64 {
        let before = (checkpoints(&heap_db), checkpoints(&log_db));
        touch_pages(&heap, round);
        std::fs::write(
            wal.join(format!("{:06}", round + 1)),
            vec![round as u8; 5_000],
        )
        .unwrap();
        until("the changed page file is checkpointed", || {
            checkpoints(&heap_db) > before.0
        });
        until("the new segment is checkpointed", || {
            checkpoints(&log_db) > before.1
        });
    }
    // An idle source publishes nothing: steps go on, checkpoints do not.
    std::thread::sleep(common_settle());
    let idle = checkpoints(&log_db);
    let steps = value(
        &svc.scrape(),
        "cairn_replicate_steps_total",
        &[("db", "log")],
    )
    .unwrap();
    until("steps continue while the segment directory is idle", || {
        value(
            &svc.scrape(),
            "cairn_replicate_steps_total",
            &[("db", "log")],
        )
        .unwrap()
            > steps + 5.0
    });
    // At most one more: the last look before the settle period may not have been trusted.
    assert!(checkpoints(&log_db) <= idle + 1.0);

    // GC keeps two generations of the page file and deletes the blobs of the others.
    until("GC deleted the page file's expired blobs", || {
        value(
            &svc.scrape(),
            "cairn_gc_deleted_objects_total",
            &[("db", "heap")],
        )
        .unwrap_or(0.0)
            > 0.0
    });
    until("the SQLite database published a page generation", || {
        checkpoints(&[("db", "app"), ("kind", "sqlite")]) >= 1.0
    });
    let ready = svc.wait_for("/ready", "every database ready", |c, _| c == 200);
    let v: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "store",
        "state_dir",
        "scratch",
        "db default/app",
        "db default/heap",
        "db default/log",
    ] {
        assert!(names.contains(&n), "{n} missing from {ready}");
    }

    stop.store(true, Ordering::Relaxed);
    let rows = w.join().unwrap();
    assert!(rows > 0);
    let (out, took) = svc.stop_with("-TERM");
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let dbs = report["databases"].as_array().unwrap();
    assert_eq!(dbs.len(), 3, "{out}");
    assert!(dbs[1]["checkpoints"].as_u64().unwrap() >= 4, "{out}");
    assert!(dbs[2]["unchanged"].as_u64().unwrap() >= 5, "{out}");

    // Each database restores to exactly its source.
    let heap_out = restore(&state, "heap", &dir.path().join("heap.restored"));
    assert_eq!(
        std::fs::read(&heap_out).unwrap(),
        std::fs::read(&heap).unwrap()
    );
    let log_out = restore(&state, "log", &dir.path().join("log.restored"));
    for e in std::fs::read_dir(&wal).unwrap() {
        let e = e.unwrap();
        assert_eq!(
            std::fs::read(log_out.join(e.file_name())).unwrap(),
            std::fs::read(e.path()).unwrap()
        );
    }
    let app_out = restore(&state, "app", &dir.path().join("app.restored.db"));
    assert_eq!(count_rows(&app_out), count_rows(&app));
    // Only the two newest data generations of the page file are retained.
    let mut c = cairn(&state);
    c.args(["--json", "ls", "--db", "heap"]);
    let ls: serde_json::Value = serde_json::from_str(&run_ok(c)).unwrap();
    assert!(ls.to_string().contains("generation"), "{ls}");
}

fn common_settle() -> Duration {
    cairn_orchestrator::SETTLE + Duration::from_millis(500)
}

fn count_rows(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    let ok: String = c
        .query_row("pragma integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    c.query_row("select count(*) from t", [], |r| r.get(0))
        .unwrap()
}

/// A tmpfs mounted on a directory for the test's life (root only; `None`, with the
/// reason printed, where mounting is not allowed).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self(at.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs for scratch ({})",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }

    /// Remounts read-only (`ro`) or read-write (`rw`), retrying while files are open
    /// for writing on it.
    fn remount(&self, mode: &str) {
        until(&format!("remount {mode}"), || {
            Command::new("mount")
                .args(["-o", &format!("remount,{mode}")])
                .arg(&self.0)
                .status()
                .unwrap()
                .success()
        });
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Appends to `path` until the file system is full.
fn fill(path: &Path) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let block = vec![0u8; 1 << 20];
    while std::io::Write::write_all(&mut f, &block).is_ok() {}
    let small = [0u8; 512];
    while std::io::Write::write_all(&mut f, &small).is_ok() {}
}

#[test]
fn scratch_read_only_then_full_is_reported_and_recovered_from() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let Some(scratch) = Tmpfs::mount(&state.join("scratch"), "16m") else {
        return;
    };
    let app = dir.path().join("app.db");
    let heap = dir.path().join("heap.pages");
    std::fs::write(&heap, vec![3u8; 256 * 4096]).unwrap();
    let config = dir.path().join("cairn.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:0"
compression_level = 0

[[database]]
name = "app"
kind = "sqlite"
source = "{app}"
interval = "200ms"
page_every = "500ms"
max_backoff = "1s"

[[database]]
name = "heap"
kind = "pages"
source = "{heap}"
interval = "200ms"
trigger = "interval"
max_backoff = "1s"
"#,
            app = app.display(),
            heap = heap.display(),
        ),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(app.clone(), Arc::clone(&stop));
    // The page file keeps changing, so every page checkpoint stages blobs in scratch.
    let pages = {
        let (heap, stop) = (heap.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                touch_pages(&heap, round);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    until("the writer created its database", || app.exists());
    let svc = Replicator::start_listening(service(&state, &config), false);
    svc.wait_for("/ready", "ready at first", |c, _| c == 200);
    let heap_ok = |svc: &Replicator| {
        value(
            &svc.scrape(),
            "cairn_checkpoints_succeeded_total",
            &[("db", "heap"), ("kind", "pages")],
        )
        .unwrap_or(0.0)
    };

    for fault in ["read-only", "full"] {
        match fault {
            "read-only" => scratch.remount("ro"),
            _ => fill(&scratch.0.join("filler")),
        }
        let t = Instant::now();
        let body = loop {
            let (c, b) = svc.get("/ready");
            if c == 503 && b.contains("\"name\":\"scratch\",\"ok\":false") {
                break b;
            }
            assert!(
                t.elapsed() < PATIENCE,
                "not ready with scratch {fault}: still {c} {b}"
            );
            if fault == "full" {
                // What a job freed since is taken too.
                fill(&scratch.0.join("filler"));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(body.contains("scratch directory"), "{body}");
        // It keeps answering, and page checkpoints fail while scratch cannot take them.
        assert_eq!(svc.get("/health").0, 200);
        let failed = |svc: &Replicator| {
            value(
                &svc.scrape(),
                "cairn_checkpoints_failed_total",
                &[("db", "heap"), ("kind", "pages")],
            )
            .unwrap_or(0.0)
        };
        let f0 = failed(&svc);
        until(
            &format!("a page checkpoint fails with scratch {fault}"),
            || failed(&svc) > f0,
        );
        match fault {
            "read-only" => scratch.remount("rw"),
            _ => std::fs::remove_file(scratch.0.join("filler")).unwrap(),
        }
        let before = heap_ok(&svc);
        svc.wait_for(
            "/ready",
            &format!("ready again after scratch {fault}"),
            |c, _| c == 200,
        );
        until(
            &format!("page checkpoints succeed again after scratch {fault}"),
            || heap_ok(&svc) > before,
        );
    }
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    pages.join().unwrap();
    // One more page checkpoint, of the file as it stays.
    let last = heap_ok(&svc);
    until("a page checkpoint after the last write", || {
        heap_ok(&svc) > last + 1.0
    });
    svc.stop_with("-TERM");

    // Nothing durable was lost: both restore exactly.
    let heap_out = restore(&state, "heap", &dir.path().join("heap.restored"));
    assert_eq!(
        std::fs::read(&heap_out).unwrap(),
        std::fs::read(&heap).unwrap()
    );
    let app_out = restore(&state, "app", &dir.path().join("app.restored.db"));
    assert_eq!(count_rows(&app_out), count_rows(&app));
}
