"""Uploads verified at the speed of the hash: only the declared digests inline, the others after publishing.

An upload computes inline the digests its client declared (MD5, SHA-256, or none: then its size
and any chunk checksums verify it); the store computes the others once the file is published, off
the request's path, records them in the catalogue and announces them (``file.digested``). Until
then the listing says "pending" and a download's ``Repr-Digest`` carries only what is known. The
tests hold the background work at will (a handler whose ``published`` waits), so that the pending
window is observed, not raced; a restart in that window leaves the work to the next start.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from datastore.handlers.directory import DirectoryHandler
from datastore.http.openapi import OPENAPI_PATH
from datastore.lifecycle import digests
from datastore.lifecycle.machine import EVERY_DIGEST_INLINE_UP_TO
from datastore.protocol.digests import parse_repr_digest
from datastore.state.catalogue import StoredFile
from datastore.storage.published import digest_file

from .conftest import MakeStore
from .harness import Store, eventually, md5_hex, sha256_hex
from .test_events import follow
from .test_legacy_protocol import upload_through
from .test_restart import handler_for
from .test_tus import TUS, b64, patch

WAIT = 10.0
ADA = "/O=Lab/CN=Ada"
DATA = os.urandom(300_000) + b"the end\n"
MD5, SHA256 = md5_hex(DATA), sha256_hex(DATA)


class HeldDigests(DirectoryHandler):
    """A DirectoryHandler whose later digests wait until the test lets them be computed."""

    def __init__(self, directory: Path, catalogue: Path) -> None:
        super().__init__(directory, catalogue=catalogue, overwrite=True)
        self.go = asyncio.Event()
        self.asked = asyncio.Event()

    async def published(self, name: str) -> tuple[Path, StoredFile] | None:
        self.asked.set()
        await self.go.wait()
        return await super().published(name)


async def held_store(make_store: MakeStore, tmp_path: Path) -> tuple[Store, HeldDigests]:
    handler = HeldDigests(tmp_path / "root" / "files", tmp_path / "state" / "catalogue" / "files.sqlite3")
    return await make_store(handler), handler


def declared(kind: str) -> dict[str, str]:
    """The digests a client declares: ``md5``, ``sha256`` or ``none``."""
    return {"md5": {"md5": MD5}, "sha256": {"sha256": SHA256}, "none": {}}[kind]


async def upload(store: Store, protocol: str, name: str, kind: str) -> None:
    """Upload DATA as ``name`` by ``protocol``, declaring the digests of ``kind``, as ADA; assert success."""
    if protocol == "legacy":  # an AccessGrid manifest always declares the MD5
        assert kind == "md5"
        await upload_through(store, name, DATA, dn=ADA)
        return
    if protocol == "tus":
        metadata = ",".join(f"{key} {b64(value)}" for key, value in {"filename": name, **declared(kind)}.items())
        headers = {**TUS, "Upload-Length": str(len(DATA)), "Upload-Metadata": metadata}
        async with store.client.post("/files/", headers={**headers, "X-Client-DN": ADA}) as created:
            assert created.status == 201, await created.text()
            location = created.headers["Location"]
        reply = await patch(store.client, location, 0, DATA, identity=ADA)
        assert reply.status == 204, reply
        return
    manifest = {"files": [{"name": name, "size": len(DATA), **declared(kind)}]}
    async with store.client.post("/files/manifest", json=manifest, headers={"X-Client-DN": ADA}) as registered:
        assert registered.status == 201, await registered.text()
        key = (await registered.json())["transfer_key"]
    headers = {"Accept": "application/json", "X-Client-DN": ADA}
    async with store.client.put(f"/files/{key}/0", data=DATA, headers=headers) as put:
        answer = await put.json()
        assert put.status == 200, answer
    await conforms(store, "UploadResult", answer)
    # The answer gives the digests verified, and no other.
    assert (answer["md5"], answer["sha256"]) == (declared(kind).get("md5"), declared(kind).get("sha256"))


async def listing(store: Store) -> dict[str, Any]:
    async with store.client.get("/files/", headers={"Accept": "application/json"}) as reply:
        assert reply.status == 200
        document: dict[str, Any] = await reply.json()
        return document


async def listed(store: Store, name: str) -> dict[str, Any]:
    (entry,) = [f for f in (await listing(store))["files"] if f["name"] == name]
    return dict(entry)


async def conforms(store: Store, schema: str, value: Any) -> None:
    """``value`` is valid against the schema ``schema`` of the store's OpenAPI document."""
    async with store.client.get(OPENAPI_PATH) as reply:
        document = await reply.json()
    jsonschema.validate(value, document["components"]["schemas"][schema])


