//! `cairn replicate` as a service: one task per database (SQLite replication, or scheduled
//! checkpoints of a page file or segment directory), a GC task per database with a
//! retention policy, the scratch janitor, and the HTTP endpoints, until SIGINT or SIGTERM.
//!
//! Contract: the single-database form (`--db --source`) ends with the first error its
//! replication cannot retry, as a one-shot command would. The configured form
//! (`--config`) is supervised: a database whose run ends with such an error (its source
//! vanished, its scratch became read-only, another writer fenced it) is logged, reported
//! not-ready through `/ready` with the error, and started again after its backoff, while
//! the other databases go on; so a fault that goes away is recovered from without an
//! operator. GC runs every `gc_every` per database and a failed collection is logged and
//! tried at the next period.
//!
//! Crash: nothing here is durable; every database's work is (its jobs and spool), and the
//! next start resumes unfinished jobs before the tasks start. Retries: the loops' own (see
//! [`cairn_orchestrator::Checkpointer::replicate_observed`] and
//! [`cairn_orchestrator::Checkpointer::run_schedule`]), then the supervisor's restarts.
//! Cancellation: the signal turns the stop watch; each loop finishes or cancels the step
//! in hand and ships what is committed, GC and the janitor stop between runs, and the HTTP
//! server stops last.

pub mod config;

use std::sync::Arc;
use std::time::Duration;

use cairn_core::{DbId, SourceKind};
use cairn_orchestrator::{
    CairnError, Checkpointer, NoObserver, ReplicateObserver, ReplicateReport, ScheduleReport,
    Source,
};
use serde::Serialize;
use tokio::sync::watch;
use tracing::Instrument;

use crate::replicate::Janitor;
use config::{DbPlan, Plan};

/// What one database's task did.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum DbReport {
    /// A replicated SQLite database.
    Replicated(ReplicateReport),
    /// A scheduled source.
    Scheduled(ScheduleReport),
}

/// How the service runs.
pub struct ServiceOptions {
    /// Serve HTTP here.
    pub listen: Option<String>,
    /// The janitor's schedule.
    pub janitor: Janitor,
    /// Restart a database whose run ended with an error (the configured form).
    pub supervise: bool,
}

/// Turns `stop` true on SIGINT or SIGTERM.
fn stop_on_signal(stop: Arc<watch::Sender<bool>>) -> Result<(), CairnError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CairnError::Config {
            what: "SIGTERM handler".into(),
            reason: e.to_string(),
        })?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: shipping what is committed, then exiting");
        let _ = stop.send(true);
    });
    Ok(())
}

fn kinds(kind: SourceKind) -> &'static [SourceKind] {
    match kind {
        SourceKind::Sqlite => &[SourceKind::Segments, SourceKind::Sqlite],
        SourceKind::Pages => &[SourceKind::Pages],
        SourceKind::Segments => &[SourceKind::Segments],
    }
}

