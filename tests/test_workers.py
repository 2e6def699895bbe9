"""``datastore serve --workers 2``: two processes on one port sharing the state.

Each test starts the real command and talks to it over loopback. Which
worker a connection reaches is the kernel's choice (SO_REUSEPORT), so a test
that needs a given worker opens connections until the health endpoint, asked
over that same connection, names it; every such search is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from datastore.config import Settings

from .harness import json_manifest, spawn_serve, staged_bytes, until

TUS = {"Tus-Resumable": "1.0.0"}
#: Connections opened, at most, to find a given worker.
ATTEMPTS = 64
#: Bytes staged per step (small, so that a few KiB sent show up on disk).
CHUNK = 16 << 10


class Served:
    """A running ``serve --workers 2`` and where it keeps things."""

    def __init__(self, process: asyncio.subprocess.Process, base: str, host: str, port: int, state: Path) -> None:
        self.process, self.base, self.host, self.port, self.state = process, base, host, port, state

    async def session_on(self, worker: int) -> aiohttp.ClientSession:
        """A session whose one keep-alive connection reaches ``worker``."""
        for _ in range(ATTEMPTS):
            session = aiohttp.ClientSession(self.base, connector=aiohttp.TCPConnector(limit=1))
            async with session.get("/_api/v1/health") as response:
                answered = (await response.json())["worker"]
            if answered == worker:
                return session
            await session.close()
        raise AssertionError(f"no connection reached worker {worker} in {ATTEMPTS} attempts")

    async def raw_on(self, worker: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw keep-alive socket that reaches ``worker``."""
        for _ in range(ATTEMPTS):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(f"GET /_api/v1/health HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
            body = json.loads(await reader.readexactly(length))
            if body["worker"] == worker:
                return reader, writer
            writer.close()
            await writer.wait_closed()
        raise AssertionError(f"no connection reached worker {worker} in {ATTEMPTS} attempts")

    def claimed_by(self, key: str) -> str | None:
        """The worker (pid) holding the claim on file 0 of ``key``, read from the shared registry."""
        with contextlib.closing(sqlite3.connect(self.state / "transfers.sqlite3", timeout=10)) as db:
            row = db.execute("SELECT claimed_by FROM transfer_files WHERE key = ? AND num = 0", (key,)).fetchone()
        return None if row is None else row[0]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    state = tmp_path / "state"
    process, (match,) = await spawn_serve(
        "--root",
        str(tmp_path / "root"),
        "--state-dir",
        str(state),
        "--workers",
        "2",
        env={"DATASTORE_CHUNK_SIZE": str(CHUNK), "DATASTORE_BODY_TIMEOUT": "600", "DATASTORE_FSYNC": "false"},
    )
    try:
        yield Served(process, match["base"], match["host"], int(match["port"]), state)
    finally:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 60)


async def register(session: aiohttp.ClientSession, name: str, content: bytes) -> str:
    async with session.post("/files/manifest", json=json_manifest([(name, content)])) as response:
        assert response.status == 201, await response.text()
        key: str = (await response.json())["transfer_key"]
        return key


async def patch(session: aiohttp.ClientSession, key: str, offset: int, data: bytes) -> aiohttp.ClientResponse:
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
    async with session.patch(f"/files/{key}/0", data=data, headers=headers) as response:
        await response.read()
        return response


async def offset_of(session: aiohttp.ClientSession, key: str) -> int:
    async with session.head(f"/files/{key}/0", headers=TUS) as response:
        assert response.status == 200
        return int(response.headers["Upload-Offset"])


async def stall_patch(writer: asyncio.StreamWriter, host: str, key: str, declared: int, sent: bytes) -> None:
    """Start a PATCH of ``declared`` bytes on ``writer``'s connection and send only ``sent``."""
    head = (
        f"PATCH /files/{key}/0 HTTP/1.1\r\nHost: {host}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nContent-Length: {declared}\r\n\r\n"
    ).encode()
    writer.write(head + sent)
    await writer.drain()


async def downloaded(served: Served, name: str) -> bytes:
    async with aiohttp.ClientSession(served.base) as session, session.get(f"/files/{name}") as response:
        assert response.status == 200
        return await response.read()


async def both_workers_answer(served: Served, timeout: float) -> None:
    """Fresh connections reach worker 0 and worker 1 within ``timeout`` seconds."""
    seen: set[int] = set()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while seen != {0, 1}:
                async with aiohttp.ClientSession(served.base) as session, session.get("/_api/v1/health") as response:
                    seen.add((await response.json())["worker"])
    assert seen == {0, 1}


async def test_both_workers_answer_on_the_one_port(served: Served) -> None:
    await both_workers_answer(served, timeout=10)


async def test_tus_upload_whose_patches_alternate_between_workers_is_verified_and_published(served: Served) -> None:
    content = os.urandom(6 * 64 << 10)
    piece = 64 << 10
    sessions = [await served.session_on(0), await served.session_on(1)]
    try:
        key = await register(sessions[0], "alternating.bin", content)
        for index, offset in enumerate(range(0, len(content), piece)):
            response = await patch(sessions[index % 2], key, offset, content[offset : offset + piece])
            assert response.status == 204, response.reason
            assert int(response.headers["Upload-Offset"]) == offset + piece
        async with sessions[1].get("/files/", headers={"Accept": "application/json"}) as listing:
            files = {f["name"]: f for f in (await listing.json())["files"]}
    finally:
        for session in sessions:
            await session.close()
    assert files["alternating.bin"]["sha256"] == hashlib.sha256(content).hexdigest()
    assert await downloaded(served, "alternating.bin") == content


