//! The service's configuration file, `cairn replicate --config cairn.toml`: where the
//! state and the store are, the quotas, the janitor, the HTTP address, and the databases,
//! each with its kind, source, schedule and retention (the format is in the README and
//! docs/decisions/0029-service-config.md).
//!
//! Contract: the file is parsed whole and checked before anything runs: unknown keys,
//! a duplicate or invalid database name, a zero interval, a retention without a GC
//! interval or a quota tree whose inner level exceeds its outer one are refused with an
//! error naming the file and the database. Durations are humantime strings (`1s`, `10m`,
//! `7d`); sizes are bytes or strings with a unit (`64MiB`, `4 GiB`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use cairn_core::SourceKind;
use cairn_orchestrator::{CairnError, GcOptions, ReplicateOptions, ScheduleOptions, Trigger};
use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// State directory (`--state` given on the command line wins).
    pub state: Option<PathBuf>,
    /// Store URL (`--store` wins).
    pub store: Option<String>,
    /// Store configuration file (`--store-config` wins).
    pub store_config: Option<PathBuf>,
    /// The tenant the databases belong to (`--tenant` wins).
    pub tenant: Option<String>,
    /// zstd level (`--compression-level` wins).
    pub compression_level: Option<i32>,
    /// Serve /metrics, /health and /ready here (`--listen` wins).
    pub listen: Option<String>,
    /// Disk budgets.
    #[serde(default)]
    pub quota: Quota,
    /// The scratch janitor.
    #[serde(default)]
    pub janitor: JanitorFile,
    /// The databases.
    #[serde(default, rename = "database")]
    pub databases: Vec<DatabaseFile>,
    /// How each database runs, in file order (filled by [`parse`] once checked).
    #[serde(skip)]
    pub plans: Vec<DbPlan>,
}

/// `[quota]`: scratch budgets, nesting global, tenant, job.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Scratch all jobs may use at once.
    pub scratch: Option<ByteSize>,
    /// ... of which the tenant's jobs may use this much.
    pub tenant_scratch: Option<ByteSize>,
    /// ... and each job this much.
    pub job_scratch: Option<ByteSize>,
    /// Local cache (replication spools) all databases may hold.
    pub cache: Option<ByteSize>,
    /// ... of which the tenant's databases this much.
    pub tenant_cache: Option<ByteSize>,
}

/// `[janitor]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JanitorFile {
    /// Time between sweeps.
    #[serde(with = "humantime_serde")]
    pub every: Duration,
    /// Scratch unchanged for this long is removed.
    #[serde(with = "humantime_serde")]
    pub min_age: Duration,
}

impl Default for JanitorFile {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(600),
            min_age: Duration::from_secs(3600),
        }
    }
}

/// One `[[database]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseFile {
    /// Database name.
    pub name: String,
    /// `sqlite`, `pages` or `segments`.
    pub kind: SourceKind,
    /// The SQLite file, page file or segment directory.
    pub source: PathBuf,
    /// SQLite: time between shipping steps (default 1s). Others: time between scheduled
    /// checkpoints (default 1m).
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// Pages and segments: `change` (checkpoint when the source changed; default) or
    /// `interval` (every interval).
    #[serde(default)]
    pub trigger: Trigger,
    /// Pages: the page size (default 4096).
    pub page_size: Option<u32>,
    /// SQLite: a page generation once this much WAL was shipped since the last one.
    pub page_every_bytes: Option<ByteSize>,
    /// SQLite: ... or once this long passed.
    #[serde(default, with = "humantime_serde")]
    pub page_every: Option<Duration>,
    /// SQLite: reset the WAL once its file passes this.
    pub wal_limit: Option<ByteSize>,
    /// The longest wait between retries of failed steps (default 30s).
    #[serde(default, with = "humantime_serde")]
    pub max_backoff: Option<Duration>,
    /// `/ready` fails once this database lags more than this (default: 10s or three
    /// intervals, whichever is longer).
    #[serde(default, with = "humantime_serde")]
    pub lag_bound: Option<Duration>,
    /// Retention and its GC schedule; none: no GC for this database.
    pub retention: Option<RetentionFile>,
}

