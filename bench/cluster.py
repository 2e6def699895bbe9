#!/usr/bin/env python3
"""Benchmarks of the store on PostgreSQL: one node against SQLite, and 1, 2 and 3 nodes behind HAProxy.

Run with ``make bench-cluster`` or ``.venv/bin/python bench/cluster.py [--runs N] [--requests N]
[--manifest-files N] [--uploads N] [--upload-mib N] [--quick] [--out DIR]``. A PostgreSQL cluster of
the run's own (``tests/postgres_server.py``, with PostgreSQL's durable defaults: fsync and synchronous
commit on) and HAProxy with the configuration the tests use (``tests/haproxy_server.py``) run on
loopback beside the stores. Rows:

1. **Per-request cost, one node, PostgreSQL against SQLite**, alternately run by run, each store
   fresh: a client on one keep-alive connection registers a one-file manifest, PUTs its 4 KiB and
   reads the transfer's status, ``--requests`` times; the median milliseconds of each request as the
   client saw them, and the median database time of the manifest and of the PUT as the store
   reports it (``Server-Timing: db``: every transaction the request waited for).
2. **A 10,000-file manifest**: files registered per second (POST to 201), on both backends.
3. **Nodes behind the balancer**: ``--uploads`` uploads of ``--upload-mib`` MiB (manifest, then PUT;
   16 clients at once) and as many 4 KiB uploads, through HAProxy to 1, 2 and 3 nodes sharing the
   database and the storage root, and to one node directly (what the balancer costs). Every upload
   is verified in the listing (size, MD5, SHA-256). On one 2-core host more nodes cannot add CPU:
   the rows show what the balancer and the shared database cost, not how the store scales.

The rows are merged into ``results.md`` (a section of their own) and ``results.json`` in ``--out``
(default: this directory), replacing earlier cluster rows and keeping the others.
"""

