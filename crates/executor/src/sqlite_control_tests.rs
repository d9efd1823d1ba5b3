//! The shipping rule against real SQLite: a held snapshot keeps every later frame in the
//! WAL, a backfilled one allows exactly one restart, and anything a
//! shipper did not hold through is a lost position. The "application" is another
//! connection in this process, interleaved step by step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn app(path: &Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT);",
    )
    .unwrap();
    c
}

fn commit(c: &Connection, n: i64) {
    c.execute(
        "INSERT OR REPLACE INTO t VALUES (?1, printf('%0500d', ?1))",
        [n],
    )
    .unwrap();
}

fn app_checkpoint(c: &Connection, mode: &str) -> (i64, i64, i64) {
    c.busy_timeout(Duration::from_millis(20)).unwrap();
    c.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
    .unwrap()
}

fn snap(path: &Path) -> SqliteSnapshot {
    SqliteSnapshot::open(path, None).unwrap()
}

#[test]
fn a_held_snapshot_keeps_later_frames_and_blocks_the_applications_reset() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("a.db");
    let a = app(&db);
    commit(&a, 1);
    let held = snap(&db);
    let shipped = Shipped::at(&held, None);
    assert!(!shipped.backfilled);
    commit(&a, 2);
    commit(&a, 3);
    let ctl = SqliteControl::open(&db).unwrap();
    ctl.passive().unwrap();
    // The application's TRUNCATE cannot reset the WAL under our snapshot.
    let (busy, _, _) = app_checkpoint(&a, "TRUNCATE");
    assert_eq!(busy, 1);
    let next = snap(&db);
    let (first, last) = frames_to_ship(&shipped, &next).unwrap();
    assert_eq!(first, shipped.position.frame + 1);
    assert_eq!(last, next.frames());
    assert!(!next.read_frames(first, last).unwrap().is_empty());
}

#[test]
fn a_backfilled_snapshot_allows_one_restart_and_no_frame_is_lost() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("a.db");
    let a = app(&db);
    commit(&a, 1);
    let first = snap(&db);
    let ctl = SqliteControl::open(&db).unwrap();
    ctl.passive().unwrap();
    // Everything is in the main file: the next snapshot reads it alone (read mark 0).
    let held = snap(&db);
    assert!(held.backfilled());
    let shipped = Shipped::at(&held, Some(&Shipped::at(&first, None)));
    drop(first);
    // The application's next write restarts the WAL; nothing can copy its frames into
    // the main file while we hold our snapshot, so no second restart happens.
    commit(&a, 2);
    commit(&a, 3);
    assert_eq!(app_checkpoint(&a, "PASSIVE").2, 0);
    commit(&a, 4);
    let next = snap(&db);
    assert_ne!(next.wal_header().unwrap().salts, shipped.position.salts);
    assert_eq!(frames_to_ship(&shipped, &next), Ok((1, next.frames())));
}

#[test]
fn a_reset_nobody_held_through_is_a_lost_position() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("a.db");
    let a = app(&db);
    commit(&a, 1);
    let s = snap(&db);
    let shipped = Shipped::at(&s, None);
    drop(s);
    commit(&a, 2);
    app_checkpoint(&a, "TRUNCATE");
    commit(&a, 3);
    let stale = Shipped {
        backfilled: false,
        ..shipped
    };
    assert_eq!(
        frames_to_ship(&stale, &snap(&db)),
        Err(FullScanReason::WalReset)
    );
}

#[test]
fn truncate_wal_makes_the_frames_durable_first_then_resets_the_wal() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("a.db");
    let a = app(&db);
    commit(&a, 1);
    let held = std::sync::Arc::new(snap(&db));
    let shipped = Shipped::at(&held, None);
    for n in 2..50 {
        commit(&a, n);
    }
    let ctl = SqliteControl::open(&db).unwrap();
    assert!(ctl.wal_len() > 0);
    let mut spooled = 0;
    let t = ctl
        .truncate_wal::<ExecError>(held, &shipped, |s, (first, last)| {
            spooled = s.read_frames(first, last)?.len();
            Ok(())
        })
        .unwrap();
    assert!(spooled > 0);
    assert!(t.truncated);
    assert_eq!(ctl.wal_len(), 0);
    assert!(t.locked.backfilled);
    // The application goes on; what it writes next continues the stream.
    commit(&a, 50);
    let next = snap(&db);
    assert_eq!(frames_to_ship(&t.locked, &next), Ok((1, next.frames())));
}

#[test]
fn a_wal_deleted_while_nobody_held_it_is_a_lost_position() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("a.db");
    let a = app(&db);
    commit(&a, 1);
    let s = snap(&db);
    let shipped = Shipped {
        backfilled: false,
        ..Shipped::at(&s, None)
    };
    drop(s);
    commit(&a, 2);
    // The last connection closing copies every frame into the file and deletes the WAL.
    drop(a);
    let mut wal = db.as_os_str().to_os_string();
    wal.push("-wal");
    assert!(!std::path::Path::new(&wal).exists());
    assert_eq!(
        frames_to_ship(&shipped, &snap(&db)),
        Err(FullScanReason::WalReset)
    );
}
