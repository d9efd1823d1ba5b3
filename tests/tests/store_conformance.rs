//! The store contract, checked against every stack Cairn runs on: an in-memory store, a
//! local directory, a real S3 server (moto on 127.0.0.1, started by the test) and, where a
//! Docker engine with a MinIO image exists, MinIO through `testcontainers`; each of them
//! plain and behind the fault layer, with transient errors, latency, lost write responses
//! and cut-off and corrupted bodies at rates the retry and verify layers must absorb.
//!
//! The contract, one scenario function each:
//! * objects: put, get, overwrite, head, list (sorted, sizes, the store's timestamps),
//!   delete; a missing object is a definite, unretried `NotFound`, never a guess;
//! * conditional create: the first wins, a second is refused and changes nothing, exactly
//!   one of eight racers wins (three rounds), a create whose response is lost is settled as ours by
//!   reading back, and the store passes the conditional-create start-up check;
//! * blobs: verified reads of single-PUT and multipart blobs (staged files and regions of
//!   an immutable source), verified range reads at the edges and across part boundaries,
//!   bad ranges refused, a source that changed since it was hashed refused;
//! * damage at rest: every re-read fails, the error names the key and is classed corrupt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cairn_core::blob::encode_blob;
use cairn_core::{BlobKind, BlobRef, ErrorClass};
use cairn_remote_store::fault::{FaultConfig, FaultStore};
use cairn_remote_store::{Cause, CreateOutcome, RemoteStore, StoreConfig, StoreError};
use cairn_tests::s3::{s3_config, S3Server};
use rand::{RngCore, SeedableRng};

/// 5 MiB parts (the S3 minimum), so an 11 MiB blob takes three; quick retries.
fn cfg(verify_read_attempts: u32) -> StoreConfig {
    StoreConfig {
        multipart_threshold: 5 << 20,
        part_size: 5 << 20,
        part_concurrency: 2,
        retry_max_attempts: 30,
        retry_initial_backoff_ms: 1,
        retry_max_backoff_ms: 20,
        verify_read_attempts,
        ..Default::default()
    }
}

/// The faults every faulty stack runs under. Body faults hit blob keys only: whole small
/// objects have no checksum of their own to catch a flipped byte with (their callers use
/// `get_bytes_verified`), and a cut-off small object is caught by its length anyway.
fn faults(seed: u64) -> FaultConfig {
    FaultConfig {
        seed,
        transient_errors: 0.15,
        latency: 0.1,
        max_latency: Duration::from_millis(2),
        lost_write_responses: 0.15,
        truncated_bodies: 0.15,
        corrupted_bodies: 0.1,
        body_fault_keys: Some("blobs/".into()),
        ..Default::default()
    }
}

/// Faults for range reads: a range read cannot recompute the payload's checksum (its bytes
/// are the caller's to check), so corruption inside a range would go unnoticed by design;
/// cut-off ranges and transient errors must be absorbed.
fn range_faults(seed: u64) -> FaultConfig {
    FaultConfig {
        seed,
        transient_errors: 0.15,
        truncated_bodies: 0.2,
        ..Default::default()
    }
}

/// One stack under test.
struct Stack {
    name: String,
    /// The store whose contract is checked.
    store: RemoteStore,
    /// The same location without faults: to plant damaged objects and look behind the
    /// store's back.
    clean: RemoteStore,
    /// The same location for range reads (with range faults on faulty stacks).
    ranged: RemoteStore,
    /// The same location with every write response lost.
    lossy: RemoteStore,
    /// The fault layers of `store` and `ranged`, on faulty stacks.
    faults: Option<(Arc<FaultStore>, Arc<FaultStore>)>,
    /// moto's request log and the key prefix, to count the parts an upload used.
    log: Option<(PathBuf, String)>,
}

impl Stack {
    /// The stack at `url` (with `cfg_of` adding connection settings), plain or faulty.
    fn new(
        name: &str,
        url: &str,
        faulty: bool,
        seed: u64,
        cfg_of: impl Fn(StoreConfig) -> StoreConfig,
    ) -> Self {
        // Enough passes that injected corruption never fails a read by chance.
        let attempts = if faulty { 8 } else { 3 };
        let open =
            |c: FaultConfig| RemoteStore::open_faulty(url, cfg_of(cfg(attempts)), c).unwrap();
        let (store, ranged, faults) = if faulty {
            let (s, f) = open(self::faults(seed));
            let (r, rf) = open(range_faults(seed + 1));
            (s, r, Some((f, rf)))
        } else {
            let s = RemoteStore::open_with(url, cfg_of(cfg(attempts))).unwrap();
            (s.clone(), s, None)
        };
        let lossy = open(FaultConfig {
            lost_write_responses: 1.0,
            ..Default::default()
        })
        .0;
        Self {
            name: format!("{name}{}", if faulty { " behind faults" } else { "" }),
            store,
            clean: RemoteStore::open_with(url, cfg_of(cfg(attempts))).unwrap(),
            ranged,
            lossy,
            faults,
            log: None,
        }
    }

