"""tus 1.0.0 on the upload URLs: real clients, crashes, dropped and hanging requests, the protocol's errors.

Every test runs a real store on loopback (pytest-aiohttp's test server, or a
``python -m datastore serve`` subprocess where a crash is the point). What no
client library will send (a PATCH cut short, a PATCH left hanging) goes over a
raw socket. Nothing sleeps to guess at timing: where the server must catch up
(a dropped connection, bytes reaching the disk of another process), the test
polls what it can observe (HEAD, the staging file) until a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import random
import re
import shutil
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from tusclient import client as tus_client
from yarl import URL

import datastore.storage.staging
from datastore.lifecycle.machine import RunningUpload

from .conftest import MakeStore
from .fakes import RecordingHandler
from .harness import Store, ini_manifest, md5_hex, parse_legacy_reply, read_answer, sha256_hex, spawn_serve, until
from .waiting import WallClock

#: Upper bound on anything a test awaits from a server or a client process.
WAIT = 30.0

TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_TYPE = "application/offset+octet-stream"
EXTENSIONS = {"creation", "creation-with-upload", "termination", "checksum", "expiration"}
ALGORITHMS = {"md5": hashlib.md5, "sha1": hashlib.sha1, "sha256": hashlib.sha256}

ADA = "/O=Lab/CN=Ada"
BOB = "/O=Lab/CN=Bob"

UPLOAD_PATH = re.compile(r"^/files/(?P<key>[0-9a-f]{40})/0$")
TUSJS = Path(__file__).parent / "tusjs" / "upload.mjs"

T = TypeVar("T")


def content(size: int, seed: int = 1) -> bytes:
    """``size`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def upload_metadata(name: str | None, data: bytes | None = None, **extra: str) -> str:
    """``Upload-Metadata`` naming the file and declaring the whole file's MD5 and SHA-256."""
    pairs = {} if name is None else {"filename": name}
    if data is not None:
        pairs |= {"md5": md5_hex(data), "sha256": sha256_hex(data)}
    pairs |= extra
    return ",".join(f"{key} {b64(value)}" for key, value in pairs.items())


def checksum_header(algorithm: str, chunk: bytes) -> str:
    return f"{algorithm} {b64(ALGORITHMS[algorithm](chunk).digest())}"


def key_of(path: str) -> str:
    match = UPLOAD_PATH.match(path)
    assert match, path
    return match["key"]


def staging_file(staging: Path, path: str) -> Path:
    return staging / f"{key_of(path)}.0.part"


def staged_size(staging: Path, path: str) -> int:
    """Bytes in the staging file of the upload at ``path`` (-1 when there is none)."""
    try:
        return staging_file(staging, path).stat().st_size
    except FileNotFoundError:
        return -1


# -- HTTP, through a TestClient or a ClientSession with a base URL ------------------------------------------------


@dataclass
class Reply:
    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    body: bytes


async def send(
    http: Any,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    data: Any = None,
    identity: str | None = None,
    expect100: bool = False,
) -> Reply:
    all_headers = dict(headers or {})
    if identity is not None:
        all_headers["X-Client-DN"] = identity
    async with http.request(method, path, headers=all_headers, data=data, expect100=expect100) as response:
        return Reply(response.status, response.reason or "", response.headers, await response.read())


async def create(
    http: Any,
    name: str,
    data: bytes,
    *,
    identity: str | None = None,
) -> str:
    """Create an upload of ``data`` as ``name`` (declaring its MD5 and SHA-256); return its path."""
    reply = await send(
        http,
        "POST",
        "/files/",
        headers={
            **TUS,
            "Upload-Length": str(len(data)),
            "Upload-Metadata": upload_metadata(name, data),
        },
        identity=identity,
    )
    assert reply.status == 201, (reply.status, reply.reason)
    location = reply.headers["Location"]
    key_of(location)
    return location


async def patch(
    http: Any,
    path: str,
    offset: int,
    chunk: Any,
    *,
    checksum: str | None = None,
    identity: str | None = None,
    headers: Mapping[str, str] | None = None,
    via_post: bool = False,
    expect100: bool = False,
) -> Reply:
    """PATCH ``chunk`` at ``offset``; ``via_post``: as a POST naming PATCH in X-HTTP-Method-Override."""
    all_headers = {**TUS, "Content-Type": OFFSET_TYPE, "Upload-Offset": str(offset), **(headers or {})}
    if checksum is not None:
        all_headers["Upload-Checksum"] = checksum
    if via_post:
        all_headers["X-HTTP-Method-Override"] = "PATCH"
    method = "POST" if via_post else "PATCH"
    return await send(http, method, path, headers=all_headers, data=chunk, identity=identity, expect100=expect100)


async def head(http: Any, path: str, *, identity: str | None = None) -> Reply:
    return await send(http, "HEAD", path, headers=TUS, identity=identity)


async def offset_of(http: Any, path: str, *, identity: str | None = None) -> int:
    reply = await head(http, path, identity=identity)
    assert reply.status == 200, (reply.status, reply.reason)
    return int(reply.headers["Upload-Offset"])


async def patch_in_chunks(http: Any, path: str, data: bytes, chunk: int, *, start: int = 0) -> Reply:
    """PATCH ``data[start:]`` piece by piece; return the last reply (asserting every earlier one)."""
    offset = start
    while True:
        piece = data[offset : offset + chunk]
        reply = await patch(http, path, offset, piece)
        if offset + len(piece) >= len(data) or reply.status != 204:
            return reply
        assert int(reply.headers["Upload-Offset"]) == offset + len(piece)
        offset += len(piece)


async def take_over(http: Any, path: str, data: bytes, piece: int, **options: Any) -> list[int]:
    """PATCH the next ``piece`` bytes at the HEAD offset, resolving a 409 with a fresh HEAD; return the statuses."""
    statuses = []
    for _attempt in range(3):
        offset = await offset_of(http, path)
        reply = await patch(http, path, offset, data[offset : offset + piece], **options)
        statuses.append(reply.status)
        if reply.status != 409:
            break
    return statuses


async def download(http: Any, name: str) -> tuple[int, bytes]:
    reply = await send(http, "GET", f"/files/{name}")
    return reply.status, reply.body


async def listed(http: Any, name: str) -> dict[str, Any]:
    reply = await send(http, "GET", "/files/", headers={"Accept": "application/json"})
    assert reply.status == 200
    entries = [entry for entry in json.loads(reply.body)["files"] if entry["name"] == name]
    assert len(entries) == 1, entries
    entry: dict[str, Any] = entries[0]
    return entry


async def assert_published(http: Any, name: str, data: bytes) -> None:
    """``name`` downloads as ``data`` and the listing shows its MD5 and SHA-256 (once the digests
    the upload did not declare are computed, after publishing)."""
    status, body = await download(http, name)
    assert status == 200
    assert len(body) == len(data)
    assert sha256_hex(body) == sha256_hex(data)
    assert body == data
    entry = await eventually(lambda: listed(http, name), lambda e: e["digests"] == "complete", "digests complete")
    assert (entry["size"], entry["md5"], entry["sha256"]) == (len(data), md5_hex(data), sha256_hex(data))


async def eventually(probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], what: str) -> T:
    """Poll ``probe()`` until ``accept`` holds for its value, failing after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what} (last value: {value!r})")
        # Nothing signals the state change to the client: the observable state is polled.
        await asyncio.sleep(0.01)


# -- raw sockets ---------------------------------------------------------------------------------------------------


@dataclass
class RawRequest:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def start_partial_patch(
    host: str,
    port: int,
    path: str,
    offset: int,
    declared: int,
    sent: bytes,
    headers: Mapping[str, str] | None = None,
) -> RawRequest:
    """Send a PATCH whose Content-Length is ``declared`` but only ``sent`` of its body; keep the socket open."""
    lines = [
        f"PATCH {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Tus-Resumable: 1.0.0",
        f"Content-Type: {OFFSET_TYPE}",
        f"Upload-Offset: {offset}",
        f"Content-Length: {declared}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + sent)
    await writer.drain()
    return RawRequest(reader, writer)


def loopback(store: Store) -> tuple[str, int]:
    assert store.client.port is not None
    return store.client.host, store.client.port


# -- a real server process --------------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    base: str
    port: int
    log: Path

    def crash(self) -> None:
        """``kill -9``: no clean-up of any kind runs."""
        self.process.send_signal(signal.SIGKILL)


@contextlib.asynccontextmanager
async def server_process(
    root: Path, state_dir: Path, log: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[ServerProcess]:
    """``python -m datastore serve --root R --state-dir S --port 0``, its URL read from its output."""
    with log.open("ab") as log_file:
        try:
            process, (match,) = await spawn_serve(
                "--root", str(root), "--state-dir", str(state_dir), env=env, stderr=log_file, timeout=WAIT
            )
        except AssertionError:
            output = await asyncio.to_thread(log.read_text)
            raise AssertionError(f"the server exited before printing its URL:\n{output}") from None
    try:
        yield ServerProcess(process, match["base"], int(match["port"]), log)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.fixture
def state_on_another_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A state directory on another filesystem than ``tmp_path``, so publishing copies the file across."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temporary directory")
    state_dir = Path(tempfile.mkdtemp(prefix="datastore-tus-", dir=shm))
    try:
        yield state_dir
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


# -- interop: tuspy ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upload_checksum", [False, True], ids=["plain", "with-upload-checksum"])
async def test_tuspy_uploads_in_chunks_and_a_new_uploader_resumes_from_the_server_offset(
    make_store: MakeStore, upload_checksum: bool
) -> None:
    store = await make_store()
    endpoint = str(store.client.make_url("/files/"))
    data = content(200_000)
    chunk = 16 * 1024
    metadata = {"filename": "tuspy.bin", "md5": md5_hex(data), "sha256": sha256_hex(data)}

    def first_chunks() -> tuple[str, int]:
        uploader = tus_client.TusClient(endpoint).uploader(
            file_stream=io.BytesIO(data), chunk_size=chunk, metadata=metadata, upload_checksum=upload_checksum
        )
        for _ in range(3):
            uploader.upload_chunk()
        assert uploader.url is not None
        return uploader.url, uploader.offset

    def resume(url: str) -> tuple[int, int]:
        uploader = tus_client.TusClient(endpoint).uploader(
            file_stream=io.BytesIO(data), url=url, chunk_size=chunk, upload_checksum=upload_checksum
        )
        started_at = uploader.offset
        uploader.upload()
        return started_at, uploader.offset

    url, sent = await asyncio.to_thread(first_chunks)
    assert sent == 3 * chunk
    assert "tuspy.bin" not in store.served_files()

    resumed_at, finished_at = await asyncio.to_thread(resume, url)

    assert (resumed_at, finished_at) == (3 * chunk, len(data))
    await assert_published(store.client, "tuspy.bin", data)


# -- interop: tus-js-client under Node ---------------------------------------------------------------------------


async def run_tusjs(endpoint: str, file: Path, *options: str) -> dict[str, Any]:
    """Run tests/tusjs/upload.mjs; return the JSON line it prints (asserting it exited 0)."""
    process = await asyncio.create_subprocess_exec(
        "node",
        str(TUSJS),
        endpoint,
        str(file),
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(WAIT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    report: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return report


async def test_tus_js_client_uploads_a_file(make_store: MakeStore, tmp_path: Path) -> None:
    store = await make_store()
    endpoint = str(store.client.make_url("/files/"))
    data = content(300_000, seed=2)
    file = tmp_path / "tusjs-whole.bin"
    file.write_bytes(data)

    report = await run_tusjs(endpoint, file, "--chunk", str(64 * 1024))

    assert report["state"] == "finished"
    assert report["url"].startswith(endpoint)
    await assert_published(store.client, "tusjs-whole.bin", data)


async def test_tus_js_client_overriding_patch_by_post_uploads_a_file(make_store: MakeStore, tmp_path: Path) -> None:
    store = await make_store()
    endpoint = str(store.client.make_url("/files/"))
    data = content(300_000, seed=41)
    file = tmp_path / "tusjs-override.bin"
    file.write_bytes(data)

    report = await run_tusjs(endpoint, file, "--chunk", str(64 * 1024), "--override-patch", "true")

    assert report["state"] == "finished"
    await assert_published(store.client, "tusjs-override.bin", data)


async def test_tus_js_client_resumes_a_stopped_upload_at_its_url(make_store: MakeStore, tmp_path: Path) -> None:
    store = await make_store()
    endpoint = str(store.client.make_url("/files/"))
    data = content(400_000, seed=3)
    file = tmp_path / "tusjs-resumed.bin"
    file.write_bytes(data)
    chunk = 32 * 1024

    stopped = await run_tusjs(endpoint, file, "--chunk", str(chunk), "--stop-after", str(3 * chunk))
    assert stopped["state"] == "stopped"
    path = URL(stopped["url"]).path
    # The chunks answered before the stop are kept.
    assert 2 * chunk <= await offset_of(store.client, path) < len(data)
    assert "tusjs-resumed.bin" not in store.served_files()

    resumed = await run_tusjs(endpoint, file, "--chunk", str(chunk), "--resume", stopped["url"])

    assert resumed == {"url": stopped["url"], "offset": len(data), "state": "finished"}
    await assert_published(store.client, "tusjs-resumed.bin", data)


# -- crashes of the server ----------------------------------------------------------------------------------------


async def test_upload_half_sent_before_kill_9_resumes_after_restart_and_is_verified(tmp_path: Path) -> None:
    root, state_dir = tmp_path / "root", tmp_path / "state"
    data = content(256 * 1024, seed=4)
    half = len(data) // 2

    async with server_process(root, state_dir, tmp_path / "first.log") as first:
        async with aiohttp.ClientSession(first.base) as http:
            path = await create(http, "crash.bin", data)
            reply = await patch(http, path, 0, data[:half])
            assert (reply.status, reply.headers["Upload-Offset"]) == (204, str(half))
        first.crash()
        await first.process.wait()

    async with (
        server_process(root, state_dir, tmp_path / "second.log") as second,
        aiohttp.ClientSession(second.base) as http,
    ):
        offset = await offset_of(http, path)
        assert offset == staged_size(state_dir / "staging", path) == half

        reply = await patch(http, path, offset, data[offset:])

        assert (reply.status, reply.headers["Upload-Offset"]) == (204, str(len(data)))
        await assert_published(http, "crash.bin", data)
    assert staged_size(state_dir / "staging", path) == -1


async def test_kill_9_during_a_patch_with_upload_checksum_cuts_the_offset_back_to_before_that_patch(
    tmp_path: Path,
) -> None:
    root, state_dir = tmp_path / "root", tmp_path / "state"
    staging = state_dir / "staging"
    chunk = 4096
    env = {"DATASTORE_CHUNK_SIZE": str(chunk)}
    data = content(64 * 1024, seed=5)
    before = 2 * chunk
    rest = data[before:]

    async with server_process(root, state_dir, tmp_path / "first.log", env) as first:
        async with aiohttp.ClientSession(first.base) as http:
            path = await create(http, "checksummed.bin", data)
            reply = await patch(http, path, 0, data[:before])
            assert (reply.status, reply.headers["Upload-Offset"]) == (204, str(before))
        hanging = await start_partial_patch(
            "127.0.0.1",
            first.port,
            path,
            before,
            len(rest),
            rest[: 4 * chunk],
            {"Upload-Checksum": checksum_header("sha256", rest)},
        )
        try:
            await until(
                lambda: staged_size(staging, path) > before,
                "unverified bytes of the PATCH reached the disk",
                timeout=WAIT,
            )
            first.crash()
            await first.process.wait()
        finally:
            await hanging.close()
        assert staged_size(staging, path) > before

    async with (
        server_process(root, state_dir, tmp_path / "second.log", env) as second,
        aiohttp.ClientSession(second.base) as http,
    ):
        assert await offset_of(http, path) == before
        assert staged_size(staging, path) == before

        reply = await patch(http, path, before, rest, checksum=checksum_header("sha256", rest))

        assert (reply.status, reply.headers["Upload-Offset"]) == (204, str(len(data)))
        await assert_published(http, "checksummed.bin", data)


async def test_kill_9_during_a_patch_without_checksum_keeps_the_bytes_that_reached_the_disk(tmp_path: Path) -> None:
    root, state_dir = tmp_path / "root", tmp_path / "state"
    staging = state_dir / "staging"
    chunk = 4096
    env = {"DATASTORE_CHUNK_SIZE": str(chunk)}
    data = content(64 * 1024, seed=26)
    before = 2 * chunk

    async with server_process(root, state_dir, tmp_path / "first.log", env) as first:
        async with aiohttp.ClientSession(first.base) as http:
            path = await create(http, "cut.bin", data)
            reply = await patch(http, path, 0, data[:before])
            assert (reply.status, reply.headers["Upload-Offset"]) == (204, str(before))
        hanging = await start_partial_patch(
            "127.0.0.1", first.port, path, before, len(data) - before, data[before : before + 4 * chunk]
        )
        try:
            await until(
                lambda: staged_size(staging, path) > before, "bytes of the PATCH reached the disk", timeout=WAIT
            )
            first.crash()
            await first.process.wait()
        finally:
            await hanging.close()

    async with (
        server_process(root, state_dir, tmp_path / "second.log", env) as second,
        aiohttp.ClientSession(second.base) as http,
    ):
        offset = await offset_of(http, path)
        assert offset == staged_size(staging, path)
        assert before < offset <= before + 4 * chunk

        reply = await patch(http, path, offset, data[offset:])

        assert (reply.status, reply.headers["Upload-Offset"]) == (204, str(len(data)))
        await assert_published(http, "cut.bin", data)


# -- dropped and hanging requests ---------------------------------------------------------------------------------


async def test_patch_cut_by_a_dropped_connection_keeps_the_staged_bytes_as_the_offset(make_store: MakeStore) -> None:
    chunk = 4096
    store = await make_store(chunk_size=chunk)
    data = content(64 * 1024, seed=6)
    path = await create(store.client, "dropped.bin", data)
    host, port = loopback(store)
    sent = 3 * chunk + 100

    dropped = await start_partial_patch(host, port, path, 0, len(data), data[:sent])
    await until(
        lambda: staged_size(store.staging, path) >= chunk, "the first bytes reached the staging file", timeout=WAIT
    )
    await dropped.close()

    offset = await eventually(lambda: offset_of(store.client, path), lambda o: o > 0, "the server kept the bytes")
    assert offset == staged_size(store.staging, path)
    assert 0 < offset <= sent


async def test_patch_from_the_offset_after_a_dropped_connection_completes_the_upload(make_store: MakeStore) -> None:
    chunk = 4096
    store = await make_store(chunk_size=chunk)
    data = content(64 * 1024, seed=7)
    path = await create(store.client, "dropped-then-done.bin", data)
    host, port = loopback(store)
    dropped = await start_partial_patch(host, port, path, 0, len(data), data[: 3 * chunk + 100])
    await until(
        lambda: staged_size(store.staging, path) >= chunk, "the first bytes reached the staging file", timeout=WAIT
    )
    await dropped.close()
    offset = await eventually(lambda: offset_of(store.client, path), lambda o: o > 0, "the server kept the bytes")

    reply = await patch(store.client, path, offset, data[offset:])

    assert (reply.status, reply.headers["Upload-Offset"]) == (204, str(len(data)))
    await assert_published(store.client, "dropped-then-done.bin", data)
    assert store.staged_files() == []


@pytest.mark.parametrize("checksummed", [False, True], ids=["plain", "with-upload-checksum"])
async def test_new_patch_at_the_head_offset_supersedes_a_hanging_old_patch(
    make_store: MakeStore, checksummed: bool
) -> None:
    chunk = 4096
    store = await make_store(chunk_size=chunk)
    data = content(64 * 1024, seed=8)
    path = await create(store.client, "superseded.bin", data)
    host, port = loopback(store)
    extra = {"Upload-Checksum": checksum_header("sha1", data)} if checksummed else {}
    hanging = await start_partial_patch(
        host, port, path, 0, len(data), data[: 2 * chunk], {**extra, "Accept": "application/json"}
    )
    try:
        await until(
            lambda: staged_size(store.staging, path) >= chunk,
            "the hanging PATCH reached the staging file",
            timeout=WAIT,
        )

        # The new request takes over; a 409 (the old one kept bytes the first HEAD did not know of) is
        # resolved as any tus client does, with a fresh HEAD.
        statuses = await take_over(store.client, path, data, len(data))

        assert statuses[-1] == 204, statuses
        assert set(statuses[:-1]) <= {409}, statuses
        # The old request, its body still due, is told that a newer one took the upload over.
        async with asyncio.timeout(WAIT):
            old = await read_answer(hanging.reader)
        assert (old.status, old.code, old.headers["Tus-Resumable"]) == (409, "upload_in_progress", "1.0.0"), old
        assert await offset_of(store.client, path) == len(data)
        await assert_published(store.client, "superseded.bin", data)
    finally:
        await hanging.close()


async def test_new_patches_supersede_old_patches_still_streaming_into_a_real_server(tmp_path: Path) -> None:
    """Each old request is superseded while the server is busy writing and hashing its large chunks."""
    root, state_dir = tmp_path / "root", tmp_path / "state"
    staging = state_dir / "staging"
    chunk = 8 << 20
    rounds, piece = 6, 256 << 10
    # An old request streams at most three chunks (it declares the whole rest, so it is still
    # waiting for bytes when it is superseded): however fast the server takes them, no round
    # gets near the end, and the upload is finished by the last PATCH alone.
    streamed = 3 * chunk
    data = content(rounds * (streamed + piece) + 2 * chunk, seed=31)

    async with (
        server_process(root, state_dir, tmp_path / "server.log", {"DATASTORE_CHUNK_SIZE": str(chunk)}) as server,
        aiohttp.ClientSession(server.base) as http,
    ):
        path = await create(http, "streaming.bin", data)
        for _round in range(rounds):
            start = await offset_of(http, path)
            old = await start_partial_patch("127.0.0.1", server.port, path, start, len(data) - start, b"")

            async def stream(old: RawRequest = old, start: int = start) -> None:
                for at in range(start, start + streamed, 1 << 20):
                    old.writer.write(data[at : at + (1 << 20)])
                    await old.writer.drain()

            streaming = asyncio.create_task(stream())
            try:
                await until(
                    lambda start=start: staged_size(staging, path) >= start + 2 * chunk,
                    "old bytes flowed",
                    timeout=WAIT,
                )

                statuses = await take_over(http, path, data, piece)

                assert statuses[-1] == 204, statuses
                assert set(statuses[:-1]) <= {409}, statuses
                offset = await offset_of(http, path)
                assert start + 2 * chunk + piece <= offset <= start + streamed + piece
                assert offset == staged_size(staging, path)
            finally:
                streaming.cancel()
                await asyncio.gather(streaming, return_exceptions=True)
                await old.close()

        offset = await offset_of(http, path)
        reply = await patch(http, path, offset, io.BytesIO(data[offset:]))
        assert (reply.status, reply.headers["Upload-Offset"]) == (204, str(len(data)))
        await assert_published(http, "streaming.bin", data)


async def test_new_patch_while_the_last_patch_is_publishing_does_not_throw_the_upload_away(
    tmp_path: Path, state_on_another_filesystem: Path
) -> None:
    """A client that gave up waiting for its last PATCH resumes (HEAD, PATCH) while the server publishes the file."""
    root, state_dir = tmp_path / "root", state_on_another_filesystem
    data = content(200 << 20, seed=32)

    async with (
        server_process(root, state_dir, tmp_path / "server.log") as server,
        aiohttp.ClientSession(server.base) as http,
    ):
        path = await create(http, "published-meanwhile.bin", data)
        last = asyncio.create_task(patch(http, path, 0, io.BytesIO(data)))
        await until(
            lambda: staged_size(state_dir / "staging", path) == len(data) or last.done(),
            "every byte was staged",
            timeout=WAIT,
        )

        offset = await offset_of(http, path)
        retry = await patch(http, path, offset, io.BytesIO(data[offset:]))
        (answered,) = await asyncio.gather(last, return_exceptions=True)

        # Published before the HEAD: the retry sends no bytes at the end, which is accepted.
        expected = 204 if offset == len(data) else 409
        assert retry.status == expected, (retry.status, retry.reason, retry.headers.get("Upload-Offset"))
        assert await offset_of(http, path) == len(data)
        await assert_published(http, "published-meanwhile.bin", data)
        assert isinstance(answered, Reply), answered
        assert (answered.status, answered.headers["Upload-Offset"]) == (204, str(len(data)))


async def test_new_patch_once_every_byte_arrived_lets_the_last_patch_publish(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry (HEAD, PATCH) comes after the last PATCH delivered every byte, before the store recorded them."""
    store = await make_store()
    data = content(64 * 1024, seed=33)
    path = await create(store.client, "complete.bin", data)
    # The last PATCH is held while it makes its bytes durable, until the retry asks it to stop.
    storing, go_on, asked = threading.Event(), threading.Event(), asyncio.Event()
    settle, stop = datastore.storage.staging._settle, RunningUpload.stop

    def held_settle(*args: Any) -> Any:
        storing.set()
        go_on.wait(WAIT)
        return settle(*args)

    async def stop_asked(self: RunningUpload, reason: Any) -> None:
        asked.set()
        await stop(self, reason)

    monkeypatch.setattr(datastore.storage.staging, "_settle", held_settle)
    monkeypatch.setattr(RunningUpload, "stop", stop_asked)

    last = asyncio.create_task(patch(store.client, path, 0, data))
    await until(storing.is_set, "the last PATCH stores its bytes", timeout=WAIT)
    offset = await offset_of(store.client, path)
    retry = asyncio.create_task(patch(store.client, path, offset, data[offset:]))
    try:
        async with asyncio.timeout(WAIT):
            await asked.wait()
    finally:
        go_on.set()
    answered, retried = await asyncio.gather(last, retry)

    assert (answered.status, answered.headers["Upload-Offset"]) == (204, str(len(data)))
    assert retried.status == 409
    assert await offset_of(store.client, path) == len(data)
    await assert_published(store.client, "complete.bin", data)


async def test_dropped_patch_carrying_upload_checksum_keeps_nothing_of_its_chunk(make_store: MakeStore) -> None:
    chunk = 4096
    store = await make_store(chunk_size=chunk)
    data = content(64 * 1024, seed=27)
    path = await create(store.client, "dropped-checksummed.bin", data)
    assert (await patch(store.client, path, 0, data[:chunk])).status == 204
    host, port = loopback(store)
    rest = data[chunk:]
    dropped = await start_partial_patch(
        host, port, path, chunk, len(rest), rest[: 3 * chunk], {"Upload-Checksum": checksum_header("sha256", rest)}
    )
    await until(
        lambda: staged_size(store.staging, path) > chunk, "bytes of the PATCH reached the staging file", timeout=WAIT
    )
    await dropped.close()

    # While the cut PATCH is still being noticed, a HEAD reports the offset before it; the staging file shows
    # when the server has rolled the unverifiable bytes back.
    await until(lambda: staged_size(store.staging, path) == chunk, "the unverifiable bytes were cut off", timeout=WAIT)
    assert await offset_of(store.client, path) == chunk
    reply = await patch(store.client, path, chunk, rest, checksum=checksum_header("sha256", rest))
    assert (reply.status, reply.headers["Upload-Offset"]) == (204, str(len(data)))
    await assert_published(store.client, "dropped-checksummed.bin", data)


async def test_termination_stops_a_hanging_patch_and_releases_the_upload(make_store: MakeStore, tmp_path: Path) -> None:
    chunk = 4096
    handler = RecordingHandler(tmp_path / "root" / "files", tmp_path / "state" / "catalogue.sqlite3")
    store = await make_store(handler, chunk_size=chunk)
    data = content(64 * 1024, seed=28)
    path = await create(store.client, "terminated-hanging.bin", data)
    host, port = loopback(store)
    hanging = await start_partial_patch(
        host, port, path, 0, len(data), data[: 2 * chunk], {"Accept": "application/json"}
    )
    try:
        await until(
            lambda: staged_size(store.staging, path) >= chunk,
            "the hanging PATCH reached the staging file",
            timeout=WAIT,
        )

        terminated = await send(store.client, "DELETE", path, headers=TUS)

        assert terminated.status == 204
        async with asyncio.timeout(WAIT):
            stopped = await read_answer(hanging.reader)
        assert (stopped.status, stopped.code) == (410, "transfer_cancelled"), stopped
        assert staged_size(store.staging, path) == -1
        assert ("cancel_upload", "terminated-hanging.bin") in handler.calls
        assert (await head(store.client, path)).status in (404, 410)
        assert "terminated-hanging.bin" not in store.served_files()
    finally:
        await hanging.close()


# -- the core protocol's answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "-1", "ten", ""], ids=["missing", "negative", "not-a-number", "empty"])
async def test_patch_without_a_valid_upload_offset_is_400(make_store: MakeStore, value: str | None) -> None:
    store = await make_store()
    data = content(1000, seed=29)
    path = await create(store.client, "offset-header.bin", data)
    headers = {**TUS, "Content-Type": OFFSET_TYPE}
    if value is not None:
        headers["Upload-Offset"] = value

    reply = await send(store.client, "PATCH", path, headers=headers, data=data)

    assert reply.status == 400
    assert await offset_of(store.client, path) == 0


async def test_upload_whose_key_expired_answers_410_and_its_staged_bytes_go(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = WallClock(monkeypatch)
    store = await make_store(key_lifetime=3600.0, sweep_interval=0.05)
    data = content(10_000, seed=30)
    path = await create(store.client, "expiring.bin", data)
    assert (await patch(store.client, path, 0, data[:1000])).status == 204
    clock.advance(3600.0 + 1)

    expired = await eventually(lambda: head(store.client, path), lambda r: r.status != 200, "the key expired")
    refused = await patch(store.client, path, 1000, data[1000:])

    assert (expired.status, refused.status) == (410, 410)
    await until(lambda: staged_size(store.staging, path) == -1, "the sweeper removed the staged bytes", timeout=WAIT)
    assert "expiring.bin" not in store.served_files()


async def test_patch_at_another_offset_is_409_and_changes_nothing(make_store: MakeStore) -> None:
    store = await make_store()
    data = content(10_000, seed=9)
    path = await create(store.client, "offset.bin", data)
    assert (await patch(store.client, path, 0, data[:1000])).status == 204

    reply = await patch(store.client, path, 500, data[500:2000])

    assert reply.status == 409
    assert await offset_of(store.client, path) == 1000
    assert staged_size(store.staging, path) == 1000


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256"])
async def test_chunk_failing_its_upload_checksum_is_460_and_discarded(make_store: MakeStore, algorithm: str) -> None:
    store = await make_store()
    data = content(10_000, seed=10)
    path = await create(store.client, f"checksum-{algorithm}.bin", data)
    assert (await patch(store.client, path, 0, data[:1000])).status == 204
    chunk = data[1000:4000]

    reply = await patch(store.client, path, 1000, chunk, checksum=checksum_header(algorithm, chunk[::-1]))

    assert reply.status == 460
    assert await offset_of(store.client, path) == 1000
    assert staged_size(store.staging, path) == 1000


async def test_a_first_checksummed_patch_refused_before_any_byte_is_staged_is_413_and_the_upload_goes_on(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    data = content(1000, seed=12)
    path = await create(store.client, "refused-first.bin", data)

    async def too_long() -> AsyncIterator[bytes]:  # chunked: the length is known only as it arrives
        yield data + b"more than declared"

    reply = await patch(store.client, path, 0, too_long(), checksum=checksum_header("sha256", data))

    assert reply.status == 413
    assert await offset_of(store.client, path) == 0
    assert (await patch(store.client, path, 0, data, checksum=checksum_header("sha256", data))).status == 204
    await assert_published(store.client, "refused-first.bin", data)


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256"])
async def test_chunk_resent_with_its_right_upload_checksum_after_a_460_is_appended(
    make_store: MakeStore, algorithm: str
) -> None:
    store = await make_store()
    data = content(10_000, seed=11)
    path = await create(store.client, f"checksum-retry-{algorithm}.bin", data)
    assert (await patch(store.client, path, 0, data[:1000])).status == 204
    chunk = data[1000:4000]
    assert (await patch(store.client, path, 1000, chunk, checksum=checksum_header(algorithm, b"other"))).status == 460

    reply = await patch(store.client, path, 1000, chunk, checksum=checksum_header(algorithm, chunk))

    assert (reply.status, reply.headers["Upload-Offset"]) == (204, "4000")
    assert staged_size(store.staging, path) == 4000
    final = await patch(store.client, path, 4000, data[4000:], checksum=checksum_header(algorithm, data[4000:]))
    assert final.status == 204
    await assert_published(store.client, f"checksum-retry-{algorithm}.bin", data)


@pytest.mark.parametrize(
    "value", ["crc32 AAAAAA==", "sha512 " + b64(hashlib.sha512(b"x").digest())], ids=["crc32", "sha512"]
)
async def test_upload_checksum_with_an_unknown_algorithm_is_400(make_store: MakeStore, value: str) -> None:
    store = await make_store()
    data = content(5000, seed=12)
    path = await create(store.client, "unknown-algorithm.bin", data)

    reply = await patch(store.client, path, 0, data[:1000], checksum=value)

    assert reply.status == 400
    assert await offset_of(store.client, path) == 0


async def test_patch_after_termination_is_refused_and_the_staged_bytes_are_gone(
    make_store: MakeStore, tmp_path: Path
) -> None:
    handler = RecordingHandler(tmp_path / "root" / "files", tmp_path / "state" / "catalogue.sqlite3")
    store = await make_store(handler)
    data = content(10_000, seed=13)
    path = await create(store.client, "terminated.bin", data)
    assert (await patch(store.client, path, 0, data[:4000])).status == 204
    assert staged_size(store.staging, path) == 4000

    terminated = await send(store.client, "DELETE", path, headers=TUS)
    assert terminated.status == 204
    reply = await patch(store.client, path, 4000, data[4000:])

    assert reply.status in (404, 410)
    assert staged_size(store.staging, path) == -1
    assert ("cancel_upload", "terminated.bin") in handler.calls
    assert "terminated.bin" not in store.served_files()


async def test_head_after_termination_is_404_or_410(make_store: MakeStore) -> None:
    store = await make_store()
    data = content(10_000, seed=14)
    path = await create(store.client, "terminated-head.bin", data)
    assert (await send(store.client, "DELETE", path, headers=TUS)).status == 204

    reply = await head(store.client, path)

    assert reply.status in (404, 410)


async def test_patch_with_content_length_past_upload_length_is_refused(make_store: MakeStore) -> None:
    store = await make_store()
    data = content(10_000, seed=15)
    path = await create(store.client, "too-long.bin", data)
    assert (await patch(store.client, path, 0, data[:4000])).status == 204

    reply = await patch(store.client, path, 4000, data[4000:] + b"one byte too many")

    assert reply.status in (413, 400)
    assert await offset_of(store.client, path) == 4000
    assert staged_size(store.staging, path) == 4000
    assert "too-long.bin" not in store.served_files()


async def test_chunked_patch_past_upload_length_is_refused(make_store: MakeStore) -> None:
    store = await make_store()
    data = content(10_000, seed=16)
    path = await create(store.client, "too-long-chunked.bin", data)
    assert (await patch(store.client, path, 0, data[:4000])).status == 204

    async def body() -> AsyncIterator[bytes]:
        yield data[4000:8000]
        yield data[8000:] + b"one byte too many"

    reply = await patch(store.client, path, 4000, body())

    assert reply.status in (413, 400)
    offset = await offset_of(store.client, path)
    assert offset == staged_size(store.staging, path)
    assert 4000 <= offset < len(data)
    assert "too-long-chunked.bin" not in store.served_files()


@pytest.mark.parametrize("version", [None, "0.2.2"], ids=["missing", "unsupported"])
@pytest.mark.parametrize("method", ["PATCH", "DELETE", "POST"], ids=["patch", "termination", "creation"])
async def test_request_without_tus_resumable_1_0_0_is_412_with_tus_version(
    make_store: MakeStore, method: str, version: str | None
) -> None:
    store = await make_store()
    data = content(1000, seed=17)
    path = await create(store.client, "no-version.bin", data)
    requests = {
        "PATCH": (path, {"Content-Type": OFFSET_TYPE, "Upload-Offset": "0"}, data),
        "DELETE": (path, {}, None),
        "POST": ("/files/", {"Upload-Length": "1000", "Upload-Metadata": upload_metadata("other.bin")}, None),
    }
    target, headers, body = requests[method]
    if version is not None:
        headers["Tus-Resumable"] = version

    reply = await send(store.client, method, target, headers=headers, data=body)

    assert reply.status == 412
    assert "1.0.0" in [version.strip() for version in reply.headers["Tus-Version"].split(",")]
    assert await offset_of(store.client, path) == 0


@pytest.mark.parametrize("content_type", ["application/octet-stream", "text/plain"])
async def test_patch_with_another_content_type_is_415(make_store: MakeStore, content_type: str) -> None:
    store = await make_store()
    data = content(1000, seed=18)
    path = await create(store.client, "media-type.bin", data)

    reply = await patch(store.client, path, 0, data, headers={"Content-Type": content_type})

    assert reply.status == 415
    assert await offset_of(store.client, path) == 0


@pytest.mark.parametrize("where", ["creation-url", "upload-url"])
async def test_options_lists_version_extensions_max_size_and_checksum_algorithms(
    make_store: MakeStore, where: str
) -> None:
    store = await make_store(max_file_size=5 << 20)
    target = "/files/"
    if where == "upload-url":
        target = await create(store.client, "options.bin", b"options")

    reply = await send(store.client, "OPTIONS", target)

    assert reply.status in (200, 204)
    assert "1.0.0" in [v.strip() for v in reply.headers["Tus-Version"].split(",")]
    assert {e.strip() for e in reply.headers["Tus-Extension"].split(",")} >= EXTENSIONS
    assert reply.headers["Tus-Max-Size"] == str(5 << 20)
    assert {a.strip() for a in reply.headers["Tus-Checksum-Algorithm"].split(",")} == {"md5", "sha1", "sha256"}


async def test_head_reports_offset_length_no_store_and_upload_expires(make_store: MakeStore) -> None:
    store = await make_store(key_lifetime=3600.0)
    data = content(10_000, seed=19)
    path = await create(store.client, "head.bin", data)
    assert (await patch(store.client, path, 0, data[:2500])).status == 204

    reply = await head(store.client, path)

    assert reply.status == 200
    assert reply.headers["Upload-Offset"] == "2500"
    assert reply.headers["Upload-Length"] == str(len(data))
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["Tus-Resumable"] == "1.0.0"
    status = json.loads((await send(store.client, "GET", f"/_api/v1/transfers/{key_of(path)}")).body)
    key_expires = datetime.fromisoformat(status["expires_at"].replace("Z", "+00:00")).timestamp()
    upload_expires = parsedate_to_datetime(reply.headers["Upload-Expires"]).timestamp()
    assert abs(upload_expires - key_expires) <= 1.0
    assert abs(upload_expires - (time.time() + 3600.0)) <= 60.0


async def test_patch_reply_carries_the_new_offset_and_upload_expires(make_store: MakeStore) -> None:
    store = await make_store(key_lifetime=3600.0)
    data = content(10_000, seed=25)
    path = await create(store.client, "patch-reply.bin", data)

    reply = await patch(store.client, path, 0, data[:3000])

    assert reply.status == 204
    assert reply.headers["Upload-Offset"] == "3000"
    assert reply.headers["Tus-Resumable"] == "1.0.0"
    expires = parsedate_to_datetime(reply.headers["Upload-Expires"]).timestamp()
    assert abs(expires - (time.time() + 3600.0)) <= 60.0


# -- creation ------------------------------------------------------------------------------------------------------


async def test_creation_is_201_with_a_relative_location_and_upload_expires(make_store: MakeStore) -> None:
    store = await make_store(key_lifetime=3600.0)

    reply = await send(
        store.client,
        "POST",
        "/files/",
        headers={**TUS, "Upload-Length": "1234", "Upload-Metadata": upload_metadata("created.bin")},
    )

    assert reply.status == 201
    assert UPLOAD_PATH.match(reply.headers["Location"]), reply.headers["Location"]
    assert reply.headers["Tus-Resumable"] == "1.0.0"
    expires = parsedate_to_datetime(reply.headers["Upload-Expires"]).timestamp()
    assert abs(expires - (time.time() + 3600.0)) <= 60.0
    created = await head(store.client, reply.headers["Location"])
    assert (created.status, created.headers["Upload-Offset"], created.headers["Upload-Length"]) == (200, "0", "1234")


@pytest.mark.parametrize(
    "metadata",
    [None, "", upload_metadata(None, b"data"), "filename "],
    ids=["no-metadata-header", "empty-metadata", "digests-but-no-filename", "empty-filename"],
)
async def test_creation_without_a_filename_is_400(make_store: MakeStore, metadata: str | None) -> None:
    store = await make_store()
    headers = {**TUS, "Upload-Length": "4"}
    if metadata is not None:
        headers["Upload-Metadata"] = metadata

    reply = await send(store.client, "POST", "/files/", headers=headers)

    assert reply.status == 400
    assert "Location" not in reply.headers


async def test_creation_with_upload_defer_length_is_400(make_store: MakeStore) -> None:
    store = await make_store()

    reply = await send(
        store.client,
        "POST",
        "/files/",
        headers={**TUS, "Upload-Defer-Length": "1", "Upload-Metadata": upload_metadata("deferred.bin")},
    )

    assert reply.status == 400
    assert "Location" not in reply.headers


@pytest.mark.parametrize("length", [None, "-1", "ten", ""], ids=["missing", "negative", "not-a-number", "empty"])
async def test_creation_without_a_valid_upload_length_is_400(make_store: MakeStore, length: str | None) -> None:
    store = await make_store()
    headers = {**TUS, "Upload-Metadata": upload_metadata("length.bin")}
    if length is not None:
        headers["Upload-Length"] = length

    reply = await send(store.client, "POST", "/files/", headers=headers)

    assert reply.status == 400
    assert "Location" not in reply.headers


async def test_creation_longer_than_tus_max_size_is_413(make_store: MakeStore) -> None:
    store = await make_store(max_file_size=1 << 20)

    reply = await send(
        store.client,
        "POST",
        "/files/",
        headers={**TUS, "Upload-Length": str((1 << 20) + 1), "Upload-Metadata": upload_metadata("huge.bin")},
    )

    assert reply.status == 413
    assert "Location" not in reply.headers


@pytest.mark.parametrize("taken_by", ["published", "pending"])
async def test_creation_of_a_name_that_already_exists_is_403(make_store: MakeStore, taken_by: str) -> None:
    store = await make_store()
    first = b"the first version\n"
    path = await create(store.client, "taken.txt", first)
    if taken_by == "published":
        assert (await patch(store.client, path, 0, first)).status == 204

    reply = await send(
        store.client,
        "POST",
        "/files/",
        headers={**TUS, "Upload-Length": "6", "Upload-Metadata": upload_metadata("taken.txt", b"second")},
    )

    assert reply.status == 403
    assert "Location" not in reply.headers
    if taken_by == "published":
        assert await download(store.client, "taken.txt") == (200, first)
    else:
        assert await offset_of(store.client, path) == 0


async def test_creation_with_upload_answers_the_offset_reached(make_store: MakeStore) -> None:
    store = await make_store()
    data = content(10_000, seed=20)

    reply = await send(
        store.client,
        "POST",
        "/files/",
        headers={
            **TUS,
            "Upload-Length": str(len(data)),
            "Upload-Metadata": upload_metadata("with-upload.bin", data),
            "Content-Type": OFFSET_TYPE,
        },
        data=data[:3000],
    )

    assert reply.status == 201
    assert reply.headers["Upload-Offset"] == "3000"
    path = reply.headers["Location"]
    assert await offset_of(store.client, path) == 3000
    assert staged_size(store.staging, path) == 3000


async def test_creation_with_upload_and_a_malformed_upload_checksum_is_400_and_creates_nothing(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    data = b"a file whose checksum header is garbled\n"
    headers = {**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": upload_metadata("garbled.txt", data)}

    reply = await send(
        store.client,
        "POST",
        "/files/",
        headers={**headers, "Content-Type": OFFSET_TYPE, "Upload-Checksum": "md5 !!!"},
        data=data,
    )

    assert reply.status == 400
    assert "Location" not in reply.headers
    # Nothing holds the name: the same creation with a good checksum goes through.
    again = await send(
        store.client,
        "POST",
        "/files/",
        headers={**headers, "Content-Type": OFFSET_TYPE, "Upload-Checksum": checksum_header("md5", data)},
        data=data,
    )
    assert (again.status, again.headers["Upload-Offset"]) == (201, str(len(data)))
    await assert_published(store.client, "garbled.txt", data)


async def test_creation_with_upload_of_a_whole_small_file_publishes_it(make_store: MakeStore) -> None:
    store = await make_store()
    data = b"a whole small file in the creation request\n"

    reply = await send(
        store.client,
        "POST",
        "/files/",
        headers={
            **TUS,
            "Upload-Length": str(len(data)),
            "Upload-Metadata": upload_metadata("one-request.txt", data),
            "Content-Type": OFFSET_TYPE,
        },
        data=data,
    )

    assert (reply.status, reply.headers["Upload-Offset"]) == (201, str(len(data)))
    await assert_published(store.client, "one-request.txt", data)
    assert store.staged_files() == []


# -- the whole file is verified before it is published -----------------------------------------------------------


async def test_upload_not_matching_the_declared_md5_is_not_published(make_store: MakeStore, tmp_path: Path) -> None:
    handler = RecordingHandler(tmp_path / "root" / "files", tmp_path / "state" / "catalogue.sqlite3")
    store = await make_store(handler)
    data = content(10_000, seed=21)
    reply = await send(
        store.client,
        "POST",
        "/files/",
        headers={
            **TUS,
            "Upload-Length": str(len(data)),
            "Upload-Metadata": upload_metadata("forged.bin", md5=md5_hex(b"something else")),
        },
    )
    assert reply.status == 201
    path = reply.headers["Location"]

    last = await patch_in_chunks(store.client, path, data, 4000)

    assert last.status == 460
    assert "forged.bin" not in store.served_files()
    assert (await download(store.client, "forged.bin"))[0] == 404
    assert ("cancel_upload", "forged.bin") in handler.calls
    assert ("complete_upload", "forged.bin") not in handler.calls
    assert store.staged_files() == []


async def register_legacy(store: Store, files: list[tuple[str, bytes]], form: str) -> str:
    """Register ``files`` by a legacy manifest (AccessGrid INI, or JSON); return the transfer key."""
    if form == "ini":
        reply = await send(
            store.client,
            "POST",
            "/files/manifest",
            headers={"Content-Type": "text/plain"},
            data=ini_manifest(files),
        )
        assert reply.status == 200
        values = parse_legacy_reply(reply.body.decode())
        assert values["return_code"] == ["0"], values
        return values["transfer_key"][0]
    return await store.register(files)


@pytest.mark.parametrize("form", ["ini", "json"])
async def test_manifest_transfer_takes_file_0_by_patch_and_file_1_by_put(make_store: MakeStore, form: str) -> None:
    store = await make_store()
    first, second = content(20_000, seed=22), content(5000, seed=23)
    key = await register_legacy(store, [("patched.bin", first), ("put.bin", second)], form)

    last = await patch_in_chunks(store.client, f"/files/{key}/0", first, 6000)
    put = await store.put(key, 1, second)

    assert (last.status, last.headers["Upload-Offset"]) == (204, str(len(first)))
    assert put == (200, "File transfer OK")
    await assert_published(store.client, "patched.bin", first)
    await assert_published(store.client, "put.bin", second)
    status = json.loads((await send(store.client, "GET", f"/_api/v1/transfers/{key}")).body)
    assert status["state"] == "FINISHED"


# -- identity ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PATCH", "HEAD", "DELETE"])
async def test_upload_url_used_by_another_identity_is_403(make_store: MakeStore, method: str) -> None:
    store = await make_store()
    data = content(5000, seed=24)
    path = await create(store.client, "ada.bin", data, identity=ADA)

    if method == "PATCH":
        reply = await patch(store.client, path, 0, data[:1000], identity=BOB)
    elif method == "HEAD":
        reply = await head(store.client, path, identity=BOB)
    else:
        reply = await send(store.client, "DELETE", path, headers=TUS, identity=BOB)

    assert reply.status == 403
    assert await offset_of(store.client, path, identity=ADA) == 0
    assert staged_size(store.staging, path) == -1


# -- X-HTTP-Method-Override: a tus request is handled as the method it names --------------------------------------


def override(method: str) -> dict[str, str]:
    return {**TUS, "X-HTTP-Method-Override": method}


async def test_post_overriding_to_patch_appends_and_finishes_the_upload(make_store: MakeStore) -> None:
    store = await make_store()
    data = content(10_000, seed=42)
    path = await create(store.client, "override-patch.bin", data)

    first = await patch(store.client, path, 0, data[:4000], via_post=True)
    last = await patch(store.client, path, 4000, data[4000:], via_post=True)

    assert (first.status, first.headers["Upload-Offset"]) == (204, "4000")
    assert (last.status, last.headers["Upload-Offset"]) == (204, str(len(data)))
    await assert_published(store.client, "override-patch.bin", data)
    assert store.staged_files() == []


async def test_post_overriding_to_head_answers_the_offset_and_changes_nothing(make_store: MakeStore) -> None:
    store = await make_store()
    data = content(10_000, seed=43)
    path = await create(store.client, "override-head.bin", data)
    assert (await patch(store.client, path, 0, data[:2500])).status == 204

    reply = await send(store.client, "POST", path, headers=override("HEAD"))

    assert reply.status == 200
    assert (reply.headers["Upload-Offset"], reply.headers["Upload-Length"]) == ("2500", str(len(data)))
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.body == b""
    assert staged_size(store.staging, path) == 2500


async def test_post_overriding_to_delete_terminates_the_upload(make_store: MakeStore, tmp_path: Path) -> None:
    handler = RecordingHandler(tmp_path / "root" / "files", tmp_path / "state" / "catalogue.sqlite3")
    store = await make_store(handler)
    data = content(10_000, seed=44)
    path = await create(store.client, "override-delete.bin", data)
    assert (await patch(store.client, path, 0, data[:4000])).status == 204

    reply = await send(store.client, "POST", path, headers=override("DELETE"))

    assert reply.status == 204
    assert (await head(store.client, path)).status in (404, 410)
    assert staged_size(store.staging, path) == -1
    assert ("cancel_upload", "override-delete.bin") in handler.calls


async def test_post_overriding_to_patch_with_expect_100_continue_supersedes_a_hanging_patch(
    make_store: MakeStore,
) -> None:
    """The answer to ``Expect`` is the PATCH route's too: a hanging PATCH holding the upload does not refuse it."""
    chunk = 4096
    store = await make_store(chunk_size=chunk)
    data = content(64 * 1024, seed=45)
    path = await create(store.client, "override-expect.bin", data)
    host, port = loopback(store)
    hanging = await start_partial_patch(host, port, path, 0, len(data), data[: 2 * chunk])
    try:
        await until(
            lambda: staged_size(store.staging, path) >= chunk,
            "the hanging PATCH reached the staging file",
            timeout=WAIT,
        )

        statuses = await take_over(store.client, path, data, len(data), via_post=True, expect100=True)

        assert statuses[-1] == 204, statuses
        assert set(statuses[:-1]) <= {409}, statuses
        await assert_published(store.client, "override-expect.bin", data)
    finally:
        await hanging.close()


async def test_post_to_the_creation_url_overriding_to_options_answers_the_capabilities(make_store: MakeStore) -> None:
    store = await make_store(max_file_size=5 << 20)

    reply = await send(
        store.client,
        "POST",
        "/files/",
        headers={**override("OPTIONS"), "Upload-Length": "10", "Upload-Metadata": upload_metadata("no.bin")},
    )

    assert reply.status in (200, 204)
    assert reply.headers["Tus-Max-Size"] == str(5 << 20)
    assert {e.strip() for e in reply.headers["Tus-Extension"].split(",")} >= EXTENSIONS
    assert "Location" not in reply.headers


async def test_post_to_the_creation_url_overriding_to_a_method_it_lacks_is_405(make_store: MakeStore) -> None:
    store = await make_store()

    reply = await send(
        store.client,
        "POST",
        "/files/",
        headers={**override("PATCH"), "Upload-Length": "10", "Upload-Metadata": upload_metadata("no.bin")},
    )

    assert reply.status == 405
    assert "Location" not in reply.headers


@pytest.mark.parametrize("method", ["GET", "PUT", "FROB", ""], ids=["get", "put", "unknown", "empty"])
async def test_method_override_naming_a_method_tus_does_not_use_is_400_and_changes_nothing(
    make_store: MakeStore, method: str
) -> None:
    store = await make_store()
    data = content(1000, seed=46)
    path = await create(store.client, "override-unknown.bin", data)

    reply = await send(
        store.client,
        "POST",
        path,
        headers={**override(method), "Content-Type": OFFSET_TYPE, "Upload-Offset": "0"},
        data=data,
    )

    assert reply.status == 400
    assert "X-HTTP-Method-Override" in reply.reason
    assert await offset_of(store.client, path) == 0
    assert staged_size(store.staging, path) == -1
    assert "override-unknown.bin" not in store.served_files()


async def test_legacy_post_with_a_method_override_but_no_tus_resumable_is_a_whole_body_upload(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    data = content(5000, seed=47)
    key = await store.register([("legacy-override.bin", data)])

    reply = await send(store.client, "POST", f"/files/{key}/0", headers={"X-HTTP-Method-Override": "DELETE"}, data=data)

    assert (reply.status, reply.reason) == (200, "File transfer OK")
    await assert_published(store.client, "legacy-override.bin", data)


# -- Upload-Metadata: HEAD answers it as sent at creation -----------------------------------------------------------

#: Several pairs, not in the order the store would write them, one key without a value, one with an empty value.
SENT_METADATA = (
    f"is_confidential,filename {b64('report 2024.pdf')},empty ,note {b64('a note, with a comma')},"
    f"sha256 {b64(sha256_hex(b'0123456789'))}"
)


async def create_with_metadata(http: Any, metadata: str, length: int = 10) -> Reply:
    return await send(
        http, "POST", "/files/", headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": metadata}
    )


async def test_head_answers_upload_metadata_byte_for_byte_as_sent_at_creation(make_store: MakeStore) -> None:
    store = await make_store()
    created = await create_with_metadata(store.client, SENT_METADATA)
    assert created.status == 201

    reply = await head(store.client, created.headers["Location"])

    assert reply.status == 200
    assert reply.headers["Upload-Metadata"] == SENT_METADATA


async def test_head_answers_upload_metadata_of_a_completed_upload(make_store: MakeStore) -> None:
    store = await make_store()
    data = b"0123456789"
    created = await create_with_metadata(store.client, SENT_METADATA)
    path = created.headers["Location"]
    assert (await patch(store.client, path, 0, data)).status == 204

    reply = await head(store.client, path)

    assert (reply.status, reply.headers["Upload-Offset"]) == (200, "10")
    assert reply.headers["Upload-Metadata"] == SENT_METADATA
    await assert_published(store.client, "report 2024.pdf", data)


async def test_upload_metadata_is_kept_across_a_restart(make_store: MakeStore) -> None:
    store = await make_store()
    path = (await create_with_metadata(store.client, SENT_METADATA)).headers["Location"]
    await store.client.close()
    restarted = await make_store()

    reply = await head(restarted.client, path)

    assert (reply.status, reply.headers["Upload-Metadata"]) == (200, SENT_METADATA)


async def test_head_of_a_file_registered_by_a_manifest_answers_its_filename_as_upload_metadata(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    key = await store.register([("manifest file.txt", b"from a manifest\n")])

    reply = await head(store.client, f"/files/{key}/0")

    assert (reply.status, reply.headers["Upload-Metadata"]) == (200, f"filename {b64('manifest file.txt')}")


@pytest.mark.parametrize(("size", "status"), [(4096, 201), (4097, 400)], ids=["at-the-limit", "one-byte-over"])
async def test_creation_refuses_upload_metadata_longer_than_4_kib_with_400(
    make_store: MakeStore, size: int, status: int
) -> None:
    store = await make_store()
    named, value = f"filename {b64('long-metadata.bin')}", "A" * 4000
    key = "k" * (size - len(f"{named}, {value}"))
    metadata = f"{named},{key} {value}"
    assert len(metadata.encode()) == size

    reply = await create_with_metadata(store.client, metadata)

    assert reply.status == status
    if status == 201:
        assert (await head(store.client, reply.headers["Location"])).headers["Upload-Metadata"] == metadata
    else:
        assert "Location" not in reply.headers
        assert "4096" in reply.reason


async def test_state_file_from_before_upload_metadata_gains_the_column_and_keeps_its_transfers(
    make_store: MakeStore,
) -> None:
    """A state file written before Upload-Metadata was kept (no such column) is migrated when the store opens it."""
    store = await make_store()
    key = await store.register([("older.txt", b"registered before\n")])
    await store.client.close()
    database = sqlite3.connect(store.state_dir / "transfers.sqlite3")
    try:
        database.execute("ALTER TABLE transfer_files DROP COLUMN upload_metadata")
        database.commit()
    finally:
        database.close()
    restarted = await make_store()

    older = await head(restarted.client, f"/files/{key}/0")
    created = await create_with_metadata(restarted.client, SENT_METADATA)
    newer = await head(restarted.client, created.headers["Location"])

    assert (older.status, older.headers["Upload-Metadata"]) == (200, f"filename {b64('older.txt')}")
    assert (created.status, newer.headers["Upload-Metadata"]) == (201, SENT_METADATA)


# -- a completed upload: a PATCH of no bytes at its end is accepted, any other offset is 409 -----------------------


async def empty_body() -> AsyncIterator[bytes]:
    """A chunked body with no bytes in it."""
    return
    yield b""


@pytest.mark.parametrize("framing", ["content-length-0", "chunked"])
async def test_zero_length_patch_at_the_end_of_a_completed_upload_is_204_with_its_length(
    make_store: MakeStore, tmp_path: Path, framing: str
) -> None:
    handler = RecordingHandler(tmp_path / "root" / "files", tmp_path / "state" / "catalogue.sqlite3")
    store = await make_store(handler)
    data = content(10_000, seed=48)
    path = await create(store.client, "complete.bin", data)
    assert (await patch(store.client, path, 0, data)).status == 204

    reply = await patch(store.client, path, len(data), b"" if framing == "content-length-0" else empty_body())

    assert (reply.status, reply.headers["Upload-Offset"]) == (204, str(len(data)))
    assert reply.headers["Tus-Resumable"] == "1.0.0"
    await assert_published(store.client, "complete.bin", data)
    assert handler.calls.count(("complete_upload", "complete.bin")) == 1


@pytest.mark.parametrize(
    ("offset", "chunk"),
    [(0, b""), (9_999, b"x"), (10_001, b""), (10_000, b"one byte too many")],
    ids=["start-no-bytes", "last-byte-again", "past-the-end", "bytes-past-the-end"],
)
async def test_patch_to_a_completed_upload_other_than_no_bytes_at_its_end_is_409(
    make_store: MakeStore, offset: int, chunk: bytes
) -> None:
    store = await make_store()
    data = content(10_000, seed=49)
    path = await create(store.client, "complete-409.bin", data)
    assert (await patch(store.client, path, 0, data)).status == 204

    reply = await patch(store.client, path, offset, chunk)

    assert reply.status == 409
    assert await offset_of(store.client, path) == len(data)
    await assert_published(store.client, "complete-409.bin", data)
