//! A store wrapper that interleaves the requests of several actors (each a
//! `Checkpointer`, as on separate machines) in an order a seeded generator picks.
//!
//! Every request of an actor waits at the gate. A scheduler releases one waiting request at
//! a time, chosen by the seed among those of the actors that are parked (with a request
//! waiting and none in flight), once every live actor is parked or done: so at every
//! request boundary the seed decides who moves. Blocking work an actor does between two
//! requests happens while it is not parked, so it does not change the decisions.
//! Requests of finished or never-started actors pass straight through once the scheduler
//! is stopped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;

#[derive(Default)]
struct Actor {
    waiting: Vec<(String, oneshot::Sender<()>)>,
    in_flight: usize,
    done: bool,
}

#[derive(Default)]
struct State {
    actors: BTreeMap<usize, Actor>,
    stopped: bool,
    log: Vec<String>,
}

/// The shared gate of the interleavings: requests pass straight through until it is
/// armed, and again once a schedule ends.
#[derive(Clone)]
pub struct Gate {
    state: Arc<Mutex<State>>,
    /// Wakes the scheduler when a request arrives or ends, or an actor finishes.
    changed: Arc<tokio::sync::Notify>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                stopped: true,
                ..State::default()
            })),
            changed: Arc::new(tokio::sync::Notify::new()),
        }
    }
}

impl Gate {
    /// Starts an interleaving: every registered actor is live, and their requests wait
    /// for [`Gate::schedule`].
    pub fn arm(&self) {
        let mut st = self.lock();
        st.stopped = false;
        st.log.clear();
        for a in st.actors.values_mut() {
            a.done = false;
            a.in_flight = 0;
            a.waiting.clear();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers an actor (before it starts).
    pub fn actor(&self, id: usize) {
        self.lock().actors.entry(id).or_default();
    }

    /// Marks an actor finished.
    pub fn done(&self, id: usize) {
        if let Some(a) = self.lock().actors.get_mut(&id) {
            a.done = true;
        }
        self.changed.notify_one();
    }

    /// The releases so far: one `actor op key` line each.
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    async fn enter(&self, id: usize, what: String) -> Pass {
        let rx = {
            let mut st = self.lock();
            if st.stopped {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                st.actors.entry(id).or_default().waiting.push((what, tx));
                Some(rx)
            }
        };
        self.changed.notify_one();
        if let Some(rx) = rx {
            // A dropped sender (the scheduler stopped) lets the request pass too.
            let _ = rx.await;
        }
        Pass {
            gate: self.clone(),
            id,
        }
    }

    /// Runs the schedule until every actor is done; each step waits for all live actors
    /// to park, then releases one request the seeded generator picks. Each actor gets a
    /// weight from the seed, so some interleavings let one actor run far ahead.
    pub async fn schedule(&self, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let weights: BTreeMap<usize, u32> = self
            .lock()
            .actors
            .keys()
            .map(|id| (*id, rng.gen_range(1..=8u32).pow(2)))
            .collect();
        let mut idle = 0u32;
        loop {
            let pick = {
                let mut st = self.lock();
                let live: Vec<usize> = st
                    .actors
                    .iter()
                    .filter(|(_, a)| !a.done)
                    .map(|(id, _)| *id)
                    .collect();
                if live.is_empty() {
                    st.stopped = true;
                    for a in st.actors.values_mut() {
                        a.waiting.clear();
                    }
                    return;
                }
                let parked: Vec<usize> = st
                    .actors
                    .iter()
                    .filter(|(_, a)| !a.waiting.is_empty() && a.in_flight == 0)
                    .map(|(id, _)| *id)
                    .collect();
                let all_parked = live.iter().all(|id| parked.contains(id));
                // An actor that stays busy (blocking work, a lock) for long does not stall
                // the others: after a while the parked ones move anyway.
                if parked.is_empty() || (!all_parked && idle < 100) {
                    None
                } else {
                    let weight = |id: &usize| weights.get(id).copied().unwrap_or(1);
                    let total: u32 = parked.iter().map(weight).sum();
                    let mut at = rng.gen_range(0..total.max(1));
                    let mut id = parked[0];
                    for p in &parked {
                        if at < weight(p) {
                            id = *p;
                            break;
                        }
                        at -= weight(p);
                    }
                    let a = st.actors.get_mut(&id);
                    a.map(|a| {
                        let i = rng.gen_range(0..a.waiting.len());
                        let (what, tx) = a.waiting.remove(i);
                        a.in_flight += 1;
                        (id, what, tx)
                    })
                }
            };
            match pick {
                Some((id, what, tx)) => {
                    idle = 0;
                    tokio::task::yield_now().await;
                    self.lock().log.push(format!("{id} {what}"));
                    let _ = tx.send(());
                }
                None => {
                    idle += 1;
                    let _ =
                        tokio::time::timeout(Duration::from_micros(500), self.changed.notified())
                            .await;
                }
            }
        }
    }
}

/// A request that passed the gate; finishing it (dropping this) frees its actor to park.
struct Pass {
    gate: Gate,
    id: usize,
}

impl Drop for Pass {
    fn drop(&mut self) {
        if let Some(a) = self.gate.lock().actors.get_mut(&self.id) {
            a.in_flight = a.in_flight.saturating_sub(1);
        }
        self.gate.changed.notify_one();
    }
}

/// One actor's view of the shared store, through the gate.
#[derive(Debug)]
pub struct GateStore {
    inner: Arc<dyn ObjectStore>,
    gate: Gate,
    id: usize,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gate")
    }
}

impl std::fmt::Display for GateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GateStore(actor {})", self.id)
    }
}

