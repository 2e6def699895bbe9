#!/usr/bin/env python3
"""Benchmarks of transfer jobs: ``datastore serve`` processes on loopback copying between themselves.

Run with ``make bench-jobs`` (``make bench`` runs it too, after ``bench/run.py``) or
``.venv/bin/python bench/jobs.py [--runs N] [--size-mib N] [--small-files N] [--queue-jobs N] [--seconds S]
[--quick] [--out DIR]``. Rows (the issue's targets):

1. ``copy_pull`` / ``copy_push``: 1 GiB copied between two stores A and B (a job on B pulling
   ``http://A/files/big.bin`` to ``local:``; a job on A pushing ``local:`` to ``http://B/...`` with an upload
   token of B), against B's own upload rate of the same file (curl PUT, and tus as in run.py), measured
   alternately in the same run. A copy's time runs from the client's POST of the job to the ``finished_at``
   the store recorded (the same clock; the client polls every 50 ms to learn it, which changes neither the
   time nor, much, the load); every copy is then verified in B's listing (size, MD5, SHA-256).
2. ``small_files``: one job of 1,000 files of 4 KiB, ``local:`` to ``local:`` within one store, files per
   second from the POST to FINISHED; every file's published MD5 is checked.
3. ``queue_submit`` / ``queue_status``: a store whose queue holds 10,000 QUEUED jobs that a runner looks at
   and cannot start: the destination host's slot (``DATASTORE_JOB_CONCURRENCY_PER_HOST=1``) is taken by a
   blocker job copying at 4 KiB/s, so every runner round (woken by every submission) scans the whole queue
   for a file it may claim. Then submissions (``POST /_api/v1/jobs``, one file each) and status reads
   (``GET /_api/v1/jobs/{id}`` of random queued jobs) per second from concurrent aiohttp clients, for a bounded
   time, alternately.

The stores run as shipped (fsync on, 4 files at once, 2 per job) plus the settings named in the notes. The
rows are merged into ``results.md`` (a section of their own) and ``results.json`` in ``--out`` (default: this
directory), replacing earlier job rows and keeping the others.
"""

# S603: the suite runs curl by design, with arguments it builds itself.
# S311: random picks which queued job to read, and the small files' bytes: no secret.
# RUF001: the report uses typographic signs on purpose.
# ruff: noqa: S603, S311, RUF001

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from run import (
    CURL,
    MIB,
    OUR_ENV,
    PREFIX,
    BenchError,
    Ours,
    Row,
    Source,
    cell,
    curl,
    delete_ours,
    machine,
    mbps,
    median_at_least,
    merge_section,
    register,
    table_line,
    upload_curl,
    upload_tus,
    verify_ours,
    write_random,
)

HERE = Path(__file__).resolve().parent
DN = "/O=Bench/CN=jobs"
WHO = {"X-Client-DN": DN}
JOBS = "/_api/v1/jobs"
#: What every store here runs with beyond run.py's OUR_ENV: X-Client-DN trusted (the bench's identity),
#: jobs may reach loopback.
JOB_ENV = {"DATASTORE_TRUST_CLIENT_DN": "true", "DATASTORE_JOB_HOSTS": "127.0.0.1"}
#: The queue store: one file at a time per destination host (the blocker holds it).
QUEUE_ENV = {**JOB_ENV, "DATASTORE_JOB_CONCURRENCY_PER_HOST": "1"}
#: Jobs each identity queues (the default quota, DATASTORE_MAX_JOBS_PER_CLIENT): 10,000 jobs take 10 owners.
PER_OWNER = 1000
#: Longest wait for one job to finish.
JOB_TIMEOUT = 900.0
SECTION = "## Transfer jobs"


@dataclass
class Plan:
    runs: int
    size_mib: int
    small_files: int
    small_size: int
    queue_jobs: int
    seconds: float
    connections: int


# -- the job API --------------------------------------------------------------------------------


def session(total: float = JOB_TIMEOUT, limit: int = 100) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=total)
    )


