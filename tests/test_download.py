"""Downloads, the listing and deletion, against a real store on loopback.

Each test uploads through the protocol (manifest, then body) and reads the
file back as a browser, curl or a resuming client would.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import os
import re
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from multidict import CIMultiDict

from datastore.handlers.directory import MEMORY_LIMIT, DirectoryHandler
from datastore.state.sqlite_catalogue import SqliteCatalogue

from .conftest import MakeStore
from .harness import Store, md5_hex, sha256_hex, staged_bytes, start_stalled_upload, until

ADA = "/O=Lab/CN=Ada"
BOB = "/O=Lab/CN=Bob"

CONTENT = b"0123456789abcdefghij"  # 20 bytes: ranges are easy to read

# The headers a download carries whatever its method or range.
REPRESENTATION_HEADERS = (
    "Content-Type",
    "Content-Disposition",
    "X-Content-Type-Options",
    "Repr-Digest",
    "ETag",
    "Last-Modified",
    "Accept-Ranges",
)

SF_KEY = re.compile(r"[a-z*][a-z0-9_.*-]*")
SF_BYTES = re.compile(r":([A-Za-z0-9+/]*={0,2}):")


async def upload(store: Store, name: str, data: bytes, *, identity: str | None = None) -> None:
    """Register ``name`` and send its bytes, asserting the store published it."""
    key = await store.register([(name, data)], identity=identity)
    assert await store.put(key, 0, data, identity=identity) == (200, "File transfer OK")


def parse_repr_digest(value: str) -> dict[str, bytes]:
    """Parse an RFC 9530 ``Repr-Digest``: an RFC 8941 dictionary of byte sequences."""
    digests: dict[str, bytes] = {}
    for member in value.split(","):
        key, equals, item = member.strip().partition("=")
        assert equals, f"dictionary member without a value: {member!r}"
        assert SF_KEY.fullmatch(key), f"not a structured-field key: {key!r}"
        match = SF_BYTES.fullmatch(item)
        assert match, f"{key} is not a structured byte sequence (:base64:): {item!r}"
        digests[key] = base64.b64decode(match[1], validate=True)
    return digests


def assert_digests_of(value: str, data: bytes) -> None:
    digests = parse_repr_digest(value)
    assert digests["sha-256"] == hashlib.sha256(data).digest()
    assert digests["md5"] == hashlib.md5(data, usedforsecurity=False).digest()


async def raw_request(store: Store, request: bytes) -> tuple[str, CIMultiDict[str], bytes]:
    """Send one request on a fresh socket and read until the server closes it.

    Returns the status line, the headers and every byte after the header block.
    """
    reader, writer = await asyncio.open_connection(store.client.host, store.client.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read(-1)
    finally:
        writer.close()
        await writer.wait_closed()
    head, separator, rest = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete header block in {raw!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return status_line, headers, rest


# -- GET ----------------------------------------------------------------------


async def test_get_returns_the_bytes_as_an_octet_stream(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)

    response = await store.client.get("/files/notes.txt")

    assert response.status == 200
    assert await response.read() == CONTENT
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Length"] == str(len(CONTENT))


async def test_get_marks_the_file_as_an_attachment_that_is_never_sniffed(make_store: MakeStore) -> None:
    store = await make_store()
    page = b"<html><script>alert(document.cookie)</script></html>"
    await upload(store, "page.html", page)

    response = await store.client.get("/files/page.html")

    assert response.status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Disposition"].split(";")[0].strip() == "attachment"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_content_disposition_carries_a_non_ascii_name_as_utf8_filename_star(make_store: MakeStore) -> None:
    store = await make_store()
    name = "résumé 日本語.txt"
    await upload(store, name, CONTENT)

    response = await store.client.get(f"/files/{name}")

    assert response.status == 200
    disposition = response.headers["Content-Disposition"]
    assert disposition.isascii()
    assert disposition.split(";")[0].strip() == "attachment"
    match = re.search(r"filename\*=UTF-8''([^;\s]+)", disposition)
    assert match, disposition
    assert unquote(match[1], encoding="utf-8", errors="strict") == name


@pytest.mark.parametrize(
    ("method", "request_headers", "status"),
    [
        ("GET", {}, 200),
        ("HEAD", {}, 200),
        ("GET", {"Range": "bytes=0-4"}, 206),
    ],
    ids=["get", "head", "partial"],
)
async def test_repr_digest_gives_sha256_and_md5_of_the_whole_file(
    make_store: MakeStore, method: str, request_headers: dict[str, str], status: int
) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)

    response = await store.client.request(method, "/files/notes.txt", headers=request_headers)
    await response.read()

    assert response.status == status
    assert_digests_of(response.headers["Repr-Digest"], CONTENT)


async def test_head_answers_the_get_headers_without_a_body(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)
    get = await store.client.get("/files/notes.txt")
    await get.read()

    status_line, headers, body = await raw_request(
        store,
        f"HEAD /files/notes.txt HTTP/1.1\r\nHost: {store.client.host}\r\nConnection: close\r\n\r\n".encode(),
    )

    assert status_line.startswith("HTTP/1.1 200")
    assert headers["Content-Length"] == str(len(CONTENT))
    for name in REPRESENTATION_HEADERS:
        assert headers.get(name) == get.headers.get(name), name
    assert body == b""


# -- ranges -------------------------------------------------------------------


async def test_range_of_the_first_bytes_answers_206_with_content_range(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)

    response = await store.client.get("/files/notes.txt", headers={"Range": "bytes=0-4"})

    assert response.status == 206
    assert await response.read() == CONTENT[:5]
    assert response.headers["Content-Range"] == f"bytes 0-4/{len(CONTENT)}"
    assert response.headers["Content-Length"] == "5"


async def test_suffix_range_answers_the_last_bytes(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)

    response = await store.client.get("/files/notes.txt", headers={"Range": "bytes=-3"})

    assert response.status == 206
    assert await response.read() == CONTENT[-3:]
    size = len(CONTENT)
    assert response.headers["Content-Range"] == f"bytes {size - 3}-{size - 1}/{size}"


async def test_open_range_answers_from_the_offset_to_the_end(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)

    response = await store.client.get("/files/notes.txt", headers={"Range": "bytes=5-"})

    assert response.status == 206
    assert await response.read() == CONTENT[5:]
    assert response.headers["Content-Range"] == f"bytes 5-{len(CONTENT) - 1}/{len(CONTENT)}"


async def test_range_beyond_the_end_is_not_satisfiable(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)

    response = await store.client.get("/files/notes.txt", headers={"Range": "bytes=1000-2000"})

    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{len(CONTENT)}"
    assert CONTENT not in await response.read()


async def test_if_range_with_the_current_etag_answers_the_range(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)
    etag = (await store.client.head("/files/notes.txt")).headers["ETag"]

    response = await store.client.get("/files/notes.txt", headers={"Range": "bytes=0-4", "If-Range": etag})

    assert response.status == 206
    assert await response.read() == CONTENT[:5]


async def test_if_range_with_a_stale_etag_answers_the_whole_file(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)
    etag = (await store.client.head("/files/notes.txt")).headers["ETag"]
    stale = '"0-0"' if etag != '"0-0"' else '"1-1"'

    response = await store.client.get("/files/notes.txt", headers={"Range": "bytes=0-4", "If-Range": stale})

    assert response.status == 200
    assert await response.read() == CONTENT
    assert "Content-Range" not in response.headers


# -- conditional requests -----------------------------------------------------


async def test_if_none_match_with_the_etag_answers_304(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)
    etag = (await store.client.head("/files/notes.txt")).headers["ETag"]

    response = await store.client.get("/files/notes.txt", headers={"If-None-Match": etag})

    assert response.status == 304
    assert await response.read() == b""


async def test_if_modified_since_last_modified_answers_304(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)
    last_modified = (await store.client.head("/files/notes.txt")).headers["Last-Modified"]

    response = await store.client.get("/files/notes.txt", headers={"If-Modified-Since": last_modified})

    assert response.status == 304
    assert await response.read() == b""


# -- what is never served -----------------------------------------------------


async def test_pending_file_is_not_found(make_store: MakeStore) -> None:
    store = await make_store()
    await store.register([("pending.txt", CONTENT)])

    response = await store.client.get("/files/pending.txt")

    assert response.status == 404
    assert response.reason == "File not found"
    assert (await response.text()).strip() == "File not found"


async def test_file_stalled_mid_upload_is_not_found_and_no_byte_leaks(make_store: MakeStore) -> None:
    chunk = 4096
    store = await make_store(chunk_size=chunk)
    content = bytes(range(256)) * 256  # 64 KiB
    key = await store.register([("stalled.bin", content)])
    sent = content[: 4 * chunk]
    _reader, writer = await start_stalled_upload(
        store.client.host, store.client.port, store.prefix, key, 0, len(content), sent
    )
    try:
        # The store has taken part of the body: bytes sit in its staging area.
        await until(lambda: staged_bytes(store.staging) >= chunk, "the store staged part of the body")

        response = await store.client.get("/files/stalled.bin")
        body = await response.read()

        assert response.status == 404
        assert response.reason == "File not found"
        assert sent[:16] not in body
        assert "stalled.bin" not in store.served_files()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_file_dropped_into_the_folder_by_hand_is_not_found(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "listed.txt", CONTENT)  # the folder exists and is served
    (store.root / "files" / "dropped.txt").write_bytes(b"put here by hand")

    response = await store.client.get("/files/dropped.txt")

    assert response.status == 404
    assert b"put here by hand" not in await response.read()


async def test_gzip_sibling_is_never_served_in_place_of_the_file(make_store: MakeStore) -> None:
    store = await make_store()
    report = b"the quarterly report, in plain text\n"
    other = gzip.compress(b"another user's archive, not the report\n")
    await upload(store, "report.txt", report)
    await upload(store, "report.txt.gz", other)

    response = await store.client.get("/files/report.txt", headers={"Accept-Encoding": "gzip"})

    assert response.status == 200
    assert "Content-Encoding" not in response.headers
    assert await response.read() == report


# -- routing ------------------------------------------------------------------


async def test_unknown_prefix_is_path_not_found(make_store: MakeStore) -> None:
    store = await make_store()

    response = await store.client.get("/nowhere/notes.txt")

    assert response.status == 404
    assert response.reason == "Path not found"
    assert (await response.text()).strip() == "Path not found"


async def test_prefix_without_slash_redirects_to_the_listing(make_store: MakeStore) -> None:
    store = await make_store()

    response = await store.client.get("/files", allow_redirects=False)

    assert response.status in (301, 308)
    assert response.headers["Location"] == "/files/"


# -- listing ------------------------------------------------------------------


async def test_listing_describes_each_published_file(make_store: MakeStore) -> None:
    store = await make_store()
    mine, anonymous = b"uploaded by Ada\n", b"uploaded by nobody in particular\n"
    before = time.time()
    await upload(store, "ada.txt", mine, identity=ADA)
    await upload(store, "anon.txt", anonymous)
    after = time.time()

    # Ada lists: she sees that she owns ada.txt; nobody owns an anonymous upload.
    response = await store.client.get("/files/", headers={"X-Client-DN": ADA, "Accept": "application/json"})

    assert response.status == 200
    assert response.content_type == "application/json"
    files = {entry["name"]: entry for entry in (await response.json())["files"]}
    assert set(files) == {"ada.txt", "anon.txt"}
    for name, data, owner, yours in (("ada.txt", mine, ADA, True), ("anon.txt", anonymous, None, False)):
        entry = files[name]
        assert entry["size"] == len(data)
        assert entry["md5"] == md5_hex(data)
        assert entry["sha256"] == sha256_hex(data)
        assert (entry["owner"], entry["yours"]) == (owner, yours)
        assert before <= entry["uploaded_at"] <= after
        assert entry["url"] == str(store.client.make_url(f"/files/{name}"))
        fetched = await store.client.session.get(entry["url"])
        assert await fetched.read() == data


# -- delete -------------------------------------------------------------------


async def test_owner_deletes_a_file_and_it_is_gone(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "mine.txt", CONTENT, identity=ADA)

    deleted = await store.client.delete("/files/mine.txt", headers={"X-Client-DN": ADA})

    assert deleted.status == 204
    after = await store.client.get("/files/mine.txt")
    assert after.status == 404
    assert "mine.txt" not in store.served_files()


async def test_another_identity_cannot_delete_a_file(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "mine.txt", CONTENT, identity=ADA)

    refused = await store.client.delete("/files/mine.txt", headers={"X-Client-DN": BOB})

    assert refused.status == 403
    still = await store.client.get("/files/mine.txt")
    assert still.status == 200
    assert await still.read() == CONTENT


async def test_deleting_an_unknown_name_is_not_found(make_store: MakeStore) -> None:
    store = await make_store()

    response = await store.client.delete("/files/never-uploaded.txt", headers={"X-Client-DN": ADA})

    assert response.status == 404


# -- size ---------------------------------------------------------------------


async def test_five_mebibyte_file_downloads_intact(make_store: MakeStore) -> None:
    store = await make_store()
    content = os.urandom(5 << 20)
    key = await store.register([("big.bin", content)])
    # A BytesIO body, so that the client streams it rather than warning about a large bytes body.
    sent = await store.client.put(f"/files/{key}/0", data=io.BytesIO(content))
    assert sent.status == 200, await sent.text()

    response = await store.client.get("/files/big.bin")

    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(content))
    digest = hashlib.sha256()
    received = 0
    async for piece in response.content.iter_chunked(1 << 16):
        digest.update(piece)
        received += len(piece)
    assert received == len(content)
    assert digest.hexdigest() == sha256_hex(content)


# -- remembered downloads -----------------------------------------------------
#
# A DirectoryHandler remembers a download (record, path, file identity and, for
# small files, the bytes) once the file has settled; ``settle_ns = 0`` lets these
# tests see that at once. Whatever happens to the file afterwards must show.


async def remembering_store(make_store: MakeStore, **handler_options: object) -> Store:
    store = await make_store(**handler_options)
    store.handler.settle_ns = 0
    return store


def count_catalogue_queries(store: Store) -> list[int]:
    """Count the handler's catalogue round trips from now on (the first item)."""
    calls = [0]
    catalogue = store.handler.catalogue

    def counting(method):  # type: ignore[no-untyped-def]
        async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[0] += 1
            return await method(*args, **kwargs)

        return counted

    for name in ("check", "reserve", "is_reserved", "release", "publish", "describe", "listing", "delete"):
        setattr(catalogue, name, counting(getattr(catalogue, name)))
    return calls


