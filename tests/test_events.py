"""Events through the real server: what the lifecycle announces, in order and once each, to SSE
streams (live and replayed with Last-Event-ID), in-process subscribers and handlers' ``on_event``;
who may follow which stream, and what a stream shows to whom.

The tests of other processes (a restart, ``--workers 2``, webhooks, ``datastore watch``) are in
``test_events_processes.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

import datastore.http.sse
from datastore import Event, EventType
from datastore.client.events import read_events
from datastore.handlers.directory import DirectoryHandler
from datastore.http.context import CONTEXT
from datastore.security.policy import Audience, Policy

from .conftest import MakeStore
from .harness import Store, md5_hex, sha256_hex, until

TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_TYPE = "application/offset+octet-stream"
ADA = "/O=Lab/CN=Ada"
BOB = "/O=Lab/CN=Bob"
WAIT = 15.0
#: Bytes staged per step, so that a few chunks sent show up on disk.
CHUNK = 16 << 10


def content(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Stream:
    """An SSE client of the store: the events it has received, as dicts."""

    def __init__(self, messages: AsyncIterator[Any]) -> None:
        self._messages = messages
        self.events: list[dict[str, Any]] = []

    async def take(self, count: int, *, progress: bool = False) -> list[dict[str, Any]]:
        """The next ``count`` events (file.progress skipped unless ``progress``)."""
        taken: list[dict[str, Any]] = []
        async with asyncio.timeout(WAIT):
            while len(taken) < count:
                message = await anext(self._messages)
                event = message.json()
                assert message.event == event["type"] and message.id == str(event["id"])
                self.events.append(event)
                if progress or event["type"] != "file.progress":
                    taken.append(event)
        return taken

    async def until_type(self, kind: str) -> list[dict[str, Any]]:
        """Events up to and including the next one of type ``kind`` (progress skipped)."""
        taken: list[dict[str, Any]] = []
        while not taken or taken[-1]["type"] != kind:
            taken.extend(await self.take(1))
        return taken


@asynccontextmanager
async def follow(
    store: Store, path: str = "/_api/v1/events", headers: dict[str, str] | None = None
) -> AsyncIterator[Stream]:
    """Open an event stream; it is following once the response's headers arrived."""
    async with store.client.get(path, headers=headers or {}) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        yield Stream(read_events(response.content).__aiter__())


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, int | None]]:
    return [(e["type"], e["file"]) for e in events]


async def register(store: Store, files: list[tuple[str, bytes]], identity: str | None = None) -> dict[str, Any]:
    headers = {"X-Client-DN": identity} if identity else {}
    manifest = {"files": [{"name": n, "size": len(d), "md5": md5_hex(d), "sha256": sha256_hex(d)} for n, d in files]}
    response = await store.client.post(f"/{store.prefix}/manifest", json=manifest, headers=headers)
    body: dict[str, Any] = await response.json()
    assert response.status == 201, body
    return body


async def patch(store: Store, key: str, num: int, offset: int, data: bytes, identity: str | None = None) -> int:
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": OFFSET_TYPE}
    if identity:
        headers["X-Client-DN"] = identity
    response = await store.client.patch(f"/{store.prefix}/{key}/{num}", data=data, headers=headers)
    await response.read()
    assert response.status == 204, (response.status, response.reason)
    return int(response.headers["Upload-Offset"])


async def drop_mid_patch(store: Store, key: str, num: int, offset: int, declared: int, sent: bytes) -> None:
    """A PATCH that declares ``declared`` bytes, sends ``sent`` and loses its connection."""
    server = store.client.server
    _, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        (
            f"PATCH /{store.prefix}/{key}/{num} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
            f"Tus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\nContent-Type: {OFFSET_TYPE}\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
        + sent
    )
    await writer.drain()
    # Lost once the store has staged what was sent (``sent`` is a whole number of chunks).
    staged = store.staging / f"{key}.{num}.part"
    await until(lambda: staged.exists() and staged.stat().st_size == offset + len(sent), "the bytes sent are staged")
    writer.close()
    await writer.wait_closed()


async def offset_of(store: Store, key: str, num: int) -> int:
    response = await store.client.head(f"/{store.prefix}/{key}/{num}", headers=TUS)
    assert response.status == 200
    return int(response.headers["Upload-Offset"])


# -- the sequence of one transfer -----------------------------------------------------------------


