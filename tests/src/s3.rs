//! A real S3 server (moto) on 127.0.0.1 for end-to-end tests.
//!
//! [`S3Server::start`] finds `moto_server` (`$CAIRN_MOTO_SERVER`, else
//! `$HOME/.cache/cairn/moto-venv/bin/moto_server`, creating that venv on first use), starts it
//! on a free port, waits until it answers and creates a bucket with a unique name. Each test
//! gets its own server process and bucket; the server is killed when the value is dropped.
//!
//! The venv is built at most once per machine: creators take an exclusive lock on
//! `$HOME/.cache/cairn/moto-venv.lock` (the same one `scripts/deps` uses) and re-check after
//! taking it, so concurrent test processes (nextest runs one per test) wait for one builder.
//! A venv counts as ready only when `bin/moto_server` and the `.cairn-ready` marker (written
//! after pip succeeded) both exist, so an interrupted build is repaired by the next one.
//!
//! moto does not check signatures, so the harness itself speaks plain HTTP/1.1 over a
//! `TcpStream` ([`S3Server::request`]); clients under test use [`S3Server::env`]. moto does
//! treat a request *without* an `Authorization` header as anonymous (and refuses, e.g.,
//! overwriting an object with 403), so raw requests carry a dummy SigV4 header.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a freshly spawned server gets to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of each connect/read/write of [`S3Server::request`].
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Ports are picked by binding port 0 and releasing it; another process may take the port
/// before moto binds it, in which case we try again with a new one.
const PORT_ATTEMPTS: usize = 3;
const READY_MARKER: &str = ".cairn-ready";
/// Signed-looking but unverified credentials (moto does not check signatures).
const DUMMY_AUTHORIZATION: &str = "Authorization: AWS4-HMAC-SHA256 \
    Credential=test/20240101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\n";

/// Why the S3 test server could not be provided; the message says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Error(pub String);

impl fmt::Display for S3Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for S3Error {}

fn err(message: impl Into<String>) -> S3Error {
    S3Error(message.into())
}

/// A raw HTTP response from [`S3Server::request`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code, e.g. 200 or 412.
    pub status: u16,
    /// Header lines, names as sent by the server.
    pub headers: Vec<(String, String)>,
    /// Body, lossily decoded (S3 answers in XML).
    pub body: String,
}

/// A running moto S3 server with one bucket; killed on drop.
pub struct S3Server {
    endpoint: String,
    addr: SocketAddr,
    bucket: String,
    child: Child,
    log: PathBuf,
    // Holds the log file; removed on drop.
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server on 127.0.0.1 and creates a uniquely named bucket in it.
    pub fn start() -> Result<S3Server, S3Error> {
        let moto = moto_server()?;
        let dir = tempfile::Builder::new()
            .prefix("cairn-moto-")
            .tempdir()
            .map_err(|e| err(format!("cannot create a temp dir for the moto log: {e}")))?;
        let mut last = err("moto_server was not started");
        for attempt in 1..=PORT_ATTEMPTS {
            let log = dir.path().join(format!("moto-{attempt}.log"));
            match spawn(&moto, &log) {
                Ok((child, addr)) => {
                    let mut server = S3Server {
                        endpoint: format!("http://{addr}"),
                        addr,
                        bucket: unique_bucket_name(),
                        child,
                        log,
                        _dir: dir,
                    };
                    server.create_bucket()?;
                    return Ok(server);
                }
                Err((e, port_taken)) => {
                    last = e;
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The server's socket address (for a proxy in front of it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bucket created for this server.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `s3://<bucket>/<prefix>` (a leading `/` of `prefix` is dropped).
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_start_matches('/'))
    }

    /// Environment a client needs to reach this server (dummy credentials).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// `cfg` with this server's endpoint, region and (dummy) credentials in its `[s3]`
    /// settings, so a store reaches the server without touching the process environment.
    pub fn store_config(
        &self,
        cfg: cairn_remote_store::StoreConfig,
    ) -> cairn_remote_store::StoreConfig {
        s3_config(self.endpoint(), "test", "test", cfg)
    }

    /// Opens `s3://<bucket>/<prefix>` on this server with `cfg`'s tunables.
    pub fn open_store(
        &self,
        prefix: &str,
        cfg: cairn_remote_store::StoreConfig,
    ) -> Result<cairn_remote_store::RemoteStore, cairn_remote_store::StoreError> {
        cairn_remote_store::RemoteStore::open_with(&self.url(prefix), self.store_config(cfg))
    }

    /// Adds [`S3Server::env`] to a command's environment.
    pub fn apply_env<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.envs(self.env())
    }

    /// The server's log file (one line per request).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Sends one raw HTTP/1.1 request (path-style, unsigned) and reads the whole response.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<HttpResponse, S3Error> {
        http(self.addr, method, path, headers, body)
    }

    fn create_bucket(&mut self) -> Result<(), S3Error> {
        let path = format!("/{}", self.bucket);
        let resp = self.request("PUT", &path, &[], b"")?;
        if resp.status != 200 {
            return Err(err(format!(
                "creating bucket {} on {} returned HTTP {}: {}\nmoto log:\n{}",
                self.bucket,
                self.endpoint,
                resp.status,
                resp.body,
                self.log_tail()
            )));
        }
        Ok(())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl fmt::Debug for S3Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Server")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("pid", &self.child.id())
            .finish()
    }
}