async def test_remembered_download_answers_as_the_first_one_without_the_catalogue(make_store: MakeStore) -> None:
    store = await remembering_store(make_store)
    await upload(store, "notes.txt", CONTENT)
    first = await store.client.get("/files/notes.txt")
    assert await first.read() == CONTENT
    queries = count_catalogue_queries(store)

    again = await store.client.get("/files/notes.txt")
    # A conditional request takes FileResponse's path: same headers, from the file on disk.
    on_disk = await store.client.get("/files/notes.txt", headers={"If-None-Match": '"not-this-one"'})

    assert queries == [0]
    for response in (again, on_disk):
        assert response.status == 200
        assert await response.read() == CONTENT
        assert response.headers["Content-Length"] == str(len(CONTENT))
        for name in REPRESENTATION_HEADERS:
            assert response.headers.get(name) == first.headers.get(name), name
    assert_digests_of(again.headers["Repr-Digest"], CONTENT)


async def test_remembered_download_still_answers_ranges_and_conditions(make_store: MakeStore) -> None:
    store = await remembering_store(make_store)
    await upload(store, "notes.txt", CONTENT)
    etag = (await store.client.get("/files/notes.txt")).headers["ETag"]

    partial = await store.client.get("/files/notes.txt", headers={"Range": "bytes=0-4"})
    resumed = await store.client.get("/files/notes.txt", headers={"Range": "bytes=5-", "If-Range": etag})
    unchanged = await store.client.get("/files/notes.txt", headers={"If-None-Match": etag})
    head = await store.client.head("/files/notes.txt")

    assert (partial.status, await partial.read()) == (206, CONTENT[:5])
    assert (resumed.status, await resumed.read()) == (206, CONTENT[5:])
    assert (unchanged.status, await unchanged.read()) == (304, b"")
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(CONTENT))
    assert head.headers["ETag"] == etag


