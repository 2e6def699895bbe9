"""The AccessGrid 2.x wire protocol, byte for byte, against a real store on loopback.

Legacy clients were Python 2 programs using ``httplib``: a manifest ``POST``
with ``X-Client-DN`` and a Content-Length but no Content-Type, a reply parsed
line by line with ``^(\\S+):\\s+(.*)``, then one connection per file with the
raw bytes sent in 4096-byte writes. These tests send exactly those bytes over
a raw socket (or drive ``http.client`` the way AGTk's ``HTTPUploadEngine``
drove ``httplib``) and check the exact status lines and bodies the legacy
client relied on, the failures it could meet, the CamelCase handler interface
and the ``X-Client-DN`` identity rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from multidict import CIMultiDict

from datastore.security.identity import Identity

from .conftest import MakeStore
from .fakes import LegacyDataStore
from .harness import Store, md5_hex, spawn_serve

#: Upper bound on anything a test awaits from the server.
WAIT = 10.0

#: What an AGTk 2.1 client put in X-Client-DN.
DN = "/O=Access Grid/OU=agdev-ca.mcs.anl.gov/OU=mcs.anl.gov/CN=Ivan Judson"
OTHER_DN = "/O=Access Grid/OU=agdev-ca.mcs.anl.gov/OU=mcs.anl.gov/CN=Susanne Lefvert"

#: The size of AGTk's upload writes (and of its server's reads).
AGTK_BLOCK = 4096

#: Three full blocks and a partial one, with every byte value.
CONTENT = bytes(range(256)) * 48 + b"tail of the file"

#: The line syntax AGTk's client accepted in a manifest reply.
AGTK_REPLY_LINE = re.compile(r"^(\S+):\s+(.*)")

ACCEPTED_REPLY = re.compile(rb"return_code: 0\ntransfer_key: ([0-9a-f]{32,})\n")

SUCCESS_CALLS = ["CanUploadFile", "AddPendingUpload", "GetUploadFilename", "CompleteUpload"]


# -- raw HTTP, as Python 2's httplib wrote it ----------------------------------------------------------------------


@dataclass(frozen=True)
class RawReply:
    """One response as it arrived on the socket."""

    status_line: str
    headers: CIMultiDict[str]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ", 2)[1])

    @property
    def reason(self) -> str:
        parts = self.status_line.split(" ", 2)
        return parts[2] if len(parts) > 2 else ""


def httplib_head(store: Store, method: str, path: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """A request head as ``httplib.HTTPConnection.putrequest`` + ``putheader`` produced it."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {store.client.host}:{store.client.port}",
        "Accept-Encoding: identity",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_reply(reader: asyncio.StreamReader) -> RawReply:
    """Read a status line and headers, then exactly Content-Length bytes (as the AGTk client did)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *header_lines = head[: -len("\r\n\r\n")].split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.add(name, value.strip())
    lengths = headers.getall("Content-Length", [])
    assert len(lengths) == 1, f"exactly one Content-Length expected in {head!r}"
    body = await reader.readexactly(int(lengths[0]))
    return RawReply(status_line=status_line, headers=headers, body=body)


async def exchange(store: Store, head: bytes, body: bytes = b"") -> RawReply:
    """Send ``head`` and then ``body`` in 4096-byte writes on a new connection; read the reply."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(store.client.host, store.client.port)
        try:
            writer.write(head)
            await writer.drain()
            for offset in range(0, len(body), AGTK_BLOCK):
                writer.write(body[offset : offset + AGTK_BLOCK])
                await writer.drain()
            return await read_reply(reader)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def dn_header(dn: str | None) -> list[tuple[str, str]]:
    """The X-Client-DN header for ``dn``; ``None`` sends no header (the string ``"None"`` sends one)."""
    return [("X-Client-DN", dn)] if dn is not None else []


async def post_manifest(store: Store, manifest: bytes, *, dn: str | None = DN, prefix: str = "files") -> RawReply:
    """``HTTPUploadEngine.uploadManifest``: httplib adds Content-Length after Host and Accept-Encoding."""
    headers = [("Content-Length", str(len(manifest))), *dn_header(dn)]
    return await exchange(store, httplib_head(store, "POST", f"/{prefix}/manifest", headers), manifest)