async def test_a_three_file_tus_upload_with_a_dropped_connection_announces_exactly_what_happened(
    make_store: MakeStore,
) -> None:
    store = await make_store(chunk_size=CHUNK)
    files = [("one.bin", content(70_000, 1)), ("two.bin", content(300_000, 2)), ("three.bin", content(5, 3))]
    async with follow(store) as stream:
        body = await register(store, files)
        key = body["transfer_key"]
        await patch(store, key, 0, 0, files[0][1])
        half = files[1][1][: 8 * CHUNK]
        await drop_mid_patch(store, key, 1, 0, len(files[1][1]), half)
        interrupted = await stream.until_type("file.interrupted")
        offset = await offset_of(store, key, 1)
        assert offset == len(half)
        await patch(store, key, 1, offset, files[1][1][offset:])
        await patch(store, key, 2, 0, files[2][1])
        rest = await stream.until_type("transfer.finished")

    events = interrupted + rest
    assert kinds(events) == [
        ("transfer.created", None),
        ("file.started", 0),
        ("file.completed", 0),
        ("file.started", 1),
        ("file.interrupted", 1),
        ("file.started", 1),
        ("file.completed", 1),
        ("file.started", 2),
        ("file.completed", 2),
        ("transfer.finished", None),
    ]
    ids = [e["id"] for e in stream.events]
    assert ids == sorted(set(ids)), "ids grow, none twice"
    handle = hashlib.sha256(key.encode()).hexdigest()[:16]
    assert {e["transfer"] for e in events} == {handle} and {e["prefix"] for e in events} == {"files"}
    created, _, completed, _, lost, resumed, *_ = events
    assert created["size"] == sum(len(d) for _, d in files)
    assert (completed["name"], completed["bytes"], completed["md5"], completed["sha256"]) == (
        "one.bin",
        70_000,
        md5_hex(files[0][1]),
        sha256_hex(files[0][1]),
    )
    assert (lost["name"], lost["bytes"], lost["reason"]) == ("two.bin", len(half), "connection_lost")
    assert resumed["bytes"] == len(half)
    progress = [e for e in stream.events if e["type"] == "file.progress"]
    assert all(0 < e["bytes"] <= e["size"] for e in progress)


async def test_cancelling_expiring_terminating_and_deleting_are_announced(make_store: MakeStore) -> None:
    store = await make_store()
    data = content(1000, 4)
    async with follow(store) as stream:
        cancelled = (await register(store, [("c.bin", data)]))["transfer_key"]
        assert (await store.client.delete(f"/_api/v1/transfers/{cancelled}")).status == 200
        terminated = (await register(store, [("t.bin", data)]))["transfer_key"]
        response = await store.client.delete(f"/files/{terminated}/0", headers=TUS)
        assert response.status == 204
        await register(store, [("e.bin", data)])
        assert await store.client.app[CONTEXT].lifecycle.expire(now=time.time() + 10**6) == 1
        kept = (await register(store, [("d.bin", data)], identity=ADA))["transfer_key"]
        await patch(store, kept, 0, 0, data, identity=ADA)
        assert (await store.client.delete("/files/d.bin", headers={"X-Client-DN": ADA})).status == 204
        events = await stream.take(12)
    assert kinds(events) == [
        ("transfer.created", None),
        ("transfer.cancelled", None),
        ("transfer.created", None),
        ("file.cancelled", 0),
        ("transfer.cancelled", None),
        ("transfer.created", None),
        ("transfer.expired", None),
        ("transfer.created", None),
        ("file.started", 0),
        ("file.completed", 0),
        ("transfer.finished", None),
        ("file.deleted", None),
    ]
    assert events[1]["reason"] == "cancelled" and events[6]["reason"] == "expired"
    assert events[3]["reason"] == "terminated"
    deleted = events[11]
    assert (deleted["name"], deleted["size"], deleted["transfer"]) == ("d.bin", 1000, None)


async def test_a_failed_verification_is_announced_with_its_reason(make_store: MakeStore) -> None:
    store = await make_store()
    data = content(2000, 5)
    async with follow(store) as stream:
        key = (await register(store, [("bad.bin", data)]))["transfer_key"]
        response = await store.client.put(f"/files/{key}/0", data=content(2000, 6))
        assert response.status == 405
        events = await stream.take(3)
    assert kinds(events) == [("transfer.created", None), ("file.started", 0), ("file.failed", 0)]
    assert events[2]["reason"] == "checksum_mismatch"


# -- catching up ----------------------------------------------------------------------------------


async def test_a_client_that_reconnects_with_last_event_id_gets_exactly_what_it_missed(make_store: MakeStore) -> None:
    store = await make_store()
    async with follow(store) as witness:
        async with follow(store) as leaving:
            key = (await register(store, [("a.bin", b"a" * 10)]))["transfer_key"]
            await patch(store, key, 0, 0, b"a" * 10)
            seen = await leaving.take(4)
        last = seen[-1]["id"]
        # Disconnected: these happen while it is away.
        for n in range(3):
            data = content(100 + n, 10 + n)
            key = (await register(store, [(f"m{n}.bin", data)]))["transfer_key"]
            await patch(store, key, 0, 0, data)
        expected = (await witness.take(4 + 12))[4:]
        async with follow(store, headers={"Last-Event-ID": str(last)}) as back:
            await register(store, [("after.bin", b"x")])
            caught_up = await back.take(12 + 1)
    assert [e["id"] for e in caught_up[:12]] == [e["id"] for e in expected]
    assert caught_up[:12] == expected
    assert caught_up[12]["type"] == "transfer.created" and caught_up[12]["id"] > expected[-1]["id"]
    assert len({e["id"] for e in caught_up}) == len(caught_up)


