//! `/ready`: is this service doing its job right now?
//!
//! Contract: three kinds of check, each with a name, `ok` and a human `detail`, answered
//! as 200 when every one passes and 503 otherwise, with the checks as the JSON body:
//! - `store`: the store answers a HEAD ([`cairn_orchestrator::RemoteStore::probe`], one
//!   request past the retry layer with a 2 s timeout), named with its endpoint when it
//!   fails. The answer is kept for [`PROBE_TTL`], so scrapes in a burst send one request;
//!   the probe runs in the request's task, never in the replicate loop's.
//! - `state_dir`, `scratch`: a probe file can be created, written (and synced) and removed
//!   in the state directory, and in the scratch directory (which may be a file system of
//!   its own, full or read-only while the state is fine).
//! - `db <tenant>/<db>`: its last replication step succeeded and its lag (see
//!   [`cairn_orchestrator::ReplicateStatus::lag_ms`]) is within its lag bound.
//!
//! Crash: the state probe file is named after the process and removed at once; one left by
//! a crash is overwritten by the next check of the same pid, and is tiny. Retries: none;
//! the next request checks again. Cancellation: dropping the request drops its checks.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_orchestrator::Checkpointer;
use serde::Serialize;
use tokio::sync::Mutex;

use super::metrics::DbTable;

/// How long a store probe's answer is reused.
pub const PROBE_TTL: Duration = Duration::from_millis(1500);
/// How long the store probe waits for an answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One check's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// `store`, `state_dir` or `db <tenant>/<db>`.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found (why not, when it failed).
    pub detail: String,
}

/// The `/ready` body.
#[derive(Clone, Debug, Serialize)]
pub struct Readiness {
    /// Every check passed.
    pub ready: bool,
    /// The checks.
    pub checks: Vec<Check>,
}

/// The checks of one service.
pub struct Checks {
    cp: Arc<Checkpointer>,
    dbs: DbTable,
    probe: Mutex<Option<(Instant, Check)>>,
}

impl Checks {
    /// The checks of `cp`'s service over `dbs`.
    pub fn new(cp: Arc<Checkpointer>, dbs: DbTable) -> Self {
        Self {
            cp,
            dbs,
            probe: Mutex::new(None),
        }
    }

    /// Runs every check (the store's from cache when fresh).
    pub async fn run(&self) -> Readiness {
        let state = self.cp.config().state_dir.clone();
        let mut checks = vec![
            self.store().await,
            writable("state_dir", "state directory", state).await,
            writable("scratch", "scratch directory", self.cp.scratch_dir()).await,
        ];
        let now = super::metrics::now_ms();
        let dbs = self.dbs.read().map(|d| d.clone()).unwrap_or_default();
        for d in dbs {
            let name = format!("db {}/{}", d.labels.tenant, d.labels.db);
            let bound = d.lag_bound;
            let check = match d.status() {
                None => Check {
                    name,
                    ok: false,
                    detail: "no replication step has finished yet".into(),
                },
                Some(s) => {
                    let lag = Duration::from_millis(s.lag_ms(now));
                    let within = lag <= bound;
                    let mut detail = format!(
                        "lag {:.1} s {} bound {:.1} s",
                        lag.as_secs_f64(),
                        if within { "within" } else { "over" },
                        bound.as_secs_f64()
                    );
                    if let Some(e) = &s.last_error {
                        detail.push_str(&format!(
                            "; the last {} step(s) failed, retrying in {} ms: {e}",
                            s.consecutive_failures,
                            s.retry_in_ms.unwrap_or(0)
                        ));
                    }
                    Check {
                        name,
                        ok: within && s.consecutive_failures == 0,
                        detail,
                    }
                }
            };
            checks.push(check);
        }
        Readiness {
            ready: checks.iter().all(|c| c.ok),
            checks,
        }
    }

    async fn store(&self) -> Check {
        let mut cached = self.probe.lock().await;
        if let Some((at, c)) = cached.as_ref() {
            if at.elapsed() < PROBE_TTL {
                return c.clone();
            }
        }
        let store = self.cp.store();
        let check = match store.probe(PROBE_TIMEOUT).await {
            Ok(()) => Check {
                name: "store".into(),
                ok: true,
                detail: format!("{} answers", store.describe_with_endpoint()),
            },
            Err(e) => Check {
                name: "store".into(),
                ok: false,
                detail: e.to_string(),
            },
        };
        *cached = Some((Instant::now(), check.clone()));
        check
    }
}

/// The check `name`: a probe file can be written in `dir` (the `what`).
async fn writable(name: &str, what: &str, dir: PathBuf) -> Check {
    let shown = dir.display().to_string();
    let probe = dir.join(format!(".cairn-ready-{}", std::process::id()));
    let r = tokio::task::spawn_blocking(move || write_and_remove(probe)).await;
    let (ok, detail) = match r {
        Ok(Ok(())) => (true, format!("{shown} is writable")),
        Ok(Err(e)) => (false, format!("{what} {shown} is not writable: {e}")),
        Err(e) => (false, format!("{what} {shown}: the check did not run: {e}")),
    };
    Check {
        name: name.into(),
        ok,
        detail,
    }
}

fn write_and_remove(path: PathBuf) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let written = f.write_all(b"ready\n").and_then(|()| f.sync_data());
    drop(f);
    let removed = std::fs::remove_file(&path);
    written.and(removed)
}