async def post_file(
    store: Store,
    key: str,
    num: int | str,
    body: bytes,
    *,
    dn: str | None = DN,
    prefix: str = "files",
) -> RawReply:
    """``HTTPUploadEngine.uploadFile``: raw bytes, octet-stream, Content-Length of the body."""
    headers = [
        *dn_header(dn),
        ("Content-type", "application/octet-stream"),
        ("Content-Length", str(len(body))),
    ]
    return await exchange(store, httplib_head(store, "POST", f"/{prefix}/{key}/{num}", headers), body)


async def get_file(store: Store, name: str, *, dn: str | None = None, prefix: str = "files") -> RawReply:
    """``HTTPFamilyDownloadFile``: a bare GET, X-Client-DN only when an identity is given."""
    return await exchange(store, httplib_head(store, "GET", f"/{prefix}/{name}", dn_header(dn)))


def agtk_manifest(files: Sequence[tuple[str, bytes]]) -> bytes:
    """The INI manifest of ``files`` in the layout ConfigParser.write() gives (index order)."""
    lines = ["[manifest]", f"num_files = {len(files)}", ""]
    for index, (name, content) in enumerate(files):
        lines += [f"[{index}]", f"name = {name}", f"size = {len(content)}", f"checksum = {md5_hex(content)}", ""]
    return "\n".join(lines).encode()


def shuffled_manifest(first: tuple[str, bytes], second: tuple[str, bytes], *, newline: str = "\n") -> bytes:
    """A two-file manifest as Python 2's dict-ordered ConfigParser (or a hand) could write it:
    sections and keys out of order, ``:`` and ``=`` mixed, stray blank lines."""
    (name0, content0), (name1, content1) = first, second
    lines = [
        "",
        "[1]",
        f"checksum: {md5_hex(content1)}",
        f"size = {len(content1)}",
        "",
        f"name:{name1}",
        "",
        "",
        "[manifest]",
        "",
        "num_files: 2",
        "",
        "[0]",
        f"size : {len(content0)}",
        f"name = {name0}",
        f"checksum={md5_hex(content0)}",
        "",
        "",
    ]
    return newline.join(lines).encode()


async def register(store: Store, files: Sequence[tuple[str, bytes]], *, dn: str | None = DN) -> str:
    """Post an INI manifest over a raw socket; return the transfer key (asserting acceptance)."""
    reply = await post_manifest(store, agtk_manifest(files), dn=dn)
    match = ACCEPTED_REPLY.fullmatch(reply.body)
    assert reply.status == 200 and match is not None, (reply.status_line, reply.body)
    return match.group(1).decode()


def corrupted(content: bytes) -> bytes:
    """Same size, different bytes."""
    return bytes([content[0] ^ 0xFF]) + content[1:]


# -- AGTk's client, emulated with http.client (blocking: run it in a thread) -------------------------------------


class UploadFailed(Exception):
    """AGTk's ``DataStore.UploadFailed``."""


class DownloadFailed(Exception):
    """AGTk's ``DataStore.DownloadFailed``."""


@dataclass(frozen=True)
class AgtkUpload:
    transfer_key: str
    file_statuses: list[tuple[int, str]]


