//! `cairn demo`: a realistic SQLite workload checkpointed twice, both generations restored
//! from a fresh state directory through the embedded default store, each checked with
//! `PRAGMA integrity_check` and compared row by row with the source at checkpoint time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn_core::{DbId, Generation};
use cairn_orchestrator::{default_store_url, CairnError, Checkpointer, Config, Source};
use rand::{Rng, SeedableRng};
use rusqlite::Connection;
use serde::Serialize;

use crate::output::bytes;

#[derive(Serialize)]
struct Step {
    step: String,
    generation: u64,
    source_bytes: u64,
    bytes_uploaded: u64,
    blobs_uploaded: u64,
    blobs_reused: u64,
    chunks_delta: u64,
    chunks_full: u64,
    chunks_unchanged: u64,
    bytes_dirty: u64,
    duration_ms: u64,
}

#[derive(Serialize)]
struct RestoreCheck {
    generation: u64,
    bytes_written: u64,
    duration_ms: u64,
    integrity_check: String,
    contents_match: bool,
}

#[derive(Serialize)]
struct DemoReport {
    dir: String,
    store: String,
    checkpoints: Vec<Step>,
    restores: Vec<RestoreCheck>,
    ok: bool,
    total_ms: u64,
}

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> CairnError + '_ {
    move |e| CairnError::Exec(cairn_executor_error(path, e))
}

fn cairn_executor_error(path: &Path, e: rusqlite::Error) -> cairn_orchestrator::ExecError {
    cairn_orchestrator::ExecError::Sqlite {
        path: path.display().to_string(),
        source: e,
    }
}

const WORDS: &[&str] = &[
    "alpha", "basalt", "cairn", "delta", "ember", "fjord", "granite", "heath", "islet", "juniper",
    "kestrel", "lichen", "moraine", "nunatak", "obsidian", "peat", "quartz", "ridge", "scree",
    "tarn",
];

fn sentence(rng: &mut impl Rng, words: usize) -> String {
    (0..words)
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn create_workload(path: &Path, rows: u64, rng: &mut impl Rng) -> Result<(), CairnError> {
    let e = sql(path);
    let mut c = Connection::open(path).map_err(&e)?;
    c.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL UNIQUE,
                                 region TEXT NOT NULL, created_at INTEGER NOT NULL);
         CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                              amount_cents INTEGER NOT NULL, status TEXT NOT NULL, note TEXT,
                              created_at INTEGER NOT NULL);
         CREATE INDEX orders_by_customer ON orders(customer_id);
         CREATE INDEX orders_by_status ON orders(status, created_at);",
    )
    .map_err(&e)?;
    let customers = (rows / 6).max(10);
    let tx = c.transaction().map_err(&e)?;
    {
        let mut ins = tx
            .prepare("INSERT INTO customers (id, name, email, region, created_at) VALUES (?1, ?2, ?3, ?4, ?5)")
            .map_err(&e)?;
        for id in 1..=customers {
            let name = sentence(rng, 2);
            ins.execute(rusqlite::params![
                id as i64,
                name,
                format!("user{id}@example.org"),
                WORDS[rng.gen_range(0..5)],
                1_700_000_000i64 + id as i64
            ])
            .map_err(&e)?;
        }
        let mut ins = tx
            .prepare("INSERT INTO orders (customer_id, amount_cents, status, note, created_at) VALUES (?1, ?2, ?3, ?4, ?5)")
            .map_err(&e)?;
        for i in 0..rows {
            let words = rng.gen_range(3..20);
            let note = sentence(rng, words);
            ins.execute(rusqlite::params![
                rng.gen_range(1..=customers) as i64,
                rng.gen_range(100..500_000i64),
                ["new", "paid", "shipped"][rng.gen_range(0..3)],
                note,
                1_700_000_000i64 + i as i64
            ])
            .map_err(&e)?;
        }
    }
    tx.commit().map_err(&e)?;
    Ok(())
}

fn change_workload(path: &Path, rows: u64, rng: &mut impl Rng) -> Result<(), CairnError> {
    let e = sql(path);
    let mut c = Connection::open(path).map_err(&e)?;
    let tx = c.transaction().map_err(&e)?;
    {
        let mut upd = tx
            .prepare("UPDATE orders SET status = 'refunded', amount_cents = amount_cents / 2 WHERE id = ?1")
            .map_err(&e)?;
        for _ in 0..rows / 500 {
            upd.execute([rng.gen_range(1..=rows) as i64]).map_err(&e)?;
        }
        let mut del = tx.prepare("DELETE FROM orders WHERE id = ?1").map_err(&e)?;
        for _ in 0..rows / 1000 {
            del.execute([rng.gen_range(1..=rows) as i64]).map_err(&e)?;
        }
        let mut ins = tx
            .prepare("INSERT INTO orders (customer_id, amount_cents, status, note, created_at) VALUES (?1, ?2, 'new', ?3, ?4)")
            .map_err(&e)?;
        for i in 0..rows / 100 {
            let note = sentence(rng, 8);
            ins.execute(rusqlite::params![
                1i64,
                rng.gen_range(100..900i64),
                note,
                1_800_000_000i64 + i as i64
            ])
            .map_err(&e)?;
        }
    }
    tx.commit().map_err(&e)?;
    Ok(())
}

