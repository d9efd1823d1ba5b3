#!/usr/bin/env python3
"""Cairn's SQLite replication against Litestream, side by side in one run (issue 11).

Run it through scripts/bench-sqlite, which finds or builds cairn, installs Litestream and
finds moto_server. Python 3.11 standard library only.

Per target (a local directory, and an S3 bucket on moto) and per run (sides alternate:
Cairn first in odd runs, Litestream first in even ones), each side gets a fresh copy of
the same database and a fresh store prefix, and:

  1. starts replicating; the initial replication time ends when the store holds a
     restorable copy (Cairn: the first generation `ls` reports with kind sqlite, timed at
     the moment its manifest object was first seen; Litestream: the first .ltx file seen);
  2. waits until the store's size is stable for 3 s, updates 1% of the rows in 5
     transactions, waits until the size is stable for 3 s again: the growth is the bytes
     shipped for the update;
  3. stops the tool (SIGINT; the time to exit is reported) and restores the newest state
     and a point in time before the update, each from the store into a fresh state
     directory, timing both; every restore passes PRAGMA integrity_check and its row
     count and content digest are compared with the source at that point;
  4. store bytes ÷ database size.

The lag test (per target, per run, both sides): a separate, smaller database
(CAIRN_BENCH_LAG_MIB) receives CAIRN_BENCH_LAG_RATE commits per second for
CAIRN_BENCH_LAG_SECS seconds, one row each with a sequence number, from a writer process
that logs (seq, commit time). A poller lists the store every 20 ms (file) or 100 ms (S3)
and records when each manifest object (Cairn: manifests/N.cmf, one per published
generation) or L0 LTX file (Litestream: ltx/0/MIN-MAX.ltx) first appeared. Afterwards each
of those generations / LTX files is restored (cairn restore --generation N, litestream
restore -txid MAX) and the largest sequence number in it is read. A commit's lag is the
first-seen time of the first generation / LTX file containing it minus its commit time.
Restoring per generation is why this test uses a smaller database than the rest: both
tools ship only WAL frames while it runs (Cairn's page generations are incremental from
the WAL), so the database size hardly matters to the lag.

Cairn's incremental ÷ full time: one-shot `cairn checkpoint --kind sqlite` on a copy
(fresh state), full first, then the 1% update, then the incremental; duration_ms of each.
A connection stays open with wal_autocheckpoint=0 so that the WAL (and Cairn's position in
it) survives between the two.

Cairn's peak scratch: the apparent size of <state>/scratch + <state>/spool, sampled every
100 ms while any Cairn replicate or checkpoint runs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

# --- settings ----------------------------------------------------------------


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


MIB = 1 << 20
DB_MIB = env_int("CAIRN_BENCH_SQLITE_MIB", 512)
RUNS = env_int("CAIRN_BENCH_RUNS", 3)
LAG_SECS = env_int("CAIRN_BENCH_LAG_SECS", 60)
LAG_RATE = env_int("CAIRN_BENCH_LAG_RATE", 1000)
LAG_MIB = env_int("CAIRN_BENCH_LAG_MIB", 32)
LAG_RUNS = env_int("CAIRN_BENCH_LAG_RUNS", RUNS)  # the lag test runs in the first LAG_RUNS runs
TARGETS = [t for t in os.environ.get("CAIRN_BENCH_TARGETS", "file,s3").split(",") if t]
LAG_TARGETS = [t for t in os.environ.get("CAIRN_BENCH_LAG_TARGETS", ",".join(TARGETS)).split(",") if t]
BENCH_DIR = os.path.abspath(os.environ.get("CAIRN_BENCH_DIR", os.path.expanduser("~/.cache/cairn/bench-sqlite")))
CAIRN = os.environ.get("CAIRN_BIN", "")
LITESTREAM = os.environ.get("LITESTREAM_BIN", "")
MOTO = os.environ.get("MOTO_SERVER", os.path.expanduser("~/.cache/cairn/moto-venv/bin/moto_server"))
UPDATE_FRACTION = 0.01
UPDATE_TXNS = 5
STABLE_SECS = 3.0
BUCKET = "bench"
DBNAME = "orders"

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_bytes(n: float) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n:.0f} B"


# --- the database ------------------------------------------------------------

FIRST = ("James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard Susan "
         "Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty Anthony Sandra "
         "Mark Margaret Donald Ashley Steven Kimberly Andrew Emily Paul Donna Joshua Michelle Kenneth Carol "
         "Kevin Amanda Brian Melissa George Deborah Timothy Stephanie Ronald Rebecca Jason Sharon Edward Laura "
         "Jeffrey Cynthia Ryan Dorothy Jacob Amy Gary Kathleen Nicholas Angela Eric Shirley Jonathan Emma").split()
LAST = ("Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez "
        "Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark "
        "Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green Adams "
        "Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Gomez Phillips Evans Turner Diaz Parker").split()
DOMAINS = "example.com mail.test shop.example inbox.test corp.example post.test".split()
STATUS = "pending paid shipped delivered cancelled refunded".split()
WORDS = ("the order was packed shipped delayed returned customer asked for gift wrap leave at door call before "
         "delivery fragile handle with care express standard warehouse north south east west backorder item "
         "replaced refund issued partially invoice sent reminder coupon applied loyalty points redeemed size "
         "colour changed address updated courier tracking number missing signature required weekend evening "
         "morning office reception neighbour parcel locker damaged box resent priority bulk discount").split()

SCHEMA = """
CREATE TABLE orders(
  id INTEGER PRIMARY KEY,
  customer TEXT NOT NULL,
  email TEXT NOT NULL,
  amount REAL NOT NULL,
  status TEXT NOT NULL,
  created INTEGER NOT NULL,
  notes TEXT
);
CREATE INDEX orders_customer ON orders(customer);
CREATE INDEX orders_created ON orders(created);
CREATE INDEX orders_status ON orders(status);
CREATE INDEX orders_email ON orders(email);
"""


def make_rows(rng: random.Random, start: int, n: int):
    base = 1_700_000_000
    for i in range(start, start + n):
        f, l = rng.choice(FIRST), rng.choice(LAST)
        words = rng.choices(WORDS, k=rng.randint(12, 60))
        yield (i, f"{f} {l}", f"{f.lower()}.{l.lower()}{rng.randint(1, 9999)}@{rng.choice(DOMAINS)}",
               round(rng.uniform(1, 2500), 2), rng.choice(STATUS), base + i * 7 + rng.randint(0, 6),
               f"order {i}: " + " ".join(words))


def db_bytes(path: str) -> int:
    c = sqlite3.connect(path)
    try:
        return c.execute("PRAGMA page_count").fetchone()[0] * c.execute("PRAGMA page_size").fetchone()[0]
    finally:
        c.close()


def create_db(path: str, mib: int, seed: int, lag_table: bool = False) -> None:
    """An orders database of at least `mib` MiB in WAL mode, checkpointed (no WAL left)."""
    tmp = path + ".tmp"
    for p in (tmp, tmp + "-wal", tmp + "-shm"):
        if os.path.exists(p):
            os.remove(p)
    rng = random.Random(seed)
    c = sqlite3.connect(tmp)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=OFF")
    c.executescript(SCHEMA)
    if lag_table:
        c.execute("CREATE TABLE lag(seq INTEGER PRIMARY KEY, t REAL NOT NULL, payload TEXT NOT NULL)")
    page_size = c.execute("PRAGMA page_size").fetchone()[0]
    n, batch = 0, 20_000
    while c.execute("PRAGMA page_count").fetchone()[0] * page_size < mib * MIB:
        c.executemany("INSERT INTO orders VALUES(?,?,?,?,?,?,?)", make_rows(rng, n + 1, batch))
        c.commit()
        n += batch
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    os.replace(tmp, path)
    for p in (tmp + "-wal", tmp + "-shm"):
        if os.path.exists(p):
            os.remove(p)


def base_db(mib: int, lag: bool = False) -> str:
    os.makedirs(os.path.join(BENCH_DIR, "cache"), exist_ok=True)
    path = os.path.join(BENCH_DIR, "cache", f"{'lag' if lag else 'orders'}-{mib}MiB-v1.db")
    if not os.path.exists(path):
        log(f"creating {path} ({mib} MiB of orders{', plus a lag table' if lag else ''})")
        t = time.time()
        create_db(path, mib, seed=11 if not lag else 12, lag_table=lag)
        log(f"  created in {time.time() - t:.1f} s: {fmt_bytes(os.path.getsize(path))}, "
            f"{row_count(path)} rows")
    return path


def copy_db(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    for p in (dst, dst + "-wal", dst + "-shm"):
        if os.path.exists(p):
            os.remove(p)
    shutil.copyfile(src, dst)


def row_count(path: str) -> int:
    c = sqlite3.connect(path)
    try:
        return c.execute("SELECT count(*) FROM orders").fetchone()[0]
    finally:
        c.close()


def digest(path: str) -> tuple[int, str]:
    """(row count, sha256 of every orders row in id order) of a database file."""
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        h = hashlib.sha256()
        n = 0
        cur = c.execute("SELECT id, customer, email, amount, status, created, notes FROM orders ORDER BY id")
        while True:
            rows = cur.fetchmany(20_000)
            if not rows:
                break
            n += len(rows)
            h.update(repr(rows).encode())
        return n, h.hexdigest()[:16]
    finally:
        c.close()


def integrity(path: str) -> str:
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = c.execute("PRAGMA integrity_check").fetchall()
        return "ok" if rows == [("ok",)] else "; ".join(r[0] for r in rows[:5])
    finally:
        c.close()


def update_1pct(path: str, seed: int, conn: sqlite3.Connection | None = None) -> int:
    """UPDATE 1% of the orders rows (random ids), in UPDATE_TXNS transactions."""
    own = conn is None
    c = conn or sqlite3.connect(path, timeout=30)
    try:
        max_id = c.execute("SELECT max(id) FROM orders").fetchone()[0]
        rng = random.Random(seed)
        ids = rng.sample(range(1, max_id + 1), max(1, int(max_id * UPDATE_FRACTION)))
        per = math.ceil(len(ids) / UPDATE_TXNS)
        for k in range(0, len(ids), per):
            c.executemany(
                "UPDATE orders SET status=?, amount=round(amount*1.07, 2), notes=notes || ? WHERE id=?",
                [(rng.choice(STATUS), f" [updated {seed}]", i) for i in ids[k:k + per]])
            c.commit()
        return len(ids)
    finally:
        if own:
            c.close()


# --- stores ------------------------------------------------------------------


class FileTarget:
    kind = "file"
    poll = 0.02

    def __init__(self, root: str):
        self.root = root

    def cairn_url(self, prefix: str) -> str:
        return "file://" + os.path.join(self.root, prefix)

    def list(self, prefix: str) -> dict[str, int]:
        base = os.path.join(self.root, prefix)
        out = {}
        for d, _, files in os.walk(base):
            for f in files:
                p = os.path.join(d, f)
                try:
                    out[os.path.relpath(p, base)] = os.stat(p).st_size
                except FileNotFoundError:
                    pass
        return out

    def drop(self, prefix: str) -> None:
        shutil.rmtree(os.path.join(self.root, prefix), ignore_errors=True)


class S3Target:
    kind = "s3"
    poll = 0.1
    NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def cairn_url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def list(self, prefix: str) -> dict[str, int]:
        out, token = {}, None
        while True:
            q = {"list-type": "2", "prefix": prefix + "/"}
            if token:
                q["continuation-token"] = token
            url = f"{self.endpoint}/{BUCKET}?{urllib.parse.urlencode(q)}"
            with urllib.request.urlopen(url, timeout=30) as r:
                root = ET.fromstring(r.read())
            for c in root.iter(self.NS + "Contents"):
                out[c.find(self.NS + "Key").text[len(prefix) + 1:]] = int(c.find(self.NS + "Size").text)
            t = root.find(self.NS + "NextContinuationToken")
            if t is None or not t.text:
                return out
            token = t.text

    def drop(self, prefix: str) -> None:
        for k in self.list(prefix):
            key = urllib.parse.quote(f"{prefix}/{k}")
            req = urllib.request.Request(f"{self.endpoint}/{BUCKET}/{key}", method="DELETE")
            try:
                urllib.request.urlopen(req, timeout=30).read()
            except urllib.error.URLError:
                pass


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start_moto(workdir: str):
    if not os.access(MOTO, os.X_OK):
        return None, f"moto_server not found at {MOTO}"
    port = free_port()
    logf = open(os.path.join(workdir, "moto.log"), "w")
    proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=logf, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1).read()
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    else:
        proc.kill()
        return None, "moto_server did not answer within 20 s"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=10).read()
    return (proc, endpoint), None


# Litestream's AWS SDK refuses to start ("unable to add custom RootCAs HTTPClient") when
# AWS_CA_BUNDLE is set; moto is plain http on loopback, so it is dropped for Litestream.
LS_ENV = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


# --- helpers -----------------------------------------------------------------


SCRATCH_LOG: list[tuple] = []  # (phase, peak of scratch+spool, peak of scratch, peak of spool)


class Sampler(threading.Thread):
    """Max apparent size of a state directory's scratch/ and spool/ every 100 ms."""

    def __init__(self, state: str, phase: str):
        super().__init__(daemon=True)
        self.phase = phase
        self.dirs = [os.path.join(state, "scratch"), os.path.join(state, "spool")]
        self.peak = 0
        self.peaks = [0, 0]  # scratch, spool, each on its own
        self.stop_ev = threading.Event()

    def sample(self) -> None:
        sizes = []
        for base in self.dirs:
            n = 0
            for d, _, files in os.walk(base):
                for f in files:
                    try:
                        n += os.lstat(os.path.join(d, f)).st_size
                    except FileNotFoundError:
                        pass
            sizes.append(n)
        self.peak = max(self.peak, sum(sizes))
        self.peaks = [max(a, b) for a, b in zip(self.peaks, sizes)]

    def run(self):
        while not self.stop_ev.is_set():
            self.sample()
            self.stop_ev.wait(0.1)

    def stop(self) -> int:
        self.stop_ev.set()
        self.join()
        self.sample()
        SCRATCH_LOG.append((self.phase, self.peak, *self.peaks))
        return self.peak


