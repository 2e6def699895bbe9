"""Several nodes behind HAProxy (``cluster.py``), sharing only a PostgreSQL database and the storage
root: uploads of every protocol, a tus upload whose PATCHes land on every node, ``kill -9`` of the node
receiving an upload, cancellation and superseding across nodes (the cut-off request answered through
the balancer, 410 or 409, never a 502), one event stream carrying every
node's events, a transfer job finished by another node after its node died, and a long mixed run
with a node killed and restarted every few seconds.

Everything is real (``datastore serve`` processes, HAProxy, PostgreSQL) and stopped by PID. Which node
answered a request is its ``X-Datastore-Node`` header; which node holds an upload is its lease in the
shared database. Waits are for conditions, bounded; the mixed run's randomness is seeded and its
loops bounded in count (about 60 s by default, as the issue asks; ``DATASTORE_CLUSTER_SECONDS`` changes it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from datastore.client.events import read_events

from .cluster import NODE_HEADER, Cluster, Node, start_cluster
from .harness import (
    eventually,
    ini_manifest,
    job_store,
    json_manifest,
    md5_hex,
    read_answer,
    sha256_hex,
    staged_bytes,
    until,
)
from .test_legacy_protocol import agtk_download, agtk_upload

MIB = 1 << 20
WAIT = 60.0
TUS = {"Tus-Resumable": "1.0.0"}
DN = "/O=Lab/CN=Ada"
ADA = {"X-Client-DN": DN}
#: Leases run out soon (a dead node's uploads are free again within seconds), the sweeper looks every
#: second, and jobs may reach loopback.
CLUSTER_ENV = {
    "DATASTORE_LEASE_TIME": "3",
    "DATASTORE_SWEEP_INTERVAL": "1",
    "DATASTORE_JOB_HOSTS": "127.0.0.1",
    "DATASTORE_JOB_STALL_TIMEOUT": "3",
    "DATASTORE_JOB_MAX_IDLE_ATTEMPTS": "40",
}


def payload(size: int, seed: int) -> bytes:
    """``size`` bytes that differ from one seed to another (and from one 64 KiB block to the next)."""
    block = random.Random(seed).randbytes(65536)
    return (block * (size // len(block) + 1))[:size]


@contextlib.asynccontextmanager
async def three_nodes(folder: Path, **env: str) -> AsyncIterator[tuple[Cluster, aiohttp.ClientSession]]:
    async with (
        start_cluster(folder, 3, env={**CLUSTER_ENV, **env}) as cluster,
        aiohttp.ClientSession(cluster.url, timeout=aiohttp.ClientTimeout(total=WAIT)) as session,
    ):
        yield cluster, session


def patch_headers(offset: int) -> dict[str, str]:
    return {**TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}


async def tus_create(session: aiohttp.ClientSession, name: str, data: bytes) -> str:
    """A tus creation (``POST /files/``) of ``name``; the upload's path."""
    metadata = ",".join(
        f"{k} {base64.b64encode(v.encode()).decode()}"
        for k, v in (("filename", name), ("md5", md5_hex(data)), ("sha256", sha256_hex(data)))
    )
    headers = {**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": metadata}
    async with session.post("/files/", headers=headers) as response:
        assert response.status == 201, await response.text()
        return urlsplit(response.headers["Location"]).path


async def register(session: aiohttp.ClientSession, files: list[tuple[str, bytes]]) -> str:
    async with session.post("/files/manifest", json=json_manifest(files), headers=ADA) as response:
        assert response.status == 201, await response.text()
        key: str = (await response.json())["transfer_key"]
        return key


async def head_offset(session: aiohttp.ClientSession, path: str) -> int:
    async with session.head(path, headers=TUS) as response:
        assert response.status == 200, response.reason
        return int(response.headers["Upload-Offset"])


async def listing(session: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
    async with session.get("/files/", headers={"Accept": "application/json"}) as response:
        assert response.status == 200, await response.text()
        return {f["name"]: f for f in (await response.json())["files"]}


async def assert_published(session: aiohttp.ClientSession, files: dict[str, bytes]) -> None:
    """Each file is listed with its digests and downloads whole through the balancer."""
    listed = await listing(session)
    for name, content in files.items():
        assert name in listed, f"{name} is not published; the listing has {sorted(listed)}"
        assert (listed[name]["size"], listed[name]["md5"], listed[name]["sha256"]) == (
            len(content),
            md5_hex(content),
            sha256_hex(content),
        ), name
        async with session.get(f"/files/{name}") as response:
            assert response.status == 200, name
            assert md5_hex(await response.read()) == md5_hex(content), name


async def resume_tus(
    session: aiohttp.ClientSession, path: str, data: bytes, what: str, *, nodes_die: bool = True
) -> list[tuple[int, str]]:
    """Resume a tus upload through the balancer until it is complete, as a tus client does: HEAD for the
    offset, PATCH the rest; an answer that is not the end (409 while another request or a dead node
    still holds the upload; while ``nodes_die``, also a 5xx of the balancer or a dropped connection)
    means: look again. Returns the (offset, node) of each PATCH that a node took (204)."""
    taken: list[tuple[int, str]] = []
    again = (409, 423, 502, 503, 504) if nodes_die else (409,)

    async def complete() -> bool:
        try:
            offset = await head_offset(session, path)
            if offset == len(data):
                return True
            async with session.patch(path, data=io.BytesIO(data[offset:]), headers=patch_headers(offset)) as response:
                await response.read()
                if response.status == 204:
                    taken.append((offset, response.headers[NODE_HEADER]))
                    return int(response.headers["Upload-Offset"]) == len(data)
                assert response.status in again, (response.status, response.reason)
        except (aiohttp.ClientError, TimeoutError):
            if not nodes_die:
                raise
        return False

    await eventually(complete, what, WAIT)
    return taken


@dataclass
class StalledPatch:
    """A tus PATCH sent through the balancer on a socket of its own: declared whole, sent in part, held open."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(
        cls, url: str, path: str, offset: int, declared: int, sent: bytes, headers: dict[str, str] | None = None
    ) -> StalledPatch:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        head = (
            f"PATCH {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
            f"Content-Length: {declared}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
            + "\r\n"
        ).encode()
        writer.write(head + sent)
        await writer.drain()
        return cls(reader, writer)

    async def answer(self) -> Answer:
        """What the request was answered through the balancer, once the answer is whole (the balancer
        may keep the connection open while the body it declared is still due)."""
        raw = await read_answer(self.reader)
        return Answer(raw.status, raw.headers, raw.body)

    def close(self) -> None:
        self.writer.close()


async def node_after(cluster: Cluster, session: aiohttp.ClientSession, node: Node) -> None:
    """Steer the round robin: send health requests until ``node`` answers one, so that the next request
    through the balancer goes to another node (bounded)."""

    async def answered() -> bool:
        async with session.get("/_api/v1/health") as response:
            return response.headers[NODE_HEADER] == node.node_id

    await eventually(answered, f"{node.node_id} answered through the balancer", WAIT)


# -- 1. every protocol, through the balancer ------------------------------------------------------------


async def test_every_kind_of_upload_through_three_nodes_ends_published_and_downloads(tmp_path: Path) -> None:
    legacy = [("legacy-0.bin", payload(300_000, 1)), ("legacy-1.bin", payload(5000, 2))]
    put, form, tus = payload(2 * MIB + 7, 3), payload(700_000, 4), payload(3 * MIB + 5, 5)
    answered: set[str] = set()
    async with three_nodes(tmp_path) as (cluster, session):
        host, port = urlsplit(cluster.url).hostname, urlsplit(cluster.url).port
        assert host is not None and port is not None
        # AccessGrid 2.x: an INI manifest, then each file POSTed on a connection of its own.
        sent = await asyncio.to_thread(
            agtk_upload, host, port, "files", ini_manifest(legacy), [c for _, c in legacy], DN
        )
        assert sent.file_statuses == [(200, "File transfer OK")] * 2
        # A JSON manifest with two files: one PUT, one a browser's multipart form.
        key = await register(session, [("put.bin", put), ("form.bin", form)])
        async with session.put(f"/files/{key}/0", data=io.BytesIO(put), headers=ADA) as response:
            assert response.status == 200, await response.text()
            answered.add(response.headers[NODE_HEADER])
        fields = aiohttp.FormData()
        fields.add_field("file", io.BytesIO(form), filename="form.bin", content_type="application/octet-stream")
        async with session.post(f"/files/{key}/1", data=fields, headers=ADA) as response:
            assert response.status == 200, await response.text()
            answered.add(response.headers[NODE_HEADER])
        # tus: a creation, then PATCHes of 1 MiB.
        path = await tus_create(session, "tus.bin", tus)
        for offset in range(0, len(tus), MIB):
            async with session.patch(path, data=tus[offset : offset + MIB], headers=patch_headers(offset)) as response:
                assert response.status == 204, await response.text()
                answered.add(response.headers[NODE_HEADER])
        await assert_published(session, {**dict(legacy), "put.bin": put, "form.bin": form, "tus.bin": tus})
        for name, content in legacy:
            got = await asyncio.to_thread(agtk_download, host, port, f"/files/{name}", len(content), md5_hex(content))
            assert got == content
        async with session.get(f"/_api/v1/transfers/{key}", headers=ADA) as response:
            assert (await response.json())["state"] == "FINISHED"
        assert answered == {"node-a", "node-b", "node-c"}, answered
        assert not os.listdir(cluster.staging)


# -- 2. one tus upload, every node ----------------------------------------------------------------------


async def test_the_patches_of_one_tus_upload_land_on_all_three_nodes(tmp_path: Path) -> None:
    data = payload(6 * 256 * 1024 + 11, 6)
    piece = 256 * 1024
    async with three_nodes(tmp_path) as (cluster, session):
        path = await tus_create(session, "spread.bin", data)
        by_node: dict[str, list[int]] = {}
        for offset in range(0, len(data), piece):
            async with session.patch(path, data=data[offset : offset + piece], headers=patch_headers(offset)) as reply:
                assert reply.status == 204, await reply.text()
                assert int(reply.headers["Upload-Offset"]) == min(offset + piece, len(data))
                by_node.setdefault(reply.headers[NODE_HEADER], []).append(offset)
            # Each node's HEAD agrees on the offset the others' PATCHes reached.
            for node in cluster.nodes:
                async with aiohttp.ClientSession(node.base) as direct, direct.head(path, headers=TUS) as head:
                    assert int(head.headers["Upload-Offset"]) == min(offset + piece, len(data)), node.node_id
        assert sorted(by_node) == ["node-a", "node-b", "node-c"], by_node
        await assert_published(session, {"spread.bin": data})


# -- 3. kill -9 of the node receiving an upload -----------------------------------------------------------


async def test_kill_9_of_the_node_receiving_a_patch_then_the_client_resumes_through_the_balancer(
    tmp_path: Path,
) -> None:
    data = payload(8 * MIB + 3, 7)
    async with three_nodes(tmp_path) as (cluster, session):
        path = await tus_create(session, "survivor.bin", data)
        key = path.split("/")[2]
        stalled = await StalledPatch.open(cluster.url, path, 0, len(data), data[: 5 * MIB // 2])
        try:
            receiving = await cluster.wait_holder(key)
            await until(lambda: cluster.staged_size(key) >= 2 * MIB, "two mebibytes are staged", WAIT)
            await receiving.kill()
        finally:
            stalled.close()
        # The client goes on through the balancer: once the dead node's lease ran out, HEAD answers
        # what it really staged, and the rest is sent from there.
        taken = await resume_tus(session, path, data, "the upload resumed and completed")
        assert taken[0][0] >= 2 * MIB, taken
        assert all(node != receiving.node_id for _, node in taken), (receiving.node_id, taken)
        await assert_published(session, {"survivor.bin": data})
        assert not os.listdir(cluster.staging)
        # The node comes back on its port and serves the file too.
        await cluster.restart(receiving)
        async with aiohttp.ClientSession(receiving.base) as direct, direct.get("/files/survivor.bin") as response:
            assert md5_hex(await response.read()) == md5_hex(data)


# -- 4. stopping an upload from another node --------------------------------------------------------------

#: Seconds within which an upload streaming on one node stops once another node cancelled it.
CANCEL_BOUND = 2.0


async def test_a_cancel_landing_on_another_node_stops_the_upload_within_the_bound(tmp_path: Path) -> None:
    data = payload(8 * MIB, 8)
    async with three_nodes(tmp_path) as (cluster, session):
        key = await register(session, [("doomed.bin", data)])
        path = f"/files/{key}/0"
        stalled = await StalledPatch.open(cluster.url, path, 0, len(data), data[: 3 * MIB // 2], JSON_ADA)
        try:
            streaming = await cluster.wait_holder(key)
            await until(lambda: cluster.staged_size(key) >= MIB, "a mebibyte is staged", WAIT)
            answered = asyncio.ensure_future(stalled.answer())
            await node_after(cluster, session, streaming)
            async with session.delete(f"/_api/v1/transfers/{key}", headers=ADA) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["state"] == "CANCELLED"
                assert response.headers[NODE_HEADER] != streaming.node_id
            cancelled = time.monotonic()
            # The streaming node lets go of the upload: its request is answered, its lease is gone.
            async with asyncio.timeout(WAIT):
                answer = await answered
            stopped = time.monotonic() - cancelled
            await eventually(lambda: _no_holder(cluster, key), "the cancelled upload holds no lease", CANCEL_BOUND)
        finally:
            stalled.close()
        assert stopped < CANCEL_BOUND, f"the upload went on for {stopped:.2f} s after the cancel"
        # The client, still sending, is told why by the node it was sending to, through the balancer
        # (not the balancer's 502 for a node that hung up without an answer).
        assert (answer.status, answer.code) == (410, "transfer_cancelled"), answer
        assert answer.headers[NODE_HEADER] == streaming.node_id
        await until(lambda: not os.listdir(cluster.staging), "the staged bytes are gone", CANCEL_BOUND)
        assert "doomed.bin" not in await listing(session)
        async with session.put(path, data=io.BytesIO(data), headers=ADA) as response:
            assert response.status == 410, response.reason


async def _no_holder(cluster: Cluster, key: str) -> bool:
    return await cluster.holder_of(key) is None


async def test_a_newer_patch_on_one_node_supersedes_a_hanging_one_on_another(tmp_path: Path) -> None:
    data = payload(4 * MIB + 9, 9)
    async with three_nodes(tmp_path) as (cluster, session):
        path = await tus_create(session, "taken-over.bin", data)
        key = path.split("/")[2]
        stalled = await StalledPatch.open(
            cluster.url, path, 0, len(data), data[: 3 * MIB // 2], {"Accept": "application/json"}
        )
        try:
            hanging = await cluster.wait_holder(key)
            await until(lambda: cluster.staged_size(key) >= MIB, "a mebibyte is staged", WAIT)
            answered = asyncio.ensure_future(stalled.answer())
            await node_after(cluster, session, hanging)
            # The client (its old connection hanging) starts again from the offset HEAD gives it; no
            # node dies here, so nothing but a 409 (the old request still held the upload) is looked past.
            taken = await resume_tus(session, path, data, "the newer requests completed the upload", nodes_die=False)
            async with asyncio.timeout(WAIT):
                answer = await answered
        finally:
            stalled.close()
        # The old request is told, through the balancer, that a newer one took its upload over.
        assert (answer.status, answer.code) == (409, "upload_in_progress"), answer
        assert answer.headers[NODE_HEADER] == hanging.node_id
        assert all(node != hanging.node_id for _, node in taken[:1]), (hanging.node_id, taken)
        # What the old request staged was kept: the newer one went on from it.
        assert taken[0][0] >= MIB, taken
        await assert_published(session, {"taken-over.bin": data})
        assert not os.listdir(cluster.staging)


# -- 5. one event stream, every node ----------------------------------------------------------------------


async def take_events(events: AsyncIterator[Any], until_done: Any, what: str) -> list[dict[str, Any]]:
    """Events of a stream until ``until_done(received)`` holds (bounded)."""
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        while not until_done(received):
            received.append((await anext(events)).json())
    return received


async def test_one_event_stream_carries_every_nodes_events_in_order_and_replays_by_last_event_id(
    tmp_path: Path,
) -> None:
    files = {f"event-{n}.bin": payload(50_000 + n, 20 + n) for n in range(6)}
    lifecycle = ["transfer.created", "file.started", "file.completed", "transfer.finished"]
    async with three_nodes(tmp_path) as (cluster, session), session.get("/_api/v1/events") as stream:
        assert stream.status == 200
        streaming = stream.headers[NODE_HEADER]
        events = read_events(stream.content)
        uploaded_on: set[str] = set()
        for name, content in files.items():
            key = await register(session, [(name, content)])
            async with session.put(f"/files/{key}/0", data=io.BytesIO(content), headers=ADA) as response:
                assert response.status == 200, await response.text()
                uploaded_on.add(response.headers[NODE_HEADER])
        # The uploads were verified and published on every node, the stream served by one.
        assert uploaded_on == {"node-a", "node-b", "node-c"}, uploaded_on

        def all_finished(received: list[dict[str, Any]]) -> bool:
            return sum(e["type"] == "transfer.finished" for e in received) == len(files)

        live = await take_events(events, all_finished, "every transfer finished")
        ids = [e["id"] for e in live]
        assert ids == sorted(set(ids)), ids
        by_transfer: dict[str, list[dict[str, Any]]] = {}
        for event in live:
            by_transfer.setdefault(event["transfer"], []).append(event)
        assert len(by_transfer) == len(files)
        for transfer_events in by_transfer.values():
            assert [e["type"] for e in transfer_events if e["type"] != "file.progress"] == lifecycle, transfer_events
        assert [e["name"] for e in live if e["type"] == "file.completed"] == list(files)

        # A client reconnecting after the third transfer finished (through the balancer, to another node
        # than the first stream's) gets exactly what came after it, from the log.
        middle = [e for e in live if e["type"] == "transfer.finished"][2]["id"]
        await node_after(cluster, session, cluster.node(streaming))
        async with session.get("/_api/v1/events", headers={"Last-Event-ID": str(middle)}) as again:
            assert again.status == 200
            assert again.headers[NODE_HEADER] != streaming
            replayed = await take_events(
                read_events(again.content), lambda got: bool(got) and got[-1]["id"] == ids[-1], "the replay caught up"
            )
        assert replayed == [e for e in live if e["id"] > middle]


# -- 6. a transfer job outlives its node ------------------------------------------------------------------


async def test_a_transfer_job_whose_node_is_killed_is_finished_by_another_node(tmp_path: Path) -> None:
    data = payload(6 * MIB + 1, 30)
    async with (
        job_store(tmp_path / "source", data, DN) as source,
        three_nodes(tmp_path / "cluster") as (cluster, session),
    ):
        job = {
            "files": [{"source": f"{source['url']}a.bin", "destination": "local:/files/copied.bin"}],
            "bandwidth": MIB,
        }
        async with session.post("/_api/v1/jobs", json=job, headers=ADA) as response:
            assert response.status == 201, await response.text()
            job_id = (await response.json())["id"]
        running = cluster.node_of(await job_runner(cluster, job_id))
        await until(lambda: staged_bytes(cluster.staging) >= MIB, "a mebibyte of the copy is staged", WAIT)
        await running.kill()
        # Nobody restarts it: the other nodes notice its lease ran out, and one of them finishes the job.
        last: dict[str, Any] = {}

        async def finished() -> bool:
            nonlocal last
            async with session.get(f"/_api/v1/jobs/{job_id}", headers=ADA) as response:
                if response.status != 200:
                    return False
                last = await response.json()
            assert last["state"] not in ("FAILED", "FINISHED_DIRTY"), last
            return bool(last["state"] == "FINISHED")

        await eventually(finished, "another node finished the job", 2 * WAIT)
        attempts = await cluster.query(
            "SELECT a.holder, a.outcome, a.reason FROM job_attempts a JOIN jobs j ON j.seq = a.job_seq"
            " WHERE j.id = %s ORDER BY a.number",
            (job_id,),
        )
        # The dead node's attempt was ended for it; the attempt that finished ran on another node.
        assert str(attempts[0]["holder"]).startswith(f"{running.node_id}:"), attempts
        assert attempts[0]["reason"] == "lease_expired", attempts
        assert attempts[-1]["outcome"] == "finished" and not str(attempts[-1]["holder"]).startswith(
            f"{running.node_id}:"
        ), attempts
        await assert_published(session, {"copied.bin": data})
        assert not os.listdir(cluster.staging)


async def job_runner(cluster: Cluster, job_id: str) -> str:
    """The holder (``NODE:PID``) of the running copy of the job's first file, once one runs it."""
    found: list[str] = []

    async def active() -> bool:
        rows = await cluster.query(
            "SELECT f.claimed_by FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
            " WHERE j.id = %s AND f.state = 'ACTIVE' AND f.claimed_by IS NOT NULL",
            (job_id,),
        )
        found.extend(str(row["claimed_by"]) for row in rows)
        return bool(rows)

    await eventually(active, "a node runs the job", WAIT)
    return found[-1]


# -- 7. a long mixed run while nodes die ------------------------------------------------------------------

#: Seconds the mixed run lasts, about (the env var changes it): one kill and restart every 5 s or so,
#: their count fixed (clients start no new operation after the last restart), so that how busy the
#: machine is changes how long the run takes, not what it does.
MIXED_SECONDS = float(os.environ.get("DATASTORE_CLUSTER_SECONDS", "60"))
MIXED_KILLS = max(2, round(MIXED_SECONDS / 5))
#: The seed of the run's choices (sizes, operations, victims, pauses); the env var replays another.
MIXED_SEED = int(os.environ.get("DATASTORE_CLUSTER_SEED", "13"))
#: Concurrent clients, and the most operations each makes.
CLIENTS = 4
MAX_OPERATIONS = 400
#: Seconds one upload may take to complete through kills before its client cancels it instead.
UPLOAD_BUDGET = 25.0
#: Answers that mean "not now" (a node died under the request, or holds too much now): try again.
TRANSIENT = (429, 500, 502, 503, 504)
#: 409s that mean "not now": another request (or a dead node, until its lease runs out) holds the upload,
#: or the client's offset is behind what a request it lost staged.
TRANSIENT_CONFLICTS = ("upload_in_progress", "offset_mismatch")
#: What the clients send: they read errors as JSON, by their code.
JSON_ADA = {**ADA, "Accept": "application/json"}


@dataclass
class Ledger:
    """What the clients of the mixed run were told, and what they did."""

    #: Every file a client registered: name -> its content.
    contents: dict[str, bytes] = field(default_factory=dict)
    #: Uploads the store acknowledged (200 to a PUT, 204 to the PATCH that completed the file).
    acknowledged: set[str] = field(default_factory=set)
    #: Transfers cancelled (their DELETE answered CANCELLED), by key: name.
    cancelled: dict[str, str] = field(default_factory=dict)
    #: Every transfer made, key: name.
    keys: dict[str, str] = field(default_factory=dict)
    #: What each cancel was answered.
    told: dict[str, bytes] = field(default_factory=dict)
    verified_downloads: int = 0
    kills: int = 0
    operations: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.operations[what] = self.operations.get(what, 0) + 1


@dataclass(frozen=True)
class Answer:
    """A node's answer through the balancer."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def code(self) -> str | None:
        """The error's code, for an error answered as JSON."""
        if self.status < 400 or not self.headers.get("Content-Type", "").startswith("application/json"):
            return None
        code: str = json.loads(self.body).get("error")
        return code

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT or (self.status == 409 and self.code in TRANSIENT_CONFLICTS)


async def attempt(session: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> Answer | None:
    """One request through the balancer: the answer, or None if the connection failed under it."""
    try:
        async with session.request(method, path, **kwargs) as response:
            return Answer(response.status, CIMultiDict(response.headers), await response.read())
    except (aiohttp.ClientError, TimeoutError):
        return None


async def until_answered(session: aiohttp.ClientSession, method: str, path: str, what: str, **kwargs: Any) -> Answer:
    """Send the request again (bounded) until a node gives an answer that is not transient."""
    last: list[Answer] = []

    async def answered() -> bool:
        got = await attempt(session, method, path, **kwargs)
        if got is not None:
            last.append(got)
        return got is not None and not got.transient

    await eventually(answered, what, UPLOAD_BUDGET)
    return last[-1]


async def within_budget(step: Any) -> bool:
    """Run ``step()`` (paced, bounded by UPLOAD_BUDGET) until it says it is done; False if it never was."""
    try:
        await eventually(step, "the upload ended", UPLOAD_BUDGET)
    except AssertionError:
        return False
    return True


class MixedClient:
    """One client of the mixed run: uploads (whole-body and tus), downloads and cancels, each
    operation ended one way or the other (an upload is completed, or cancelled by its client)."""

    def __init__(self, number: int, session: aiohttp.ClientSession, ledger: Ledger, cluster: Cluster) -> None:
        self.number, self.session, self.ledger, self.cluster = number, session, ledger, cluster
        self.url = cluster.url
        self.random = random.Random(MIXED_SEED * 100 + number)

    async def run(self, stop: asyncio.Event) -> None:
        for n in range(MAX_OPERATIONS):
            if stop.is_set():
                return
            kind = self.random.choices(["put", "tus", "download", "cancel"], weights=[3, 3, 2, 1])[0]
            self.ledger.count(kind)
            if kind == "download":
                await self.download()
                continue
            name = f"c{self.number}-{n}-{kind}.bin"
            size = self.random.randrange(1, 3 * MIB)
            content = payload(size, MIXED_SEED * 100_000 + self.number * 1000 + n)
            key = await self.register(name, content)
            path = f"/files/{key}/0"
            if kind == "cancel":
                await self.start_and_cancel(key, path, content)
                continue
            done = await (self.put(path, content) if kind == "put" else self.tus(path, content))
            if done:
                self.ledger.acknowledged.add(name)
            else:
                await self.cancel(key)

    async def register(self, name: str, content: bytes) -> str:
        """A JSON manifest, sent again (with the same Idempotency-Key) until a node answers it.

        Nobody else registers the name, so a refusal means a node died between reserving it and
        recording the transfer: the store frees such a name once it is older than a lease (the
        sweep), and the manifest is sent again until then."""
        self.ledger.contents[name] = content
        last: list[Answer] = []

        async def registered() -> bool:
            got = await attempt(
                self.session,
                "POST",
                "/files/manifest",
                json=json_manifest([(name, content)]),
                headers={**JSON_ADA, "Idempotency-Key": name},
            )
            if got is not None:
                last.append(got)
                if got.status == 403:
                    self.ledger.count("refused, a reservation left by a dead node")
            return got is not None and not got.transient and got.status != 403

        try:
            await eventually(registered, f"{name} registered", UPLOAD_BUDGET)
        except AssertionError:
            held = await self.cluster.query(
                "SELECT 'pending' AS kind, name, reserved_at AS at FROM catalogue_pending WHERE name = %s"
                " UNION ALL SELECT 'published', name, uploaded_at FROM catalogue_files WHERE name = %s",
                (name, name),
            )
            raise AssertionError(f"{name} was never registered: {last[-1:]}; the catalogue holds {held}") from None
        assert last[-1].status == 201, last[-1]
        key: str = json.loads(last[-1].body)["transfer_key"]
        self.ledger.keys[key] = name
        return key

    async def put(self, path: str, content: bytes) -> bool:
        """A whole-body PUT, sent again after a transient failure: True once acknowledged (200)."""
        acknowledged = False

        async def ended() -> bool:
            nonlocal acknowledged
            got = await attempt(self.session, "PUT", path, data=io.BytesIO(content), headers=JSON_ADA)
            acknowledged = got is not None and got.status == 200
            # Another answer is final too: 409 already_uploaded (a PUT whose answer was lost published it).
            return got is not None and not got.transient

        return await within_budget(ended) and acknowledged

    async def tus(self, path: str, content: bytes) -> bool:
        """PATCHes of up to 512 KiB; after a failure HEAD for the offset and go on: True once the PATCH
        that completed the file was acknowledged (204)."""
        piece = 512 * 1024
        offset = 0
        acknowledged = False

        async def ended() -> bool:
            nonlocal offset, acknowledged
            body = content[offset : offset + piece]
            headers = {**patch_headers(offset), **JSON_ADA}
            got = await attempt(self.session, "PATCH", path, data=io.BytesIO(body), headers=headers)
            if got is not None and got.status == 204:
                offset = int(got.headers["Upload-Offset"])
                acknowledged = offset == len(content)
                return acknowledged
            if got is not None and not got.transient:
                return True  # refused for good (409 already uploaded: a PATCH whose answer was lost completed it)
            head = await attempt(self.session, "HEAD", path, headers={**TUS, **ADA})
            if head is not None and head.status == 200:
                offset = int(head.headers["Upload-Offset"])
                return offset == len(content)  # complete, but the acknowledgement was lost
            return False

        return await within_budget(ended) and acknowledged

    async def start_and_cancel(self, key: str, path: str, content: bytes) -> None:
        """Send part of the file (a PATCH left hanging, or one that ends), then cancel the transfer."""
        part = content[: len(content) // 2]
        if self.random.random() < 0.5:
            stalled = await StalledPatch.open(self.url, path, 0, len(content), part, ADA)
            try:
                await self.cancel(key)
            finally:
                stalled.close()
        else:
            await attempt(self.session, "PATCH", path, data=io.BytesIO(part), headers={**patch_headers(0), **ADA})
            await self.cancel(key)

    async def cancel(self, key: str) -> None:
        got = await until_answered(
            self.session, "DELETE", f"/_api/v1/transfers/{key}", f"{key[:8]} cancelled", headers=JSON_ADA
        )
        if got.status == 200 and json.loads(got.body)["state"] == "CANCELLED":
            self.ledger.cancelled[key] = self.ledger.keys[key]
            self.ledger.told[key] = got.body
        else:
            # Finished meanwhile: an upload whose acknowledgement was lost.
            assert got.status == 409 and got.code == "conflict", (got.status, got.body)

    async def download(self) -> None:
        names = sorted(self.ledger.acknowledged)
        if not names:
            return
        name = self.random.choice(names)
        got = await attempt(self.session, "GET", f"/files/{name}")
        if got is not None and got.status == 200:
            assert md5_hex(got.body) == md5_hex(self.ledger.contents[name]), name
            self.ledger.verified_downloads += 1
        else:
            # Only a node dying under the request may fail a download.
            assert got is None or got.status in (502, 503, 504), got


async def chaos(cluster: Cluster, ledger: Ledger, stop: asyncio.Event) -> None:
    """:data:`MIXED_KILLS` times, after a seeded pause of a few seconds (a schedule of faults, not a
    wait for anything), ``kill -9`` a node, one receiving an upload if there is one, and start it
    again on its port; then tell the clients to stop. The run's length follows from the count."""
    rng = random.Random(MIXED_SEED)
    try:
        for _ in range(MIXED_KILLS):
            await asyncio.sleep(rng.uniform(2.0, 4.0))
            rows = await cluster.query("SELECT claimed_by FROM transfer_files WHERE state = 'UPLOADING'")
            holders = sorted({str(row["claimed_by"]).split(":", 1)[0] for row in rows})
            alive = [node for node in cluster.nodes if node.alive and (not holders or node.node_id in holders)]
            victim = rng.choice(alive or cluster.nodes)
            await victim.kill()
            ledger.kills += 1
            await cluster.restart(victim)
    finally:
        stop.set()


async def test_a_long_mixed_run_while_nodes_are_killed_loses_nothing_acknowledged_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    ledger = Ledger()
    async with three_nodes(tmp_path) as (cluster, session):
        stop = asyncio.Event()
        clients = [MixedClient(n, session, ledger, cluster) for n in range(CLIENTS)]
        await asyncio.gather(chaos(cluster, ledger, stop), *(client.run(stop) for client in clients))
        assert ledger.kills == MIXED_KILLS, ledger.kills
        assert len(ledger.acknowledged) >= 2 * CLIENTS and ledger.cancelled, ledger.operations

        # Once the dead nodes' leases ran out and were reaped: every transfer ended, nothing held.
        left: list[object] = []

        async def settled() -> bool:
            open_files = await cluster.query(
                "SELECT f.key, f.num, f.state, f.claimed_by, f.received FROM transfer_files f"
                " JOIN transfers t ON t.key = f.key WHERE t.state = 'OPEN' OR f.state = 'UPLOADING'"
            )
            staged = sorted(os.listdir(cluster.staging))
            left[:] = [open_files, staged]
            return not open_files and not staged

        try:
            await eventually(settled, "every transfer ended, no lease held and nothing staged", WAIT)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: left {left}; the clients saw {ledger.operations}") from None

        # Every acknowledged upload is published with its checksums; nothing cancelled is.
        listed = await listing(session)
        await assert_published(session, {name: ledger.contents[name] for name in ledger.acknowledged})
        for name, entry in listed.items():
            assert entry["sha256"] == sha256_hex(ledger.contents[name]), name
        both = sorted(set(ledger.cancelled.values()) & set(listed))
        if both:
            name = both[0]
            key = next(k for k, n in ledger.cancelled.items() if n == name)
            rows = await cluster.query("SELECT id, type, bytes, reason FROM events WHERE key = %s ORDER BY id", (key,))
            raise AssertionError(f"cancelled yet published: {both}; {name}: {rows}; told {ledger.told[key]!r}")
        # Nothing partial is visible: the folder holds exactly the listed files, whole.
        on_disk = {p.name: p.stat().st_size for p in cluster.served.iterdir()}
        assert on_disk == {name: entry["size"] for name, entry in listed.items()}

        # The event log agrees with the catalogue and the transfers.
        events = await cluster.query(
            "SELECT id, type, key, num, name, sha256 FROM events WHERE prefix = 'files' ORDER BY id"
        )
        transfers = {
            str(row["key"]): str(row["state"]) for row in await cluster.query("SELECT key, state FROM transfers")
        }
        assert set(transfers) == set(ledger.keys)
        completed = [e for e in events if e["type"] == "file.completed"]
        assert sorted(str(e["name"]) for e in completed) == sorted(listed)
        for event in completed:
            assert event["sha256"] == listed[str(event["name"])]["sha256"]
        for key, state in transfers.items():
            kinds = [str(e["type"]) for e in events if e["key"] == key]
            assert kinds[0] == "transfer.created", (key, kinds)
            ending = {"FINISHED": "transfer.finished", "CANCELLED": "transfer.cancelled"}[state]
            assert kinds.count(ending) == 1 and kinds[-1] in (ending, "file.cancelled"), (key, state, kinds)
            # Each attempt that started ended, announced: completed, failed, interrupted or cancelled.
            starts = kinds.count("file.started")
            ends = sum(kinds.count(k) for k in ("file.completed", "file.failed", "file.interrupted"))
            assert ends == starts or (state == "CANCELLED" and ends == starts - 1), (key, state, kinds)
        assert ledger.verified_downloads > 0, ledger.operations
