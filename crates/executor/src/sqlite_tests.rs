use super::*;
use crate::source::read_range;

fn app(path: &Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT);
         CREATE INDEX IF NOT EXISTS tv ON t(v);",
    )
    .unwrap();
    c
}

fn fill(c: &Connection, from: i64, n: i64, tag: &str) {
    c.execute(
        "WITH RECURSIVE s(i) AS (SELECT ?1 UNION ALL SELECT i+1 FROM s WHERE i < ?1 + ?2 - 1)
         INSERT OR REPLACE INTO t SELECT i, printf('%s-%08d-%s', ?3, i, hex(randomblob(40))) FROM s",
        rusqlite::params![from, n, tag],
    )
    .unwrap();
}

fn bytes(s: &SqliteSnapshot) -> Vec<u8> {
    let mut out = Vec::new();
    read_range(s, s.path(), 0, s.len(), |p| {
        out.extend_from_slice(p);
        Ok(())
    })
    .unwrap();
    out
}

fn rows_of(path: &Path) -> Vec<(i64, String)> {
    let c = Connection::open(path).unwrap();
    let mut st = c.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Writes snapshot bytes as a database file and checks it against `want`.
fn check_restores(dir: &Path, name: &str, b: &[u8], want: &[(i64, String)]) {
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    assert!(crate::sqlite_integrity_check(&p).unwrap().is_empty());
    assert_eq!(rows_of(&p), want);
}

#[test]
fn the_snapshot_is_the_committed_state_and_stays_so_while_the_app_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let c = app(&db);
    fill(&c, 0, 3000, "a");
    c.execute_batch("PRAGMA wal_checkpoint(PASSIVE)").unwrap();
    fill(&c, 2000, 2000, "b");
    let want = rows_of(&db);
    let s = SqliteSnapshot::open(&db, None).unwrap();
    assert_eq!(s.changed(), Err(FullScanReason::NoPosition));
    assert!(s.frames() > 0 && !s.overlay.is_empty());
    let before = bytes(&s);
    // The application goes on: more commits, a checkpoint it runs itself.
    fill(&c, 0, 500, "c");
    c.execute_batch("PRAGMA wal_checkpoint(PASSIVE)").unwrap();
    fill(&c, 9000, 100, "d");
    assert_eq!(
        bytes(&s),
        before,
        "the snapshot moved under its read transaction"
    );
    check_restores(dir.path(), "r.db", &before, &want);
}

#[test]
fn changed_pages_come_from_the_frames_after_the_position() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let c = app(&db);
    fill(&c, 0, 20_000, "a");
    let s1 = SqliteSnapshot::open(&db, None).unwrap();
    let (b1, p1) = (bytes(&s1), s1.position().unwrap());
    drop(s1);
    // 1% of the rows, side by side (a few table pages, their entries in the index).
    c.execute(
        "UPDATE t SET v = v || 'x' WHERE id BETWEEN 5000 AND 5199",
        [],
    )
    .unwrap();
    let s2 = SqliteSnapshot::open(&db, Some(p1)).unwrap();
    let b2 = bytes(&s2);
    let changed = s2.changed().unwrap().to_vec();
    let ps = s2.page_size() as usize;
    let differ: Vec<u64> = (0..b2.len() / ps)
        .filter(|i| b1.get(i * ps..(i + 1) * ps) != Some(&b2[i * ps..(i + 1) * ps]))
        .map(|i| i as u64)
        .collect();
    assert!(!differ.is_empty());
    for p in &differ {
        assert!(changed.binary_search(p).is_ok(), "page {p} changed unseen");
    }
    assert!(
        changed.len() * 10 < b2.len() / ps,
        "{} of {} pages",
        changed.len(),
        b2.len() / ps
    );
    check_restores(dir.path(), "r.db", &b2, &rows_of(&db));
    // The same position again: nothing changed.
    let p2 = s2.position().unwrap();
    drop(s2);
    let s3 = SqliteSnapshot::open(&db, Some(p2)).unwrap();
    assert_eq!(s3.changed(), Ok(&[][..]));
}