/// A digest of every row of every table, in primary-key order.
fn content_digest(path: &Path) -> Result<u128, CairnError> {
    let e = sql(path);
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(&e)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for q in [
        "SELECT id, name, email, region, created_at FROM customers ORDER BY id",
        "SELECT id, customer_id, amount_cents, status, note, created_at FROM orders ORDER BY id",
    ] {
        let mut stmt = c.prepare(q).map_err(&e)?;
        let n = stmt.column_count();
        let mut rows = stmt.query([]).map_err(&e)?;
        while let Some(row) = rows.next().map_err(&e)? {
            for i in 0..n {
                let v: rusqlite::types::Value = row.get(i).map_err(&e)?;
                h.update(format!("{v:?}\u{1f}").as_bytes());
            }
            h.update(b"\x1e");
        }
    }
    Ok(h.digest128())
}

/// Runs the demo; returns whether every check passed.
pub async fn run(dir: Option<PathBuf>, rows: u64, json: bool) -> Result<bool, CairnError> {
    let started = Instant::now();
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!(
            "cairn-demo-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        )),
    };
    if dir.exists() {
        return Err(CairnError::Config {
            what: format!("demo directory {}", dir.display()),
            reason: "already exists; pick a new one".into(),
        });
    }
    std::fs::create_dir_all(&dir).map_err(|e| CairnError::Config {
        what: format!("demo directory {}", dir.display()),
        reason: e.to_string(),
    })?;
    let say = |s: String| {
        if !json {
            println!("{s}");
        }
    };
    say(format!("cairn demo in {}", dir.display()));
    let db_path = dir.join("app.db");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xca1e);
    create_workload(&db_path, rows, &mut rng)?;
    say(format!(
        "  created SQLite database app.db ({} rows of orders, indexed)",
        rows
    ));

    let state = dir.join("state");
    let mut cfg = Config::new(&state)?;
    cfg.chunk_size = 1024 * 1024;
    let store_url = default_store_url(&state)?;
    let cp = Checkpointer::open(cfg.clone())?;
    let db = DbId::new("app")?;
    let mut steps = Vec::new();
    let mut digests = Vec::new();
    for (label, change) in [
        ("initial", false),
        ("after updates, deletes and inserts", true),
    ] {
        if change {
            change_workload(&db_path, rows, &mut rng)?;
        }
        let r = cp.checkpoint(&db, &Source::Sqlite(db_path.clone())).await?;
        digests.push((Generation(r.generation), content_digest(&db_path)?));
        say(format!(
            "  checkpoint {} ({label}): {} source, {} dirty, {} uploaded in {} blob(s) \
             ({} chunk(s) as deltas, {} rewritten, {} unchanged), {} ms",
            r.generation,
            bytes(r.source_bytes),
            bytes(r.bytes_dirty),
            bytes(r.bytes_uploaded),
            r.blobs_uploaded,
            r.chunks_delta,
            r.chunks_full,
            r.chunks_unchanged,
            r.duration_ms
        ));
        steps.push(Step {
            step: label.to_string(),
            generation: r.generation,
            source_bytes: r.source_bytes,
            bytes_uploaded: r.bytes_uploaded,
            blobs_uploaded: r.blobs_uploaded,
            blobs_reused: r.blobs_reused,
            chunks_delta: r.chunks_delta,
            chunks_full: r.chunks_full,
            chunks_unchanged: r.chunks_unchanged,
            bytes_dirty: r.bytes_dirty,
            duration_ms: r.duration_ms,
        });
    }
    drop(cp);

    // A machine with nothing but the store: a fresh, empty state directory.
    let mut fresh = Config::new(dir.join("fresh-state"))?;
    fresh.store_url = Some(store_url.clone());
    let cp = Checkpointer::open(fresh)?;
    let mut restores = Vec::new();
    let mut ok = true;
    for (g, digest) in &digests {
        let to = dir.join(format!("restored-gen{g}.db"));
        let r = cp.restore(&db, Some(*g), &to).await?;
        let findings = cairn_executor_integrity(&to)?;
        let integrity = if findings.is_empty() {
            "ok".to_string()
        } else {
            findings.join("; ")
        };
        let matches = content_digest(&to)? == *digest;
        ok &= findings.is_empty() && matches;
        say(format!(
            "  restore {g} from a fresh state directory: {} in {} ms, integrity_check {integrity}, contents {}",
            bytes(r.bytes_written),
            r.duration_ms,
            if matches { "identical" } else { "DIFFERENT" }
        ));
        restores.push(RestoreCheck {
            generation: g.0,
            bytes_written: r.bytes_written,
            duration_ms: r.duration_ms,
            integrity_check: integrity,
            contents_match: matches,
        });
    }
    let report = DemoReport {
        dir: dir.display().to_string(),
        store: store_url,
        checkpoints: steps,
        restores,
        ok,
        total_ms: started.elapsed().as_millis() as u64,
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot render JSON: {e}"),
        }
    } else {
        println!(
            "demo {} in {} ms (store: {})",
            if ok { "passed" } else { "FAILED" },
            report.total_ms,
            report.store
        );
    }
    Ok(ok)
}

fn cairn_executor_integrity(path: &Path) -> Result<Vec<String>, CairnError> {
    Ok(cairn_orchestrator::sqlite_integrity_check(path)?)
}
