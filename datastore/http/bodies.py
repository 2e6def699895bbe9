"""Request bodies, read as they arrive and bounded: in size, in silence, and in pace.

Every body the store reads goes through here: raw upload bodies (``POST``,
``PUT``, tus ``PATCH``), the file field of a ``multipart/form-data`` form,
and small whole bodies (manifests, token requests). Each read waits at most
``body_timeout`` seconds for the client, and a body must also average
``min_upload_rate`` bytes a second over every ``rate_window`` (:class:`Pace`):
a client that trickles a byte every few seconds would otherwise hold an
upload slot, a connection and a buffer for as long as it likes.

Failures are the store's errors: 408 for a silent or slow client, 400 for
bad framing, 400 ``IncompleteUpload`` for a connection that failed, 413 for
a body over its limit.

The bytes of upload bodies (raw bodies and form fields) are counted as they
arrive (``datastore_upload_received_bytes_total``); small whole bodies are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.helpers import parse_mimetype

from .. import metrics
from ..config import Settings
from ..errors import (
    BadRequest,
    DatastoreError,
    IncompleteUpload,
    PayloadTooLarge,
    RequestTimeout,
    TooManyManifests,
    UnsupportedMediaType,
)

T = TypeVar("T")

#: Room allowed for the multipart framing around a form's file.
FORM_OVERHEAD = 64 << 10


class Pace:
    """Refuses (408) a body that averages less than ``rate`` bytes a second over a ``window``.

    Only the time the store spends waiting for the client counts: while the
    upload waits for a buffer of the budget or for its writes (the store's
    own backpressure), the client is not being asked for bytes. So a reader
    times each read of the body (:meth:`read`). A client that sends a byte
    and then nothing is caught by the silence timeout instead. ``rate`` 0
    measures nothing.
    """

    __slots__ = ("_bytes", "_rate", "_waited", "_window")

    def __init__(self, rate: int, window: float) -> None:
        self._rate, self._window = rate, window
        self._waited = 0.0
        self._bytes = 0

    @classmethod
    def of(cls, settings: Settings) -> Pace:
        """The pace the settings ask of every body."""
        return cls(settings.min_upload_rate, settings.rate_window)

    async def read(self, read: Awaitable[bytes], timeout: float) -> bytes:
        """One read of the body (:func:`next_chunk`); RequestTimeout if the window it ends was too slow."""
        started = time.monotonic()
        chunk = await next_chunk(read, timeout)
        if not self._rate or not chunk:
            return chunk
        self._waited += time.monotonic() - started
        self._bytes += len(chunk)
        if self._waited >= self._window:
            if self._bytes < self._rate * self._waited:
                raise RequestTimeout(
                    f"the body came at {self._bytes / self._waited:.0f} bytes/s over {self._waited:.0f} s,"
                    f" less than the minimum of {self._rate} bytes/s"
                )
            self._waited, self._bytes = 0.0, 0
        return chunk


async def next_chunk(read: Awaitable[T], timeout: float) -> T:
    """One read of a body, bounded by ``timeout`` seconds of silence."""
    try:
        async with asyncio.timeout(timeout):
            return await read
    except TimeoutError:
        raise RequestTimeout(f"no data for {timeout:g} s") from None
    except DatastoreError:
        raise
    except ValueError as exc:  # aiohttp's multipart parser reports bad framing so
        raise BadRequest(f"malformed body: {exc}") from None
    except Exception as exc:  # any failure of the transport: the body is cut short
        raise IncompleteUpload(f"the connection failed: {exc}") from None


async def stream_chunks(request: web.Request, settings: Settings, *, upload: bool = True) -> AsyncIterator[bytes]:
    """The raw body, as it arrives; counted as an upload's bytes unless ``upload`` is false."""
    pace = Pace.of(settings)
    while True:
        chunk = await pace.read(request.content.readany(), settings.body_timeout)
        if not chunk:
            return
        if upload:
            metrics.count_received(len(chunk))
        yield chunk
        del chunk  # not kept alive while the next read waits


def check_form(request: web.Request) -> None:
    """400 unless ``request`` is a ``multipart/form-data`` body with a usable boundary."""
    mimetype = parse_mimetype(request.headers.get(hdrs.CONTENT_TYPE, ""))
    boundary = mimetype.parameters.get("boundary", "")
    if mimetype.subtype != "form-data" or not 0 < len(boundary) <= 70:
        raise BadRequest("a multipart/form-data body needs a boundary of 1 to 70 characters")


async def form_file_chunks(request: web.Request, settings: Settings) -> AsyncIterator[bytes]:
    """The bytes of the first file field of a ``multipart/form-data`` body that :func:`check_form` passed."""
    reader = await request.multipart()
    pace = Pace.of(settings)
    timeout, chunk_size = settings.body_timeout, settings.chunk_size
    skipped = 0
    while True:
        part = await next_chunk(reader.next(), timeout)
        if part is None:
            raise BadRequest("the form has no file field")
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart forms are not supported")
        if part.filename is not None:
            while chunk := await pace.read(part.read_chunk(chunk_size), timeout):
                metrics.count_received(len(chunk))
                yield chunk
            return
        # A plain field before the file: skip it, within the framing allowance.
        while chunk := await pace.read(part.read_chunk(chunk_size), timeout):
            metrics.count_received(len(chunk))
            skipped += len(chunk)
            if skipped > FORM_OVERHEAD:
                raise PayloadTooLarge("the form's other fields are too large")


class MemoryBudget:
    """Bytes of whole bodies held in memory at once (manifests being read, or waiting to be parsed).

    Bodies take their share as their bytes arrive, so a client that trickles
    holds only what it sent; one that would go past the budget gets 503 with
    ``Retry-After``, and nothing waits unbounded with a body in memory.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @contextlib.contextmanager
    def holding(self) -> Iterator[Callable[[int], None]]:
        """A ``take(size)`` that charges this budget, all of it given back on leaving."""
        taken = 0

        def take(size: int) -> None:
            nonlocal taken
            if self.used + size > self.limit:
                raise TooManyManifests(f"the store holds {self.used} bytes of manifests, near its limit; try again")
            self.used += size
            taken += size

        try:
            yield take
        finally:
            self.used -= taken


async def read_bounded(
    request: web.Request, limit: int, settings: Settings, take: Callable[[int], None] | None = None
) -> bytes:
    """The whole (small) body, refusing more than ``limit`` bytes; ``take`` charges each piece to a budget."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the body is {length} bytes, more than the limit of {limit}")
    parts: list[bytes] = []
    total = 0
    async for chunk in stream_chunks(request, settings, upload=False):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"the body is more than the limit of {limit} bytes")
        if take is not None:
            take(len(chunk))
        parts.append(chunk)
    return b"".join(parts)


async def read_json_object(
    request: web.Request, limit: int, settings: Settings, *, what: str | None = None
) -> dict[str, Any]:
    """A small JSON object body of the control plane (at most ``limit`` bytes), else 400. With ``what``
    (what the body is, for the message) it must say ``application/json`` (415); without, an empty body
    is an empty object."""
    if what is not None and request.content_type != "application/json":
        raise UnsupportedMediaType(f"send {what} as application/json")
    body = await read_bounded(request, limit, settings)
    if what is None and not body.strip():
        return {}
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("the body is not JSON") from None
    if not isinstance(document, dict):
        raise BadRequest("the body must be a JSON object")
    return document
