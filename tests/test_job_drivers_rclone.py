"""The rclone driver against real processes: a ``rclone serve webdav`` of a temporary folder started
by each test (``tests/rclone_servers.py``), and the driver's own rclone commands under a
configuration that names it.

Reading (stat, whole and from an offset), writing through a temporary name and publishing with a
move, a write cut short and the next attempt, the refusals (EXISTS, FORBIDDEN before anything runs),
the classification of a missing file and of a server that went away, and no rclone left running
when the task that started it is cancelled.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest

from datastore.jobs.drivers.interface import DriverError, Order
from datastore.jobs.drivers.rclone import RcloneDestination, RcloneSource, classify, parse_remote
from datastore.jobs.states import FailureKind, FailureReason

from .harness import md5_hex, sha256_hex, until
from .rclone_servers import PASSWORD, WebDav, rclone_binary, start_webdav

CONTENT = os.urandom((3 << 20) + 12345)


@pytest.fixture
async def dav(tmp_path: Path) -> AsyncIterator[WebDav]:
    server = await start_webdav(tmp_path / "dav")
    try:
        yield server
    finally:
        await server.stop()


def source(dav: WebDav, path: str, **options: int) -> RcloneSource:
    return RcloneSource(f"rclone:dav:{path}", config=dav.config, binary=rclone_binary(), **options)


def destination(dav: WebDav, path: str, remote: str = "dav", **options: bool) -> RcloneDestination:
    return RcloneDestination(f"rclone:{remote}:{path}", config=dav.config, binary=rclone_binary(), **options)


def order_for(content: bytes) -> Order:
    return Order(size=len(content), md5=md5_hex(content), sha256=sha256_hex(content))


async def chunks_of(content: bytes, size: int = 1 << 18) -> AsyncIterator[bytes]:
    for start in range(0, len(content), size):
        yield content[start : start + size]


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def leftovers(root: Path) -> list[str]:
    """The temporaries a destination left in ``root``."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*.partial"))