async def downloaded_digests(store: Store, name: str) -> dict[str, str]:
    """The digests a download of ``name`` announces (hex), after checking its body."""
    async with store.client.get(f"/files/{name}") as reply:
        assert reply.status == 200 and await reply.read() == DATA
        return parse_repr_digest(reply.headers.get("Repr-Digest", ""))


async def digested(store: Store, name: str) -> None:
    async def complete() -> bool:
        return (await listed(store, name))["digests"] == "complete"

    await eventually(complete, f"the digests of {name} to be complete", timeout=WAIT)


CASES = [
    ("put", "md5"),
    ("put", "sha256"),
    ("put", "none"),
    ("tus", "md5"),
    ("tus", "sha256"),
    ("tus", "none"),
    ("legacy", "md5"),
]


@pytest.mark.parametrize(("protocol", "kind"), CASES, ids=[f"{p}-{k}" for p, k in CASES])
async def test_the_digests_not_declared_come_after_publishing_and_are_announced(
    make_store: MakeStore, tmp_path: Path, protocol: str, kind: str
) -> None:
    store, handler = await held_store(make_store, tmp_path)
    name = f"{protocol}-{kind}.bin"
    await upload(store, protocol, name, kind)
    async with asyncio.timeout(WAIT):
        await handler.asked.wait()  # the background work took the file up, and is held

    # Pending: the listing says so (as the API's document describes it), and a download carries
    # only the digests verified.
    known = declared(kind)
    await conforms(store, "Listing", await listing(store))
    entry = await listed(store, name)
    assert (entry["digests"], entry["md5"], entry["sha256"]) == ("pending", known.get("md5"), known.get("sha256"))
    names = {"md5": "md5", "sha256": "sha-256"}
    assert await downloaded_digests(store, name) == {names[k]: v for k, v in known.items()}

    handler.go.set()
    await digested(store, name)

    entry = await listed(store, name)
    assert (entry["md5"], entry["sha256"]) == (MD5, SHA256)
    assert await downloaded_digests(store, name) == {"sha-256": SHA256, "md5": MD5}
    record = await store.handler.describe_file(None, name)
    assert record is not None and (record.md5, record.sha256, record.size) == (MD5, SHA256, len(DATA))
    async with follow(store, headers={"Last-Event-ID": "0"}) as stream:
        events = await stream.until_type("file.digested")
    completed = [e for e in events if e["type"] == "file.completed"]
    assert [(e["name"], e["md5"], e["sha256"]) for e in completed] == [(name, known.get("md5"), known.get("sha256"))]
    last = events[-1]
    assert (last["name"], last["size"], last["md5"], last["sha256"]) == (name, len(DATA), MD5, SHA256)
    # The upload that published it is named, so that its transfer's followers see the event too.
    assert last["transfer"] == completed[0]["transfer"] and last["file"] == 0


