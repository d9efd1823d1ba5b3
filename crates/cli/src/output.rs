//! Human and JSON renderings of the library's reports.

use cairn_core::DbId;
use cairn_core::JobId;
use cairn_orchestrator::{
    CairnError, CheckpointReport, GenerationInfo, JobOutcome, JobRecord, JobStatus, RestoreReport,
    VerifyReport,
};
use serde::Serialize;

/// Prints `v` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot render JSON: {e}"),
    }
}

/// `1234567` → `1.18 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

pub fn checkpoint(json: bool, r: &CheckpointReport) {
    if json {
        return print_json(r);
    }
    println!(
        "published generation {} of {}/{} ({}): {} source, {} blob(s) uploaded ({}), {} reused, {} ms",
        r.generation,
        r.tenant,
        r.db,
        r.kind,
        bytes(r.source_bytes),
        r.blobs_uploaded,
        bytes(r.bytes_uploaded),
        r.blobs_reused,
        r.duration_ms
    );
    if r.kind != "segments" {
        println!(
            "  chunks: {} as deltas, {} rewritten, {} unchanged; {} pages dirty ({})",
            r.chunks_delta,
            r.chunks_full,
            r.chunks_unchanged,
            r.pages_dirty,
            bytes(r.bytes_dirty)
        );
    }
}

pub fn restore(json: bool, r: &RestoreReport) {
    if json {
        return print_json(r);
    }
    println!(
        "restored generation {} of {} ({}) to {}: {} written from {} verified blob(s), {} ms",
        r.generation,
        r.db,
        r.kind,
        r.path,
        bytes(r.bytes_written),
        r.blobs_read,
        r.duration_ms
    );
}

pub fn verify(json: bool, r: &VerifyReport) {
    if json {
        print_json(r);
    } else if r.ok {
        println!(
            "generation {} of {}: ok, {} blob(s) checked{}",
            r.generation,
            r.db,
            r.blobs_checked,
            if r.deep {
                format!(", {} re-read and checksummed", bytes(r.bytes_read))
            } else {
                String::new()
            }
        );
    } else {
        println!(
            "generation {} of {}: {} problem(s)",
            r.generation,
            r.db,
            r.errors.len()
        );
    }
    for e in &r.errors {
        eprintln!("bad blob: {e}");
    }
}

pub fn generations(json: bool, gens: &[GenerationInfo]) {
    if json {
        return print_json(&gens);
    }
    println!(
        "{:>10}  {:<24}  {:<8}  {:>12}  {:>6}  status",
        "generation", "created", "kind", "size", "blobs"
    );
    for g in gens {
        let status = match (g.expired, g.gc) {
            (true, _) => "expired",
            (false, true) => "collection",
            (false, false) => "restorable",
        };
        println!(
            "{:>10}  {:<24}  {:<8}  {:>12}  {:>6}  {status}",
            g.generation,
            utc(g.created_unix_ms),
            g.kind,
            bytes(g.logical_bytes),
            g.blobs
        );
    }
}

pub fn databases(json: bool, dbs: &[DbId]) {
    if json {
        return print_json(&dbs);
    }
    for d in dbs {
        println!("{d}");
    }
}

/// One line about a finished job.
pub fn outcome(o: &JobOutcome) -> String {
    match o {
        JobOutcome::Checkpoint(r) => format!(
            "published generation {} of {}/{}",
            r.generation, r.tenant, r.db
        ),
        JobOutcome::Restore(r) => format!(
            "restored generation {} of {} to {}",
            r.generation, r.db, r.path
        ),
        JobOutcome::Verify(r) => format!(
            "verified generation {} of {}: {}",
            r.generation,
            r.db,
            if r.ok { "ok" } else { "problems found" }
        ),
        JobOutcome::Gc(r) => format!(
            "collected {}: {} blob(s) deleted ({}), {} generation(s) expired",
            r.db,
            r.blobs_deleted,
            bytes(r.bytes_deleted),
            r.generations_expired.len()
        ),
    }
}

pub fn status(json: bool, jobs: &[JobRecord]) {
    let rows: Vec<JobStatus> = jobs.iter().map(JobStatus::from).collect();
    if json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        println!("no jobs");
        return;
    }
    println!(
        "{:<16}  {:<10}  {:<12}  {:<9}  {:<9}  {:>15}  {:>8}  {:>4}  last error",
        "job", "kind", "database", "state", "phase", "progress", "gen", "try"
    );
    for r in &rows {
        println!(
            "{:<16}  {:<10}  {:<12}  {:<9}  {:<9}  {:>15}  {:>8}  {:>4}  {}",
            r.id,
            r.kind,
            r.db,
            format!("{:?}", r.state).to_lowercase(),
            format!("{:?}", r.phase).to_lowercase(),
            format!(
                "{}/{} ({})",
                r.progress.done,
                r.progress.total,
                bytes(r.progress.bytes_done)
            ),
            r.generation.map(|g| g.to_string()).unwrap_or_default(),
            r.attempts,
            r.last_error.as_deref().unwrap_or("")
        );
    }
}

#[derive(Serialize)]
struct Resumed<'a> {
    job: String,
    ok: bool,
    outcome: Option<&'a JobOutcome>,
    error: Option<String>,
}

pub fn resumed(json: bool, results: &[(JobId, Result<JobOutcome, CairnError>)]) {
    if json {
        let rows: Vec<Resumed<'_>> = results
            .iter()
            .map(|(id, r)| Resumed {
                job: id.to_string(),
                ok: r.is_ok(),
                outcome: r.as_ref().ok(),
                error: r.as_ref().err().map(|e| e.to_string()),
            })
            .collect();
        return print_json(&rows);
    }
    if results.is_empty() {
        println!("no unfinished jobs");
    }
    for (id, r) in results {
        match r {
            Ok(o) => println!("job {id}: {}", outcome(o)),
            Err(e) => println!("job {id}: failed: {e}"),
        }
    }
}

pub fn gc(json: bool, r: &cairn_orchestrator::GcReport) {
    if json {
        return print_json(r);
    }
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    println!(
        "{}: {verb} {} blob(s) ({}), kept {} ({}), {} unreferenced in the grace period ({}); generations retained {:?}, expired {:?}{}",
        r.db,
        r.blobs_deleted,
        bytes(r.bytes_deleted),
        r.blobs_kept,
        bytes(r.bytes_kept),
        r.unreferenced_in_grace.blobs,
        bytes(r.unreferenced_in_grace.bytes),
        r.generations_retained,
        r.generations_expired,
        r.generation
            .map(|g| format!("; published generation {g}"))
            .unwrap_or_default()
    );
    for k in r.kept.iter().flatten() {
        println!("  kept {}: {}", k.name, k.reason);
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC, seconds).
fn utc(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
    }
}
