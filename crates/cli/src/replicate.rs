//! `cairn replicate` (continuous SQLite replication until SIGINT or SIGTERM) and the
//! restore of a replicated SQLite database to a transaction. With `--listen`, the
//! command also serves `/metrics`, `/health` and `/ready` (see `http/`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_orchestrator::{
    CairnError, Checkpointer, DbId, Generation, Lsn, NoObserver, ReplicateObserver,
    ReplicateOptions, ReplicateReport, SqlitePoint, SqliteRestoreReport,
};

/// Parses `--time`: RFC 3339 in UTC (`2026-12-02T18:00:00Z`, fractions allowed), to unix ms.
pub fn parse_time(s: &str) -> Result<u64, CairnError> {
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| CairnError::Config {
        what: format!("--time {s}"),
        reason: format!("{e}; give RFC 3339 in UTC, e.g. 2026-12-02T18:00:00Z"),
    })?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| CairnError::Config {
            what: format!("--time {s}"),
            reason: "before 1970".into(),
        })?;
    Ok(d.as_millis() as u64)
}

/// When the service's janitor sweeps scratch ([`Checkpointer::run_janitor`]).
#[derive(Clone, Copy, Debug)]
pub struct Janitor {
    /// Time between sweeps.
    pub every: Duration,
    /// A job's scratch is removed once nothing in it changed for this long.
    pub min_age: Duration,
}

/// Where `cairn replicate` serves HTTP, and the lag `/ready` allows.
#[derive(Clone, Debug)]
pub struct Listen {
    /// `HOST:PORT` (port 0: any free port).
    pub addr: String,
    /// The lag bound of `/ready`.
    pub lag_bound: Duration,
}

/// The default lag bound: 10 s, or three intervals if that is longer (see
/// docs/decisions/0026-service-endpoints.md).
pub fn default_lag_bound(interval: Duration) -> Duration {
    Duration::from_secs(10).max(interval.saturating_mul(3))
}

/// Runs the replication of `source` as `db`, with the janitor beside it, until a signal
/// asks it to stop, serving `/metrics`, `/health` and `/ready` on `listen` if given.
pub async fn run(
    cp: Arc<Checkpointer>,
    db: &DbId,
    source: &Path,
    opts: &ReplicateOptions,
    listen: Option<&Listen>,
    janitor: Janitor,
    json: bool,
) -> Result<(), CairnError> {
    let (tx, rx) = tokio::sync::watch::channel(false);
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
        let _ = tx.send(true);
    });
    // The server outlives the loop's last step, then stops.
    let (http_stop, http_rx) = tokio::sync::watch::channel(false);
    let mut server = None;
    let observer: Arc<dyn ReplicateObserver> = match listen {
        Some(l) => {
            let service = crate::http::Service::new(Arc::clone(&cp));
            let observer = service.add_db(cp.config().tenant.as_str(), db.as_str(), l.lag_bound);
            let bound = service.bind(&l.addr).await?;
            // Tests and operators read the bound address from this line.
            eprintln!("listening on http://{}", bound.addr());
            server = Some(bound.serve(http_rx));
            observer
        }
        None => Arc::new(NoObserver),
    };
    if !json {
        eprintln!(
            "replicating {} as {db} every {:?} (Ctrl-C or SIGTERM stops)",
            source.display(),
            opts.interval
        );
    }
    let replicating = cp.replicate_observed(db, source, opts, rx.clone(), observer.as_ref());
    let sweeping = cp.run_janitor(janitor.every, janitor.min_age, rx);
    tokio::pin!(replicating, sweeping);
    let mut swept = false;
    // The janitor ends at the stop signal, replication once it shipped what is committed
    // (or on an error, which ends the command).
    let r = loop {
        tokio::select! {
            r = &mut replicating => break r,
            () = &mut sweeping, if !swept => swept = true,
        }
    };
    let _ = http_stop.send(true);
    if let Some(h) = server {
        if tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .is_err()
        {
            tracing::warn!("the HTTP server did not stop within 5 s");
        }
    }
    print_report(json, &r?);
    Ok(())
}

fn print_report(json: bool, r: &ReplicateReport) {
    if json {
        crate::output::print_json(r);
        return;
    }
    println!(
        "replicated {} from {}: {} steps, {} segments ({} frames, {}), {} page generations, {} gaps, {} WAL resets; generation {}",
        r.db,
        r.source,
        r.steps,
        r.segments,
        r.frames,
        crate::output::bytes(r.bytes_shipped),
        r.page_generations,
        r.gaps,
        r.wal_truncations,
        r.generation.map_or("-".into(), |g| g.to_string()),
    );
}

/// The restore of a replicated SQLite database: `lsn` or `time` (unix ms) or the newest
/// shipped commit of `generation`.
pub async fn restore(
    cp: &Checkpointer,
    db: &DbId,
    generation: Option<u64>,
    point: (Option<u64>, Option<u64>),
    to: &Path,
    force: bool,
    json: bool,
) -> Result<(), CairnError> {
    let p = match point {
        (Some(l), _) => SqlitePoint::Lsn(Lsn(l)),
        (None, Some(t)) => SqlitePoint::Time(t),
        (None, None) => SqlitePoint::Latest,
    };
    let r = cp
        .restore_sqlite(db, generation.map(Generation), to, p, force)
        .await?;
    print_restore(json, &r);
    Ok(())
}

fn print_restore(json: bool, r: &SqliteRestoreReport) {
    if json {
        crate::output::print_json(r);
        return;
    }
    println!(
        "restored {} to {} at LSN {} (page generation {} at LSN {}, then {} transactions, {} frames) in {} ms",
        r.db,
        r.path,
        r.lsn,
        r.page_generation.map_or("-".into(), |g| g.to_string()),
        r.page_lsn.map_or("-".into(), |l| l.to_string()),
        r.transactions,
        r.frames,
        r.duration_ms
    );
}
