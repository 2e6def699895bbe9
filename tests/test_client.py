"""The Python client (DataStoreClient, SyncDataStoreClient) against the real server on loopback.

Every test talks to a real store over real sockets on 127.0.0.1: make_store's
server; a store run as ``datastore serve`` runs it (:class:`LiveStore`) for
the tests that cut connections mid-request; or an HTTPSTransferServer with
certificates minted in tmp_path.

Failures are injected by :class:`FaultProxy`, a TCP proxy in front of the
store that reads the HTTP it forwards: it cuts a PATCH after some bytes of
its body, or a download after some bytes of the answer (both connections
aborted, as a network failure would leave them), or holds every PATCH from
some offset on; and it records every request and the status it got, so a
test can show which bytes the client sent (and sent again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from datastore.client.client import (
    Cancelled,
    ClientError,
    DataStoreClient,
    DigestMismatch,
    RequestFailed,
    RetriesExhausted,
    SyncDataStoreClient,
    UploadRefused,
    client_ssl_context,
    parse_repr_digest,
)
from datastore.config import Settings
from datastore.handlers.directory import DirectoryHandler
from datastore.http.server import HTTPSTransferServer, HTTPTransferServer
from datastore.security.certs import CertificateDirectory
from datastore.security.tls import server_context

from .conftest import MakeStore
from .harness import Store, make_settings, sha256_hex

CHUNK = 256 << 10  # bytes per PATCH in these tests
MIB = 1 << 20
ADA = "/O=Lab/CN=Ada"
BOB = "/O=Lab/CN=Bob"


# -- helpers -----------------------------------------------------------------------------------


def payload(size: int, seed: int) -> bytes:
    """``size`` reproducible pseudo-random bytes (no two seeds alike, nothing compressible)."""
    return random.Random(seed).randbytes(size)


def write_files(folder: Path, files: dict[str, bytes]) -> list[Path]:
    """Write ``files`` into ``folder`` (blocking: call it in a thread); return their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def base_url(store: Store) -> str:
    return str(store.client.make_url("/"))


async def published(store: Store, name: str) -> bytes:
    """The bytes the store serves under ``name`` (asserting it does)."""
    response = await store.client.get(f"/{store.prefix}/{name}")
    assert response.status == 200, name
    return await response.read()


async def transfer_status(store: Store, key: str, identity: str | None = None) -> dict[str, Any]:
    headers = {"X-Client-DN": identity} if identity is not None else {}
    response = await store.client.get(f"/_api/v1/transfers/{key}", headers=headers)
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """An HTTP/1.1 header block -> (its first line, its headers with lower-case names)."""
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return first, headers


@dataclass(eq=False)
class Seen:
    """One request the proxy read from a client, and the status the store answered (if it did)."""

    method: str
    target: str
    headers: dict[str, str]
    body: int = 0  # body bytes forwarded to the store
    cut: bool = False
    status: int | None = None

    @property
    def offset(self) -> int:
        return int(self.headers["upload-offset"])


