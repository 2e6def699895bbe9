"""Events across processes, with the real ``datastore serve``: a stream that catches up across a
restart, one stream carrying the events of both workers of ``--workers 2``, webhooks (a receiver
that fails and recovers, one that never answers), and ``datastore watch`` with its reconnect.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from datastore.client.events import read_events

from .harness import json_manifest, spawn_serve, until
from .test_workers import Served

TUS = {"Tus-Resumable": "1.0.0"}
WAIT = 20.0


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        await asyncio.wait_for(process.wait(), 60)


async def upload(session: aiohttp.ClientSession, name: str, data: bytes) -> str:
    """Register ``name`` and PUT it; its key."""
    async with session.post("/files/manifest", json=json_manifest([(name, data)])) as response:
        assert response.status == 201, await response.text()
        key: str = (await response.json())["transfer_key"]
    async with session.put(f"/files/{key}/0", data=io.BytesIO(data)) as response:
        assert response.status == 200, await response.text()
    return key


@asynccontextmanager
async def stream(base: str, last_event_id: int | None = None) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    async with aiohttp.ClientSession() as session, session.get(f"{base}/_api/v1/events", headers=headers) as response:
        assert response.status == 200

        async def events() -> AsyncIterator[dict[str, Any]]:
            async for message in read_events(response.content):
                event: dict[str, Any] = message.json()
                if event["type"] != "file.progress":
                    yield event

        yield events()


async def take(events: AsyncIterator[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(WAIT):
        return [await anext(events) for _ in range(count)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- a restart ------------------------------------------------------------------------------------


async def test_a_stream_catches_up_across_a_restart_of_the_store(tmp_path: Path) -> None:
    args = ("--root", str(tmp_path / "root"))
    process, (match,) = await spawn_serve(*args)
    try:
        async with stream(match["base"]) as events, aiohttp.ClientSession(match["base"]) as session:
            await upload(session, "before.bin", b"b" * 100)
            before = await take(events, 4)
    finally:
        await stop(process)
    last = before[-1]["id"]
    process, (match,) = await spawn_serve(*args)
    try:
        async with aiohttp.ClientSession(match["base"]) as session:
            await upload(session, "while-away.bin", b"w" * 200)
            async with stream(match["base"], last_event_id=last) as events:
                missed = await take(events, 4)
                await upload(session, "after.bin", b"a" * 300)
                live = await take(events, 4)
            async with stream(match["base"], last_event_id=0) as events:
                everything = await take(events, 12)
    finally:
        await stop(process)
    assert [e["type"] for e in missed] == ["transfer.created", "file.started", "file.completed", "transfer.finished"]
    assert missed[2]["name"] == "while-away.bin" and live[2]["name"] == "after.bin"
    ids = [e["id"] for e in before + missed + live]
    assert ids == list(range(1, 13))
    assert everything == before + missed + live


# -- workers --------------------------------------------------------------------------------------


async def test_one_stream_carries_the_events_of_both_workers_in_order(tmp_path: Path) -> None:
    state = tmp_path / "state"
    process, (match,) = await spawn_serve("--root", str(tmp_path / "root"), "--state-dir", str(state), "--workers", "2")
    served = Served(process, match["base"], match["host"], int(match["port"]), state)
    try:
        async with stream(served.base) as events:
            names = []
            for worker in (0, 1, 0, 1):
                session = await served.session_on(worker)
                async with session:
                    name = f"from-worker-{worker}-{len(names)}.bin"
                    await upload(session, name, name.encode() * 50)
                    names.append(name)
            received = await take(events, 4 * len(names))
    finally:
        await stop(process)
    completed = [e["name"] for e in received if e["type"] == "file.completed"]
    assert completed == names
    ids = [e["id"] for e in received]
    assert ids == sorted(set(ids))
    for name in names:
        transfer = next(e["transfer"] for e in received if e["name"] == name)
        assert [e["type"] for e in received if e["transfer"] == transfer] == [
            "transfer.created",
            "file.started",
            "file.completed",
            "transfer.finished",
        ]


# -- webhooks -------------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on loopback: fails its first ``failures`` deliveries, or never answers."""

    def __init__(self, failures: int = 0, hang: bool = False) -> None:
        self.failures, self.hang = failures, hang
        self.deliveries: list[dict[str, Any]] = []
        self.headers: list[str] = []
        self.pending = 0
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.deliveries.append(body)
        self.headers.append(request.headers["X-Datastore-Event-Id"])
        if self.hang:
            self.pending += 1
            await self.release.wait()
            return web.Response(status=200)
        if len(self.deliveries) <= self.failures:
            return web.Response(status=503)
        return web.Response(status=204)

    def accepted(self) -> list[dict[str, Any]]:
        """Each event once, by id (the receiver's de-duplication), in the order first received."""
        unique: dict[int, dict[str, Any]] = {}
        for delivery in self.deliveries:
            unique.setdefault(delivery["id"], delivery)
        return list(unique.values())


@asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        receiver.release.set()
        await runner.cleanup()


async def test_a_webhook_that_fails_three_times_still_gets_every_event_once_it_recovers(tmp_path: Path) -> None:
    receiver = Receiver(failures=3)
    async with receiving(receiver) as url:
        process, (match,) = await spawn_serve("--root", str(tmp_path / "root"), "--hook-url", url)
        try:
            async with aiohttp.ClientSession(match["base"]) as session:
                await upload(session, "one.bin", b"1" * 1000)
                await upload(session, "two.bin", b"2" * 2000)
                await until(lambda: len(receiver.accepted()) >= 8, "the receiver has every event", timeout=WAIT)
                async with stream(match["base"], last_event_id=0) as events:
                    logged = await take(events, 8)
        finally:
            await stop(process)
    accepted = receiver.accepted()
    # The same events; the operator's receiver also gets the keys, which an anonymous stream does not.
    assert [{**e, "transfer_key": None} for e in accepted] == logged
    assert all(e["transfer_key"] is not None for e in accepted if e["transfer"] is not None)
    assert [d["id"] for d in receiver.deliveries[:4]] == [1, 1, 1, 1], "the first event, until accepted"
    assert [d["id"] for d in receiver.deliveries[4:]] == list(range(2, 9)), "then each once, in order"
    assert receiver.headers[:5] == ["1", "1", "1", "1", "2"]


async def test_a_webhook_that_never_answers_does_not_slow_an_upload(tmp_path: Path) -> None:
    receiver = Receiver(hang=True)
    async with receiving(receiver) as url:
        process, (match,) = await spawn_serve(
            "--root", str(tmp_path / "root"), "--hook-url", url, env={"DATASTORE_HOOK_TIMEOUT": "600"}
        )
        try:
            async with aiohttp.ClientSession(match["base"]) as session:
                await upload(session, "first.bin", b"f")
                await until(lambda: receiver.pending == 1, "the receiver holds the first delivery")
                started = time.monotonic()
                data = os.urandom(8 << 20)
                await upload(session, "big.bin", data)
                elapsed = time.monotonic() - started
                async with session.get("/files/big.bin") as response:
                    assert await response.read() == data
                # Still held: every event after the first waits, the uploads did not.
                assert receiver.pending == 1 and len(receiver.deliveries) == 1
                print(f"an 8 MiB upload took {elapsed:.3f} s while the webhook hung")
        finally:
            await stop(process)


# -- datastore watch ------------------------------------------------------------------------------


async def test_datastore_watch_prints_events_and_resumes_after_the_store_restarts(tmp_path: Path) -> None:
    port = free_port()
    args = ("--root", str(tmp_path / "root"), "--port", str(port))
    process, (match,) = await spawn_serve(*args)
    watch = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "datastore",
        "watch",
        match["base"],
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert watch.stdout is not None and watch.stderr is not None

    async def line() -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while True:
                event: dict[str, Any] = json.loads(await watch.stdout.readline())  # type: ignore[union-attr]
                if event["type"] != "file.progress":
                    return event

    try:
        async with aiohttp.ClientSession(match["base"]) as session:
            # The watcher follows once it has connected: a first upload shows it.
            await until_connected(match["base"])
            await upload(session, "seen.bin", b"s" * 10)
        first = [await line() for _ in range(4)]
        await stop(process)
        async with asyncio.timeout(WAIT):
            complaint = (await watch.stderr.readline()).decode()
        assert "reconnecting after event 4" in complaint
        process, (match,) = await spawn_serve(*args)
        async with aiohttp.ClientSession(match["base"]) as session:
            await upload(session, "after-restart.bin", b"r" * 10)
        second = [await line() for _ in range(4)]
    finally:
        watch.send_signal(signal.SIGINT)
        await asyncio.wait_for(watch.wait(), 30)
        await stop(process)
    assert [e["id"] for e in first + second] == list(range(1, 9))
    assert (first[2]["name"], second[2]["name"]) == ("seen.bin", "after-restart.bin")


async def until_connected(base: str) -> None:
    """Wait until the store counts an event stream (the watcher's) among its connections."""

    async def streams() -> int:
        async with aiohttp.ClientSession() as session, session.get(f"{base}/_api/v1/health") as response:
            return int((await response.json()).get("event_streams", 0))

    async with asyncio.timeout(WAIT):
        while await streams() < 1:  # noqa: ASYNC110 - another process: nothing to wait on but its answer
            await asyncio.sleep(0.02)
