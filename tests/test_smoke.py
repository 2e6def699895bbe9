"""The shortest path through the store: register, upload, list, download."""

from __future__ import annotations

from pathlib import Path

from datastore import DirectoryHandler, FileInfo, Identity

from .conftest import MakeStore
from .harness import ini_manifest, md5_hex, parse_legacy_reply, sha256_hex


async def test_upload_then_download_round_trip(make_store: MakeStore) -> None:
    store = await make_store()
    content = b"hello world\n" * 1000
    key = await store.register([("hello.txt", content)])

    assert await store.put(key, 0, content) == (200, "File transfer OK")

    response = await store.client.get("/files/hello.txt")
    assert response.status == 200
    assert await response.read() == content
    listing = await (await store.client.get("/files/", headers={"Accept": "application/json"})).json()
    assert [(f["name"], f["md5"], f["sha256"]) for f in listing["files"]] == [
        ("hello.txt", md5_hex(content), sha256_hex(content))
    ]
    assert store.staged_files() == []


async def test_health_answers_once_ready(make_store: MakeStore) -> None:
    store = await make_store()
    response = await store.client.get("/_api/v1/health")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"


async def test_readme_embedding_example_refuses_anonymous_uploads(make_store: MakeStore, tmp_path: Path) -> None:
    class VenueHandler(DirectoryHandler):
        async def can_upload(self, identity: Identity, file: FileInfo) -> bool:
            return identity.dn is not None and await super().can_upload(identity, file)

    store = await make_store(VenueHandler(tmp_path / "venues" / "venue-1"), prefix="venue-1")
    anonymous = await store.client.post("/venue-1/manifest", data=ini_manifest([("a.txt", b"a")]))
    assert parse_legacy_reply(await anonymous.text()) == {
        "return_code": ["1"],
        "error_reason": ["Upload error for file a.txt"],
    }
    key = await store.register([("a.txt", b"a")], identity="/O=Lab/CN=Ada")
    assert await store.put(key, 0, b"a", identity="/O=Lab/CN=Ada") == (200, "File transfer OK")