def agtk_upload(
    host: str, port: int, prefix: str, manifest: bytes, files: Sequence[bytes], identity: str
) -> AgtkUpload:
    """``HTTPUploadEngine.uploadManifest`` then ``uploadFile`` per file, one connection each."""
    conn = http.client.HTTPConnection(host, port, timeout=WAIT)
    try:
        conn.request("POST", f"/{prefix}/manifest", manifest, {"X-Client-DN": identity})
        resp = conn.getresponse()
        if resp.status != 200:
            raise UploadFailed((resp.status, resp.reason))
        length = resp.getheader("Content-Length")
        if length is None:
            raise UploadFailed("manifest reply without Content-Length")
        text = resp.read(int(length)).decode("latin-1")
    finally:
        conn.close()

    transfer_key: str | None = None
    return_code = -1
    error_reasons: list[str] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        match = AGTK_REPLY_LINE.match(line)
        if match is None:
            raise UploadFailed(f"Invalid line in manifest return: {line!r}")
        key, value = match.groups()
        if key == "transfer_key":
            transfer_key = value
        elif key == "return_code":
            return_code = int(value)
        elif key == "error_reason":
            error_reasons.append(value)
    if return_code != 0 or transfer_key is None:
        raise UploadFailed((return_code, error_reasons))

    statuses = []
    for index, content in enumerate(files):
        conn = http.client.HTTPConnection(host, port, timeout=WAIT)
        try:
            conn.putrequest("POST", f"/{prefix}/{transfer_key}/{index}")
            conn.putheader("X-Client-DN", identity)
            conn.putheader("Content-type", "application/octet-stream")
            conn.putheader("Content-Length", str(len(content)))
            conn.endheaders()
            for offset in range(0, len(content), AGTK_BLOCK):
                conn.send(content[offset : offset + AGTK_BLOCK])
            resp = conn.getresponse()
            resp.read()
            statuses.append((resp.status, resp.reason))
        finally:
            conn.close()
    return AgtkUpload(transfer_key=transfer_key, file_statuses=statuses)


