"""What every driver offers the runner: a :class:`Source` it reads from an offset, a
:class:`Destination` it writes to from the offset the destination holds, and the errors both raise,
classified by :class:`~datastore.jobs.states.FailureReason` (CS3's "datadriver").

The runner, not a driver, owns the job: it persists a destination's :class:`Handle` before each call
that may create something remote (:meth:`Destination.plan` gives the intent, :meth:`Destination.open`
the result), counts the bytes flowing from :meth:`Source.read` into :meth:`Destination.write`,
watches them for stalls, limits their rate, and checks the digests :meth:`Destination.finish`
reports against the source's. A driver never logs credentials or full URLs with secrets in them.

One attempt at a file, as the runner makes it::

    info = await source.stat()
    handle = destination.plan(order)            # persisted (the intent)
    handle = await destination.open(handle, order)   # persisted (what now exists remotely)
    offset = await destination.offset(handle)
    offset = await destination.write(handle, offset, source.read(offset, info))
    published = await destination.finish(handle)

and after a crash or a failed attempt the next one starts again from ``plan`` with the handle it
persisted last: ``open`` finds what the earlier attempt created (or creates it if the intent never
reached the other side), ``offset`` says how far it got, so no byte is sent twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..states import FailureReason

#: A destination's resume state: JSON-able, persisted by the runner with the file, opaque to it.
Handle = dict[str, Any]


class DriverError(Exception):
    """An attempt failed for ``reason`` (whose ``kind`` decides whether it is retried); the message is
    one line for the job's status, without credentials."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a source says of the file: its size, a validator that changes whenever its bytes do (a
    strong ETag, or Last-Modified with the size), and the digests it states (lowercase hex; None when
    it states none)."""

    size: int
    validator: str | None = None
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class Order:
    """What a destination is asked to hold: ``size`` bytes under its URL, and the digests it should
    verify them against itself where it can (None: unknown before the bytes have flowed)."""

    size: int
    md5: str | None = None
    sha256: str | None = None
    #: The source's validator: a destination that already holds a partial file written from another
    #: version must not resume it (the runner compares; drivers keep it in the handle if they like).
    validator: str | None = None


@dataclass(frozen=True, slots=True)
class Published:
    """A destination's word on the file it now holds: size and the digests it computed (None where the
    destination computes none; the runner then verifies what it can)."""

    size: int
    md5: str | None = None
    sha256: str | None = None


class Source(Protocol):
    """One file to read: ``stat`` then ``read`` from any offset, as often as the runner asks."""

    async def stat(self) -> SourceInfo:
        """The file's size, validator and digests. DriverError NOT_FOUND, FORBIDDEN, ..."""
        ...

    def read(self, offset: int, info: SourceInfo) -> AsyncIterator[bytes]:
        """The bytes from ``offset`` to the end, in chunks. If the source no longer is the version
        ``info`` describes (its validator changed), DriverError SOURCE_CHANGED before any byte."""
        ...

    async def close(self) -> None:
        """Release connections or processes."""
        ...


class Destination(Protocol):
    """One file to write, resumable from the offset the destination holds."""

    def plan(self, handle: Handle, order: Order) -> Handle:
        """The intent of the next :meth:`open`, made without any external call (an idempotency key, a
        temporary name), given the handle persisted last (empty the first time). The runner persists it
        before calling :meth:`open`."""
        ...

    async def open(self, handle: Handle, order: Order) -> Handle:
        """Create, or find again, the destination's upload for ``order`` as ``handle`` planned it; the
        handle to persist. If the handle names an upload that no longer exists or was written from
        another source version, start a new one (from offset 0)."""
        ...

    async def offset(self, handle: Handle) -> int:
        """How many bytes the destination holds for this upload (its resume point)."""
        ...

    async def write(self, handle: Handle, offset: int, chunks: AsyncIterator[bytes]) -> int:
        """Append ``chunks`` at ``offset``; the offset reached. When the last byte has arrived the
        destination verifies and publishes the file (or raises CHECKSUM_MISMATCH, SIZE_MISMATCH)."""
        ...

    async def finish(self, handle: Handle) -> Published:
        """The published file's size and digests (after :meth:`write` reached the size)."""
        ...

    async def discard(self, handle: Handle) -> None:
        """Give up this upload: partial bytes go (the source changed, or the job was cleared)."""
        ...

    async def close(self) -> None:
        """Release connections or processes."""
        ...
