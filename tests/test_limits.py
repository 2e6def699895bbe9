"""Every configured limit is answered with a clear 413, and nothing is reserved."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from datastore.http.server import HTTPTransferServer

from .conftest import MakeStore
from .harness import ini_manifest, json_manifest, make_settings


async def test_manifest_larger_than_max_manifest_bytes_is_413(make_store: MakeStore) -> None:
    store = await make_store(max_manifest_bytes=200)
    body = ini_manifest([(f"file-{i}.txt", b"x") for i in range(5)])
    assert len(body) > 200
    response = await store.client.post("/files/manifest", data=body)
    assert response.status == 413
    assert "more than the limit of 200" in await response.text()


async def test_chunked_manifest_is_cut_off_at_max_manifest_bytes(make_store: MakeStore) -> None:
    store = await make_store(max_manifest_bytes=200)
    body = ini_manifest([(f"file-{i}.txt", b"x") for i in range(5)])

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 50):
            yield body[start : start + 50]

    response = await store.client.post("/files/manifest", data=chunks())
    assert response.status == 413
    assert await (await store.client.get("/files/", headers={"Accept": "application/json"})).json() == {
        "prefix": "files",
        "files": [],
    }


@pytest.mark.parametrize("form", ["ini", "json"])
async def test_more_files_than_max_files_is_413_and_reserves_nothing(make_store: MakeStore, form: str) -> None:
    store = await make_store(max_files=3)
    files = [(f"file-{i}.txt", b"x") for i in range(4)]
    if form == "ini":
        response = await store.client.post("/files/manifest", data=ini_manifest(files))
    else:
        response = await store.client.post("/files/manifest", json=json_manifest(files))
    assert response.status == 413
    assert "4 files, more than the limit of 3" in await response.text()
    # Nothing was reserved: the same names register fine within the limit.
    await store.register(files[:3])


@pytest.mark.parametrize("form", ["ini", "json"])
async def test_file_larger_than_max_file_size_is_413(make_store: MakeStore, form: str) -> None:
    store = await make_store(max_file_size=1000)
    files = [("big.bin", b"x" * 1001)]
    if form == "ini":
        response = await store.client.post("/files/manifest", data=ini_manifest(files))
    else:
        response = await store.client.post("/files/manifest", json=json_manifest(files))
    assert response.status == 413
    assert "more than the limit of 1000" in await response.text()


async def test_json_limit_errors_are_json(make_store: MakeStore) -> None:
    store = await make_store(max_files=1)
    response = await store.client.post(
        "/files/manifest", json=json_manifest([("a", b"a"), ("b", b"b")]), headers={"Accept": "application/json"}
    )
    assert response.status == 413
    body = json.loads(await response.text())
    assert body["error"] == "too_large"


async def test_raw_body_over_max_file_size_is_413_before_reading_it(make_store: MakeStore) -> None:
    store = await make_store(max_file_size=1000)
    key = await store.register([("small.bin", b"x" * 10)])
    status, reason = await store.put(key, 0, b"x" * 1001)
    assert (status, reason) == (413, "Request too large: 1001 bytes, more than the limit of 1000")
    assert store.staged_files() == []
    # The reservation was released and is taken again by a correct retry.
    assert await store.put(key, 0, b"x" * 10) == (200, "File transfer OK")


async def test_ten_thousand_file_manifest_is_all_or_nothing(make_store: MakeStore) -> None:
    store = await make_store()
    files = [(f"f{i:05d}.bin", b"") for i in range(10_000)]
    taken = await store.register([files[1234]])
    await store.client.delete(f"/_api/v1/transfers/{taken}")  # released again: nothing left reserved
    blocker = await store.register([files[9999]])

    body = json.dumps(json_manifest(files)).encode()
    as_json = {"Content-Type": "application/json"}

    refused = await store.client.post("/files/manifest", data=io.BytesIO(body), headers=as_json)
    assert refused.status == 403
    assert [entry["name"] for entry in (await refused.json())["files"]] == ["f09999.bin"]

    await store.client.delete(f"/_api/v1/transfers/{blocker}")
    accepted = await store.client.post("/files/manifest", data=io.BytesIO(body), headers=as_json)
    assert accepted.status == 201
    assert len((await accepted.json())["files"]) == 10_000


@pytest.mark.parametrize("sent", [b"", b"GET /files/ HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "half-headers"])
async def test_connection_without_a_request_under_way_is_closed_after_idle_timeout(tmp_path: Path, sent: bytes) -> None:
    server = HTTPTransferServer(make_settings(tmp_path / "root", tmp_path / "state", idle_timeout=0.5))
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(sent)
        await writer.drain()
        # The server hangs up on its own; the bound only fails a server that never does.
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
    finally:
        await server.stop()
