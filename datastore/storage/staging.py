"""Staging files: where upload bytes wait, hashed as they arrive, until published.

Each file of a transfer has one staging file in the state directory
(``KEY.NUM.part``), on the store's filesystem but outside every served
folder. This module owns the disk side of it, with one invariant: when
:func:`append` returns or raises, the staging file holds exactly
``digests.offset`` bytes, and ``digests`` is the digest of them of each kind
the upload computes inline (those its verification needs: :class:`Digests`).
That is what lets a resumable upload continue after a dropped connection,
and (re-hashing the staged prefix, :func:`rehash`) after a crash.

Network reads overlap disk writes and hashing, and the digests overlap each
other: while one buffer is written and hashed by each digest in worker
threads at once (hashlib releases the GIL on large buffers), the next one is
received. With ``fsync``, making the bytes durable overlaps receiving them
too (:class:`Flusher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from ..errors import NotEnoughSpace, PayloadTooLarge
from ..security.logsafe import redact

log = logging.getLogger(__name__)

T = TypeVar("T")

_STAGING_NAME = re.compile(r"^(?P<key>[0-9a-f]{40})\.(?P<num>[0-9]{1,9})\.part$")
_REHASH_BLOCK = 8 << 20
#: A staging file being appended to is flushed to disk in the background every this many bytes.
FLUSH_WINDOW = 16 << 20


@dataclass(slots=True)
class Digests:
    """The running digests of the first ``offset`` bytes of a staging file: MD5, SHA-256, both or
    neither (``None``: not computed while the bytes arrive; see :meth:`inline`)."""

    md5: Any = None
    sha256: Any = None
    offset: int = 0

    @classmethod
    def inline(cls, *, md5: bool, sha256: bool, offset: int = 0) -> Digests:
        """Fresh digests of the kinds asked for: those an upload's verification needs, computed as
        its bytes arrive (the others are computed once it is published, off the request's path)."""
        return cls(hashlib.md5(usedforsecurity=False) if md5 else None, hashlib.sha256() if sha256 else None, offset)

    @property
    def hashes(self) -> tuple[Any, ...]:
        """The hash objects being computed."""
        return tuple(h for h in (self.md5, self.sha256) if h is not None)

    def hexdigests(self) -> tuple[str | None, str | None]:
        """The MD5 and SHA-256 so far (lower-case hex), ``None`` for a kind not computed."""
        return _hex(self.md5), _hex(self.sha256)

    def copy(self) -> Digests:
        """An independent copy (to roll back a chunk that failed its checksum)."""
        return Digests(_copy(self.md5), _copy(self.sha256), self.offset)

    def restore(self, earlier: Digests) -> None:
        """Go back to the state of ``earlier`` (a copy taken before a rejected chunk)."""
        self.md5, self.sha256, self.offset = _copy(earlier.md5), _copy(earlier.sha256), earlier.offset


def _copy(digest: Any) -> Any:
    return digest.copy() if digest is not None else None


def _hex(digest: Any) -> str | None:
    return str(digest.hexdigest()) if digest is not None else None


class ReadFailed(Exception):
    """Wraps the failure of the body's iterator, after the bytes before it were kept."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class BufferBudget:
    """How many buffers of received upload bytes may wait in memory, all uploads together.

    Each buffer of an upload (about ``chunk_size`` bytes, at most one read
    more) holds a slot from before its first byte is read until it has been
    written and hashed. An upload that finds no slot free reads nothing
    meanwhile: the rest of its body waits in the kernel's socket buffer, and
    the server's memory stays bounded however many uploads run. With every
    upload fed as fast as the threads hash and write, fewer slots cost no
    throughput. A slot is never kept for a silent client while others wait
    (:data:`IDLE_STORE`).
    """

    __slots__ = ("_slots",)

    def __init__(self, slots: int) -> None:
        self._slots = asyncio.Semaphore(max(2, slots))

    async def acquire(self) -> None:
        """Take a slot, waiting for one to be released if need be."""
        await self._slots.acquire()

    def release(self, _: object = None) -> None:
        """Give a slot back (also usable as a future's done callback)."""
        self._slots.release()

    @property
    def exhausted(self) -> bool:
        """Whether an upload asking for a slot now would have to wait."""
        return self._slots.locked()


#: Seconds an upload holding a slot may wait for its client's next bytes
#: while other uploads wait for a slot; then what it has is stored and the slot freed.
IDLE_STORE = 0.1


async def append(
    chunks: AsyncIterator[bytes],
    path: Path,
    digests: Digests,
    *,
    limit: int,
    chunk_size: int,
    fsync: bool,
    chunk_hash: Any = None,
    budget: BufferBudget | None = None,
    flush_late: bool = False,
) -> None:
    """Append ``chunks`` to ``path`` at ``digests.offset``, hashing as they are written.

    Refuses to grow the file past ``limit`` bytes (PayloadTooLarge). If the
    iterator fails (a dropped connection, a slow client), the bytes that
    arrived before are still written and :class:`ReadFailed` is raised with
    the cause. If the disk (or the quota) is full, NotEnoughSpace.
    ``chunk_hash``, if given, also sees every byte of this call. With a
    ``budget``, each buffer of about ``chunk_size`` bytes holds one of its
    slots until it is stored. Whatever happens, the file ends with exactly
    ``digests.offset`` bytes, flushed (and fsync'd with ``fsync``). With
    ``flush_late`` (a resumable upload's request that does not end the file)
    the fsync runs after the call returns, in the background; the next append
    to the file waits for it (and raises its error) before it starts.
    """
    with disk_full_refused():
        await _append(
            chunks,
            path,
            digests,
            limit=limit,
            chunk_size=chunk_size,
            fsync=fsync,
            chunk_hash=chunk_hash,
            budget=budget,
            flush_late=flush_late,
        )


@contextlib.contextmanager
def disk_full_refused() -> Iterator[None]:
    """Turn a full disk or quota (ENOSPC, EDQUOT) met while writing into NotEnoughSpace."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NotEnoughSpace("the disk filled up during the upload") from None
        raise


async def _append(
    chunks: AsyncIterator[bytes],
    path: Path,
    digests: Digests,
    *,
    limit: int,
    chunk_size: int,
    fsync: bool,
    chunk_hash: Any,
    budget: BufferBudget | None,
    flush_late: bool = False,
) -> None:
    loop = asyncio.get_running_loop()
    #: The file, opened by the first store; a small body that ends before one is written, hashed
    #: and settled in one step (one thread call instead of three).
    handle: IO[bytes] | None = None
    flusher: Flusher | None = None
    pending: asyncio.Future[None] | None = None
    #: The received bytes not yet handed to a store, kept as they arrived (no copy).
    buffer: list[bytes] = []
    buffered = 0
    #: Whether ``buffer`` holds a slot of ``budget``.
    holding = False
    #: While a read waits: the timer of :func:`on_silence`, and the store it may have started.
    silence: asyncio.TimerHandle | None = None
    idle_store: asyncio.Future[None] | None = None

    async def store() -> None:
        """Hand the buffer, and its slot, to a store in the threads once the previous one has ended."""
        nonlocal pending, buffer, buffered, holding, handle, flusher
        if buffer:
            if pending is not None:
                await uncancellable(pending)
            if handle is None:
                handle = await _open_at(path, digests.offset)
                flusher = Flusher(handle.fileno()) if fsync else None
            pending = asyncio.ensure_future(_store(loop, handle, flusher, buffer, digests, chunk_hash))
            if holding and budget is not None:
                pending.add_done_callback(budget.release)
                holding = False
            buffer, buffered = [], 0
        elif holding and budget is not None:
            budget.release()
            holding = False

    def on_silence() -> None:
        """The client sent nothing for IDLE_STORE: if others wait for a slot, store what it sent, freeing its slot."""
        nonlocal silence, idle_store
        assert budget is not None
        if holding and budget.exhausted:
            silence, idle_store = None, asyncio.ensure_future(store())
        else:
            silence = loop.call_later(IDLE_STORE, on_silence)

    async def after_silence() -> None:
        """Wait for the store started during the last read, if any, before touching the buffer again."""
        nonlocal idle_store
        if idle_store is not None:
            started, idle_store = idle_store, None
            await uncancellable(started)

    try:
        # The previous append's late flush must have ended well before this one builds on it.
        await uncancellable(_late_flush_of(path))
        total = digests.offset
        read_failure: BaseException | None = None
        iterator = chunks.__aiter__()
        while True:
            if budget is not None and not holding:
                await budget.acquire()
                holding = True
            if budget is not None:
                silence = loop.call_later(IDLE_STORE, on_silence)
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:  # the body failed: keep what arrived before it
                read_failure = exc
                break
            finally:
                if silence is not None:
                    silence.cancel()
                    silence = None
            await after_silence()
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"more than the {limit} bytes declared")
            if budget is not None and not holding:
                await budget.acquire()
                holding = True
            buffer.append(chunk)
            buffered += len(chunk)
            del chunk
            if buffered >= chunk_size:
                await store()
        await after_silence()
        if handle is None and buffered <= _SERIAL_STORE:
            data, buffer, buffered = buffer, [], 0
            await uncancellable(_store_whole(loop, path, data, digests, chunk_hash, fsync and not flush_late))
            if fsync and flush_late:
                _flush_late(path)
        else:
            await store()
        if pending is not None:
            await uncancellable(pending)
            pending = None
        if read_failure is not None:
            raise ReadFailed(read_failure)
    finally:
        with contextlib.suppress(Exception):
            await after_silence()
        if holding and budget is not None:
            budget.release()
        # A write runs on in its thread even if this task is cancelled: never
        # settle the file (nor let anyone read digests) before it has ended.
        if pending is not None:
            with contextlib.suppress(Exception):
                await uncancellable(pending)
        if handle is not None:
            await uncancellable(asyncio.to_thread(_settle, handle, digests.offset, fsync and not flush_late, flusher))
            if fsync and flush_late:
                _flush_late(path)


async def uncancellable(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if this task is cancelled meanwhile.

    Work in a thread cannot be stopped, and what it changes (a file, the
    running digests) must be settled before anyone else looks. A
    cancellation that arrives meanwhile is raised once the work is done.
    """
    future = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError()
        return result


async def rehash(path: Path, length: int, *, md5: bool, sha256: bool) -> Digests:
    """The digests (of the kinds asked for) of the first ``length`` bytes of ``path`` (after a restart)."""
    digests = Digests.inline(md5=md5, sha256=sha256, offset=length)
    if not digests.hashes:
        return digests
    started = time.monotonic()
    await asyncio.to_thread(_rehash, path, digests)
    elapsed = time.monotonic() - started
    log.info("re-hashed %d staged bytes of %s in %.3f s", length, redact(path.name), elapsed)
    return digests


async def truncate(path: Path, length: int, fsync: bool) -> None:
    """Cut ``path`` back to ``length`` bytes (a chunk that failed its checksum)."""
    await asyncio.to_thread(_truncate, path, length, fsync)


def publish(staging: Path, target: Path, fsync: bool) -> None:
    """Move the verified ``staging`` file to ``target`` atomically.

    ``os.replace`` is the only step that makes a file visible. If the staging
    directory is on another filesystem, the file is first copied beside the
    target under a hidden name (which no valid file name can reach) and then
    replaced. With ``fsync`` the directory entry is made durable too.
    """
    try:
        os.replace(staging, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
        try:
            shutil.copyfile(staging, partial)
            if fsync:
                with partial.open("rb+") as handle:
                    os.fsync(handle.fileno())
            os.replace(partial, target)
        finally:
            unlink_quietly(partial)
        unlink_quietly(staging)
    if fsync:
        directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def reconcile(staging_dir: Path, live: dict[tuple[str, int], tuple[int, bool]]) -> dict[tuple[str, int], int]:
    """After a restart, make the staging directory agree with the registry.

    ``live`` maps each (key, num) that may hold staged bytes to the offset
    the registry recorded and whether a checksummed chunk was being
    appended. Staging files of nothing live are removed. A live file keeps
    the bytes really on disk (fsync'd now), except that a chunk still
    awaiting its checksum is cut back to the recorded offset. Returns the
    offset now on disk for every live (key, num).
    """
    staging_dir.mkdir(parents=True, exist_ok=True)
    offsets = dict.fromkeys(live, 0)
    for entry in os.scandir(staging_dir):
        match = _STAGING_NAME.match(entry.name)
        place = (match["key"], int(match["num"])) if match else None
        if place is None or place not in live:
            unlink_quietly(Path(entry.path))
            continue
        offsets[place] = _reconcile_one(Path(entry.path), *live[place])
    return offsets


def reconcile_files(staging_dir: Path, files: dict[tuple[str, int], tuple[int, bool]]) -> dict[tuple[str, int], int]:
    """As :func:`reconcile`, for the staging files of ``files`` only (a worker died); others are left alone."""
    offsets = {}
    for (key, num), (recorded, verifying) in files.items():
        try:
            offsets[(key, num)] = _reconcile_one(staging_dir / f"{key}.{num}.part", recorded, verifying)
        except FileNotFoundError:
            offsets[(key, num)] = 0
    return offsets


def _reconcile_one(path: Path, recorded: int, verifying: bool) -> int:
    size = path.stat().st_size
    offset = min(size, recorded) if verifying else size
    _truncate(path, offset, fsync=True)
    return offset


def unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it exists; log anything but its absence."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", redact(path.name), redact(str(exc)))


async def discard(paths: Iterable[Path]) -> None:
    """Remove staging files in a worker thread."""
    await asyncio.to_thread(_unlink_all, list(paths))


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        unlink_quietly(path)


async def _open_at(path: Path, offset: int) -> IO[bytes]:
    """Open ``path`` for writing at ``offset`` in a thread, safely against cancellation.

    If the request is cancelled while the thread opens the file, the thread
    is waited for and the file closed before the cancellation goes on, so
    no descriptor leaks.
    """
    opening = asyncio.ensure_future(asyncio.to_thread(_open_for_append, path, offset))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            handle = await opening
            await asyncio.to_thread(handle.close)
        raise


def _open_for_append(path: Path, offset: int) -> IO[bytes]:
    if offset == 0:
        try:
            return open(path, "wb", buffering=0)
        except FileNotFoundError:  # the staging folder is made when first needed
            path.parent.mkdir(parents=True, exist_ok=True)
            return open(path, "wb", buffering=0)
    handle = open(path, "r+b", buffering=0)  # noqa: SIM115 - closed by _settle
    try:
        if os.fstat(handle.fileno()).st_size < offset:
            raise OSError(errno.EIO, f"staging file {path.name} is shorter than its recorded offset")
        handle.truncate(offset)
        handle.seek(offset)
    except BaseException:
        handle.close()
        raise
    return handle


async def _store(
    loop: asyncio.AbstractEventLoop,
    handle: IO[bytes],
    flusher: Flusher | None,
    data: list[bytes],
    digests: Digests,
    chunk_hash: Any,
) -> None:
    """Write the pieces of ``data`` and hash them with every digest, all in parallel threads (a small
    buffer: in one thread, one after the other, which costs less than handing it to three).

    If the write fails, the digests go back to the last byte written.
    """
    before = digests.copy()
    size = sum(map(len, data))
    hashes = (*digests.hashes, *([chunk_hash] if chunk_hash is not None else []))
    try:
        if size <= _SERIAL_STORE or not hashes:
            await loop.run_in_executor(None, _write_and_hash, handle, data, flusher, hashes)
        else:
            # The write in one thread, each digest in another; with three, SHA-256 and the chunk's
            # checksum share one (two SHA-256 take about as long as one MD5).
            groups = [hashes[:1], hashes[1:]] if len(hashes) == 3 else [(h,) for h in hashes]
            for result in await asyncio.gather(
                loop.run_in_executor(None, _write_all, handle, data, flusher),
                *(loop.run_in_executor(None, _update_all, group, data) for group in groups),
                return_exceptions=True,
            ):
                if isinstance(result, BaseException):
                    raise result
    except BaseException:
        digests.restore(before)
        raise
    digests.offset += size


async def _store_whole(
    loop: asyncio.AbstractEventLoop, path: Path, data: list[bytes], digests: Digests, chunk_hash: Any, fsync: bool
) -> None:
    """Open ``path`` at ``digests.offset``, write and hash ``data``, settle and close: one thread call.
    If the write fails, the file and the digests stay as they were."""
    before = digests.copy()
    hashes = (*digests.hashes, chunk_hash)
    try:
        await loop.run_in_executor(None, _write_whole, path, digests.offset, data, hashes, fsync)
    except BaseException:
        digests.restore(before)
        raise
    digests.offset += sum(map(len, data))


def _write_whole(path: Path, offset: int, data: list[bytes], hashes: tuple[Any, ...], fsync: bool) -> None:
    handle = _open_for_append(path, offset)
    end = offset
    try:
        _update_all(hashes, data)
        _write_all(handle, data, None)
        end += sum(map(len, data))
    except BaseException:
        _settle(handle, offset, fsync, None)
        raise
    try:
        _settle(handle, end, fsync, None)
    except BaseException:
        # The bytes are written but not made durable: the caller keeps the digests of before, so the
        # file goes back to where they stand (best effort; the next append cuts it there anyway).
        with contextlib.suppress(OSError):
            _truncate(path, offset, fsync=False)
        raise


#: Buffers up to this size are written and hashed in one thread.
_SERIAL_STORE = 64 << 10


def _write_and_hash(handle: IO[bytes], data: list[bytes], flusher: Flusher | None, hashes: tuple[Any, ...]) -> None:
    _write_all(handle, data, flusher)
    _update_all(hashes, data)


#: Most pieces one ``writev`` call takes (Linux's IOV_MAX).
_WRITEV_MAX = 1024


def _write_all(handle: IO[bytes], data: list[bytes], flusher: Flusher | None) -> None:
    """Write the pieces in order with ``writev``, going on after short writes."""
    fd = handle.fileno()
    views = [memoryview(piece) for piece in data if piece]
    first = 0
    while first < len(views):
        written = os.writev(fd, views[first : first + _WRITEV_MAX])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]
    if flusher is not None:
        flusher.wrote(sum(map(len, data)))


class Flusher:
    """Makes a growing file durable while it grows, so that its final ``fsync`` has little left to do.

    Otherwise a whole upload waits in the page cache (background writeback
    starts only at a tenth of memory) and the ``fsync`` before the answer
    writes all of it, and flushes the disk's cache, while the client waits:
    a third of the time of a 1 GiB upload. Instead, each time
    :data:`FLUSH_WINDOW` more bytes have been written, an ``fdatasync`` of
    the file is started in a background thread, unless the previous one is
    still running. Writes go on meanwhile. :meth:`close` waits for the last
    one and raises its error, because a write error is reported to one
    ``fsync`` only and the final one might not see it.
    """

    __slots__ = ("_fd", "_running", "_unflushed")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._unflushed = 0
        self._running: Future[None] | None = None

    def wrote(self, count: int) -> None:
        """Note ``count`` more bytes written; start a flush if a window is full and none is running."""
        self._unflushed += count
        if self._unflushed < FLUSH_WINDOW or (self._running is not None and not self._running.done()):
            return
        self._check()
        self._unflushed = 0
        self._running = _FLUSH_POOL.submit(os.fdatasync, self._fd)

    def close(self) -> None:
        """Wait for the flush that is running, if any; raise its error. Call before closing the file."""
        if self._running is not None:
            wait([self._running])
            self._check()

    def _check(self) -> None:
        if self._running is not None:
            running, self._running = self._running, None
            running.result()


#: Background flushes of all uploads share these threads (started on first use).
_FLUSH_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="flush")


