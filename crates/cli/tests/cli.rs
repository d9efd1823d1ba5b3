//! The `cairn` command's contract, run as a child process: against the embedded default
//! store and against a real S3 server (moto) on 127.0.0.1 started by the test itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use cairn_tests::fixtures;
use cairn_tests::s3::S3Server;
use rand::SeedableRng;
use serde_json::Value;

fn cairn(state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.arg("--state").arg(state);
    c
}

fn run_ok(cmd: &mut Command) -> Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{cmd:?}: bad JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn run_err(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} should have failed");
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// checkpoint → ls → verify → restore for every kind, with the JSON contract checked.
fn exercise_all_kinds(dir: &Path, store: Option<&str>, s3: Option<&S3Server>) {
    let state = dir.join("state");
    // The embedded default store is file://<state>/store; a fresh state directory reaches
    // the same objects by naming it.
    let default_store = format!("file://{}", state.join("store").display());
    let cmd = |s: &Path| {
        let mut c = cairn(s);
        match store {
            Some(u) => {
                c.arg("--store").arg(u);
            }
            None if s != state => {
                c.arg("--store").arg(&default_store);
            }
            None => {}
        }
        if let Some(s) = s3 {
            s.apply_env(&mut c);
        }
        c
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let pages = dir.join("pages.bin");
    let data = fixtures::write_page_file(&pages, 300, 4096, &mut rng).unwrap();
    let wal = dir.join("wal");
    fixtures::write_segments(&wal, 0, 4, 300_000, &mut rng).unwrap();
    let sqlite = dir.join("app.db");
    fixtures::build_sqlite(&sqlite, 2000, 1).unwrap();
    let rows = fixtures::sqlite_rows(&sqlite).unwrap();

    for (db, kind, src) in [
        ("pg", "pages", &pages),
        ("wal", "segments", &wal),
        ("app", "sqlite", &sqlite),
    ] {
        // Global options after the subcommand too.
        let j = run_ok(
            cmd(&state)
                .args([
                    "checkpoint",
                    "--db",
                    db,
                    "--kind",
                    kind,
                    "--chunk-size",
                    "262144",
                    "--json",
                ])
                .arg("--source")
                .arg(src),
        );
        for field in [
            "generation",
            "kind",
            "source_bytes",
            "bytes_uploaded",
            "blobs_uploaded",
            "blobs_reused",
            "duration_ms",
        ] {
            assert!(j.get(field).is_some(), "checkpoint JSON lacks {field}: {j}");
        }
        assert_eq!(j["generation"], 1);
        assert_eq!(j["kind"], kind);
        let again = run_ok(
            cmd(&state)
                .args([
                    "--json",
                    "checkpoint",
                    "--db",
                    db,
                    "--kind",
                    kind,
                    "--chunk-size",
                    "262144",
                ])
                .arg("--source")
                .arg(src),
        );
        assert_eq!(again["generation"], 2);
        assert_eq!(
            again["blobs_uploaded"], 0,
            "unchanged source uploads no blob: {again}"
        );
        let ls = run_ok(cmd(&state).args(["ls", "--db", db, "--json"]));
        assert_eq!(ls.as_array().unwrap().len(), 2);
        let v = run_ok(cmd(&state).args(["verify", "--db", db, "--deep", "--json"]));
        assert_eq!(v["ok"], true, "{v}");
        assert!(v["blobs_checked"].as_u64().unwrap() > 0);
        assert_eq!(v["errors"].as_array().unwrap().len(), 0);
    }

    // Restore everything from a fresh, empty state directory: the store alone suffices.
    let fresh = dir.join("fresh-state");
    let out = dir.join("pages.out");
    let r = run_ok(
        cmd(&fresh)
            .args(["restore", "--db", "pg", "--generation", "1", "--json"])
            .arg("--to")
            .arg(&out),
    );
    assert_eq!(r["generation"], 1);
    assert_eq!(r["bytes_written"], data.len() as u64);
    assert!(r.get("duration_ms").is_some());
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let wal_out = dir.join("wal.out");
    run_ok(
        cmd(&fresh)
            .args(["restore", "--db", "wal", "--json"])
            .arg("--to")
            .arg(&wal_out),
    );
    assert_eq!(
        fixtures::read_dir_files(&wal_out).unwrap(),
        fixtures::read_dir_files(&wal).unwrap()
    );
    let db_out = dir.join("app.out.db");
    run_ok(
        cmd(&fresh)
            .args(["restore", "--db", "app", "--json"])
            .arg("--to")
            .arg(&db_out),
    );
    assert_eq!(
        fixtures::integrity(&db_out).unwrap(),
        vec!["ok".to_string()]
    );
    assert_eq!(fixtures::sqlite_rows(&db_out).unwrap(), rows);

    // Unknown database and generation are named.
    let e = run_err(
        cmd(&fresh)
            .args(["restore", "--db", "nope"])
            .arg("--to")
            .arg(dir.join("x")),
    );
    assert!(stderr(&e).contains("nope"), "{}", stderr(&e));
    let e = run_err(
        cmd(&fresh)
            .args(["restore", "--db", "pg", "--generation", "9"])
            .arg("--to")
            .arg(dir.join("x")),
    );
    assert!(stderr(&e).contains("generation 9"), "{}", stderr(&e));
}

#[test]
fn all_kinds_on_the_embedded_default_store() {
    let dir = tempfile::tempdir().unwrap();
    exercise_all_kinds(dir.path(), None, None);
    // The default store lives under the state directory.
    assert!(dir
        .path()
        .join("state/store/tenants/default/dbs/pg/manifests")
        .is_dir());
}

#[test]
fn all_kinds_through_s3_on_a_local_server() {
    let server = S3Server::start().unwrap_or_else(|e| panic!("S3 server: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let url = server.url("cairn-cli");
    exercise_all_kinds(dir.path(), Some(&url), Some(&server));
    // Objects really are in the bucket.
    let listing = server
        .request(
            "GET",
            &format!(
                "/{}?list-type=2&prefix=cairn-cli/tenants/default/dbs/pg/manifests/",
                server.bucket()
            ),
            &[],
            b"",
        )
        .unwrap();
    assert_eq!(listing.status, 200);
    assert!(
        listing.body.contains("00000000000000000002.cmf"),
        "{}",
        listing.body
    );
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let missing = dir.path().join("does-not-exist.db");
    let e = run_err(
        cairn(&state)
            .args(["checkpoint", "--db", "x", "--kind", "sqlite"])
            .arg("--source")
            .arg(&missing),
    );
    assert!(stderr(&e).contains("does-not-exist.db"), "{}", stderr(&e));
    let e = run_err(cairn(&state).args(["--store", "ftp://nowhere/x", "ls", "--db", "x"]));
    assert!(stderr(&e).contains("ftp://nowhere/x"), "{}", stderr(&e));
    let odd = dir.path().join("odd.bin");
    std::fs::write(&odd, vec![1u8; 5000]).unwrap();
    let e = run_err(
        cairn(&state)
            .args(["checkpoint", "--db", "x", "--kind", "pages"])
            .arg("--source")
            .arg(&odd),
    );
    assert!(
        stderr(&e).contains("odd.bin") && stderr(&e).contains("page size"),
        "{}",
        stderr(&e)
    );
    let e = run_err(
        cairn(&state)
            .args(["checkpoint", "--db", "../x", "--kind", "pages"])
            .arg("--source")
            .arg(&odd),
    );
    assert!(stderr(&e).contains("../x"), "{}", stderr(&e));
    let not_sqlite = dir.path().join("junk.db");
    std::fs::write(&not_sqlite, vec![7u8; 8192]).unwrap();
    let e = run_err(
        cairn(&state)
            .args(["checkpoint", "--db", "x", "--kind", "sqlite"])
            .arg("--source")
            .arg(&not_sqlite),
    );
    assert!(stderr(&e).contains("junk.db"), "{}", stderr(&e));
}

#[test]
fn verify_and_restore_name_a_corrupt_blob() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let src = dir.path().join("p.bin");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    fixtures::write_page_file(&src, 64, 4096, &mut rng).unwrap();
    run_ok(
        cairn(&state)
            .args([
                "checkpoint",
                "--db",
                "c",
                "--kind",
                "pages",
                "--chunk-size",
                "65536",
                "--json",
            ])
            .arg("--source")
            .arg(&src),
    );
    let blobs = state.join("store/tenants/default/dbs/c/blobs");
    let victim = std::fs::read_dir(&blobs).unwrap().next().unwrap().unwrap();
    let name = victim.file_name().to_string_lossy().into_owned();
    let mut bytes = std::fs::read(victim.path()).unwrap();
    bytes[40] ^= 0x10;
    std::fs::write(victim.path(), bytes).unwrap();
    let out = run_err(cairn(&state).args(["verify", "--db", "c", "--deep", "--json"]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(stderr(&out).contains(&name), "{}", stderr(&out));
    let out = run_err(
        cairn(&state)
            .args(["restore", "--db", "c"])
            .arg("--to")
            .arg(dir.path().join("r")),
    );
    assert!(stderr(&out).contains(&name), "{}", stderr(&out));
}

#[test]
fn demo_runs_and_passes() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["demo", "--rows", "20000", "--json", "--dir"])
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["restores"].as_array().unwrap().len(), 2);
}

#[test]
fn two_processes_racing_for_a_generation_one_wins_the_other_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let srcs: Vec<_> = (0..2)
        .map(|w| {
            let p = dir.path().join(format!("src-{w}.bin"));
            fixtures::write_page_file(&p, 2048, 4096, &mut rng).unwrap();
            p
        })
        .collect();
    let run = |w: usize| {
        let mut c = cairn(&dir.path().join(format!("state-{w}")));
        c.args([
            "--store",
            &store,
            "--json",
            "checkpoint",
            "--db",
            "shared",
            "--kind",
            "pages",
            "--chunk-size",
            "65536",
        ])
        .arg("--source")
        .arg(&srcs[w]);
        c
    };
    let mut fenced = 0;
    for round in 0..4 {
        let children: Vec<_> = (0..2)
            .map(|w| {
                run(w)
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outs: Vec<Output> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        for (w, o) in outs.iter().enumerate() {
            if !o.status.success() {
                fenced += 1;
                assert!(
                    stderr(o).contains("another writer"),
                    "round {round}: {}",
                    stderr(o)
                );
                // The loser's next attempt builds on the winner's generation.
                let again = run_ok(&mut run(w));
                let gens = run_ok(
                    cairn(&dir.path().join(format!("state-{w}")))
                        .args(["--store", &store, "ls", "--db", "shared", "--json"]),
                );
                assert_eq!(
                    again["generation"],
                    gens.as_array().unwrap().len() as u64,
                    "round {round}"
                );
            }
        }
    }
    assert!(
        fenced >= 1,
        "the two processes never raced for one generation"
    );
    // Generations are contiguous; each has one writer and parent = previous generation.
    let gens = run_ok(
        cairn(&dir.path().join("state-0"))
            .args(["--store", &store, "ls", "--db", "shared", "--json"]),
    );
    for (i, g) in gens.as_array().unwrap().iter().enumerate() {
        assert_eq!(g["generation"], i as u64 + 1);
        if i > 0 {
            assert_eq!(g["parent"], i as u64);
        }
    }
}

#[test]
fn a_dead_endpoint_fails_fast_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("db.pages");
    std::fs::write(&src, vec![7u8; 8192]).unwrap();
    let started = std::time::Instant::now();
    let out = run_err(
        cairn(&dir.path().join("state"))
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
            .env("AWS_ACCESS_KEY_ID", "x")
            .env("AWS_SECRET_ACCESS_KEY", "y")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true")
            .args(["--store", "s3://bucket/p", "checkpoint", "--db", "d"])
            .args(["--kind", "pages", "--source"])
            .arg(&src),
    );
    let err = stderr(&out);
    // The issue's bound for a one-shot command against an endpoint refusing connections.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{err}"
    );
    assert!(err.contains("127.0.0.1:1"), "the endpoint is named: {err}");
}

