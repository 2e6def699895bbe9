"""Lingering close (``datastore/http/lingering.py``), against one store with no balancer in front.

An answer given while the request's body is still arriving reaches the client whole, whether the
client reads as it sends or only once it has sent everything; the store then shuts its side (the
client sees the end of the answer at once) and reads and drops what the client still sends, until a
bound: a client that trickles is cut off at the time bound, one that floods at the byte bound, one
that falls silent at the silence bound. A body that had all arrived leaves the connection open for
the next request. (What a request stopped from elsewhere is answered, 410 or 409, is checked where
it is stopped: ``test_lifecycle.py``, ``test_tus.py``, and behind HAProxy ``test_cluster.py``.)

Raw sockets throughout: an HTTP client library would hide what goes over the connection. Waits are
for conditions, bounded; the only pauses are the trickling client's pace between two bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest

from datastore.http import lingering

from .conftest import MakeStore
from .harness import RawAnswer, Store, read_answer, until

MIB = 1 << 20
#: Upper bound on anything a test awaits from the store.
WAIT = 30.0
#: The largest file the stores here take: a declared body beyond it is refused (413) before a byte is read.
LIMIT = MIB


async def too_large_store(make_store: MakeStore) -> tuple[Store, str]:
    """A store that takes files of at most LIMIT bytes, and the key of a transfer of one small file."""
    store = await make_store(max_file_size=LIMIT)
    return store, await store.register([("small.bin", b"x" * 1000)])


@contextlib.asynccontextmanager
async def put_head(
    store: Store, key: str, declared: int
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw connection that sent the head of a PUT declaring ``declared`` bytes (and none of them yet)."""
    assert store.client.port is not None
    reader, writer = await asyncio.open_connection(store.client.host, store.client.port)
    writer.write(
        (
            f"PUT /{store.prefix}/{key}/0 HTTP/1.1\r\nHost: {store.client.host}\r\nAccept: application/json\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {declared}\r\n\r\n"
        ).encode()
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def assert_too_large(answer: RawAnswer) -> None:
    assert (answer.status, answer.code) == (413, "too_large"), answer
    assert json.loads(answer.body)["message"].startswith("Request too large"), answer
    # The body was not all read: nothing more may come over this connection.
    assert answer.headers["Connection"] == "close", answer.headers


async def send_all(writer: asyncio.StreamWriter, body: bytes, piece: int = 64 << 10) -> int:
    """Send ``body`` piece by piece as the connection takes it; how many bytes went before it failed."""
    sent = 0
    try:
        while sent < len(body):
            writer.write(body[sent : sent + piece])
            await writer.drain()
            sent += len(body[sent : sent + piece])
    except ConnectionError:
        pass
    return sent


@pytest.mark.parametrize("client", ["reads-while-sending", "reads-after-sending"])
async def test_an_answer_given_before_the_body_reaches_a_client_still_sending_it(
    make_store: MakeStore, client: str
) -> None:
    store, key = await too_large_store(make_store)
    body = b"y" * (8 * MIB)
    async with put_head(store, key, len(body)) as (reader, writer):
        async with asyncio.timeout(WAIT):
            if client == "reads-while-sending":
                sending = asyncio.ensure_future(send_all(writer, body))
                answer = await read_answer(reader)
                sent = await sending
            else:
                # As http.client and AccessGrid's client do: the whole body first, then the answer. The
                # store reads and drops the rest (within its bounds), so the answer is still there.
                sent = await send_all(writer, body)
                answer = await read_answer(reader)
            # The store shut its side after the answer: the client sees the end without waiting.
            rest = await reader.read()
    assert_too_large(answer)
    assert rest == b""
    assert sent == len(body)


async def test_a_client_trickling_bytes_after_the_answer_is_cut_off_at_the_time_bound(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lingering, "LINGER_TIME", 1.0)
    store, key = await too_large_store(make_store)
    async with put_head(store, key, 1 << 30) as (reader, writer):
        async with asyncio.timeout(WAIT):
            answer = await read_answer(reader)
        answered = time.monotonic()
        # A byte every 50 ms: never silent for LINGER_SILENCE, so only the time bound ends it. The
        # store closes its socket then, and the next byte is refused (the client's write fails).
        with pytest.raises(ConnectionError):
            async with asyncio.timeout(WAIT):
                while True:
                    writer.write(b"z")
                    await writer.drain()
                    await asyncio.sleep(0.05)  # the client's pace, not a wait for the store
        lingered = time.monotonic() - answered
    assert_too_large(answer)
    # Given the time bound (not cut at once), and not much more (a generous margin for a busy machine).
    assert lingering.LINGER_TIME / 2 <= lingered < lingering.LINGER_TIME + 5, f"cut off after {lingered:.2f} s"


async def test_a_client_flooding_bytes_after_the_answer_is_cut_off_at_the_byte_bound(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lingering, "LINGER_BYTES", MIB)
    store, key = await too_large_store(make_store)
    declared = 1 << 30
    async with put_head(store, key, declared) as (reader, writer):
        async with asyncio.timeout(WAIT):
            sending = asyncio.ensure_future(send_all(writer, b"w" * (256 * MIB), piece=MIB))
            answer = await read_answer(reader)
            sent = await sending
    assert_too_large(answer)
    # Cut off: past the bound (and what the sockets' buffers hold), long before the body's end.
    assert lingering.LINGER_BYTES <= sent < 256 * MIB, sent


async def test_a_client_silent_after_the_answer_is_let_go_at_the_silence_bound(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lingering, "LINGER_SILENCE", 0.2)
    monkeypatch.setattr(lingering, "LINGER_TIME", WAIT * 10)
    store, key = await too_large_store(make_store)
    runner = store.client.server.runner
    assert runner is not None and runner.server is not None
    server = runner.server
    before = len(server.connections)
    async with put_head(store, key, 1 << 30) as (reader, _writer):
        async with asyncio.timeout(WAIT):
            answer = await read_answer(reader)
            assert await reader.read() == b""
        # The client sends nothing more (and holds its socket open): the store closes its own.
        await until(lambda: len(server.connections) == before, "the store closed the silent connection", WAIT)
    assert_too_large(answer)


async def test_a_body_that_had_all_arrived_leaves_the_connection_open_for_the_next_request(
    make_store: MakeStore,
) -> None:
    store, key = await too_large_store(make_store)
    assert store.client.port is not None
    reader, writer = await asyncio.open_connection(store.client.host, store.client.port)
    try:
        # A body smaller than the manifest says, sent whole: refused (405) before it is read, yet all here.
        writer.write(
            f"PUT /files/{key}/0 HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\nContent-Length: 10\r\n\r\n".encode()
            + b"0123456789"
        )
        async with asyncio.timeout(WAIT):
            refused = await read_answer(reader)
            writer.write(b"GET /_api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            health = await read_answer(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert (refused.status, refused.code) == (405, "size_mismatch"), refused
    assert refused.headers.get("Connection") != "close", refused.headers
    assert health.status == 200, health
