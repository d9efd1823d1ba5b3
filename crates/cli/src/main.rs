//! `cairn`: the operator's command line over the Cairn library. Every subcommand is a thin
//! shell around a `Checkpointer` call; all logic lives in the library crates.

mod demo;
mod http;
mod output;
mod progress;
mod replicate;
mod wal;

use std::path::PathBuf;
use std::process::ExitCode;

use cairn_core::{DbId, Generation, Lsn, SourceKind, TenantId};
use cairn_orchestrator::{
    CairnError, CheckpointOptions, Checkpointer, Config, HeadOptions, ReplicateOptions,
    RestoreOptions, Source,
};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cairn",
    version,
    about = "Content-addressed checkpoints of storage engines into object storage"
)]
struct Cli {
    /// Object store URL: file:///abs/dir, s3://bucket/prefix or memory://name
    /// (default: `file://<state>/store`)
    #[arg(long, global = true, env = "CAIRN_STORE")]
    store: Option<String>,
    /// State directory (local catalog, job state, scratch).
    #[arg(long, global = true, env = "CAIRN_STATE", default_value = "./.cairn")]
    state: PathBuf,
    /// Tenant the databases belong to.
    #[arg(long, global = true, default_value = "default")]
    tenant: String,
    /// Store configuration file (TOML or JSON: part sizes, retries, limits, S3 settings)
    #[arg(long, global = true, env = "CAIRN_STORE_CONFIG")]
    store_config: Option<PathBuf>,
    /// Publish without the conditional-create check, for stores that ignore conditional
    /// writes: the operator guarantees one writer per database (see docs/decisions)
    #[arg(long, global = true)]
    single_writer: bool,
    /// Log lines on stderr as `text` (colours only on a terminal) or one JSON object per
    /// line (`json`). The level comes from `CAIRN_LOG` (default `warn`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// zstd level for the blobs a checkpoint writes (0: store them uncompressed).
    #[arg(
        long,
        global = true,
        default_value_t = 3,
        allow_negative_numbers = true
    )]
    compression_level: i32,
    /// Print one JSON document on stdout instead of a human report.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
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
        /// Database name.
        #[arg(long)]
        db: String,
        /// The SQLite file (in WAL mode).
        #[arg(long)]
        source: PathBuf,
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
    /// (The only command that does not resume unfinished jobs first.)
    Status,
    /// Run unfinished jobs now (every other command also runs them first).
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
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn main() -> ExitCode {
    // Everything Cairn creates (state, scratch, spool, the local store, restored files)
    // is the operator's alone: files 0600, directories 0700. A local store holds a full
    // copy of the database.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// clap enforces one of --head-before and --tail-after; this names the case anyway.
fn unreachable_args() -> Result<cairn_orchestrator::TruncateReport, CairnError> {
    Err(CairnError::Config {
        what: "cairn truncate".into(),
        reason: "give --head-before or --tail-after".into(),
    })
}

fn config(cli: &Cli) -> Result<Config, CairnError> {
    let mut cfg = Config::new(&cli.state)?;
    cfg.tenant = TenantId::new(cli.tenant.clone())?;
    cfg.store_url = cli.store.clone();
    cfg.store_config = cli.store_config.clone();
    cfg.single_writer = cli.single_writer;
    cfg.compression_level = (cli.compression_level != 0).then_some(cli.compression_level);
    Ok(cfg)
}

/// Opens the checkpointer and finishes interrupted jobs, reporting each on stderr.
async fn open(cfg: Config) -> Result<Checkpointer, CairnError> {
    let cp = Checkpointer::open(cfg)?;
    for (id, r) in cp.resume().await? {
        match r {
            Ok(out) => eprintln!("resumed job {id}: {}", output::outcome(&out)),
            Err(e) => eprintln!("resumed job {id} did not complete: {e}"),
        }
    }
    Ok(cp)
}

async fn run(cli: Cli) -> Result<ExitCode, CairnError> {
    let json = cli.json;
    match &cli.cmd {
        Cmd::Checkpoint {
            db,
            source,
            kind,
            page_size,
            chunk_size,
            lsn,
            ranges,
        } => {
            let mut cfg = config(&cli)?;
            cfg.chunk_size = *chunk_size;
            let cp = open(cfg).await?;
            let src = match kind {
                SourceKind::Sqlite => Source::Sqlite(source.clone()),
                SourceKind::Pages => Source::Pages {
                    path: source.clone(),
                    page_size: *page_size,
                },
                SourceKind::Segments => Source::Segments(source.clone()),
            };
            let opts = CheckpointOptions {
                lsn: lsn.map(Lsn),
                segment_lsns: ranges.as_deref().map(wal::read_ranges).transpose()?,
                ..Default::default()
            };
            let run = cp.checkpoint_with(&DbId::new(db.clone())?, &src, &opts);
            let r = progress::show("checkpoint", json, run.progress(), run).await?;
            output::checkpoint(json, &r);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore {
            db,
            generation,
            lsn,
            time,
            to,
            force,
        } => {
            let cp = open(config(&cli)?).await?;
            let db = DbId::new(db.clone())?;
            let time = time.as_deref().map(replicate::parse_time).transpose()?;
            if time.is_some()
                || cp
                    .is_replicated_sqlite(&db, generation.map(Generation))
                    .await?
            {
                let point = (*lsn, time);
                replicate::restore(&cp, &db, *generation, point, to, *force, json).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let opts = RestoreOptions {
                generation: generation.map(Generation),
                lsn: lsn.map(Lsn),
                overwrite: *force,
            };
            let run = cp.restore_job(&db, to, &opts);
            let r = progress::show("restore", json, run.progress(), run).await?;
            output::restore(json, &r);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Replicate {
            db,
            source,
            interval,
            page_every_bytes,
            page_every,
            wal_limit,
            janitor_every,
            janitor_min_age,
            listen,
            lag_bound,
            max_backoff,
        } => {
            let cp = std::sync::Arc::new(open(config(&cli)?).await?);
            let opts = ReplicateOptions {
                interval: *interval,
                page_every_bytes: *page_every_bytes,
                page_every: *page_every,
                wal_limit: *wal_limit,
                max_backoff: *max_backoff,
            };
            let listen = listen.as_ref().map(|addr| replicate::Listen {
                addr: addr.clone(),
                lag_bound: lag_bound.unwrap_or_else(|| replicate::default_lag_bound(*interval)),
            });
            let janitor = replicate::Janitor {
                every: *janitor_every,
                min_age: *janitor_min_age,
            };
            let db = DbId::new(db.clone())?;
            replicate::run(cp, &db, source, &opts, listen.as_ref(), janitor, json).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Watermark { db } => {
            let cp = open(config(&cli)?).await?;
            wal::watermark(json, &cp.watermark(&DbId::new(db.clone())?).await?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Lease {
            db,
            start,
            end,
            ttl,
        } => {
            let cp = open(config(&cli)?).await?;
            let l = cp.lease(&DbId::new(db.clone())?, Lsn(*start)..Lsn(*end), *ttl)?;
            wal::leased(json, l.lease());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Release { db, lease } => {
            let cp = open(config(&cli)?).await?;
            let db = DbId::new(db.clone())?;
            cp.release(&db, wal::lease_id(&db, lease)?)?;
            wal::released(json, lease);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Truncate {
            db,
            head_before,
            tail_after,
            timeout,
            cancel,
            force,
        } => {
            let cp = open(config(&cli)?).await?;
            let db = DbId::new(db.clone())?;
            let r = match (head_before, tail_after) {
                (Some(before), _) => {
                    let opts = HeadOptions {
                        timeout: *timeout,
                        cancel: *cancel,
                        force: *force,
                    };
                    cp.truncate_head(&db, Lsn(*before), &opts).await?
                }
                (None, Some(after)) => cp.truncate_tail(&db, Lsn(*after), *force).await?,
                (None, None) => unreachable_args()?,
            };
            wal::truncated(json, &r);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify {
            db,
            generation,
            deep,
        } => {
            let cp = open(config(&cli)?).await?;
            let run = cp.verify_job(&DbId::new(db.clone())?, generation.map(Generation), *deep);
            let r = progress::show("verify", json, run.progress(), run).await?;
            output::verify(json, &r);
            Ok(if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Ls { db } => {
            let cp = open(config(&cli)?).await?;
            match db {
                Some(db) => output::generations(json, &cp.list(&DbId::new(db.clone())?).await?),
                None => output::databases(json, &cp.databases().await?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gc {
            db,
            keep_last,
            keep_within,
            grace,
            dry_run,
            explain,
        } => {
            let cp = open(config(&cli)?).await?;
            let opts = cairn_orchestrator::GcOptions {
                keep_last: *keep_last,
                keep_within: *keep_within,
                grace: *grace,
                dry_run: *dry_run,
                explain: *explain,
            };
            let run = cp.gc_job(&DbId::new(db.clone())?, &opts);
            output::gc(
                json,
                &progress::show("gc", json, run.progress(), run).await?,
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pin {
            db,
            generation,
            note,
        } => {
            let cp = open(config(&cli)?).await?;
            let p = cp
                .pin(
                    &DbId::new(db.clone())?,
                    Generation(*generation),
                    note.clone(),
                )
                .await?;
            wal::pinned(json, &p);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Unpin { db, generation } => {
            let cp = open(config(&cli)?).await?;
            cp.unpin(&DbId::new(db.clone())?, Generation(*generation))
                .await?;
            wal::unpinned(json, *generation);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status => {
            let cp = Checkpointer::open(config(&cli)?)?;
            output::status(json, &cp.jobs()?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Resume => {
            let cp = Checkpointer::open(config(&cli)?)?;
            let results = cp.resume().await?;
            let failed = results.iter().filter(|(_, r)| r.is_err()).count();
            output::resumed(json, &results);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Demo { dir, rows } => {
            let ok = demo::run(dir.clone(), *rows, json).await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
