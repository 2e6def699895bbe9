"""The HTTP drivers against real processes: ``HttpSource`` reading a ``datastore serve`` and an
``rclone serve http`` (a server nobody here wrote), ``DatastoreDestination`` pushing to a
``datastore serve``, both through :class:`~tests.faultproxy.FaultProxy` where a fault is needed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from datastore.jobs.drivers.datastore import DatastoreDestination
from datastore.jobs.drivers.http import HttpSource
from datastore.jobs.drivers.interface import DriverError, Order, SourceInfo
from datastore.jobs.states import FailureKind, FailureReason

from .faultproxy import FaultProxy
from .harness import json_manifest, md5_hex, sha256_hex, spawn_serve
from .rclone_servers import rclone_binary

ADA = {"X-Client-DN": "/O=Lab/CN=Ada"}
MIB = 1 << 20
WAIT = 30.0


@dataclass
class Served:
    base: str
    port: int


@contextlib.asynccontextmanager
async def served(tmp_path: Path, *args: str) -> AsyncIterator[Served]:
    """A ``datastore serve`` process on loopback (prefix ``files``), stopped by its PID at the end."""
    process, (match,) = await spawn_serve(
        "--root", str(tmp_path / "root"), "--state-dir", str(tmp_path / "state"), *args
    )
    try:
        yield Served(match["base"], int(match["port"]))
    finally:
        if process.returncode is None:
            os.kill(process.pid, 15)
            await asyncio.wait_for(process.wait(), WAIT)


@contextlib.asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as s:
        yield s


async def upload(s: aiohttp.ClientSession, base: str, name: str, data: bytes) -> None:
    """Publish ``data`` as ``name`` on the store at ``base`` (a manifest and one PUT, as Ada)."""
    async with s.post(f"{base}/files/manifest", json=json_manifest([(name, data)]), headers=ADA) as response:
        body = await response.json()
        assert response.status == 201, body
    async with s.put(f"{base}/files/{body['transfer_key']}/0", data=io.BytesIO(data), headers=ADA) as response:
        assert response.status == 200, await response.text()


async def read_all(source: HttpSource, offset: int, info: SourceInfo) -> bytes:
    return b"".join([chunk async for chunk in source.read(offset, info)])


async def read_until_failure(source: HttpSource, info: SourceInfo) -> tuple[bytes, DriverError]:
    got = bytearray()
    with pytest.raises(DriverError) as failed:
        async for chunk in source.read(0, info):
            got += chunk
    return bytes(got), failed.value


async def pieces(data: bytes, size: int = 256 << 10) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def settled_offset(destination: DatastoreDestination, handle: dict[str, object]) -> int:
    """The destination's offset, once it is past 0 (bounded by WAIT)."""
    async with asyncio.timeout(WAIT):
        # Nothing announces that the store noticed the cut: its offset is polled until it moves.
        while not (offset := await destination.offset(handle)):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return offset


def order_for(data: bytes, validator: str | None = '"v1"', md5: str | None = None) -> Order:
    return Order(len(data), md5 or md5_hex(data), sha256_hex(data), validator)


# -- HttpSource on a datastore ------------------------------------------------------------------


async def test_source_stats_a_datastore_file_and_reads_it_from_an_offset(tmp_path: Path) -> None:
    data = os.urandom(3 * MIB + 123)
    async with served(tmp_path) as store, session() as s:
        await upload(s, store.base, "data.bin", data)
        source = HttpSource(f"{store.base}/files/data.bin", s, chunk_size=64 << 10)
        info = await source.stat()
        assert info.size == len(data)
        assert info.validator is not None and info.validator.startswith('"')
        assert (info.md5, info.sha256) == (md5_hex(data), sha256_hex(data))
        assert await read_all(source, 0, info) == data
        assert await read_all(source, 1_000_001, info) == data[1_000_001:]
        assert await read_all(source, len(data), info) == b""
        await source.close()