def rclone_children(command: str) -> list[int]:
    """The PIDs of this process's children running ``rclone COMMAND`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and command.encode() in argv:
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_source_states_the_file_and_reads_it_whole_and_from_an_offset(dav: WebDav) -> None:
    (dav.root / "in").mkdir()
    (dav.root / "in" / "data.bin").write_bytes(CONTENT)
    reader = source(dav, "in/data.bin", chunk_size=1 << 16)
    try:
        info = await reader.stat()
        assert info.size == len(CONTENT)
        assert info.validator
        assert await collect(reader.read(0, info)) == CONTENT
        assert await collect(reader.read(1_000_001, info)) == CONTENT[1_000_001:]
        assert await collect(reader.read(len(CONTENT), info)) == b""
    finally:
        await reader.close()


async def test_a_changed_source_is_not_read(dav: WebDav) -> None:
    (dav.root / "data.bin").write_bytes(b"first version")
    reader = source(dav, "data.bin")
    info = await reader.stat()
    (dav.root / "data.bin").write_bytes(b"the second, longer version")
    with pytest.raises(DriverError) as caught:
        await collect(reader.read(0, info))
    assert caught.value.reason is FailureReason.SOURCE_CHANGED


async def test_a_destination_publishes_the_file_under_its_name_with_its_digests(dav: WebDav) -> None:
    writer = destination(dav, "out/sub/data.bin")
    order = order_for(CONTENT)
    handle = writer.plan({}, order)
    assert handle["temp"].startswith(".data.bin.datastore-")
    handle = await writer.open(handle, order)
    assert await writer.offset(handle) == 0
    assert await writer.write(handle, 0, chunks_of(CONTENT)) == len(CONTENT)
    assert not (dav.root / "out" / "sub" / "data.bin").exists()
    published = await writer.finish(handle)
    assert (published.size, published.md5, published.sha256) == (len(CONTENT), order.md5, order.sha256)
    assert (dav.root / "out" / "sub" / "data.bin").read_bytes() == CONTENT
    assert leftovers(dav.root) == []


async def test_an_empty_file_is_published(dav: WebDav) -> None:
    writer = destination(dav, "empty.txt")
    order = order_for(b"")
    handle = await writer.open(writer.plan({}, order), order)
    assert await writer.write(handle, 0, chunks_of(b"")) == 0
    published = await writer.finish(handle)
    assert (published.size, published.md5) == (0, md5_hex(b""))
    assert (dav.root / "empty.txt").read_bytes() == b""


async def test_a_write_cut_short_publishes_nothing_and_the_next_attempt_starts_over(dav: WebDav) -> None:
    order = order_for(CONTENT)
    writer = destination(dav, "cut.bin")
    persisted = writer.plan({}, order)
    persisted = await writer.open(persisted, order)

    async def broken() -> AsyncIterator[bytes]:
        yield CONTENT[: 1 << 20]
        yield CONTENT[1 << 20 : 2 << 20]
        raise DriverError(FailureReason.CONNECTION, "the source went away")

    with pytest.raises(DriverError, match="the source went away"):
        await writer.write(persisted, 0, broken())
    assert not (dav.root / "cut.bin").exists()
    assert rclone_children("rcat") == []
    await writer.close()

    again = destination(dav, "cut.bin")
    handle = again.plan(persisted, order)
    assert handle["temp"] == persisted["temp"]
    handle = await again.open(handle, order)
    assert await again.offset(handle) == 0
    assert await again.write(handle, 0, chunks_of(CONTENT)) == len(CONTENT)
    published = await again.finish(handle)
    assert published.sha256 == order.sha256
    assert (dav.root / "cut.bin").read_bytes() == CONTENT
    assert leftovers(dav.root) == []


async def test_an_existing_file_is_not_overwritten(dav: WebDav) -> None:
    (dav.root / "there.txt").write_bytes(b"keep me")
    order = order_for(b"new")
    writer = destination(dav, "there.txt")
    with pytest.raises(DriverError) as caught:
        await writer.open(writer.plan({}, order), order)
    assert caught.value.reason is FailureReason.EXISTS
    assert caught.value.reason.kind is FailureKind.PERMANENT
    assert (dav.root / "there.txt").read_bytes() == b"keep me"

    replacing = destination(dav, "there.txt", overwrite=True)
    handle = await replacing.open(replacing.plan({}, order), order)
    await replacing.write(handle, 0, chunks_of(b"new"))
    assert (await replacing.finish(handle)).md5 == md5_hex(b"new")
    assert (dav.root / "there.txt").read_bytes() == b"new"


@pytest.mark.parametrize(
    ("remote", "path"),
    [
        ("elsewhere", "x.txt"),  # not in the configuration
        ("", "local:{outside}/x.txt"),  # rclone::local:... a connection string
        ("dav,url='http://127.0.0.1:9/'", "x.txt"),  # a configured name with options overridden
        ("disk", "{outside}/x.txt"),  # type = local
        ("wrapped", "x.txt"),  # an alias of a local folder
        ("dav", "in/../../x.txt"),  # '..' segments
        ("dav", "in/x\0.txt"),  # a control character
    ],
)
async def test_remotes_and_paths_outside_the_configuration_are_forbidden(
    dav: WebDav, tmp_path: Path, remote: str, path: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_bytes(b"the server's own disk")
    url = f"rclone:{remote}:{path.format(outside=outside)}"
    with pytest.raises(DriverError) as caught:
        await parse_remote(url, dav.config, rclone_binary())
    assert caught.value.reason is FailureReason.FORBIDDEN
    reader = RcloneSource(url, config=dav.config, binary=rclone_binary())
    with pytest.raises(DriverError) as caught:
        await reader.stat()
    assert caught.value.reason is FailureReason.FORBIDDEN

    order = order_for(b"overwritten")
    writer = RcloneDestination(url, config=dav.config, binary=rclone_binary(), overwrite=True)
    with pytest.raises(DriverError) as caught:
        await writer.open(writer.plan({}, order), order)
    assert caught.value.reason is FailureReason.FORBIDDEN
    assert (outside / "x.txt").read_bytes() == b"the server's own disk"
    assert sorted(entry.name for entry in outside.iterdir()) == ["x.txt"]
    assert sorted(entry.name for entry in dav.root.rglob("*")) == []


async def test_a_missing_source_file_is_not_found_for_good(dav: WebDav) -> None:
    for path in ("nothing.bin", "no/folder/nothing.bin"):
        reader = source(dav, path)
        with pytest.raises(DriverError) as caught:
            await reader.stat()
        assert caught.value.reason is FailureReason.NOT_FOUND
        assert caught.value.reason.kind is FailureKind.PERMANENT


async def test_a_server_gone_is_a_transient_failure_without_credentials(dav: WebDav) -> None:
    (dav.root / "data.bin").write_bytes(b"data")
    info = await source(dav, "data.bin").stat()
    await dav.stop()
    transient = {FailureReason.CONNECTION, FailureReason.SERVER_ERROR, FailureReason.TIMEOUT}

    with pytest.raises(DriverError) as caught:
        await source(dav, "data.bin").stat()
    assert caught.value.reason in transient
    assert caught.value.reason.kind is FailureKind.TRANSIENT

    with pytest.raises(DriverError) as caught:
        await collect(source(dav, "data.bin").read(0, info))
    assert caught.value.reason in transient

    writer = destination(dav, "out.bin", remote="davpw")
    order = order_for(b"data")
    with pytest.raises(DriverError) as caught:
        await writer.open(writer.plan({}, order), order)
    assert caught.value.reason in transient
    assert PASSWORD not in caught.value.message
    assert "\n" not in caught.value.message

    handle = writer.plan({}, order)
    with pytest.raises(DriverError) as caught:
        await writer.write(handle, 0, chunks_of(b"data"))
    assert caught.value.reason in transient
    assert PASSWORD not in caught.value.message


async def test_cancelling_a_write_kills_its_rclone(dav: WebDav) -> None:
    order = order_for(CONTENT)
    writer = destination(dav, "slow.bin")
    handle = await writer.open(writer.plan({}, order), order)
    forever = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield CONTENT[: 1 << 20]
        await forever.wait()
        yield b""  # never reached

    task = asyncio.create_task(writer.write(handle, 0, stalls()))
    await until(lambda: len(rclone_children("rcat")) == 1, "rclone rcat runs")
    [pid] = rclone_children("rcat")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(pid)
    assert rclone_children("rcat") == []
    assert not (dav.root / "slow.bin").exists()
    await writer.discard(handle)
    assert leftovers(dav.root) == []


def test_exit_codes_and_messages_are_classified() -> None:
    log = b'2026/01/02 03:04:05 ERROR : Failed: Put "https://bob:pw@host/x?sig=abc": 403 Forbidden\n'
    error = classify("rcat", 1, log)
    assert error.reason is FailureReason.FORBIDDEN
    assert "pw" not in error.message and "sig=abc" not in error.message
    assert classify("cat", 3, b"Failed to cat: directory not found").reason is FailureReason.NOT_FOUND
    assert classify("cat", 4, b"").reason is FailureReason.NOT_FOUND
    assert classify("cat", 5, b"Failed").reason is FailureReason.CONNECTION
    assert classify("cat", 1, b"dial tcp: i/o timeout").reason is FailureReason.TIMEOUT
    assert classify("cat", 1, b"something odd").reason is FailureReason.SERVER_ERROR


async def test_bytes_that_are_not_the_ones_ordered_are_never_published(dav: WebDav) -> None:
    order = Order(size=len(b"actual"), md5=md5_hex(b"ordered"))
    writer = destination(dav, "wrong.txt")
    handle = await writer.open(writer.plan({}, order), order)
    await writer.write(handle, 0, chunks_of(b"actual"))
    with pytest.raises(DriverError) as caught:
        await writer.finish(handle)
    assert caught.value.reason is FailureReason.CHECKSUM_MISMATCH
    assert not (dav.root / "wrong.txt").exists()
    assert leftovers(dav.root) == []


async def test_a_read_given_up_midway_leaves_no_rclone(dav: WebDav) -> None:
    (dav.root / "data.bin").write_bytes(CONTENT)
    reader = source(dav, "data.bin", chunk_size=1 << 16)
    chunks = reader.read(0, await reader.stat())
    assert isinstance(chunks, AsyncGenerator)
    assert len(await anext(chunks)) > 0
    [pid] = rclone_children("cat")
    await chunks.aclose()
    assert not alive(pid)
    assert rclone_children("cat") == []


async def test_a_file_an_earlier_attempt_published_is_taken_as_this_uploads_not_refused(dav: WebDav) -> None:
    order = order_for(CONTENT)
    first = destination(dav, "done.bin")
    handle = await first.open(first.plan({}, order), order)
    await first.write(handle, 0, chunks_of(CONTENT))
    await first.finish(handle)  # published; the runner "crashed" before it recorded the end
    again = destination(dav, "done.bin")
    planned = again.plan(handle, order)
    reopened = await again.open(planned, order)
    assert await again.offset(reopened) == len(CONTENT)
    published = await again.finish(reopened)
    assert (published.size, published.sha256) == (len(CONTENT), order.sha256)
    # A file of the same name that this upload did not write is still refused.
    stranger = destination(dav, "done.bin")
    other = order_for(b"another file")
    with pytest.raises(DriverError) as caught:
        await stranger.open(stranger.plan(handle, other), other)
    assert caught.value.reason is FailureReason.EXISTS


def test_a_status_in_a_name_is_no_status() -> None:
    missing = b"Failed to deletefile: dav:.x.datastore-4be55403dd90a6e0.partial is a directory or doesn't exist"
    assert classify("deletefile", 1, missing).reason is FailureReason.NOT_FOUND
    assert classify("copy", 1, b"HTTP error 403 (403 Forbidden)").reason is FailureReason.FORBIDDEN