async def submit(s: aiohttp.ClientSession, store: Ours, job: dict[str, Any], who: dict[str, str] = WHO) -> str:
    async with s.post(f"{store.base}{JOBS}", json=job, headers=who) as reply:
        if reply.status != 201:
            raise BenchError(f"POST {JOBS} answered {reply.status}: {(await reply.text())[:300]}")
        job_id: str = (await reply.json())["id"]
        return job_id


async def status(s: aiohttp.ClientSession, store: Ours, job_id: str, who: dict[str, str] = WHO) -> dict[str, Any]:
    async with s.get(f"{store.base}{JOBS}/{job_id}", headers=who) as reply:
        if reply.status != 200:
            raise BenchError(f"GET {JOBS}/{job_id} answered {reply.status}: {(await reply.text())[:300]}")
        document: dict[str, Any] = await reply.json()
        return document


async def state_of(s: aiohttp.ClientSession, store: Ours, job_id: str) -> str:
    """The job's state from the owner's list of summaries (cheap, unlike a 1,000-file status)."""
    async with s.get(f"{store.base}{JOBS}", params={"limit": "1000"}, headers=WHO) as reply:
        if reply.status != 200:
            raise BenchError(f"GET {JOBS} answered {reply.status}")
        for job in (await reply.json())["jobs"]:
            if job["id"] == job_id:
                return str(job["state"])
    raise BenchError(f"job {job_id} is not in the list")


async def run_job(store: Ours, job: dict[str, Any], poll: float = 0.05) -> tuple[float, dict[str, Any]]:
    """Submit ``job`` and wait until it is FINISHED: (seconds from the POST to the ``finished_at`` the
    store recorded (same clock, milliseconds), its final status). How often it looks (``poll``)
    changes neither the time measured nor, much, the load."""
    async with session() as s:
        started = time.time()
        job_id = await submit(s, store, job)
        deadline = time.monotonic() + JOB_TIMEOUT
        while True:
            state = await state_of(s, store, job_id)
            if state == "FINISHED":
                break
            if state in ("FAILED", "FINISHED_DIRTY", "EXPIRED", "USER_STOPPED") or time.monotonic() > deadline:
                raise BenchError(f"job {job_id} ended {state}: {json.dumps(await status(s, store, job_id))[:2000]}")
            await asyncio.sleep(poll)
        document = await status(s, store, job_id)
        finished = datetime.fromisoformat(document["finished_at"].replace("Z", "+00:00")).timestamp()
        return finished - started, document


def upload_token(store: Ours) -> str:
    """A token of ``store`` allowed to upload to ``files`` (what a job pushing there presents)."""
    admin = (store.root / ".datastore" / "admin.token").read_text().strip()
    body = json.dumps({"subject": "bench push", "actions": ["upload"], "prefixes": [PREFIX]})
    proc = _curl_json(
        ["-X", "POST", f"{store.base}/_api/v1/tokens", "-H", f"Authorization: Bearer {admin}", "--data-binary", body]
    )
    token: str = proc["token"]
    return token


def _curl_json(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [CURL, "-sS", "-f", "-H", "Content-Type: application/json", *args], capture_output=True, timeout=60
    )
    if proc.returncode != 0:
        raise BenchError(f"curl {args[:3]} failed: {proc.stderr.decode().strip()}")
    document: dict[str, Any] = json.loads(proc.stdout)
    return document


#: Where each store's cProfile output goes (``--profile DIR``), or None.
PROFILE: list[Path] = []


@contextlib.contextmanager
def serving(*stores: Ours) -> Iterator[None]:
    try:
        for store in stores:
            if PROFILE:
                # The event loop's thread only (the database thread's SQL shows as the loop waiting).
                out = PROFILE[0] / f"{store.root.name}.prof"
                store.launcher = [sys.executable, "-m", "cProfile", "-o", str(out)]
            store.start()
        yield
    finally:
        for store in stores:
            store.kill()


