"""A store behind a real HAProxy (``haproxy_server.py``), as the scale-out deployment puts every node:
the URLs it hands out lead back through the balancer (``public_url``), uploads of every kind and
downloads pass through it, and an event stream through it arrives as events happen (the balancer
neither buffers nor cuts it)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from datastore.client.events import read_events
from datastore.lifecycle.events import transfer_handle

from .haproxy_server import Balancer, free_port, start_haproxy
from .harness import json_manifest, md5_hex, spawn_serve

WAIT = 20.0
TUS = {"Tus-Resumable": "1.0.0"}


@asynccontextmanager
async def node_behind_haproxy(folder: Path) -> AsyncIterator[Balancer]:
    """One ``datastore serve`` node behind HAProxy, told the balancer's URL as its public one."""
    port = free_port()
    public = {"DATASTORE_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    process, (match,) = await spawn_serve("--root", str(folder / "served"), "--node-id", "node-a", env=public)
    balancer: Balancer | None = None
    try:
        node_port = int(match["base"].rsplit(":", 1)[1])
        balancer = await start_haproxy(folder, [("127.0.0.1", node_port)], port=port)
        yield balancer
    finally:
        if balancer is not None:
            await balancer.stop()
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 60)


async def test_uploads_and_downloads_of_every_kind_pass_through_the_balancer(tmp_path: Path) -> None:
    whole, resumed = b"w" * 100_000, b"r" * 300_000
    async with node_behind_haproxy(tmp_path) as balancer, aiohttp.ClientSession(balancer.url) as session:
        async with session.get("/_api/v1/health") as response:
            assert (await response.json())["node"] == "node-a"
            # Every answer names the node that gave it, through the balancer too.
            assert response.headers["X-Datastore-Node"] == "node-a"
        manifest = json_manifest([("whole.bin", whole), ("resumed.bin", resumed)])
        async with session.post("/files/manifest", json=manifest) as response:
            assert response.status == 201, await response.text()
            registered: dict[str, Any] = await response.json()
        key = registered["transfer_key"]
        # The URLs the node hands out lead back through the balancer, not to the node.
        assert [f["upload_url"] for f in registered["files"]] == [
            f"{balancer.url}/files/{key}/0",
            f"{balancer.url}/files/{key}/1",
        ]
        async with session.put(f"/files/{key}/0", data=io.BytesIO(whole)) as response:
            assert response.status == 200, await response.text()
            assert response.headers["X-Datastore-Node"] == "node-a"
        for offset, piece in ((0, resumed[:100_000]), (100_000, resumed[100_000:])):
            headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
            async with session.patch(f"/files/{key}/1", data=piece, headers=headers) as response:
                assert response.status == 204, await response.text()
        for name, content in (("whole.bin", whole), ("resumed.bin", resumed)):
            async with session.get(f"/files/{name}") as response:
                assert response.status == 200
                assert md5_hex(await response.read()) == md5_hex(content)


async def test_an_event_stream_through_the_balancer_carries_each_event_as_it_happens(tmp_path: Path) -> None:
    async with (
        node_behind_haproxy(tmp_path) as balancer,
        aiohttp.ClientSession(balancer.url) as session,
        session.get("/_api/v1/events") as stream,
    ):
        assert stream.status == 200
        events = read_events(stream.content)
        for name in ("first.bin", "second.bin"):
            async with session.post("/files/manifest", json=json_manifest([(name, b"x")])) as response:
                assert response.status == 201
                key = (await response.json())["transfer_key"]
            # The stream shows this registration before the next one is made: nothing held back.
            async with asyncio.timeout(WAIT):
                event = (await anext(events)).json()
            assert (event["type"], event["transfer"]) == ("transfer.created", transfer_handle(key))
