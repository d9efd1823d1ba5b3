//! `rclone` (Debian's package) as a reference client for benchmarks against the local S3
//! server: configured entirely through `RCLONE_CONFIG_<REMOTE>_*` variables, so it needs no
//! config file and touches none.
//!
//! `AWS_CA_BUNDLE` is removed from rclone's environment: with it set (as it is on some
//! development machines), rclone 1.60 refuses to start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A runnable `rclone` pointed at one S3 endpoint as the remote `moto:`.
#[derive(Debug)]
pub struct Rclone {
    endpoint: String,
    config: PathBuf,
    version: String,
}

impl Rclone {
    /// Finds `rclone` and configures it for `endpoint` (dummy credentials). The reason it is
    /// unusable, as a sentence, if it is missing or does not start.
    pub fn find(endpoint: &str, scratch: &Path) -> Result<Self, String> {
        let config = scratch.join("rclone.conf");
        std::fs::write(&config, "")
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let me = Self {
            endpoint: endpoint.to_owned(),
            config,
            version: String::new(),
        };
        let out = me
            .cmd()
            .arg("version")
            .output()
            .map_err(|e| format!("rclone not found ({e}; apt-get install rclone)"))?;
        if !out.status.success() {
            return Err(format!(
                "rclone does not start: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let version = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap_or("?")
            .to_owned();
        Ok(Self { version, ..me })
    }

    /// `rclone`'s version, e.g. `v1.60.1-DEV`.
    pub fn version(&self) -> &str {
        &self.version
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("rclone");
        c.env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_CONFIG", &self.config)
            .env("RCLONE_CONFIG_MOTO_TYPE", "s3")
            .env("RCLONE_CONFIG_MOTO_PROVIDER", "Other")
            .env("RCLONE_CONFIG_MOTO_ENDPOINT", &self.endpoint)
            .env("RCLONE_CONFIG_MOTO_ACCESS_KEY_ID", "test")
            .env("RCLONE_CONFIG_MOTO_SECRET_ACCESS_KEY", "test")
            .env("RCLONE_CONFIG_MOTO_REGION", "us-east-1")
            .env("RCLONE_CONFIG_MOTO_FORCE_PATH_STYLE", "true");
        c
    }

    /// `rclone copyto <from> <to>` with `streams` parallel streams per file (multi-thread
    /// transfers from 1 MiB on); returns the wall time. Remote paths are `moto:bucket/key`.
    pub fn copyto(&self, from: &str, to: &str, streams: usize) -> Result<Duration, String> {
        let t = Instant::now();
        let out = self
            .cmd()
            .arg("copyto")
            .arg(from)
            .arg(to)
            .arg("--multi-thread-streams")
            .arg(streams.to_string())
            .arg("--multi-thread-cutoff")
            .arg("1M")
            .arg("--s3-upload-concurrency")
            .arg(streams.to_string())
            .output()
            .map_err(|e| format!("cannot run rclone: {e}"))?;
        let took = t.elapsed();
        if !out.status.success() {
            return Err(format!(
                "rclone copyto {from} {to}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(took)
    }
}