async def test_both_digests_declared_leave_nothing_to_do_after_publishing(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store, handler = await held_store(make_store, tmp_path)
    await store.register([("both.bin", DATA)])  # declares MD5 and SHA-256
    key = await store.register([("both2.bin", DATA)])
    assert (await store.put(key, 0, DATA))[0] == 200

    entry = await listed(store, "both2.bin")
    assert (entry["digests"], entry["md5"], entry["sha256"]) == ("complete", MD5, SHA256)
    assert await downloaded_digests(store, "both2.bin") == {"sha-256": SHA256, "md5": MD5}
    assert not handler.asked.is_set()


async def test_a_small_file_is_hashed_both_ways_as_it_arrives(make_store: MakeStore, tmp_path: Path) -> None:
    store, handler = await held_store(make_store, tmp_path)
    headers = {"Accept": "application/json", "X-Client-DN": ADA}
    for name, size in (("small.bin", EVERY_DIGEST_INLINE_UP_TO), ("larger.bin", EVERY_DIGEST_INLINE_UP_TO + 1)):
        body = os.urandom(size)
        manifest = {"files": [{"name": name, "size": size}]}  # declares no digest
        async with store.client.post("/files/manifest", json=manifest, headers=headers) as registered:
            key = (await registered.json())["transfer_key"]
        async with store.client.put(f"/files/{key}/0", data=body, headers=headers) as put:
            answer = await put.json()
            assert put.status == 200, answer
        complete = size <= EVERY_DIGEST_INLINE_UP_TO
        digests = (md5_hex(body), sha256_hex(body)) if complete else (None, None)
        assert (answer["md5"], answer["sha256"]) == digests
        entry = await listed(store, name)
        assert (entry["digests"], entry["md5"], entry["sha256"]) == ("complete" if complete else "pending", *digests)
    # Only the larger file was left to the work after publishing.
    async with asyncio.timeout(WAIT):
        await handler.asked.wait()


async def test_digests_left_undone_by_a_stop_are_computed_at_the_next_start(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store, handler = await held_store(make_store, tmp_path)
    await upload(store, "put", "left.bin", "sha256")
    async with asyncio.timeout(WAIT):
        await handler.asked.wait()
    # The store stops while the file waits for its MD5: the catalogue holds it without one.
    await store.client.close()

    again = await make_store(handler_for(store.root, store.state_dir), root=store.root, state_dir=store.state_dir)
    await digested(again, "left.bin")

    assert await downloaded_digests(again, "left.bin") == {"sha-256": SHA256, "md5": MD5}
    async with follow(again, headers={"Last-Event-ID": "0"}) as stream:
        events = await stream.until_type("file.digested")
    # Found by the start-up's look at the catalogue: its upload is no longer known.
    assert (events[-1]["name"], events[-1]["md5"], events[-1]["transfer"]) == ("left.bin", MD5, None)


async def test_a_start_up_digests_every_file_left_batch_after_batch(
    make_store: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, handler = await held_store(make_store, tmp_path)
    names = [f"left-{i}.bin" for i in range(5)]
    for name in names:
        await upload(store, "put", name, "sha256")
    async with asyncio.timeout(WAIT):
        await handler.asked.wait()
    await store.client.close()
    # More files than one look at the catalogue takes: the start-up looks again while it finds some.
    monkeypatch.setattr(digests, "SCAN_BATCH", 2)

    again = await make_store(handler_for(store.root, store.state_dir), root=store.root, state_dir=store.state_dir)

    for name in names:
        await digested(again, name)
        assert (await listed(again, name))["md5"] == MD5


async def test_a_file_replaced_while_waiting_gets_the_digests_of_its_own_bytes(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store, handler = await held_store(make_store, tmp_path)
    await upload(store, "put", "twice.bin", "none")
    async with asyncio.timeout(WAIT):
        await handler.asked.wait()
    other = b"another version, another size\n" * 1000
    manifest = {"files": [{"name": "twice.bin", "size": len(other), "sha256": sha256_hex(other)}]}
    async with store.client.post("/files/manifest", json=manifest, headers={"X-Client-DN": ADA}) as registered:
        assert registered.status == 201, await registered.text()
        key = (await registered.json())["transfer_key"]
    assert (await store.put(key, 0, other, identity=ADA))[0] == 200

    handler.go.set()
    await digested(store, "twice.bin")

    entry = await listed(store, "twice.bin")
    assert (entry["size"], entry["md5"], entry["sha256"]) == (len(other), md5_hex(other), sha256_hex(other))


# -- the storage side --------------------------------------------------------------------------


def test_digest_file_computes_what_is_asked(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(DATA)

    assert digest_file(path, len(DATA), md5=True, sha256=True) == (MD5, SHA256)
    assert digest_file(path, len(DATA), md5=True, sha256=False) == (MD5, None)
    assert digest_file(path, len(DATA), md5=False, sha256=True) == (None, SHA256)


def test_digest_file_refuses_a_file_that_is_not_the_one_expected(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    assert digest_file(path, len(DATA), md5=True, sha256=True) is None  # gone
    path.write_bytes(DATA + b"x")
    assert digest_file(path, len(DATA), md5=True, sha256=True) is None  # another size
    assert hashlib.sha256(path.read_bytes()).hexdigest() != SHA256