@dataclass
class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream`` that understands just enough HTTP/1.1.

    It forwards every request it reads (headers, then exactly Content-Length
    body bytes) and every answer (headers, then its body), and notes each
    request and the status it got. ``cuts={N: BYTES}`` cuts the N-th PATCH
    (counted from 1) after BYTES bytes of its body: both connections are
    aborted, as a failing network would leave them. ``hold_from=OFFSET``
    holds every PATCH whose Upload-Offset is at least OFFSET before a byte
    of it reaches the store, until :meth:`release` drops the held connections.
    """

    upstream: tuple[str, int]
    cuts: dict[int, int] = field(default_factory=dict)
    cut_download: int | None = None
    hold_from: int | None = None
    requests: list[Seen] = field(default_factory=list)
    answered: int = 0  # bytes forwarded from the store to clients
    held: asyncio.Event = field(default_factory=asyncio.Event)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _connections: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _patches: int = 0

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self._released.set()
        for writer in self._writers:
            writer.transport.abort()
        async with asyncio.timeout(10):
            await asyncio.gather(*self._connections)
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def release(self) -> None:
        """Let held PATCHes go: their connections are dropped without a byte of them forwarded."""
        self._released.set()

    def patches(self) -> list[Seen]:
        return [seen for seen in self.requests if seen.method == "PATCH"]

    def methods(self) -> list[str]:
        return [seen.method for seen in self.requests]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.upstream)
            self._writers.add(upstream)
            # drain() then means "handed to the kernel": an abort drops nothing already counted.
            writer.transport.set_write_buffer_limits(0)
            upstream.transport.set_write_buffer_limits(0)
            waiting: deque[Seen] = deque()
            pumps = [
                asyncio.create_task(self._forward_requests(reader, upstream, waiting)),
                asyncio.create_task(self._forward_answers(upstream_reader, writer, waiting)),
            ]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for end in (writer, upstream):
                if end is not None:
                    end.transport.abort()
                    self._writers.discard(end)
            self._connections.discard(task)

    async def _forward_requests(
        self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter, waiting: deque[Seen]
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, headers = parse_head(head)
                method, target, _version = request_line.split(" ", 2)
                assert "transfer-encoding" not in headers, "the proxy forwards Content-Length bodies only"
                seen = Seen(method, target, headers)
                self.requests.append(seen)
                limit = length = int(headers.get("content-length", "0"))
                if method == "PATCH":
                    self._patches += 1
                    if self.hold_from is not None and seen.offset >= self.hold_from:
                        self.held.set()
                        await self._released.wait()
                        return
                    limit = min(length, self.cuts.get(self._patches, length))
                waiting.append(seen)
                upstream.write(head)
                await upstream.drain()
                while seen.body < limit:
                    data = await reader.read(min(limit - seen.body, 1 << 16))
                    if not data:
                        return
                    upstream.write(data)
                    await upstream.drain()
                    seen.body += len(data)
                if limit < length:
                    seen.cut = True
                    return

    async def _forward_answers(
        self, upstream: asyncio.StreamReader, writer: asyncio.StreamWriter, waiting: deque[Seen]
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await upstream.readuntil(b"\r\n\r\n")
                await self._answer(writer, head)
                status_line, headers = parse_head(head)
                status = int(status_line.split(" ", 2)[1])
                if status < 200:
                    continue
                seen = waiting.popleft()
                seen.status = status
                assert "transfer-encoding" not in headers, "the proxy forwards Content-Length bodies only"
                if seen.method == "HEAD" or status in (204, 304):
                    continue
                if "content-length" not in headers:  # the body ends with the connection
                    while data := await upstream.read(1 << 16):
                        await self._answer(writer, data)
                    return
                remaining = int(headers["content-length"])
                if seen.method == "GET" and self.cut_download is not None:
                    remaining, self.cut_download, seen.cut = min(remaining, self.cut_download), None, True
                while remaining:
                    data = await upstream.read(min(remaining, 1 << 16))
                    if not data:
                        return
                    await self._answer(writer, data)
                    remaining -= len(data)
                if seen.cut:
                    return

    async def _answer(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        self.answered += len(data)


def upstream_of(store: Store) -> tuple[str, int]:
    host, port = store.client.host, store.client.port
    assert port is not None
    return host, port


@pytest.fixture
async def store(make_store: MakeStore) -> Store:
    return await make_store()


@dataclass
class LiveStore:
    """A store run as ``datastore serve`` runs it (aiohttp's AppRunner), in this process.

    The tests that cut connections use it: there a dropped connection makes
    the request's body fail and its handler wind up, as in production,
    whereas make_store's test server cancels the handler (handler_cancellation).
    """

    server: HTTPTransferServer
    root: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def upstream(self) -> tuple[str, int]:
        return "127.0.0.1", self.server.port

    def published(self, name: str) -> bytes:
        return (self.root / "files" / name).read_bytes()

    def served_files(self) -> list[str]:
        folder = self.root / "files"
        return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def build_live_store(base: Path) -> LiveStore:
    root, state = base / "root", base / "state"
    server = HTTPTransferServer(make_settings(root, state, host="127.0.0.1"))
    server.register_prefix("files", DirectoryHandler(root / "files", catalogue=state / "catalogue" / "files.sqlite3"))
    return LiveStore(server, root)


@pytest.fixture
async def live_store(tmp_path: Path) -> AsyncIterator[LiveStore]:
    live = await asyncio.to_thread(build_live_store, tmp_path / "live")
    await live.server.start()
    yield live
    await live.server.stop()


# -- uploads -----------------------------------------------------------------------------------


async def test_upload_of_a_folder_and_a_file_publishes_every_file_verified(store: Store, tmp_path: Path) -> None:
    files = {"big.bin": payload(3 * CHUNK + 1234, 1), "small.txt": b"a small file\n"}
    folder = tmp_path / "out"
    await asyncio.to_thread(write_files, folder / "sub", files)
    extra = payload(CHUNK, 2)
    await asyncio.to_thread(write_files, tmp_path, {"extra.dat": extra})
    calls: list[tuple[str, int, int, bool, bool]] = []

    def progress(name: str, sent: int, total: int, file_done: bool, transfer_done: bool) -> bool:
        calls.append((name, sent, total, file_done, transfer_done))
        return False

    async with DataStoreClient(base_url(store), chunk_size=CHUNK, backoff=0.01) as client:
        results = await client.upload("files", [folder, tmp_path / "extra.dat"], progress=progress)
        listing = await client.list("files")
        status = await client.status(results[0].transfer_key)

    everything = {**files, "extra.dat": extra}
    assert [r.name for r in results] == ["big.bin", "small.txt", "extra.dat"]
    assert len({r.transfer_key for r in results}) == 1
    base = base_url(store).rstrip("/")
    for result in results:
        data = everything[result.name]
        assert (result.size, result.sha256) == (len(data), sha256_hex(data))
        assert result.md5 is None  # declared SHA-256 only: the server's fast path
        assert result.url == f"{base}/files/{result.name}"
        assert await published(store, result.name) == data
    assert {entry["name"]: entry["sha256"] for entry in listing} == {n: sha256_hex(d) for n, d in everything.items()}
    assert status["state"] == "FINISHED"
    assert [(f["name"], f["state"], f["received"]) for f in status["files"]] == [
        (name, "FINISHED", len(everything[name])) for name in ("big.bin", "small.txt", "extra.dat")
    ]

    # The progress callback heard every chunk of every file, in order, and the end of the transfer once.
    big = len(files["big.bin"])
    assert calls == [
        *[("big.bin", sent, big, False, False) for sent in range(0, big, CHUNK)],
        ("big.bin", big, big, True, False),
        ("small.txt", 0, 13, False, False),
        ("small.txt", 13, 13, True, False),
        ("extra.dat", 0, CHUNK, False, False),
        ("extra.dat", CHUNK, CHUNK, True, True),
    ]


async def test_an_empty_file_is_uploaded_and_published(store: Store, tmp_path: Path) -> None:
    paths = await asyncio.to_thread(write_files, tmp_path, {"empty.txt": b"", "one.txt": b"1"})
    async with DataStoreClient(base_url(store), chunk_size=CHUNK, backoff=0.01) as client:
        results = await client.upload("files", paths)
        status = await client.status(results[0].transfer_key)
    assert status["state"] == "FINISHED", status
    assert await published(store, "empty.txt") == b""
    assert await published(store, "one.txt") == b"1"


def assert_sent_once_but_the_cut_chunk(proxy: FaultProxy, url_tail: str, start: int, size: int, cut: int) -> None:
    """The PATCHes of one file: the store accepted each chunk from ``start`` once, in order; the
    only chunk sent more than once is the one at ``cut`` (cut, then answered 409 while the store
    still wound up the cut request, if it was), and each new attempt followed a HEAD."""
    patches = proxy.patches()
    assert all(p.target.endswith(url_tail) for p in patches)
    accepted = [p for p in patches if p.status == 204]
    assert [p.offset for p in accepted] == list(range(start, size, CHUNK))
    assert all(p.body == min(CHUNK, size - p.offset) for p in accepted)
    again = [p for p in patches if p.status != 204]
    assert [p.offset for p in again] == [cut] * len(again)
    assert all(p.status == 409 for p in again if not p.cut)
    for attempt in again:
        after = proxy.requests.index(attempt) + 1
        assert proxy.requests[after].method == "HEAD"
        assert int(proxy.requests[after + 1].headers["upload-offset"]) == cut
    assert sum(p.body for p in patches) < 2 * (size - start)


async def test_upload_resumes_from_the_servers_offset_after_the_connection_is_cut_mid_chunk(
    live_store: LiveStore, tmp_path: Path
) -> None:
    data = payload(8 * CHUNK + 12345, 3)
    (path,) = await asyncio.to_thread(write_files, tmp_path / "sources", {"cut.bin": data})
    calls: list[tuple[int, bool, bool]] = []

    def progress(name: str, sent: int, total: int, file_done: bool, transfer_done: bool) -> bool:
        calls.append((sent, file_done, transfer_done))
        return False

    async with (
        FaultProxy(live_store.upstream, cuts={3: 100_000}) as proxy,
        DataStoreClient(proxy.url, chunk_size=CHUNK, backoff=0.01) as client,
    ):
        (result,) = await client.upload("files", [path], progress=progress)

    assert result.sha256 == sha256_hex(data)
    assert sha256_hex(await asyncio.to_thread(live_store.published, "cut.bin")) == sha256_hex(data)
    (cut,) = [p for p in proxy.patches() if p.cut]
    assert (cut.offset, cut.body, cut.status) == (2 * CHUNK, 100_000, None)
    assert_sent_once_but_the_cut_chunk(proxy, f"/{result.transfer_key}/0", 0, len(data), 2 * CHUNK)
    # Progress never went back, and ended once.
    sent = [s for s, _done, _all in calls]
    assert sent == sorted(sent)
    assert sent[-1] == len(data)
    assert [(done, all_done) for _s, done, all_done in calls].count((True, True)) == 1


async def test_an_interrupted_upload_is_resumed_by_key_and_finished_files_are_skipped(
    live_store: LiveStore, tmp_path: Path
) -> None:
    first, second = payload(CHUNK + 5000, 4), payload(6 * CHUNK + 7, 5)
    paths = await asyncio.to_thread(write_files, tmp_path / "sources", {"first.bin": first, "second.bin": second})
    registered: list[str] = []
    # The first file takes two PATCHes; the fifth is the third of the second file.
    async with (
        FaultProxy(live_store.upstream, cuts={5: 50_000}) as proxy,
        DataStoreClient(proxy.url, chunk_size=CHUNK, backoff=0.01, retries=0) as client,
    ):
        with pytest.raises(RetriesExhausted, match=r"second\.bin"):
            await client.upload("files", paths, on_registered=lambda key, files: registered.append(key))
    (key,) = registered
    assert [p.status for p in proxy.patches()] == [204, 204, 204, 204, None]

    calls: list[tuple[str, int, bool]] = []

    def progress(name: str, sent: int, total: int, file_done: bool, transfer_done: bool) -> bool:
        calls.append((name, sent, file_done))
        return False

    async with DataStoreClient(live_store.url) as client:
        status = await client.status(key)
    assert status["state"] == "IN_PROGRESS"
    assert [(f["name"], f["state"]) for f in status["files"]] == [
        ("first.bin", "FINISHED"),
        ("second.bin", "IN_PROGRESS"),
    ]
    assert await asyncio.to_thread(live_store.served_files) == ["first.bin"]

    async with (
        FaultProxy(live_store.upstream) as proxy,
        DataStoreClient(proxy.url, chunk_size=CHUNK, backoff=0.01) as client,
    ):
        results = await client.upload("files", paths, resume=key, progress=progress)
        status = await client.status(key)

    assert [(r.name, r.sha256, r.transfer_key) for r in results] == [
        ("first.bin", sha256_hex(first), key),
        ("second.bin", sha256_hex(second), key),
    ]
    assert proxy.requests[0].method == "GET"  # the transfer's status, no new manifest
    assert "POST" not in proxy.methods()
    # Nothing of the finished file went again; the second went on from the store's offset.
    assert_sent_once_but_the_cut_chunk(proxy, f"/{key}/1", 2 * CHUNK, len(second), 2 * CHUNK)
    assert calls[0] == ("first.bin", len(first), True)
    assert calls[1] == ("second.bin", 2 * CHUNK, False)
    assert await asyncio.to_thread(live_store.published, "second.bin") == second
    assert status["state"] == "FINISHED"


async def test_resume_refuses_files_that_are_not_those_of_the_transfer(store: Store, tmp_path: Path) -> None:
    key = await store.register([("same.bin", b"12345")])
    (changed,) = await asyncio.to_thread(write_files, tmp_path / "a", {"same.bin": b"123456"})
    (other,) = await asyncio.to_thread(write_files, tmp_path / "b", {"other.bin": b"12345"})
    async with DataStoreClient(base_url(store), chunk_size=CHUNK, backoff=0.01) as client:
        for path in (changed, other):
            with pytest.raises(ClientError, match=f"{path.name} is not part of transfer {key}"):
                await client.upload("files", [path], resume=key)
        with pytest.raises(RequestFailed) as unknown:
            await client.upload("files", [other], resume="0" * 40)
    assert unknown.value.status == 404
    assert store.served_files() == []


async def test_upload_cancelled_by_the_progress_callback_cancels_the_transfer(store: Store, tmp_path: Path) -> None:
    done, stopped = payload(CHUNK // 2, 6), payload(4 * CHUNK, 7)
    paths = await asyncio.to_thread(write_files, tmp_path, {"done.bin": done, "stopped.bin": stopped})
    registered: list[str] = []

    def progress(name: str, sent: int, total: int, file_done: bool, transfer_done: bool) -> bool:
        return name == "stopped.bin" and sent >= 2 * CHUNK

    async with DataStoreClient(base_url(store), chunk_size=CHUNK, backoff=0.01) as client:
        with pytest.raises(Cancelled):
            await client.upload(
                "files", paths, progress=progress, on_registered=lambda key, files: registered.append(key)
            )
        (key,) = registered
        status = await client.status(key)
        with pytest.raises(RequestFailed) as refused:
            await client.upload("files", paths[1:], resume=key)

    assert status["state"] == "CANCELLED"
    assert [(f["name"], f["state"]) for f in status["files"]] == [
        ("done.bin", "FINISHED"),
        ("stopped.bin", "CANCELLED"),
    ]
    # The file finished before the cancellation stays; nothing of the cancelled one is left anywhere.
    assert store.served_files() == ["done.bin"]
    assert store.staged_files() == []
    assert refused.value.status == 410


async def test_a_refused_upload_names_the_refused_files_and_sends_nothing(store: Store, tmp_path: Path) -> None:
    paths = await asyncio.to_thread(write_files, tmp_path, {"taken.txt": b"first", "new.txt": b"new"})
    async with DataStoreClient(base_url(store), chunk_size=CHUNK, backoff=0.01) as client:
        await client.upload("files", paths[:1])
        await asyncio.to_thread(paths[0].write_bytes, b"second version")
        with pytest.raises(UploadRefused) as refused:
            await client.upload("files", paths)
    assert refused.value.status == 403
    assert refused.value.names == ["taken.txt"]
    assert str(refused.value) == "403 the store refused taken.txt"
    assert store.served_files() == ["taken.txt"]
    assert await published(store, "taken.txt") == b"first"


async def test_nothing_to_upload_and_a_missing_file_are_client_errors(store: Store, tmp_path: Path) -> None:
    empty = tmp_path / "empty-folder"
    await asyncio.to_thread(empty.mkdir)
    async with DataStoreClient(base_url(store), chunk_size=CHUNK, backoff=0.01) as client:
        with pytest.raises(ClientError, match="nothing to upload"):
            await client.upload("files", [empty])
        with pytest.raises(ClientError, match=r"missing\.txt: no such file"):
            await client.upload("files", [tmp_path / "missing.txt"])
    assert store.served_files() == []


async def test_the_identity_owns_files_and_transfers(store: Store, tmp_path: Path) -> None:
    paths = await asyncio.to_thread(write_files, tmp_path, {"ada.txt": b"by ada"})
    async with DataStoreClient(base_url(store), identity=ADA, chunk_size=CHUNK) as ada:
        (result,) = await ada.upload("files", paths)
        listing = await ada.list("files")
    assert [(entry["name"], entry["owner"], entry["owner_authenticated"]) for entry in listing] == [
        ("ada.txt", ADA, False)
    ]
    async with DataStoreClient(base_url(store), identity=BOB, chunk_size=CHUNK) as bob:
        for call in (bob.status, bob.cancel):
            with pytest.raises(RequestFailed) as refused:
                await call(result.transfer_key)
            assert refused.value.status == 403


async def test_cancel_of_an_open_transfer_and_of_a_finished_one(store: Store, tmp_path: Path) -> None:
    open_key = await store.register([("pending.bin", b"pending")])
    paths = await asyncio.to_thread(write_files, tmp_path, {"done.txt": b"done"})
    async with DataStoreClient(base_url(store), chunk_size=CHUNK) as client:
        cancelled = await client.cancel(open_key)
        (result,) = await client.upload("files", paths)
        with pytest.raises(RequestFailed) as finished:
            await client.cancel(result.transfer_key)
        with pytest.raises(RequestFailed) as unknown:
            await client.status("f" * 40)
    assert cancelled["state"] == "CANCELLED"
    assert [f["state"] for f in cancelled["files"]] == ["CANCELLED"]
    assert finished.value.status == 409
    assert unknown.value.status == 404


# -- downloads ---------------------------------------------------------------------------------


async def upload_one(store: Store, tmp_path: Path, name: str, data: bytes) -> str:
    """Upload ``name`` with the client; return its URL."""
    (path,) = await asyncio.to_thread(write_files, tmp_path / "sources", {name: data})
    async with DataStoreClient(base_url(store), chunk_size=MIB) as client:
        (result,) = await client.upload("files", [path])
    return result.url


async def etag_of(store: Store, name: str) -> str:
    response = await store.client.head(f"/files/{name}")
    assert response.status == 200
    return response.headers["ETag"]


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


async def test_download_is_verified_against_the_repr_digest(store: Store, tmp_path: Path) -> None:
    data = payload(3 * MIB + 17, 8)
    url = await upload_one(store, tmp_path, "data.bin", data)
    dest = tmp_path / "downloads"
    await asyncio.to_thread(dest.mkdir)
    calls: list[tuple[int, int, bool]] = []

    def progress(received: int, total: int, done: bool) -> bool:
        calls.append((received, total, done))
        return False

    async with DataStoreClient(base_url(store)) as client:
        result = await client.download(url, dest, progress=progress)
        by_path = await client.download("/files/data.bin", dest / "copy.bin")

    assert result.path == dest / "data.bin"
    assert (result.size, result.sha256, result.verified, result.resumed_from) == (len(data), sha256_hex(data), True, 0)
    assert await asyncio.to_thread(result.path.read_bytes) == data
    assert (by_path.path, by_path.verified) == (dest / "copy.bin", True)
    assert await asyncio.to_thread(leftovers, dest) == ["copy.bin", "data.bin"]
    assert calls[-1] == (len(data), len(data), True)
    assert all(total == len(data) and not done for _received, total, done in calls[:-1])
    assert [received for received, _total, _done in calls] == sorted(received for received, _t, _d in calls)


async def test_download_to_the_current_directory_by_default(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await upload_one(store, tmp_path, "here.txt", b"right here")
    work = tmp_path / "work"
    await asyncio.to_thread(work.mkdir)
    monkeypatch.chdir(work)
    async with DataStoreClient(base_url(store)) as client:
        result = await client.download(url)
    assert result.path == Path("here.txt")
    assert await asyncio.to_thread((work / "here.txt").read_bytes) == b"right here"


async def test_download_cancelled_by_the_progress_callback_leaves_nothing(store: Store, tmp_path: Path) -> None:
    data = payload(6 * MIB, 9)
    url = await upload_one(store, tmp_path, "big.bin", data)
    dest = tmp_path / "downloads"
    await asyncio.to_thread(dest.mkdir)
    calls: list[int] = []

    def progress(received: int, total: int, done: bool) -> bool:
        calls.append(received)
        return received >= MIB

    async with DataStoreClient(base_url(store)) as client:
        with pytest.raises(Cancelled):
            await client.download(url, dest, progress=progress)
    assert MIB <= calls[-1] < len(data)
    assert await asyncio.to_thread(leftovers, dest) == []


async def test_download_resumes_a_partial_file_with_range_and_if_range(store: Store, tmp_path: Path) -> None:
    data = payload(4 * MIB + 3, 10)
    await upload_one(store, tmp_path, "part.bin", data)
    half = len(data) // 2
    dest = tmp_path / "downloads"
    etag = await etag_of(store, "part.bin")
    await asyncio.to_thread(write_files, dest, {"part.bin.part": data[:half], "part.bin.part.etag": etag.encode()})
    calls: list[tuple[int, int, bool]] = []

    def progress(received: int, total: int, done: bool) -> bool:
        calls.append((received, total, done))
        return False

    async with FaultProxy(upstream_of(store)) as proxy:
        async with DataStoreClient(proxy.url) as client:
            result = await client.download("/files/part.bin", dest, progress=progress)
        (get,) = proxy.requests
        answered = proxy.answered

    assert (result.resumed_from, result.verified, result.size) == (half, True, len(data))
    assert result.sha256 == sha256_hex(data)
    assert await asyncio.to_thread((dest / "part.bin").read_bytes) == data
    assert await asyncio.to_thread(leftovers, dest) == ["part.bin"]
    # Only the missing half crossed the wire.
    assert (get.method, get.headers["range"], get.headers["if-range"]) == ("GET", f"bytes={half}-", etag)
    assert len(data) - half <= answered < len(data) - half + 4096
    assert calls[0][0] > half
    assert calls[-1] == (len(data), len(data), True)


async def test_download_cut_mid_file_resumes_where_it_stopped(store: Store, tmp_path: Path) -> None:
    data = payload(5 * MIB + 77, 16)
    await upload_one(store, tmp_path, "cut.bin", data)
    dest = tmp_path / "downloads"
    await asyncio.to_thread(dest.mkdir)
    async with FaultProxy(upstream_of(store), cut_download=2 * MIB + 5) as proxy:
        async with DataStoreClient(proxy.url, backoff=0.01) as client:
            result = await client.download("/files/cut.bin", dest)
        first, second = proxy.requests
    etag = await etag_of(store, "cut.bin")

    assert first.cut and "range" not in first.headers
    assert 0 < result.resumed_from <= 2 * MIB + 5
    assert (second.headers["range"], second.headers["if-range"], second.status) == (
        f"bytes={result.resumed_from}-",
        etag,
        206,
    )
    assert (result.verified, result.size, result.sha256) == (True, len(data), sha256_hex(data))
    assert await asyncio.to_thread((dest / "cut.bin").read_bytes) == data
    assert await asyncio.to_thread(leftovers, dest) == ["cut.bin"]
    assert proxy.answered < len(data) + 2 * MIB + 5 + 4096


async def test_names_with_spaces_and_accents_round_trip(store: Store, tmp_path: Path) -> None:
    name = "résumé 2024 (final).txt"
    (path,) = await asyncio.to_thread(write_files, tmp_path / "sources", {name: b"accents"})
    dest = tmp_path / "downloads"
    await asyncio.to_thread(dest.mkdir)
    async with DataStoreClient(base_url(store)) as client:
        (result,) = await client.upload("files", [path])
        downloaded = await client.download(result.url, dest)
        listing = await client.list("files")
    assert result.url == base_url(store) + "files/r%C3%A9sum%C3%A9%202024%20%28final%29.txt"
    assert downloaded.path == dest / name
    assert await asyncio.to_thread(downloaded.path.read_bytes) == b"accents"
    assert [entry["name"] for entry in listing] == [name]


async def test_download_with_a_stale_etag_starts_again(store: Store, tmp_path: Path) -> None:
    data = payload(2 * MIB, 11)
    url = await upload_one(store, tmp_path, "stale.bin", data)
    dest = tmp_path / "downloads"
    stale = '"0-0"'
    assert stale != await etag_of(store, "stale.bin")
    partial = {"stale.bin.part": b"x" * MIB, "stale.bin.part.etag": stale.encode()}
    await asyncio.to_thread(write_files, dest, partial)
    async with DataStoreClient(base_url(store)) as client:
        result = await client.download(url, dest)
    assert (result.resumed_from, result.verified, result.sha256) == (0, True, sha256_hex(data))
    assert await asyncio.to_thread((dest / "stale.bin").read_bytes) == data
    assert await asyncio.to_thread(leftovers, dest) == ["stale.bin"]


async def test_download_ignores_a_partial_file_without_a_validator_or_when_told_not_to_resume(
    store: Store, tmp_path: Path
) -> None:
    data = payload(MIB + 1, 12)
    url = await upload_one(store, tmp_path, "plain.bin", data)
    etag = await etag_of(store, "plain.bin")
    no_validator, no_resume = tmp_path / "no-validator", tmp_path / "no-resume"
    await asyncio.to_thread(write_files, no_validator, {"plain.bin.part": b"junk" * 1000})
    await asyncio.to_thread(
        write_files, no_resume, {"plain.bin.part": data[:1000], "plain.bin.part.etag": etag.encode()}
    )
    async with DataStoreClient(base_url(store)) as client:
        first = await client.download(url, no_validator)
        second = await client.download(url, no_resume, resume=False)
    for result, folder in ((first, no_validator), (second, no_resume)):
        assert (result.resumed_from, result.verified, result.sha256) == (0, True, sha256_hex(data))
        assert await asyncio.to_thread(result.path.read_bytes) == data
        assert await asyncio.to_thread(leftovers, folder) == ["plain.bin"]


async def test_a_wrong_partial_file_ends_in_a_digest_mismatch_and_nothing_under_the_name(
    store: Store, tmp_path: Path
) -> None:
    data = payload(2 * MIB + 9, 13)
    url = await upload_one(store, tmp_path, "wrong.bin", data)
    dest = tmp_path / "downloads"
    etag = await etag_of(store, "wrong.bin")
    corrupt = bytes(b ^ 0xFF for b in data[:MIB])  # the right length, the wrong bytes
    await asyncio.to_thread(write_files, dest, {"wrong.bin.part": corrupt, "wrong.bin.part.etag": etag.encode()})
    async with DataStoreClient(base_url(store)) as client:
        with pytest.raises(DigestMismatch, match=r"wrong\.bin"):
            await client.download(url, dest)
        assert await asyncio.to_thread(leftovers, dest) == []
        # The next attempt starts from nothing and succeeds.
        result = await client.download(url, dest)
    assert (result.resumed_from, result.verified) == (0, True)
    assert await asyncio.to_thread((dest / "wrong.bin").read_bytes) == data


async def test_download_of_a_missing_file_fails_with_the_status(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "downloads"
    await asyncio.to_thread(dest.mkdir)
    async with DataStoreClient(base_url(store)) as client:
        with pytest.raises(RequestFailed) as missing:
            await client.download("/files/nothing-here.txt", dest)
    assert missing.value.status == 404
    assert await asyncio.to_thread(leftovers, dest) == []


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(
            "sha-256=:LCa0a2j/xo/5m0U8HTBBNBNCLXBkg7+g+YpeiGJm564=:, md5=:XrY7u+Ae7tCTyyK7j1rNww==:",
            {
                "sha-256": hashlib.sha256(b"foo").hexdigest(),
                "md5": hashlib.md5(b"hello world", usedforsecurity=False).hexdigest(),
            },
            id="both",
        ),
        pytest.param(
            "SHA-256=:LCa0a2j/xo/5m0U8HTBBNBNCLXBkg7+g+YpeiGJm564=:", {"sha-256": sha256_hex(b"foo")}, id="case"
        ),
        pytest.param("", {}, id="empty"),
        pytest.param("sha-256=LCa0a2j", {}, id="not-a-byte-sequence"),
        pytest.param("sha-256=:abc:", {}, id="bad-base64"),
    ],
)
def test_parse_repr_digest(header: str, expected: dict[str, str]) -> None:
    assert parse_repr_digest(header) == expected


# -- the synchronous client --------------------------------------------------------------------


def sync_session(url: str, path: Path, dest: Path) -> tuple[Any, ...]:
    with SyncDataStoreClient(url, chunk_size=CHUNK, backoff=0.01) as client:
        (result,) = client.upload("files", [path])
        listing = client.list("files")
        status = client.status(result.transfer_key)
        downloaded = client.download(result.url, dest)
    return result, listing, status, downloaded


async def test_sync_client_in_a_thread(store: Store, tmp_path: Path) -> None:
    data = payload(3 * CHUNK + 1, 14)
    (path,) = await asyncio.to_thread(write_files, tmp_path / "sources", {"sync.bin": data})
    dest = tmp_path / "downloads"
    await asyncio.to_thread(dest.mkdir)
    result, listing, status, downloaded = await asyncio.to_thread(sync_session, base_url(store), path, dest)
    assert result.sha256 == sha256_hex(data)
    assert [entry["name"] for entry in listing] == ["sync.bin"]
    assert status["state"] == "FINISHED"
    assert (downloaded.verified, downloaded.sha256) == (True, sha256_hex(data))
    assert await asyncio.to_thread((dest / "sync.bin").read_bytes) == data
    assert await published(store, "sync.bin") == data


# -- TLS with a client certificate -------------------------------------------------------------

ORG, UNIT, COUNTRY = "Lab", "Physics", "NZ"
ADA_CERT_DN = "/C=NZ/O=Lab/OU=Physics/CN=ada"


@dataclass
class TlsStore:
    server: HTTPSTransferServer
    root: Path
    ca: Path
    cert: Path
    key: Path

    @property
    def url(self) -> str:
        return self.server.urls[0]


def build_tls_store(base: Path) -> TlsStore:
    """A CA, a server certificate for 127.0.0.1, ada's client certificate and the server (blocking)."""
    certs = CertificateDirectory(base / "certs")
    certs.init(organization=ORG)
    certs.issue_server(["localhost", "127.0.0.1"])
    cert, _password = certs.issue_client("ada", organization=ORG, unit=UNIT, country=COUNTRY, password="p")
    context = server_context(certs.path("server", "pem"), certs.path("server", "key"), [certs.path("ca", "pem")])
    root, state = base / "root", base / "state"
    server = HTTPSTransferServer(Settings(root=root, state_dir=state, host="127.0.0.1", port=0), context)
    server.register_prefix("files", DirectoryHandler(root / "files", catalogue=state / "catalogue" / "files.sqlite3"))
    return TlsStore(server, root, certs.path("ca", "pem"), cert, certs.path("ada", "key"))


@contextlib.asynccontextmanager
async def running_tls_store(base: Path) -> AsyncIterator[TlsStore]:
    tls = await asyncio.to_thread(build_tls_store, base)
    await tls.server.start()
    try:
        yield tls
    finally:
        await tls.server.stop()


async def test_tls_upload_and_download_with_a_client_certificate(tmp_path: Path) -> None:
    data = payload(2 * CHUNK + 99, 15)
    paths = await asyncio.to_thread(write_files, tmp_path / "sources", {"secure.bin": data, "note.txt": b"note"})
    dest = tmp_path / "downloads"
    await asyncio.to_thread(dest.mkdir)
    async with running_tls_store(tmp_path / "tls") as tls:
        url = tls.url
        context = await asyncio.to_thread(client_ssl_context, str(tls.ca), str(tls.cert), str(tls.key))
        async with DataStoreClient(tls.url, ssl=context, chunk_size=CHUNK, backoff=0.01) as client:
            results = await client.upload("files", paths)
            listing = await client.list("files")
            status = await client.status(results[0].transfer_key)
            downloaded = await client.download(results[0].url, dest)
        # Without a certificate the server refuses the connection.
        anonymous = await asyncio.to_thread(client_ssl_context, str(tls.ca))
        async with DataStoreClient(tls.url, ssl=anonymous, retries=0) as client:
            with pytest.raises(aiohttp.ClientConnectionError):
                await client.list("files")
    assert [r.url for r in results] == [f"{url}/files/secure.bin", f"{url}/files/note.txt"]
    assert [(e["name"], e["owner"], e["owner_authenticated"]) for e in listing] == [
        ("note.txt", ADA_CERT_DN, True),
        ("secure.bin", ADA_CERT_DN, True),
    ]
    assert (status["state"], status["owner"]) == ("FINISHED", ADA_CERT_DN)
    assert (downloaded.verified, downloaded.sha256) == (True, sha256_hex(data))
    assert await asyncio.to_thread((dest / "secure.bin").read_bytes) == data
    assert await asyncio.to_thread((tls.root / "files" / "secure.bin").read_bytes) == data


async def test_the_token_goes_only_to_the_store_it_was_given_for(store: Store, tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(body=b"a file from elsewhere")

    app = web.Application()
    app.router.add_get("/file.txt", elsewhere)
    other = TestServer(app)
    await other.start_server()
    try:
        async with DataStoreClient(
            str(store.client.make_url("/")).rstrip("/"), token="dst_0123456789ab_" + "A" * 43
        ) as client:
            await client.download(str(other.make_url("/file.txt")), tmp_path / "file.txt")
    finally:
        await other.close()
    assert seen == [None]