async def test_a_cut_download_resumes_from_the_byte_reached(tmp_path: Path) -> None:
    data = os.urandom(4 * MIB)
    async with served(tmp_path) as store, FaultProxy("127.0.0.1", store.port) as proxy, session() as s:
        await upload(s, store.base, "big.bin", data)
        source = HttpSource(f"{proxy.url}/files/big.bin", s)
        info = await source.stat()
        proxy.cut_after(MIB + 4321, "down")
        got, failure = await read_until_failure(source, info)
        assert failure.reason is FailureReason.CONNECTION and failure.reason.kind is FailureKind.TRANSIENT
        assert 0 < len(got) < len(data) and got == data[: len(got)]
        rest = await read_all(source, len(got), info)
    assert hashlib.sha256(got + rest).hexdigest() == sha256_hex(data)
    gets = proxy.heads("GET")
    assert [g.headers.get("range") for g in gets] == [None, f"bytes={len(got)}-"]
    assert gets[1].headers["if-range"] == info.validator


async def test_a_source_replaced_under_the_same_name_is_source_changed(tmp_path: Path) -> None:
    first, second = b"1" * 500_000, b"2" * 500_000
    async with served(tmp_path, "--overwrite") as store, session() as s:
        await upload(s, store.base, "moving.bin", first)
        source = HttpSource(f"{store.base}/files/moving.bin", s)
        info = await source.stat()
        await upload(s, store.base, "moving.bin", second)
        with pytest.raises(DriverError) as failed:
            await read_all(source, 1000, info)
        assert failed.value.reason is FailureReason.SOURCE_CHANGED
        assert failed.value.reason.kind is FailureKind.TRANSIENT
        fresh = await source.stat()
        assert fresh.validator != info.validator and fresh.sha256 == sha256_hex(second)
        assert await read_all(source, 1000, fresh) == second[1000:]


async def test_a_missing_file_is_permanent_and_a_503_burst_transient(tmp_path: Path) -> None:
    async with served(tmp_path) as store, FaultProxy("127.0.0.1", store.port) as proxy, session() as s:
        await upload(s, store.base, "here.bin", b"here")
        with pytest.raises(DriverError) as missing:
            await HttpSource(f"{proxy.url}/files/nowhere.bin?token=secret", s).stat()
        assert missing.value.reason is FailureReason.NOT_FOUND
        assert missing.value.reason.kind is FailureKind.PERMANENT
        assert "secret" not in missing.value.message and "\n" not in missing.value.message

        source = HttpSource(f"{proxy.url}/files/here.bin", s)
        proxy.fail_next(2)
        for _ in range(2):
            with pytest.raises(DriverError) as busy:
                await source.stat()
            assert busy.value.reason is FailureReason.SERVER_ERROR
            assert busy.value.reason.kind is FailureKind.TRANSIENT
        info = await source.stat()
        assert await read_all(source, 0, info) == b"here"
        assert len(proxy.refused) == 2


# -- HttpSource on rclone -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def rclone_http(folder: Path) -> AsyncIterator[str]:
    """``rclone serve http FOLDER`` on a free loopback port, once it accepts connections."""
    rclone = rclone_binary()
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        rclone,
        "serve",
        "http",
        str(folder),
        "--addr",
        f"127.0.0.1:{port}",
        "--config",
        os.devnull,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(WAIT):
            # rclone 1.60 prints no line when it listens: its port is polled until it answers.
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except ConnectionRefusedError:
                    assert process.returncode is None, "rclone exited"
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                await writer.wait_closed()
                break
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            os.kill(process.pid, 15)
        await asyncio.wait_for(process.wait(), WAIT)


