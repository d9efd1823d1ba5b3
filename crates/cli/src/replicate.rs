//! The pieces of `cairn replicate` (continuous SQLite replication until SIGINT or
//! SIGTERM; the service itself is `service/`) and the restore of a replicated SQLite
//! database to a transaction.

use std::path::Path;
use std::time::Duration;

use cairn_orchestrator::{
    CairnError, Checkpointer, DbId, Generation, Lsn, ReplicateReport, SqlitePoint,
    SqliteRestoreReport,
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

/// The default lag bound: 10 s, or three intervals if that is longer (see
/// docs/decisions/0026-service-endpoints.md).
pub fn default_lag_bound(interval: Duration) -> Duration {
    Duration::from_secs(10).max(interval.saturating_mul(3))
}

/// Prints the report of one replication run.
pub fn print_report(r: &ReplicateReport) {
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
