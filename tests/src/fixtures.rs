//! Source fixtures: random page files, segment directories and SQLite databases, and
//! comparisons of restored results.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, RngCore};

/// Writes `pages` random pages of `page_size` bytes, with some repeated and zero pages so
/// dedup paths are exercised.
pub fn write_page_file(
    path: &Path,
    pages: usize,
    page_size: usize,
    rng: &mut impl RngCore,
) -> std::io::Result<Vec<u8>> {
    let mut data = vec![0u8; pages * page_size];
    for p in 0..pages {
        let page = &mut data[p * page_size..(p + 1) * page_size];
        match p % 7 {
            3 => {}
            5 => page.fill(0xAB),
            _ => rng.fill_bytes(page),
        }
    }
    std::fs::write(path, &data)?;
    Ok(data)
}

/// Creates `dir` with `count` segment files of random sizes named `seg-00000000`, … starting
/// at `first`.
pub fn write_segments(
    dir: &Path,
    first: usize,
    count: usize,
    max_len: usize,
    rng: &mut impl RngCore,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for i in first..first + count {
        let len = rng.gen_range(1..=max_len);
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        std::fs::write(dir.join(format!("seg-{i:08}")), data)?;
    }
    Ok(())
}

/// Every file of a directory with its bytes.
pub fn read_dir_files(dir: &Path) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            std::fs::read(e.path())?,
        );
    }
    Ok(out)
}

/// Builds a SQLite database with two indexed tables, then updates and deletes rows.
pub fn build_sqlite(path: &Path, rows: i64, seed: u64) -> rusqlite::Result<()> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut c = rusqlite::Connection::open(path)?;
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, k TEXT NOT NULL UNIQUE, v BLOB, n INTEGER);
         CREATE INDEX IF NOT EXISTS items_n ON items(n);",
    )?;
    let tx = c.transaction()?;
    {
        let mut ins = tx.prepare("INSERT OR REPLACE INTO items (k, v, n) VALUES (?1, ?2, ?3)")?;
        for _ in 0..rows {
            let mut v = vec![0u8; rng.gen_range(10..400)];
            rng.fill_bytes(&mut v);
            ins.execute(rusqlite::params![
                format!("key-{}", rng.gen::<u32>()),
                v,
                rng.gen_range(0..1000i64)
            ])?;
        }
    }
    tx.commit()?;
    c.execute("UPDATE items SET n = n + 1 WHERE id % 3 = 0", [])?;
    c.execute("DELETE FROM items WHERE id % 5 = 0", [])?;
    Ok(())
}

/// One row of the fixture table: id, key, value, number.
pub type Row = (i64, String, Vec<u8>, i64);

/// All rows of the fixture table, in key order.
pub fn sqlite_rows(path: &Path) -> rusqlite::Result<Vec<Row>> {
    let c =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut s = c.prepare("SELECT id, k, v, n FROM items ORDER BY id")?;
    let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    rows.collect()
}

/// `PRAGMA integrity_check` result lines.
pub fn integrity(path: &Path) -> rusqlite::Result<Vec<String>> {
    let c =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut s = c.prepare("PRAGMA integrity_check")?;
    let rows = s.query_map([], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// The multi-threaded runtime (two workers) the property tests and benchmarks drive the
/// library with.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