#[test]
fn a_truncate_checkpoint_behind_the_back_loses_the_position() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let c = app(&db);
    fill(&c, 0, 2000, "a");
    let p = SqliteSnapshot::open(&db, None).unwrap().position().unwrap();
    fill(&c, 100, 10, "b");
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    let s = SqliteSnapshot::open(&db, Some(p)).unwrap();
    assert_eq!(s.changed(), Err(FullScanReason::WalReset));
    check_restores(dir.path(), "r.db", &bytes(&s), &rows_of(&db));
    drop(s);
    // Writes after the reset start a WAL with new salts: still not the old position.
    fill(&c, 200, 10, "c");
    let s = SqliteSnapshot::open(&db, Some(p)).unwrap();
    assert_eq!(s.changed(), Err(FullScanReason::WalReset));
    check_restores(dir.path(), "r2.db", &bytes(&s), &rows_of(&db));
}

#[test]
fn frames_of_a_rolled_back_transaction_are_not_committed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let c = app(&db);
    fill(&c, 0, 1000, "a");
    let want = rows_of(&db);
    let frames_before = SqliteSnapshot::open(&db, None).unwrap().frames();
    // A transaction too large for its cache spills pages into the WAL, then rolls back:
    // its frames stay in the file, valid but never committed.
    c.execute_batch("PRAGMA cache_size = 5; BEGIN").unwrap();
    fill(&c, 5000, 20_000, "rolled-back");
    c.execute_batch("ROLLBACK").unwrap();
    let wal_len = std::fs::metadata(dir.path().join("a.db-wal"))
        .unwrap()
        .len();
    let s = SqliteSnapshot::open(&db, None).unwrap();
    assert!(
        wal_len > WAL_HEADER_LEN as u64 + u64::from(s.frames()) * (24 + 4096),
        "the transaction did not spill: the test shows nothing"
    );
    assert_eq!(s.frames(), frames_before);
    check_restores(dir.path(), "r.db", &bytes(&s), &want);
}

#[test]
fn a_database_not_in_wal_mode_is_read_from_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let c = Connection::open(&db).unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
        .unwrap();
    fill(&c, 0, 500, "a");
    let s = SqliteSnapshot::open(&db, None).unwrap();
    assert_eq!(s.changed(), Err(FullScanReason::NotWal));
    assert_eq!(bytes(&s), std::fs::read(&db).unwrap());
    let e = SqliteSnapshot::open(dir.path(), None).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![7u8; 8192]).unwrap();
    let e = SqliteSnapshot::open(&junk, None).unwrap_err();
    assert!(e.to_string().contains("junk"), "{e}");
}

/// Everything a snapshot knows of its WAL, to compare two ways of opening one.
type WalView = (Option<WalPosition>, u32, Vec<Option<(u32, u32)>>, bool);

fn wal_view(s: &SqliteSnapshot) -> WalView {
    let checksums = (1..=s.frames()).map(|n| s.frame_checksum(n)).collect();
    (s.position(), s.frames(), checksums, s.backfilled())
}

#[test]
fn a_snapshot_opened_after_another_parses_only_new_frames_and_sees_what_a_whole_parse_sees() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let c = app(&db);
    fill(&c, 0, 2000, "a");
    let first = SqliteSnapshot::open(&db, None).unwrap();
    // Backfilled up to the first snapshot, then more commits.
    c.execute_batch("PRAGMA wal_checkpoint(PASSIVE)").unwrap();
    fill(&c, 1000, 1500, "b");
    fill(&c, 3000, 100, "c");
    let want = rows_of(&db);
    let after = SqliteSnapshot::open_after(&db, &first).unwrap();
    let whole = SqliteSnapshot::open(&db, None).unwrap();
    assert!(after.frames() > first.frames());
    assert_eq!(wal_view(&after), wal_view(&whole));
    assert_eq!(bytes(&after), bytes(&whole));
    check_restores(dir.path(), "after.db", &bytes(&after), &want);
    let old_salts = first.position().unwrap().salts;
    drop((first, after, whole));

    // The WAL restarts (new salts) once everything is backfilled and no one reads it: an
    // earlier snapshot of the old WAL is no starting point, the new WAL is parsed whole.
    let earlier = SqliteSnapshot::open(&db, None).unwrap();
    let resume = earlier.resume();
    drop(earlier);
    c.execute_batch("PRAGMA wal_checkpoint(RESTART)").unwrap();
    fill(&c, 0, 10, "d");
    let whole = SqliteSnapshot::open(&db, None).unwrap();
    let after = SqliteSnapshot::open_locked(&db, None, None, resume).unwrap();
    assert_ne!(after.position().unwrap().salts, old_salts);
    assert_eq!(wal_view(&after), wal_view(&whole));
    assert_eq!(bytes(&after), bytes(&whole));
}
