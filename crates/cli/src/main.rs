//! `cairn`: the operator's command line over the Cairn library. Every subcommand is a thin
//! shell around a `Checkpointer` call; all logic lives in the library crates.

mod args;
mod demo;
mod http;
mod memory;
mod output;
mod progress;
mod replicate;
mod service;
mod wal;

use std::process::ExitCode;

use args::{Cli, Cmd, LogFormat};
use cairn_core::{DbId, Generation, Lsn, SourceKind, TenantId};
use cairn_orchestrator::{
    CairnError, CheckpointOptions, Checkpointer, Config, HeadOptions, RestoreOptions, Source,
};

fn main() -> ExitCode {
    // Everything Cairn creates (state, scratch, spool, the local store, restored files)
    // is the operator's alone: files 0600, directories 0700. A local store holds a full
    // copy of the database.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse_noting_explicit();
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

/// `from_file` unless the argument `id` was given (then `given`).
fn pick<T>(cli: &Cli, id: &str, given: T, from_file: T) -> T {
    if cli.given(id) {
        given
    } else {
        from_file
    }
}

/// The settings of a service: the command line's, with the file's where the command line
/// gave none, and the file's quotas.
fn service_config(cli: &Cli, f: &service::config::ServiceFile) -> Result<Config, CairnError> {
    let state = match &f.state {
        Some(s) if !cli.given("state") => s.clone(),
        _ => cli.state.clone(),
    };
    let mut cfg = Config::new(state)?;
    let tenant = match &f.tenant {
        Some(t) if !cli.given("tenant") => t.clone(),
        _ => cli.tenant.clone(),
    };
    cfg.tenant = TenantId::new(tenant)?;
    cfg.store_url = cli.store.clone().or_else(|| f.store.clone());
    cfg.store_config = cli.store_config.clone().or_else(|| f.store_config.clone());
    cfg.single_writer = cli.single_writer;
    let level = match f.compression_level {
        Some(l) if !cli.given("compression_level") => l,
        _ => cli.compression_level,
    };
    cfg.compression_level = (level != 0).then_some(level);
    if let Some(b) = f.quota.scratch {
        cfg.scratch_limit = b.0;
    }
    cfg.tenant_scratch_limit = f.quota.tenant_scratch.map(|b| b.0);
    cfg.job_scratch_limit = f.quota.job_scratch.map(|b| b.0);
    if let Some(b) = f.quota.cache {
        cfg.cache_limit = b.0;
    }
    cfg.tenant_cache_limit = f.quota.tenant_cache.map(|b| b.0);
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
            config: Some(file),
            listen,
            janitor_every,
            janitor_min_age,
            ..
        } => {
            let f = service::config::read(file)?;
            let cp = std::sync::Arc::new(open(service_config(&cli, &f)?).await?);
            let opts = service::ServiceOptions {
                listen: listen.clone().or(f.listen.clone()),
                janitor: replicate::Janitor {
                    every: pick(&cli, "janitor_every", *janitor_every, f.janitor.every),
                    min_age: pick(&cli, "janitor_min_age", *janitor_min_age, f.janitor.min_age),
                },
                supervise: true,
            };
            let reports = service::run(cp, f.plans.clone(), &opts).await?;
            service::print_reports(json, false, &reports);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Replicate {
            config: None,
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
            let (Some(db), Some(source)) = (db, source) else {
                return Err(CairnError::Config {
                    what: "cairn replicate".into(),
                    reason: "give --config FILE, or --db NAME and --source FILE".into(),
                });
            };
            let cp = std::sync::Arc::new(open(config(&cli)?).await?);
            let plan = service::config::DbPlan {
                name: DbId::new(db.clone())?.to_string(),
                kind: SourceKind::Sqlite,
                source: source.clone(),
                plan: service::config::Plan::Sqlite(cairn_orchestrator::ReplicateOptions {
                    interval: *interval,
                    page_every_bytes: *page_every_bytes,
                    page_every: *page_every,
                    wal_limit: *wal_limit,
                    max_backoff: *max_backoff,
                }),
                lag_bound: lag_bound.unwrap_or_else(|| replicate::default_lag_bound(*interval)),
                gc: None,
            };
            if !json {
                eprintln!(
                    "replicating {} as {db} every {interval:?} (Ctrl-C or SIGTERM stops)",
                    source.display()
                );
            }
            let opts = service::ServiceOptions {
                listen: listen.clone(),
                janitor: replicate::Janitor {
                    every: *janitor_every,
                    min_age: *janitor_min_age,
                },
                supervise: false,
            };
            let reports = service::run(cp, vec![plan], &opts).await?;
            service::print_reports(json, true, &reports);
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
            // Read-only, beside a running service, resuming nothing (decision 0028).
            let cp = Checkpointer::open_read_only(config(&cli)?)?;
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
            // Read-only, beside a running service (decision 0028).
            let cp = Checkpointer::open_read_only(config(&cli)?)?;
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
