"""A TCP proxy on 127.0.0.1 in front of a real HTTP server, whose faults a test controls: a
connection cut after some bytes, a stalled connection, a burst of 503s; and the record of every
request head it forwarded, for tests to assert how a client resumed.

One request per connection: the proxy rewrites every request head it forwards to carry
``Connection: close`` (replacing the client's ``Connection`` header), so the server closes each
connection after its answer and the client opens a new one for its next request. The proxy thus
only parses the head at the start of each connection, and every request is recorded whatever
session the client uses.

Bytes are counted per connection and direction, heads included::

    async with FaultProxy("127.0.0.1", port) as proxy:
        proxy.cut_after(100_000, "down")       # the next connection that carries 100 kB to the client is cut
        ...
        assert [r.headers.get("range") for r in proxy.requests if r.method == "GET"] == [None, "bytes=..."]
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

Direction = Literal["up", "down"]  # up: client -> server; down: server -> client

MAX_HEAD = 64 << 10
PIECE = 64 << 10


@dataclass
class RecordedRequest:
    """A request head the proxy forwarded: its method, target and headers (names lowercase), and the
    status of the answer once its first bytes passed (None: no answer came through)."""

    method: str
    target: str
    headers: dict[str, str]
    status: int | None = None


class FaultProxy:
    """``async with FaultProxy(host, port) as proxy``: ``proxy.url`` reaches the server through it."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.requests: list[RecordedRequest] = []
        #: Request heads answered by fail_next, not forwarded.
        self.refused: list[RecordedRequest] = []
        self.cuts = 0
        self._cut: tuple[int, Direction] | None = None
        self._failures: list[int] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control --------------------------------------------------------------------------------

    def cut_after(self, n_bytes: int, direction: Direction) -> None:
        """Close the next connection that has carried ``n_bytes`` in ``direction`` (once)."""
        self._cut = (n_bytes, direction)

    def stall(self) -> None:
        """Stop forwarding (connections stay open, bytes wait)."""
        self._flowing.clear()

    def release(self) -> None:
        """Forward again."""
        self._flowing.set()

    def fail_next(self, k: int, status: int = 503) -> None:
        """Answer the next ``k`` connections with ``status`` (empty body, Connection: close)."""
        self._failures.extend([status] * k)

    def heads(self, method: str) -> list[RecordedRequest]:
        """The forwarded requests of ``method``, in order."""
        return [r for r in self.requests if r.method == method]

    # -- lifetime -------------------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self._flowing.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    # -- connections ----------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            request = _parse(head)
            if self._failures:
                status = self._failures.pop(0)
                self.refused.append(request)
                writer.write(f"HTTP/1.1 {status} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                return
            self.requests.append(request)
            up_reader, upstream = await asyncio.open_connection(*self.upstream)
            counts = {"up": 0, "down": 0}
            pumps = [
                asyncio.create_task(self._pump(_close_head(head), reader, upstream, "up", counts)),
                asyncio.create_task(self._pump(b"", up_reader, writer, "down", counts, request)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # Only __aexit__ cancels a connection: it ends here, quietly (asyncio's stream callback
            # would log a cancelled handler as an error).
            pass
        finally:
            for stream in (writer, upstream):
                if stream is not None:
                    stream.close()
            for stream in (writer, upstream):
                if stream is not None:
                    with contextlib.suppress(ConnectionError, OSError):
                        await stream.wait_closed()
            self._tasks.discard(task)

    async def _pump(
        self,
        first: bytes,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        direction: Direction,
        counts: dict[str, int],
        answering: RecordedRequest | None = None,
    ) -> None:
        """Copy ``first`` then ``source`` into ``sink`` until EOF or a cut (noting the status of the
        answer to ``answering``)."""
        data = first
        while True:
            if data:
                if answering is not None and answering.status is None and data.startswith(b"HTTP/"):
                    answering.status = int(data[9:12])
                await self._flowing.wait()
                cut = self._cut
                if cut is not None and cut[1] == direction and counts[direction] + len(data) >= cut[0]:
                    self._cut = None
                    self.cuts += 1
                    sink.write(data[: cut[0] - counts[direction]])
                    await sink.drain()
                    return
                counts[direction] += len(data)
                sink.write(data)
                await sink.drain()
            data = await source.read(PIECE)
            if not data:
                return


def _parse(head: bytes) -> RecordedRequest:
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.rpartition(" ")[0]
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return RecordedRequest(method, target, headers)


def _close_head(head: bytes) -> bytes:
    """``head`` with ``Connection: close`` in place of any Connection header."""
    lines = head[:-4].split(b"\r\n")
    kept = [line for line in lines[1:] if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"
