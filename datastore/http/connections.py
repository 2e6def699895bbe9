"""Connections: who may connect, how many at once, TLS handshakes, and what is logged of them.

Every listener of :class:`~datastore.http.server.TransferServer` accepts plain
TCP, so that a connection counts from its first moment: the
:class:`ConnectionGate` admits it (``max_connections`` in all,
``max_connections_per_client`` per address) or refuses it with a plain
``503`` before aiohttp sees a byte; a connection to a TLS port is then
secured with ``loop.start_tls`` within ``tls_handshake_timeout``.
:class:`StoreRunner` is the aiohttp runner that puts the gate in front of
its server. :class:`AccessLogger` writes one line per request, never a
transfer key whole; ``HTTP_LOG`` is aiohttp's own log of the connections,
where a request it cannot parse is one INFO line. The gate counts open and
refused connections in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
import time
from collections import Counter
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .. import metrics
from ..config import Settings
from ..security.logsafe import printable, redact

log = logging.getLogger(__name__)


#: An access line: client, request line, status, bytes, seconds.
_ACCESS_LINE = '%s "%s %s HTTP/%d.%d" %d %d %.6f'


class AccessLogger(AbstractAccessLogger):
    """One line per request: client, request line (keys and tokens cut short), status, bytes, seconds.

    Off, and free, when ``datastore.access`` does not log INFO.
    """

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        # The record is made and handled directly: ``logger.info`` would first walk the stack to
        # find its caller, which no access line shows, and which cost a third of the line.
        logger = self.logger
        args = (
            request.remote,
            request.method,
            redact(request.raw_path),
            *request.version,
            response.status,
            response.body_length,
            time,
        )
        logger.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, _ACCESS_LINE, args, None))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class MalformedRequestFilter(logging.Filter):
    """One INFO line (at most), not an ERROR with a traceback, for a request aiohttp could not parse.

    aiohttp logs every such request (a NUL byte in a header, a line too long)
    as an error with its parser's traceback; any client can send them at will,
    so they would bury the store's real errors. The access log has them too (400).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and exc.code < 500:
            # aiohttp's message is "Error handling request from %s", with the client's address.
            client = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            detail = redact(printable(" ".join(str(exc.message).split())[:200]))
            record.msg, record.args = "malformed request from %s: %d %s", (client, exc.code, detail)
            level = min(record.levelno, logging.INFO)
            record.levelno, record.levelname = level, logging.getLevelName(level)
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(level)
        return True


#: aiohttp's log of the connections it serves (see MalformedRequestFilter).
HTTP_LOG = logging.getLogger("datastore.http")
HTTP_LOG.addFilter(MalformedRequestFilter())


def bind_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: a free one), not yet listening.

    With ``reuse_port`` (``serve --workers N``), other processes may bind the same port.
    """
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
    except BaseException:
        sock.close()
        raise
    return sock


def connection_cap(settings: Settings) -> int:
    """``max_connections``, or from the file-descriptor limit: half of what is left after 128 for
    the store's own files (each connection may hold a staging file too), at most 4096."""
    if settings.max_connections:
        return settings.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, (soft - 128) // 2))


class ConnectionGate:
    """Counts open connections, in all and per client address, and refuses those over the caps.

    A refused connection never meets aiohttp: it gets one plain ``503``, its
    write side is shut, whatever the client still sends is read and dropped
    (so that closing it does not reset the connection before the client read
    the answer), and it is closed when the client closes or after
    :data:`LINGER` seconds. No request, no handler, no traceback; refusals
    are logged at most once every :data:`REFUSAL_LOG_INTERVAL` seconds, with
    how many there were.
    """

    def __init__(self, limit: int, per_client: int) -> None:
        self.limit, self.per_client = limit, per_client
        self.open = 0
        self.by_client: Counter[str] = Counter()
        #: Refused connections not closed yet; beyond MAX_LINGERING they are closed at once.
        self.lingering = 0
        #: Why the last connection was refused.
        self.why = ""
        self.refused = 0
        self._logged_at = -REFUSAL_LOG_INTERVAL
        self._unlogged = 0

    def admit(self, transport: asyncio.BaseTransport) -> str | None:
        """The client's address if the connection may stay (counted); None if it is to be refused."""
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        if self.open >= self.limit:
            self._note_refusal("max_connections", f"the store holds {self.limit} connections, as many as it may")
            return None
        if self.by_client[client] >= self.per_client:
            self._note_refusal(
                "max_connections_per_client", f"your address holds {self.per_client} connections, as many as one may"
            )
            return None
        self.open += 1
        self.by_client[client] += 1
        metrics.connection_opened()
        return client

    def release(self, client: str) -> None:
        """An admitted connection closed."""
        self.open -= 1
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]
        metrics.connection_closed()

    def _note_refusal(self, limit: str, why: str) -> None:
        self.why = why
        self.refused += 1
        metrics.connection_refused(limit)
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning("refused %d connection(s): %s", self._unlogged, why)
            self._logged_at, self._unlogged = now, 0