impl GateStore {
    /// Actor `id`'s view of `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, gate: &Gate, id: usize) -> Self {
        gate.actor(id);
        Self {
            inner,
            gate: gate.clone(),
            id,
        }
    }
}

#[async_trait]
impl ObjectStore for GateStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let _p = self.gate.enter(self.id, format!("PUT {location}")).await;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let _p = self.gate.enter(self.id, format!("MPU {location}")).await;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let op = if options.head { "HEAD" } else { "GET" };
        let _p = self.gate.enter(self.id, format!("{op} {location}")).await;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        let _p = self.gate.enter(self.id, format!("RANGES {location}")).await;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let inner = Arc::clone(&self.inner);
        let (gate, id) = (self.gate.clone(), self.id);
        locations
            .then(move |p| {
                let inner = Arc::clone(&inner);
                let gate = gate.clone();
                async move {
                    let p = p?;
                    let _pass = gate.enter(id, format!("DELETE {p}")).await;
                    inner.delete(&p).await.map(|()| p)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let (gate, id) = (self.gate.clone(), self.id);
        let inner = Arc::clone(&self.inner);
        let prefix = prefix.cloned();
        futures::stream::once(async move {
            let shown = prefix.as_ref().map(|p| p.to_string()).unwrap_or_default();
            let _pass = gate.enter(id, format!("LIST {shown}")).await;
            let all: Vec<_> = inner.list(prefix.as_ref()).collect().await;
            futures::stream::iter(all)
        })
        .flatten()
        .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let (gate, id) = (self.gate.clone(), self.id);
        let inner = Arc::clone(&self.inner);
        let (prefix, offset) = (prefix.cloned(), offset.clone());
        futures::stream::once(async move {
            let shown = prefix.as_ref().map(|p| p.to_string()).unwrap_or_default();
            let _pass = gate.enter(id, format!("LIST {shown} after {offset}")).await;
            let all: Vec<_> = inner
                .list_with_offset(prefix.as_ref(), &offset)
                .collect()
                .await;
            futures::stream::iter(all)
        })
        .flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let shown = prefix.map(|p| p.to_string()).unwrap_or_default();
        let _p = self.gate.enter(self.id, format!("LISTD {shown}")).await;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let _p = self.gate.enter(self.id, format!("COPY {to}")).await;
        self.inner.copy_opts(from, to, options).await
    }
}
