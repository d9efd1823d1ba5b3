//! HTTP for a long-running `cairn replicate` (`--listen ADDR`, or `listen` in its config): `/metrics` (Prometheus
//! text format, `metrics.rs`), `/health` and `/ready` (`ready.rs`), served by axum on
//! the command's tokio runtime.
//!
//! Contract: [`Service::bind`] binds the address (port 0 picks a free one; the bound
//! address is logged and printed on stderr as `listening on http://ADDR`) and
//! [`Bound::serve`] answers until its stop signal, then finishes the requests in hand.
//! `/health` answers 200 whenever the process and its runtime do (the handler runs on that
//! runtime and yields to it once). `/ready` answers 200 or 503 with a JSON body of checks.
//! `/metrics` encodes on the blocking pool (it reads the job queue in RocksDB). Handlers
//! only read what the replicate loop published through its observer and the counters that
//! exist anyway: no handler waits on the loop, and the loop never waits on a handler.
//!
//! Crash: nothing here is durable; the listener goes with the process. Retries: none; a
//! scraper asks again. Cancellation: the stop signal ends the accept loop gracefully; a
//! dropped connection drops its handler.

pub mod metrics;
pub mod ready;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cairn_orchestrator::{CairnError, Checkpointer, SourceKind};
use tokio::sync::watch;

pub use metrics::GcRecorder;
use metrics::{DbLabels, DbObserver, DbTable, Metrics};
use ready::Checks;

/// The HTTP side of one service: its metrics and readiness over its databases.
pub struct Service {
    metrics: Arc<Metrics>,
    checks: Arc<Checks>,
}

impl Service {
    /// The service of `cp` (no database yet: see [`Service::add_db`]).
    pub fn new(cp: Arc<Checkpointer>) -> Self {
        let dbs: DbTable = Arc::new(RwLock::new(Vec::new()));
        Self {
            metrics: Arc::new(Metrics::new(Arc::clone(&cp), Arc::clone(&dbs))),
            checks: Arc::new(Checks::new(cp, dbs)),
        }
    }

    /// Adds a database with its lag bound and the kinds of its checkpoints; pass the
    /// observer to its loop.
    pub fn add_db(
        &self,
        tenant: &str,
        db: &str,
        lag_bound: Duration,
        kinds: &[SourceKind],
    ) -> Arc<DbObserver> {
        let labels = DbLabels {
            tenant: tenant.to_string(),
            db: db.to_string(),
        };
        self.metrics.add_db(labels, lag_bound, kinds)
    }

    /// Feeds the GC series of `tenant`'s databases.
    pub fn gc_recorder(&self, tenant: &str) -> GcRecorder {
        self.metrics.gc_recorder(tenant)
    }

    /// Binds `addr` (`HOST:PORT`).
    pub async fn bind(self, addr: &str) -> Result<Bound, CairnError> {
        let bad = |reason: String| CairnError::Config {
            what: format!("--listen {addr}"),
            reason,
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| bad(e.to_string()))?;
        let local = listener.local_addr().map_err(|e| bad(e.to_string()))?;
        Ok(Bound {
            listener,
            addr: local,
            service: self,
        })
    }
}

/// A bound service, ready to serve.
pub struct Bound {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    service: Service,
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    checks: Arc<Checks>,
}

impl Bound {
    /// The address bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` turns true (or its sender goes), on the current runtime.
    pub fn serve(self, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let state = AppState {
            metrics: self.service.metrics,
            checks: self.service.checks,
        };
        let app = Router::new()
            .route("/metrics", get(metrics_handler))
            .route("/health", get(health_handler))
            .route("/ready", get(ready_handler))
            .with_state(state);
        let addr = self.addr;
        tracing::info!(%addr, "serving /metrics, /health and /ready");
        let listener = self.listener;
        tokio::spawn(async move {
            let shutdown = async move {
                while !*stop.borrow() {
                    if stop.changed().await.is_err() {
                        break;
                    }
                }
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::warn!(%addr, error = %e, "the HTTP server stopped");
            }
        })
    }
}

async fn metrics_handler(State(s): State<AppState>) -> Response {
    let m = Arc::clone(&s.metrics);
    match tokio::task::spawn_blocking(move || m.encode()).await {
        Ok(Ok(body)) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            body,
        )
            .into_response(),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding: {e}\n"),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding task: {e}\n"),
        )
            .into_response(),
    }
}

async fn health_handler() -> Response {
    tokio::task::yield_now().await;
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn ready_handler(State(s): State<AppState>) -> Response {
    let r = s.checks.run().await;
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r)).into_response()
}
