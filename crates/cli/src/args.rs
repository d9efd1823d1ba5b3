//! The command line: every subcommand, flag and default (clap derive).

use std::path::PathBuf;

use cairn_core::SourceKind;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cairn",
    version,
    about = "Content-addressed checkpoints of storage engines into object storage"
)]
pub struct Cli {
    /// Object store URL: file:///abs/dir, s3://bucket/prefix or memory://name
    /// (default: `file://<state>/store`)
    #[arg(long, global = true, env = "CAIRN_STORE")]
    pub store: Option<String>,
    /// State directory (local catalog, job state, scratch).
    #[arg(long, global = true, env = "CAIRN_STATE", default_value = "./.cairn")]
    pub state: PathBuf,
    /// Tenant the databases belong to.
    #[arg(long, global = true, default_value = "default")]
    pub tenant: String,
    /// Store configuration file (TOML or JSON: part sizes, retries, limits, S3 settings)
    #[arg(long, global = true, env = "CAIRN_STORE_CONFIG")]
    pub store_config: Option<PathBuf>,
    /// Publish without the conditional-create check, for stores that ignore conditional
    /// writes: the operator guarantees one writer per database (see docs/decisions)
    #[arg(long, global = true)]
    pub single_writer: bool,
    /// Log lines on stderr as `text` (colours only on a terminal) or one JSON object per
    /// line (`json`). The level comes from `CAIRN_LOG` (default `warn`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// zstd level for the blobs a checkpoint writes (0: store them uncompressed).
    #[arg(
        long,
        global = true,
        default_value_t = 3,
        allow_negative_numbers = true
    )]
    pub compression_level: i32,
    /// Print one JSON document on stdout instead of a human report.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
    /// The arguments given on the command line or by their environment variable (not
    /// defaulted): a service configuration file yields to these.
    #[arg(skip)]
    pub explicit: Vec<String>,
}

