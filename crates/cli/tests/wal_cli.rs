//! The engine-contract commands, run as child processes on the embedded default store:
//! `watermark`, `lease`, `release`, `truncate --head-before | --tail-after`, `checkpoint
//! --lsn | --ranges` and `restore --lsn`, with their JSON fields and their errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use cairn_tests::fixtures;
use rand::SeedableRng;
use serde_json::Value;

fn cairn(state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.arg("--state").arg(state).arg("--json");
    c
}

fn ok(cmd: &mut Command) -> Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fails(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{cmd:?} should fail with 1");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn watermark_leases_truncation_and_restore_to_a_point() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let wal = dir.path().join("wal");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    fixtures::write_segments(&wal, 0, 3, 5_000, &mut rng).unwrap();
    let segs = fixtures::read_dir_files(&wal).unwrap();
    let len = |n: &str| segs[n].len() as u64;
    let (e0, e1) = (
        len("seg-00000000"),
        len("seg-00000000") + len("seg-00000001"),
    );
    let end = e1 + len("seg-00000002");
    let w = wal.display().to_string();
    let c = ok(cairn(&state).args([
        "checkpoint",
        "--db",
        "d",
        "--kind",
        "segments",
        "--source",
        &w,
    ]));
    assert_eq!(c["generation"], 1);
    // A page checkpoint at the end of the second segment.
    let pages = dir.path().join("pages");
    let data = fixtures::write_page_file(&pages, 8, 4096, &mut rng).unwrap();
    let p = pages.display().to_string();
    let e1_s = e1.to_string();
    ok(cairn(&state).args([
        "checkpoint",
        "--db",
        "d",
        "--kind",
        "pages",
        "--source",
        &p,
        "--lsn",
        &e1_s,
    ]));

    let wm = ok(cairn(&state).args(["watermark", "--db", "d"]));
    assert_eq!(wm["watermark"], end, "{wm}");
    assert_eq!(
        (wm["wal_start"].as_u64(), wm["wal_end"].as_u64()),
        (Some(0), Some(end))
    );
    assert_eq!(wm["page_lsn"], e1);
    assert_eq!(wm["leases"], serde_json::json!([]));

    // A lease holds the watermark at its start and blocks an overlapping truncation.
    let l = ok(cairn(&state).args([
        "lease", "--db", "d", "--start", "10", "--end", "20", "--ttl", "60s",
    ]));
    let id = l["lease"].as_str().unwrap().to_string();
    let wm = ok(cairn(&state).args(["watermark", "--db", "d"]));
    assert_eq!(wm["watermark"], 10);
    let lease = &wm["leases"][0];
    assert_eq!(
        (
            lease["id"].as_str(),
            lease["start"].as_u64(),
            lease["end"].as_u64()
        ),
        (Some(id.as_str()), Some(10), Some(20))
    );
    assert!(lease["expires_unix_ms"].as_u64().unwrap() > 0);
    let e0_s = e0.to_string();
    let err = fails(cairn(&state).args([
        "truncate",
        "--db",
        "d",
        "--head-before",
        &e0_s,
        "--timeout",
        "100ms",
    ]));
    assert!(
        err.contains(&id) && err.contains("d") && err.contains("10..20"),
        "{err}"
    );
    ok(cairn(&state).args(["release", "--db", "d", "--lease", &id]));
    let err = fails(cairn(&state).args(["release", "--db", "d", "--lease", &id]));
    assert!(err.contains(&id), "{err}");

    // Head truncation: the page checkpoint at e1 keeps the newest state restorable.
    let t = ok(cairn(&state).args(["truncate", "--db", "d", "--head-before", &e0_s]));
    assert_eq!(
        (t["generation"].as_u64(), t["wal_start"].as_u64()),
        (Some(3), Some(e0)),
        "{t}"
    );

    // Restore to a point: the page checkpoint at e1 and the one segment after it.
    let to = dir.path().join("point");
    let end_s = end.to_string();
    let r = ok(cairn(&state).args([
        "restore",
        "--db",
        "d",
        "--lsn",
        &end_s,
        "--to",
        &to.display().to_string(),
    ]));
    assert_eq!(
        (r["page_generation"].as_u64(), r["page_lsn"].as_u64()),
        (Some(2), Some(e1)),
        "{r}"
    );
    assert_eq!(
        (r["replay_from"].as_u64(), r["replay_to"].as_u64()),
        (Some(e1), Some(end))
    );
    assert_eq!(r["segments"], serde_json::json!(["seg-00000002"]));
    assert!(std::fs::read(to.join("pages")).unwrap() == data);
    let restored = fixtures::read_dir_files(&to.join("wal")).unwrap();
    assert_eq!(restored.keys().collect::<Vec<_>>(), vec!["seg-00000002"]);
    assert!(restored["seg-00000002"] == segs["seg-00000002"]);
    // Past the end, or below the truncated head without a page checkpoint: refused
    // (into a fresh target, so that the refusal is about the point, not the target).
    let to = dir.path().join("refused");
    let past = (end + 1).to_string();
    let err = fails(cairn(&state).args([
        "restore",
        "--db",
        "d",
        "--lsn",
        &past,
        "--to",
        &to.display().to_string(),
    ]));
    assert!(
        err.contains("restorable") && err.contains(&format!("{e1}..={end}")),
        "{err}"
    );
    let err = fails(cairn(&state).args([
        "restore",
        "--db",
        "d",
        "--lsn",
        "5",
        "--to",
        &to.display().to_string(),
    ]));
    assert!(err.contains("truncated"), "{err}");

    // Tail truncation: refused without force, cut at a boundary with it.
    let err = fails(cairn(&state).args(["truncate", "--db", "d", "--tail-after", &e1_s]));
    assert!(err.contains("published state past LSN"), "{err}");
    let mid = (e1 + 1).to_string();
    let err = fails(cairn(&state).args(["truncate", "--db", "d", "--tail-after", &mid, "--force"]));
    assert!(
        err.contains("segment boundary") && err.contains("seg-00000002"),
        "{err}"
    );
    let t = ok(cairn(&state).args(["truncate", "--db", "d", "--tail-after", &e1_s, "--force"]));
    assert_eq!(
        (t["wal_end"].as_u64(), t["page_lsn"].as_u64()),
        (Some(e1), Some(e1)),
        "{t}"
    );
}