def publish(store: Ours, src: Source, name: str) -> None:
    _, [url] = register(store, [src.entry(name)])
    code, _ = curl(["-T", str(src.path), url], timeout=600)
    if code != 200:
        raise BenchError(f"publishing {name} answered {code}")


# -- 1. one big file between two stores ----------------------------------------------------------------


def copy_rows(plan: Plan, work: Path, rows: dict[str, Row], log: Callable[[str], None]) -> None:
    a = Ours(work / "a", work / "a.log", env=JOB_ENV)
    b = Ours(work / "b", work / "b.log", env=JOB_ENV)
    size = plan.size_mib * MIB
    src = Source(work / "big.bin", size, *write_random(work / "big.bin", size))
    with serving(a, b):
        log(f"copy: A on {a.base} (pid {a.pid}), B on {b.base} (pid {b.pid})")
        publish(a, src, "big.bin")
        token = upload_token(b)
        for i in range(plan.runs):
            steps: list[tuple[str, Callable[[], float]]] = [
                ("upload_put", lambda i=i: upload_curl(b, src, f"put-{i}.bin", "PUT").mbps),
                ("upload_tus", lambda i=i: upload_tus(b, src, f"tus-{i}.bin").mbps),
                ("copy_pull", lambda i=i: pull(a, b, src, f"pull-{i}.bin")),
                ("copy_push", lambda i=i: push(a, b, src, f"push-{i}.bin", token)),
            ]
            order = steps if i % 2 == 0 else steps[::-1]
            for row_id, step in order:
                rows[row_id].ours.append(step())
            for name in (f"put-{i}.bin", f"tus-{i}.bin", f"pull-{i}.bin", f"push-{i}.bin"):
                delete_ours(b, [name])
            put = rows["upload_put"].ours[-1]
            for row_id in ("copy_pull", "copy_push"):
                rows[row_id].nginx.append(put)
            log(f"  run {i + 1}/{plan.runs}: " + "; ".join(f"{r} {rows[r].ours[-1]:.0f}" for r, _ in order))
    src.path.unlink()


def pull(a: Ours, b: Ours, src: Source, name: str) -> float:
    job = {"files": [{"source": a.file_url("big.bin"), "destination": f"local:/{PREFIX}/{name}"}]}
    seconds, _ = asyncio.run(run_job(b, job))
    verify_ours(b, {name: src.expected()})
    return mbps(src.size, seconds)


def push(a: Ours, b: Ours, src: Source, name: str, token: str) -> float:
    job = {
        "files": [{"source": f"local:/{PREFIX}/big.bin", "destination": b.file_url(name)}],
        "destination_token": token,
    }
    seconds, _ = asyncio.run(run_job(a, job))
    verify_ours(b, {name: src.expected()})
    return mbps(src.size, seconds)


# -- 2. many small files in one job ----------------------------------------------------------------


async def _put_all(urls: list[str], bodies: list[bytes], connections: int) -> None:
    gate = asyncio.Semaphore(connections)

    async def put(s: aiohttp.ClientSession, url: str, body: bytes) -> None:
        async with gate, s.put(url, data=body) as reply:
            if reply.status != 200:
                raise BenchError(f"PUT {url} answered {reply.status}")

    async with session(limit=connections) as s:
        await asyncio.gather(*(put(s, url, body) for url, body in zip(urls, bodies, strict=True)))


