"""The small promises of a store on a network: no secret in a log, no 500 for a client's mistake,
nothing left behind by a full disk, no link built from what a client wrote in Host.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from datastore.http.context import CONTEXT
from datastore.security.logsafe import RedactingFormatter

from .conftest import MakeStore
from .harness import Store, json_manifest, spawn_serve, until

WAIT = 20.0
KEY = re.compile(r"[0-9a-f]{40}")


# -- secrets never reach a log whole ----------------------------------------------------------------------------


async def test_transfer_keys_and_tokens_never_reach_the_log_whole(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = await make_store()
    token = (await store.client.app[CONTEXT].tokens.create("ada", ["read", "upload"])).token
    auth = {"Authorization": f"Bearer {token}"}
    good, bad = b"good bytes", b"bad bytes!"
    manifest = await store.client.post("/files/manifest", json=json_manifest([("a", good), ("b", good)]), headers=auth)
    key = (await manifest.json())["transfer_key"]
    assert (await store.client.put(f"/files/{key}/0", data=good, headers=auth)).status == 200
    assert (await store.client.put(f"/files/{key}/1", data=bad, headers=auth)).status == 405
    assert (await store.client.get(f"/_api/v1/transfers/{key}", headers=auth)).status == 200
    assert (await store.client.delete(f"/files/{key}/9", headers={"Tus-Resumable": "1.0.0", **auth})).status == 404

    lines = [record.getMessage() + (record.exc_text or "") for record in caplog.records]
    assert any(key[:8] in line for line in lines), lines
    assert not [line for line in lines if key in line or token in line or token.split("_", 2)[2] in line]


async def test_datastore_serve_writes_no_key_to_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        process, (match,) = await spawn_serve("--root", str(tmp_path / "data"), stderr=stderr)
    try:
        async with aiohttp.ClientSession(match["base"]) as http:
            async with http.post("/files/manifest", json=json_manifest([("a", b"abc")])) as response:
                key = (await response.json())["transfer_key"]
            async with http.put(f"/files/{key}/0", data=b"abc") as response:
                assert response.status == 200
            async with http.put(f"/files/{key}/0", data=b"abc") as response:
                assert response.status == 409
    finally:
        process.terminate()
        await process.wait()
    output = log.read_text()
    assert f'"PUT /files/{key[:8]}…/0 HTTP/1.1" 200' in output
    assert key not in output


def test_the_formatter_of_datastore_serve_cuts_secrets_out_of_tracebacks_too() -> None:
    key = "0123456789abcdef" * 2 + "01234567"
    try:
        raise OSError(errno.EIO, f"cannot open state/staging/{key}.0.part")
    except OSError:
        record = logging.LogRecord("datastore", logging.ERROR, __file__, 1, "failed on %s", (key,), exc_info=True)
        record.exc_info = sys.exc_info()
    formatted = RedactingFormatter("%(message)s").format(record)
    assert key not in formatted
    assert formatted.count("01234567…") == 2


def test_the_formatter_of_datastore_serve_stamps_lines_as_logging_does() -> None:
    # It makes a second's text once for all the lines of that second: the same text as logging's.
    ours, logging_own = RedactingFormatter("%(asctime)s %(message)s"), logging.Formatter("%(asctime)s %(message)s")
    for created in (1_800_000_000.0, 1_800_000_000.999, 1_800_000_001.0005, 1_800_000_001.5, 1_700_000_000.25):
        record = logging.LogRecord("datastore.access", logging.INFO, "", 0, "line", (), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == logging_own.format(record)


# -- a client's mistake is a 4xx --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("multipart/form-data", id="no-boundary"),
        pytest.param("multipart/form-data; boundary=", id="empty-boundary"),
        pytest.param("multipart/form-data; boundary=" + "b" * 71, id="boundary-too-long"),
    ],
)
async def test_a_multipart_upload_without_a_usable_boundary_is_400(make_store: MakeStore, content_type: str) -> None:
    store = await make_store()
    key = await store.register([("form.txt", b"hello")])
    response = await store.client.post(
        f"/files/{key}/0", data=b"--x\r\n\r\nhello", headers={"Content-Type": content_type}
    )
    assert response.status == 400
    assert "boundary" in await response.text()
    assert store.staged_files() == []
    # Nothing is lost: the same file, sent properly, is accepted.
    form = aiohttp.FormData()
    form.add_field("file", b"hello", filename="form.txt")
    assert (await store.client.post(f"/files/{key}/0", data=form)).status == 200


# -- a full disk ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs of the test's own (mounting needs root, which `make test` runs as)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (run the tests as root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; return it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


async def fill_during_upload(store: Store, disk: Path, head: str, data: bytes) -> tuple[bytes, Path]:
    """Send ``head`` and the first 4 MiB of ``data``; once bytes are staged, fill ``disk``; send the rest.

    Returns the answer's status line and the file that filled the disk.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", store.client.port)
    try:
        writer.write(head.encode() + b"\r\n" + data[: 4 << 20])
        await writer.drain()
        await until(lambda: any(f.stat().st_size for f in store.staging.iterdir()), "bytes staged", timeout=WAIT)
        filler = await asyncio.to_thread(fill, disk)
        writer.write(data[4 << 20 :])
        async with asyncio.timeout(WAIT):
            return await reader.readuntil(b"\r\n"), filler
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        pytest.param("", b"HTTP/1.1 405 Not enough disk space for upload", id="legacy-client"),
        pytest.param("Accept: application/json\r\n", b"HTTP/1.1 507 Not enough disk space for upload", id="json"),
    ],
)
async def test_a_disk_that_fills_up_mid_upload_refuses_it_and_keeps_nothing(
    make_store: MakeStore, small_disk: Path, accept: str, expected: bytes
) -> None:
    store = await make_store(root=small_disk / "root", state_dir=small_disk / "state", min_free_bytes=0)
    data = os.urandom(24 << 20)
    key = await store.register([("big.bin", data)])
    head = f"PUT /files/{key}/0 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n{accept}"

    answer, filler = await fill_during_upload(store, small_disk, head, data)

    assert answer.startswith(expected)
    await until(lambda: store.staged_files() == [], "the staging file was removed", timeout=WAIT)
    assert store.served_files() == []
    # Once there is room again, the same file goes through.
    await asyncio.to_thread(filler.unlink)
    assert (await store.client.put(f"/files/{key}/0", data=io.BytesIO(data))).status == 200