async def test_file_replaced_on_disk_is_never_served_from_memory(make_store: MakeStore) -> None:
    store = await remembering_store(make_store)
    await upload(store, "notes.txt", CONTENT)
    old = await store.client.get("/files/notes.txt")
    assert await old.read() == CONTENT
    replacement = store.root / "files" / "replacement.tmp"
    replacement.write_bytes(CONTENT.upper())  # same size, other bytes, another inode
    os.replace(replacement, store.root / "files" / "notes.txt")

    response = await store.client.get("/files/notes.txt")

    assert await response.read() == CONTENT.upper()
    assert response.headers["ETag"] != old.headers["ETag"]


def write_at_start(path: Path, data: bytes) -> None:
    """Overwrite the first bytes of ``path`` in place (same inode, same size)."""
    with open(path, "r+b") as handle:
        handle.write(data)


def filesystem_time_ns(probe: Path) -> int:
    """The time the filesystem of ``probe`` stamps on a file changed now (its clock ticks coarsely)."""
    probe.touch()
    return probe.stat().st_mtime_ns


async def test_file_rewritten_in_place_is_never_served_from_memory(make_store: MakeStore) -> None:
    store = await remembering_store(make_store)
    await upload(store, "notes.txt", CONTENT)
    assert await (await store.client.get("/files/notes.txt")).read() == CONTENT
    # A rewrite stamped with the same time as the upload could not be told apart (that is what
    # settle_ns waits out): wait until the filesystem's clock has moved past the file's ctime.
    changed = (store.root / "files" / "notes.txt").stat().st_ctime_ns
    probe = store.root.parent / "clock-probe"
    await until(lambda: filesystem_time_ns(probe) > changed, "the filesystem's clock moved on")
    await asyncio.to_thread(write_at_start, store.root / "files" / "notes.txt", b"ABCDE")

    response = await store.client.get("/files/notes.txt")

    assert await response.read() == b"ABCDE" + CONTENT[5:]