def _update_all(hashes: tuple[Any, ...], data: list[bytes]) -> None:
    for digest in hashes:
        if digest is not None:
            for piece in data:
                digest.update(piece)


#: The staging files whose last append is made durable in the background (``flush_late``): the
#: next append to the file, or its publish, waits for it and raises its error (a write error is
#: reported to one ``fsync`` only: the next one, on another descriptor, might not see it).
_LATE_FLUSHES: dict[Path, Future[None]] = {}


def _flush_late(path: Path) -> None:
    """Start making ``path`` durable in the background, on a descriptor of its own. A flush that
    ends well is forgotten; one that fails waits for the next append to raise its error."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        failed: Future[None] = Future()
        failed.set_exception(exc)
        _LATE_FLUSHES[path] = failed
        return
    running = _LATE_FLUSHES[path] = _FLUSH_POOL.submit(_sync_and_close, fd)

    def forget(done: Future[None]) -> None:
        if not done.exception() and _LATE_FLUSHES.get(path) is done:
            _LATE_FLUSHES.pop(path, None)

    running.add_done_callback(forget)


def _sync_and_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


async def _late_flush_of(path: Path) -> None:
    """Wait for the late flush of ``path``'s last append, if one runs or ended unseen; raise its error."""
    running = _LATE_FLUSHES.pop(path, None)
    if running is not None:
        await asyncio.wrap_future(running)


