//! SQLite checkpoints read in place: the changed pages of an incremental come from the WAL
//! frames since the previous generation's position, a WAL reset behind Cairn's back falls
//! back to comparing page digests, and every generation restores to the source as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use cairn_core::{DbId, Generation};
use cairn_orchestrator::{CheckpointReport, Checkpointer, Config, Env, Source};
use cairn_remote_store::RemoteStore;
use rusqlite::Connection;

fn open(state: &Path, store: &str) -> Checkpointer {
    let mut cfg = Config::new(state).unwrap();
    cfg.chunk_size = 1 << 20;
    cfg.store_url = Some(store.to_string());
    Checkpointer::open_with(
        cfg,
        RemoteStore::open(store).unwrap(),
        Env::fixed(1_700_000_000_000, 7),
    )
    .unwrap()
}

type Rows = Vec<(i64, String, f64, String)>;

fn rows(path: &Path) -> Rows {
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut s = c
        .prepare("SELECT id, customer, total, note FROM orders ORDER BY id")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The application: WAL mode, its own checkpoints off, the connection kept open.
fn app(path: &Path, n: i64) -> Connection {
    let c = Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE orders(id INTEGER PRIMARY KEY, customer TEXT, total REAL, note TEXT);
         CREATE INDEX orders_customer ON orders(customer);
         CREATE INDEX orders_total ON orders(total);",
    )
    .unwrap();
    c.execute(
        "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < ?1)
         INSERT INTO orders SELECT i, printf('customer-%06d', (i * 7919) % 5000),
             (i % 1000) / 7.0, printf('order %d: %s', i, hex(randomblob(60))) FROM s",
        [n],
    )
    .unwrap();
    c
}

/// Updates `n` orders from `from` on (their notes, which no index covers).
fn update(c: &Connection, from: i64, n: i64, tag: &str) {
    c.execute(
        "UPDATE orders SET note = note || ?3 WHERE id >= ?1 AND id < ?1 + ?2",
        rusqlite::params![from, n, tag],
    )
    .unwrap();
}

async fn restores_to(cp: &Checkpointer, db: &DbId, g: u64, out: &Path, want: &Rows) {
    cp.restore(db, Some(Generation(g)), out).await.unwrap();
    assert!(cairn_orchestrator::sqlite_integrity_check(out)
        .unwrap()
        .is_empty());
    assert_eq!(&rows(out), want, "generation {g}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incrementals_take_changed_pages_from_the_wal_and_survive_a_reset_behind_their_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("store").display());
    let cp = open(&dir.path().join("state"), &store);
    let src = dir.path().join("app.db");
    let c = app(&src, 40_000);
    let db = DbId::new("app").unwrap();
    let run = |g: u64| {
        let (cp, db, src) = (&cp, &db, &src);
        async move {
            let r: CheckpointReport = cp
                .checkpoint(db, &Source::Sqlite(src.clone()))
                .await
                .unwrap();
            assert_eq!(r.generation, g);
            r
        }
    };
    let first = run(1).await;
    assert_eq!(first.full_scan_reason, Some("no_position"));
    assert!(
        first.wal_frames.unwrap() > 0,
        "the data is still in the WAL"
    );
    let want1 = rows(&src);

    // 1% of the rows change: the WAL names the pages, nothing else is compared.
    update(&c, 10_000, 400, "-a");
    let second = run(2).await;
    assert_eq!(second.full_scan_reason, None, "{second:?}");
    assert!(second.dirty_used);
    let pages = second.source_bytes / 4096;
    assert!(
        second.pages_dirty > 0 && second.pages_dirty * 20 < pages,
        "{second:?}"
    );
    assert!(
        second.bytes_uploaded * 10 < second.source_bytes,
        "{second:?}"
    );
    let want2 = rows(&src);

    // The application resets the WAL itself, then writes more.
    update(&c, 20_000, 400, "-b");
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    update(&c, 30_000, 400, "-c");
    let third = run(3).await;
    assert_eq!(third.full_scan_reason, Some("wal_reset"), "{third:?}");
    assert!(!third.dirty_used);
    assert!(third.pages_dirty > 0);
    let want3 = rows(&src);

    // The position is known again after the fallback.
    update(&c, 1, 400, "-d");
    let fourth = run(4).await;
    assert_eq!(fourth.full_scan_reason, None, "{fourth:?}");
    let want4 = rows(&src);

    // A rolled-back transaction that spilled into the WAL is not a commit.
    c.execute_batch("PRAGMA cache_size = 5; BEGIN").unwrap();
    update(&c, 1, 40_000, "-rolled-back");
    c.execute_batch("ROLLBACK").unwrap();
    let fifth = run(5).await;
    assert_eq!(fifth.full_scan_reason, None, "{fifth:?}");
    assert_eq!(fifth.pages_dirty, 0, "{fifth:?}");

    // A fresh state directory restores every generation from the store alone.
    let fresh = open(&dir.path().join("fresh"), &store);
    for (g, want) in [
        (1, &want1),
        (2, &want2),
        (3, &want3),
        (4, &want4),
        (5, &want4),
    ] {
        restores_to(&fresh, &db, g, &dir.path().join(format!("r{g}.db")), want).await;
    }
    drop(c);
}