async def test_file_deleted_on_disk_is_not_found_though_remembered(make_store: MakeStore) -> None:
    store = await remembering_store(make_store)
    await upload(store, "notes.txt", CONTENT)
    assert (await store.client.get("/files/notes.txt")).status == 200
    (store.root / "files" / "notes.txt").unlink()

    response = await store.client.get("/files/notes.txt")

    assert response.status == 404
    assert CONTENT not in await response.read()


async def test_file_deleted_through_the_store_is_not_found_though_remembered(make_store: MakeStore) -> None:
    store = await remembering_store(make_store)
    await upload(store, "mine.txt", CONTENT, identity=ADA)
    assert (await store.client.get("/files/mine.txt")).status == 200

    deleted = await store.client.delete("/files/mine.txt", headers={"X-Client-DN": ADA})

    assert deleted.status == 204
    assert (await store.client.get("/files/mine.txt")).status == 404


async def test_overwritten_file_is_served_with_its_new_bytes_and_digest(make_store: MakeStore, tmp_path: Path) -> None:
    handler = DirectoryHandler(
        tmp_path / "root" / "files", catalogue=tmp_path / "state" / "catalogue" / "files.sqlite3", overwrite=True
    )
    store = await remembering_store(make_store, handler=handler)
    await upload(store, "notes.txt", CONTENT, identity=ADA)
    assert await (await store.client.get("/files/notes.txt")).read() == CONTENT
    newer = CONTENT.upper()

    await upload(store, "notes.txt", newer, identity=ADA)
    response = await store.client.get("/files/notes.txt")

    assert await response.read() == newer
    assert_digests_of(response.headers["Repr-Digest"], newer)


