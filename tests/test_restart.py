"""A restart loses nothing: published files, transfer keys, their owners and
expiry, and uploads that were running when the store stopped.

A restart here is what an operator does: the first store is stopped (its
test client closed, which runs the application's clean-up), then a new store
is started on the same root and state directory, with a new DirectoryHandler
on the same folder and catalogue.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from datastore.handlers.directory import DirectoryHandler
from datastore.http.context import CONTEXT

from .conftest import MakeStore
from .harness import Store, json_manifest, spawn_serve, staged_bytes, start_stalled_upload, until

ADA = "/O=Lab/CN=Ada"
BOB = "/O=Lab/CN=Bob"
#: What the Python client sends for a listing.
JSON = {"Accept": "application/json"}


async def upload(store: Store, name: str, data: bytes, *, identity: str | None = None) -> None:
    """Register ``name`` and send its bytes, asserting the store published it."""
    key = await store.register([(name, data)], identity=identity)
    assert await store.put(key, 0, data, identity=identity) == (200, "File transfer OK")


def handler_for(root: Path, state_dir: Path, prefix: str = "files") -> DirectoryHandler:
    """A fresh DirectoryHandler on the folder and catalogue the store of ``root``/``state_dir`` uses."""
    return DirectoryHandler(root / prefix, catalogue=state_dir / "catalogue" / f"{prefix}.sqlite3")


async def restart(store: Store, make_store: MakeStore, **settings: Any) -> Store:
    """Stop ``store`` and start a new one on the same root, state and catalogue."""
    await store.client.close()
    return await make_store(
        handler_for(store.root, store.state_dir, store.prefix),
        prefix=store.prefix,
        root=store.root,
        state_dir=store.state_dir,
        **settings,
    )


async def test_published_files_are_still_listed_and_served_after_restart(make_store: MakeStore) -> None:
    store = await make_store()
    files = {"ada.txt": (b"Ada's notes\n" * 100, ADA), "anon.bin": (bytes(range(256)) * 40, None)}
    for name, (data, owner) in files.items():
        await upload(store, name, data, identity=owner)
    listing_before = (await (await store.client.get("/files/", headers=JSON)).json())["files"]
    digests_before = {name: (await store.client.head(f"/files/{name}")).headers["Repr-Digest"] for name in files}

    store = await restart(store, make_store)

    listing_after = (await (await store.client.get("/files/", headers=JSON)).json())["files"]
    # Everything but the URL, whose port is the new store's.
    assert [{k: v for k, v in f.items() if k != "url"} for f in listing_after] == [
        {k: v for k, v in f.items() if k != "url"} for f in listing_before
    ]
    for name, (data, _owner) in files.items():
        response = await store.client.get(f"/files/{name}")
        assert response.status == 200
        assert await response.read() == data
        assert response.headers["Repr-Digest"] == digests_before[name]


async def test_transfer_half_done_before_restart_accepts_the_rest_under_the_same_key(make_store: MakeStore) -> None:
    store = await make_store()
    first, second = b"first file\n", b"second file\n"
    key = await store.register([("first.txt", first), ("second.txt", second)])
    assert await store.put(key, 0, first) == (200, "File transfer OK")

    store = await restart(store, make_store)

    assert await store.put(key, 1, second) == (200, "File transfer OK")
    for name, data in (("first.txt", first), ("second.txt", second)):
        response = await store.client.get(f"/files/{name}")
        assert await response.read() == data


async def test_first_file_of_a_transfer_is_refused_again_after_restart_as_already_uploaded(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    first, second = b"first file\n", b"second file\n"
    key = await store.register([("first.txt", first), ("second.txt", second)])
    assert await store.put(key, 0, first) == (200, "File transfer OK")

    store = await restart(store, make_store)

    assert await store.put(key, 0, first) == (409, "File already uploaded")


async def test_upload_stalled_when_the_store_stops_can_be_sent_again_after_restart(make_store: MakeStore) -> None:
    chunk = 4096
    store = await make_store(chunk_size=chunk)
    content = bytes(range(256)) * 256  # 64 KiB
    key = await store.register([("stalled.bin", content)])
    assert store.client.port is not None
    _reader, writer = await start_stalled_upload(
        store.client.host, store.client.port, "files", key, 0, len(content), content[: 4 * chunk]
    )
    await until(lambda: staged_bytes(store.staging) >= chunk, "the store staged part of the body")

    # The store stops while the upload is stalled; its connection dies with it.
    stopping = asyncio.create_task(store.client.close())
    writer.transport.abort()
    await stopping

    store = await restart(store, make_store, chunk_size=chunk)

    assert store.staged_files() == []
    assert await store.put(key, 0, content) == (200, "File transfer OK")
    response = await store.client.get("/files/stalled.bin")
    assert await response.read() == content


async def test_upload_cut_by_a_crash_can_be_sent_again_after_restart(make_store: MakeStore, tmp_path: Path) -> None:
    """The first store is a real process killed with SIGKILL mid-upload: no clean-up runs at all."""
    root, state_dir = tmp_path / "root", tmp_path / "state"
    chunk = 4096
    process, (match,) = await spawn_serve(
        "--root", str(root), "--state-dir", str(state_dir), env={"DATASTORE_CHUNK_SIZE": str(chunk)}
    )
    content = bytes(range(256)) * 256  # 64 KiB
    try:
        host, port = match["host"], int(match["port"])
        async with aiohttp.ClientSession() as session:
            posted = await session.post(f"{match['url']}manifest", json=json_manifest([("crashed.bin", content)]))
            assert posted.status == 201, await posted.text()
            key = (await posted.json())["transfer_key"]
        _reader, writer = await start_stalled_upload(host, port, "files", key, 0, len(content), content[: 4 * chunk])
        await until(lambda: staged_bytes(state_dir / "staging") >= chunk, "the store staged part of the body")

        process.send_signal(signal.SIGKILL)
        await process.wait()
        writer.transport.abort()
        assert staged_bytes(state_dir / "staging") >= chunk  # the crash left its partial file behind
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    store = await make_store(handler_for(root, state_dir), root=root, state_dir=state_dir)

    # What reached the disk before the crash is kept for a resumable client; a whole-body
    # PUT starts the file again from its first byte.
    head = await store.client.head(f"/files/{key}/0", headers={"Tus-Resumable": "1.0.0"})
    assert int(head.headers["Upload-Offset"]) == staged_bytes(state_dir / "staging") >= chunk
    assert await store.put(key, 0, content) == (200, "File transfer OK")
    assert store.staged_files() == []
    response = await store.client.get("/files/crashed.bin")
    assert await response.read() == content


async def test_transfer_key_stays_bound_to_its_identity_after_restart(make_store: MakeStore) -> None:
    store = await make_store()
    content = b"Ada's slides\n"
    key = await store.register([("slides.txt", content)], identity=ADA)

    store = await restart(store, make_store)

    status, _reason = await store.put(key, 0, content, identity=BOB)
    assert status == 403
    assert await store.put(key, 0, content, identity=ADA) == (200, "File transfer OK")


async def test_transfer_key_expiry_is_kept_across_restart(make_store: MakeStore) -> None:
    store = await make_store()
    content = b"late\n"
    key = await store.register([("late.txt", content)])

    # The new start gives new keys a far longer life; the old key keeps its own deadline.
    store = await restart(store, make_store, key_lifetime=10.0**9)
    expired = await store.client.app[CONTEXT].lifecycle.expire(now=time.time() + 10**6)

    assert expired == 1
    status, _reason = await store.put(key, 0, content)
    assert status == 410


async def test_transfer_key_expired_before_restart_stays_expired(make_store: MakeStore) -> None:
    store = await make_store()
    content = b"late\n"
    key = await store.register([("late.txt", content)])
    assert await store.client.app[CONTEXT].lifecycle.expire(now=time.time() + 10**6) == 1

    store = await restart(store, make_store)

    status, _reason = await store.put(key, 0, content)
    assert status == 410
