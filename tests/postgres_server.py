"""A PostgreSQL cluster of the tests' own, never one the machine already runs.

:func:`start_cluster` makes one with Debian's ``initdb`` in a temporary directory and starts it with
``pg_ctl`` on a loopback port the kernel picked, with its socket in that directory; as root it runs
as Debian's ``postgres`` user (PostgreSQL refuses to run as root). :meth:`Cluster.stop` ends it by its
postmaster's PID. Each test that needs PostgreSQL gets a database of its own
(:meth:`Cluster.database`), dropped after it. The cluster trades durability for speed (``fsync``
off): what the tests check is the store's logic on a real server, not PostgreSQL's crash safety.

One cluster serves the whole session: :func:`shared_cluster` starts it at the first test that asks,
and ``conftest.py`` stops it (:func:`stop_shared`) when the session ends.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

#: The superuser the cluster is made with (it trusts connections from loopback only).
USER = "datastore"


def pg_binary(name: str) -> str:
    """Debian's ``initdb`` or ``pg_ctl`` (the newest installed major version); the test fails (never
    skips) without them."""
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if versions:
        return str(versions[-1])
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found: run 'make test' (it installs Debian's postgresql) or 'apt-get install postgresql'"
        )
    return found


@dataclass
class Cluster:
    """A running cluster: its data directory, port and postmaster's PID."""

    directory: Path
    port: int
    pid: int

    def url(self, database: str) -> str:
        """The URL a store is given to use ``database``."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new empty database for one test (its URL); dropped after it, with whatever still uses it."""
        name = f"test_{secrets.token_hex(6)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.url(name)
        finally:
            with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self, timeout: float = 30.0) -> None:
        """End the cluster by its postmaster's PID (a fast shutdown) and wait until it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while _alive(self.pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                break
            time.sleep(0.05)


def start_cluster(directory: Path, timeout: float = 60.0, *, durable: bool = False) -> Cluster:
    """``initdb`` in ``directory`` and start the cluster on a free loopback port; ``durable`` keeps
    PostgreSQL's own defaults (fsync, synchronous commit: what the benchmarks measure) instead of
    the tests' speed."""
    data, sockets, log = directory / "data", directory / "sockets", directory / "postgres.log"
    sockets.mkdir(parents=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL will not run as root: as Debian's postgres user, owning the directory.
        owner = pwd.getpwnam("postgres")
        for path in (directory, sockets):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    _run([*as_user, pg_binary("initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
    port = _free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c max_connections=300"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    start = [*as_user, pg_binary("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(int(timeout))]
    _run([*start, "-o", options, "start"], log)
    pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    return Cluster(directory, port, pid)


def _run(command: list[str], log: Path | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        told = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}{told}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


_shared: list[Cluster] = []


def shared_cluster() -> Cluster:
    """The session's cluster, started at the first call (in a directory of its own under the system's
    temporary folder, which Debian's postgres user can reach)."""
    if not _shared:
        _shared.append(start_cluster(Path(tempfile.mkdtemp(prefix="datastore-postgres-"))))
    return _shared[0]


def stop_shared() -> None:
    """Stop the session's cluster, if one was started, and remove its directory."""
    while _shared:
        cluster = _shared.pop()
        cluster.stop()
        shutil.rmtree(cluster.directory, ignore_errors=True)