async def test_name_another_process_removed_from_the_catalogue_is_not_served_after_the_ttl(
    make_store: MakeStore,
) -> None:
    store = await remembering_store(make_store)
    store.handler.catalogue_ttl = 0.2
    await upload(store, "notes.txt", CONTENT)
    assert (await store.client.get("/files/notes.txt")).status == 200
    read_by = time.monotonic()  # the store read the record before it answered
    # Another process sharing the catalogue removed the record; the file stayed.
    other = SqliteCatalogue(store.state_dir / "catalogue" / "files.sqlite3")
    try:
        assert await other.delete("notes.txt")
    finally:
        await other.close()
    # The TTL is the behaviour under test: wait until the clock the store measures it by has passed it.
    await until(lambda: time.monotonic() - read_by >= store.handler.catalogue_ttl, "the TTL passed")

    response = await store.client.get("/files/notes.txt")

    assert response.status == 404


async def test_concurrent_downloads_of_a_new_file_share_one_lookup(make_store: MakeStore) -> None:
    store = await make_store()
    await upload(store, "notes.txt", CONTENT)
    queries = count_catalogue_queries(store)
    # The lookup is held until all twenty requests have arrived: all of them are under way at once,
    # however the machine schedules their connections.
    arrived, everyone = 0, asyncio.Event()
    locate, describe = store.handler.locate_download, store.handler.catalogue.describe

    async def arriving(identity, name):  # type: ignore[no-untyped-def]
        nonlocal arrived
        arrived += 1
        if arrived == 20:
            everyone.set()
        return await locate(identity, name)

    async def held(name):  # type: ignore[no-untyped-def]
        async with asyncio.timeout(10):
            await everyone.wait()
        return await describe(name)

    store.handler.locate_download, store.handler.catalogue.describe = arriving, held

    responses = await asyncio.gather(*(store.client.get("/files/notes.txt") for _ in range(20)))

    assert [await response.read() for response in responses] == [CONTENT] * 20
    assert arrived == 20
    assert queries[0] == 1


async def test_remembered_file_above_the_memory_limit_downloads_intact(make_store: MakeStore) -> None:
    store = await remembering_store(make_store)
    content = os.urandom(MEMORY_LIMIT + 1)
    await upload(store, "big.bin", content)

    responses = [await store.client.get("/files/big.bin") for _ in range(2)]

    for response in responses:
        assert response.status == 200
        assert await response.read() == content
        assert_digests_of(response.headers["Repr-Digest"], content)