/// `[database.retention]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionFile {
    /// Keep the newest N data generations.
    pub keep_last: Option<u64>,
    /// Keep data generations younger than this.
    #[serde(default, with = "humantime_serde")]
    pub keep_within: Option<Duration>,
    /// Keep unreferenced blobs younger than this by the store's clock (default 1h).
    #[serde(default, with = "humantime_serde")]
    pub grace: Option<Duration>,
    /// Time between collections.
    #[serde(with = "humantime_serde")]
    pub gc_every: Duration,
}

/// How one database runs in the service.
#[derive(Clone, Debug)]
pub enum Plan {
    /// Continuous SQLite replication.
    Sqlite(ReplicateOptions),
    /// Scheduled checkpoints of a page file or segment directory.
    Scheduled {
        /// Page size (page files).
        page_size: u32,
        /// The schedule.
        opts: ScheduleOptions,
    },
}

/// One database of the service, checked.
#[derive(Clone, Debug)]
pub struct DbPlan {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: SourceKind,
    /// Source path.
    pub source: PathBuf,
    /// How it runs.
    pub plan: Plan,
    /// Its lag bound for `/ready`.
    pub lag_bound: Duration,
    /// Its collections, if any: the options and the interval.
    pub gc: Option<(GcOptions, Duration)>,
}

impl DbPlan {
    /// The interval of its steps.
    pub fn interval(&self) -> Duration {
        match &self.plan {
            Plan::Sqlite(o) => o.interval,
            Plan::Scheduled { opts, .. } => opts.interval,
        }
    }
}

/// Reads and checks `path`.
pub fn read(path: &Path) -> Result<ServiceFile, CairnError> {
    let text = std::fs::read_to_string(path).map_err(|e| CairnError::Config {
        what: format!("service config {}", path.display()),
        reason: e.to_string(),
    })?;
    parse(path, &text)
}

/// Parses and checks the text of `path`.
pub fn parse(path: &Path, text: &str) -> Result<ServiceFile, CairnError> {
    let bad = |reason: String| CairnError::Config {
        what: format!("service config {}", path.display()),
        reason,
    };
    let mut f: ServiceFile = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
    if f.databases.is_empty() {
        return Err(bad("no [[database]] is configured".into()));
    }
    let mut names = BTreeSet::new();
    for d in &f.databases {
        cairn_core::DbId::new(d.name.clone())
            .map_err(|e| bad(format!("database {:?}: {e}", d.name)))?;
        if !names.insert(d.name.as_str()) {
            return Err(bad(format!("database {} is configured twice", d.name)));
        }
    }
    let q = &f.quota;
    let trees = [
        vec![
            ("quota.scratch", q.scratch),
            ("quota.tenant_scratch", q.tenant_scratch),
            ("quota.job_scratch", q.job_scratch),
        ],
        vec![
            ("quota.cache", q.cache),
            ("quota.tenant_cache", q.tenant_cache),
        ],
    ];
    for levels in trees {
        let mut outer: Option<(&str, ByteSize)> = None;
        for (inner, v) in levels {
            let Some(i) = v else { continue };
            if i == ByteSize(0) {
                return Err(bad(format!("{inner} is zero")));
            }
            if let Some((outer, o)) = outer {
                if i > o {
                    return Err(bad(format!("{inner} ({i}) exceeds {outer} ({o})")));
                }
            }
            outer = Some((inner, i));
        }
    }
    f.plans = f
        .databases
        .iter()
        .map(|d| {
            d.plan()
                .map_err(|reason| bad(format!("database {}: {reason}", d.name)))
        })
        .collect::<Result<_, _>>()?;
    Ok(f)
}

