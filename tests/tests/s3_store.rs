//! The remote store against real S3 servers on 127.0.0.1: moto (started by the test) and,
//! where a Docker engine with a MinIO image exists, MinIO through `testcontainers`.
//!
//! The store contract itself (multipart blobs of more than two parts, verified range
//! reads, racing conditional creates, the start-up check, corruption at rest) is checked
//! on both servers by `store_conformance.rs`. Here: a checkpoint/restore round trip through
//! the `Checkpointer` (a function of a [`Target`], so both servers run it), credentials
//! hygiene, and the store config file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use bytes::Bytes;
use cairn_core::{DbId, Generation};
use cairn_orchestrator::{Checkpointer, Config, Env, Source};
use cairn_remote_store::{RemoteStore, StoreConfig};
use cairn_tests::fixtures;
use cairn_tests::s3::{s3_config, S3Server};
use rand::{RngCore, SeedableRng};

/// An S3-compatible server and bucket to run the scenarios against.
struct Target {
    endpoint: String,
    bucket: String,
    access_key_id: String,
    secret_access_key: String,
}

impl Target {
    fn moto(server: &S3Server) -> Self {
        Self {
            endpoint: server.endpoint().to_owned(),
            bucket: server.bucket().to_owned(),
            access_key_id: "test".into(),
            secret_access_key: "test".into(),
        }
    }

    fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    fn config(&self, cfg: StoreConfig) -> StoreConfig {
        s3_config(
            &self.endpoint,
            &self.access_key_id,
            &self.secret_access_key,
            cfg,
        )
    }

    fn open(&self, prefix: &str, cfg: StoreConfig) -> RemoteStore {
        RemoteStore::open_with(&self.url(prefix), self.config(cfg)).unwrap()
    }
}