def small_rows(plan: Plan, work: Path, rows: dict[str, Row], log: Callable[[str], None]) -> None:
    store = Ours(work / "small", work / "small.log", env=JOB_ENV)
    count = plan.small_files
    base = bytearray(random.randbytes(plan.small_size))
    bodies = []
    for k in range(count):
        base[:8] = k.to_bytes(8, "big")
        bodies.append(bytes(base))
    md5s = [hashlib.md5(b, usedforsecurity=False).hexdigest() for b in bodies]
    sha256s = [hashlib.sha256(b).hexdigest() for b in bodies]
    with serving(store):
        log(f"small files: store on {store.base} (pid {store.pid})")
        entries = [
            {"name": f"s{k:05d}.bin", "size": len(b), "md5": m, "sha256": h}
            for k, (b, m, h) in enumerate(zip(bodies, md5s, sha256s, strict=True))
        ]
        _, urls = register(store, entries)
        asyncio.run(_put_all(urls, bodies, 16))
        for i in range(plan.runs):
            job = {
                "files": [
                    {"source": f"local:/{PREFIX}/s{k:05d}.bin", "destination": f"local:/{PREFIX}/d{i}-{k:05d}.bin"}
                    for k in range(count)
                ]
            }
            seconds, document = asyncio.run(run_job(store, job))
            files = document["files"]
            if len(files) != count or any(f["state"] != "FINISHED" or f["md5"] != md5s[k] for k, f in enumerate(files)):
                raise BenchError("small files: a file was not copied as sent")
            rows["small_files"].ours.append(count / seconds)
            log(f"  run {i + 1}/{plan.runs}: {count / seconds:.0f} files/s ({seconds:.2f} s)")


# -- 3. queue operations with many jobs queued ---------------------------------------------------------


def queue_job(k: int) -> dict[str, Any]:
    return {"files": [{"source": f"local:/{PREFIX}/small.bin", "destination": f"local:/{PREFIX}/q{k:06d}.bin"}]}


def owner(name: str) -> dict[str, str]:
    return {"X-Client-DN": f"/O=Bench/CN={name}"}


async def _fill(store: Ours, first: int, count: int, connections: int) -> list[tuple[str, dict[str, str]]]:
    """Queue ``count`` jobs, PER_OWNER per identity: (id, owner's headers) of each."""
    ids: list[tuple[str, dict[str, str]]] = []
    gate = asyncio.Semaphore(connections)

    async def one(s: aiohttp.ClientSession, k: int) -> None:
        who = owner(f"queue-{k // PER_OWNER}")
        async with gate:
            ids.append((await submit(s, store, queue_job(k), who), who))

    async with session(limit=connections) as s:
        await asyncio.gather(*(one(s, k) for k in range(first, first + count)))
    return ids


