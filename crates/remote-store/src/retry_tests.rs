//! Tests of the retry engine and the retry layer.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::fault::{FaultConfig, FaultStore};
use crate::testutil::FlakyList;
use object_store::memory::InMemory;
use object_store::ObjectStoreExt;

fn fast(attempts: u32) -> StoreConfig {
    StoreConfig {
        retry_max_attempts: attempts,
        retry_initial_backoff_ms: 1,
        retry_max_backoff_ms: 2,
        ..Default::default()
    }
}

fn layered(fault: FaultConfig, attempts: u32) -> (Layer, Arc<FaultStore>, Arc<Stats>) {
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let f = Arc::new(FaultStore::new(mem, fault));
    let stats = Arc::new(Stats::default());
    let retry = Arc::new(Retry::new(
        &fast(attempts),
        "test".into(),
        Arc::clone(&stats),
    ));
    let layer = RetryStore::wrap(Layer::of(Arc::clone(&f), false), retry);
    (layer, f, stats)
}

/// An error of a chosen cause.
struct Failing(Cause);

impl std::fmt::Display for Failing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Classified for Failing {
    fn transient_cause(&self) -> Option<Cause> {
        Some(self.0)
    }
}

async fn attempts_until_given_up(retry: &Arc<Retry>, cause: Cause) -> u32 {
    let mut n = 0;
    let r: Result<(), _> = retry
        .run("get", "k", || {
            n += 1;
            async move { Err(Failing(cause)) }
        })
        .await;
    assert!(matches!(r, Err(Failure::Exhausted { .. })));
    n
}

#[tokio::test]
async fn an_endpoint_that_never_answered_gets_few_connect_attempts() {
    let retry = Arc::new(Retry::new(&fast(10), "test".into(), Arc::default()));
    assert_eq!(
        attempts_until_given_up(&retry, Cause::Connect).await,
        UNANSWERED_CONNECT_ATTEMPTS
    );
    // Other causes get the whole budget, and once the endpoint answered, so do
    // connection failures.
    assert_eq!(attempts_until_given_up(&retry, Cause::Timeout).await, 10);
    assert_eq!(attempts_until_given_up(&retry, Cause::Connect).await, 10);
}

#[tokio::test]
async fn transient_failures_are_retried_and_bounded() {
    let (layer, f, stats) = layered(FaultConfig::transient(0.5, 3), 50);
    let p = Path::from("k");
    for i in 0..20u8 {
        layer
            .store
            .put(&p, Bytes::from(vec![i]).into())
            .await
            .unwrap();
        layer.store.head(&p).await.unwrap();
    }
    assert!(f.counts().transient_errors > 0);
    assert_eq!(stats.snapshot().retries, f.counts().transient_errors);

    let (layer, f, _) = layered(FaultConfig::transient(1.0, 3), 4);
    let e = layer.store.head(&p).await.unwrap_err();
    let g = GaveUp::take(e).unwrap();
    assert_eq!(g.attempts, 4);
    assert_eq!(f.counts().transient_errors, 4);
}

#[tokio::test]
async fn conditional_writes_and_permanent_errors_are_not_repeated() {
    let fault = FaultConfig {
        lost_write_responses: 1.0,
        ..Default::default()
    };
    let (layer, f, stats) = layered(fault, 10);
    let create = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let p = Path::from("m");
    assert!(layer
        .store
        .put_opts(&p, Bytes::from_static(b"1").into(), create)
        .await
        .is_err());
    assert_eq!(f.counts().lost_responses, 1);
    assert!(matches!(
        layer.store.head(&Path::from("none")).await,
        Err(object_store::Error::NotFound { .. })
    ));
    assert_eq!(stats.snapshot().retries, 0);
}

#[tokio::test]
async fn a_failed_listing_restarts_without_repeating_entries() {
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    for i in 0..5 {
        let p = Path::from(format!("d/{i}"));
        mem.put(&p, Bytes::new().into()).await.unwrap();
    }
    let flaky = Arc::new(FlakyList::new(mem));
    let stats = Arc::new(Stats::default());
    let retry = Arc::new(Retry::new(&fast(5), "test".into(), Arc::clone(&stats)));
    let top = RetryStore::wrap(Layer::plain(flaky), retry);
    let listed: Vec<_> = top.store.list(Some(&Path::from("d"))).collect().await;
    let mut names: Vec<String> = listed
        .into_iter()
        .map(|m| m.unwrap().location.to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["d/0", "d/1", "d/2", "d/3", "d/4"]);
    assert_eq!(stats.snapshot().retries, 1);
}