async def test_source_reads_and_resumes_from_rclone_serve_http(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    data = os.urandom(3 * MIB + 7)
    (folder / "plain.bin").write_bytes(data)
    async with rclone_http(folder) as base, session() as s:
        port = int(base.rsplit(":", 1)[1])
        async with FaultProxy("127.0.0.1", port) as proxy:
            source = HttpSource(f"{proxy.url}/plain.bin", s)
            info = await source.stat()
            assert info.size == len(data)
            assert info.validator is not None  # rclone sends Last-Modified (no ETag)
            assert await read_all(source, 2 * MIB, info) == data[2 * MIB :]
            proxy.cut_after(MIB, "down")
            got, failure = await read_until_failure(source, info)
            assert failure.reason is FailureReason.CONNECTION
            rest = await read_all(source, len(got), info)
            assert got + rest == data
        gets = proxy.heads("GET")
        assert [g.headers.get("range") for g in gets] == [f"bytes={2 * MIB}-", None, f"bytes={len(got)}-"]


# -- DatastoreDestination ----------------------------------------------------------------------


async def test_destination_publishes_a_verified_file(tmp_path: Path) -> None:
    data = os.urandom(2 * MIB + 99)
    async with served(tmp_path) as store, session() as s:
        destination = DatastoreDestination(f"{store.base}/files/pushed.bin", s, headers=ADA)
        order = order_for(data)
        handle = destination.plan({}, order)
        assert len(handle["idempotency_key"]) == 32
        handle = await destination.open(handle, order)
        assert handle["upload_url"].startswith(f"{store.base}/files/")
        assert await destination.offset(handle) == 0
        assert await destination.write(handle, 0, pieces(data)) == len(data)
        published = await destination.finish(handle)
        assert (published.size, published.md5, published.sha256) == (len(data), md5_hex(data), sha256_hex(data))
        async with s.get(f"{store.base}/files/pushed.bin") as response:
            assert await response.read() == data
        await destination.close()


async def test_a_cut_upload_resumes_from_the_offset_the_store_holds(tmp_path: Path) -> None:
    data = os.urandom(4 * MIB)
    async with served(tmp_path) as store, FaultProxy("127.0.0.1", store.port) as proxy, session() as s:
        destination = DatastoreDestination(f"{proxy.url}/files/resumed.bin", s, headers=ADA)
        order = order_for(data)
        handle = await destination.open(destination.plan({}, order), order)
        proxy.cut_after(2 * MIB, "up")
        with pytest.raises(DriverError) as cut:
            await destination.write(handle, 0, pieces(data))
        assert cut.value.reason.kind is FailureKind.TRANSIENT
        assert proxy.cuts == 1

        again = await destination.open(destination.plan(handle, order), order)
        assert again["upload_url"] == handle["upload_url"]
        assert again["idempotency_key"] == handle["idempotency_key"]
        # The store records the bytes the cut request staged once it sees the connection gone;
        # until then HEAD answers the offset it last recorded (0).
        offset = await settled_offset(destination, again)
        assert 0 < offset < len(data)
        assert await destination.write(again, offset, pieces(data[offset:])) == len(data)
        published = await destination.finish(again)
    assert published.sha256 == sha256_hex(data)
    assert [p.headers["upload-offset"] for p in proxy.heads("PATCH")] == ["0", str(offset)]
    assert len(proxy.heads("POST")) == 1  # one manifest: the second open found the upload


async def test_a_wrong_declared_md5_is_a_checksum_mismatch_and_publishes_nothing(tmp_path: Path) -> None:
    data = os.urandom(MIB)
    async with served(tmp_path) as store, session() as s:
        destination = DatastoreDestination(f"{store.base}/files/wrong.bin", s, headers=ADA)
        order = order_for(data, md5=md5_hex(b"something else"))
        handle = await destination.open(destination.plan({}, order), order)
        with pytest.raises(DriverError) as mismatch:
            await destination.write(handle, 0, pieces(data))
        assert mismatch.value.reason is FailureReason.CHECKSUM_MISMATCH
        assert mismatch.value.reason.kind is FailureKind.PERMANENT
        with pytest.raises(DriverError) as missing:
            await HttpSource(f"{store.base}/files/wrong.bin", s).stat()
        assert missing.value.reason is FailureReason.NOT_FOUND


async def test_a_name_that_exists_is_refused_for_good(tmp_path: Path) -> None:
    async with served(tmp_path) as store, session() as s:
        await upload(s, store.base, "taken.bin", b"first")
        destination = DatastoreDestination(f"{store.base}/files/taken.bin", s, headers=ADA)
        order = order_for(b"second")
        with pytest.raises(DriverError) as refused:
            await destination.open(destination.plan({}, order), order)
        assert refused.value.reason in (FailureReason.EXISTS, FailureReason.FORBIDDEN)
        assert refused.value.reason.kind is FailureKind.PERMANENT


async def test_discard_frees_the_name(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    async with served(tmp_path) as store, session() as s:
        url = f"{store.base}/files/dropped.bin"
        destination = DatastoreDestination(url, s, headers=ADA)
        order = order_for(data)
        handle = await destination.open(destination.plan({}, order), order)
        assert await destination.write(handle, 0, pieces(data[:100_000])) == 100_000
        other = DatastoreDestination(url, s, headers=ADA)
        with pytest.raises(DriverError) as reserved:
            await other.open(other.plan({}, order), order)
        assert reserved.value.reason in (FailureReason.EXISTS, FailureReason.FORBIDDEN)

        await destination.discard(handle)
        await destination.discard(handle)  # twice: the second finds nothing, and says nothing
        fresh = await other.open(other.plan({}, order), order)
        assert fresh["upload_url"] != handle["upload_url"]
        async with s.head(handle["upload_url"], headers={**ADA, "Tus-Resumable": "1.0.0"}) as response:
            assert response.status in (404, 410)


async def test_a_new_source_version_terminates_the_old_upload(tmp_path: Path) -> None:
    old, new = os.urandom(200_000), os.urandom(200_000)
    async with served(tmp_path) as store, session() as s:
        destination = DatastoreDestination(f"{store.base}/files/versioned.bin", s, headers=ADA)
        first = order_for(old, validator='"v1"')
        handle = await destination.open(destination.plan({}, first), first)
        assert await destination.write(handle, 0, pieces(old[:50_000])) == 50_000
        second = order_for(new, validator='"v2"')
        planned = destination.plan(handle, second)
        assert planned["idempotency_key"] != handle["idempotency_key"]
        renewed = await destination.open(planned, second)
        assert renewed["upload_url"] != handle["upload_url"]
        assert await destination.offset(renewed) == 0
        assert await destination.write(renewed, 0, pieces(new)) == len(new)
        assert (await destination.finish(renewed)).sha256 == sha256_hex(new)


async def test_a_stalled_source_times_out_and_a_refused_head_falls_back_to_get(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    async with served(tmp_path) as store, FaultProxy("127.0.0.1", store.port) as proxy, session() as s:
        await upload(s, store.base, "slow.bin", data)
        url = f"{proxy.url}/files/slow.bin"
        proxy.fail_next(1, status=405)
        info = await HttpSource(url, s).stat()
        assert [r.method for r in proxy.refused] == ["HEAD"]
        assert proxy.heads("GET")[0].headers["range"] == "bytes=0-0"
        assert (info.size, info.sha256) == (len(data), sha256_hex(data))
        assert info.validator is not None and info.validator.startswith('"')

        proxy.stall()
        impatient = aiohttp.ClientTimeout(total=WAIT, sock_read=0.3)
        async with aiohttp.ClientSession(timeout=impatient) as quick:
            with pytest.raises(DriverError) as stalled:
                await read_all(HttpSource(url, quick), 10, info)
        assert stalled.value.reason is FailureReason.TIMEOUT
        assert stalled.value.reason.kind is FailureKind.TRANSIENT
        proxy.release()
        assert await read_all(HttpSource(url, s), 10, info) == data[10:]


async def test_a_write_from_another_offset_than_the_stores_is_transient(tmp_path: Path) -> None:
    data = os.urandom(1000)
    async with served(tmp_path) as store, session() as s:
        destination = DatastoreDestination(f"{store.base}/files/offset.bin", s, headers=ADA)
        order = order_for(data)
        handle = await destination.open(destination.plan({}, order), order)
        with pytest.raises(DriverError) as mismatch:
            await destination.write(handle, 5, pieces(data[5:]))
        assert mismatch.value.reason is FailureReason.CONNECTION
        assert "holds 0 bytes" in mismatch.value.message
        assert await destination.write(handle, 0, pieces(data)) == len(data)
