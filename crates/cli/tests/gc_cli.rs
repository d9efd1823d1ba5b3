//! Retention from the command line on the embedded default store: `pin` keeps a
//! generation through collections until `unpin`; an expired generation is refused by
//! name; a collection with nothing to do publishes nothing; `--dry-run` deletes nothing;
//! a restore into an occupied target is refused unless `--force`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use rand::{RngCore, SeedableRng};
use serde_json::Value;

fn cairn(state: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--state")
        .arg(state)
        .arg("--json")
        .args(args)
        .output()
        .unwrap()
}

fn ok(state: &Path, args: &[&str]) -> Value {
    let out = cairn(state, args);
    assert!(
        out.status.success(),
        "cairn {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fails(state: &Path, args: &[&str]) -> String {
    let out = cairn(state, args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "cairn {args:?} should fail with 1"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn gens(v: &Value, field: &str) -> Vec<u64> {
    v[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_u64().unwrap())
        .collect()
}

#[test]
fn pins_expiry_dry_runs_idle_collections_and_occupied_targets() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let src = dir.path().join("db.pages");
    let s = src.display().to_string();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // Four generations, each rewriting the whole file: every one has blobs of its own.
    let mut snapshots = Vec::new();
    for g in 1..=4u64 {
        let mut data = vec![0u8; 64 * 4096];
        rng.fill_bytes(&mut data);
        std::fs::write(&src, &data).unwrap();
        let r = ok(
            &state,
            &["checkpoint", "--db", "d", "--kind", "pages", "--source", &s],
        );
        assert_eq!(r["generation"].as_u64(), Some(g));
        snapshots.push(data);
    }
    ok(
        &state,
        &["pin", "--db", "d", "--generation", "1", "--note", "audit"],
    );

    // A dry run decides what a collection would do and deletes nothing.
    let dry = ok(
        &state,
        &["gc", "--db", "d", "--keep-last", "1", "--dry-run"],
    );
    assert_eq!(gens(&dry, "generations_expired"), vec![2, 3]);
    assert_eq!(
        (dry["dry_run"].as_bool(), dry["blobs_deleted"].as_u64()),
        (Some(true), Some(0))
    );
    let restored = dir.path().join("g2");
    let t = restored.display().to_string();
    ok(
        &state,
        &["restore", "--db", "d", "--generation", "2", "--to", &t],
    );
    assert!(std::fs::read(&restored).unwrap() == snapshots[1]);

    // The pin keeps generation 1 through a real collection; 2 and 3 expire.
    let r = ok(
        &state,
        &["gc", "--db", "d", "--keep-last", "1", "--explain"],
    );
    assert_eq!(gens(&r, "generations_expired"), vec![2, 3], "{r}");
    assert_eq!(gens(&r, "generations_retained"), vec![1, 4], "{r}");
    assert!(r["blobs_deleted"].as_u64().unwrap() > 0, "{r}");
    let reasons: Vec<&str> = r["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"pin 1"), "{reasons:?}");
    assert!(reasons.contains(&"retained generation 4"), "{reasons:?}");
    let collection = r["generation"].as_u64().unwrap();
    assert_eq!(collection, 5);

    // An expired generation is refused by name; the pinned one restores exactly.
    let other = dir.path().join("other");
    let o = other.display().to_string();
    let err = fails(
        &state,
        &["restore", "--db", "d", "--generation", "2", "--to", &o],
    );
    assert!(
        err.contains("generation 2") && err.contains("expired"),
        "{err}"
    );
    let t1 = dir.path().join("g1");
    let t1s = t1.display().to_string();
    ok(
        &state,
        &["restore", "--db", "d", "--generation", "1", "--to", &t1s],
    );
    assert!(std::fs::read(&t1).unwrap() == snapshots[0]);

    // The occupied target of the earlier restore is refused, and kept, unless --force.
    let err = fails(
        &state,
        &["restore", "--db", "d", "--generation", "4", "--to", &t],
    );
    assert!(err.contains(&t) && err.contains("--force"), "{err}");
    assert!(std::fs::read(&restored).unwrap() == snapshots[1]);
    ok(
        &state,
        &[
            "restore",
            "--db",
            "d",
            "--generation",
            "4",
            "--to",
            &t,
            "--force",
        ],
    );
    assert!(std::fs::read(&restored).unwrap() == snapshots[3]);

    // Nothing left to do: the collection publishes no generation and deletes nothing.
    let idle = ok(&state, &["gc", "--db", "d", "--keep-last", "1"]);
    assert!(idle["generation"].is_null(), "{idle}");
    assert_eq!(idle["blobs_deleted"].as_u64(), Some(0), "{idle}");
    let listed = ok(&state, &["ls", "--db", "d"]);
    assert_eq!(listed.as_array().unwrap().len(), 5, "{listed}");

    // Unpinned, generation 1 goes with the next collection.
    ok(&state, &["unpin", "--db", "d", "--generation", "1"]);
    let r = ok(&state, &["gc", "--db", "d", "--keep-last", "1"]);
    assert_eq!(gens(&r, "generations_expired"), vec![1], "{r}");
    assert!(r["blobs_deleted"].as_u64().unwrap() > 0, "{r}");
    let err = fails(
        &state,
        &["restore", "--db", "d", "--generation", "1", "--to", &o],
    );
    assert!(
        err.contains("generation 1") && err.contains("expired"),
        "{err}"
    );
    ok(&state, &["verify", "--db", "d", "--deep"]);
}
