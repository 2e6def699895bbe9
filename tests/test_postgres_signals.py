"""Cross-node signals on PostgreSQL (``state/postgres_signals.py``): what one process commits, every
other listening process hears at once (events appended, an upload's lease ended or asked to stop, a
job's state, queued work), never its own; a lost listening connection is made again and says that
signals may have been missed. Then the whole path: a cancel on one node stops an upload streaming
into another long before the lease would be looked at again. On the session's own cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest

from datastore.jobs.states import JobStep
from datastore.lifecycle.states import StopReason
from datastore.protocol.manifest import ManifestFile
from datastore.security.identity import Identity, IdentityKind
from datastore.state.interface import Signal, SignalKind
from datastore.state.jobs import JobFileSpec, JobQuota, JobSpec
from datastore.state.postgres import PostgresState

from .harness import eventually, json_manifest, spawn_serve, until
from .postgres_server import shared_cluster

ADA = Identity(IdentityKind.TOKEN, "ada", None, dn="ada")
T0 = 1_000_000.0


@pytest.fixture
def url() -> Iterator[str]:
    with shared_cluster().database() as database:
        yield database


class Heard:
    """What one listening state store heard."""

    def __init__(self) -> None:
        self.signals: list[Signal] = []

    def __call__(self, signal: Signal) -> None:
        self.signals.append(signal)

    def of(self, kind: SignalKind) -> list[Signal]:
        return [s for s in self.signals if s.kind is kind]


@pytest.fixture
async def nodes(url: str) -> AsyncIterator[tuple[PostgresState, PostgresState, Heard]]:
    """Two state stores on one database, as two nodes have them; the first listens."""
    listening, other, heard = PostgresState(url), PostgresState(url), Heard()
    try:
        assert await listening.listen(heard)
        # Listening starts by saying that what came before it was not heard.
        assert heard.signals == [Signal(SignalKind.MISSED)]
        yield listening, other, heard
    finally:
        await listening.close()
        await other.close()


async def test_events_another_process_appends_are_heard_and_its_own_are_not(
    nodes: tuple[PostgresState, PostgresState, Heard],
) -> None:
    listening, other, heard = nodes
    await other.create("files", ADA, [ManifestFile("a.bin", 1)], lifetime=60.0, now=T0)
    await until(lambda: len(heard.of(SignalKind.EVENTS)) == 1, "the other's events heard")
    # Its own transaction comes first and the other's after it: had its own been heard, it would
    # be heard before the other's.
    await listening.create("files", ADA, [ManifestFile("b.bin", 1)], lifetime=60.0, now=T0)
    await other.create("files", ADA, [ManifestFile("c.bin", 1)], lifetime=60.0, now=T0)
    await until(lambda: len(heard.of(SignalKind.EVENTS)) >= 2, "the other's second events heard")
    assert len(heard.of(SignalKind.EVENTS)) == 2


async def test_an_upload_lease_stopped_ended_or_cancelled_elsewhere_is_signalled_by_its_file(
    nodes: tuple[PostgresState, PostgresState, Heard],
) -> None:
    _, other, heard = nodes
    transfer = await other.create(
        "files", ADA, [ManifestFile("a.bin", 10), ManifestFile("b.bin", 10)], lifetime=60.0, now=T0
    )
    key = transfer.key
    await other.claim(key, 0, "node-b:1", lease=30.0, now=T0)
    await other.renew(key, 0, "node-b:1", lease=30.0, now=T0 + 1)  # a renewal changes nothing anyone waits for
    assert await other.request_stop(key, 0, StopReason.SUPERSEDED) == "node-b:1"
    await until(lambda: heard.of(SignalKind.FILE) == [Signal(SignalKind.FILE, key, 0)], "the stop")
    assert await other.pause(key, 0, "node-b:1", received=4)
    await until(lambda: len(heard.of(SignalKind.FILE)) == 2, "the lease's end")
    await other.claim(key, 1, "node-b:1", lease=30.0, now=T0 + 2)
    await other.cancel(key, now=T0 + 3)
    await until(lambda: len(heard.of(SignalKind.FILE)) == 3, "the cancel")
    # Only the file that was uploading is named: the paused one's lease had ended already.
    assert heard.of(SignalKind.FILE)[1:] == [Signal(SignalKind.FILE, key, 0), Signal(SignalKind.FILE, key, 1)]


async def test_queued_work_and_a_job_changing_state_are_signalled(
    nodes: tuple[PostgresState, PostgresState, Heard],
) -> None:
    _, other, heard = nodes
    files = (JobFileSpec("https://src.example/a", "local:/dest/a", size=10),)
    job, _ = await other.submit(ADA, JobSpec(files=files), commit=True, now=T0, quota=JobQuota())
    await until(lambda: bool(heard.of(SignalKind.QUEUED)), "the queued file")
    await other.step(job.id, JobStep.PAUSE, now=T0 + 1)
    await until(lambda: heard.of(SignalKind.JOB) == [Signal(SignalKind.JOB, job.id)], "the paused job")


async def test_a_lost_listening_connection_is_made_again_and_says_signals_were_missed(
    url: str, nodes: tuple[PostgresState, PostgresState, Heard]
) -> None:
    _, other, heard = nodes

    def cut() -> int:
        with psycopg.connect(url, autocommit=True) as db:
            rows = db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
            ).fetchall()
            return len(rows)

    assert await asyncio.to_thread(cut) == 1
    await until(lambda: len(heard.of(SignalKind.MISSED)) == 2, "listening again", timeout=30.0)
    await other.create("files", ADA, [ManifestFile("a.bin", 1)], lifetime=60.0, now=T0)
    await until(lambda: bool(heard.of(SignalKind.EVENTS)), "signals after the new connection")


async def test_a_cancel_on_one_node_stops_an_upload_streaming_into_another_at_once(url: str, tmp_path: Path) -> None:
    # A lease looked at every 40 s: only the signal can stop the upload within the wait below.
    args, lease = ("--root", str(tmp_path / "served"), "--state", url), {"DATASTORE_LEASE_TIME": "120"}
    first, (one,) = await spawn_serve(*args, "--node-id", "one", env=lease)
    second, (two,) = await spawn_serve(*args, "--node-id", "two", env=lease)
    try:
        data = b"x" * 1_000_000
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{one['base']}/files/manifest", json=json_manifest([("a.bin", data)])) as response:
                assert response.status == 201, await response.text()
                key = (await response.json())["transfer_key"]
            sent = asyncio.Event()

            async def stalled() -> AsyncIterator[bytes]:
                yield data[:1000]
                sent.set()
                await asyncio.Event().wait()  # never sends the rest

            upload = asyncio.create_task(
                session.put(f"{one['base']}/files/{key}/0", data=stalled(), headers={"Content-Length": str(len(data))})
            )
            await sent.wait()
            await eventually(lambda: _in_progress(session, two["base"], key), "the upload under way on node one")
            async with session.delete(f"{two['base']}/_api/v1/transfers/{key}") as response:
                assert response.status == 200, await response.text()
            # Node one ends the request (its answer, or the connection) long before it would look
            # at the lease again.
            async with asyncio.timeout(10.0):
                try:
                    answer: int | None = (await upload).status
                except aiohttp.ClientError:
                    answer = None
            assert answer != 201
            async with session.get(f"{one['base']}/_api/v1/transfers/{key}") as response:
                assert (await response.json())["state"] == "CANCELLED"
    finally:
        for process in (first, second):
            if process.returncode is None:
                process.terminate()
                await asyncio.wait_for(process.wait(), 60)


async def _in_progress(session: aiohttp.ClientSession, base: str, key: str) -> bool:
    async with session.get(f"{base}/_api/v1/transfers/{key}") as response:
        status = await response.json()
    return bool(status["files"][0]["state"] == "IN_PROGRESS")