async def test_after_replays_from_the_log_for_clients_that_cannot_set_headers(make_store: MakeStore) -> None:
    store = await make_store()
    await register(store, [("early.bin", b"e")])
    async with follow(store, "/_api/v1/events?after=0") as stream:
        (first,) = await stream.take(1)
    assert (first["id"], first["type"]) == (1, "transfer.created")


@pytest.mark.parametrize("bad", ["x", "-1", "1" * 19, "1 2"])
async def test_a_malformed_last_event_id_is_refused(make_store: MakeStore, bad: str) -> None:
    store = await make_store()
    response = await store.client.get("/_api/v1/events", headers={"Last-Event-ID": bad})
    assert response.status == 400


# -- who may follow what --------------------------------------------------------------------------


async def test_a_transfers_stream_is_its_owners_only(make_store: MakeStore) -> None:
    store = await make_store()
    key = (await register(store, [("mine.bin", b"m" * 5)], identity=ADA))["transfer_key"]
    refused = await store.client.get(f"/_api/v1/transfers/{key}/events", headers={"X-Client-DN": BOB})
    assert refused.status == 403
    unknown = await store.client.get(f"/_api/v1/transfers/{'0' * 40}/events", headers={"X-Client-DN": ADA})
    assert unknown.status == 404
    path = f"/_api/v1/transfers/{key}/events"
    async with follow(store, path, headers={"X-Client-DN": ADA, "Last-Event-ID": "0"}) as stream:
        other = (await register(store, [("other.bin", b"o")], identity=BOB))["transfer_key"]
        await patch(store, key, 0, 0, b"m" * 5, identity=ADA)
        events = await stream.take(4)
    assert kinds(events) == [
        ("transfer.created", None),
        ("file.started", 0),
        ("file.completed", 0),
        ("transfer.finished", None),
    ]
    assert {e["transfer_key"] for e in events} == {key} and other not in str(events)
    assert {e["owner"] for e in events} == {ADA}


async def test_a_prefix_stream_shows_names_only_to_who_may_list_and_keys_only_to_owners(
    make_store: MakeStore,
) -> None:
    store = await make_store(policy=Policy(list=Audience.USERS, read=Audience.ANYONE, upload=Audience.ANYONE))
    hidden = Policy(list=Audience.ADMINS, read=Audience.ANYONE, upload=Audience.ANYONE)
    store.server.register_prefix(
        "hidden", DirectoryHandler(store.root / "hidden", catalogue=store.state_dir / "hidden.sqlite3"), policy=hidden
    )
    anonymous = await store.client.get("/_api/v1/events")
    assert anonymous.status == 401
    assert (await store.client.get("/_api/v1/events?prefix=hidden", headers={"X-Client-DN": BOB})).status == 403
    async with follow(store, headers={"X-Client-DN": BOB}) as bob:
        await store.client.post(
            "/hidden/manifest", json={"files": [{"name": "secret-name.bin", "size": 1}]}, headers={"X-Client-DN": ADA}
        )
        mine = (await register(store, [("bobs.bin", b"b")], identity=BOB))["transfer_key"]
        adas = (await register(store, [("adas.bin", b"a")], identity=ADA))["transfer_key"]
        events = await bob.take(2)
    assert "secret-name" not in str(bob.events) and {e["prefix"] for e in events} == {"files"}
    assert events[0]["transfer_key"] == mine
    assert events[1]["transfer_key"] is None and adas not in str(events)
    # The default policy shows no owners but to themselves.
    assert (events[0]["owner"], events[1]["owner"]) == (BOB, None)


# -- in-process subscribers -----------------------------------------------------------------------


