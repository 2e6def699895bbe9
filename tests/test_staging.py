"""The staging layer on its own: what a background flush failure does to an upload."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from datastore import staging


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


async def test_append_with_fsync_keeps_every_byte_across_several_flush_windows(tmp_path: Path) -> None:
    block = os.urandom(1 << 20)
    count = 2 * (staging.FLUSH_WINDOW >> 20) + 3

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield block

    path = tmp_path / "upload.part"
    digests = staging.Digests()
    await staging.append(body(), path, digests, limit=count << 20, chunk_size=1 << 20, fsync=True)

    assert digests.offset == path.stat().st_size == count << 20
    assert path.read_bytes() == block * count
    assert digests.md5.hexdigest() == hashlib.md5(block * count).hexdigest()
    assert digests.sha256.hexdigest() == hashlib.sha256(block * count).hexdigest()
