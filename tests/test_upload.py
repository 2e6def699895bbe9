"""Uploads: the handler's call order, verification, cleanup after every failure, limits.

Every test runs a real store on loopback. What a client library will not send
(a body cut short, a body that stalls, chunked framing, headers without their
body) goes over a raw socket. Nothing sleeps to guess at timing: a test that
must know where the server stands awaits the handler callback that proves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import random
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

import datastore.http.context
from datastore.handlers.directory import DirectoryHandler
from datastore.handlers.interface import FileInfo
from datastore.security.identity import Identity

from .conftest import MakeStore
from .fakes import RecordingHandler
from .harness import Store, json_manifest, md5_hex, sha256_hex
from .waiting import WallClock

ADA = "/O=Lab/CN=Ada"
#: Upper bound on anything a test awaits from the server.
WAIT = 10.0

SUCCESS = ["can_upload", "add_pending_upload", "get_upload_filename", "complete_upload"]


class WatchedHandler(RecordingHandler):
    """A RecordingHandler a test can await: ``returned(method)`` comes back once
    the server's call of ``method`` has returned."""

    def __init__(self, directory: Path, catalogue: Path, *, refuse: Sequence[str] = ()) -> None:
        super().__init__(directory, catalogue, refuse=refuse)
        self.finished: list[str] = []
        self._changed = asyncio.Event()

    def _finish(self, method: str) -> None:
        self.finished.append(method)
        self._changed.set()

    async def get_upload_filename(self, identity: Identity, file: FileInfo) -> Path | None:
        try:
            return await super().get_upload_filename(identity, file)
        finally:
            self._finish("get_upload_filename")

    async def cancel_upload(self, identity: Identity, file: FileInfo) -> None:
        try:
            await super().cancel_upload(identity, file)
        finally:
            self._finish("cancel_upload")

    async def returned(self, method: str, *, times: int = 1) -> None:
        async with asyncio.timeout(WAIT):
            while self.finished.count(method) < times:
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def recording(tmp_path: Path) -> WatchedHandler:
    return WatchedHandler(tmp_path / "root" / "files", tmp_path / "state" / "cat.sqlite3")


# -- raw HTTP -----------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