def agtk_download(host: str, port: int, path: str, size: int, checksum: str) -> bytes:
    """``HTTPFamilyDownloadFile``: status 200, a Content-Length equal to the size, then the MD5."""
    conn = http.client.HTTPConnection(host, port, timeout=WAIT)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        if resp.status != 200:
            raise DownloadFailed(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        if length is None:
            raise DownloadFailed("server must provide a valid content length")
        if int(length) != size:
            raise DownloadFailed(f"size mismatch: {length} != {size}")
        data = resp.read(int(length))
    finally:
        conn.close()
    if hashlib.md5(data, usedforsecurity=False).hexdigest() != checksum:
        raise DownloadFailed("checksum mismatch")
    return data


# -- a legacy handler that also records the identity tokens it is given --------------------------------------------


class TokenRecordingDataStore(LegacyDataStore):
    """LegacyDataStore that keeps ``(method, id_token)`` for every call that receives a token."""

    def __init__(self, directory: Path, *, forbidden: Sequence[str] = ()) -> None:
        super().__init__(directory, forbidden=forbidden)
        self.tokens: list[tuple[str, Any]] = []

    def CanUploadFile(self, id_token: Identity, file_info: dict[str, str]) -> int:
        self.tokens.append(("CanUploadFile", id_token))
        return super().CanUploadFile(id_token, file_info)

    def AddPendingUpload(self, id_token: Identity, filename: str) -> None:
        self.tokens.append(("AddPendingUpload", id_token))
        super().AddPendingUpload(id_token, filename)

    def GetUploadFilename(self, id_token: Identity, file_info: dict[str, str]) -> str | None:
        self.tokens.append(("GetUploadFilename", id_token))
        return super().GetUploadFilename(id_token, file_info)

    def CompleteUpload(self, id_token: Identity, file_info: dict[str, str]) -> None:
        self.tokens.append(("CompleteUpload", id_token))
        super().CompleteUpload(id_token, file_info)

    def GetDownloadFilename(self, id_token: Identity, url_path: str) -> str:
        self.tokens.append(("GetDownloadFilename", id_token))
        return super().GetDownloadFilename(id_token, url_path)

    def methods(self) -> list[str]:
        return [method for method, _ in self.calls]


@pytest.fixture
def legacy(tmp_path: Path) -> TokenRecordingDataStore:
    """A CamelCase handler storing under the folder ``make_store`` serves (ROOT/files)."""
    return TokenRecordingDataStore(tmp_path / "root" / "files", forbidden=["secret.txt"])


async def upload_through(store: Store, name: str, content: bytes, *, dn: str | None = DN) -> None:
    """Register and upload one file, asserting success."""
    key = await register(store, [(name, content)], dn=dn)
    reply = await post_file(store, key, 0, content, dn=dn)
    assert reply.status_line == "HTTP/1.1 200 File transfer OK", reply.status_line


# -- 1. byte-exact exchanges ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", [pytest.param("\n", id="lf"), pytest.param("\r\n", id="crlf-windows-client")])
async def test_shuffled_ini_manifest_gets_byte_exact_transfer_key_reply(make_store: MakeStore, newline: str) -> None:
    store = await make_store()
    manifest = shuffled_manifest(("slides.ppt", CONTENT), ("notes.txt", b"notes\n"), newline=newline)

    reply = await post_manifest(store, manifest)

    assert reply.status_line == "HTTP/1.1 200 OK"
    assert reply.headers.getall("Content-Length") == [str(len(reply.body))]
    assert reply.headers["Content-Type"].split(";")[0] == "text/plain"
    assert ACCEPTED_REPLY.fullmatch(reply.body) is not None, reply.body


async def test_raw_upload_in_4096_byte_writes_answers_file_transfer_ok(make_store: MakeStore) -> None:
    store = await make_store()
    manifest = shuffled_manifest(("slides.ppt", CONTENT), ("notes.txt", b"notes\n"))
    match = ACCEPTED_REPLY.fullmatch((await post_manifest(store, manifest)).body)
    assert match is not None
    key = match.group(1).decode()

    reply = await post_file(store, key, 0, CONTENT)

    assert reply.status_line == "HTTP/1.1 200 File transfer OK"
    assert store.served_files() == ["slides.ppt"]
    assert store.staged_files() == []


async def test_download_answers_octet_stream_with_content_length_and_exact_bytes(make_store: MakeStore) -> None:
    store = await make_store()
    await upload_through(store, "slides.ppt", CONTENT)

    reply = await get_file(store, "slides.ppt")

    assert reply.status_line == "HTTP/1.1 200 OK"
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert reply.headers.getall("Content-Length") == [str(len(CONTENT))]
    assert reply.body == CONTENT


async def test_agtk_client_uploads_two_files_in_sequence_one_connection_each(make_store: MakeStore) -> None:
    store = await make_store()
    host, port = store.client.host, store.client.port
    assert port is not None
    files = [("slides.ppt", CONTENT), ("notes.txt", b"The quick brown fox jumps over the lazy dog")]
    manifest = shuffled_manifest(files[0], files[1])

    result = await asyncio.to_thread(agtk_upload, host, port, "files", manifest, [c for _, c in files], DN)

    assert re.fullmatch(r"[0-9a-f]{32,}", result.transfer_key)
    assert result.file_statuses == [(200, "File transfer OK"), (200, "File transfer OK")]
    for name, content in files:
        downloaded = await asyncio.to_thread(
            agtk_download, host, port, f"/files/{name}", len(content), md5_hex(content)
        )
        assert downloaded == content
    assert store.staged_files() == []


# -- 2. refused manifests -------------------------------------------------------------------------------------------


async def test_manifest_naming_taken_files_is_refused_with_one_reason_per_file(make_store: MakeStore) -> None:
    store = await make_store()
    await upload_through(store, "published.txt", b"already here")
    await register(store, [("pending.txt", b"on its way")])  # reserved, not yet uploaded

    reply = await post_manifest(
        store, agtk_manifest([("published.txt", b"again"), ("fresh.txt", b"new"), ("pending.txt", b"again")])
    )

    assert reply.status_line == "HTTP/1.1 200 OK"
    assert reply.headers.getall("Content-Length") == [str(len(reply.body))]
    assert reply.body == (
        b"return_code: 1\n"
        b"error_reason: Upload error for file published.txt\n"
        b"error_reason: Upload error for file pending.txt\n"
    )


async def test_refused_manifest_reserves_nothing_for_its_acceptable_file(make_store: MakeStore) -> None:
    store = await make_store()
    await upload_through(store, "published.txt", b"already here")
    await register(store, [("pending.txt", b"on its way")])
    refused = await post_manifest(
        store, agtk_manifest([("published.txt", b"again"), ("fresh.txt", b"new"), ("pending.txt", b"again")])
    )
    assert refused.body.startswith(b"return_code: 1\n")

    key = await register(store, [("fresh.txt", b"new")], dn=OTHER_DN)

    assert (await post_file(store, key, 0, b"new", dn=OTHER_DN)).status_line == "HTTP/1.1 200 File transfer OK"


# -- 3. failures: bad manifests, bad uploads ------------------------------------------------------------------------

GOOD_SECTION = f"[0]\nname = a.txt\nsize = 1\nchecksum = {md5_hex(b'a')}\n"


@pytest.mark.parametrize(
    "manifest",
    [
        pytest.param(b"this is not an INI file\n\x00\xff\xfe\n", id="garbage"),
        pytest.param(GOOD_SECTION.encode(), id="missing-manifest-section"),
        pytest.param(b"[manifest]\nnum_files = two\n\n" + GOOD_SECTION.encode(), id="num-files-not-an-int"),
        pytest.param(b"[manifest]\nnum_files = 2\n\n" + GOOD_SECTION.encode(), id="missing-section-for-index"),
        pytest.param(
            f"[manifest]\nnum_files = 1\n\n[0]\nsize = 1\nchecksum = {md5_hex(b'a')}\n".encode(), id="missing-name"
        ),
    ],
)
async def test_bad_ini_manifest_is_400_configparser_error(make_store: MakeStore, manifest: bytes) -> None:
    store = await make_store()

    reply = await post_manifest(store, manifest)

    assert reply.status == 400
    assert reply.reason.startswith("ConfigParser error"), reply.status_line
    assert store.staged_files() == []
    assert store.served_files() == []


async def test_manifest_for_unknown_prefix_is_404_path_not_found(make_store: MakeStore) -> None:
    store = await make_store()

    reply = await post_manifest(store, agtk_manifest([("a.txt", b"a")]), prefix="no-such-venue")

    assert reply.status_line == "HTTP/1.1 404 Path not found"
    assert store.staged_files() == []
    assert store.served_files() == []


#: Upload attempts that must fail after a key was issued for ``("slides.ppt", CONTENT)``:
#: changes to the good request, the status, and the reason phrase (None: any).
BAD_UPLOADS = [
    pytest.param({"prefix": "no-such-venue"}, 404, "Path not found", id="unknown-prefix"),
    pytest.param({"key": secrets.token_hex(20)}, 404, None, id="unknown-transfer-key"),
    pytest.param({"num": 1}, 404, None, id="file-number-out-of-range"),
    pytest.param({"num": "x"}, 404, None, id="file-number-not-a-number"),
    pytest.param(
        {"body": CONTENT[:-1]}, 405, "Size in manifest != size in Content-Length", id="content-length-too-small"
    ),
    pytest.param(
        {"body": CONTENT + b"!"}, 405, "Size in manifest != size in Content-Length", id="content-length-too-large"
    ),
    pytest.param({"body": corrupted(CONTENT)}, 405, "Checksum mismatch on upload", id="checksum-mismatch"),
]


async def bad_upload(store: Store, key: str, changes: dict[str, Any]) -> RawReply:
    request: dict[str, Any] = {"key": key, "num": 0, "body": CONTENT} | changes
    prefix = request.pop("prefix", "files")
    return await post_file(store, request["key"], request["num"], request["body"], prefix=prefix)


@pytest.mark.parametrize(("changes", "status", "reason"), BAD_UPLOADS)
async def test_refused_upload_answers_status_and_leaves_nothing(
    make_store: MakeStore, changes: dict[str, Any], status: int, reason: str | None
) -> None:
    store = await make_store()
    key = await register(store, [("slides.ppt", CONTENT)])

    reply = await bad_upload(store, key, changes)

    assert reply.status == status, reply.status_line
    if reason is not None:
        assert reply.reason == reason
    assert store.staged_files() == []
    assert store.served_files() == []


@pytest.mark.parametrize(("changes", "status", "reason"), BAD_UPLOADS)
async def test_upload_with_right_bytes_succeeds_after_refused_attempt(
    make_store: MakeStore, changes: dict[str, Any], status: int, reason: str | None
) -> None:
    store = await make_store()
    key = await register(store, [("slides.ppt", CONTENT)])
    assert (await bad_upload(store, key, changes)).status == status

    reply = await post_file(store, key, 0, CONTENT)

    assert reply.status_line == "HTTP/1.1 200 File transfer OK"
    assert store.served_files() == ["slides.ppt"]
    assert store.staged_files() == []
    assert (await get_file(store, "slides.ppt")).body == CONTENT


# -- 4. an AccessGrid-style CamelCase handler -----------------------------------------------------------------------


async def test_legacy_handler_is_called_in_accessgrid_order_for_a_successful_upload(
    make_store: MakeStore, legacy: TokenRecordingDataStore
) -> None:
    store = await make_store(legacy)

    await upload_through(store, "slides.ppt", CONTENT)

    assert legacy.methods() == SUCCESS_CALLS


async def test_legacy_handler_cancels_the_pending_upload_on_checksum_mismatch(
    make_store: MakeStore, legacy: TokenRecordingDataStore
) -> None:
    store = await make_store(legacy)
    key = await register(store, [("slides.ppt", CONTENT)])

    reply = await post_file(store, key, 0, corrupted(CONTENT))

    assert reply.status_line == "HTTP/1.1 405 Checksum mismatch on upload"
    assert legacy.methods() == ["CanUploadFile", "AddPendingUpload", "GetUploadFilename", "CancelPendingUpload"]
    assert legacy.calls[-1] == ("CancelPendingUpload", "slides.ppt")
    assert store.staged_files() == []
    assert store.served_files() == []


async def test_legacy_handler_receives_file_info_as_a_dict_of_strings(
    make_store: MakeStore, legacy: TokenRecordingDataStore
) -> None:
    store = await make_store(legacy)

    await upload_through(store, "slides.ppt", CONTENT)

    file_info = {"name": "slides.ppt", "size": str(len(CONTENT)), "checksum": md5_hex(CONTENT)}
    assert legacy.calls == [
        ("CanUploadFile", file_info),
        ("AddPendingUpload", "slides.ppt"),
        ("GetUploadFilename", file_info),
        ("CompleteUpload", file_info),
    ]


async def test_legacy_handler_id_token_dn_is_the_x_client_dn_sent(
    make_store: MakeStore, legacy: TokenRecordingDataStore
) -> None:
    store = await make_store(legacy)
    await upload_through(store, "slides.ppt", CONTENT, dn=DN)

    await get_file(store, "slides.ppt", dn=DN)

    assert [(method, token.dn) for method, token in legacy.tokens] == [
        (method, DN) for method in [*SUCCESS_CALLS, "GetDownloadFilename"]
    ]


async def test_legacy_handler_serves_its_completed_upload(
    make_store: MakeStore, legacy: TokenRecordingDataStore
) -> None:
    store = await make_store(legacy)
    await upload_through(store, "slides.ppt", CONTENT)

    reply = await get_file(store, "slides.ppt")

    assert reply.status_line == "HTTP/1.1 200 OK"
    assert reply.body == CONTENT
    assert legacy.calls[-1] == ("GetDownloadFilename", "slides.ppt")


@pytest.mark.parametrize(
    ("name", "status_line"),
    [
        pytest.param("missing.txt", "HTTP/1.1 404 File not found", id="FileNotFound-is-404"),
        pytest.param("secret.txt", "HTTP/1.1 403 Not authorized", id="NotAuthorized-is-403"),
    ],
)
async def test_legacy_handler_download_exceptions_map_to_statuses(
    make_store: MakeStore, legacy: TokenRecordingDataStore, name: str, status_line: str
) -> None:
    store = await make_store(legacy)

    reply = await get_file(store, name, dn=DN)

    assert reply.status_line == status_line
    assert legacy.calls == [("GetDownloadFilename", name)]


# -- 5. X-Client-DN ------------------------------------------------------------------------------------------------


async def test_x_client_dn_none_reaches_the_handler_as_anonymous(
    make_store: MakeStore, legacy: TokenRecordingDataStore
) -> None:
    store = await make_store(legacy)

    await upload_through(store, "slides.ppt", CONTENT, dn="None")

    assert [(method, token.dn) for method, token in legacy.tokens] == [(method, None) for method in SUCCESS_CALLS]


@pytest.mark.parametrize(
    ("manifest_dn", "upload_dn"),
    [
        pytest.param("None", None, id="None-then-no-header"),
        pytest.param(None, "None", id="no-header-then-None"),
        pytest.param("None", "None", id="None-then-None"),
    ],
)
async def test_x_client_dn_none_is_the_same_identity_as_no_header(
    make_store: MakeStore, manifest_dn: str | None, upload_dn: str | None
) -> None:
    store = await make_store()
    key = await register(store, [("slides.ppt", CONTENT)], dn=manifest_dn)

    reply = await post_file(store, key, 0, CONTENT, dn=upload_dn)

    assert reply.status_line == "HTTP/1.1 200 File transfer OK"


#: (identity that posted the manifest, identity that tries to upload); None = no header.
FOREIGN_IDENTITIES = [
    pytest.param(DN, OTHER_DN, id="another-dn"),
    pytest.param(DN, None, id="dn-then-no-header"),
    pytest.param(DN, "None", id="dn-then-None"),
    pytest.param(None, DN, id="anonymous-then-dn"),
]


@pytest.mark.parametrize(("owner", "intruder"), FOREIGN_IDENTITIES)
async def test_transfer_cannot_be_used_by_another_identity(
    make_store: MakeStore, owner: str | None, intruder: str | None
) -> None:
    store = await make_store()
    key = await register(store, [("slides.ppt", CONTENT)], dn=owner)

    reply = await post_file(store, key, 0, CONTENT, dn=intruder)

    assert reply.status == 403, reply.status_line
    assert store.staged_files() == []
    assert store.served_files() == []


@pytest.mark.parametrize(("owner", "intruder"), FOREIGN_IDENTITIES)
async def test_owner_can_still_upload_after_another_identity_was_refused(
    make_store: MakeStore, owner: str | None, intruder: str | None
) -> None:
    store = await make_store()
    key = await register(store, [("slides.ppt", CONTENT)], dn=owner)
    assert (await post_file(store, key, 0, CONTENT, dn=intruder)).status == 403

    reply = await post_file(store, key, 0, CONTENT, dn=owner)

    assert reply.status_line == "HTTP/1.1 200 File transfer OK"
    assert (await get_file(store, "slides.ppt")).body == CONTENT


# -- the real command, as a venue operator starts it for AGTk 2.x clients -----------------------------------------


async def test_datastore_serve_with_trust_client_dn_speaks_the_legacy_exchange_byte_for_byte(tmp_path: Path) -> None:
    """No policy flag but --trust-client-dn: the shipped defaults, with the AGTk client's DN as its identity."""
    process, (match,) = await spawn_serve("--root", str(tmp_path / "data"), "--trust-client-dn", open_store=False)
    # The raw-socket helpers only need the address, which they read as store.client.host and .port.
    store: Any = SimpleNamespace(client=SimpleNamespace(host="127.0.0.1", port=int(match["port"])))
    content = b"venue slides\n" * 500
    try:
        reply = await post_manifest(store, agtk_manifest([("slides.ppt", content)]))
        accepted = ACCEPTED_REPLY.fullmatch(reply.body)
        assert (reply.status_line, reply.headers["Content-Type"]) == ("HTTP/1.1 200 OK", "text/plain")
        assert accepted is not None, reply.body
        uploaded = await post_file(store, accepted.group(1).decode(), 0, content)
        assert uploaded.status_line == "HTTP/1.1 200 File transfer OK"
        downloaded = await get_file(store, "slides.ppt", dn=DN)
        assert (downloaded.status, downloaded.body) == (200, content)
        # Without a DN the same client is nobody, and the defaults give nobody anything.
        anonymous = await post_manifest(store, agtk_manifest([("other.ppt", content)]), dn=None)
        assert anonymous.status == 401
    finally:
        process.terminate()
        await process.wait()
