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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.helpers import parse_mimetype

from .config import Settings
from .errors import BadRequest, DatastoreError, IncompleteUpload, PayloadTooLarge, RequestTimeout

T = TypeVar("T")

#: Room allowed for the multipart framing around a form's file.
FORM_OVERHEAD = 64 << 10


class Pace:
    """Refuses (408) a body that averages less than ``rate`` bytes a second over a ``window``.

    Measured when bytes arrive, so a client that sends a byte and then
    nothing is caught by the silence timeout instead. ``rate`` 0 measures
    nothing.
    """

    __slots__ = ("_bytes", "_rate", "_start", "_window")

    def __init__(self, rate: int, window: float) -> None:
        self._rate, self._window = rate, window
        self._start = time.monotonic()
        self._bytes = 0

    @classmethod
    def of(cls, settings: Settings) -> Pace:
        """The pace the settings ask of every body."""
        return cls(settings.min_upload_rate, settings.rate_window)

    def arrived(self, size: int) -> None:
        """``size`` more bytes came; RequestTimeout if the window that just ended was too slow."""
        if not self._rate:
            return
        self._bytes += size
        now = time.monotonic()
        elapsed = now - self._start
        if elapsed < self._window:
            return
        if self._bytes < self._rate * elapsed:
            raise RequestTimeout(
                f"the body came at {self._bytes / elapsed:.0f} bytes/s over {elapsed:.0f} s,"
                f" less than the minimum of {self._rate} bytes/s"
            )
        self._start, self._bytes = now, 0


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


async def stream_chunks(request: web.Request, settings: Settings) -> AsyncIterator[bytes]:
    """The raw body, as it arrives."""
    pace = Pace.of(settings)
    while True:
        chunk = await next_chunk(request.content.readany(), settings.body_timeout)
        if not chunk:
            return
        pace.arrived(len(chunk))
        yield chunk
        del chunk  # not kept alive while the next read waits


def check_form(request: web.Request) -> None:
    """400 unless ``request`` is a ``multipart/form-data`` body with a usable boundary."""
    mimetype = parse_mimetype(request.headers.get(hdrs.CONTENT_TYPE, ""))
    boundary = mimetype.parameters.get("boundary", "")
    if mimetype.subtype != "form-data" or not 0 < len(boundary) <= 70:
        raise BadRequest("a multipart/form-data body needs a boundary of 1 to 70 characters")


async def form_file_chunks(request: web.Request, settings: Settings) -> AsyncIterator[bytes]:
    """The bytes of the first file field of a ``multipart/form-data`` body (see :func:`check_form`)."""
    check_form(request)
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
            while chunk := await next_chunk(part.read_chunk(chunk_size), timeout):
                pace.arrived(len(chunk))
                yield chunk
            return
        # A plain field before the file: skip it, within the framing allowance.
        while chunk := await next_chunk(part.read_chunk(chunk_size), timeout):
            pace.arrived(len(chunk))
            skipped += len(chunk)
            if skipped > FORM_OVERHEAD:
                raise PayloadTooLarge("the form's other fields are too large")


async def read_bounded(request: web.Request, limit: int, settings: Settings) -> bytes:
    """The whole (small) body, refusing more than ``limit`` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the body is {length} bytes, more than the limit of {limit}")
    parts: list[bytes] = []
    total = 0
    async for chunk in stream_chunks(request, settings):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"the body is more than the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)