impl Cli {
    /// Parses the process's arguments, noting which were given.
    pub fn parse_noting_explicit() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Self::command().get_matches();
        let mut cli = match Self::from_arg_matches(&matches) {
            Ok(c) => c,
            Err(e) => e.exit(),
        };
        let given = |m: &clap::ArgMatches, id: &str| {
            matches!(
                m.value_source(id),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            )
        };
        let mut explicit: Vec<String> = Vec::new();
        for id in [
            "state",
            "tenant",
            "compression_level",
            "store",
            "store_config",
        ] {
            if given(&matches, id) {
                explicit.push(id.into());
            }
        }
        if let Some((_, sub)) = matches.subcommand() {
            for id in ["janitor_every", "janitor_min_age"] {
                if sub.try_contains_id(id).unwrap_or(false) && given(sub, id) {
                    explicit.push(id.into());
                }
            }
        }
        cli.explicit = explicit;
        cli
    }

    /// Whether the argument `id` was given.
    pub fn given(&self, id: &str) -> bool {
        self.explicit.iter().any(|e| e == id)
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Checkpoint a source and publish it as the database's next generation.
    Checkpoint {
        /// Database name.
        #[arg(long)]
        db: String,
        /// The SQLite file, page file or segment directory.
        #[arg(long)]
        source: PathBuf,
        /// sqlite, pages or segments.
        #[arg(long)]
        kind: SourceKind,
        /// Page size of a `pages` source.
        #[arg(long, default_value_t = 4096)]
        page_size: u32,
        /// Chunk size of page sources, in bytes.
        #[arg(long, default_value_t = cairn_orchestrator::DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
        /// The LSN of the engine's WAL this page checkpoint covers (sqlite, pages).
        #[arg(long)]
        lsn: Option<u64>,
        /// For segments: a file of `NAME START END` lines giving each segment file's LSN
        /// range, for an engine whose LSNs are not byte offsets (default: byte offsets in
        /// name order).
        #[arg(long)]
        ranges: Option<PathBuf>,
    },
    /// Replicate a live SQLite database continuously (its WAL as segments, at least once
    /// per interval; page generations as the WAL grows) until SIGINT or SIGTERM.
    Replicate {
        /// Run every database of this service configuration file (TOML: databases of
        /// any kind with their schedules and retention, quotas, janitor, listen address;
        /// see the README) instead of the one given by --db and --source.
        #[arg(long, conflicts_with_all = ["db", "source"], required_unless_present_all = ["db", "source"])]
        config: Option<PathBuf>,
        /// Database name.
        #[arg(long, requires = "source")]
        db: Option<String>,
        /// The SQLite file (in WAL mode).
        #[arg(long, requires = "db")]
        source: Option<PathBuf>,
        /// Time between shipping steps: the loss window for a store that keeps up.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        interval: std::time::Duration,
        /// Write a page generation once this many bytes of WAL were shipped since the last.
        #[arg(long, default_value_t = 256 << 20)]
        page_every_bytes: u64,
        /// ... or once this long passed since the last one.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
        page_every: std::time::Duration,
        /// Reset the WAL (checkpoint TRUNCATE) once its file passes this many bytes.
        #[arg(long, default_value_t = 64 << 20)]
        wal_limit: u64,
        /// How often the janitor removes the scratch of jobs that will not run again.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
        janitor_every: std::time::Duration,
        /// ... once nothing in it changed for this long.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        janitor_min_age: std::time::Duration,
        /// Serve /metrics (Prometheus), /health and /ready on this address, e.g.
        /// 127.0.0.1:9090 (port 0: any free port; the address is printed on stderr).
        #[arg(long)]
        listen: Option<String>,
        /// /ready fails once replication lags more than this [default: 10s, or three
        /// intervals if longer].
        #[arg(long, value_parser = humantime::parse_duration)]
        lag_bound: Option<std::time::Duration>,
        /// The longest wait between retries of failed steps.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        max_backoff: std::time::Duration,
    },
    /// Restore a generation (the latest by default), or a point of the WAL, to a path.
    /// A database shipped by `cairn replicate` restores to one SQLite file: its newest
    /// shipped commit, or the one at --lsn or --time.
    Restore {
        /// Database name.
        #[arg(long)]
        db: String,
        /// Generation to restore [default: latest].
        #[arg(long, conflicts_with = "lsn")]
        generation: Option<u64>,
        /// Restore to this LSN: for a replicated SQLite database, the file as of the last
        /// transaction at or below it; for other engines, DIR/pages (the newest page
        /// checkpoint at or below it) and DIR/wal/ (the segments to replay from it).
        #[arg(long, conflicts_with = "time")]
        lsn: Option<u64>,
        /// Replicated SQLite only: the file as of the newest transaction shipped at or
        /// before this time (RFC 3339 in UTC, e.g. 2026-12-02T18:00:00Z).
        #[arg(long)]
        time: Option<String>,
        /// Where to write the database file, segment directory or point directory.
        #[arg(long)]
        to: PathBuf,
        /// Replace what is at --to (otherwise anything there but an empty directory is
        /// refused).
        #[arg(long)]
        force: bool,
    },
    /// Check that every blob of a generation exists (and with --deep, is intact).
    Verify {
        /// Database name.
        #[arg(long)]
        db: String,
        /// Generation to verify [default: latest].
        #[arg(long)]
        generation: Option<u64>,
        /// Re-read every blob and re-check its checksums; for SQLite, also restore to
        /// scratch and run PRAGMA integrity_check.
        #[arg(long)]
        deep: bool,
    },
    /// List a database's generations (or, without --db, the databases in the store).
    /// Reads the state read-only, so it works while `cairn replicate` runs.
    Ls {
        /// Database name.
        #[arg(long)]
        db: Option<String>,
    },
    /// How far the engine may delete its local WAL: the watermark and the leases in force.
    Watermark {
        /// Database name.
        #[arg(long)]
        db: String,
    },
    /// Lease a range of the WAL: the watermark does not pass its start until it is
    /// released or expires.
    Lease {
        /// Database name.
        #[arg(long)]
        db: String,
        /// First LSN held.
        #[arg(long)]
        start: u64,
        /// One past the last LSN held.
        #[arg(long)]
        end: u64,
        /// How long it lasts, e.g. 60s, 10m.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Release a lease.
    Release {
        /// Database name.
        #[arg(long)]
        db: String,
        /// The lease's id (16 hex digits).
        #[arg(long)]
        lease: String,
    },
    /// Drop published WAL segments from the head (below an LSN) or the tail (past one).
    Truncate {
        /// Database name.
        #[arg(long)]
        db: String,
        /// Drop the segments that end at or below this LSN.
        #[arg(
            long,
            conflicts_with = "tail_after",
            required_unless_present = "tail_after"
        )]
        head_before: Option<u64>,
        /// Drop the segments past this LSN (a segment boundary).
        #[arg(long)]
        tail_after: Option<u64>,
        /// How long a head truncation waits for leases that overlap it.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        timeout: std::time::Duration,
        /// Cancel the jobs holding overlapping leases instead of waiting.
        #[arg(long)]
        cancel: bool,
        /// Truncate even if the newest state becomes unrestorable (head) or published
        /// state past the point is dropped (tail).
        #[arg(long)]
        force: bool,
    },
    /// Apply a retention policy and delete the blobs nothing uses.
    Gc {
        /// Database name.
        #[arg(long)]
        db: String,
        /// Keep the newest N data generations.
        #[arg(long)]
        keep_last: Option<u64>,
        /// Keep data generations younger than this, e.g. 7d.
        #[arg(long, value_parser = humantime::parse_duration)]
        keep_within: Option<std::time::Duration>,
        /// Keep unreferenced blobs younger than this by the store's clock.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        grace: std::time::Duration,
        /// Decide and report; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// List every kept blob with the reason it is kept.
        #[arg(long)]
        explain: bool,
    },
    /// Pin a generation: garbage collection keeps it until it is unpinned.
    Pin {
        /// Database name.
        #[arg(long)]
        db: String,
        /// The generation.
        #[arg(long)]
        generation: u64,
        /// A note kept with the pin.
        #[arg(long)]
        note: Option<String>,
    },
    /// Remove a pin.
    Unpin {
        /// Database name.
        #[arg(long)]
        db: String,
        /// The generation.
        #[arg(long)]
        generation: u64,
    },
    /// List jobs with kind, database, state, phase, progress, attempts and last error.
    /// Reads the state read-only, so it works while `cairn replicate` runs; like ls, it
    /// does not resume unfinished jobs first.
    Status,
    /// Run unfinished jobs now (every other command but status and ls also runs them
    /// first).
    Resume,
    /// Run the end-to-end demonstration on the embedded default store.
    Demo {
        /// Directory to work in [default: a fresh directory under the system temp dir].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Rows of the demo's orders table.
        #[arg(long, default_value_t = 120_000)]
        rows: u64,
    },
}

/// The format of log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}
