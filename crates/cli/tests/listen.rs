//! `cairn replicate --listen`: `/metrics` scraped while a writer commits and replication
//! runs, parsed with a Prometheus text parser; and `/ready` against a real S3 server
//! (moto) behind a TCP proxy that the test takes down and brings back: not ready, with
//! the store's endpoint named, while it is down; ready again once it is back. No timing is
//! asserted: every wait polls until its condition holds, within a generous bound that only
//! keeps a broken build from hanging.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_tests::proxy::TcpProxy;
use cairn_tests::s3::S3Server;
use common::{value, writer, Replicator, PATIENCE};
use prometheus_parse::Scrape;

fn replicate_cmd(state: &Path, src: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.arg("--state")
        .arg(state)
        .args(["--json", "replicate", "--db", "app", "--source"])
        .arg(src)
        .args(["--interval", "200ms", "--max-backoff", "1s"]);
    c
}

#[test]
fn metrics_scraped_during_replication_parse_and_count_its_work() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("app.db");
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(src.clone(), Arc::clone(&stop));
    while !src.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let rep = Replicator::start(replicate_cmd(&dir.path().join("state"), &src));
    assert_eq!(rep.get("/health").0, 200);

    let db = [("tenant", "default"), ("db", "app")];
    let segs = [("tenant", "default"), ("db", "app"), ("kind", "segments")];
    // Scrape while the writer commits, until replication has published a few times.
    let t = Instant::now();
    let s = loop {
        let s = rep.scrape();
        if value(&s, "cairn_checkpoints_succeeded_total", &segs).unwrap_or(0.0) >= 3.0 {
            break s;
        }
        assert!(
            t.elapsed() < PATIENCE,
            "no checkpoint succeeded: {:?}",
            s.samples
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    stop.store(true, Ordering::Relaxed);
    let rows = w.join().unwrap();
    assert!(rows > 0);

    for name in [
        "cairn_checkpoints_started_total",
        "cairn_checkpoints_failed_total",
        "cairn_checkpoint_duration_seconds",
        "cairn_restores_started_total",
        "cairn_restores_succeeded_total",
        "cairn_restores_failed_total",
        "cairn_restore_duration_seconds",
        "cairn_downloaded_bytes_total",
        "cairn_gc_deleted_bytes_total",
        "cairn_gc_deleted_objects_total",
        "cairn_store_retries_total",
        "cairn_job_queue_depth",
    ] {
        assert!(
            s.samples.iter().any(|x| x.metric == name),
            "{name} is missing from /metrics"
        );
    }
    let started = value(&s, "cairn_checkpoints_started_total", &segs).unwrap();
    let ok = value(&s, "cairn_checkpoints_succeeded_total", &segs).unwrap();
    assert!(
        ok >= 3.0 && started >= ok,
        "started {started}, succeeded {ok}"
    );
    assert!(value(&s, "cairn_checkpoint_duration_seconds", &segs).unwrap() >= ok);
    assert!(value(&s, "cairn_uploaded_bytes_total", &db).unwrap() > 0.0);
    assert!(value(&s, "cairn_blobs_reused_total", &db).is_some());
    assert!(value(&s, "cairn_generation", &db).unwrap() >= 1.0);
    let lag = value(&s, "cairn_replication_lag_seconds", &db).unwrap();
    assert!(lag.is_finite() && lag >= 0.0, "lag {lag}");
    let age = value(&s, "cairn_generation_age_seconds", &db).unwrap();
    assert!(age.is_finite() && age >= 0.0, "generation age {age}");
    assert!(value(&s, "cairn_watermark_lsn", &db).unwrap() > 0.0);
    // A step is counted when it ends, its checkpoints while it runs: a scrape in the middle
    // of a step sees them first. Steps keep coming (one per interval), so a later scrape
    // counts at least as many steps as this one counted checkpoints.
    let t = Instant::now();
    while value(&rep.scrape(), "cairn_replicate_steps_total", &db).unwrap_or(0.0) < ok {
        assert!(t.elapsed() < PATIENCE, "steps are not counted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(value(&s, "cairn_store_requests_total", &[("op", "put")]).unwrap() > 0.0);
    assert!(value(&s, "cairn_store_errors_total", &[("kind", "connect")]).is_some());
    let limit = value(&s, "cairn_quota_limit_bytes", &[("level", "global")]).unwrap();
    assert!(limit > 0.0);
    assert!(value(&s, "cairn_quota_used_bytes", &[("level", "global")]).unwrap() <= limit);
    assert!(value(&s, "cairn_quota_limit_bytes", &[("level", "tenant")]).unwrap() > 0.0);
    // The local cache (the spool) is a budget of its own, and replication holds some of it.
    let cache = [("level", "tenant"), ("name", "cache/tenant:default")];
    assert!(value(&s, "cairn_quota_limit_bytes", &cache).unwrap() > 0.0);
    assert!(value(&s, "cairn_quota_used_bytes", &cache).unwrap() > 0.0);
    assert_eq!(
        value(&s, "cairn_janitor_removed_dirs_total", &[]),
        Some(0.0)
    );

    let ready = rep.wait_for("/ready", "ready on a local store", |c, _| c == 200);
    let v: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(v["ready"], true, "{ready}");
    rep.stop();
}

#[test]
fn ready_fails_naming_the_store_while_s3_is_down_and_recovers_when_it_is_back() {
    let server = S3Server::start().unwrap();
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Short retry budgets, so a step against the dead store fails (and is retried by the
    // loop) in seconds rather than minutes.
    let store_cfg = dir.path().join("store.toml");
    std::fs::write(
        &store_cfg,
        "retry_max_attempts = 2\nretry_initial_backoff_ms = 50\nretry_max_backoff_ms = 200\n\
         retry_total_ms = 1000\nconnect_timeout_ms = 1000\nrequest_timeout_ms = 5000\n",
    )
    .unwrap();
    let src = dir.path().join("app.db");
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(src.clone(), Arc::clone(&stop));
    while !src.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut cmd = replicate_cmd(&dir.path().join("state"), &src);
    server.apply_env(&mut cmd);
    cmd.env("AWS_ENDPOINT_URL", proxy.endpoint())
        .arg("--store")
        .arg(server.url("svc"))
        .arg("--store-config")
        .arg(&store_cfg)
        .args(["--lag-bound", "30s"]);
    let rep = Replicator::start(cmd);

    rep.wait_for("/ready", "ready with the store up", |c, _| c == 200);

    proxy.stop();
    let body = rep.wait_for("/ready", "not ready with the store down", |c, b| {
        c == 503 && b.contains("\"name\":\"store\",\"ok\":false")
    });
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false);
    let store = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "store")
        .unwrap();
    let detail = store["detail"].as_str().unwrap();
    assert!(
        detail.contains(&proxy.endpoint()),
        "the reason names the endpoint: {detail}"
    );
    // The process keeps running and answering while the store is down.
    assert_eq!(rep.get("/health").0, 200);
    // Replication steps fail and are retried rather than ending the command.
    rep.wait_for("/metrics", "failed steps counted", |_, b| {
        let s = Scrape::parse(b.lines().map(|l| Ok(l.to_string()))).unwrap();
        value(&s, "cairn_replicate_step_failures_total", &[("db", "app")]).unwrap_or(0.0) > 0.0
    });

    proxy.resume(server.addr()).unwrap();
    let body = rep.wait_for("/ready", "ready again with the store back", |c, _| c == 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true, "{body}");
    // And it ships again: a checkpoint succeeds after the outage.
    let before = value(
        &rep.scrape(),
        "cairn_checkpoints_succeeded_total",
        &[("kind", "segments")],
    )
    .unwrap();
    rep.wait_for("/metrics", "a checkpoint after the outage", |_, b| {
        let s = Scrape::parse(b.lines().map(|l| Ok(l.to_string()))).unwrap();
        value(
            &s,
            "cairn_checkpoints_succeeded_total",
            &[("kind", "segments")],
        )
        .unwrap_or(0.0)
            > before
    });
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    rep.stop();
}
