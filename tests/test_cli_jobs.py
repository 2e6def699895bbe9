"""``datastore jobs ...`` and the Python client's job methods, run as a user runs them: a
``datastore serve`` process, each command a ``python -m datastore`` process over real sockets.

The copies are within the store (``local:`` ends). A job that cannot run has an http source on a
loopback port that refuses connections (a socket bound there, never listening): a transient
failure, retried after the job's long retry delay, so the job waits, queued, for the user's steps.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from datastore.client import DataStoreClient, RequestFailed, SyncDataStoreClient

from .harness import Ran, assert_one_line_failure, datastore, eventually, job_store, md5_hex

#: Everything here runs against one store; each test is its own user, so that it sees its own jobs.
pytestmark = pytest.mark.asyncio(loop_scope="module")

ADA = "/O=Lab/CN=Ada"
DATA = bytes(range(256)) * 1200 + b"tail"


@dataclass
class Served:
    """The running ``datastore serve``: its base URL, its files' URL, and a user of it."""

    base: str
    files: str
    tmp: Path
    identity: str = ADA

    async def run(self, *args: str) -> Ran:
        """``datastore jobs ARGS[0] BASE ARGS[1:] --identity IDENTITY``."""
        return await datastore("jobs", args[0], self.base, *args[1:], "--identity", self.identity)

    async def job(self, job_id: str) -> dict[str, Any]:
        async with DataStoreClient(self.base, identity=self.identity) as client:
            return await client.job(job_id)


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port bound by this test and never listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def store(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    """One ``datastore serve`` (jobs may reach 127.0.0.1) with ``a.bin`` uploaded by Ada; stopped at the end."""
    tmp = tmp_path_factory.mktemp("jobs")
    async with job_store(tmp, DATA, ADA) as match:
        yield Served(match["base"], match["url"], tmp)


@pytest.fixture
def served(store: Served, request: pytest.FixtureRequest, tmp_path: Path) -> Served:
    """The store, as this test's own user."""
    return replace(store, tmp=tmp_path, identity=f"/O=Lab/CN={request.node.name.removeprefix('test_')[:48]}")


async def test_a_copy_submitted_and_watched_then_listed_and_shown(served: Served) -> None:
    submit = await served.run("submit", "local:/files/a.bin", "local:/files/b.bin", "--watch")
    assert submit.returncode == 0, submit
    assert "Traceback" not in submit.stderr
    job_id, summary = submit.stdout.splitlines()
    assert summary.split() == [job_id, "FINISHED", "1/1", "files", str(len(DATA)), "bytes"]

    target = served.tmp / "downloaded"
    await asyncio.to_thread(target.mkdir)
    download = await datastore("download", served.files + "b.bin", "-o", str(target), "--quiet")
    assert download.returncode == 0, download
    assert await asyncio.to_thread((target / "b.bin").read_bytes) == DATA

    listing = await served.run("ls", "--json")
    assert listing.returncode == 0, listing
    jobs = json.loads(listing.stdout)
    assert [(job["id"], job["state"]) for job in jobs] == [(job_id, "FINISHED")]
    table = await served.run("ls", "--state", "FINISHED")
    assert table.returncode == 0, table
    head, row = table.stdout.splitlines()
    assert head.split() == ["ID", "STATE", "PRIORITY", "FILES", "BYTES", "CREATED"]
    assert row.split()[:5] == [job_id, "FINISHED", "3", "1/1", f"{len(DATA)}/{len(DATA)}"]
    assert (await served.run("ls", "--state", "FAILED")).stdout == ""

    status = await served.run("status", job_id, "--json")
    assert status.returncode == 0, status
    document = json.loads(status.stdout)
    file = document["files"][0]
    assert (document["state"], file["state"], file["bytes"]) == ("FINISHED", "FINISHED", len(DATA))
    assert file["md5"] == md5_hex(DATA)
    text = await served.run("status", job_id)
    assert text.returncode == 0, text
    assert text.stdout.splitlines()[0].split()[:2] == [job_id, "FINISHED"]
    assert "local:/files/a.bin -> local:/files/b.bin" in text.stdout

    # A step the job's state refuses: 409, in one line.
    refused = await served.run("priority", job_id, "2")
    assert_one_line_failure(refused, 1, f"datastore: 409 Conflict: the job is FINISHED: {_PRIORITY_REFUSAL}")


_PRIORITY_REFUSAL = "its priority can change only before it runs"


async def test_a_job_submitted_uncommitted_is_reprioritized_then_committed(served: Served) -> None:
    submit = await served.run("submit", "local:/files/a.bin", "local:/files/c.bin", "--no-commit", "--priority", "2")
    assert submit.returncode == 0, submit
    job_id = submit.stdout.strip()
    assert (await served.job(job_id))["state"] == "SUBMITTED"

    priority = await served.run("priority", job_id, "5")
    assert priority.returncode == 0, priority
    assert priority.stdout.split() == [job_id, "SUBMITTED", "priority", "5"]
    commit = await served.run("commit", job_id, "--json")
    assert commit.returncode == 0, commit
    assert json.loads(commit.stdout)["priority"] == 5

    watch = await served.run("watch", job_id, "--quiet")
    assert watch.returncode == 0, watch
    assert (await served.job(job_id))["files"][0]["md5"] == md5_hex(DATA)


async def test_a_waiting_job_is_paused_resumed_stopped_and_cleared(served: Served, refusing_port: int) -> None:
    source = f"http://127.0.0.1:{refusing_port}/files/later.bin"
    submit = await served.run("submit", source, "local:/files/d.bin", "--retry", "5", "--retry-delay", "1h")
    assert submit.returncode == 0, submit
    job_id = submit.stdout.strip()

    async def waiting() -> bool:
        file = (await served.job(job_id))["files"][0]
        return bool(file["state"] == "QUEUED" and file["attempts"] >= 1)

    await eventually(waiting, "the first attempt failed and the file waits for its retry")
    status = await served.run("status", job_id)
    assert "last error: connection:" in status.stdout, status

    for step, state in (("pause", "PAUSED"), ("resume", "QUEUED"), ("stop", "USER_STOPPED")):
        ran = await served.run(step, job_id)
        assert ran.returncode == 0, ran
        assert ran.stdout.split() == [job_id, state]

    async def idle() -> bool:
        return all(f["state"] != "ACTIVE" for f in (await served.job(job_id))["files"])

    await eventually(idle, "the stopped job's last attempt ended")
    cleared = await served.run("clear", job_id)
    assert cleared.returncode == 0, cleared
    assert cleared.stdout.split() == [job_id, "cleared"]
    gone = await served.run("status", job_id)
    assert_one_line_failure(gone, 1, "datastore: 404 Not found: no such job")


async def test_watching_a_job_whose_source_is_missing_fails_with_the_reason(served: Served) -> None:
    submit = await served.run("submit", "local:/files/missing.bin", "local:/files/e.bin")
    assert submit.returncode == 0, submit
    job_id = submit.stdout.strip()
    watch = await served.run("watch", job_id)
    assert watch.returncode == 1, watch
    assert "Traceback" not in watch.stderr
    assert watch.stdout == ""
    (line,) = watch.errors
    assert line.startswith(f"datastore: job {job_id} FAILED: file 0 (local:/files/e.bin): not_found: "), line

    # --json: the job's events as JSON lines (the submission's, then the end), the failure still one line.
    again = await served.run("submit", "local:/files/missing.bin", "local:/files/f.bin", "--watch", "--json")
    assert again.returncode == 1, again
    job, *events = [json.loads(line) for line in again.stdout.splitlines()]
    assert all(event["job"] == job["id"] for event in events)
    assert len(again.errors) == 1 and "not_found" in again.errors[0], again.stderr


async def test_bad_command_lines_fail_in_one_line(served: Served, tmp_path: Path) -> None:
    odd = await served.run("submit", "local:/files/a.bin")
    assert_one_line_failure(odd, 2, "datastore: give SOURCE DESTINATION pairs: 'local:/files/a.bin' has no destination")
    refused = await served.run("submit", "local:/files/a.bin", "ftp://elsewhere/x")
    assert refused.returncode == 1 and len(refused.errors) == 1 and "Traceback" not in refused.stderr, refused
    assert refused.errors[0].startswith("datastore: 400 "), refused.errors

    job = tmp_path / "job.json"
    await asyncio.to_thread(
        job.write_text,
        json.dumps({"files": [{"source": "local:/files/a.bin", "destination": "local:/files/g.bin"}], "retry": 1}),
    )
    from_file = await served.run("submit", "--from-file", str(job), "--watch", "--quiet")
    assert from_file.returncode == 0, from_file
    job_id = from_file.stdout.strip()
    assert (await served.job(job_id))["retry"] == 1


async def test_the_python_client_submits_and_waits(served: Served) -> None:
    async with DataStoreClient(served.base, identity=served.identity) as client:
        job = await client.submit_job([("local:/files/a.bin", "local:/files/py.bin")], priority=4)
        assert job["state"] in ("QUEUED", "ACTIVE", "FINISHED")
        done = await client.wait_job(job["id"])
        assert (done["state"], done["priority"]) == ("FINISHED", 4)
        assert done["files"][0]["md5"] == md5_hex(DATA)
        assert [j["id"] for j in await client.jobs(states=["FINISHED"])] == [job["id"]]
        with pytest.raises(RequestFailed) as refused:
            await client.set_job_priority(job["id"], 1)
        assert refused.value.status == 409
        await client.clear_job(job["id"])
        assert await client.jobs() == []

    def blocking() -> dict[str, Any]:
        with SyncDataStoreClient(served.base, identity=served.identity) as client:
            job = client.submit_job([{"source": "local:/files/a.bin", "destination": "local:/files/sync.bin"}])
            return client.wait_job(job["id"])

    finished = await asyncio.to_thread(blocking)
    assert finished["state"] == "FINISHED"
