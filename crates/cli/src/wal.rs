//! The engine-contract and retention commands' input and output: LSN range files,
//! watermark, leases, truncation reports and pins.

use std::collections::BTreeMap;
use std::path::Path;

use cairn_core::{DbId, Lsn};
use cairn_orchestrator::{CairnError, TruncateReport, Watermark};
use serde::Serialize;

fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot render JSON: {e}"),
    }
}

/// Reads a ranges file: one `NAME START END` line per segment file (blank lines and lines
/// starting with `#` are skipped).
pub fn read_ranges(path: &Path) -> Result<BTreeMap<String, (Lsn, Lsn)>, CairnError> {
    let bad = |line: usize, reason: String| CairnError::Config {
        what: format!("ranges file {} line {line}", path.display()),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| CairnError::Config {
        what: format!("ranges file {}", path.display()),
        reason: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [name, start, end] = f.as_slice() else {
            return Err(bad(
                n + 1,
                format!("expected NAME START END, found {line:?}"),
            ));
        };
        let num = |s: &str| {
            s.parse::<u64>()
                .map(Lsn)
                .map_err(|e| bad(n + 1, format!("{s:?}: {e}")))
        };
        if out
            .insert(name.to_string(), (num(start)?, num(end)?))
            .is_some()
        {
            return Err(bad(n + 1, format!("segment {name} is listed twice")));
        }
    }
    Ok(out)
}

/// Parses a lease id (16 hex digits, as printed).
pub fn lease_id(db: &DbId, s: &str) -> Result<u64, CairnError> {
    u64::from_str_radix(s, 16).map_err(|e| CairnError::UnknownLease {
        db: db.clone(),
        lease: format!("{s} (not a lease id: {e})"),
    })
}

pub fn watermark(json: bool, w: &Watermark) {
    if json {
        return print_json(w);
    }
    let show = |v: Option<u64>| v.map_or("none".to_string(), |v| v.to_string());
    println!(
        "watermark {}: WAL stream {}..{}, page checkpoint at {}",
        w.watermark,
        show(w.wal_start),
        show(w.wal_end),
        show(w.page_lsn)
    );
    for l in &w.leases {
        println!(
            "  lease {}: {}..{} until {}",
            l.id, l.start, l.end, l.expires_unix_ms
        );
    }
}

#[derive(Serialize)]
struct Leased<'a> {
    lease: String,
    start: u64,
    end: u64,
    expires_unix_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    released: Option<&'a str>,
}

pub fn leased(json: bool, l: &cairn_orchestrator::Lease) {
    let id = format!("{:016x}", l.id);
    if json {
        return print_json(&Leased {
            lease: id,
            start: l.start.0,
            end: l.end.0,
            expires_unix_ms: l.expires_unix_ms,
            released: None,
        });
    }
    println!(
        "lease {id}: LSNs {}..{} until {}",
        l.start, l.end, l.expires_unix_ms
    );
}

pub fn released(json: bool, id: &str) {
    if json {
        return print_json(&serde_json::json!({ "lease": id, "released": true }));
    }
    println!("released lease {id}");
}

pub fn truncated(json: bool, r: &TruncateReport) {
    if json {
        return print_json(r);
    }
    match r.generation {
        Some(g) => println!(
            "published generation {g} of {}: {} segment(s) dropped, WAL stream now {}..{}",
            r.db, r.segments_dropped, r.wal_start, r.wal_end
        ),
        None => println!(
            "nothing to truncate in {}: WAL stream {}..{}",
            r.db, r.wal_start, r.wal_end
        ),
    }
}

pub fn pinned(json: bool, p: &cairn_orchestrator::Pin) {
    if json {
        return print_json(p);
    }
    println!("pinned generation {}", p.generation);
}

pub fn unpinned(json: bool, generation: u64) {
    if json {
        return print_json(&serde_json::json!({ "generation": generation, "unpinned": true }));
    }
    println!("unpinned generation {generation}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_files_are_parsed_and_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        std::fs::write(
            &p,
            "# name start end\n0001.wal 100 250\n\n0002.wal 250 300\n",
        )
        .unwrap();
        let r = read_ranges(&p).unwrap();
        assert_eq!(r["0002.wal"], (Lsn(250), Lsn(300)));
        std::fs::write(&p, "0001.wal 100\n").unwrap();
        let e = read_ranges(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("NAME START END"), "{e}");
    }
}