/// `cfg` pointed at an S3-compatible `endpoint` with explicit credentials (any server:
/// moto here, MinIO in a container).
pub fn s3_config(
    endpoint: &str,
    access_key_id: &str,
    secret_access_key: &str,
    mut cfg: cairn_remote_store::StoreConfig,
) -> cairn_remote_store::StoreConfig {
    use cairn_remote_store::Secret;
    cfg.s3.endpoint = Some(endpoint.to_owned());
    cfg.s3.region = Some("us-east-1".to_owned());
    cfg.s3.access_key_id = Some(Secret::new(access_key_id));
    cfg.s3.secret_access_key = Some(Secret::new(secret_access_key));
    cfg
}

/// Spawns moto on a free port and waits until it answers. On failure, says whether the port
/// was taken by someone else (worth another attempt).
fn spawn(moto: &Path, log: &Path) -> Result<(Child, SocketAddr), (S3Error, bool)> {
    let fail = |m: String| (err(m), false);
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| fail(format!("cannot find a free port on 127.0.0.1: {e}")))?
        .port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let out =
        File::create(log).map_err(|e| fail(format!("cannot create {}: {e}", log.display())))?;
    let errout = out
        .try_clone()
        .map_err(|e| fail(format!("cannot dup the log file handle: {e}")))?;
    let mut child = Command::new(moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(errout)
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", moto.display())))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let tail = log_tail(log);
                let taken = tail.contains("Address already in use");
                let msg = format!(
                    "{} exited with {status} before answering on {addr}\nmoto log:\n{tail}",
                    moto.display()
                );
                return Err((err(msg), taken));
            }
            Ok(None) => {}
            Err(e) => return Err(fail(format!("cannot poll moto_server: {e}"))),
        }
        if matches!(http(addr, "GET", "/", &[], b""), Ok(r) if r.status == 200) {
            return Ok((child, addr));
        }
        if start.elapsed() > START_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let msg = format!(
                "{} did not answer on {addr} within {START_TIMEOUT:?}\nmoto log:\n{}",
                moto.display(),
                log_tail(log)
            );
            return Err(fail(msg));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Path of a runnable `moto_server`, building the cached venv if needed.
fn moto_server() -> Result<PathBuf, S3Error> {
    if let Some(path) = std::env::var_os("CAIRN_MOTO_SERVER").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(err(format!(
                "CAIRN_MOTO_SERVER={} does not exist; unset it or run scripts/deps",
                path.display()
            )));
        }
        return Ok(path);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| err("HOME is not set; set CAIRN_MOTO_SERVER to a moto_server executable"))?;
    let cache = PathBuf::from(home).join(".cache").join("cairn");
    let venv = cache.join("moto-venv");
    let exe = venv.join("bin").join("moto_server");
    let ready = |venv: &Path| exe.is_file() && venv.join(READY_MARKER).is_file();
    if ready(&venv) {
        return Ok(exe);
    }
    fs::create_dir_all(&cache)
        .map_err(|e| err(format!("cannot create {}: {e}", cache.display())))?;
    let lock_path = cache.join("moto-venv.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| err(format!("cannot open {}: {e}", lock_path.display())))?;
    lock_exclusive(&lock).map_err(|e| err(format!("cannot lock {}: {e}", lock_path.display())))?;
    // Someone else may have built it while we waited for the lock.
    if !ready(&venv) {
        build_venv(&venv)?;
    }
    // The lock is released when `lock` is closed.
    drop(lock);
    Ok(exe)
}

#[allow(clippy::incompatible_msrv)] // File::lock is stable since Rust 1.89.
fn lock_exclusive(file: &File) -> std::io::Result<()> {
    file.lock()
}

fn build_venv(venv: &Path) -> Result<(), S3Error> {
    eprintln!(
        "cairn-tests: creating the moto venv at {} (once per machine)",
        venv.display()
    );
    run(Command::new("python3").arg("-m").arg("venv").arg(venv))?;
    run(Command::new(venv.join("bin").join("pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "moto[s3,server]",
        "flask",
        "flask-cors",
    ]))?;
    let marker = venv.join(READY_MARKER);
    File::create(&marker).map_err(|e| err(format!("cannot create {}: {e}", marker.display())))?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<(), S3Error> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| err(format!("cannot run {shown}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(err(format!(
        "{shown} failed with {}:\n{}{}\n(set CAIRN_MOTO_SERVER to an existing moto_server, or run scripts/deps)",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}

fn unique_bucket_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("cairn-test-{}-{nanos}-{n}", std::process::id())
}

fn log_tail(log: &Path) -> String {
    const LINES: usize = 40;
    match fs::read(log) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                return "(empty)".to_owned();
            }
            lines[lines.len().saturating_sub(LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

/// One HTTP/1.1 request with `Connection: close`; reads the response to EOF.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, S3Error> {
    let io = |e: std::io::Error| err(format!("HTTP {method} {path} to {addr}: {e}"));
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(io)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    if !has("authorization") {
        req.push_str(DUMMY_AUTHORIZATION);
    }
    if !has("content-type") {
        req.push_str("Content-Type: application/octet-stream\r\n");
    }
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    parse_response(&raw).ok_or_else(|| {
        err(format!(
            "HTTP {method} {path} to {addr}: malformed response: {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        ))
    })
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Some(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&data[..eol]).ok()?;
        let size_hex = size_field.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 412 Precondition Failed\r\nX-A: b\r\n\r\nnope").unwrap();
        assert_eq!((r.status, r.body.as_str()), (412, "nope"));
        assert_eq!(r.headers, vec![("X-A".to_owned(), "b".to_owned())]);
        let r = parse_response(
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "abcde"));
        assert!(parse_response(b"garbage").is_none());
    }

    #[test]
    fn bucket_names_are_unique_and_valid() {
        let (a, b) = (unique_bucket_name(), unique_bucket_name());
        assert_ne!(a, b);
        assert!(a.len() <= 63, "{a}");
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }
}
