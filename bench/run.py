#!/usr/bin/env python3
"""Benchmark suite: ``datastore serve`` against nginx on loopback.

Run with ``make bench`` (installs nginx and wrk) or ``.venv/bin/python bench/run.py [--runs N] [--size-mib N]
[--quick] [--no-nginx] [--out DIR]``. Both servers run on 127.0.0.1 with their roots in one temporary
directory on the same disk; the two are measured alternately, run by run, with the same clients (curl for
whole-body uploads, tus in one PATCH and downloads, wrk for small GETs, aiohttp for tus in 8 MiB PATCHes and the
concurrent uploads). Every upload is verified (the store's listing for ours, once the digests the upload did not
declare are known; hashing the stored file for nginx). Writes its table (the head of ``results.md``, before any
``## `` section) and its rows (``results.json``) to ``--out`` (default: this directory), keeping the sections and
rows that bench/jobs.py and bench/cluster.py merged into them.

Our uploads register a JSON manifest first, and what it declares decides what the store hashes inline: each
upload row's label says what it declares (MD5 and SHA-256, SHA-256 only or MD5 only). Beside each upload's
throughput, a row gives the server's CPU time per GiB moved (utime + stime of all its processes from
``/proc/PID/stat``, from before the request to its answer). The TLS rows run both servers with client
certificates (a CA made for the run; nginx on a second listener, ours restarted with ``--tls``).

Throughputs are MB/s (10^6 bytes per second, as curl reports them).
"""

# S603/S607: the suite runs curl, wrk, nginx and dd by design, with arguments it builds itself.
# RUF001: the report uses typographic signs (multiplication sign, en dash) on purpose.
# ASYNC230: the clients read the test file in 8 MiB pieces between requests, as a real client would.
# ruff: noqa: S603, S607, RUF001, ASYNC230

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography.hazmat.primitives import serialization

from datastore.security.certs import issue, make_ca, make_name

MIB = 1 << 20
GIB = 1 << 30
CURL = shutil.which("curl") or "/usr/bin/curl"
PREFIX = "files"
TUS_CHUNK = 8 * MIB
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: Settings of our server beyond its defaults (fsync stays on, as shipped).
OUR_ENV = {
    "DATASTORE_MAX_CONCURRENT_UPLOADS": "256",
    # One client (the bench) runs the 200 concurrent uploads.
    "DATASTORE_MAX_UPLOADS_PER_CLIENT": "256",
    # ... and holds the idle-connection row's 1000 connections (the default allows one address 256).
    "DATASTORE_MAX_CONNECTIONS_PER_CLIENT": "2048",
    # The bench uploads and downloads anonymously, as nginx serves them: open the store to that.
    "DATASTORE_POLICY": "list=anyone,read=anyone,upload=anyone",
}


# -- rows --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: samples for each server, higher or lower is better."""

    id: str
    what: str
    unit: str
    higher_is_better: bool = True
    target: str = ""
    check: Callable[[Row], bool | None] | None = None
    ours: list[float] = field(default_factory=list)
    nginx: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ratio(self) -> float | None:
        if not self.ours or not self.nginx or statistics.median(self.nginx) == 0:
            return None
        return statistics.median(self.ours) / statistics.median(self.nginx)

    def as_json(self) -> dict[str, Any]:
        met = self.check(self) if self.check is not None and self.ours else None
        return {
            "id": self.id,
            "what": self.what,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "ours": self.ours,
            "nginx": self.nginx,
            "ours_summary": summary(self.ours),
            "nginx_summary": summary(self.nginx),
            "ratio_ours_nginx": self.ratio(),
            "target": self.target,
            "target_met": met,
            "notes": self.notes,
        }


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio_at_least(limit: float) -> Callable[[Row], bool | None]:
    def check(row: Row) -> bool | None:
        ratio = row.ratio()
        return None if ratio is None else ratio >= limit

    return check


def median_at_most(limit: float) -> Callable[[Row], bool | None]:
    return lambda row: statistics.median(row.ours) <= limit


def median_at_least(limit: float) -> Callable[[Row], bool | None]:
    return lambda row: statistics.median(row.ours) >= limit


# -- helpers -----------------------------------------------------------------------------------


class BenchError(RuntimeError):
    """A benchmark step failed (bad status, failed verification, server down)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hash_file(path: Path) -> tuple[str, str]:
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 * MIB):
            md5.update(block)
            sha256.update(block)
    return md5.hexdigest(), sha256.hexdigest()


def write_random(path: Path, size: int) -> tuple[str, str]:
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "wb") as handle:
        remaining = size
        while remaining > 0:
            block = os.urandom(min(8 * MIB, remaining))
            handle.write(block)
            md5.update(block)
            sha256.update(block)
            remaining -= len(block)
    return md5.hexdigest(), sha256.hexdigest()


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


#: Clock ticks per second, the unit of utime and stime in /proc/PID/stat.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """The CPU time (user + system, all threads) that the processes ``pids`` have used so far."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            # Fields 14 and 15 (utime, stime), counted after the command name, which may hold spaces.
            after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(after_name[11]) + int(after_name[12])
    return ticks / CLOCK_TICKS


@dataclass(frozen=True)
class Tls:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate it signed (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def curl_opts(self) -> list[str]:
        return ["--cacert", str(self.ca), "--cert", str(self.client_cert), "--key", str(self.client_key)]


def make_tls(directory: Path) -> Tls:
    """Mint the run's certificates into ``directory``, as ``datastore certs`` makes them (P-256 keys)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(make_name("datastore bench CA", organization="datastore bench"), days=2)
    server = issue(ca, make_name("127.0.0.1", organization="datastore bench"), server_names=["127.0.0.1"], days=2)
    client = issue(ca, make_name("bench client", organization="datastore bench"), client=True, days=2)
    tls = Tls(*(directory / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    for path, issued in ((tls.ca, ca), (tls.server_cert, server), (tls.client_cert, client)):
        path.write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
    for path, issued in ((tls.server_key, server), (tls.client_key, client)):
        key = issued.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.write_bytes(key)
    return tls


def tls_session(url: str, tls: Tls) -> str:
    """The protocol and cipher curl negotiates with ``url`` (as its verbose output names them)."""
    proc = subprocess.run(
        [CURL, "-sS", "-v", "-o", "/dev/null", *tls.curl_opts(), url], capture_output=True, text=True, timeout=60
    )
    found = re.search(r"SSL connection using (\S+) / (\S+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise BenchError(f"curl over TLS to {url} failed: {proc.stderr.strip()[-500:]}")
    return f"{found[1]} {found[2]}"


@contextlib.contextmanager
def peak_rss(pids: Callable[[], list[int]], interval: float = 0.02) -> Iterator[list[int]]:
    """Sample the summed VmRSS of ``pids()`` until the block ends; the peak (KiB) lands in the yielded list."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        watched = pids()
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(watched))
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join(timeout=5)
        peak[0] = max(peak[0], rss_kib(pids()))