async def test_a_disk_that_fills_up_during_a_tus_patch_answers_507_and_keeps_nothing(
    make_store: MakeStore, small_disk: Path
) -> None:
    store = await make_store(root=small_disk / "root", state_dir=small_disk / "state", min_free_bytes=0)
    data = os.urandom(24 << 20)
    key = await store.register([("big.bin", data)])
    head = (
        f"PATCH /files/{key}/0 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\nTus-Resumable: 1.0.0\r\n"
        "Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
    )

    answer, filler = await fill_during_upload(store, small_disk, head, data)

    assert answer.startswith(b"HTTP/1.1 507 ")
    await until(lambda: store.staged_files() == [], "the staging file was removed", timeout=WAIT)
    await asyncio.to_thread(filler.unlink)
    head_reply = await store.client.head(f"/files/{key}/0", headers={"Tus-Resumable": "1.0.0"})
    assert head_reply.headers["Upload-Offset"] == "0"


# -- links are the store's, not the client's --------------------------------------------------------------------


async def test_returned_urls_ignore_the_host_header(make_store: MakeStore) -> None:
    store = await make_store()
    own = f"http://127.0.0.1:{store.client.port}"
    evil = {"Host": "evil.example"}
    manifest = await store.client.post("/files/manifest", json=json_manifest([("a.txt", b"a")]), headers=evil)
    body = await manifest.json()
    assert body["files"][0]["upload_url"] == f"{own}/files/{body['transfer_key']}/0"
    assert body["status_url"].startswith(f"{own}/_api/v1/transfers/")
    assert (await store.client.put(f"/files/{body['transfer_key']}/0", data=b"a")).status == 200
    listing = await (await store.client.get("/files/", headers={**evil, "Accept": "application/json"})).json()
    assert [f["url"] for f in listing["files"]] == [f"{own}/files/a.txt"]


async def test_returned_urls_use_the_configured_public_url(make_store: MakeStore) -> None:
    store = await make_store(public_url="https://files.example.org/store/")
    manifest = await store.client.post("/files/manifest", json=json_manifest([("a b.txt", b"a")]))
    body = await manifest.json()
    assert body["files"][0]["upload_url"] == f"https://files.example.org/store/files/{body['transfer_key']}/0"
    assert (await store.client.put(f"/files/{body['transfer_key']}/0", data=b"a")).status == 200
    listing = await (await store.client.get("/files/", headers={"Accept": "application/json"})).json()
    assert [f["url"] for f in listing["files"]] == ["https://files.example.org/store/files/a%20b.txt"]