/// Runs `plans` on `cp` until a signal stops them; the reports, in the order of `plans`.
pub async fn run(
    cp: Arc<Checkpointer>,
    plans: Vec<DbPlan>,
    opts: &ServiceOptions,
) -> Result<Vec<DbReport>, CairnError> {
    let (stop_tx, stop) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    stop_on_signal(Arc::clone(&stop_tx))?;
    let (http_stop, http_rx) = watch::channel(false);
    let mut server = None;
    let mut http = None;
    let tenant = cp.config().tenant.to_string();
    let mut observers: Vec<Arc<dyn ReplicateObserver>> = Vec::new();
    if let Some(addr) = &opts.listen {
        let service = crate::http::Service::new(Arc::clone(&cp));
        for p in &plans {
            observers.push(service.add_db(&tenant, &p.name, p.lag_bound, kinds(p.kind)));
        }
        http = Some(service.gc_recorder(&tenant));
        let bound = service.bind(addr).await?;
        // Tests and operators read the bound address from this line.
        eprintln!("listening on http://{}", bound.addr());
        server = Some(bound.serve(http_rx));
    } else {
        for _ in &plans {
            observers.push(Arc::new(NoObserver));
        }
    }
    let mut dbs = tokio::task::JoinSet::new();
    let mut side = tokio::task::JoinSet::new();
    for (i, (plan, observer)) in plans.iter().cloned().zip(observers).enumerate() {
        let db = DbId::new(plan.name.clone())?;
        if let Some((gc, every)) = plan.gc.clone() {
            let (cp, db, stop, rec) = (Arc::clone(&cp), db.clone(), stop.clone(), http.clone());
            let span = tracing::info_span!("gc", tenant = %tenant, db = %db);
            side.spawn(
                async move { collect(&cp, &db, &gc, every, stop, rec).await }.instrument(span),
            );
        }
        let (cp, stop, supervise) = (Arc::clone(&cp), stop.clone(), opts.supervise);
        let span =
            tracing::info_span!("database", tenant = %tenant, db = %db, kind = plan.kind.as_str());
        dbs.spawn(
            async move {
                let r = supervised(&cp, &db, &plan, stop, observer.as_ref(), supervise).await;
                (i, r)
            }
            .instrument(span),
        );
    }
    {
        let (cp, stop, j) = (Arc::clone(&cp), stop.clone(), opts.janitor);
        side.spawn(async move { cp.run_janitor(j.every, j.min_age, stop).await });
    }
    side.spawn(crate::memory::run_trimmer(
        crate::memory::TRIM_EVERY,
        stop.clone(),
    ));
    let mut reports: Vec<Option<DbReport>> = vec![None; plans.len()];
    let mut failure = None;
    while let Some(joined) = dbs.join_next().await {
        match joined {
            Ok((i, Ok(r))) => reports[i] = Some(r),
            Ok((_, Err(e))) => {
                // Unsupervised: the first error ends the service.
                failure.get_or_insert(e);
                let _ = stop_tx.send(true);
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                failure.get_or_insert(CairnError::Join {
                    job: "service".into(),
                    what: "database task",
                    source: e,
                });
            }
        }
    }
    // GC and the janitor stop between runs; one in hand gets a few seconds (a collection
    // cut off is a job, resumed at the next start).
    if tokio::time::timeout(Duration::from_secs(5), side.join_all())
        .await
        .is_err()
    {
        tracing::warn!(
            "a collection or sweep did not stop within 5 s; it resumes at the next start"
        );
    }
    let _ = http_stop.send(true);
    if let Some(h) = server {
        if tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .is_err()
        {
            tracing::warn!("the HTTP server did not stop within 5 s");
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(reports.into_iter().flatten().collect()),
    }
}

/// One database's run, started again after errors when `supervise`.
async fn supervised(
    cp: &Checkpointer,
    db: &DbId,
    plan: &DbPlan,
    mut stop: watch::Receiver<bool>,
    observer: &dyn ReplicateObserver,
    supervise: bool,
) -> Result<DbReport, CairnError> {
    let mut restarts = 0u32;
    loop {
        let r = match &plan.plan {
            Plan::Sqlite(o) => cp
                .replicate_observed(db, &plan.source, o, stop.clone(), observer)
                .await
                .map(DbReport::Replicated),
            Plan::Scheduled { page_size, opts } => {
                let source = match plan.kind {
                    SourceKind::Segments => Source::Segments(plan.source.clone()),
                    _ => Source::Pages {
                        path: plan.source.clone(),
                        page_size: *page_size,
                    },
                };
                cp.run_schedule(db, &source, opts, stop.clone(), observer)
                    .await
                    .map(DbReport::Scheduled)
            }
        };
        let e = match r {
            Ok(r) => return Ok(r),
            Err(e) if !supervise || *stop.borrow() => return Err(e),
            Err(e) => e,
        };
        restarts = restarts.saturating_add(1);
        let max = match &plan.plan {
            Plan::Sqlite(o) => o.max_backoff,
            Plan::Scheduled { opts, .. } => opts.max_backoff,
        };
        let wait = cairn_orchestrator::step_backoff(plan.interval(), max, restarts + 1);
        tracing::error!(
            db = %db,
            error = %e,
            restarts,
            restart_in = ?wait,
            "the database's run stopped with an error; starting it again after a backoff"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return Err(e);
        }
    }
}

/// Collects `db` every `every` until `stop`.
async fn collect(
    cp: &Checkpointer,
    db: &DbId,
    opts: &cairn_orchestrator::GcOptions,
    every: Duration,
    mut stop: watch::Receiver<bool>,
    metrics: Option<crate::http::GcRecorder>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        match cp.gc(db, opts).await {
            Ok(r) => {
                tracing::info!(
                    db = %db,
                    generation = ?r.generation,
                    expired = r.generations_expired.len(),
                    blobs_deleted = r.blobs_deleted,
                    bytes_deleted = r.bytes_deleted,
                    "collected"
                );
                if let Some(m) = &metrics {
                    m.record(db.as_str(), &r);
                }
            }
            Err(e) => {
                tracing::warn!(db = %db, error = %e, "a collection failed; trying again at the next period")
            }
        }
    }
}

/// Prints the reports of a service run.
pub fn print_reports(json: bool, single: bool, reports: &[DbReport]) {
    if json {
        match reports {
            [one] if single => crate::output::print_json(one),
            all => crate::output::print_json(&serde_json::json!({ "databases": all })),
        }
        return;
    }
    for r in reports {
        match r {
            DbReport::Replicated(r) => crate::replicate::print_report(r),
            DbReport::Scheduled(r) => println!(
                "checkpointed {} from {} ({}): {} steps, {} checkpoints, {} unchanged; generation {}",
                r.db,
                r.source,
                r.kind,
                r.steps,
                r.checkpoints,
                r.unchanged,
                r.generation.map_or("-".into(), |g| g.to_string()),
            ),
        }
    }
}