class Observing(DirectoryHandler):
    """A handler that follows its prefix's events."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Event] = []

    async def on_event(self, event: Event) -> None:
        self.seen.append(event)


async def test_subscribers_and_handlers_hear_every_event_in_order(make_store: MakeStore, tmp_path: Any) -> None:
    handler = Observing(tmp_path / "root" / "files", catalogue=tmp_path / "files.sqlite3")
    store = await make_store(handler)
    heard: list[Event] = []
    heard_async: list[Event] = []

    async def slow_but_fine(event: Event) -> None:
        await asyncio.sleep(0)
        heard_async.append(event)

    unsubscribe = store.server.subscribe(heard.append)
    store.server.subscribe(slow_but_fine, prefix="files")
    store.server.subscribe(heard.append, prefix="elsewhere")
    data = content(5000, 7)
    key = (await register(store, [("s.bin", data)]))["transfer_key"]
    await patch(store, key, 0, 0, data)
    await until(lambda: len(heard) >= 4 and len(heard_async) >= 4 and len(handler.seen) >= 4, "subscribers hear")
    for events in (heard, heard_async, handler.seen):
        assert [e.type for e in events if e.type is not EventType.FILE_PROGRESS] == [
            EventType.TRANSFER_CREATED,
            EventType.FILE_STARTED,
            EventType.FILE_COMPLETED,
            EventType.TRANSFER_FINISHED,
        ]
        assert [e.id for e in events] == sorted({e.id for e in events})
    unsubscribe()
    await register(store, [("after.bin", b"x")])
    await until(lambda: len(heard_async) >= 5, "the other subscriber hears the next event")
    assert len([e for e in heard if e.type is EventType.TRANSFER_CREATED]) == 1


async def test_a_failing_subscriber_is_logged_and_breaks_nothing(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = await make_store()
    calls: list[int] = []

    def failing(event: Event) -> None:
        calls.append(event.id)
        raise RuntimeError("the subscriber broke")

    store.server.subscribe(failing)
    data = content(3000, 8)
    key = (await register(store, [("f.bin", data)]))["transfer_key"]
    assert await patch(store, key, 0, 0, data) == len(data)
    await until(lambda: len(calls) >= 4, "the failing subscriber is called for each event")
    assert "the subscriber broke" in caplog.text and "failed on event" in caplog.text
    assert (await store.client.get("/files/f.bin")).status == 200


async def test_a_subscriber_that_falls_behind_is_dropped_without_slowing_uploads(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = await make_store()
    stuck = asyncio.Event()
    heard: list[int] = []

    async def never_done(event: Event) -> None:
        heard.append(event.id)
        await stuck.wait()

    store.server.events.subscribe(never_done, queue_size=3, name="stuck")
    caplog.set_level(logging.WARNING, logger="datastore")
    for n in range(4):
        data = content(100, 20 + n)
        key = (await register(store, [(f"q{n}.bin", data)]))["transfer_key"]
        assert await patch(store, key, 0, 0, data) == len(data)
    await until(lambda: store.server.events.dropped == 1, "the stuck subscriber is dropped")
    assert "stuck fell 3 events behind and was dropped" in caplog.text
    stuck.set()
    assert heard == [1]


async def test_events_are_kept_for_the_retention_and_then_forgotten(make_store: MakeStore) -> None:
    store = await make_store(event_retention=60.0)
    await register(store, [("old.bin", b"o")])
    lifecycle = store.client.app[CONTEXT].lifecycle
    assert await lifecycle.state.last_event_id() == 1
    # A sweep far in the future expires the transfer (event 2) and forgets every event older than the retention.
    await lifecycle.sweep(now=time.time() + 10**6)
    assert await lifecycle.state.events_after(0, limit=10) == []
    await register(store, [("new.bin", b"n")])
    assert [e.id for e in await lifecycle.state.events_after(0, limit=10)] == [3]


async def test_a_client_that_leaves_an_idle_stream_frees_it(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datastore.http.sse, "PING_INTERVAL", 0.05)
    store = await make_store()
    bus = store.server.events
    async with follow(store):
        await until(lambda: bus.streams == 1, "the stream is open")
    # No event comes to fail on: the pings notice the client is gone.
    await until(lambda: bus.streams == 0, "the stream is closed")
    health = await (await store.client.get("/_api/v1/health")).json()
    assert health["event_streams"] == 0


async def test_uploads_a_restart_cut_short_are_announced_as_interrupted(make_store: MakeStore) -> None:
    first = await make_store(chunk_size=CHUNK)
    data = content(200_000, 30)
    key = (await register(first, [("cut.bin", data)]))["transfer_key"]
    server = first.client.server
    _, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        (
            f"PATCH /files/{key}/0 HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
            f"Content-Type: {OFFSET_TYPE}\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        + data[: 4 * CHUNK]
    )
    await writer.drain()
    staged = first.staging / f"{key}.0.part"
    await until(lambda: staged.exists() and staged.stat().st_size == 4 * CHUNK, "the bytes sent are staged")
    # The store "stops" with the upload under way: a second one starts on the same state, as after a crash.
    second = await make_store(chunk_size=CHUNK)
    try:
        async with follow(second, headers={"Last-Event-ID": "0"}) as stream:
            events = await stream.take(3)
    finally:
        writer.close()
    assert kinds(events) == [("transfer.created", None), ("file.started", 0), ("file.interrupted", 0)]
    assert (events[2]["bytes"], events[2]["reason"]) == (4 * CHUNK, "lease_expired")
    assert await offset_of(second, key, 0) == 4 * CHUNK