#: Seconds between two log lines about refused connections.
REFUSAL_LOG_INTERVAL = 10.0
#: Seconds a refused connection is read (and dropped) before it is closed, and how many may linger at once.
LINGER = 2.0
MAX_LINGERING = 256


class _Admission(asyncio.Protocol):
    """The first protocol of every connection: hands it to aiohttp (after TLS, on a TLS port), or refuses it."""

    def __init__(self, server: GatedServer) -> None:
        self.server = server
        self.transport: asyncio.BaseTransport | None = None
        self._closing: asyncio.TimerHandle | None = None
        #: While a TLS handshake runs: the client the connection counts for (released once, if it fails).
        self._handshaking: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self.server.gate
        client = gate.admit(transport)
        local = transport.get_extra_info("sockname")
        context = self.server.tls.get(local[1]) if isinstance(local, tuple) and len(local) > 1 else None
        if client is not None and context is not None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # the client's hello is for the handshake
            self._handshaking = client
            task = asyncio.get_running_loop().create_task(self._secure(transport, context, client))
            self.server.handshakes.add(task)
            task.add_done_callback(self.server.handshakes.discard)
            return
        if client is not None:
            self.server.admit(transport, client)
            return
        if context is not None:
            transport.close()  # no HTTP before TLS: a refusal cannot be said
            return
        self.transport = transport
        body = f"Too many connections: {gate.why}; try again later\n".encode()
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(
            b"HTTP/1.1 503 Too many connections\r\nContent-Type: text/plain; charset=utf-8\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + b"Retry-After: 1\r\nConnection: close\r\n\r\n"
            + body
        )
        if gate.lingering >= MAX_LINGERING:
            transport.close()
            return
        gate.lingering += 1
        if transport.can_write_eof():
            transport.write_eof()
        self._closing = asyncio.get_running_loop().call_later(LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        """A refused client's request: read and dropped."""

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closing is not None:
            self._closing.cancel()
            self.server.gate.lingering -= 1
        self._end_handshake()

    async def _secure(self, transport: asyncio.Transport, context: ssl.SSLContext, client: str) -> None:
        handler = self.server.make_handler()
        try:
            secured = await asyncio.get_running_loop().start_tls(
                transport, handler, context, server_side=True, ssl_handshake_timeout=self.server.handshake_timeout
            )
        except Exception as exc:  # a failed or abandoned handshake: refused, never logged as an error
            log.debug("TLS handshake failed: %s", exc)
            transport.abort()
            self._end_handshake()
            return
        if secured is None or self._handshaking is None:  # the connection closed meanwhile
            self._end_handshake()
            return
        self._handshaking = None
        self.server.admit(secured, client, handler)

    def _end_handshake(self) -> None:
        if self._handshaking is not None:
            self.server.gate.release(self._handshaking)
            self._handshaking = None


class GatedServer(web.Server):
    """aiohttp's connection manager, with a :class:`ConnectionGate` in front of it."""

    def __init__(self, gate: ConnectionGate, handshake_timeout: float, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        #: Seconds a client may take over its TLS handshake (asyncio's own default is a minute).
        self.handshake_timeout = handshake_timeout
        #: The address of each admitted connection's handler.
        self.clients: dict[RequestHandler, str] = {}
        #: The TLS context of each listening port that speaks TLS (set as the listeners start).
        self.tls: dict[int, ssl.SSLContext] = {}
        #: TLS handshakes under way.
        self.handshakes: set[asyncio.Task[None]] = set()

    def __call__(self) -> _Admission:  # type: ignore[override]
        """The protocol of a new connection (asyncio calls this when it accepts one)."""
        return _Admission(self)

    def make_handler(self) -> RequestHandler:
        """aiohttp's protocol for an admitted connection."""
        return super().__call__()

    def admit(self, transport: asyncio.BaseTransport, client: str, handler: RequestHandler | None = None) -> None:
        """Hand an admitted connection (counted for ``client``) to aiohttp."""
        handler = handler if handler is not None else self.make_handler()
        self.clients[handler] = client
        transport.set_protocol(handler)
        handler.connection_made(transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        client = self.clients.pop(handler, None)
        if client is not None:
            self.gate.release(client)
        super().connection_lost(handler, exc)


class StoreRunner(web.AppRunner):
    """An AppRunner whose server lets in only what its :class:`ConnectionGate` admits."""

    def __init__(self, app: web.Application, gate: ConnectionGate, handshake_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.gate = gate
        self.handshake_timeout = handshake_timeout

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        # The same server aiohttp would make (its handler, request factory, keyword arguments), gated.
        return GatedServer(
            self.gate,
            self.handshake_timeout,
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