# S603: the suite runs haproxy and curl by design, with arguments it builds itself.
# RUF001: the report uses typographic signs on purpose.
# ruff: noqa: S603, RUF001

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from run import (
    PREFIX,
    BenchError,
    Ours,
    Row,
    cell,
    machine,
    make_bodies,
    manifest_rate,
    mbps,
    median_at_least,
    median_at_most,
    merge_section,
    table_line,
    verify_ours,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.haproxy_server import configuration, free_port, haproxy_binary  # noqa: E402
from tests.postgres_server import Cluster, start_cluster  # noqa: E402

SECTION = "## Several nodes on PostgreSQL (bench/cluster.py)"
#: Clients uploading at once through the balancer.
CLIENTS = 16
SMALL = 4096


@dataclass
class Plan:
    runs: int
    requests: int
    manifest_files: int
    uploads: int
    upload_mib: int


# -- processes --------------------------------------------------------------------------------------


@contextmanager
def postgres(work: Path) -> Iterator[Cluster]:
    cluster = start_cluster(work / "postgres", durable=True)
    try:
        yield cluster
    finally:
        cluster.stop()


def new_database(cluster: Cluster, name: str) -> str:
    with psycopg.connect(cluster.url("postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    return cluster.url(name)


def node(root: Path, log: Path, state_url: str | None, name: str, public: str | None = None) -> Ours:
    env = {"DATASTORE_NODE_ID": name}
    if state_url is not None:
        env["DATASTORE_STATE_URL"] = state_url
    if public is not None:
        env["DATASTORE_PUBLIC_URL"] = public
        env["DATASTORE_TRUSTED_PROXIES"] = "127.0.0.1"
    return Ours(root, log, env=env)


@contextmanager
def balancer(work: Path, nodes: list[Ours], port: int) -> Iterator[str]:
    """HAProxy on ``port`` in front of ``nodes``, ready; its URL."""
    config = work / f"haproxy-{port}.cfg"
    config.write_text(configuration(port, [("127.0.0.1", n.port) for n in nodes]))
    proc = subprocess.Popen([haproxy_binary(), "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("haproxy did not start")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        # Ready when the health checks have found every node up.
        wait_all_up(url, len(nodes))
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def wait_all_up(url: str, count: int) -> None:
    async def seen() -> set[str]:
        names: set[str] = set()
        async with aiohttp.ClientSession() as session:
            for _ in range(4 * count):
                async with session.get(f"{url}/_api/v1/health") as reply:
                    if reply.status == 200:
                        names.add(str((await reply.json()).get("node")))
        return names

    deadline = time.monotonic() + 30
    while len(asyncio.run(seen())) < count:
        if time.monotonic() > deadline:
            raise BenchError("the balancer never reached every node")


# -- measures ---------------------------------------------------------------------------------------


def server_db_ms(reply: aiohttp.ClientResponse) -> float:
    timing = reply.headers.get("Server-Timing", "")
    for part in timing.split(","):
        fields = dict(f.split("=", 1) for f in part.strip().split(";")[1:] if "=" in f)
        if part.strip().startswith("db;") and "dur" in fields:
            return float(fields["dur"])
    raise BenchError(f"no Server-Timing db in the answer: {timing!r}")


async def _request_costs(base: str, count: int, run: int) -> dict[str, list[float]]:
    """Sequential manifest + 4 KiB PUT + status on one connection: milliseconds of each."""
    costs: dict[str, list[float]] = {"manifest": [], "put": [], "status": [], "db_manifest": [], "db_put": []}
    body = b"s" * SMALL
    files = [{"name": "", "size": SMALL}]
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(base, connector=connector) as session:
        for i in range(count):
            files[0]["name"] = f"cost-{run}-{i:05d}.bin"
            started = time.perf_counter()
            async with session.post(f"/{PREFIX}/manifest", json={"files": files}) as reply:
                document = await reply.json()
                if reply.status != 201:
                    raise BenchError(f"manifest answered {reply.status}: {document}")
                costs["db_manifest"].append(server_db_ms(reply))
            put_at = time.perf_counter()
            async with session.put(f"/{PREFIX}/{document['transfer_key']}/0", data=body) as reply:
                await reply.read()
                if reply.status != 200:
                    raise BenchError(f"PUT answered {reply.status}")
                costs["db_put"].append(server_db_ms(reply))
            status_at = time.perf_counter()
            async with session.get(f"/_api/v1/transfers/{document['transfer_key']}") as reply:
                await reply.read()
                if reply.status != 200:
                    raise BenchError(f"status answered {reply.status}")
            done = time.perf_counter()
            costs["manifest"].append((put_at - started) * 1000)
            costs["put"].append((status_at - put_at) * 1000)
            costs["status"].append((done - status_at) * 1000)
    return costs


async def _uploads(base: str, names: list[str], bodies: list[bytes]) -> float:
    """Register and PUT every body, CLIENTS at once; seconds."""
    queue = list(zip(names, bodies, strict=True))
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=900)

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            name, body = queue.pop()
            async with session.post(f"/{PREFIX}/manifest", json={"files": [{"name": name, "size": len(body)}]}) as r:
                document = await r.json()
                if r.status != 201:
                    raise BenchError(f"manifest answered {r.status}: {document}")
            async with session.put(f"/{PREFIX}/{document['transfer_key']}/0", data=body) as r:
                await r.read()
                if r.status != 200:
                    raise BenchError(f"PUT {name} answered {r.status}")

    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
        return time.perf_counter() - started


def upload_batch(base: str, nodes: list[Ours], tag: str, count: int, size: int) -> float:
    """``count`` uploads of ``size`` bytes through ``base``, verified; seconds."""
    bodies, digests = make_bodies(count, size)
    names = [f"{tag}-{i:04d}.bin" for i in range(count)]
    seconds = asyncio.run(_uploads(base, names, bodies))
    verify_ours(nodes[0], dict(zip(names, digests, strict=True)))
    return seconds


# -- the run ----------------------------------------------------------------------------------------


def make_rows(plan: Plan) -> dict[str, Row]:
    big = f"{plan.upload_mib} MiB"
    rows = [
        Row("manifest_ms", "one node: register a 1-file manifest (PostgreSQL vs SQLite)", "ms",
            higher_is_better=False),
        Row("put_ms", f"one node: PUT {SMALL >> 10} KiB (PostgreSQL vs SQLite)", "ms", higher_is_better=False),
        Row("status_ms", "one node: read a transfer's status (PostgreSQL vs SQLite)", "ms", higher_is_better=False),
        Row("db_manifest_ms", "one node: database time of the 1-file manifest (Server-Timing)", "ms",
            higher_is_better=False),
        Row("db_put_ms", f"one node: database time of the {SMALL >> 10} KiB PUT (Server-Timing)", "ms",
            higher_is_better=False, target="< 5 ms on PostgreSQL", check=median_at_most(5.0)),
        Row("manifest_rate", f"one node: register a {plan.manifest_files:,}-file JSON manifest", "files/s",
            target="≥ 20,000 files/s on PostgreSQL", check=median_at_least(20_000)),
        Row("direct_big", f"one node directly: {plan.uploads} uploads of {big}, {CLIENTS} clients", "MB/s"),
        *(Row(f"nodes{n}_big", f"{n} node(s) behind HAProxy: {plan.uploads} uploads of {big}, {CLIENTS} clients",
              "MB/s") for n in (1, 2, 3)),
        Row("direct_small", f"one node directly: {plan.uploads * 4} uploads of {SMALL >> 10} KiB, {CLIENTS} clients",
            "uploads/s"),
        *(Row(f"nodes{n}_small", f"{n} node(s) behind HAProxy: {plan.uploads * 4} uploads of {SMALL >> 10} KiB, "
              f"{CLIENTS} clients", "uploads/s") for n in (1, 2, 3)),
    ]  # fmt: skip
    for row in rows:
        row.id = f"cluster_{row.id}"
    return {row.id.removeprefix("cluster_"): row for row in rows}


def one_node_rows(plan: Plan, work: Path, cluster: Cluster, rows: dict[str, Row], log: Callable[[str], None]) -> None:
    """PostgreSQL ("ours" column) against SQLite ("compared" column), alternating."""
    for run in range(plan.runs):
        order = ["postgresql", "sqlite"] if run % 2 == 0 else ["sqlite", "postgresql"]
        for backend in order:
            root = work / f"one-{backend}-{run}"
            url = new_database(cluster, f"one_{run}") if backend == "postgresql" else None
            store = node(root, work / f"one-{backend}-{run}.log", url, f"{backend}-{run}")
            store.start()
            try:
                costs = asyncio.run(_request_costs(store.base, plan.requests, run))
                rate = manifest_rate(store, plan.manifest_files, run)
            finally:
                store.kill()
                shutil.rmtree(root, ignore_errors=True)
            column = "ours" if backend == "postgresql" else "nginx"
            for name, values in costs.items():
                getattr(rows[f"{name}_ms"], column).append(statistics.median(values))
            getattr(rows["manifest_rate"], column).append(rate)
            log(f"  run {run + 1}/{plan.runs} {backend}: manifest {statistics.median(costs['manifest']):.2f} ms, "
                f"PUT {statistics.median(costs['put']):.2f} ms (db {statistics.median(costs['db_put']):.2f}), "
                f"status {statistics.median(costs['status']):.2f} ms; {rate:,.0f} files/s")  # fmt: skip


def nodes_rows(plan: Plan, work: Path, cluster: Cluster, rows: dict[str, Row], log: Callable[[str], None]) -> None:
    """1, 2, 3 nodes behind HAProxy and one directly, on PostgreSQL, in turn each run."""
    size = plan.upload_mib << 20
    for run in range(plan.runs):
        url = new_database(cluster, f"nodes_{run}")
        root = work / f"nodes-{run}"
        port = free_port()
        public = f"http://127.0.0.1:{port}"
        nodes = [node(root, work / f"nodes-{run}-{i}.log", url, f"node-{i}", public) for i in range(3)]
        try:
            for n in nodes:
                n.start()
            layouts = [("direct", 1), ("nodes1", 1), ("nodes2", 2), ("nodes3", 3)]
            for label, count in layouts if run % 2 == 0 else layouts[::-1]:
                front = nullcontext(nodes[0].base) if label == "direct" else balancer(work, nodes[:count], port)
                with front as base:
                    big = upload_batch(base, nodes, f"{label}-{run}-big", plan.uploads, size)
                    small = upload_batch(base, nodes, f"{label}-{run}-small", plan.uploads * 4, SMALL)
                rows[f"{label}_big"].ours.append(mbps(plan.uploads * size, big))
                rows[f"{label}_small"].ours.append(plan.uploads * 4 / small)
                log(f"  run {run + 1}/{plan.runs} {label}: {rows[f'{label}_big'].ours[-1]:.0f} MB/s, "
                    f"{rows[f'{label}_small'].ours[-1]:.0f} small uploads/s")  # fmt: skip
        finally:
            for n in nodes:
                n.kill()
            shutil.rmtree(root, ignore_errors=True)


def markdown(info: dict[str, Any], plan: Plan, rows: dict[str, Row]) -> str:
    lines = [
        SECTION,
        "",
        f"{info['date']}; `{info['command']}`; {plan.runs} run(s) of each, alternating; datastore {info['datastore']}; "
        f"PostgreSQL {info['postgresql']}, {info['haproxy']}.",
        "",
        "| what | unit | PostgreSQL median (min–max) | SQLite median (min–max) | ratio | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [table_line(row, cell(row.nginx)) for row in rows.values()]
    lines += [
        "",
        "Notes:",
        "",
        "- PostgreSQL runs on the same host with its durable defaults (fsync, synchronous commit); SQLite as "
        "shipped (WAL). Stores run with bench/run.py's settings, fsync on.",
        f"- Per-request rows: one client, one keep-alive connection, {plan.requests} manifest + PUT + status "
        "sequences per run; the median of each run, then the median of the runs. Database time is the store's "
        "`Server-Timing: db`, every transaction the request waited for (queueing for the database included).",
        "- Node rows: every node shares the database and the storage root; HAProxy round robin with health "
        "checks, no stickiness (tests/haproxy_server.py). One 2-core host runs the client, HAProxy, PostgreSQL "
        "and every node, so more nodes add contention, not CPUs.",
    ]
    return "\n".join(lines) + "\n"


def merge(out: Path, info: dict[str, Any], plan: Plan, rows: dict[str, Row]) -> str:
    """Put the cluster rows into results.json and their section into results.md, replacing earlier ones."""
    section = markdown(info, plan, rows)
    merge_section(out, "cluster_", rows, {"machine": info, "plan": plan.__dict__}, section)
    return section


def versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except OSError:
            return "not installed"
        return (done.stdout + done.stderr).strip().splitlines()[0]

    from tests.postgres_server import pg_binary

    return {
        "postgresql": first_line([pg_binary("pg_ctl"), "--version"]).split()[2],
        "haproxy": " ".join(first_line([haproxy_binary(), "-v"]).split()[:3]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=None, help="runs of each measure (default 3; --quick: 1)")
    parser.add_argument("--requests", type=int, default=None, help="sequences per per-request run (default 300)")
    parser.add_argument("--manifest-files", type=int, default=None, help="files of the big manifest (default 10000)")
    parser.add_argument("--uploads", type=int, default=None, help="large uploads per node row (default 48)")
    parser.add_argument("--upload-mib", type=int, default=None, help="size of a large upload (default 8)")
    parser.add_argument("--only", choices=["one", "nodes"], action="append", help="run only these")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 run: a smoke run")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.md and results.json go")
    args = parser.parse_args(argv)
    quick = args.quick
    plan = Plan(
        runs=args.runs or (1 if quick else 3),
        requests=args.requests or (20 if quick else 300),
        manifest_files=args.manifest_files or (200 if quick else 10_000),
        uploads=args.uploads or (4 if quick else 48),
        upload_mib=args.upload_mib or (1 if quick else 8),
    )
    if min(plan.runs, plan.requests, plan.manifest_files, plan.uploads, plan.upload_mib) < 1:
        parser.error("counts and sizes must be positive")
    only = set(args.only or ["one", "nodes"])

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="datastore-bench-cluster-"))
    work.chmod(0o755)  # PostgreSQL's own user reaches its directory inside
    rows = make_rows(plan)
    try:
        info = {**machine(work), **versions()}
        info["command"] = " ".join(["bench/cluster.py", *(argv if argv is not None else sys.argv[1:])])
        started = time.monotonic()
        with postgres(work) as cluster:
            try:
                if "one" in only:
                    log("one node, PostgreSQL against SQLite")
                    one_node_rows(plan, work, cluster, rows, log)
                if "nodes" in only:
                    log("nodes behind HAProxy")
                    nodes_rows(plan, work, cluster, rows, log)
            except BenchError:
                for log_file in sorted(work.glob("*.log")):
                    print(f"--- {log_file.name} (tail) ---\n" + "\n".join(log_file.read_text().splitlines()[-20:]))
                raise
        info["duration_s"] = round(time.monotonic() - started, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {k: v for k, v in rows.items() if v.ours}
    print(merge(args.out, info, plan, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