class RawConnection:
    """One HTTP/1.1 connection to the store, written by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host

    async def send_head(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", *(f"{k}: {v}" for k, v in headers.items())]
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> RawResponse:
        async with asyncio.timeout(WAIT):
            status_line = await self.reader.readline()
            assert status_line, "the server closed the connection without answering"
            _version, _, rest = status_line.decode("latin-1").rstrip("\r\n").partition(" ")
            status, _, reason = rest.partition(" ")
            headers: dict[str, str] = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return RawResponse(int(status), reason, headers, body)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_connection(store: Store) -> AsyncIterator[RawConnection]:
    host, port = store.client.host, store.client.port
    reader, writer = await asyncio.open_connection(host, port)
    connection = RawConnection(reader, writer, f"{host}:{port}")
    try:
        yield connection
    finally:
        await connection.close()


def raw_upload_head(length: int) -> dict[str, str]:
    return {"Content-Type": "application/octet-stream", "Content-Length": str(length)}


# -- shared steps ---------------------------------------------------------------


async def post_manifest(store: Store, manifest: Any) -> tuple[int, Any]:
    async with store.client.post(f"/{store.prefix}/manifest", json=manifest) as response:
        return response.status, await response.json()


async def download(store: Store, name: str) -> tuple[int, bytes]:
    async with store.client.get(f"/{store.prefix}/{name}") as response:
        return response.status, await response.read()


async def assert_clean_then_retry(store: Store, handler: RecordingHandler, key: str, name: str, content: bytes) -> None:
    """After a failed upload: nothing staged, nothing published, and the file can be sent again."""
    assert store.staged_files() == []
    assert name not in store.served_files()
    assert (await download(store, name))[0] == 404
    before = len(handler.calls)
    assert await store.put(key, 0, content) == (200, "File transfer OK")
    # The failure released the reservation, so the server takes it again first.
    assert handler.methods()[before:] == SUCCESS
    assert await download(store, name) == (200, content)


# -- the call order of a success ----------------------------------------------------


async def test_successful_upload_calls_the_handler_in_order(make_store: MakeStore, recording: WatchedHandler) -> None:
    store = await make_store(recording)
    content = b"slides\n" * 100
    key = await store.register([("slides.ppt", content)])

    assert await store.put(key, 0, content) == (200, "File transfer OK")

    assert recording.calls == [(method, "slides.ppt") for method in SUCCESS]
    assert (recording.completed[0].md5, recording.completed[0].sha256) == (md5_hex(content), sha256_hex(content))


async def test_file_is_in_the_catalogue_the_moment_the_200_arrives(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    store = await make_store(recording)
    content = b"minutes"
    key = await store.register([("minutes.txt", content)])

    assert await store.put(key, 0, content) == (200, "File transfer OK")

    assert recording.methods()[-1] == "complete_upload"
    listing = await (await store.client.get("/files/", headers={"Accept": "application/json"})).json()
    assert [f["name"] for f in listing["files"]] == ["minutes.txt"]


# -- failures that release the reservation -----------------------------------------


async def test_size_mismatch_is_405_and_cancels_the_reservation(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    store = await make_store(recording)
    content = b"0123456789"
    key = await store.register([("a.bin", content)])

    assert await store.put(key, 0, content + b"extra") == (405, "Size in manifest != size in Content-Length")

    assert recording.methods() == ["can_upload", "add_pending_upload", "cancel_upload"]
    await assert_clean_then_retry(store, recording, key, "a.bin", content)


async def test_checksum_mismatch_is_405_and_cancels_the_reservation(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    store = await make_store(recording)
    content = b"0123456789"
    key = await store.register([("a.bin", content)])

    assert await store.put(key, 0, b"9876543210") == (405, "Checksum mismatch on upload")

    assert recording.methods() == ["can_upload", "add_pending_upload", "get_upload_filename", "cancel_upload"]
    await assert_clean_then_retry(store, recording, key, "a.bin", content)


async def test_wrong_sha256_alone_is_a_checksum_mismatch(make_store: MakeStore, recording: WatchedHandler) -> None:
    store = await make_store(recording)
    content = b"0123456789"
    manifest = {"files": [{"name": "a.bin", "size": 10, "md5": md5_hex(content), "sha256": sha256_hex(b"other")}]}
    status, body = await post_manifest(store, manifest)
    assert status == 201, body

    assert await store.put(body["transfer_key"], 0, content) == (405, "Checksum mismatch on upload")

    assert recording.methods() == ["can_upload", "add_pending_upload", "get_upload_filename", "cancel_upload"]
    assert store.staged_files() == []
    assert "a.bin" not in store.served_files()


async def test_body_cut_short_by_the_client_cancels_the_reservation(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    store = await make_store(recording)
    content = bytes(range(256)) * 64
    key = await store.register([("cut.bin", content)])

    async with raw_connection(store) as connection:
        await connection.send_head("PUT", f"/files/{key}/0", raw_upload_head(len(content)))
        await connection.send(content[: len(content) // 2])
        await recording.returned("get_upload_filename")
    await recording.returned("cancel_upload")

    assert recording.methods() == ["can_upload", "add_pending_upload", "get_upload_filename", "cancel_upload"]
    await assert_clean_then_retry(store, recording, key, "cut.bin", content)


async def test_form_larger_than_the_manifest_allows_is_413_and_cancels_the_reservation(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    store = await make_store(recording)
    content = b"small file"
    key = await store.register([("small.txt", content)])
    form = aiohttp.FormData()
    form.add_field("file", b"x" * (200 << 10), filename="small.txt", content_type="text/plain")

    async with store.client.post(f"/files/{key}/0", data=form) as response:
        assert response.status == 413

    assert recording.methods() == ["can_upload", "add_pending_upload", "cancel_upload"]
    await assert_clean_then_retry(store, recording, key, "small.txt", content)


async def test_raw_body_without_content_length_is_411_and_cancels_the_reservation(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    store = await make_store(recording)
    content = b"sent in chunks"
    key = await store.register([("chunked.txt", content)])

    async with raw_connection(store) as connection:
        headers = {"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked"}
        await connection.send_head("PUT", f"/files/{key}/0", headers)
        await connection.send(f"{len(content):x}\r\n".encode() + content + b"\r\n0\r\n\r\n")
        response = await connection.response()

    assert (response.status, response.reason) == (411, "Content-Length required")
    assert recording.methods() == ["can_upload", "add_pending_upload", "cancel_upload"]
    await assert_clean_then_retry(store, recording, key, "chunked.txt", content)


async def test_not_enough_disk_space_is_405_and_cancels_the_reservation(
    make_store: MakeStore, recording: WatchedHandler, tmp_path: Path
) -> None:
    # The disk fills up between the manifest and the upload: register on a store with room,
    # then upload through the same store restarted with more headroom than the disk has.
    content = b"does not fit"
    roomy = await make_store(RecordingHandler(tmp_path / "root" / "files", tmp_path / "state" / "cat.sqlite3"))
    key = await roomy.register([("big.bin", content)])
    await roomy.client.close()
    more_than_the_disk = shutil.disk_usage(tmp_path).total * 2
    store = await make_store(recording, min_free_bytes=more_than_the_disk)

    assert await store.put(key, 0, content) == (405, "Not enough disk space for upload")

    assert recording.methods() == ["get_upload_filename", "cancel_upload"]
    assert store.staged_files() == []
    assert "big.bin" not in store.served_files()
    assert (await download(store, "big.bin"))[0] == 404

    # Once there is room (the same store restarted with the default headroom) the file goes through.
    await store.client.close()
    handler = WatchedHandler(tmp_path / "root" / "files", tmp_path / "state" / "cat.sqlite3")
    restarted = await make_store(handler)
    assert await restarted.put(key, 0, content) == (200, "File transfer OK")
    assert handler.methods() == SUCCESS
    assert await download(restarted, "big.bin") == (200, content)


# -- failures that leave the reservation alone -----------------------------------------


async def test_key_used_by_another_identity_is_403_and_keeps_the_reservation(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    store = await make_store(recording)
    content = b"Ada's notes"
    key = await store.register([("notes.txt", content)], identity="/O=Lab/CN=Ada")

    status, reason = await store.put(key, 0, content, identity="/O=Lab/CN=Eve")

    assert (status, reason) == (403, "Transfer key belongs to another identity")
    assert recording.methods() == ["can_upload", "add_pending_upload"]
    assert await store.put(key, 0, content, identity="/O=Lab/CN=Ada") == (200, "File transfer OK")
    assert recording.methods() == SUCCESS


async def test_second_upload_while_the_first_is_running_is_409_and_the_first_finishes(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    store = await make_store(recording)
    content = b"first and only " * 1000
    key = await store.register([("once.txt", content)])

    async with raw_connection(store) as first:
        await first.send_head("PUT", f"/files/{key}/0", raw_upload_head(len(content)))
        await first.send(content[: len(content) // 2])
        await recording.returned("get_upload_filename")

        assert await store.put(key, 0, content) == (409, "Upload of this file already in progress")

        await first.send(content[len(content) // 2 :])
        response = await first.response()

    assert (response.status, response.reason) == (200, "File transfer OK")
    assert recording.methods() == SUCCESS
    assert await download(store, "once.txt") == (200, content)


async def test_upload_of_a_file_already_uploaded_is_409(make_store: MakeStore, recording: WatchedHandler) -> None:
    store = await make_store(recording)
    content = b"done"
    key = await store.register([("done.txt", content)])
    assert await store.put(key, 0, content) == (200, "File transfer OK")

    assert await store.put(key, 0, b"redo") == (409, "File already uploaded")

    assert recording.methods() == SUCCESS
    assert await download(store, "done.txt") == (200, content)


async def test_unknown_transfer_key_is_404(make_store: MakeStore, recording: WatchedHandler) -> None:
    store = await make_store(recording)
    content = b"real"
    key = await store.register([("real.txt", content)])

    assert (await store.put(secrets.token_hex(20), 0, content))[0] == 404

    assert recording.methods() == ["can_upload", "add_pending_upload"]
    assert await store.put(key, 0, content) == (200, "File transfer OK")


@pytest.mark.parametrize(
    "num",
    [
        pytest.param("1", id="one-past-the-end"),
        pytest.param("1000", id="far-past-the-end"),
        pytest.param("-1", id="negative"),
        pytest.param("1000000000000", id="huge"),
        pytest.param("0x0", id="not-a-number"),
    ],
)
async def test_file_number_outside_the_manifest_is_404(
    make_store: MakeStore, recording: WatchedHandler, num: str
) -> None:
    store = await make_store(recording)
    content = b"only file"
    key = await store.register([("only.txt", content)])

    async with store.client.put(f"/files/{key}/{num}", data=content) as response:
        assert response.status == 404

    assert recording.methods() == ["can_upload", "add_pending_upload"]
    assert await store.put(key, 0, content) == (200, "File transfer OK")


# -- manifests -------------------------------------------------------------------------


async def test_manifest_with_one_refused_file_reserves_nothing(make_store: MakeStore, tmp_path: Path) -> None:
    handler = RecordingHandler(tmp_path / "root" / "files", tmp_path / "state" / "cat.sqlite3", refuse=["b.txt"])
    store = await make_store(handler)

    status, body = await post_manifest(store, json_manifest([("a.txt", b"a"), ("b.txt", b"b"), ("c.txt", b"c")]))

    assert status == 403
    assert [f["name"] for f in body["files"]] == ["b.txt"]
    assert "add_pending_upload" not in handler.methods()
    # a.txt and c.txt were not left reserved.
    await store.register([("a.txt", b"a"), ("c.txt", b"c")])


async def test_two_concurrent_manifests_for_one_name_exactly_one_wins(make_store: MakeStore) -> None:
    store = await make_store()
    shared = ("shared.txt", b"shared")

    results = await asyncio.gather(
        post_manifest(store, json_manifest([shared, ("one.txt", b"1")])),
        post_manifest(store, json_manifest([shared, ("two.txt", b"2")])),
    )

    assert sorted(status for status, _ in results) == [201, 403]
    loser = 0 if results[0][0] == 403 else 1
    assert [f["name"] for f in results[loser][1]["files"]] == ["shared.txt"]
    # The losing manifest reserved none of its files.
    await store.register([("one.txt", b"1")] if loser == 0 else [("two.txt", b"2")])


async def test_json_manifest_answers_201_with_key_expiry_and_upload_urls(make_store: MakeStore) -> None:
    store = await make_store(key_lifetime=3600)
    files = [("a.txt", b"alpha"), ("b.txt", b"beta")]

    before = time.time()
    status, body = await post_manifest(store, json_manifest(files))

    assert status == 201, body
    key = body["transfer_key"]
    assert re.fullmatch(r"[0-9a-f]{32,}", key)
    expires_at = datetime.fromisoformat(body["expires_at"]).timestamp()
    assert before + 3600 - 1 <= expires_at <= time.time() + 3600 + 1
    assert [(f["num"], f["name"], f["size"]) for f in body["files"]] == [(0, "a.txt", 5), (1, "b.txt", 4)]
    for f in body["files"]:
        url = URL(f["upload_url"])
        assert url.origin() == store.client.make_url("/").origin()
        assert url.path == f"/files/{key}/{f['num']}"


async def test_upload_urls_of_the_json_reply_accept_a_put(make_store: MakeStore) -> None:
    store = await make_store()
    files = [("a.txt", b"alpha"), ("b.txt", b"beta")]
    status, body = await post_manifest(store, json_manifest(files))
    assert status == 201, body

    for announced, (name, content) in zip(body["files"], files, strict=True):
        async with store.client.session.put(announced["upload_url"], data=content) as response:
            assert (response.status, await response.text()) == (200, "File transfer OK\n")
        assert await download(store, name) == (200, content)


async def test_two_manifests_get_different_keys(make_store: MakeStore) -> None:
    store = await make_store()

    first = await store.register([("a.txt", b"a")])
    second = await store.register([("b.txt", b"b")])

    assert first != second


# -- upload bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "POST"])
async def test_raw_body_upload_works_with_put_and_post(make_store: MakeStore, method: str) -> None:
    store = await make_store()
    content = b"raw bytes \x00\xff" * 50
    key = await store.register([("raw.bin", content)])

    async with store.client.request(
        method, f"/files/{key}/0", data=content, headers={"Content-Type": "application/octet-stream"}
    ) as response:
        assert (response.status, response.reason) == (200, "File transfer OK")

    assert await download(store, "raw.bin") == (200, content)


async def test_browser_form_upload_with_a_text_field_before_the_file(make_store: MakeStore) -> None:
    store = await make_store()
    content = b"\x89PNG not really" * 100
    key = await store.register([("photo.png", content)])
    form = aiohttp.FormData()
    form.add_field("caption", "holiday")
    form.add_field("file", content, filename="photo.png", content_type="image/png")

    async with store.client.post(f"/files/{key}/0", data=form) as response:
        assert (response.status, await response.text()) == (200, "File transfer OK\n")

    assert await download(store, "photo.png") == (200, content)


async def test_form_without_a_file_field_is_400(make_store: MakeStore) -> None:
    store = await make_store()
    key = await store.register([("photo.png", b"picture")])
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("caption", "no file here")

    async with store.client.post(f"/files/{key}/0", data=form) as response:
        assert response.status == 400

    assert store.staged_files() == []
    assert "photo.png" not in store.served_files()


async def test_expect_100_continue_for_a_file_already_uploaded_gets_409_instead_of_100(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    content = b"uploaded"
    key = await store.register([("up.txt", content)])
    assert await store.put(key, 0, content) == (200, "File transfer OK")

    async with raw_connection(store) as connection:
        headers = {**raw_upload_head(len(content)), "Expect": "100-continue"}
        await connection.send_head("PUT", f"/files/{key}/0", headers)
        response = await connection.response()

    assert (response.status, response.reason) == (409, "File already uploaded")


async def test_large_upload_is_streamed_and_stored_intact(make_store: MakeStore) -> None:
    store = await make_store()
    content = random.Random(20).randbytes(20 << 20)
    key = await store.register([("large.bin", content)])

    async with store.client.put(f"/files/{key}/0", data=io.BytesIO(content)) as response:
        assert (response.status, response.reason) == (200, "File transfer OK")

    digest = hashlib.sha256()
    async with store.client.get("/files/large.bin") as response:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == sha256_hex(content)
    assert store.staged_files() == []


async def test_file_being_uploaded_is_not_visible_at_its_final_name(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    store = await make_store(recording, chunk_size=64 << 10)
    content = random.Random(7).randbytes(1 << 20)
    key = await store.register([("pending.bin", content)])

    async with raw_connection(store) as connection:
        await connection.send_head("PUT", f"/files/{key}/0", raw_upload_head(len(content)))
        await connection.send(content[: len(content) // 2])
        await recording.returned("get_upload_filename")

        assert (await download(store, "pending.bin"))[0] == 404
        assert "pending.bin" not in store.served_files()

        await connection.send(content[len(content) // 2 :])
        response = await connection.response()

    assert response.status == 200
    assert await download(store, "pending.bin") == (200, content)


# -- expiry, timeouts and limits ---------------------------------------------------------


async def test_upload_after_the_sweeper_expired_the_key_is_410_and_the_name_is_free_again(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    store = await make_store(recording, key_lifetime=3600)
    content = b"late"
    key = await store.register([("late.txt", content)])
    ctx = store.client.app[datastore.http.context.CONTEXT]

    assert await ctx.lifecycle.expire(now=time.time() + 7200) == 1

    assert recording.methods() == ["can_upload", "add_pending_upload", "cancel_upload"]
    assert await store.put(key, 0, content) == (410, "Transfer key expired")
    assert recording.methods() == ["can_upload", "add_pending_upload", "cancel_upload"]
    fresh = await store.register([("late.txt", content)])
    assert await store.put(fresh, 0, content) == (200, "File transfer OK")


async def test_upload_after_the_key_lifetime_passed_is_410(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = WallClock(monkeypatch)
    store = await make_store(key_lifetime=3600)
    content = b"too late"
    status, body = await post_manifest(store, json_manifest([("late.txt", content)]))
    assert status == 201, body
    expires_at = datetime.fromisoformat(body["expires_at"]).timestamp()

    # The key's own lifetime is the behaviour under test: the clock moves past it (the sweeper has not run).
    clock.advance(expires_at + 1 - time.time())

    assert await store.put(body["transfer_key"], 0, content) == (410, "Transfer key expired")
    assert "late.txt" not in store.served_files()


async def test_client_that_stalls_mid_body_gets_408_and_its_upload_is_cleaned_up(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    # Only the stalling request meets the short body timeout: the manifest and the retry go to the
    # same store restarted with the default one, so a busy machine cannot make them time out too.
    store = await make_store(recording)
    content = b"slow " * 2000
    key = await store.register([("slow.txt", content)])
    await store.client.close()
    impatient = await make_store(recording, body_timeout=0.3)

    async with raw_connection(impatient) as connection:
        await connection.send_head("PUT", f"/files/{key}/0", raw_upload_head(len(content)))
        await connection.send(content[: len(content) // 2])
        response = await connection.response()

    assert response.status == 408
    assert recording.methods() == ["can_upload", "add_pending_upload", "get_upload_filename", "cancel_upload"]
    await impatient.client.close()
    store = await make_store(recording)
    await assert_clean_then_retry(store, recording, key, "slow.txt", content)


async def test_upload_beyond_the_concurrency_limit_is_503_with_retry_after(
    make_store: MakeStore, recording: WatchedHandler
) -> None:
    store = await make_store(recording, max_concurrent_uploads=1)
    first, second = b"first " * 1000, b"second"
    key = await store.register([("first.txt", first), ("second.txt", second)])

    async with raw_connection(store) as connection:
        await connection.send_head("PUT", f"/files/{key}/0", raw_upload_head(len(first)))
        await connection.send(first[:100])
        await recording.returned("get_upload_filename")

        async with store.client.put(f"/files/{key}/1", data=second) as busy:
            assert busy.status == 503
            assert busy.headers["Retry-After"].isdigit()

        await connection.send(first[100:])
        response = await connection.response()

    assert response.status == 200
    assert await store.put(key, 1, second) == (200, "File transfer OK")
    assert await download(store, "second.txt") == (200, second)


# -- overwriting ----------------------------------------------------------------------------


async def test_manifest_for_a_name_already_published_is_refused_by_default(make_store: MakeStore) -> None:
    store = await make_store()
    key = await store.register([("report.txt", b"version 1")])
    assert await store.put(key, 0, b"version 1") == (200, "File transfer OK")

    status, body = await post_manifest(store, json_manifest([("report.txt", b"version 2")]))

    assert status == 403
    assert [f["name"] for f in body["files"]] == ["report.txt"]
    assert await download(store, "report.txt") == (200, b"version 1")


async def test_overwriting_handler_replaces_the_published_file(make_store: MakeStore, tmp_path: Path) -> None:
    handler = DirectoryHandler(
        tmp_path / "root" / "files", catalogue=tmp_path / "state" / "cat.sqlite3", overwrite=True
    )
    store = await make_store(handler)
    key = await store.register([("report.txt", b"version 1")], identity=ADA)
    assert await store.put(key, 0, b"version 1", identity=ADA) == (200, "File transfer OK")

    key = await store.register([("report.txt", b"version 2, longer")], identity=ADA)
    assert await store.put(key, 0, b"version 2, longer", identity=ADA) == (200, "File transfer OK")

    assert await download(store, "report.txt") == (200, b"version 2, longer")
    listing = await (await store.client.get("/files/", headers={"Accept": "application/json"})).json()
    assert [(f["name"], f["sha256"]) for f in listing["files"]] == [("report.txt", sha256_hex(b"version 2, longer"))]


async def test_many_concurrent_uploads_share_a_two_buffer_budget_and_all_are_verified(make_store: MakeStore) -> None:
    # Ten uploads, room in memory for two buffers of received bytes: the others wait their turn.
    store = await make_store(chunk_size=64 << 10, upload_buffer_budget=128 << 10, max_uploads_per_client=10)
    contents = [random.Random(seed).randbytes(1 << 20) for seed in range(10)]
    key = await store.register([(f"shared-{i}.bin", data) for i, data in enumerate(contents)])

    results = await asyncio.gather(*(store.put(key, i, data) for i, data in enumerate(contents)))

    assert results == [(200, "File transfer OK")] * len(contents)
    listed = {
        f["name"]: f
        for f in (await (await store.client.get("/files/", headers={"Accept": "application/json"})).json())["files"]
    }
    for i, data in enumerate(contents):
        assert listed[f"shared-{i}.bin"]["sha256"] == sha256_hex(data)


async def test_a_manifest_sent_again_with_its_idempotency_key_finds_the_same_transfer(make_store: MakeStore) -> None:
    store = await make_store()
    files = [("a.bin", b"a" * 10)]
    headers = {"X-Client-DN": ADA, "Idempotency-Key": "job-1-file-0"}
    first = await store.client.post("/files/manifest", json=json_manifest(files), headers=headers)
    again = await store.client.post("/files/manifest", json=json_manifest(files), headers=headers)
    assert first.status == again.status == 201
    key = (await first.json())["transfer_key"]
    assert (await again.json())["transfer_key"] == key
    # Another identity's key of the same name is its own; other files under the same key are refused.
    other = await store.client.post(
        "/files/manifest", json=json_manifest([("b.bin", b"b")]), headers={**headers, "X-Client-DN": "/CN=Bob"}
    )
    assert other.status == 201 and (await other.json())["transfer_key"] != key
    clash = await store.client.post("/files/manifest", json=json_manifest([("c.bin", b"c")]), headers=headers)
    assert clash.status == 409 and "Idempotency-Key" in (await clash.json())["message"]
    # Uploaded, it is still found: a client whose answer was lost learns the file is there.
    upload = await store.client.put(f"/files/{key}/0", data=b"a" * 10, headers={"X-Client-DN": ADA})
    assert upload.status == 200
    found = await store.client.post("/files/manifest", json=json_manifest(files), headers=headers)
    assert (await found.json())["transfer_key"] == key
    bad = await store.client.post(
        "/files/manifest", json=json_manifest(files), headers={**headers, "Idempotency-Key": "k" * 256}
    )
    assert bad.status == 400