/// 5 MiB parts (the S3 minimum) so a 12 MiB blob needs three of them.
fn small_parts() -> StoreConfig {
    StoreConfig {
        multipart_threshold: 5 << 20,
        part_size: 5 << 20,
        part_concurrency: 2,
        ..Default::default()
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

async fn checkpoint_roundtrip(t: &Target) {
    let dir = tempfile::tempdir().unwrap();
    let store = t.open("cairn", small_parts());
    let mut cfg = Config::new(dir.path().join("state")).unwrap();
    cfg.chunk_size = 256 * 1024;
    cfg.store_url = Some(t.url("cairn"));
    let cp = Checkpointer::open_with(cfg, store.clone(), Env::system()).unwrap();

    // A random page file, checkpointed, changed and checkpointed again.
    let pages = dir.path().join("pages.bin");
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let v1 = fixtures::write_page_file(&pages, 300, 4096, &mut rng).unwrap();
    let db = DbId::new("pages").unwrap();
    let src = Source::Pages {
        path: pages.clone(),
        page_size: 4096,
    };
    assert_eq!(cp.checkpoint(&db, &src).await.unwrap().generation, 1);
    let mut v2 = v1.clone();
    v2[77 * 4096..78 * 4096].fill(0x42);
    v2.extend_from_slice(&random(8192, 4));
    std::fs::write(&pages, &v2).unwrap();
    assert_eq!(cp.checkpoint(&db, &src).await.unwrap().generation, 2);
    for (g, want) in [(1, &v1), (2, &v2)] {
        let out = dir.path().join(format!("restored-{g}"));
        cp.restore(&db, Some(Generation(g)), &out).await.unwrap();
        assert!(&std::fs::read(&out).unwrap() == want, "generation {g}");
    }
    let v = cp.verify(&db, None, true).await.unwrap();
    assert!(v.ok, "{v:?}");

    // Segments, one of them big enough for a multipart upload through the pipeline.
    let wal = dir.path().join("wal");
    std::fs::create_dir_all(&wal).unwrap();
    std::fs::write(wal.join("seg-00000000"), random(100_000, 5)).unwrap();
    std::fs::write(wal.join("seg-00000001"), random((11 << 20) + 3, 6)).unwrap();
    let wdb = DbId::new("wal").unwrap();
    cp.checkpoint(&wdb, &Source::Segments(wal.clone()))
        .await
        .unwrap();
    let out = dir.path().join("wal-restored");
    cp.restore(&wdb, None, &out).await.unwrap();
    assert_eq!(
        fixtures::read_dir_files(&out).unwrap(),
        fixtures::read_dir_files(&wal).unwrap()
    );

    // A fresh state directory restores from the bucket alone.
    let fresh = dir.path().join("fresh-state");
    let mut cfg2 = Config::new(&fresh).unwrap();
    cfg2.chunk_size = 256 * 1024;
    let cp2 = Checkpointer::open_with(cfg2, t.open("cairn", small_parts()), Env::system()).unwrap();
    let out = dir.path().join("fresh-restored");
    cp2.restore(&db, None, &out).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == v2);
}

fn moto() -> (S3Server, Target) {
    let server = S3Server::start().unwrap_or_else(|e| panic!("{e}"));
    let t = Target::moto(&server);
    (server, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_checkpoint_verify_and_restore() {
    let (_server, t) = moto();
    checkpoint_roundtrip(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_stay_out_of_errors_and_debug_output() {
    let (server, _t) = moto();
    let secret = "Sup3rSecretValue-DoNotPrint";
    let cfg = s3_config(
        server.endpoint(),
        "AKIDEXAMPLE99",
        secret,
        StoreConfig::default(),
    );
    let dbg = format!("{cfg:?}");
    assert!(
        !dbg.contains(secret) && !dbg.contains("AKIDEXAMPLE99"),
        "{dbg}"
    );
    // A bucket that does not exist: the error names the store, never the credentials.
    let store = RemoteStore::open_with("s3://no-such-bucket-cairn/p", cfg.clone()).unwrap();
    let e = store.get_bytes("k").await.unwrap_err();
    let shown = format!("{e} {e:?} {store:?}");
    assert!(shown.contains("no-such-bucket-cairn"), "{shown}");
    assert!(
        !shown.contains(secret) && !shown.contains("AKIDEXAMPLE99"),
        "{shown}"
    );
    // Credentials in the URL are refused without echoing them.
    let e = RemoteStore::open_with("s3://AKIDEXAMPLE99:Sup3rSecretValue@bucket/p", cfg)
        .unwrap_err()
        .to_string();
    assert!(!e.contains(secret) && !e.contains("AKIDEXAMPLE99"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_config_file_reaches_the_server() {
    let (server, _t) = moto();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.toml");
    std::fs::write(
        &path,
        format!(
            "part_size = 5242880\nmax_concurrent_requests = 4\n[s3]\nendpoint = \"{}\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n",
            server.endpoint()
        ),
    )
    .unwrap();
    let cfg = StoreConfig::from_file(&path).unwrap();
    assert_eq!(cfg.max_concurrent_requests, 4);
    let store = RemoteStore::open_with(&server.url("cfg"), cfg).unwrap();
    store
        .put_bytes("hello", Bytes::from_static(b"world"))
        .await
        .unwrap();
    assert_eq!(store.get_bytes("hello").await.unwrap(), "world");
}

/// MinIO through `testcontainers`: runs where a Docker engine and a MinIO image
/// (`$CAIRN_MINIO_IMAGE`, default `minio/minio:latest`) are present, otherwise says why it
/// is skipped and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minio_in_a_container_runs_the_same_scenarios() {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{GenericImage, ImageExt};

    let image = std::env::var("CAIRN_MINIO_IMAGE").unwrap_or_else(|_| "minio/minio:latest".into());
    if let Err(why) = docker_with_image(&image) {
        eprintln!("SKIPPED minio_in_a_container_runs_the_same_scenarios: {why}");
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
    let t = Target {
        endpoint: format!("http://127.0.0.1:{port}"),
        bucket: bucket.into(),
        access_key_id: user.into(),
        secret_access_key: password.into(),
    };
    checkpoint_roundtrip(&t).await;
    drop(container);
}

/// Whether a Docker engine answers here and has `image` locally (the tests never pull).
fn docker_with_image(image: &str) -> Result<(), String> {
    let host = std::env::var("DOCKER_HOST").ok();
    let socket = Path::new("/var/run/docker.sock");
    if host.is_none() && !socket.exists() {
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
