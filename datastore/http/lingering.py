"""Lingering close: how a connection ends after the store answered a request whose body it did not read.

The store often answers before a request's body has all arrived: a refusal decided from the headers
(401, 403, 404, 410, 411, 413, a size that does not match the manifest), a body cut short by a limit
(408, 413), or an upload stopped from elsewhere (a cancellation on another node: 410; a newer tus
PATCH: 409). HTTP allows that, but then the server must read the rest of the body or close the
connection after sending the answer (RFC 9112, section 9.3); and closing a socket whose receive
buffer still holds unread bytes makes the kernel send a reset, which can destroy the answer before
the client (or a balancer in front of the node, which then answers 502) has read it.

:func:`lingering_middleware` does what nginx and Apache do: when a request's body is still arriving
after its handler answered, the answer says ``Connection: close`` and is written at once, the write
side is shut (the client sees the end of the answer without waiting), and what the client still
sends is read and dropped until it stops or a bound is reached (:data:`LINGER_TIME`,
:data:`LINGER_SILENCE`, :data:`LINGER_BYTES`); then the connection is closed. A client cannot hold a
connection this way for longer than the bounds, however it trickles.

A body that has all arrived by then (its last bytes already in the buffer) is dropped at once and
the connection stays open for the next request, as before. Answers that no middleware sees
(aiohttp's own, an ``Expect: 100-continue`` refusal) are left to aiohttp's own lingering, which is
given the same time bound (:data:`LINGER_TIME`, the ``lingering_time`` of ``server.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.streams import StreamReader

log = logging.getLogger(__name__)

#: Seconds a connection lingers at most after such an answer. Long enough for a client (or a
#: balancer) to read the answer, and for a client that reads only once it has sent everything to
#: send a good part of it; short enough that a client trickling bytes cannot keep the connection
#: (and its place under ``max_connections``) for long. nginx allows 30 s, aiohttp 10 s, Apache 2 s
#: between reads.
LINGER_TIME = 5.0
#: Seconds without a byte that end the lingering early: a client that stopped sending has nothing
#: in flight that a close could turn into a reset (Apache's wait between two reads).
LINGER_SILENCE = 2.0
#: Bytes read and dropped at most: a fast client's remaining body is not worth more of the node's
#: bandwidth than this (64 MiB is about LINGER_TIME at 100 Mbit/s); past it the connection closes.
LINGER_BYTES = 64 << 20


@web.middleware
async def lingering_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The outermost middleware: after the handler answered, linger if the request's body is still arriving."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        await linger_after(request, exc)
        raise
    await linger_after(request, response)
    return response


async def linger_after(request: web.Request, response: web.StreamResponse) -> None:
    """If ``request``'s body has not all arrived: send ``response`` with ``Connection: close``, shut the
    write side, read and drop the rest within the bounds, then close. Nothing if the body was read
    (or is already all in the buffer), or if the handler already started its answer (streamed)."""
    if not request.body_exists or response.prepared:
        return
    content = request.content
    if _drop_buffered(content):
        return
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        return  # the client is gone: nothing to protect
    if transport.can_write_eof():
        transport.write_eof()  # once the answer is flushed
    if not await _drain(content):
        # A bound was reached with the client still sending: close now (what it sends next is refused).
        request.protocol.force_close()


def _drop_buffered(content: StreamReader) -> bool:
    """Drop what of the body is already buffered; whether that was all of it (or it failed, so that
    there is nothing to wait for)."""
    try:
        while content.read_nowait():
            pass
    except Exception:  # the connection failed under the body
        return True
    return content.is_eof()


async def _drain(content: StreamReader) -> bool:
    """Read and drop the rest of the body: True once it ended (or the connection did), False at a bound."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINGER_TIME
    dropped = 0
    while dropped <= LINGER_BYTES:
        left = deadline - loop.time()
        if left <= 0:
            return False
        try:
            async with asyncio.timeout(min(LINGER_SILENCE, left)):
                chunk = await content.readany()
        except TimeoutError:
            return False
        except Exception:  # the connection failed: nothing is left to protect
            return True
        if not chunk:
            return True
        dropped += len(chunk)
    log.debug("stopped lingering after %d bytes", dropped)
    return False