#[test]
fn what_cairn_creates_is_the_operators_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let src = dir.path().join("db.pages");
    std::fs::write(&src, vec![7u8; 65536]).unwrap();
    run_ok(
        cairn(&state)
            .args([
                "--json",
                "checkpoint",
                "--db",
                "d",
                "--kind",
                "pages",
                "--source",
            ])
            .arg(&src),
    );
    let to = dir.path().join("restored");
    run_ok(
        cairn(&state)
            .args(["--json", "restore", "--db", "d", "--to"])
            .arg(&to),
    );
    let mut seen = 0;
    let mut todo = vec![state, to];
    while let Some(p) = todo.pop() {
        let m = std::fs::metadata(&p).unwrap();
        let mode = m.permissions().mode() & 0o777;
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} has mode {mode:o}", p.display());
        seen += 1;
        if m.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(
        seen > 10,
        "the walk saw the state directory, its store and the restore"
    );
}

#[test]
fn compression_is_on_by_default_and_level_zero_turns_it_off() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("zeros.pages");
    std::fs::write(&src, vec![0u8; 1 << 20]).unwrap();
    let uploaded = |state: &str, extra: &[&str]| {
        let v = run_ok(
            cairn(&dir.path().join(state))
                .args(extra)
                .args([
                    "--json",
                    "checkpoint",
                    "--db",
                    "z",
                    "--kind",
                    "pages",
                    "--source",
                ])
                .arg(&src),
        );
        v["bytes_uploaded"].as_u64().unwrap()
    };
    assert!(uploaded("on", &[]) < 64 * 1024);
    assert!(uploaded("off", &["--compression-level", "0"]) > 1 << 20);
    let out = run_err(
        cairn(&dir.path().join("bad"))
            .args(["--compression-level", "99", "checkpoint", "--db", "z"])
            .args(["--kind", "pages", "--source"])
            .arg(&src),
    );
    assert!(
        stderr(&out).contains("compression level"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn logs_follow_a_job_by_its_span_and_carry_no_colour_codes_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("p.pages");
    std::fs::write(&src, vec![5u8; 1 << 16]).unwrap();
    let checkpoint = |format: &str| {
        let out = cairn(&dir.path().join("state"))
            .env("CAIRN_LOG", "info")
            .args(["--log-format", format, "checkpoint", "--db", "logged"])
            .args(["--kind", "pages", "--source"])
            .arg(&src)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };
    let text = checkpoint("text");
    assert!(text.contains("job running"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes off a terminal: {text:?}"
    );
    let json = checkpoint("json");
    let lines: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let done = lines
        .iter()
        .find(|l| l["fields"]["message"] == "job succeeded")
        .unwrap_or_else(|| panic!("no `job succeeded` line: {json}"));
    let span = &done["span"];
    assert_eq!(span["name"], "job", "{done}");
    assert_eq!(span["db"], "logged");
    assert_eq!(span["kind"], "checkpoint");
    assert_eq!(span["generation"], 2, "{done}");
    assert_eq!(span["phase"], "Cleaned", "{done}");
    assert_eq!(span["job"].as_str().unwrap().len(), 16, "{done}");
    // Every line of the job carries its id.
    let job = span["job"].clone();
    for l in lines
        .iter()
        .filter(|l| l["target"] == "cairn_orchestrator::runner")
    {
        assert_eq!(l["span"]["job"], job, "{l}");
    }
}