#[test]
fn an_engine_with_its_own_lsns_gives_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let wal = dir.path().join("wal");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    fixtures::write_segments(&wal, 0, 2, 100, &mut rng).unwrap();
    let ranges = dir.path().join("ranges");
    std::fs::write(&ranges, "seg-00000000 1000 1010\nseg-00000001 1010 1500\n").unwrap();
    let (w, r) = (wal.display().to_string(), ranges.display().to_string());
    ok(cairn(&state).args([
        "checkpoint",
        "--db",
        "e",
        "--kind",
        "segments",
        "--source",
        &w,
        "--ranges",
        &r,
    ]));
    let wm = ok(cairn(&state).args(["watermark", "--db", "e"]));
    assert_eq!(
        (wm["wal_start"].as_u64(), wm["wal_end"].as_u64()),
        (Some(1000), Some(1500)),
        "{wm}"
    );
    // A range that does not continue the stream is refused, naming the segment.
    fixtures::write_segments(&wal, 2, 1, 100, &mut rng).unwrap();
    std::fs::write(
        &ranges,
        "seg-00000000 1000 1010\nseg-00000001 1010 1500\nseg-00000002 1600 1700\n",
    )
    .unwrap();
    let out = cairn(&state)
        .args([
            "checkpoint",
            "--db",
            "e",
            "--kind",
            "segments",
            "--source",
            &w,
            "--ranges",
            &r,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("seg-00000002") && err.contains("1500"),
        "{err}"
    );
}