class Watcher(threading.Thread):
    """Polls a store prefix; records when each object name was first seen, and the total size."""

    def __init__(self, target, prefix: str):
        super().__init__(daemon=True)
        self.target, self.prefix = target, prefix
        self.first_seen: dict[str, float] = {}
        self.total = 0
        self.objs: dict[str, int] = {}
        self.last_change = time.time()
        self.stop_ev = threading.Event()
        self.errors = 0
        self.lock = threading.Lock()

    def scan(self):
        try:
            objs = self.target.list(self.prefix)
        except Exception:  # a listing that raced a rename or a moto hiccup: next poll
            self.errors += 1
            return
        now = time.time()
        with self.lock:
            for k in objs:
                if k not in self.first_seen:
                    self.first_seen[k] = now
            self.objs = objs
            total = sum(objs.values())
            if total != self.total:
                self.total = total
                self.last_change = now

    def run(self):
        while not self.stop_ev.is_set():
            self.scan()
            self.stop_ev.wait(self.target.poll)

    def stop(self):
        self.stop_ev.set()
        self.join()

    def wait_stable(self, since_total: int | None = None, timeout: float = 600.0) -> int:
        """Waits until the total changed from since_total (if given) and then stayed put for 3 s."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                total, last = self.total, self.last_change
            if (since_total is None or total != since_total) and time.time() - last >= STABLE_SECS:
                return total
            time.sleep(0.1)
        raise RuntimeError(f"store under {self.prefix} did not settle within {timeout:.0f} s")


def run_json(cmd: list[str], env=None, timeout: float = 1800) -> tuple[dict | list, float]:
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    el = time.time() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout), el


def run_cmd(cmd: list[str], env=None, timeout: float = 1800) -> float:
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    el = time.time() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
    return el


def stop_proc(proc: subprocess.Popen, what: str, problems: list) -> float:
    t = time.time()
    already = proc.poll() is not None
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        problems.append(f"{what} did not exit within 60 s of SIGINT (killed)")
    el = time.time() - t
    if proc.returncode not in (0, -signal.SIGINT, 130) and not already:
        problems.append(f"{what} exited {proc.returncode} after SIGINT")
    return el


def rm(*paths: str) -> None:
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.remove(p)


# --- the two tools -----------------------------------------------------------


class Cairn:
    name = "cairn"

    def __init__(self, target, prefix: str, work: str):
        self.target, self.prefix, self.work = target, prefix, work
        self.state = os.path.join(work, "cairn-state")
        self.url = target.cairn_url(prefix)
        self.env = dict(os.environ, **(S3_ENV | {"AWS_ENDPOINT_URL": target.endpoint} if target.kind == "s3" else {}))
        self.proc = None
        self.sampler = None

    def start(self, db: str, extra=()):
        rm(self.state)
        self.sampler = Sampler(self.state, f"{self.target.kind} {self.prefix}")
        self.sampler.start()
        self.out = open(os.path.join(self.work, "cairn-replicate.log"), "w")
        self.proc = subprocess.Popen([CAIRN, "--state", self.state, "--store", self.url, "replicate", "--db", DBNAME,
                                      "--source", db, "--interval", "1s", *extra],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=self.env)

    def manifest(self, key: str):
        parts = key.split("/")
        if len(parts) >= 2 and parts[-2] == "manifests" and parts[-1].endswith(".cmf"):
            return int(parts[-1][:-4])
        return None

    def ready_time(self, watcher: Watcher, timeout=900) -> float:
        """First-seen time of the first generation with a page file (kind sqlite)."""
        probe = os.path.join(self.work, "cairn-probe")
        checked: set[int] = set()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cairn replicate exited {self.proc.returncode}: "
                                   f"{open(self.out.name).read()[-2000:]}")
            with watcher.lock:
                gens = {self.manifest(k): t for k, t in watcher.first_seen.items() if self.manifest(k)}
            if set(gens) - checked:
                rm(probe)
                ls, _ = run_json([CAIRN, "--json", "--state", probe, "--store", self.url, "ls", "--db", DBNAME],
                                 env=self.env)
                for g in ls:
                    if g["kind"] == "sqlite" and g["generation"] in gens:
                        rm(probe)
                        return gens[g["generation"]]
                checked |= set(gens)
            time.sleep(0.05)
        raise RuntimeError("cairn: no page generation within the timeout")

    def stop(self, problems) -> float:
        el = stop_proc(self.proc, "cairn replicate", problems)
        self.out.close()
        self.peak = self.sampler.stop()
        return el

    def restore(self, out: str, at: float | None = None) -> float:
        st = os.path.join(self.work, "cairn-restore-state")
        rm(st, out, out + "-wal", out + "-shm")
        cmd = [CAIRN, "--json", "--state", st, "--store", self.url, "restore", "--db", DBNAME, "--to", out]
        if at is not None:
            cmd += ["--time", rfc3339(at)]
        _, el = run_json(cmd, env=self.env)
        rm(st)
        return el

    def lag_points(self, watcher: Watcher, scratch: str) -> list[tuple[float, int]]:
        """(first-seen time, max seq) of every published generation with a page file."""
        st = os.path.join(self.work, "cairn-lag-state")
        rm(st)
        ls, _ = run_json([CAIRN, "--json", "--state", st, "--store", self.url, "ls", "--db", DBNAME], env=self.env)
        seen = {self.manifest(k): t for k, t in watcher.first_seen.items() if self.manifest(k)}
        pts = []
        for g in ls:
            if g["kind"] != "sqlite":
                continue
            out = os.path.join(scratch, "lag-restore.db")
            rm(out, out + "-wal", out + "-shm")
            run_json([CAIRN, "--json", "--state", st, "--store", self.url, "restore", "--db", DBNAME,
                      "--generation", str(g["generation"]), "--to", out], env=self.env)
            pts.append((seen.get(g["generation"], g["created_unix_ms"] / 1000), lag_max_seq(out),
                        f"gen {g['generation']}", out))
            check_lag_prefix(out, pts[-1])
        rm(st)
        return pts


class Litestream:
    name = "litestream"

    def __init__(self, target, prefix: str, work: str):
        self.target, self.prefix, self.work = target, prefix, work
        self.proc = None
        self.peak = 0

    def config(self, db: str) -> str:
        path = os.path.join(self.work, "litestream.yml")
        if self.target.kind == "file":
            rep = f"      - type: file\n        path: {os.path.join(self.target.root, self.prefix)}\n"
        else:
            rep = (f"      - type: s3\n        bucket: {BUCKET}\n        path: {self.prefix}\n"
                   f"        endpoint: {self.target.endpoint}\n        region: us-east-1\n"
                   f"        force-path-style: true\n        access-key-id: bench\n"
                   f"        secret-access-key: bench-secret\n")
        with open(path, "w") as f:
            f.write(f"dbs:\n  - path: {db}\n    replicas:\n{rep}")
        return path

    def start(self, db: str, extra=()):
        self.db = db
        self.cfg = self.config(db)
        self.out = open(os.path.join(self.work, "litestream-replicate.log"), "w")
        self.proc = subprocess.Popen([LITESTREAM, "replicate", "-config", self.cfg],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=LS_ENV)

    def ready_time(self, watcher: Watcher, timeout=900) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"litestream exited {self.proc.returncode}: {open(self.out.name).read()[-2000:]}")
            with watcher.lock:
                ts = [t for k, t in watcher.first_seen.items() if k.endswith(".ltx")]
            if ts:
                return min(ts)
            time.sleep(0.05)
        raise RuntimeError("litestream: no LTX file within the timeout")

    def stop(self, problems) -> float:
        el = stop_proc(self.proc, "litestream replicate", problems)
        self.out.close()
        return el

    def restore(self, out: str, at: float | None = None, txid: str | None = None) -> float:
        rm(out, out + "-wal", out + "-shm")
        cmd = [LITESTREAM, "restore", "-config", self.cfg, "-o", out]
        if at is not None:
            cmd += ["-timestamp", rfc3339(at)]
        if txid is not None:
            cmd += ["-txid", txid]
        return run_cmd(cmd + [self.db], env=LS_ENV)

    def lag_points(self, watcher: Watcher, scratch: str) -> list[tuple[float, int]]:
        files = []
        for k, t in watcher.first_seen.items():
            if ltx_level(k) == 0:
                files.append((k.split("/")[-1][:-4].split("-")[1], t))
        pts = []
        for txid, t in sorted(files):
            out = os.path.join(scratch, "lag-restore.db")
            self.restore(out, txid=txid)
            pts.append((t, lag_max_seq(out), f"txid {txid}", out))
        return pts


def ltx_level(key: str):
    """The compaction level of a Litestream LTX object: ltx/<L>/MIN-MAX.ltx in a directory,
    <LLLL>/MIN-MAX.ltx in S3; None for anything else."""
    parts = key.split("/")
    if len(parts) < 2 or not parts[-1].endswith(".ltx") or not parts[-2].isdigit():
        return None
    if len(parts[-2]) == 4 or (len(parts) >= 3 and parts[-3] == "ltx"):
        return int(parts[-2])
    return None


def lag_max_seq(path: str) -> int:
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return c.execute("SELECT coalesce(max(seq), 0) FROM lag").fetchone()[0]
    finally:
        c.close()


LAG_PROBLEMS: list[str] = []


def check_lag_prefix(path: str, pt) -> None:
    """A restored generation holds exactly the commits 1..max (no gap, nothing torn)."""
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        n, mx = c.execute("SELECT count(*), coalesce(max(seq), 0) FROM lag").fetchone()
        ok = c.execute("PRAGMA quick_check").fetchone()[0]
    finally:
        c.close()
    if n != mx or ok != "ok":
        LAG_PROBLEMS.append(f"cairn {pt[2]}: {n} lag rows but max seq {mx}, quick_check {ok}")


# --- the lag writer (a separate process) -------------------------------------


def lag_writer(db: str, rate: int, secs: int, out: str) -> None:
    c = sqlite3.connect(db, timeout=30, isolation_level=None)
    c.execute("PRAGMA synchronous=NORMAL")
    start = time.time() + 0.2
    n = rate * secs
    times = []
    payload = "x" * 80
    for seq in range(1, n + 1):
        due = start + (seq - 1) / rate
        d = due - time.time()
        if d > 0:
            time.sleep(d)
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO lag VALUES(?,?,?)", (seq, due, payload))
        c.execute("COMMIT")
        times.append(time.time())
    c.close()
    with open(out, "w") as f:
        json.dump({"start": start, "times": times}, f)


# --- one side of one run -----------------------------------------------------


def side_run(tool_cls, target, base: str, run: int, work: str, res: dict, problems: list) -> None:
    name = tool_cls.name
    prefix = f"{name}-r{run}"
    rm(work)
    os.makedirs(work)
    target.drop(prefix)
    db = os.path.join(work, "src", "app.db")
    copy_db(base, db)
    size = db_bytes(db)
    tool = tool_cls(target, prefix, work)
    w = Watcher(target, prefix)
    w.start()
    t_start = time.time()
    tool.start(db)
    try:
        t_ready = tool.ready_time(w)
        init = t_ready - t_start
        s0 = w.wait_stable()
        log(f"  {name}: restorable after {init:.2f} s; store {fmt_bytes(s0)} once settled")
        pre = digest(db)
        # a point in time after the initial copy, before the update (whole seconds)
        t_mid = math.ceil(time.time()) + 1
        time.sleep(max(0, t_mid + 1 - time.time()))
        with w.lock:
            before = set(w.objs)
        n = update_1pct(db, seed=1000 + run)
        post = digest(db)
        s1 = w.wait_stable(since_total=s0)
        growth = s1 - s0
        with w.lock:
            new = {k: v for k, v in w.objs.items() if k not in before}
        # what the tool shipped for the change: every new object for Cairn (segments and their
        # manifests); Litestream's new L0 files (its compactions into L1+, timed every 30 s
        # whatever changed, are store housekeeping and reported apart as the total growth)
        shipped = sum(v for k, v in new.items() if name == "cairn" or ltx_level(k) == 0)
        log(f"  {name}: 1% update ({n} rows) shipped {fmt_bytes(shipped)} in {len(new)} new objects; "
            f"store grew {fmt_bytes(growth)}")
    finally:
        t_stop = tool.stop(problems)
        w.stop()
    rest = os.path.join(work, "restored.db")
    t_rest = tool.restore(rest)
    check(name, "latest", rest, post, problems)
    t_pitr = tool.restore(rest, at=t_mid)
    check(name, f"--time {rfc3339(t_mid)}", rest, pre, problems)
    store = sum(target.list(prefix).values())
    log(f"  {name}: stop {t_stop:.2f} s, restore {t_rest:.2f} s, point-in-time restore {t_pitr:.2f} s, "
        f"store {fmt_bytes(store)} = {store / size:.2f}× the database")
    r = res.setdefault(name, {})
    for k, v in (("init", init), ("shipped", shipped), ("growth", growth), ("restore", t_rest), ("pitr", t_pitr),
                 ("store_ratio", store / size), ("stop", t_stop), ("peak", getattr(tool, "peak", 0))):
        r.setdefault(k, []).append(v)
    target.drop(prefix)
    rm(work)


def check(name: str, what: str, path: str, want: tuple[int, str], problems: list) -> None:
    ic = integrity(path)
    got = digest(path)
    ok = ic == "ok" and got == want
    log(f"    {name} restore ({what}): integrity {ic}, rows {got[0]} digest {got[1]} "
        f"{'== source' if ok else f'!= source {want}'}")
    if not ok:
        problems.append(f"{name} restore ({what}): integrity {ic}, rows/digest {got} but the source had {want}")


def lag_run(tool_cls, target, base: str, run: int, work: str, res: dict, problems: list) -> None:
    name = tool_cls.name
    prefix = f"{name}-lag-r{run}"
    rm(work)
    os.makedirs(work)
    target.drop(prefix)
    db = os.path.join(work, "src", "lag.db")
    copy_db(base, db)
    tool = tool_cls(target, prefix, work)
    w = Watcher(target, prefix)
    w.start()
    tool.start(db)
    try:
        tool.ready_time(w)
        w.wait_stable()
        wlog = os.path.join(work, "writer.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "_lag_writer", db, str(LAG_RATE), str(LAG_SECS),
                        wlog], check=True)
        time.sleep(5)
    finally:
        tool.stop(problems)
        w.stop()
    wj = json.load(open(wlog))
    times = wj["times"]
    achieved = len(times) / (times[-1] - wj["start"])
    pts = sorted((t, s) for t, s, *_ in tool.lag_points(w, work))
    # durable time of seq = first-seen time of the first generation / file that contains it
    lags, j, best = [], 0, 0
    for t, s in pts:
        if s < best:
            problems.append(f"{name} lag: a later generation holds fewer commits ({s} < {best})")
        best = max(best, s)
    lost = 0
    for seq, ct in enumerate(times, start=1):
        while j < len(pts) and pts[j][1] < seq:
            j += 1
        if j == len(pts):
            lost = len(times) - seq + 1
            break
        lags.append(pts[j][0] - ct)
    if lost:
        problems.append(f"{name} lag: {lost} commits not in any generation / LTX file after the run")
    with open(os.path.join(BENCH_DIR, f"lag-{target.kind}-{name}-r{run}.json"), "w") as f:
        json.dump({"start": wj["start"], "commit_times": times, "points": pts, "lags": lags}, f)
    lags.sort()
    p50 = lags[len(lags) // 2] if lags else float("nan")
    p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else float("nan")
    log(f"  {name}: {len(times)} commits at {achieved:.0f}/s, {len(pts)} restorable points, "
        f"lag p50 {p50:.3f} s, p99 {p99:.3f} s, max {lags[-1] if lags else float('nan'):.3f} s")
    r = res.setdefault(name, {})
    r.setdefault("lag_p50", []).append(p50)
    r.setdefault("lag_p99", []).append(p99)
    r.setdefault("lag_rate", []).append(achieved)
    r.setdefault("peak", []).append(getattr(tool, "peak", 0))
    target.drop(prefix)
    rm(work)


def checkpoint_run(base: str, run: int, work: str, res: dict) -> None:
    """Cairn one-shot checkpoints: full, then the 1% update, then incremental."""
    rm(work)
    os.makedirs(work)
    db = os.path.join(work, "src", "app.db")
    copy_db(base, db)
    st = os.path.join(work, "state")
    hold = sqlite3.connect(db, timeout=30)
    hold.execute("PRAGMA wal_autocheckpoint=0")
    hold.execute("UPDATE orders SET status=status WHERE id=1")  # the WAL exists and has salts
    hold.commit()
    s = Sampler(st, f"file checkpoint-r{run}")
    s.start()
    cmd = [CAIRN, "--json", "--state", st, "checkpoint", "--db", DBNAME, "--kind", "sqlite", "--source", db]
    full, full_wall = run_json(cmd)
    update_1pct(db, seed=2000 + run, conn=hold)
    inc, inc_wall = run_json(cmd)
    peak = s.stop()
    hold.close()
    ratio = inc["duration_ms"] / max(1, full["duration_ms"])
    log(f"  checkpoint: full {full['duration_ms']} ms ({fmt_bytes(full['bytes_uploaded'])}), incremental "
        f"{inc['duration_ms']} ms ({fmt_bytes(inc['bytes_uploaded'])}, {inc['pages_dirty']} dirty pages, "
        f"dirty_used {inc.get('dirty_used')}, full_scan_reason {inc.get('full_scan_reason')}): {ratio:.3f}")
    r = res.setdefault("cairn", {})
    r.setdefault("ck_ratio", []).append(ratio)
    r.setdefault("ck_full_ms", []).append(full["duration_ms"])
    r.setdefault("ck_inc_ms", []).append(inc["duration_ms"])
    r.setdefault("ck_inc_bytes", []).append(inc["bytes_uploaded"])
    r.setdefault("peak", []).append(peak)
    if inc.get("full_scan_reason"):
        res.setdefault("notes", []).append(f"incremental checkpoint fell back to a full scan: {inc['full_scan_reason']}")
    rm(work)


# --- the report --------------------------------------------------------------


def mm(xs, f=lambda v: f"{v:.2f}") -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f(xs[0])
    return f"{f(statistics.median(xs))} ({f(min(xs))}–{f(max(xs))})"


def status(xs, goal) -> str:
    if goal is None:
        return "—"
    if not xs or any(math.isnan(x) for x in xs):
        return "not measured"
    return "met" if max(xs) <= goal else "not met"


def ratios(a, b):
    return [x / y for x, y in zip(a, b) if y]


def report(results: dict, notes: list, problems: list) -> None:
    rows = []
    secs = lambda v: f"{v:.2f} s"  # noqa: E731
    for tk, res in results.items():
        c, l = res.get("cairn", {}), res.get("litestream", {})
        if c.get("init"):
            rows.append(("initial replication, Cairn ÷ Litestream", tk, mm(c["init"], secs), mm(l.get("init", []), secs),
                         ratios(c["init"], l.get("init", [])), None))
            rows.append(("bytes shipped for a 1% update, Cairn ÷ Litestream", tk, mm(c["shipped"], fmt_bytes),
                         mm(l.get("shipped", []), fmt_bytes), ratios(c["shipped"], l.get("shipped", [])), 0.8))
            rows.append(("store growth after the 1% update (all objects), Cairn ÷ Litestream", tk,
                         mm(c["growth"], fmt_bytes), mm(l.get("growth", []), fmt_bytes),
                         ratios(c["growth"], l.get("growth", [])), None))
            rows.append(("restore (newest), Cairn ÷ Litestream", tk, mm(c["restore"], secs),
                         mm(l.get("restore", []), secs), ratios(c["restore"], l.get("restore", [])), 0.3))
            rows.append(("point-in-time restore, Cairn ÷ Litestream", tk, mm(c["pitr"], secs),
                         mm(l.get("pitr", []), secs), ratios(c["pitr"], l.get("pitr", [])), 0.3))
            rows.append(("store bytes after the run ÷ database size", tk, mm(c["store_ratio"]),
                         mm(l.get("store_ratio", [])), None, None))
            rows.append(("exit after SIGINT (s; goal ≤ 5 s for Cairn)", tk, mm(c["stop"], secs),
                         mm(l.get("stop", []), secs), c["stop"], 5.0))
        if c.get("ck_ratio"):
            rows.append(("Cairn incremental ÷ full checkpoint time", tk,
                         f"{mm(c['ck_inc_ms'], lambda v: f'{v:.0f}')} ms ÷ {mm(c['ck_full_ms'], lambda v: f'{v:.0f}')} ms",
                         "—", c["ck_ratio"], 0.05))
        if c.get("lag_p50") or l.get("lag_p50"):
            rows.append((f"lag p50, {LAG_RATE} commits/s for {LAG_SECS} s", tk, mm(c.get("lag_p50", []), secs),
                         mm(l.get("lag_p50", []), secs), None, None))
            rows.append((f"lag p99, {LAG_RATE} commits/s for {LAG_SECS} s (goal for Cairn)", tk,
                         mm(c.get("lag_p99", []), secs), mm(l.get("lag_p99", []), secs), c.get("lag_p99", []), 1.5))
            rows.append(("achieved commit rate (commits/s)", tk, mm(c.get("lag_rate", []), lambda v: f"{v:.0f}"),
                         mm(l.get("lag_rate", []), lambda v: f"{v:.0f}"), None, None))
        if c.get("peak"):
            rows.append(("Cairn peak scratch + spool", tk, mm([max(c["peak"])], fmt_bytes), "—",
                         [max(c["peak"]) / MIB], 64))
    print()
    print(f"## Cairn vs Litestream, SQLite {DB_MIB} MiB, {RUNS} run(s)")
    print()
    print("| figure | target | Cairn | Litestream | value: median (min–max) | goal | status |")
    print("|---|---|---|---|---|---|---|")
    for fig, tk, cv, lv, val, goal in rows:
        v = "—" if val is None else (mm(val, lambda x: f"{x:.3f}") if not fig.startswith("Cairn peak")
                                     else mm(val, lambda x: f"{x:.1f} MiB"))
        g = "—" if goal is None else (f"≤ {goal:g} MiB" if fig.startswith("Cairn peak") else
                                      f"≤ {goal:g} s" if "SIGINT" in fig or "p99" in fig else f"≤ {goal:g}")
        print(f"| {fig} | {tk} | {cv} | {lv} | {v} | {g} | {status(val or [], goal)} |")
    print()
    for n in notes:
        print(f"- note: {n}")
    for phase, peak, sc, sp in SCRATCH_LOG:
        print(f"- Cairn scratch peak, {phase}: {fmt_bytes(peak)} (scratch/ {fmt_bytes(sc)}, spool/ {fmt_bytes(sp)})")
    for p in problems:
        print(f"- PROBLEM: {p}")
    for p in LAG_PROBLEMS:
        print(f"- PROBLEM: {p}")


# --- main --------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_lag_writer":
        lag_writer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        print("Environment: CAIRN_BIN (required here), LITESTREAM_BIN (set by scripts/bench-sqlite; empty\n"
              "when Litestream could not be installed: that side is skipped), MOTO_SERVER,\n"
              "CAIRN_BENCH_SQLITE_MIB=512 CAIRN_BENCH_RUNS=3 CAIRN_BENCH_LAG_SECS=60 CAIRN_BENCH_LAG_RATE=1000\n"
              "CAIRN_BENCH_LAG_MIB=32 CAIRN_BENCH_LAG_RUNS=<runs> CAIRN_BENCH_TARGETS=file,s3 CAIRN_BENCH_LAG_TARGETS=<targets>\n"
              "CAIRN_BENCH_DIR=~/.cache/cairn/bench-sqlite")
        return 0
    if not CAIRN or not os.access(CAIRN, os.X_OK):
        print("bench_sqlite.py: set CAIRN_BIN to the cairn binary (scripts/bench-sqlite does)", file=sys.stderr)
        return 2
    notes, problems = [], []
    tools = [Cairn]
    if LITESTREAM:
        v = subprocess.run([LITESTREAM, "version"], capture_output=True, text=True).stdout.strip()
        notes.append(f"Litestream {v} ({LITESTREAM})")
        tools.append(Litestream)
    else:
        notes.append("Litestream is not available: its side is skipped")
    notes.append(f"cairn {CAIRN}; SQLite {sqlite3.sqlite_version}; python {sys.version.split()[0]}")
    os.makedirs(BENCH_DIR, exist_ok=True)
    work = os.path.join(BENCH_DIR, "work")
    base = base_db(DB_MIB)
    lag_base = base_db(LAG_MIB, lag=True)
    notes.append(f"database {fmt_bytes(db_bytes(base))}, {row_count(base)} orders rows; lag database "
                 f"{fmt_bytes(db_bytes(lag_base))}")
    targets = []
    moto = None
    for tk in TARGETS:
        if tk == "file":
            targets.append(FileTarget(os.path.join(BENCH_DIR, "stores")))
        elif tk == "s3":
            m, err = start_moto(BENCH_DIR)
            if m is None:
                notes.append(f"S3 target skipped: {err}")
                continue
            moto = m
            targets.append(S3Target(m[1]))
            notes.append(f"S3 target: moto_server at {m[1]}, bucket {BUCKET}")
        else:
            print(f"unknown target {tk}", file=sys.stderr)
            return 2
    results: dict = {}
    try:
        for target in targets:
            res = results.setdefault(target.kind, {})
            for run in range(1, RUNS + 1):
                order = tools if run % 2 else list(reversed(tools))
                log(f"{target.kind} run {run}/{RUNS}: {' then '.join(t.name for t in order)}")
                for t in order:
                    try:
                        side_run(t, target, base, run, os.path.join(work, t.name), res, problems)
                    except Exception as e:  # noqa: BLE001 - reported, the benchmark goes on
                        problems.append(f"{target.kind} run {run} {t.name}: {e}")
                        log(f"  {t.name} FAILED: {e}")
                if target.kind == "file":
                    try:
                        checkpoint_run(base, run, os.path.join(work, "checkpoint"), res)
                    except Exception as e:  # noqa: BLE001
                        problems.append(f"checkpoint run {run}: {e}")
                        log(f"  checkpoint FAILED: {e}")
                if target.kind in LAG_TARGETS and run <= LAG_RUNS:
                    for t in order:
                        log(f"  lag: {t.name}, {LAG_RATE} commits/s for {LAG_SECS} s")
                        try:
                            lag_run(t, target, lag_base, run, os.path.join(work, t.name + "-lag"), res, problems)
                        except Exception as e:  # noqa: BLE001
                            problems.append(f"{target.kind} lag run {run} {t.name}: {e}")
                            log(f"  lag {t.name} FAILED: {e}")
    finally:
        if moto:
            moto[0].terminate()
            moto[0].wait()
    out = os.path.join(BENCH_DIR, f"results-{time.strftime('%Y%m%dT%H%M%S')}.json")
    with open(out, "w") as f:
        json.dump({"db_mib": DB_MIB, "runs": RUNS, "results": results, "notes": notes, "problems": problems,
                   "lag_problems": LAG_PROBLEMS, "scratch": SCRATCH_LOG}, f, indent=1)
    notes.append(f"raw figures: {out}; total time {time.time() - T0:.0f} s")
    report(results, notes, problems)
    return 1 if problems or LAG_PROBLEMS else 0


if __name__ == "__main__":
    sys.exit(main())