impl DatabaseFile {
    /// How it runs, or why it cannot.
    pub fn plan(&self) -> Result<DbPlan, String> {
        let nonzero = |what: &str, d: Option<Duration>| match d {
            Some(Duration::ZERO) => Err(format!("{what} is zero")),
            _ => Ok(d),
        };
        let interval = nonzero("interval", self.interval)?;
        let max_backoff = nonzero("max_backoff", self.max_backoff)?;
        let sqlite_only = [
            ("page_every_bytes", self.page_every_bytes.is_some()),
            ("page_every", self.page_every.is_some()),
            ("wal_limit", self.wal_limit.is_some()),
        ];
        let plan = match self.kind {
            SourceKind::Sqlite => {
                if self.page_size.is_some() {
                    return Err("page_size is for kind = \"pages\"".into());
                }
                let d = ReplicateOptions::default();
                Plan::Sqlite(ReplicateOptions {
                    interval: interval.unwrap_or(d.interval),
                    page_every_bytes: self.page_every_bytes.map_or(d.page_every_bytes, |b| b.0),
                    page_every: nonzero("page_every", self.page_every)?.unwrap_or(d.page_every),
                    wal_limit: self.wal_limit.map_or(d.wal_limit, |b| b.0),
                    max_backoff: max_backoff.unwrap_or(d.max_backoff),
                })
            }
            SourceKind::Pages | SourceKind::Segments => {
                if let Some((k, _)) = sqlite_only.iter().find(|(_, set)| *set) {
                    return Err(format!("{k} is for kind = \"sqlite\""));
                }
                if self.kind == SourceKind::Segments && self.page_size.is_some() {
                    return Err("page_size is for kind = \"pages\"".into());
                }
                Plan::Scheduled {
                    page_size: self.page_size.unwrap_or(4096),
                    opts: ScheduleOptions {
                        interval: interval.unwrap_or(Duration::from_secs(60)),
                        trigger: self.trigger,
                        max_backoff: max_backoff.unwrap_or(Duration::from_secs(30)),
                    },
                }
            }
        };
        let gc = match &self.retention {
            None => None,
            Some(r) => {
                if r.gc_every.is_zero() {
                    return Err("retention.gc_every is zero".into());
                }
                if r.keep_last == Some(0) {
                    return Err(
                        "retention.keep_last is zero: it would expire every generation".into(),
                    );
                }
                let opts = GcOptions {
                    keep_last: r.keep_last,
                    keep_within: r.keep_within,
                    grace: r.grace.unwrap_or(Duration::from_secs(3600)),
                    dry_run: false,
                    explain: false,
                };
                Some((opts, r.gc_every))
            }
        };
        let mut p = DbPlan {
            name: self.name.clone(),
            kind: self.kind,
            source: self.source.clone(),
            plan,
            lag_bound: Duration::ZERO,
            gc,
        };
        p.lag_bound = self
            .lag_bound
            .unwrap_or_else(|| crate::replicate::default_lag_bound(p.interval()));
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        store = "file:///tmp/cairn-store"
        listen = "127.0.0.1:9090"

        [quota]
        scratch = "4GiB"
        tenant_scratch = "2GiB"
        job_scratch = 1073741824
        cache = "2GiB"
        tenant_cache = "1GiB"

        [janitor]
        every = "5m"
        min_age = "30m"

        [[database]]
        name = "app"
        kind = "sqlite"
        source = "/data/app.db"
        interval = "1s"
        wal_limit = "32MiB"
        [database.retention]
        keep_within = "7d"
        gc_every = "1h"

        [[database]]
        name = "heap"
        kind = "pages"
        source = "/data/heap.pages"
        page_size = 8192
        interval = "5m"

        [[database]]
        name = "log"
        kind = "segments"
        source = "/data/wal"
        interval = "10s"
        trigger = "interval"
        [database.retention]
        keep_last = 3
        grace = "10m"
        gc_every = "30m"
    "#;

    fn p(text: &str) -> Result<ServiceFile, String> {
        parse(Path::new("cairn.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_file_parses_into_plans() {
        let f = p(GOOD).unwrap();
        assert_eq!(f.quota.scratch, Some(ByteSize::gib(4)));
        assert_eq!(f.quota.job_scratch, Some(ByteSize::gib(1)));
        assert_eq!(f.quota.tenant_cache, Some(ByteSize::gib(1)));
        assert_eq!(f.janitor.every, Duration::from_secs(300));
        let plans = &f.plans;
        match &plans[0].plan {
            Plan::Sqlite(o) => {
                assert_eq!(o.interval, Duration::from_secs(1));
                assert_eq!(o.wal_limit, 32 << 20);
                assert_eq!(
                    o.page_every_bytes,
                    ReplicateOptions::default().page_every_bytes
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(plans[0].lag_bound, Duration::from_secs(10));
        let (gc, every) = plans[0].gc.clone().unwrap();
        assert_eq!(gc.keep_within, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(gc.grace, Duration::from_secs(3600));
        assert_eq!(every, Duration::from_secs(3600));
        match &plans[1].plan {
            Plan::Scheduled { page_size, opts } => {
                assert_eq!(*page_size, 8192);
                assert_eq!(opts.trigger, Trigger::Change);
                assert_eq!(opts.interval, Duration::from_secs(300));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(plans[1].lag_bound, Duration::from_secs(900));
        assert!(plans[1].gc.is_none());
        match &plans[2].plan {
            Plan::Scheduled { opts, .. } => assert_eq!(opts.trigger, Trigger::Interval),
            other => panic!("{other:?}"),
        }
        assert_eq!(plans[2].gc.as_ref().unwrap().0.keep_last, Some(3));
    }

    #[test]
    fn bad_files_are_refused_naming_the_file_and_database() {
        let db = |extra: &str| {
            format!("[[database]]\nname = \"app\"\nkind = \"sqlite\"\nsource = \"a.db\"\n{extra}")
        };
        for (text, expect) in [
            (String::new(), "no [[database]]"),
            (db("colour = 1"), "unknown field"),
            (
                format!("{}{}", db(""), db("")),
                "database app is configured twice",
            ),
            (db("interval = \"0s\""), "database app: interval is zero"),
            (db("interval = \"soon\""), "interval"),
            (
                db("page_size = 512"),
                "database app: page_size is for kind = \"pages\"",
            ),
            (
                "[[database]]\nname = \"p\"\nkind = \"pages\"\nsource = \"p\"\nwal_limit = 1\n"
                    .into(),
                "database p: wal_limit is for kind = \"sqlite\"",
            ),
            (db("[database.retention]\nkeep_last = 2\n"), "gc_every"),
            (
                db("[database.retention]\nkeep_last = 0\ngc_every = \"1h\"\n"),
                "keep_last is zero",
            ),
            (
                format!(
                    "[quota]\nscratch = \"1GiB\"\njob_scratch = \"2GiB\"\n{}",
                    db("")
                ),
                "quota.job_scratch (2.0 GiB) exceeds quota.scratch (1.0 GiB)",
            ),
            (
                format!(
                    "[quota]\ntenant_scratch = \"1GiB\"\njob_scratch = \"2GiB\"\n{}",
                    db("")
                ),
                "quota.job_scratch (2.0 GiB) exceeds quota.tenant_scratch (1.0 GiB)",
            ),
            (
                format!(
                    "[quota]\ncache = \"1MiB\"\ntenant_cache = \"2MiB\"\n{}",
                    db("")
                ),
                "quota.tenant_cache (2.0 MiB) exceeds quota.cache (1.0 MiB)",
            ),
            (
                format!("[quota]\ncache = 0\n{}", db("")),
                "quota.cache is zero",
            ),
            (db("").replace("\"app\"", "\"a/b\""), "database \"a/b\""),
            (db("").replace("sqlite", "oracle"), "unknown variant"),
        ] {
            match p(&text) {
                Ok(_) if expect.is_empty() => {}
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => {
                    assert!(!expect.is_empty(), "refused {text}: {e}");
                    assert!(e.contains("cairn.toml"), "{e}");
                    assert!(e.contains(expect), "{e} lacks {expect:?}");
                }
            }
        }
    }
}