    async fn run(&self) {
        eprintln!("stack {}: {}", self.name, self.store.describe());
        objects(self).await;
        conditional_create(self).await;
        blobs(self).await;
        damage_at_rest(self).await;
        if self.faults.is_some() {
            soak(self).await;
            self.faults_were_absorbed();
        }
    }

    /// On a faulty stack: every kind of fault was injected, absorbed, and classified as
    /// what it simulates.
    fn faults_were_absorbed(&self) {
        let Some((f, rf)) = &self.faults else { return };
        let (c, s) = (f.counts(), self.store.stats());
        eprintln!("{}: faults {c:?}\nstore {s:?}", self.name);
        assert!(
            c.transient_errors > 0
                && c.lost_responses > 0
                && c.truncated > 0
                && c.corrupted > 0
                && c.delayed > 0,
            "{}: {c:?}",
            self.name
        );
        assert!(s.retries > 0 && s.resumed_reads > 0, "{}: {s:?}", self.name);
        // Injected faults are typed with the cause they simulate, and the statistics layer,
        // which sits above the fault layer, sees every one of them.
        assert_eq!(
            s.errors.throttled, c.transient_errors,
            "{}: {s:?}",
            self.name
        );
        assert!(
            s.errors.interrupted >= c.lost_responses,
            "{}: {s:?}",
            self.name
        );
        assert!(s.errors.cut_off >= c.truncated, "{}: {s:?}", self.name);
        // Cut-off ranges were caught by their length and read again.
        let (rc, r) = (rf.counts(), self.ranged.stats());
        assert!(
            rc.truncated > 0 && r.damaged_reads > 0,
            "{}: {rc:?} {r:?}",
            self.name
        );
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn stage(dir: &Path, payload: &[u8]) -> (PathBuf, BlobRef, Vec<u8>) {
    let (obj, r) = encode_blob(BlobKind::Segment, payload);
    let f = dir.join(format!("{:016x}.blob", r.crc64));
    std::fs::write(&f, &obj).unwrap();
    (f, r, obj)
}

async fn read_blob(store: &RemoteStore, key: &str, r: &BlobRef) -> Result<Vec<u8>, StoreError> {
    let mut back = vec![0u8; r.len as usize];
    store
        .get_blob(key, r, |off, p| {
            back[off as usize..off as usize + p.len()].copy_from_slice(p);
            Ok(())
        })
        .await?;
    Ok(back)
}

/// A missing object: `NotFound`, permanent, naming the key, and not retried (on a plain
/// stack no retry at all is made; on a faulty one the transient errors around it are).
fn assert_absent(e: &StoreError, key: &str, ctx: &str) {
    assert!(matches!(e, StoreError::NotFound { .. }), "{ctx}: {e}");
    assert_eq!(e.class(), ErrorClass::Permanent, "{ctx}: {e}");
    assert_eq!(e.cause(), Some(Cause::NotFound), "{ctx}: {e}");
    assert!(
        !e.is_retryable() && e.to_string().contains(key),
        "{ctx}: {e}"
    );
}

async fn objects(s: &Stack) {
    let (store, n) = (&s.store, s.name.as_str());
    let since = now_ms() - 60_000;
    store
        .put_bytes("objects/a", Bytes::from_static(b"alpha"))
        .await
        .unwrap();
    store
        .put_bytes("objects/b/c", Bytes::from(random(1000, 1)))
        .await
        .unwrap();
    store
        .put_bytes("unlisted/x", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(store.get_bytes("objects/a").await.unwrap(), "alpha", "{n}");
    assert_eq!(store.head("objects/b/c").await.unwrap(), Some(1000), "{n}");
    store
        .put_bytes("objects/a", Bytes::from_static(b"alpha, again"))
        .await
        .unwrap();
    assert_eq!(
        store.get_bytes("objects/a").await.unwrap(),
        "alpha, again",
        "{n}: an overwrite replaces the object"
    );

    for prefix in ["objects", "objects/"] {
        let listed = store.list(prefix).await.unwrap();
        let keys: Vec<(&str, u64)> = listed.iter().map(|l| (l.key.as_str(), l.size)).collect();
        assert_eq!(keys, [("objects/a", 12), ("objects/b/c", 1000)], "{n}");
        for l in &listed {
            assert!(
                (since..now_ms() + 60_000).contains(&l.last_modified_unix_ms),
                "{n}: {l:?} carries the store's timestamp"
            );
        }
    }
    assert!(store.list("nothing-here").await.unwrap().is_empty(), "{n}");

    let retries = store.stats().retries;
    store.delete("objects/a").await.unwrap();
    assert_eq!(store.head("objects/a").await.unwrap(), None, "{n}");
    let e = store.get_bytes("objects/a").await.unwrap_err();
    assert_absent(&e, "objects/a", n);
    let (_, r) = encode_blob(BlobKind::Base, b"never stored");
    let e = read_blob(store, "blobs/never-stored", &r)
        .await
        .unwrap_err();
    assert_absent(&e, "blobs/never-stored", n);
    // Deleting what is not there is not an error.
    store.delete("objects/a").await.unwrap();
    if s.faults.is_none() {
        assert_eq!(
            store.stats().retries,
            retries,
            "{n}: absence is never retried"
        );
    }
    assert_eq!(
        s.clean.list("objects").await.unwrap().len(),
        1,
        "{n}: the delete reached the store"
    );
}

async fn conditional_create(s: &Stack) {
    let (store, n) = (&s.store, s.name.as_str());
    let key = "manifests/00000000000000000001.cmf";
    let first = Bytes::from_static(b"generation 1 by writer A");
    assert_eq!(
        store.create_if_absent(key, first.clone()).await.unwrap(),
        CreateOutcome::Created,
        "{n}"
    );
    assert_eq!(
        store
            .create_if_absent(key, Bytes::from_static(b"generation 1 by writer B"))
            .await
            .unwrap(),
        CreateOutcome::AlreadyExists,
        "{n}"
    );
    assert_eq!(
        s.clean.get_bytes(key).await.unwrap(),
        first,
        "{n}: refused create wrote"
    );

    // Racers on one key: exactly one wins, and the object is the winner's.
    for round in 2..5u64 {
        let key = format!("manifests/{round:020}.cmf");
        let racers: Vec<_> = (0..8u8)
            .map(|i| {
                let (st, key) = (store.clone(), key.clone());
                tokio::spawn(async move {
                    let mine = Bytes::from(vec![i; 64 + usize::from(i)]);
                    (st.create_if_absent(&key, mine.clone()).await.unwrap(), mine)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for r in racers {
            let (outcome, mine) = r.await.unwrap();
            if outcome == CreateOutcome::Created {
                winners.push(mine);
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "{n}: round {round}: exactly one create must win"
        );
        assert_eq!(s.clean.get_bytes(&key).await.unwrap(), winners[0], "{n}");
    }

    // Every response lost: the create landed, and reading back says it is ours; someone
    // else's object under a key is told apart the same way.
    let key = "manifests/00000000000000000005.cmf";
    let ours = Bytes::from_static(b"generation 3");
    assert_eq!(
        s.lossy.create_if_absent(key, ours.clone()).await.unwrap(),
        CreateOutcome::Created,
        "{n}"
    );
    assert_eq!(s.clean.get_bytes(key).await.unwrap(), ours, "{n}");
    assert_eq!(
        s.lossy
            .create_if_absent(key, Bytes::from_static(b"generation 3, other writer"))
            .await
            .unwrap(),
        CreateOutcome::AlreadyExists,
        "{n}"
    );
    assert!(s.lossy.stats().resolved_by_read_back >= 1, "{n}");

    store.check_conditional_create().await.unwrap();
    assert!(
        s.clean.list("_cairn").await.unwrap().is_empty(),
        "{n}: the probe is removed"
    );
}

async fn blobs(s: &Stack) {
    let (store, n) = (&s.store, s.name.as_str());
    let dir = tempfile::tempdir().unwrap();

    // A single PUT and a multipart upload of three 5 MiB parts, from staged files.
    for (key, len) in [("blobs/small", 100_000), ("blobs/big", (11 << 20) + 1234)] {
        let payload = random(len, len as u64);
        let (file, r, obj) = stage(dir.path(), &payload);
        store.put_blob_file(key, &file, &r).await.unwrap();
        assert_eq!(
            store.head(key).await.unwrap(),
            Some(obj.len() as u64),
            "{n}"
        );
        assert!(
            read_blob(store, key, &r).await.unwrap() == payload,
            "{n}: {key}"
        );
    }
    if let Some((log, prefix)) = &s.log {
        let log = std::fs::read_to_string(log).unwrap();
        let parts = log
            .lines()
            .filter(|l| l.contains(&format!("/{prefix}/blobs/big?")) && l.contains("partNumber="))
            .count();
        assert!(
            parts >= 3,
            "{n}: expected at least 3 part uploads, moto saw {parts}"
        );
    }

    // Ranges at the start, across the first part boundary, at the very end, and one byte.
    let payload = random((11 << 20) + 1234, (11 << 20) + 1234);
    let (_, r) = encode_blob(BlobKind::Segment, &payload);
    let boundary = (5u64 << 20) - 32 - 100;
    let len = payload.len() as u64;
    for range in [
        0..4096,
        boundary..boundary + 300,
        len - 777..len,
        12_345..12_346,
    ] {
        let got = s
            .ranged
            .get_blob_range("blobs/big", &r, range.clone())
            .await
            .unwrap();
        assert!(
            got[..] == payload[range.start as usize..range.end as usize],
            "{n}: range {range:?}"
        );
    }
    let e = store
        .get_blob_range("blobs/big", &r, len - 1..len + 1)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::BadRange { .. }), "{n}: {e}");

    // Straight from a region of an immutable source: a single PUT and a multipart upload.
    let source = dir.path().join("segment");
    let data = random((7 << 20) + 99, 7);
    std::fs::write(&source, &data).unwrap();
    for (key, range) in [
        ("blobs/region-small", 100..5000usize),
        ("blobs/region-large", 1000..data.len()),
    ] {
        let (_, r) = encode_blob(BlobKind::Segment, &data[range.clone()]);
        store
            .put_blob_range(key, &source, range.start as u64, &r)
            .await
            .unwrap();
        assert!(
            read_blob(store, key, &r).await.unwrap() == data[range],
            "{n}: {key}"
        );
    }
    // The source changed since its digests were taken: refused, and nothing visible.
    let (_, r) = encode_blob(BlobKind::Segment, &data[1..(6 << 20)]);
    let e = store
        .put_blob_range("blobs/changed", &source, 0, &r)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Corrupt(_)), "{n}: {e}");
    assert_eq!(s.clean.head("blobs/changed").await.unwrap(), None, "{n}");
}

async fn damage_at_rest(s: &Stack) {
    let (store, n) = (&s.store, s.name.as_str());
    // One flipped payload byte and a footer that no longer carries the content address.
    let payload = random(300_000, 9);
    let (mut bad, r) = encode_blob(BlobKind::Base, &payload);
    let len = bad.len();
    bad[len / 2] ^= 0x10;
    bad[len - 16] ^= 1;
    s.clean
        .put_bytes("blobs/damaged", Bytes::from(bad))
        .await
        .unwrap();
    let before = store.stats().damaged_reads;
    let e = read_blob(store, "blobs/damaged", &r).await.unwrap_err();
    assert!(matches!(e, StoreError::Corrupt(_)), "{n}: {e}");
    assert_eq!(e.class(), ErrorClass::Corrupt, "{n}: {e}");
    assert!(e.to_string().contains("blobs/damaged"), "{n}: {e}");
    assert_eq!(
        store.stats().damaged_reads - before,
        u64::from(store.config().verify_read_attempts),
        "{n}: every pass was read and failed"
    );
    let e = s
        .ranged
        .get_blob_range("blobs/damaged", &r, 0..10)
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Corrupt(_)) && e.to_string().contains("blobs/damaged"),
        "{n}: {e}"
    );
}

/// On faulty stacks: enough traffic that every kind of fault occurs, all of it absorbed.
async fn soak(s: &Stack) {
    let (store, n) = (&s.store, s.name.as_str());
    for i in 0..20u8 {
        let key = format!("soak/{i}");
        let bytes = Bytes::from(vec![i; 100 + usize::from(i)]);
        store.put_bytes(&key, bytes.clone()).await.unwrap();
        assert_eq!(store.get_bytes(&key).await.unwrap(), bytes, "{n}: {key}");
    }
    let dir = tempfile::tempdir().unwrap();
    let payload = random(256 << 10, 21);
    let (file, r, _) = stage(dir.path(), &payload);
    store.put_blob_file("blobs/soak", &file, &r).await.unwrap();
    for i in 0..80 {
        assert!(
            read_blob(store, "blobs/soak", &r).await.unwrap() == payload,
            "{n}: read {i}"
        );
    }
    for i in 0..20u64 {
        let range = i * 1000..i * 1000 + 5000;
        let got = s
            .ranged
            .get_blob_range("blobs/soak", &r, range.clone())
            .await;
        assert!(
            got.unwrap()[..] == payload[range.start as usize..range.end as usize],
            "{n}: range {range:?}"
        );
    }
}

fn memory(faulty: bool) -> Stack {
    let url = format!(
        "memory://conformance-{}",
        if faulty { "faulty" } else { "plain" }
    );
    Stack::new("memory", &url, faulty, 11, |c| c)
}

fn local(dir: &Path, faulty: bool) -> Stack {
    let url = format!("file://{}", dir.join("store").display());
    Stack::new("local directory", &url, faulty, 12, |c| c)
}

fn moto(server: &S3Server, faulty: bool) -> Stack {
    let prefix = if faulty {
        "conformance-faulty"
    } else {
        "conformance"
    };
    let mut s = Stack::new("moto", &server.url(prefix), faulty, 13, |c| {
        server.store_config(c)
    });
    s.log = Some((server.log_path().to_owned(), prefix.to_owned()));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store() {
    memory(false).run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_behind_faults() {
    memory(true).run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_directory() {
    let dir = tempfile::tempdir().unwrap();
    local(dir.path(), false).run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_directory_behind_faults() {
    let dir = tempfile::tempdir().unwrap();
    local(dir.path(), true).run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_s3() {
    let server = S3Server::start().unwrap_or_else(|e| panic!("{e}"));
    moto(&server, false).run().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_s3_behind_faults() {
    let server = S3Server::start().unwrap_or_else(|e| panic!("{e}"));
    moto(&server, true).run().await;
}

/// MinIO through `testcontainers`, plain and behind faults: runs where a Docker engine and
/// a MinIO image (`$CAIRN_MINIO_IMAGE`, default `minio/minio:latest`) are present,
/// otherwise says why it is skipped and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minio_in_a_container() {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{GenericImage, ImageExt};

    let image = std::env::var("CAIRN_MINIO_IMAGE").unwrap_or_else(|_| "minio/minio:latest".into());
    if let Err(why) = docker_with_image(&image) {
        eprintln!("SKIPPED minio_in_a_container: {why}");
        return;
    }
    let (name, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
    let (user, password, bucket) = ("cairnadmin", "cairn-test-password", "cairn");
    // MinIO serves every top-level directory of its data drive as a bucket.
    let container = GenericImage::new(name, tag)
        .with_exposed_port(9000.tcp())
        .with_wait_for(WaitFor::message_on_stdout("API:"))
        .with_entrypoint("sh")
        .with_cmd([
            "-c".to_string(),
            format!("mkdir -p /data/{bucket} && exec minio server /data"),
        ])
        .with_env_var("MINIO_ROOT_USER", user)
        .with_env_var("MINIO_ROOT_PASSWORD", password)
        .start()
        .await
        .expect("start the MinIO container");
    let port = container.get_host_port_ipv4(9000.tcp()).await.unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    for faulty in [false, true] {
        let prefix = if faulty {
            "conformance-faulty"
        } else {
            "conformance"
        };
        Stack::new(
            "MinIO",
            &format!("s3://{bucket}/{prefix}"),
            faulty,
            14,
            |c| s3_config(&endpoint, user, password, c),
        )
        .run()
        .await;
    }
    drop(container);
}

/// Whether a Docker engine answers here and has `image` locally (the tests never pull).
fn docker_with_image(image: &str) -> Result<(), String> {
    let host = std::env::var("DOCKER_HOST").ok();
    if host.is_none() && !Path::new("/var/run/docker.sock").exists() {
        return Err(
            "no Docker engine: DOCKER_HOST is unset and /var/run/docker.sock does not exist".into(),
        );
    }
    let out = std::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .map_err(|e| format!("cannot run the docker CLI: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "Docker engine has no image {image} (docker pull {image} where a registry is reachable): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
