//! Blob compression end to end: compressed checkpoints restore exactly, stores written
//! without compression stay readable (and mix with compressed blobs), incompressible data
//! is stored raw, and a damaged compressed blob is named by verify while restore fails
//! without leaving a target behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use cairn_core::{keys, BlobRef, DbId};
use cairn_orchestrator::{Checkpointer, Config, Env, Source};
use cairn_remote_store::RemoteStore;
use rand::{Rng, RngCore, SeedableRng};

fn open(state: &Path, store: &Path, level: Option<i32>) -> Checkpointer {
    let url = format!("file://{}", store.display());
    let mut cfg = Config::new(state).unwrap();
    cfg.chunk_size = 256 * 1024;
    cfg.store_url = Some(url.clone());
    cfg.compression_level = level;
    Checkpointer::open_with(
        cfg,
        RemoteStore::open(&url).unwrap(),
        Env::fixed(1_700_000_000_000, 11),
    )
    .unwrap()
}

fn pages(path: &Path) -> Source {
    Source::Pages {
        path: path.to_path_buf(),
        page_size: 4096,
    }
}

/// (format version, codec byte) of the stored blob `b`.
fn stored_format(store: &Path, cp: &Checkpointer, db: &DbId, b: &BlobRef) -> (u16, u8) {
    let key = keys::blob_key(&cp.config().tenant, db, b);
    let obj = std::fs::read(store.join(key)).unwrap();
    (u16::from_le_bytes([obj[8], obj[9]]), obj[11])
}

/// A SQLite database of order rows: text, numbers, dates and two indexes (realistic
/// rows, unlike the random blobs of `fixtures::build_sqlite`).
fn build_orders(path: &Path, rows: u32, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, email TEXT,
            status TEXT NOT NULL, total_cents INTEGER NOT NULL, created TEXT NOT NULL, note TEXT);
         CREATE INDEX orders_customer ON orders(customer);
         CREATE INDEX orders_created ON orders(created);",
    )
    .unwrap();
    let names = [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ];
    let statuses = ["new", "paid", "shipped", "delivered", "refunded"];
    let tx = c.transaction().unwrap();
    {
        let mut ins = tx
            .prepare("INSERT INTO orders VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
            .unwrap();
        for id in 0..rows {
            let who = format!("{} {}", names[rng.gen_range(0..8)], rng.gen_range(0..5000));
            ins.execute(rusqlite::params![
                id,
                who,
                format!("{}@example.com", who.replace(' ', ".")),
                statuses[rng.gen_range(0..5)],
                rng.gen_range(100..500_000i64),
                format!(
                    "2026-{:02}-{:02}T{:02}:{:02}:00Z",
                    rng.gen_range(1..13),
                    rng.gen_range(1..29),
                    rng.gen_range(0..24),
                    rng.gen_range(0..60)
                ),
                format!("deliver to door {}, ring twice", rng.gen_range(1..300)),
            ])
            .unwrap();
        }
    }
    tx.commit().unwrap();
}