async def _rate(
    store: Ours, seconds: float, connections: int, op: Callable[[aiohttp.ClientSession, int], Any]
) -> float:
    """Operations per second of ``op`` from ``connections`` concurrent clients for ``seconds``."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(s: aiohttp.ClientSession, c: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            await op(s, c * 1_000_000 + n)
            n += 1
            done += 1

    async with session(total=seconds + 120, limit=connections) as s:
        started = time.perf_counter()
        await asyncio.gather(*(client(s, c) for c in range(connections)))
        return done / (time.perf_counter() - started)


def queue_rows(plan: Plan, work: Path, rows: dict[str, Row], log: Callable[[str], None]) -> None:
    store = Ours(work / "queue", work / "queue.log", env=QUEUE_ENV)
    blocker = Source(work / "blocker.bin", 8 * MIB, *write_random(work / "blocker.bin", 8 * MIB))
    small = Source(work / "small.bin", 4096, *write_random(work / "small.bin", 4096))
    with serving(store):
        log(f"queue: store on {store.base} (pid {store.pid})")
        publish(store, blocker, "blocker.bin")
        publish(store, small, "small.bin")

        async def block() -> str:
            job = {
                "files": [{"source": f"local:/{PREFIX}/blocker.bin", "destination": f"local:/{PREFIX}/blocked.bin"}],
                "bandwidth": 4096,
                "chunk_size": 4096,
            }
            async with session() as s:
                job_id = await submit(s, store, job)
                for _ in range(500):
                    if (await status(s, store, job_id))["state"] == "ACTIVE":
                        return job_id
                    await asyncio.sleep(0.02)
            raise BenchError("the blocker job never became ACTIVE")

        blocker_id = asyncio.run(block())
        started = time.perf_counter()
        queued = asyncio.run(_fill(store, 0, plan.queue_jobs, 8))
        log(f"  {len(queued)} jobs queued in {time.perf_counter() - started:.1f} s")
        submitted = [0]

        async def check_queue() -> None:
            async with session() as s:
                if (await status(s, store, blocker_id))["state"] != "ACTIVE":
                    raise BenchError("the blocker job is no longer ACTIVE")
                sample = await status(s, store, *random.choice(queued))
                if sample["state"] != "QUEUED":
                    raise BenchError(f"a queued job is {sample['state']}")

        async def submit_op(s: aiohttp.ClientSession, n: int) -> None:
            # Each client its own identity (n // 1,000,000 is the client), new ones each run.
            who = owner(f"client-{submitted[0]}-{n // 1_000_000}")
            await submit(s, store, queue_job(10_000_000 + submitted[0] * 1_000_000 + n), who)

        async def status_op(s: aiohttp.ClientSession, n: int) -> None:
            job_id, who = random.choice(queued)
            async with s.get(f"{store.base}{JOBS}/{job_id}", headers=who) as reply:
                await reply.read()
                if reply.status != 200:
                    raise BenchError(f"GET {JOBS}/{job_id} answered {reply.status}")

        asyncio.run(check_queue())
        for i in range(plan.runs):
            steps = [("queue_submit", submit_op), ("queue_status", status_op)]
            for row_id, op in steps if i % 2 == 0 else steps[::-1]:
                rows[row_id].ours.append(asyncio.run(_rate(store, plan.seconds, plan.connections, op)))
            submitted[0] += 1
            asyncio.run(check_queue())
            log(f"  run {i + 1}/{plan.runs}: submits {rows['queue_submit'].ours[-1]:.0f}/s; "
                f"status reads {rows['queue_status'].ours[-1]:.0f}/s")  # fmt: skip


# -- the run -----------------------------------------------------------------------------------------


def make_rows(plan: Plan) -> dict[str, Row]:
    size = f"{plan.size_mib} MiB" if plan.size_mib < 1024 else f"{plan.size_mib / 1024:g} GiB"
    rows = [
        Row("upload_put", f"jobs: store B's own upload of {size}, PUT (curl -T)", "MB/s"),
        Row("upload_tus", f"jobs: store B's own upload of {size}, tus 8 MiB PATCHes (aiohttp)", "MB/s"),
        Row("copy_pull", f"jobs: copy {size} A→B, a job on B pulling http://A (vs B's PUT)", "MB/s",
            target="≥ 0.8× upload", check=_ratio(0.8)),
        Row("copy_push", f"jobs: copy {size} A→B, a job on A pushing to http://B (vs B's PUT)", "MB/s",
            target="≥ 0.8× upload", check=_ratio(0.8)),
        Row("small_files", f"jobs: one job of {plan.small_files:,} files of {plan.small_size >> 10} KiB, local→local",
            "files/s", target="≥ 200 files/s", check=median_at_least(200)),
        Row("queue_submit", f"jobs: submissions with {plan.queue_jobs:,} jobs queued ({plan.connections} clients, "
            f"{plan.seconds:g} s)", "req/s", target="≥ 1,000/s", check=median_at_least(1000)),
        Row("queue_status", f"jobs: status reads with {plan.queue_jobs:,} jobs queued ({plan.connections} clients, "
            f"{plan.seconds:g} s)", "req/s", target="≥ 1,000/s", check=median_at_least(1000)),
    ]  # fmt: skip
    for row in rows:
        short, row.id = row.id, f"jobs_{row.id}"  # distinct from run.py's rows in results.json
        del short
    return {row.id.removeprefix("jobs_"): row for row in rows}


def _ratio(limit: float) -> Callable[[Row], bool | None]:
    def check(row: Row) -> bool | None:
        ratio = row.ratio()
        return None if ratio is None else ratio >= limit

    return check


def markdown(info: dict[str, Any], plan: Plan, rows: dict[str, Row]) -> str:
    lines = [
        SECTION,
        "",
        f"{info['date']}; `{info['command']}`; {plan.runs} run(s) of each, alternating; datastore {info['datastore']}.",
        "",
        "| what | unit | median (min–max) | compared with (median) | ratio | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [table_line(row, "B's PUT " + cell(row.nginx) if row.nginx else "—") for row in rows.values()]
    lines += [
        "",
        "Notes:",
        "",
        "- Stores run with run.py's settings ("
        + ", ".join(f"{k}={v}" for k, v in OUR_ENV.items())
        + ") plus "
        + ", ".join(f"{k}={v}" for k, v in JOB_ENV.items())
        + "; fsync on and the job concurrency as shipped "
        "(8 files at once, 4 per job, per destination host and per owner).",
        "- Copies: the time from the job's POST (the client's clock) to the `finished_at` the store recorded (the "
        "same clock; the client polls every 50 ms to learn it); the job verifies the copy end to end (MD5 and "
        "SHA-256) before it finishes, and the "
        "bench checks the destination's listing afterwards. The ratio column compares with B's own PUT of the same "
        "file in the same run (the faster of B's two upload rows).",
        "- Queue: " + ", ".join(f"{k}={v}" for k, v in QUEUE_ENV.items() if k not in JOB_ENV) + "; a blocker job "
        "(8 MiB at 4 KiB/s) holds the one slot of host `local`, so the queued jobs stay QUEUED and every runner "
        f"round scans them all. The queue's jobs belong to {PER_OWNER:,} per identity (the default quota of "
        "unfinished jobs per client); each measuring client submits as its own identity, reads as the job's owner. "
        "Submissions add one-file jobs to the queue as they are measured.",
    ]
    return "\n".join(lines) + "\n"


def merge(out: Path, info: dict[str, Any], plan: Plan, rows: dict[str, Row]) -> str:
    """Put the job rows into results.json and their section into results.md, replacing earlier ones."""
    section = markdown(info, plan, rows)
    extra = {"machine": info, "plan": plan.__dict__, "job_env": JOB_ENV, "queue_env": QUEUE_ENV}
    merge_section(out, "jobs_", rows, extra, section)
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=None, help="runs of each measure (default 3; --quick: 1)")
    parser.add_argument("--size-mib", type=int, default=None, help="size of the copied file (default 1024)")
    parser.add_argument("--small-files", type=int, default=None, help="files of the small-file job (default 1000)")
    parser.add_argument("--queue-jobs", type=int, default=None, help="jobs queued (default 10000)")
    parser.add_argument("--seconds", type=float, default=None, help="duration of each queue measure (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent queue clients (default 16)")
    parser.add_argument("--only", choices=["copy", "small", "queue"], action="append", help="run only these")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 run: a smoke run")
    parser.add_argument("--profile", type=Path, help="run the stores under cProfile, writing DIR/STORE.prof")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.md and results.json go")
    parser.add_argument("--tmpdir", type=Path, default=None, help="work directory's parent (default: $TMPDIR)")
    args = parser.parse_args(argv)
    quick = args.quick
    plan = Plan(
        runs=args.runs or (1 if quick else 3),
        size_mib=args.size_mib or (4 if quick else 1024),
        small_files=args.small_files or (50 if quick else 1000),
        small_size=4096,
        queue_jobs=args.queue_jobs or (100 if quick else 10_000),
        seconds=args.seconds or (1.0 if quick else 5.0),
        connections=args.connections,
    )
    if min(plan.runs, plan.size_mib, plan.small_files, plan.queue_jobs, plan.connections) < 1 or plan.seconds <= 0:
        parser.error("counts, sizes and durations must be positive")
    only = set(args.only or ["copy", "small", "queue"])
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        PROFILE.append(args.profile.resolve())

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="datastore-bench-jobs-", dir=args.tmpdir))
    rows = make_rows(plan)
    try:
        info = machine(work)
        info["command"] = " ".join(["bench/jobs.py", *(argv if argv is not None else sys.argv[1:])])
        started = time.monotonic()
        try:
            if "copy" in only:
                copy_rows(plan, work, rows, log)
            if "small" in only:
                small_rows(plan, work, rows, log)
            if "queue" in only:
                queue_rows(plan, work, rows, log)
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
