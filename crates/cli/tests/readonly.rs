//! `cairn status` and `cairn ls` beside a running `cairn replicate`, which holds the state
//! directory: both read it read-only (decision 0028) while a writer commits and the
//! replicator publishes generations, see what it published, and see newer generations
//! as they are published; the replicator is not disturbed and stops cleanly on SIGINT.
//! No timing is asserted: every wait polls until its condition holds, within a generous
//! bound that only keeps a broken build from hanging.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{writer, PATIENCE};
use serde_json::Value;

fn cairn(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--state")
        .arg(state)
        .arg("--json")
        .args(args)
        .output()
        .unwrap()
}

/// Runs `args`; it must succeed. Its JSON output.
fn ok(state: &Path, args: &[&str]) -> Value {
    let out = cairn(state, args);
    assert!(
        out.status.success(),
        "cairn {args:?} failed beside the replicator: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The generation numbers `cairn ls --db app` lists.
fn generations(state: &Path) -> Vec<u64> {
    ok(state, &["ls", "--db", "app"])
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["generation"].as_u64().unwrap())
        .collect()
}

/// Polls until `done` holds, within [`PATIENCE`].
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < PATIENCE, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn still_running(rep: &mut Child) {
    assert!(
        rep.try_wait().unwrap().is_none(),
        "the replicator exited while status and ls ran"
    );
}

#[test]
fn status_and_ls_read_the_state_while_replicate_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let (state, src) = (dir.path().join("state"), dir.path().join("app.db"));
    // Before anything ran: no jobs, no databases, and the readers create no state (which
    // would take the lock a starting service needs). (Opening the embedded default store
    // creates its empty directory, as for any command.)
    assert_eq!(ok(&state, &["status"]), serde_json::json!([]));
    assert_eq!(ok(&state, &["ls"]), serde_json::json!([]));
    for part in ["lock", "db", "scratch"] {
        assert!(!state.join(part).exists(), "a reader created {part}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(src.clone(), Arc::clone(&stop));
    wait_for("the writer created its database", || src.exists());
    let mut rep = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--state")
        .arg(&state)
        .args(["--json", "replicate", "--db", "app", "--source"])
        .arg(&src)
        .args(["--interval", "100ms", "--page-every-bytes", "200000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = rep.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[cairn replicate] {line}");
        }
    });

    // The replicator's first publication (before it, `ls --db app` names no database).
    wait_for("the replicator published no generation", || {
        let out = cairn(&state, &["ls", "--db", "app"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
    });
    still_running(&mut rep);
    // The state is held: a command that would own it is refused by name.
    let held = cairn(&state, &["watermark", "--db", "app"]);
    assert!(!held.status.success());
    assert!(
        String::from_utf8_lossy(&held.stderr).contains("in use by another cairn process"),
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );

    // `ls` lists the database; `ls --db` its generations, numbered from 1.
    let dbs = ok(&state, &["ls"]);
    assert_eq!(dbs, serde_json::json!(["app"]), "{dbs}");
    let first = generations(&state);
    assert_eq!(first, (1..=first.len() as u64).collect::<Vec<_>>());
    // `status` lists the replicator's checkpoint jobs of the database.
    let jobs = ok(&state, &["status"]);
    let jobs = jobs.as_array().unwrap();
    assert!(
        jobs.iter()
            .any(|j| j["kind"] == "checkpoint" && j["db"] == "app"),
        "{jobs:?}"
    );
    // Fresh data: later reads see the generations published since.
    let newest = *first.last().unwrap();
    wait_for("ls never saw a newer generation", || {
        generations(&state).last().is_some_and(|&g| g > newest)
    });
    wait_for("status never saw a newer job's generation", || {
        ok(&state, &["status"])
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|j| j["generation"].as_u64())
            .any(|g| g > newest)
    });
    still_running(&mut rep);

    // Stopped by SIGINT, the replicator exits cleanly and its report counts its work.
    stop.store(true, Ordering::Relaxed);
    let commits = w.join().unwrap();
    assert!(commits > 0);
    Command::new("kill")
        .args(["-INT", &rep.id().to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = rep.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < PATIENCE,
            "replicate did not exit after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "replicate exited with {status}");
    let mut out = String::new();
    std::io::Read::read_to_string(rep.stdout.as_mut().unwrap(), &mut out).unwrap();
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(report["steps"].as_u64().unwrap() > 0, "{report}");
    // With the service gone, the readers agree with a plain open and it owns the state.
    let after = generations(&state);
    assert!(after.len() > first.len(), "{after:?}");
    ok(&state, &["watermark", "--db", "app"]);
}