fn store_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            store_bytes(&e.path())
        } else {
            m.len()
        };
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_checkpoints_restore_exactly_and_old_blobs_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let src = dir.path().join("orders.db");
    build_orders(&src, 40_000, 3);
    let data = std::fs::read(&src).unwrap();
    let db = DbId::new("orders").unwrap();

    // Written without compression: version 1 blobs, exactly as before.
    let plain = open(&dir.path().join("s1"), &store, None);
    let r1 = plain.checkpoint(&db, &pages(&src)).await.unwrap();
    let state = plain.state(&db, None).await.unwrap().state;
    for b in state.blobs() {
        assert_eq!(stored_format(&store, &plain, &db, &b).0, 1);
    }
    let plain_bytes = store_bytes(&store);
    drop(plain);

    // The same store, now with compression: unchanged chunks are reused (same names),
    // changed ones are written compressed, and the mix restores exactly.
    let cp = open(&dir.path().join("s2"), &store, Some(3));
    let mut changed = data.clone();
    for i in (100..changed.len()).step_by(300 * 1024) {
        changed[i] ^= 0x5a;
    }
    std::fs::write(&src, &changed).unwrap();
    let r2 = cp.checkpoint(&db, &pages(&src)).await.unwrap();
    assert!(r2.blobs_uploaded > 0, "{r2:?}");
    let state = cp.state(&db, None).await.unwrap().state;
    let formats: Vec<_> = state
        .blobs()
        .iter()
        .map(|b| stored_format(&store, &cp, &db, b))
        .collect();
    assert!(formats.contains(&(1, 0)), "{formats:?}");
    assert!(formats.contains(&(2, 1)), "{formats:?}");
    let out = dir.path().join("out.db");
    cp.restore(&db, None, &out).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == changed);
    let old = dir.path().join("old.db");
    cp.restore(&db, Some(cairn_core::Generation(r1.generation)), &old)
        .await
        .unwrap();
    assert!(std::fs::read(&old).unwrap() == data);
    let deep = cp.verify(&db, None, true).await.unwrap();
    assert!(deep.ok, "{deep:?}");

    // A fresh database of the same data, compressed from the start: what it costs.
    let db2 = DbId::new("orders-z").unwrap();
    let before = store_bytes(&store);
    let r = cp.checkpoint(&db2, &pages(&src)).await.unwrap();
    let compressed_bytes = store_bytes(&store) - before;
    eprintln!(
        "orders database of {} bytes: {} bytes stored uncompressed, {} compressed \
         (level 3), {:.2}x; {} bytes uploaded",
        data.len(),
        plain_bytes,
        compressed_bytes,
        plain_bytes as f64 / compressed_bytes as f64,
        r.bytes_uploaded
    );
    assert!(
        compressed_bytes * 2 < plain_bytes,
        "{compressed_bytes} vs {plain_bytes}"
    );
    let out2 = dir.path().join("out2.db");
    cp.restore(&db2, None, &out2).await.unwrap();
    assert!(std::fs::read(&out2).unwrap() == changed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompressible_pages_are_stored_raw() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cp = open(&dir.path().join("s"), &store, Some(3));
    let src = dir.path().join("random.bin");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut data = vec![0u8; 150 * 4096];
    rng.fill_bytes(&mut data);
    std::fs::write(&src, &data).unwrap();
    let db = DbId::new("random").unwrap();
    cp.checkpoint(&db, &pages(&src)).await.unwrap();
    let state = cp.state(&db, None).await.unwrap().state;
    for b in state.blobs() {
        assert_eq!(stored_format(&store, &cp, &db, &b), (2, 0), "{}", b.name());
        let key = keys::blob_key(&cp.config().tenant, &db, &b);
        let size = std::fs::metadata(store.join(key)).unwrap().len();
        assert_eq!(size, b.len + 72);
    }
    let out = dir.path().join("out");
    cp.restore(&db, None, &out).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_compressed_blob_is_named_by_verify_and_fails_restore() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cp = open(&dir.path().join("s"), &store, Some(3));
    let src = dir.path().join("orders.db");
    build_orders(&src, 5_000, 9);
    let db = DbId::new("damaged").unwrap();
    cp.checkpoint(&db, &pages(&src)).await.unwrap();
    let blobs = cp.state(&db, None).await.unwrap().state.blobs();
    let b = blobs
        .iter()
        .find(|b| stored_format(&store, &cp, &db, b) == (2, 1))
        .expect("a compressed blob");
    let key = keys::blob_key(&cp.config().tenant, &db, b);
    let path = store.join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    // One bit inside the compressed body; the object keeps its size.
    let at = 48 + (bytes.len() - 72) / 2;
    bytes[at] ^= 0x08;
    std::fs::write(&path, &bytes).unwrap();

    let shallow = cp.verify(&db, None, false).await.unwrap();
    assert!(
        shallow.ok,
        "a same-size flip is for deep verify: {shallow:?}"
    );
    let deep = cp.verify(&db, None, true).await.unwrap();
    assert_eq!(deep.errors.len(), 1, "{deep:?}");
    assert!(
        deep.errors[0].contains(&key) && deep.errors[0].contains("corrupt"),
        "{deep:?}"
    );
    let out = dir.path().join("out");
    let err = cp.restore(&db, None, &out).await.unwrap_err().to_string();
    assert!(err.contains(&key), "{err}");
    assert!(!out.exists(), "a failed restore leaves no target");

    // A blob cut short: its size still looks plausible to the shallow check, but deep
    // verify finds it no longer matches its header.
    bytes[at] ^= 0x08;
    bytes.truncate(bytes.len() - 5);
    std::fs::write(&path, &bytes).unwrap();
    let deep = cp.verify(&db, None, true).await.unwrap();
    assert!(
        deep.errors.len() == 1 && deep.errors[0].contains(&key),
        "{deep:?}"
    );
}