def curl(args: list[str], timeout: float) -> tuple[int, dict[str, float]]:
    """Run curl quietly; return (HTTP status, timings from -w)."""
    fmt = "%{http_code} %{time_total} %{size_upload} %{size_download}"
    proc = subprocess.run(
        [CURL, "-sS", "-o", "/dev/null", "-w", fmt, *args], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise BenchError(f"curl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    code, total, up, down = proc.stdout.split()
    return int(code), {"time": float(total), "up": float(up), "down": float(down)}


def mbps(size: float, seconds: float) -> float:
    return size / seconds / 1e6


# -- servers -----------------------------------------------------------------------------------


class Ours:
    """``datastore serve`` as a subprocess."""

    name = "ours"

    def __init__(
        self,
        root: Path,
        log: Path,
        log_level: str = "WARNING",
        workers: int = 1,
        env: dict[str, str] | None = None,
        tls: Tls | None = None,
    ) -> None:
        self.root, self.log_path, self.log_level = root, log, log_level
        self.workers, self.env, self.tls = workers, env or {}, tls
        #: How Python is started (bench/jobs.py --profile puts cProfile in front of the module).
        self.launcher = [sys.executable]
        self.port = free_port()
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        #: What curl needs to reach it: with TLS, the CA and the client's certificate.
        self.curl_opts = tls.curl_opts() if tls else []
        self.proc: subprocess.Popen[bytes] | None = None

    def variant(
        self, workers: int = 1, env: dict[str, str] | None = None, log_level: str | None = None, tls: Tls | None = None
    ) -> Ours:
        """The same store (root, port, log) run another way; start it after stopping this one."""
        other = Ours(self.root, self.log_path, log_level or self.log_level, workers, env, tls)
        other.port = self.port
        other.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        return other

    def start(self) -> None:
        env = {**os.environ, **OUR_ENV, **self.env}
        cmd = [*self.launcher, "-m", "datastore", "serve", "--root", str(self.root), "--port", str(self.port),
               "--workers", str(self.workers)]  # fmt: skip
        if self.tls is not None:
            cmd += ["--tls", "--cert", str(self.tls.server_cert), "--key", str(self.tls.server_key),
                    "--client-ca", str(self.tls.ca)]  # fmt: skip
        served_before = self._serving_lines()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--log-level", self.log_level], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )
        wait_http(f"{self.base}/_api/v1/health", self.proc, 30, self.curl_opts)
        # With several workers the first answers before the others listen; the serving line
        # comes once all do (measuring before that would measure one worker).
        deadline = time.monotonic() + 60
        while self._serving_lines() == served_before:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the store never said it was serving")
            time.sleep(0.05)

    def _serving_lines(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace").count("datastore: serving ")
        return 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        return [self.pid, *children(self.pid)]

    def kill(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)
        self.proc = None

    def file_url(self, name: str) -> str:
        return f"{self.base}/{PREFIX}/{name}"

    def path(self, name: str) -> Path:
        return self.root / PREFIX / name


class Nginx:
    """nginx in the foreground with a generated configuration: static GET and WebDAV PUT, on plain HTTP and
    (with ``tls``) on a second listener that requires a client certificate signed by the run's CA."""

    name = "nginx"

    def __init__(self, work: Path, root: Path, tls: Tls | None = None) -> None:
        self.work, self.root, self.tls = work, root, tls
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.tls_base = f"https://127.0.0.1:{free_port()}"
        #: What curl needs to reach its plain listener (nothing); the TLS one needs ``tls.curl_opts()``.
        self.curl_opts: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        temp = self.work / "temp"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (temp / sub).mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        user = "user root root;\n" if os.geteuid() == 0 else ""
        location = "location / { dav_methods PUT; dav_access user:rw group:r all:r; }"
        tls_server = ""
        if self.tls is not None:
            tls_server = f"""
    server {{
        listen {self.tls_base.removeprefix("https://")} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {self.tls.server_cert};
        ssl_certificate_key {self.tls.server_key};
        ssl_client_certificate {self.tls.ca};
        ssl_verify_client on;
        root {self.root};
        {location}
    }}"""
        conf = self.work / "nginx.conf"
        conf.write_text(
            f"""{user}worker_processes 2;
daemon off;
pid {self.work}/nginx.pid;
error_log {self.work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_max_body_size 0;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        {location}
    }}{tls_server}
}}
"""
        )
        with open(self.work / "stderr.log", "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "error.log")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        (self.root / ".probe").write_text("ok")
        wait_http(f"{self.base}/.probe", self.proc, 15)
        if self.tls is not None:
            wait_http(f"{self.tls_base}/.probe", self.proc, 15, self.tls.curl_opts())

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *children(self.proc.pid)]

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGQUIT)  # nginx's graceful shutdown
        self.proc = None

    def file_url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def path(self, name: str) -> Path:
        return self.root / name


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Send ``sig`` to a running ``proc`` and wait; kill it if it has not ended within 15 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, curl_opts: list[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with {proc.returncode} before answering {url}")
        with contextlib.suppress(subprocess.SubprocessError, BenchError):
            code, _ = curl([*(curl_opts or []), "--max-time", "2", url], timeout=5)
            if code == 200:
                return
        time.sleep(0.05)
    raise BenchError(f"no answer from {url} within {timeout} s")


# -- our store's API -----------------------------------------------------------------------------


def register(ours: Ours, files: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """POST a JSON manifest; (transfer key, upload URLs)."""
    proc = subprocess.run(
        [CURL, "-sS", "-f", *ours.curl_opts, f"{ours.base}/{PREFIX}/manifest", "-H", "Content-Type: application/json",
         "--data-binary", "@-"],
        input=json.dumps({"files": files}).encode(),
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BenchError(f"manifest refused: {proc.stderr.decode().strip()}")
    reply = json.loads(proc.stdout)
    return reply["transfer_key"], [f["upload_url"] for f in reply["files"]]


def listing(ours: Ours) -> dict[str, dict[str, Any]]:
    proc = subprocess.run(
        [CURL, "-sS", "-f", *ours.curl_opts, "-H", "Accept: application/json", f"{ours.base}/{PREFIX}/"],
        capture_output=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise BenchError(f"listing failed: {proc.stderr.decode().strip()}")
    return {f["name"]: f for f in json.loads(proc.stdout)["files"]}


def verify_ours(ours: Ours, expected: dict[str, tuple[int, str, str]], timeout: float = 120.0) -> None:
    """Every name is listed with its size, MD5 and SHA-256, and published on disk. The digests an
    upload did not declare are computed after it was published: this waits (bounded) until they
    are known, so that the next measurement does not share the machine with that work."""
    deadline = time.monotonic() + timeout
    listed = listing(ours)
    while any(listed.get(name, {}).get("digests") == "pending" for name in expected):
        if time.monotonic() > deadline:
            raise BenchError(f"ours: digests still pending after {timeout:.0f} s")
        time.sleep(0.05)
        listed = listing(ours)
    for name, (size, md5, sha256) in expected.items():
        entry = listed.get(name)
        if entry is None or (entry["size"], entry["md5"], entry["sha256"]) != (size, md5, sha256):
            raise BenchError(f"ours: {name} not listed as verified: {entry}")
        if ours.path(name).stat().st_size != size:
            raise BenchError(f"ours: {name} on disk has the wrong size")


def verify_nginx(nginx: Nginx, expected: dict[str, tuple[int, str, str]]) -> None:
    for name, (size, md5, sha256) in expected.items():
        path = nginx.path(name)
        if path.stat().st_size != size or hash_file(path) != (md5, sha256):
            raise BenchError(f"nginx: {name} differs from what was sent")


def delete_ours(ours: Ours, names: list[str]) -> None:
    # Anonymous uploads belong to nobody: the administrator token of the store's first start deletes them.
    token = (ours.root / ".datastore" / "admin.token").read_text().strip()
    for name in names:
        code, _ = curl(
            [*ours.curl_opts, "-X", "DELETE", "-H", f"Authorization: Bearer {token}", ours.file_url(name)], timeout=60
        )
        if code != 204:
            raise BenchError(f"ours: DELETE {name} answered {code}")


# -- the benchmarks ------------------------------------------------------------------------------


#: What a manifest may declare: both digests (as uploads did before the store hashed only what was declared).
BOTH = ("md5", "sha256")
SHA256 = ("sha256",)
MD5 = ("md5",)


@dataclass
class Source:
    path: Path
    size: int
    md5: str
    sha256: str

    def entry(self, name: str, declare: tuple[str, ...] = BOTH) -> dict[str, Any]:
        """The manifest's entry for ``name``, declaring the digests named in ``declare``."""
        digests = {"md5": self.md5, "sha256": self.sha256}
        return {"name": name, "size": self.size, **{kind: digests[kind] for kind in declare}}

    def expected(self) -> tuple[int, str, str]:
        return (self.size, self.md5, self.sha256)


@dataclass
class Measured:
    """One upload: its throughput and the server's CPU time per GiB moved."""

    mbps: float
    #: Server CPU-s per GiB from before the request to its answer.
    cpu: float
    #: Server CPU-s per GiB after the answer until the upload was verified: the digests it did not declare,
    #: computed in the background, and the listings that waited for them.
    cpu_after: float = 0.0


def per_gib(seconds: float, size: int) -> float:
    return seconds / (size / GIB)


def upload_curl(ours: Ours, src: Source, name: str, method: str, declare: tuple[str, ...] = BOTH) -> Measured:
    """Upload ``src`` whole with curl: PUT or POST (the legacy form) to the upload URL, or tus in one PATCH."""
    _, [url] = register(ours, [src.entry(name, declare)])
    args = ["-T", str(src.path), url]
    if method == "POST":
        args = ["-X", "POST", "-H", "Content-Type: application/octet-stream", *args]
    elif method == "PATCH":
        tus = ["-H", "Tus-Resumable: 1.0.0", "-H", "Content-Type: application/offset+octet-stream"]
        args = ["-X", "PATCH", *tus, "-H", "Upload-Offset: 0", *args]
    pids = ours.pids()
    before = cpu_seconds(pids)
    code, t = curl([*ours.curl_opts, *args], timeout=600)
    answered = cpu_seconds(pids)
    if code != (204 if method == "PATCH" else 200):
        raise BenchError(f"ours: {method} upload answered {code}")
    verify_ours(ours, {name: src.expected()})
    done = cpu_seconds(pids)
    return Measured(mbps(src.size, t["time"]), per_gib(answered - before, src.size), per_gib(done - answered, src.size))


async def tus_upload(url: str, path: Path, start: int, stop: int, session: aiohttp.ClientSession) -> int:
    """PATCH bytes [start, stop) of ``path`` in TUS_CHUNK pieces; return the last Upload-Offset."""
    offset = start
    with open(path, "rb") as handle:
        handle.seek(start)
        for _ in range((stop - start + TUS_CHUNK - 1) // TUS_CHUNK):
            chunk = handle.read(min(TUS_CHUNK, stop - offset))
            headers = {
                "Tus-Resumable": "1.0.0",
                "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": str(offset),
            }
            async with session.patch(url, data=chunk, headers=headers) as response:
                if response.status != 204:
                    raise BenchError(f"ours: PATCH at {offset} answered {response.status} {response.reason}")
                offset = int(response.headers["Upload-Offset"])
    if offset != stop:
        raise BenchError(f"ours: tus upload stopped at {offset}, not {stop}")
    return offset


async def _tus_whole(url: str, src: Source) -> float:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await tus_upload(url, src.path, 0, src.size, session)
        return time.perf_counter() - started


def upload_tus(ours: Ours, src: Source, name: str, declare: tuple[str, ...] = BOTH) -> Measured:
    """Upload ``src`` by tus in TUS_CHUNK PATCHes (aiohttp)."""
    _, [url] = register(ours, [src.entry(name, declare)])
    pids = ours.pids()
    before = cpu_seconds(pids)
    seconds = asyncio.run(_tus_whole(url, src))
    answered = cpu_seconds(pids)
    verify_ours(ours, {name: src.expected()})
    done = cpu_seconds(pids)
    return Measured(mbps(src.size, seconds), per_gib(answered - before, src.size), per_gib(done - answered, src.size))


def upload_nginx(nginx: Nginx, src: Source, name: str, tls: bool = False) -> Measured:
    """PUT ``src`` to nginx (curl -T), on its TLS listener with ``tls``."""
    url, opts = (f"{nginx.tls_base}/{name}", nginx_tls(nginx).curl_opts()) if tls else (nginx.file_url(name), [])
    pids = nginx.pids()
    before = cpu_seconds(pids)
    code, t = curl([*opts, "-T", str(src.path), url], timeout=600)
    answered = cpu_seconds(pids)
    if code not in (201, 204):
        raise BenchError(f"nginx: PUT answered {code}")
    verify_nginx(nginx, {name: src.expected()})
    return Measured(mbps(src.size, t["time"]), per_gib(answered - before, src.size))


def nginx_tls(nginx: Nginx) -> Tls:
    if nginx.tls is None:
        raise BenchError("nginx runs without its TLS listener")
    return nginx.tls


def download(url: str, size: int, curl_opts: list[str] | None = None) -> float:
    code, t = curl([*(curl_opts or []), url], timeout=600)
    if code != 200 or int(t["down"]) != size:
        raise BenchError(f"GET {url} answered {code} with {t['down']:.0f} bytes")
    return mbps(size, t["time"])


def md5_rate(path: Path) -> float:
    """MB/s of hashlib's MD5 over the file at ``path`` in this process, one thread (the file is in the page
    cache; reading it in 8 MiB blocks is part of the time)."""
    md5 = hashlib.md5(usedforsecurity=False)
    buffer = bytearray(8 * MIB)
    view = memoryview(buffer)
    size = 0
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            md5.update(view[:count])
            size += count
    seconds = time.perf_counter() - started
    if size != path.stat().st_size:
        raise BenchError(f"read {size} bytes of {path.name}")
    return mbps(size, seconds)


def download_hash(url: str, curl_opts: list[str] | None = None) -> tuple[str, str]:
    """Download once through curl and hash what arrives (verification, not timed)."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with subprocess.Popen([CURL, "-sS", "-f", *(curl_opts or []), url], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while block := proc.stdout.read(4 * MIB):
            md5.update(block)
            sha256.update(block)
    if proc.returncode != 0:
        raise BenchError(f"GET {url} failed")
    return md5.hexdigest(), sha256.hexdigest()


def small_gets(url: str, seconds: int, connections: int) -> tuple[float, str]:
    """Requests per second of GETs of ``url``; wrk if installed, else (smoke runs) an aiohttp loop."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return asyncio.run(_aiohttp_gets(url, seconds, connections)), "aiohttp (wrk not installed)"
    threads = max(1, min(os.cpu_count() or 1, connections))
    proc = subprocess.run(
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if proc.returncode != 0:
        raise BenchError(f"wrk failed: {proc.stderr.strip()}")
    if "Non-2xx" in proc.stdout or "Socket errors" in proc.stdout:
        raise BenchError(f"wrk saw errors:\n{proc.stdout}")
    found = re.search(r"Requests/sec:\s*([0-9.]+)", proc.stdout)
    if found is None:
        raise BenchError(f"wrk output not understood:\n{proc.stdout}")
    return float(found.group(1)), "wrk"


async def _aiohttp_gets(url: str, seconds: int, connections: int) -> float:
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            async with session.get(url) as response:
                await response.read()
                if response.status != 200:
                    raise BenchError(f"GET {url} answered {response.status}")
                count += 1

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return count / (time.perf_counter() - started)


async def _concurrent_puts(urls: list[str], bodies: list[bytes], ok: tuple[int, ...]) -> tuple[float, int]:
    """PUT every body at once; (seconds, 503 retries)."""
    retries = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)

    async def put(session: aiohttp.ClientSession, url: str, body: bytes) -> None:
        nonlocal retries
        for _ in range(50):
            async with session.put(url, data=body, headers={"Content-Type": "application/octet-stream"}) as reply:
                await reply.read()
                if reply.status in ok:
                    return
                if reply.status != 503:
                    raise BenchError(f"PUT {url} answered {reply.status} {reply.reason}")
            retries += 1
            await asyncio.sleep(float(reply.headers.get("Retry-After", "1")))
        raise BenchError(f"PUT {url}: still 503 after 50 tries")

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(put(session, url, body) for url, body in zip(urls, bodies, strict=True)))
        return time.perf_counter() - started, retries


def make_bodies(count: int, size: int) -> tuple[list[bytes], list[tuple[int, str, str]]]:
    """``count`` distinct bodies (a shared random block with a unique head) and their digests."""
    base = os.urandom(size)
    bodies, digests = [], []
    for i in range(count):
        body = f"{i:016d}".encode() + base[16:]
        bodies.append(body)
        digests.append((size, hashlib.md5(body, usedforsecurity=False).hexdigest(), hashlib.sha256(body).hexdigest()))
    return bodies, digests


async def idle_connection_cost(server: Any, count: int) -> float:
    """KiB of server RSS per keep-alive connection left idle after one request (``count`` of them)."""
    host, port, path = "127.0.0.1", server.port, urlsplit(server.file_url("small.bin")).path
    before = rss_kib(server.pids())
    connections = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(host, port)
            connections.append((reader, writer))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        for reader, _ in connections:
            head = await reader.readuntil(b"\r\n\r\n")
            found = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            await reader.readexactly(int(found[1]) if found else 0)
        return (rss_kib(server.pids()) - before) / count
    finally:
        for _, writer in connections:
            writer.close()


def manifest_rate(ours: Ours, count: int, run: int) -> float:
    files = [{"name": f"m{run}-{i:05d}.bin", "size": 1, "md5": "0" * 32, "sha256": "0" * 64} for i in range(count)]
    body = json.dumps({"files": files}).encode()
    cmd = [CURL, "-sS", f"{ours.base}/{PREFIX}/manifest", "-H", "Content-Type: application/json"]
    started = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--data-binary", "@-", "-w", "\n%{http_code}"], input=body, capture_output=True, timeout=300
    )
    seconds = time.perf_counter() - started
    text, _, code = proc.stdout.decode().rpartition("\n")
    if proc.returncode != 0 or code != "201":
        raise BenchError(f"ours: {count}-file manifest answered {code}: {text[:200]}")
    reply = json.loads(text)
    if len(reply["files"]) != count:
        raise BenchError("ours: manifest reply lists the wrong number of files")
    # Release the reservations again.
    code_cancel, _ = curl(["-X", "DELETE", f"{ours.base}/_api/v1/transfers/{reply['transfer_key']}"], timeout=120)
    if code_cancel not in (200, 204):
        raise BenchError(f"ours: cancelling the manifest answered {code_cancel}")
    return count / seconds


_REHASH_LOG = re.compile(r"re-hashed (\d+) staged bytes of (\S+) in ([0-9.]+) s")


def resume_after_crash(work: Path, staged: int, run: int) -> tuple[float, float]:
    """Stage ``staged`` bytes by tus, SIGKILL the server, restart it, resume.

    Returns (seconds the server logged for re-hashing the staged prefix, seconds of the resuming PATCH
    as the client saw them, which include the re-hash, the last chunk, verification and publishing).
    """
    root = work / f"resume-{run}"
    src_path = work / f"resume-{run}.bin"
    total = staged + TUS_CHUNK
    md5, sha256 = write_random(src_path, total)
    server = Ours(root, work / f"resume-{run}.log", log_level="INFO")
    try:
        server.start()
        _, [url] = register(server, [{"name": "resume.bin", "size": total, "md5": md5, "sha256": sha256}])

        async def stage() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
                await tus_upload(url, src_path, 0, staged, session)

        asyncio.run(stage())
        server.kill(signal.SIGKILL)
        server.start()

        async def resume() -> float:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
                async with session.head(url, headers={"Tus-Resumable": "1.0.0"}) as reply:
                    offset = int(reply.headers["Upload-Offset"])
                if offset != staged:
                    raise BenchError(f"ours: after the crash the upload is at {offset}, not {staged}")
                started = time.perf_counter()
                await tus_upload(url, src_path, staged, total, session)
                return time.perf_counter() - started

        client_seconds = asyncio.run(resume())
        verify_ours(server, {"resume.bin": (total, md5, sha256)})
        # Read once it is there (bounded), not assumed written by the time the answer arrived.
        deadline = time.monotonic() + 10
        while not (
            logged := [m for m in _REHASH_LOG.finditer(server.log_path.read_text()) if int(m.group(1)) == staged]
        ):
            if time.monotonic() > deadline:
                raise BenchError("ours: no re-hash of the staged bytes in the server's log")
            time.sleep(0.05)
        return float(logged[-1].group(3)), client_seconds
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)
        src_path.unlink(missing_ok=True)


def dd_reference(work: Path, size_mib: int) -> float:
    target = work / "dd.bin"
    try:
        proc = subprocess.run(
            ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={size_mib}", "conv=fdatasync"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        found = re.search(r"copied, ([0-9.,e-]+) s", proc.stderr)
        if proc.returncode != 0 or found is None:
            raise BenchError(f"dd failed: {proc.stderr.strip()}")
        return mbps(size_mib * MIB, float(found.group(1).replace(",", ".")))
    finally:
        target.unlink(missing_ok=True)


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Plan:
    runs: int
    size_mib: int
    wrk_seconds: int
    wrk_connections: int
    concurrent: int
    concurrent_size: int
    manifest_files: int
    resume_mib: int
    nginx: bool
    idle_connections: int = 1000


def make_rows(plan: Plan) -> dict[str, Row]:
    size = f"{plan.size_mib} MiB" if plan.size_mib < 1024 else f"{plan.size_mib / 1024:g} GiB"
    conc = f"{plan.concurrent_size // MIB} MiB" if plan.concurrent_size >= MIB else f"{plan.concurrent_size >> 10} KiB"
    gets = f"4 KiB GETs, {plan.wrk_connections} connections, {plan.wrk_seconds} s"

    def cpu(row_id: str, what: str) -> Row:
        """Server CPU per GiB for the upload of row ``row_id`` (nginx's: its PUT's)."""
        return Row(f"{row_id}_cpu", f"server CPU: {what}, request to answer", "CPU-s/GiB", higher_is_better=False)

    rows = [
        Row("disk_dd", f"disk reference: dd {size} conv=fdatasync", "MB/s", notes=["same value in both columns"]),
        Row("hashlib_md5", f"MD5 reference: hashlib.md5 over the {size} file in the bench's process, one core",
            "MB/s"),
        Row("upload_put", f"upload {size}, PUT (curl -T) declaring MD5 and SHA-256 (both inline, as before), "
            "vs nginx PUT", "MB/s"),
        cpu("upload_put", "PUT declaring MD5 and SHA-256"),
        Row("upload_put_sha256", f"upload {size}, PUT (curl -T) declaring SHA-256 only, vs nginx PUT", "MB/s",
            target="≥ 1.2× nginx", check=ratio_at_least(1.2)),
        cpu("upload_put_sha256", "PUT declaring SHA-256 only"),
        Row("upload_put_sha256_after_cpu", "server CPU: PUT declaring SHA-256 only, after the answer until its MD5 "
            "is known (background digest)", "CPU-s/GiB", higher_is_better=False),
        Row("upload_tus1_sha256", f"upload {size}, tus in one PATCH (curl) declaring SHA-256 only, vs nginx PUT",
            "MB/s", target="≥ 1.2× nginx", check=ratio_at_least(1.2)),
        cpu("upload_tus1_sha256", "tus one PATCH declaring SHA-256 only"),
        Row("upload_tus8_sha256", f"upload {size}, tus in 8 MiB PATCHes (aiohttp) declaring SHA-256 only, "
            "vs nginx PUT (curl)", "MB/s", target="≥ 0.6× nginx", check=ratio_at_least(0.6)),
        cpu("upload_tus8_sha256", "tus 8 MiB PATCHes declaring SHA-256 only"),
        Row("upload_post_md5", f"upload {size}, legacy POST (curl) declaring MD5 only, vs nginx PUT", "MB/s"),
        cpu("upload_post_md5", "legacy POST declaring MD5 only"),
        Row("upload_post_md5_vs_md5", "legacy POST declaring MD5 only ÷ the hashlib MD5 row, run by run", "×",
            target="≥ 0.75", check=median_at_least(0.75)),
        Row("upload_put_sha256_nofsync", f"upload {size}, PUT (curl -T) declaring SHA-256 only, fsync off "
            "(the cost of durability)", "MB/s"),
        Row("upload_put_sha256_vs_dd", "PUT declaring SHA-256 only ÷ the dd row, run by run", "×", target="≥ 0.8",
            check=median_at_least(0.8)),
        Row("download", f"download {size} (curl), vs nginx GET", "MB/s", target="≥ 1.0× nginx",
            check=ratio_at_least(1.0)),
        Row("small_gets", f"{gets}, one process, log level WARNING", "req/s"),
        Row("small_gets_w2", f"{gets}, --workers 2, log level WARNING", "req/s", target="≥ 0.25× nginx",
            check=ratio_at_least(0.25)),
        Row("small_gets_w2_info", f"{gets}, --workers 2, log level INFO (the default: one access-log line a "
            "request)", "req/s", target="≥ 0.3× nginx", check=ratio_at_least(0.3)),
        Row("concurrent_upload", f"{plan.concurrent} concurrent uploads of {conc} (aiohttp PUT) declaring SHA-256 "
            "only, all verified", "MB/s", target="≥ 0.8× nginx, all verified", check=ratio_at_least(0.8)),
        cpu("concurrent_upload", f"{plan.concurrent} concurrent PUTs declaring SHA-256 only"),
        Row("concurrent_rss", f"peak RSS during the {plan.concurrent} uploads", "MiB", higher_is_better=False,
            target="< 200 MiB", check=median_at_most(200)),
        Row("tls_upload_put_sha256", f"mutual TLS: upload {size}, PUT (curl -T) declaring SHA-256 only, "
            "vs nginx PUT over TLS", "MB/s", target="≥ 1.0× nginx", check=ratio_at_least(1.0)),
        cpu("tls_upload_put_sha256", "PUT over mutual TLS declaring SHA-256 only"),
        Row("tls_download", f"mutual TLS: download {size} (curl), vs nginx GET over TLS", "MB/s",
            target="≥ 0.8× nginx", check=ratio_at_least(0.8)),
        Row("idle_connection_rss", f"RSS per idle keep-alive connection ({plan.idle_connections} open)", "KiB",
            higher_is_better=False),
        Row("manifest", f"register a {plan.manifest_files}-file JSON manifest", "files/s", target="≥ 20,000 files/s",
            check=median_at_least(20_000)),
        Row("resume_rehash", f"resume after SIGKILL: re-hash {plan.resume_mib} MiB staged, declaring MD5 and "
            "SHA-256 (server log)", "s", higher_is_better=False, target="≤ 5 s per GiB",
            check=median_at_most(5 * plan.resume_mib / 1024)),
        Row("resume_patch", "resume after SIGKILL: first PATCH (8 MiB) incl. re-hash, verify, publish", "s",
            higher_is_better=False),
    ]  # fmt: skip
    return {row.id: row for row in rows}


#: Our whole-body uploads of the large file: (row, how, what its manifest declares).
OUR_UPLOADS = (
    ("upload_put", "PUT", BOTH),
    ("upload_put_sha256", "PUT", SHA256),
    ("upload_tus1_sha256", "PATCH", SHA256),
    ("upload_tus8_sha256", "tus", SHA256),
    ("upload_post_md5", "POST", MD5),
)


def record(row: Row, cpu_row: Row | None, server: Any, ours: Ours, measured: Measured) -> None:
    """Put an upload's throughput and CPU per GiB into the column of ``server``."""
    (row.ours if server is ours else row.nginx).append(measured.mbps)
    if cpu_row is not None:
        (cpu_row.ours if server is ours else cpu_row.nginx).append(measured.cpu)


def our_uploads(ours: Ours, src: Source, run: int, rows: dict[str, Row]) -> None:
    """Each of OUR_UPLOADS once, the hashlib reference beside them, and the PUT with fsync off."""
    for route, how, declare in OUR_UPLOADS:
        name = f"{route}-{run}.bin"
        tus = how == "tus"
        measured = upload_tus(ours, src, name, declare) if tus else upload_curl(ours, src, name, how, declare)
        delete_ours(ours, [name])
        record(rows[route], rows[f"{route}_cpu"], ours, ours, measured)
        if route == "upload_put_sha256":
            rows["upload_put_sha256_after_cpu"].ours.append(measured.cpu_after)
        if route == "upload_post_md5":
            # The reference right after the upload it is compared with, on the same (page-cached) file.
            rows["hashlib_md5"].ours.append(md5_rate(src.path))
            rows["upload_post_md5_vs_md5"].ours.append(measured.mbps / rows["hashlib_md5"].ours[-1])
    with restarted(ours, env={"DATASTORE_FSYNC": "false"}) as unsynced:
        name = f"nofsync-{run}.bin"
        rows["upload_put_sha256_nofsync"].ours.append(upload_curl(unsynced, src, name, "PUT", SHA256).mbps)
        delete_ours(unsynced, [name])


def tls_rows(server: Any, ours: Ours, tls: Tls, src: Source, run: int, rows: dict[str, Row]) -> None:
    """Upload and download the large file over mutual TLS: ours restarted with ``--tls``, nginx's TLS listener."""
    upload, cpu, down = rows["tls_upload_put_sha256"], rows["tls_upload_put_sha256_cpu"], rows["tls_download"]
    name = f"tls-{run}.bin"
    if server is ours:
        with restarted(ours, tls=tls) as secure:
            if run == 0:
                down.notes.append(f"ours: {tls_session(secure.file_url('small.bin'), tls)}")
            record(upload, cpu, ours, ours, upload_curl(secure, src, name, "PUT", SHA256))
            delete_ours(secure, [name])
            down.ours.append(download(secure.file_url("big.bin"), src.size, secure.curl_opts))
    else:
        if run == 0:
            down.notes.append(f"nginx: {tls_session(f'{server.tls_base}/small.bin', tls)}")
        record(upload, cpu, server, ours, upload_nginx(server, src, name, tls=True))
        server.path(name).unlink()
        down.nginx.append(download(f"{server.tls_base}/big.bin", src.size, tls.curl_opts()))


def run(plan: Plan, work: Path, log: Callable[[str], None]) -> dict[str, Row]:
    rows = make_rows(plan)
    tls = make_tls(work / "certs")
    ours = Ours(work / "ours", work / "ours.log")
    nginx = Nginx(work / "nginx", work / "nginx" / "root", tls) if plan.nginx else None
    try:
        ours.start()
        if nginx is not None:
            nginx.start()
        log(f"ours on {ours.base} (pid {ours.pid}); nginx on {f'{nginx.base} and {nginx.tls_base}' if nginx else '-'}")
        src = Source(work / "big.bin", plan.size_mib * MIB, *write_random(work / "big.bin", plan.size_mib * MIB))
        small = Source(work / "small.bin", 4096, *write_random(work / "small.bin", 4096))
        bodies, digests = make_bodies(plan.concurrent, plan.concurrent_size)

        # Files the GET benchmarks read, published once and verified by downloading them.
        _, [url_big, url_small] = register(ours, [src.entry("big.bin"), small.entry("small.bin")])
        for url, path in ((url_big, src.path), (url_small, small.path)):
            code, _ = curl(["-T", str(path), url], timeout=600)
            if code != 200:
                raise BenchError(f"ours: publishing {path.name} answered {code}")
        servers: list[Any] = [ours]
        if nginx is not None:
            shutil.copyfile(src.path, nginx.path("big.bin"))
            shutil.copyfile(small.path, nginx.path("small.bin"))
            servers.append(nginx)
        for server in servers:
            if download_hash(server.file_url("big.bin")) != (src.md5, src.sha256):
                raise BenchError(f"{server.name}: big.bin downloads with other bytes")
        if nginx is not None and download_hash(f"{nginx.tls_base}/big.bin", tls.curl_opts()) != (src.md5, src.sha256):
            raise BenchError("nginx: big.bin downloads over TLS with other bytes")
        with restarted(ours, tls=tls) as secure:
            if download_hash(secure.file_url("big.bin"), secure.curl_opts) != (src.md5, src.sha256):
                raise BenchError("ours: big.bin downloads over TLS with other bytes")

        for i in range(plan.runs):
            order = servers if i % 2 == 0 else servers[::-1]
            log(f"run {i + 1}/{plan.runs}: order {', '.join(s.name for s in order)}")
            rows["disk_dd"].ours.append(dd_reference(work, plan.size_mib))
            if nginx is not None:
                rows["disk_dd"].nginx.append(rows["disk_dd"].ours[-1])
            for server in order:
                if server is ours:
                    our_uploads(ours, src, i, rows)
                else:
                    measured = upload_nginx(server, src, f"put-{i}.bin")
                    for route, _, _ in OUR_UPLOADS:
                        record(rows[route], rows[f"{route}_cpu"], server, ours, measured)
                    server.path(f"put-{i}.bin").unlink()
            rows["upload_put_sha256_vs_dd"].ours.append(rows["upload_put_sha256"].ours[-1] / rows["disk_dd"].ours[-1])
            for server in order:
                column = rows["download"].ours if server is ours else rows["download"].nginx
                column.append(download(server.file_url("big.bin"), src.size))
            for server in order:
                rate, client = small_gets(server.file_url("small.bin"), plan.wrk_seconds, plan.wrk_connections)
                if server is ours:
                    rows["small_gets"].ours.append(rate)
                    for route, level in (("small_gets_w2", "WARNING"), ("small_gets_w2_info", "INFO")):
                        with restarted(ours, workers=2, log_level=level) as two:
                            rate, _ = small_gets(two.file_url("small.bin"), plan.wrk_seconds, plan.wrk_connections)
                            rows[route].ours.append(rate)
                else:
                    for route in ("small_gets", "small_gets_w2", "small_gets_w2_info"):
                        rows[route].nginx.append(rate)
                if client != "wrk" and client not in rows["small_gets"].notes:
                    rows["small_gets"].notes.append(client)
            for server in order:
                measured, peak, retries = concurrent_uploads(server, ours, i, bodies, digests)
                record(rows["concurrent_upload"], rows["concurrent_upload_cpu"], server, ours, measured)
                (rows["concurrent_rss"].ours if server is ours else rows["concurrent_rss"].nginx).append(peak)
                if retries:
                    rows["concurrent_upload"].notes.append(f"run {i + 1}: {server.name} answered 503 {retries}×")
            for server in order:
                tls_rows(server, ours, tls, src, i, rows)
            rows["manifest"].ours.append(manifest_rate(ours, plan.manifest_files, i))
            for server in order:
                if server is ours:
                    # A fresh process: one that ran the uploads above has freed memory to reuse.
                    with restarted(ours) as fresh:
                        rows["idle_connection_rss"].ours.append(
                            asyncio.run(idle_connection_cost(fresh, plan.idle_connections))
                        )
                else:
                    rows["idle_connection_rss"].nginx.append(
                        asyncio.run(idle_connection_cost(server, plan.idle_connections))
                    )
            rehash, patch = resume_after_crash(work, plan.resume_mib * MIB, i)
            rows["resume_rehash"].ours.append(rehash)
            rows["resume_patch"].ours.append(patch)
            log("  " + "; ".join(f"{r.id} {r.ours[-1]:.2f}" for r in rows.values() if r.ours))
    finally:
        ours.kill()
        if nginx is not None:
            nginx.kill()
    return rows


@contextlib.contextmanager
def restarted(
    ours: Ours,
    workers: int = 1,
    env: dict[str, str] | None = None,
    log_level: str | None = None,
    tls: Tls | None = None,
) -> Iterator[Ours]:
    """Run the store another way for a while (same root and port), then as before."""
    ours.kill()
    other = ours.variant(workers, env, log_level, tls)
    other.start()
    try:
        yield other
    finally:
        other.kill()
        ours.start()


def concurrent_uploads(
    server: Any, ours: Ours, run: int, bodies: list[bytes], digests: list[tuple[int, str, str]]
) -> tuple[Measured, float, int]:
    """(aggregate throughput and server CPU per GiB, peak RSS MiB, 503 retries) for len(bodies) PUTs at once,
    every file verified; our manifest declares SHA-256 only."""
    names = [f"c{run}-{i:03d}.bin" for i in range(len(bodies))]
    expected = dict(zip(names, digests, strict=True))
    if server is ours:
        _, urls = register(ours, [{"name": n, "size": s, "sha256": h} for n, (s, _, h) in expected.items()])
        ok: tuple[int, ...] = (200,)
    else:
        urls = [server.file_url(n) for n in names]
        ok = (201, 204)
    pids = server.pids()
    before = cpu_seconds(pids)
    with peak_rss(server.pids) as peak:
        seconds, retries = asyncio.run(_concurrent_puts(urls, bodies, ok))
    cpu = cpu_seconds(pids) - before
    if server is ours:
        verify_ours(ours, expected)
        delete_ours(ours, names)
    else:
        verify_nginx(server, expected)
        for name in names:
            server.path(name).unlink()
    size = sum(len(b) for b in bodies)
    return Measured(mbps(size, seconds), per_gib(cpu, size)), peak[0] / 1024, retries


# -- reporting -----------------------------------------------------------------------------------


def command_version(cmd: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        text = (proc.stdout + proc.stderr).strip().splitlines()
        return text[0] if text else ""
    return "not installed"


def machine(work: Path) -> dict[str, Any]:
    mem_kib = 0
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from datastore import __version__

    commit = command_version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    fs = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        fs = " ".join(subprocess.run(["df", "--output=source,fstype", str(work)], capture_output=True, text=True,
                                     timeout=10).stdout.split()[2:])  # fmt: skip
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "filesystem": fs,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "datastore": f"{__version__} ({commit})",
        "nginx": command_version(["nginx", "-v"]).replace("nginx version: nginx/", ""),
        "curl": " ".join(command_version([CURL, "--version"]).split()[:2]),
        "wrk": " ".join(command_version(["wrk", "-v"]).split()[:2]).replace("debian/", ""),
    }


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def table_line(row: Row, compared: str) -> str:
    """A row of a results table: what, unit, ours, ``compared`` (the other column), ratio, target and whether met."""
    data = row.as_json()
    ratio = "—" if data["ratio_ours_nginx"] is None else f"{data['ratio_ours_nginx']:.2f}"
    target = row.target or "—"
    if data["target_met"] is not None:
        target += " ✓" if data["target_met"] else " ✗"
    return f"| {row.what} | {row.unit} | {cell(row.ours)} | {compared} | {ratio} | {target} |"


#: Where results.md breaks into parts: before every ``## `` title line (the head, run.py's, has none).
SECTION_BREAK = re.compile(r"\n(?=## )")


def merge_section(out: Path, prefix: str, rows: dict[str, Row], extra: dict[str, Any], section: str) -> None:
    """Put one script's part into results.json and results.md in ``out``, replacing its earlier part where it
    stands and keeping every other part byte for byte, in its order.

    bench/jobs.py and bench/cluster.py name their rows' ids with a ``prefix`` and store ``extra`` under the
    prefix's name; a ``section`` starts with its ``## `` title line and replaces the section of that title (a
    new one goes last). run.py's part has the prefix ``""``: ``extra`` holds its top-level keys (first in the
    file), its rows are those that no other part's prefix (another top-level key, with ``_``) claims, and its
    ``section`` is the head of results.md, everything before the first ``## `` line.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    old: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if prefix:
        result = {**old, "rows": [], prefix.rstrip("_"): extra}
        others: tuple[str, ...] = ()
    else:
        result = {**extra, "rows": [], **{k: v for k, v in old.items() if k not in extra}}
        others = tuple(f"{k}_" for k in old if k not in extra and k != "rows")

    def owned(row: dict[str, Any]) -> bool:
        row_id = str(row.get("id", ""))
        return row_id.startswith(prefix) if prefix else not row_id.startswith(others)

    old_rows: list[dict[str, Any]] = old.get("rows", [])
    kept = [row for row in old_rows if not owned(row)]
    # Where the earlier rows of this part began (the rows before them are all kept); else first or last.
    at = next((i for i, row in enumerate(old_rows) if owned(row)), len(kept) if prefix else 0)
    result["rows"] = kept[:at] + [row.as_json() for row in rows.values()] + kept[at:]
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    md = out / "results.md"
    parts = SECTION_BREAK.split(md.read_text()) if md.exists() else ["# Benchmark results\n"]
    part = section.rstrip("\n") + "\n"
    title = part.split("\n", 1)[0]
    if not prefix:
        if title.startswith("## ") or SECTION_BREAK.search(part):
            raise ValueError("run.py's head of results.md must have no ## title line")
        if parts[0].startswith("## "):
            parts.insert(0, part)
        else:
            parts[0] = part
        md.write_text("\n".join(parts))
        return
    if not title.startswith("## ") or SECTION_BREAK.search(part):
        raise ValueError(f"a section has one ## title line, its first, not {title!r}")
    same = [i for i, p in enumerate(parts) if p.startswith("## ") and p.split("\n", 1)[0] == title]
    if same:
        parts[same[0]] = part
        parts = [p for i, p in enumerate(parts) if i not in same[1:]]
    else:
        parts[-1] += "" if parts[-1].endswith("\n") else "\n"
        parts.append(part)
    md.write_text("\n".join(parts))


def markdown(info: dict[str, Any], plan: Plan, rows: dict[str, Row], note: str) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"{info['date']}; `{info['command']}`; {plan.runs} run(s) per server, alternating.",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gib']} GiB RAM, Linux {info['kernel']}, "
        f"{info['filesystem']}. Python {info['python']}, aiohttp {info['aiohttp']}, datastore {info['datastore']}, "
        f"nginx {info['nginx']}, {info['curl']}, {info['wrk']}.",
        "",
        "| what | unit | ours median (min–max) | nginx median (min–max) | ratio ours/nginx | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [table_line(row, cell(row.nginx)) for row in rows.values()]
    lines += [
        "",
        "Notes:",
        "",
        "- MB/s are 10^6 bytes per second. Upload times are curl's `time_total` (tus in 8 MiB PATCHes: the "
        "client's time from the first PATCH to the last answer); each upload is then verified outside the timed "
        "part (our listing's MD5 and SHA-256, once the digests the upload did not declare are known; for nginx "
        "the stored file is hashed).",
        "- What an upload's manifest declares is what our server hashes while it receives it; it computes the "
        "other digest after publishing, in a thread of the lowest CPU priority, and the bench waits for it "
        "before measuring anything else. The both-digests PUT row is kept for continuity with earlier tables.",
        "- CPU-s/GiB: user + system time of all the server's processes (/proc/PID/stat), read before the "
        "request and after its answer, divided by the GiB moved (lower is better). The background-digest row "
        "reads it again once the upload is verified: it counts the MD5 computed after the answer and the "
        "listings (one every 50 ms) that waited for it. nginx's upload CPU rows repeat its one PUT of the run.",
        "- The hashlib MD5 row hashes the large file (in the page cache, read in 8 MiB blocks) with one thread "
        "of the bench's own process, right after the MD5-only POST; the ratio row divides the two, run by run.",
        "- Our server runs with its defaults (fsync of every file and directory before answering) plus "
        f"{', '.join(f'{k}={v}' for k, v in OUR_ENV.items())} so that 200 uploads may run at once (the default "
        "is 64; beyond it the server answers 503) and one client (the bench) may hold 1000 connections, and at "
        "log level WARNING except in the INFO row. nginx (2 workers, sendfile, WebDAV PUT with its body temp "
        "path on the same disk, no access log) neither hashes nor fsyncs.",
        "- Client and servers share the machine's CPUs; on loopback the CPU, not the network, is the limit.",
        "- Mutual TLS: a CA, a server certificate for 127.0.0.1 and a client certificate (P-256) are minted for "
        "the run; our store is restarted with `--tls --cert --key --client-ca` on its port, nginx has a second "
        "listener with `ssl_verify_client on`, the same files and TLS 1.2 and 1.3 (its default stops at 1.2); "
        "curl passes `--cacert --cert --key`. Each request is a new connection with a full handshake. The "
        "protocol and cipher curl negotiated are below.",
        "- The resume rows: a tus upload is staged, the server is killed with SIGKILL and restarted, and the next "
        "PATCH re-hashes the staged bytes (the page cache survives a process crash, so they are read from memory).",
        "- The fsync-off row runs the same store restarted with DATASTORE_FSYNC=false; the --workers 2 rows "
        "restart it with `--workers 2` at log level WARNING, then INFO (nginx's column repeats its one small-GET "
        "figure of the run).",
        "- Targets are the performance issues' (issue 14 for the rows that say what they declare, the mutual TLS "
        "rows, the INFO row and the concurrent uploads); ✓/✗ compares the medians.",
    ]
    for row in rows.values():
        for item in row.notes:
            if item != "same value in both columns" or row.nginx:
                lines.append(f"- {row.id}: {item}")
    if note:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=None, help="runs per server (default 5; --quick: 1)")
    parser.add_argument("--size-mib", type=int, default=None, help="size of the large file (default 1024)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 run, short wrk: a smoke run")
    parser.add_argument("--no-nginx", action="store_true", help="measure our server only")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.md and results.json go")
    parser.add_argument("--tmpdir", type=Path, default=None, help="work directory's parent (default: $TMPDIR)")
    parser.add_argument("--note", default="", help="a line added to the notes of results.md")
    args = parser.parse_args(argv)
    quick = args.quick
    plan = Plan(
        runs=args.runs or (1 if quick else 5),
        size_mib=args.size_mib or (4 if quick else 1024),
        wrk_seconds=1 if quick else 10,
        wrk_connections=50,
        concurrent=20 if quick else 200,
        concurrent_size=(256 << 10) if quick else 8 * MIB,
        manifest_files=1000 if quick else 10_000,
        resume_mib=args.size_mib or (4 if quick else 1024),
        nginx=not args.no_nginx,
        idle_connections=50 if quick else 1000,
    )
    if plan.runs < 1 or plan.size_mib < 1:
        parser.error("--runs and --size-mib must be positive")
    if plan.nginx and shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        parser.error("nginx is not installed: run `make bench` (installs it) or pass --no-nginx")

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="datastore-bench-", dir=args.tmpdir))
    try:
        info = machine(work)
        info["command"] = " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])])
        started = time.monotonic()
        try:
            rows = run(plan, work, log)
        except BenchError:
            for name in ("ours.log", "nginx/error.log"):
                with contextlib.suppress(OSError):
                    print(f"--- {name} (tail) ---\n" + "\n".join((work / name).read_text().splitlines()[-20:]))
            raise
        info["duration_s"] = round(time.monotonic() - started, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = markdown(info, plan, rows, args.note)
    # Its rows and the head of results.md; the sections of bench/jobs.py and bench/cluster.py stay.
    merge_section(args.out, "", rows, {"machine": info, "plan": plan.__dict__, "our_env": OUR_ENV}, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