def _settle(handle: IO[bytes], offset: int, fsync: bool, flusher: Flusher | None) -> None:
    try:
        if flusher is not None:
            flusher.close()
        # A write that failed half-way may have left bytes past the last hashed one.
        handle.truncate(offset)
        if fsync:
            os.fsync(handle.fileno())
    finally:
        handle.close()


def _truncate(path: Path, length: int, fsync: bool) -> None:
    if length == 0 and not path.exists():
        return  # never staged (its first bytes were refused before they were stored): nothing to cut
    with open(path, "r+b") as handle:
        handle.truncate(length)
        if fsync:
            os.fsync(handle.fileno())


def _rehash(path: Path, digests: Digests) -> None:
    """Bring ``digests`` (fresh) to the first ``digests.offset`` bytes of ``path``, each kind in its
    own thread (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="rehash") as pool:
        for running in [pool.submit(_hash_prefix, path, digests.offset, h) for h in digests.hashes]:
            running.result()


def _hash_prefix(path: Path, length: int, digest: Any) -> Any:
    with open(path, "rb") as handle:
        remaining = length
        while remaining:
            block = handle.read(min(_REHASH_BLOCK, remaining))
            if not block:
                raise OSError(errno.EIO, f"staging file {path.name} is shorter than its recorded offset")
            digest.update(block)
            remaining -= len(block)
    return digest