@contextlib.asynccontextmanager
async def hanging_patch_on_worker_0(
    served: Served, name: str, content: bytes
) -> AsyncIterator[tuple[str, asyncio.StreamReader, aiohttp.ClientSession]]:
    """A transfer of ``content`` whose PATCH hangs on worker 0 after 100 KiB, and a session on worker 1.

    Yields (key, the hanging request's reader, the session); closes both on the way out.
    """
    reader, writer = await served.raw_on(0)
    other = await served.session_on(1)
    try:
        key = await register(other, name, content)
        await stall_patch(writer, served.host, key, len(content), content[: 100 << 10])
        await until(lambda: staged_bytes(served.state / "staging") >= 4 * CHUNK, "worker 0 staged part of the body")
        yield key, reader, other
    finally:
        await other.close()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_patch_on_one_worker_supersedes_a_hanging_patch_on_the_other(served: Served) -> None:
    content = os.urandom(256 << 10)
    async with hanging_patch_on_worker_0(served, "superseded.bin", content) as (key, _reader, newer):
        # The client lost track of the hanging request and starts again from offset 0 on the
        # other worker: the old request is stopped (not waited out: the body timeout is 600 s)
        # and its bytes kept, so the store answers with the offset it really reached.
        async with asyncio.timeout(30):
            response = await patch(newer, key, 0, content)
        assert response.status == 409
        assert "Upload-Offset does not match" in (response.reason or "")
        reached = await offset_of(newer, key)
        assert 4 * CHUNK <= reached <= 100 << 10

        response = await patch(newer, key, reached, content[reached:])
        assert response.status == 204, response.reason
    assert await downloaded(served, "superseded.bin") == content


async def test_cancel_on_one_worker_stops_the_upload_running_on_the_other(served: Served) -> None:
    content = os.urandom(256 << 10)
    async with hanging_patch_on_worker_0(served, "cancelled.bin", content) as (key, reader, other):
        async with other.delete(f"/_api/v1/transfers/{key}") as response:
            assert response.status == 200
            assert (await response.json())["state"] == "CANCELLED"
        # Worker 0 notices, stops reading the body and drops its staged bytes.
        async with asyncio.timeout(30):
            while await reader.read(65536):
                pass
        await until(lambda: staged_bytes(served.state / "staging") == 0, "the staged bytes are gone")
        response = await patch(other, key, 0, content)
        assert response.status == 410


async def test_killed_worker_is_replaced_and_its_upload_resumes_from_the_staged_bytes(served: Served) -> None:
    content = os.urandom(256 << 10)
    async with aiohttp.ClientSession(served.base) as session:
        key = await register(session, "survivor.bin", content)
    _reader, writer = await asyncio.open_connection(served.host, served.port)
    await stall_patch(writer, served.host, key, len(content), content[: 100 << 10])
    await until(lambda: staged_bytes(served.state / "staging") >= 4 * CHUNK, "a worker staged part of the body")
    holder = served.claimed_by(key)
    assert holder is not None

    node, pid = holder.rsplit(":", 1)  # leases are held by NODE:PID
    assert node == Settings().effective_node_id  # the host's name, as no --node-id was given
    os.kill(int(pid), signal.SIGKILL)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()

    async def resumed() -> int:
        # The supervisor ends the dead worker's claim; until then the file is "being uploaded".
        while served.claimed_by(key) is not None:  # noqa: ASYNC110 - another process's state, on disk
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession(served.base) as session:
            return await offset_of(session, key)

    async with asyncio.timeout(30):
        offset = await resumed()
    assert 4 * CHUNK <= offset <= 100 << 10
    async with aiohttp.ClientSession(served.base) as session:
        response = await patch(session, key, offset, content[offset:])
        assert response.status == 204, response.reason
    assert await downloaded(served, "survivor.bin") == content

    # A new worker takes the dead one's place: both numbers answer again.
    await both_workers_answer(served, timeout=30)


async def test_one_name_in_two_manifests_on_two_workers_is_reserved_once(served: Served) -> None:
    sessions = [await served.session_on(0), await served.session_on(1)]
    try:
        for round_ in range(5):
            content = f"round {round_}".encode()

            async def post(session: aiohttp.ClientSession, body: dict[str, Any] = json_manifest(  # noqa: B008
                [(f"contested-{round_}.txt", content)])) -> int:  # fmt: skip
                async with session.post("/files/manifest", json=body) as response:
                    await response.read()
                    return response.status

            statuses = sorted(await asyncio.gather(*(post(s) for s in sessions)))
            assert statuses[0] == 201 and statuses[1] != 201, statuses
    finally:
        for session in sessions:
            await session.close()


async def test_sigterm_stops_the_supervisor_and_every_worker(served: Served) -> None:
    sessions = [await served.session_on(0), await served.session_on(1)]
    for session in sessions:
        await session.close()
    served.process.terminate()
    assert await asyncio.wait_for(served.process.wait(), 60) == 0
    with pytest.raises(OSError):
        await asyncio.open_connection(served.host, served.port)
