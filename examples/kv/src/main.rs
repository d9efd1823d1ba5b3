//! `cairn-kv`: run the example engine's workload against a Cairn store, restore it to an
//! LSN on a fresh state directory, dump a data directory, or show its status.
//!
//! Every command prints JSON on stdout (`run`: one event per line); errors go to stderr
//! with exit code 1. The store comes from `--store` (S3 settings from the standard
//! `AWS_*` environment, as for the `cairn` command); by default `file://<state>/store`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use cairn_kv::driver::{self, Schedule};
use cairn_kv::replica::Replica;
use cairn_kv::{Kv, KvError, Options, Workload};
use cairn_orchestrator::{CairnError, Checkpointer, Config, DbId};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(name = "cairn-kv", about = "The example key-value engine on Cairn")]
struct Cli {
    /// The engine's data directory.
    #[arg(
        long,
        global = true,
        env = "CAIRN_KV_DATA",
        default_value = "./kv-data"
    )]
    data: PathBuf,
    /// Cairn's state directory.
    #[arg(long, global = true, env = "CAIRN_STATE", default_value = "./.cairn")]
    state: PathBuf,
    /// The store URL (default `file://<state>/store`).
    #[arg(long, global = true, env = "CAIRN_STORE")]
    store: Option<String>,
    /// The database name in the store.
    #[arg(long, global = true, default_value = "kv")]
    db: String,
    /// Data pages of a new database.
    #[arg(long, global = true, default_value_t = 512)]
    pages: u32,
    /// Seal the active WAL file once it holds this many bytes.
    #[arg(long, global = true, default_value_t = 64 * 1024)]
    segment_size: u64,
    /// Cairn's chunk size for the page file (a multiple of 4096).
    #[arg(long, global = true, default_value_t = 256 * 1024)]
    chunk_size: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Commit the workload's batches until `--until` are committed, replicating on the
    /// schedule; prints one JSON event per line.
    Run {
        /// The workload's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Stop once this many batches are committed.
        #[arg(long)]
        until: u64,
        /// Keys in the workload.
        #[arg(long, default_value_t = 2000)]
        keys: u32,
        /// Take a page checkpoint once this much WAL follows the page file's LSN
        /// (default: 4 segments).
        #[arg(long)]
        checkpoint_bytes: Option<u64>,
        /// Page checkpoints whose WAL the store keeps.
        #[arg(long, default_value_t = 2)]
        retain: usize,
    },
    /// Restore the database to LSN `--lsn` into a new data directory `--to`.
    Restore {
        /// A record boundary.
        #[arg(long)]
        lsn: u64,
        /// The new data directory.
        #[arg(long)]
        to: PathBuf,
    },
    /// Print the state of `--data`: counts, and with `--entries` every entry (hex).
    Dump {
        /// Every key and value.
        #[arg(long)]
        entries: bool,
    },
    /// Print the local WAL and Cairn's watermark.
    Status,
}

fn config(cli: &Cli) -> Result<Config, KvError> {
    let mut cfg = Config::new(&cli.state)?;
    cfg.store_url = cli.store.clone();
    cfg.chunk_size = cli.chunk_size;
    Ok(cfg)
}

fn options(cli: &Cli) -> Options {
    Options {
        data_pages: cli.pages,
        segment_size: cli.segment_size,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn print(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (the reader went away) is not the engine's failure.
    let _ = writeln!(out, "{v}");
}

async fn run(cli: Cli) -> Result<(), KvError> {
    let db = DbId::new(cli.db.clone()).map_err(CairnError::from)?;
    match &cli.cmd {
        Cmd::Run {
            seed,
            until,
            keys,
            checkpoint_bytes,
            retain,
        } => {
            let mut kv = Kv::open(&cli.data, &options(&cli))?;
            let (mut rep, resumed) = Replica::open(config(&cli)?, db).await?;
            for r in resumed.iter().filter(|r| r.error.is_some()) {
                eprintln!("resumed job {} did not complete: {:?}", r.job, r.error);
            }
            let o = kv.opened().clone();
            let ev = driver::Event::Recovered {
                next_seq: kv.next_seq(),
                lsn: kv.lsn(),
                flushed_lsn: o.flushed_lsn,
                replayed: o.wal.replayed,
                torn_bytes: o.wal.torn_bytes,
                repaired_flush: o.repaired_flush,
                resumed: resumed.len() as u64,
                wal_bytes: kv.wal().local_bytes(),
            };
            let mut emit = |e: &driver::Event| print(&json!(e));
            emit(&ev);
            let s = Schedule {
                workload: Workload {
                    seed: *seed,
                    keys: *keys,
                },
                until: *until,
                checkpoint_bytes: checkpoint_bytes.unwrap_or(4 * cli.segment_size),
                retain: *retain,
            };
            driver::run(&mut kv, &mut rep, &s, &mut emit).await
        }
        Cmd::Restore { lsn, to } => {
            let cp = Checkpointer::open(config(&cli)?)?;
            cp.resume().await?;
            let r = cairn_kv::restore::restore(&cp, &db, *lsn, to, cli.pages).await?;
            print(&json!({
                "lsn": r.lsn,
                "page_lsn": r.page_lsn,
                "page_generation": r.page_generation,
                "segments": r.segments,
                "replayed": r.replayed,
                "next_seq": r.next_seq,
                "to": to.display().to_string(),
            }));
            Ok(())
        }
        Cmd::Dump { entries } => {
            let kv = Kv::open(&cli.data, &options(&cli))?;
            let all = kv.entries();
            let mut v = json!({
                "next_seq": kv.next_seq(),
                "lsn": kv.lsn(),
                "flushed_lsn": kv.flushed_lsn(),
                "keys": all.len(),
                "digest": format!("{:016x}", digest(&all)),
            });
            if *entries {
                v["entries"] = all.iter().map(|(k, v)| json!([hex(k), hex(v)])).collect();
            }
            print(&v);
            Ok(())
        }
        Cmd::Status => {
            let kv = Kv::open(&cli.data, &options(&cli))?;
            let cp = Checkpointer::open(config(&cli)?)?;
            let w = cp.watermark(&db).await?;
            let sealed: Vec<_> = kv
                .wal()
                .sealed()
                .iter()
                .map(|s| json!({"name": s.name, "start": s.start, "end": s.end()}))
                .collect();
            print(&json!({
                "next_seq": kv.next_seq(),
                "lsn": kv.lsn(),
                "flushed_lsn": kv.flushed_lsn(),
                "wal_bytes": kv.wal().local_bytes(),
                "sealed": sealed,
                "watermark": w,
            }));
            Ok(())
        }
    }
}

/// xxh3 over the sorted entries (length-prefixed), a fingerprint of the state.
fn digest(entries: &[(&[u8], &[u8])]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (k, v) in entries {
        h.update(&(k.len() as u64).to_le_bytes());
        h.update(k);
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v);
    }
    h.digest()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every message already carries its cause.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
