"""The staging layer on its own: background flush failures, the shared buffer budget."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest

from datastore.storage import staging

from .harness import until


def test_failed_background_flush_is_raised_when_the_file_is_closed() -> None:
    # fdatasync of a pipe fails (EINVAL): the error must not vanish in the flush thread.
    read_end, write_end = os.pipe()
    try:
        flusher = staging.Flusher(write_end)
        flusher.wrote(staging.FLUSH_WINDOW)
        with pytest.raises(OSError):
            flusher.close()
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize(
    ("md5", "sha256", "chunk"),
    [(True, True, False), (True, True, True), (True, False, False), (False, True, True), (False, False, False)],
    ids=["both", "both+chunk", "md5", "sha256+chunk", "none"],
)
async def test_append_with_fsync_keeps_every_byte_across_several_flush_windows(
    tmp_path: Path, md5: bool, sha256: bool, chunk: bool
) -> None:
    # Whatever digests the upload computes inline (a chunk's checksum besides), each sees every byte.
    block = os.urandom(1 << 20)
    count = 2 * (staging.FLUSH_WINDOW >> 20) + 3

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield block

    path = tmp_path / "upload.part"
    digests = staging.Digests.inline(md5=md5, sha256=sha256)
    chunk_hash = hashlib.sha256() if chunk else None
    await staging.append(
        body(), path, digests, limit=count << 20, chunk_size=1 << 20, fsync=True, chunk_hash=chunk_hash
    )

    whole = block * count
    assert digests.offset == path.stat().st_size == count << 20
    assert path.read_bytes() == whole
    assert digests.hexdigests() == (
        hashlib.md5(whole).hexdigest() if md5 else None,
        hashlib.sha256(whole).hexdigest() if sha256 else None,
    )
    if chunk_hash is not None:
        assert chunk_hash.hexdigest() == hashlib.sha256(whole).hexdigest()
    # Re-hashed from the disk (after a restart), the same digests.
    again = await staging.rehash(path, count << 20, md5=md5, sha256=sha256)
    assert again.hexdigests() == digests.hexdigests() and again.offset == digests.offset


async def test_silent_clients_do_not_keep_the_budget_from_others(tmp_path: Path) -> None:
    # Two slots, each taken by an upload that sent a piece and went silent: a third must still go through.
    budget = staging.BufferBudget(2)
    resume = asyncio.Event()
    block = os.urandom(64 << 10)
    chunk = 128 << 10
    stalled: list[asyncio.Event] = []

    async def slow(event: asyncio.Event) -> AsyncIterator[bytes]:
        yield block
        event.set()
        await resume.wait()
        yield block

    async def fast() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield block

    def upload(body: AsyncIterator[bytes], name: str, digests: staging.Digests) -> Coroutine[Any, Any, None]:
        return staging.append(
            body, tmp_path / name, digests, limit=1 << 20, chunk_size=chunk, fsync=False, budget=budget
        )

    slow_digests = [staging.Digests.inline(md5=True, sha256=True), staging.Digests.inline(md5=True, sha256=True)]
    slow_uploads: list[asyncio.Task[None]] = []
    for i, digests in enumerate(slow_digests):
        stalled.append(asyncio.Event())
        slow_uploads.append(asyncio.create_task(upload(slow(stalled[-1]), f"slow{i}.part", digests)))
        await stalled[-1].wait()
    fast_digests = staging.Digests.inline(md5=True, sha256=True)
    await asyncio.wait_for(upload(fast(), "fast.part", fast_digests), timeout=10)
    assert fast_digests.offset == (tmp_path / "fast.part").stat().st_size == 8 * len(block)

    resume.set()
    await asyncio.gather(*slow_uploads)
    for i, digests in enumerate(slow_digests):
        assert (tmp_path / f"slow{i}.part").read_bytes() == block * 2
        assert digests.sha256.hexdigest() == hashlib.sha256(block * 2).hexdigest()
    assert not budget.exhausted


async def test_a_late_flush_that_fails_fails_the_next_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A resumable request that does not end the file is answered before its fsync, which runs in
    # the background: an error it meets (which no later fsync would report) fails the next request.
    path = tmp_path / "upload.part"
    digests = staging.Digests.inline(md5=False, sha256=True)

    async def body(data: bytes) -> AsyncIterator[bytes]:
        yield data

    def failing_sync(fd: int) -> None:
        os.close(fd)
        raise OSError(errno.EIO, "the disk failed")

    monkeypatch.setattr(staging, "_sync_and_close", failing_sync)
    await staging.append(body(b"a" * 1000), path, digests, limit=3000, chunk_size=1 << 20, fsync=True, flush_late=True)
    assert digests.offset == 1000  # answered: the bytes are written, their flush runs on

    with pytest.raises(OSError, match="the disk failed"):
        await staging.append(body(b"b" * 1000), path, digests, limit=3000, chunk_size=1 << 20, fsync=True)
    assert digests.offset == 1000 and path.read_bytes() == b"a" * 1000


async def test_a_late_flush_that_ends_well_is_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "upload.part"
    digests = staging.Digests.inline(md5=True, sha256=False)

    async def body(data: bytes) -> AsyncIterator[bytes]:
        yield data

    await staging.append(body(b"a" * 1000), path, digests, limit=3000, chunk_size=1 << 20, fsync=True, flush_late=True)
    running = staging._LATE_FLUSHES.get(path)
    if running is not None:
        await asyncio.wrap_future(running)
    await until(lambda: path not in staging._LATE_FLUSHES, "the flush to be forgotten")
    # The next append builds on the durable bytes.
    await staging.append(body(b"b" * 1000), path, digests, limit=3000, chunk_size=1 << 20, fsync=True)
    assert path.read_bytes() == b"a" * 1000 + b"b" * 1000
    assert digests.hexdigests() == (hashlib.md5(path.read_bytes()).hexdigest(), None)
