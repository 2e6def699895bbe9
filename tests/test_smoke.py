"""The shortest path through the store: register, upload, list, download."""

from __future__ import annotations

from .conftest import MakeStore
from .harness import md5_hex, sha256_hex


async def test_upload_then_download_round_trip(make_store: MakeStore) -> None:
    store = await make_store()
    content = b"hello world\n" * 1000
    key = await store.register([("hello.txt", content)])

    assert await store.put(key, 0, content) == (200, "File transfer OK")

    response = await store.client.get("/files/hello.txt")
    assert response.status == 200
    assert await response.read() == content
    listing = await (await store.client.get("/files/")).json()
    assert [(f["name"], f["md5"], f["sha256"]) for f in listing["files"]] == [
        ("hello.txt", md5_hex(content), sha256_hex(content))
    ]
    assert store.staged_files() == []


async def test_health_answers_once_ready(make_store: MakeStore) -> None:
    store = await make_store()
    response = await store.client.get("/_api/v1/health")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"
