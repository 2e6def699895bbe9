"""The client commands (upload, download, ls, status, cancel) run as a user runs them: subprocesses.

Each command is ``python -m datastore ...`` in its own process, talking over
real sockets on 127.0.0.1 to a store: ``datastore serve`` in another
process, make_store's in-process server (a subprocess reaches it like any
client), or the TLS server with minted certificates. Failures must be one
line on standard error and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from .conftest import MakeStore
from .harness import KEY_LINE, Store, assert_one_line_failure, datastore, sha256_hex, spawn_serve
from .test_client import (
    ADA,
    BOB,
    CHUNK,
    FaultProxy,
    base_url,
    build_tls_store,
    payload,
    running_tls_store,
    transfer_status,
    upstream_of,
    write_files,
)

ADA_CERT_DN = "/C=NZ/O=Lab/OU=Physics/CN=ada"


@pytest.fixture
async def store(make_store: MakeStore) -> Store:
    return await make_store()


def files_url(store: Store) -> str:
    return base_url(store) + "files/"


async def served(store: Store, name: str) -> bytes:
    response = await store.client.get(f"/files/{name}")
    assert response.status == 200, name
    return await response.read()


# -- a session against `datastore serve` --------------------------------------------------------


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[str]:
    """``datastore serve --port 0`` in a process; yields its /files/ URL."""
    process, (match,) = await spawn_serve("--root", str(tmp_path / "served"))
    try:
        yield match["url"]
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await process.communicate()


async def test_upload_ls_status_and_download_against_datastore_serve(serve: str, tmp_path: Path) -> None:
    files = {"alpha.bin": payload(3 * CHUNK + 11, 20), "beta.txt": b"beta\n"}
    await asyncio.to_thread(write_files, tmp_path / "folder", files)

    upload = await datastore("upload", serve, str(tmp_path / "folder"), "--chunk-size", str(CHUNK))
    assert upload.returncode == 0, upload
    assert upload.stdout.splitlines() == [
        f"{serve}{name}  {len(data)} bytes  sha256 {sha256_hex(data)}" for name, data in files.items()
    ]
    key = upload.key
    assert "Traceback" not in upload.stderr

    listing = await datastore("ls", serve)
    assert listing.returncode == 0, listing
    assert [line.split() for line in listing.stdout.splitlines()] == [
        [str(len(data)), name, "anonymous", "sha256", sha256_hex(data)] for name, data in files.items()
    ]

    status = await datastore("status", serve, key)
    assert status.returncode == 0, status
    head, *rows = status.stdout.splitlines()
    assert head.split()[:3] == [key, "FINISHED", "expires"]
    assert [row.split() for row in rows] == [
        [str(num), "FINISHED", f"{len(data)}/{len(data)}", name] for num, (name, data) in enumerate(files.items())
    ]

    dest = tmp_path / "downloads"
    await asyncio.to_thread(dest.mkdir)
    download = await datastore("download", serve + "alpha.bin", "-o", str(dest))
    assert download.returncode == 0, download
    data = files["alpha.bin"]
    assert download.stdout.splitlines() == [
        f"{dest / 'alpha.bin'}  {len(data)} bytes  sha256 {sha256_hex(data)} verified"
    ]
    assert await asyncio.to_thread((dest / "alpha.bin").read_bytes) == data
    assert sorted(os.listdir(dest)) == ["alpha.bin"]


# -- uploads -----------------------------------------------------------------------------------


async def test_upload_json_output_parses(store: Store, tmp_path: Path) -> None:
    files = {"one.bin": payload(CHUNK + 1, 21), "two.txt": b"two"}
    paths = await asyncio.to_thread(write_files, tmp_path / "folder", files)
    ran = await datastore("upload", "--json", files_url(store), *map(str, paths))
    assert ran.returncode == 0, ran
    assert ran.stderr == ""  # no progress, no key line: standard output is for the JSON
    results = json.loads(ran.stdout)
    (key,) = {result["transfer_key"] for result in results}
    assert [(r["name"], r["size"], r["sha256"], r["url"]) for r in results] == [
        (name, len(data), sha256_hex(data), f"{files_url(store)}{name}") for name, data in files.items()
    ]
    # The client declares SHA-256 only (the server's fast path); the MD5 is the server's to compute after.
    assert all(result["md5"] is None for result in results)
    assert (await transfer_status(store, key))["state"] == "FINISHED"
    for name, data in files.items():
        assert await served(store, name) == data


async def test_upload_quiet_prints_nothing(store: Store, tmp_path: Path) -> None:
    paths = await asyncio.to_thread(write_files, tmp_path, {"quiet.txt": b"shh"})
    ran = await datastore("upload", "-q", files_url(store), str(paths[0]))
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "", "")
    assert await served(store, "quiet.txt") == b"shh"


async def test_upload_with_an_identity_owns_the_files_and_the_transfer(store: Store, tmp_path: Path) -> None:
    paths = await asyncio.to_thread(write_files, tmp_path, {"ada.txt": b"ada's"})
    upload = await datastore("upload", "--identity", ADA, files_url(store), str(paths[0]))
    assert upload.returncode == 0, upload
    listing = await datastore("ls", "--json", "--identity", ADA, files_url(store))
    assert [(e["name"], e["owner"], e["yours"]) for e in json.loads(listing.stdout)] == [("ada.txt", ADA, True)]
    # Owners are shown to themselves (and administrators), not to everyone who may list.
    others = await datastore("ls", "--json", "--identity", BOB, files_url(store))
    assert [(e["name"], e["owner"], e["yours"]) for e in json.loads(others.stdout)] == [("ada.txt", None, False)]
    mine = await datastore("status", "--identity", ADA, "--json", base_url(store), upload.key)
    assert json.loads(mine.stdout)["state"] == "FINISHED"
    theirs = await datastore("status", "--identity", BOB, base_url(store), upload.key)
    assert_one_line_failure(theirs, 1, re.compile(r"datastore: 403 .+"))


@pytest.mark.parametrize("quiet", [pytest.param((), id="with-progress"), pytest.param(("-q",), id="quiet")])
async def test_a_refused_upload_is_one_line_naming_the_file(store: Store, tmp_path: Path, quiet: tuple[str]) -> None:
    paths = await asyncio.to_thread(write_files, tmp_path, {"taken.txt": b"first"})
    assert (await datastore("upload", "-q", files_url(store), str(paths[0]))).returncode == 0
    await asyncio.to_thread(paths[0].write_bytes, b"second")
    ran = await datastore("upload", *quiet, files_url(store), str(paths[0]))
    assert_one_line_failure(ran, 1, "datastore: 403 the store refused taken.txt")
    assert await served(store, "taken.txt") == b"first"


@pytest.mark.parametrize("quiet", [pytest.param((), id="with-progress"), pytest.param(("-q",), id="quiet")])
async def test_a_missing_file_is_one_line(store: Store, tmp_path: Path, quiet: tuple[str]) -> None:
    present = await asyncio.to_thread(write_files, tmp_path, {"present.txt": b"here"})
    missing = tmp_path / "missing.txt"
    ran = await datastore("upload", *quiet, files_url(store), str(present[0]), str(missing))
    assert_one_line_failure(ran, 1, f"datastore: {missing}: no such file")
    assert store.served_files() == []


async def test_resume_after_the_cli_was_killed_mid_upload(store: Store, tmp_path: Path) -> None:
    data = payload(16 * CHUNK + 99, 22)
    (path,) = await asyncio.to_thread(write_files, tmp_path / "sources", {"big.bin": data})
    # The proxy holds the fifth PATCH: the first run is killed with four chunks in the store.
    async with FaultProxy(upstream_of(store), hold_from=4 * CHUNK) as proxy:
        url = f"{proxy.url}/files/"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "datastore",
            "upload",
            url,
            str(path),
            "--chunk-size",
            str(CHUNK),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        try:
            stderr = b""
            async with asyncio.timeout(30):
                while not (match := KEY_LINE.search(stderr.decode(errors="replace"))):
                    block = await process.stderr.read(4096)
                    assert block, f"the upload ended before printing its transfer key: {stderr!r}"
                    stderr += block
                key = match[1]
                await proxy.held.wait()
                # Bounded polling on the store's state until it shows the bytes it has.
                while (status := await transfer_status(store, key))["files"][0]["received"] == 0:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            if process.returncode is None:
                process.kill()
            await process.communicate()
        assert process.returncode == -signal.SIGKILL
        assert status["files"][0]["received"] == 4 * CHUNK
        assert store.served_files() == []

        proxy.release()
        proxy.hold_from = None
        seen = len(proxy.requests)
        resumed = await datastore("upload", url, str(path), "--resume", key, "--chunk-size", str(CHUNK))
        requests = proxy.requests[seen:]

    assert resumed.returncode == 0, resumed
    assert resumed.stdout.splitlines() == [f"{url}big.bin  {len(data)} bytes  sha256 {sha256_hex(data)}"]
    assert resumed.key == key
    assert "POST" not in [r.method for r in requests]
    patches = [r for r in requests if r.method == "PATCH"]
    assert [(p.offset, p.status) for p in patches] == [(offset, 204) for offset in range(4 * CHUNK, len(data), CHUNK)]
    assert sum(p.body for p in patches) == len(data) - 4 * CHUNK
    assert await served(store, "big.bin") == data
    assert (await transfer_status(store, key))["state"] == "FINISHED"


# -- downloads ---------------------------------------------------------------------------------


async def upload_with_the_cli(store: Store, tmp_path: Path, name: str, data: bytes) -> None:
    (path,) = await asyncio.to_thread(write_files, tmp_path / "sources", {name: data})
    ran = await datastore("upload", "-q", files_url(store), str(path))
    assert ran.returncode == 0, ran


async def test_download_to_a_folder_the_current_directory_or_a_file(store: Store, tmp_path: Path) -> None:
    data = payload(2 * CHUNK + 3, 23)
    await upload_with_the_cli(store, tmp_path, "doc.bin", data)
    folder, work = tmp_path / "folder", tmp_path / "work"
    await asyncio.to_thread(folder.mkdir)
    await asyncio.to_thread(work.mkdir)
    url = files_url(store) + "doc.bin"

    into_folder = await datastore("download", url, "-o", str(folder))
    here = await datastore("download", url, cwd=work)
    as_file = await datastore("download", "--json", url, "--output", str(tmp_path / "renamed.bin"))

    assert into_folder.returncode == here.returncode == as_file.returncode == 0
    assert into_folder.stdout == f"{folder / 'doc.bin'}  {len(data)} bytes  sha256 {sha256_hex(data)} verified\n"
    assert here.stdout == f"doc.bin  {len(data)} bytes  sha256 {sha256_hex(data)} verified\n"
    assert json.loads(as_file.stdout) == {
        "path": str(tmp_path / "renamed.bin"),
        "size": len(data),
        "sha256": sha256_hex(data),
        "verified": True,
        "resumed_from": 0,
    }
    for path in (folder / "doc.bin", work / "doc.bin", tmp_path / "renamed.bin"):
        assert await asyncio.to_thread(path.read_bytes) == data


async def test_download_resumes_a_partial_file_unless_told_not_to(store: Store, tmp_path: Path) -> None:
    data = payload(3 * CHUNK, 24)
    await upload_with_the_cli(store, tmp_path, "resume.bin", data)
    head = await store.client.head("/files/resume.bin")
    etag = head.headers["ETag"]
    half = len(data) // 2
    url = files_url(store) + "resume.bin"
    partial = {"resume.bin.part": data[:half], "resume.bin.part.etag": etag.encode()}
    resumed_dir, fresh_dir = tmp_path / "resumed", tmp_path / "fresh"
    await asyncio.to_thread(write_files, resumed_dir, partial)
    await asyncio.to_thread(write_files, fresh_dir, partial)

    resumed = await datastore("download", url, "-o", str(resumed_dir))
    fresh = await datastore("download", "--json", "--no-resume", url, "-o", str(fresh_dir))

    assert resumed.returncode == 0, resumed
    assert resumed.stdout == (
        f"{resumed_dir / 'resume.bin'}  {len(data)} bytes  sha256 {sha256_hex(data)} verified, resumed at byte {half}\n"
    )
    assert fresh.returncode == 0, fresh
    assert json.loads(fresh.stdout)["resumed_from"] == 0
    for folder in (resumed_dir, fresh_dir):
        assert await asyncio.to_thread((folder / "resume.bin").read_bytes) == data
        assert sorted(os.listdir(folder)) == ["resume.bin"]


@pytest.mark.parametrize("quiet", [pytest.param((), id="with-progress"), pytest.param(("-q",), id="quiet")])
async def test_download_of_a_missing_file_is_one_line(store: Store, tmp_path: Path, quiet: tuple[str]) -> None:
    ran = await datastore("download", *quiet, files_url(store) + "absent.txt", "-o", str(tmp_path))
    assert_one_line_failure(ran, 1, "datastore: 404 File not found")
    assert not (tmp_path / "absent.txt").exists()
    assert not (tmp_path / "absent.txt.part").exists()


# -- ls, status, cancel ------------------------------------------------------------------------


async def test_ls_json_lists_every_field(store: Store, tmp_path: Path) -> None:
    await upload_with_the_cli(store, tmp_path, "listed.txt", b"listed")
    ran = await datastore("ls", "--json", files_url(store))
    assert ran.returncode == 0, ran
    (entry,) = json.loads(ran.stdout)
    assert {k: entry[k] for k in ("name", "size", "sha256", "owner", "url")} == {
        "name": "listed.txt",
        "size": 6,
        "sha256": sha256_hex(b"listed"),
        "owner": None,
        "url": files_url(store) + "listed.txt",
    }


async def test_cancel_an_unfinished_transfer(store: Store) -> None:
    data = payload(3 * CHUNK, 25)
    key = await store.register([("unfinished.bin", data), ("untouched.txt", b"x")])
    # The first chunk of the first file arrives; the rest never does.
    response = await store.client.patch(
        f"/files/{key}/0",
        data=data[:CHUNK],
        headers={
            "Tus-Resumable": "1.0.0",
            "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream",
        },
    )
    assert response.status == 204
    before = await datastore("status", base_url(store), key)
    assert before.stdout.split()[:2] == [key, "IN_PROGRESS"]

    cancel = await datastore("cancel", base_url(store), key)
    assert cancel.returncode == 0, cancel
    head, *rows = cancel.stdout.splitlines()
    assert head.split()[:2] == [key, "CANCELLED"]
    assert [row.split()[:2] + row.split()[3:] for row in rows] == [
        ["0", "CANCELLED", "unfinished.bin"],
        ["1", "CANCELLED", "untouched.txt"],
    ]
    after = await datastore("status", "--json", files_url(store), key)
    assert json.loads(after.stdout)["state"] == "CANCELLED"
    assert store.served_files() == []
    assert store.staged_files() == []


async def test_cancel_of_a_finished_transfer_and_status_of_an_unknown_key(store: Store, tmp_path: Path) -> None:
    (path,) = await asyncio.to_thread(write_files, tmp_path, {"done.txt": b"done"})
    upload = await datastore("upload", files_url(store), str(path))
    assert upload.returncode == 0, upload
    cancel = await datastore("cancel", base_url(store), upload.key)
    assert_one_line_failure(
        cancel, 1, re.compile(r"datastore: 409 .*the transfer has finished; delete its files instead")
    )
    unknown = await datastore("status", base_url(store), "0" * 40)
    assert_one_line_failure(unknown, 1, "datastore: 404 Transfer key not found")
    assert await served(store, "done.txt") == b"done"


# -- wrong URLs --------------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nothing else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def command_for(command: str, url: str, tmp_path: Path) -> list[str]:
    return {
        "upload": ["upload", url, str(tmp_path / "file.txt")],
        "download": ["download", url + "file.txt", "-o", str(tmp_path)],
        "ls": ["ls", url],
        "status": ["status", url, "0" * 40],
        "cancel": ["cancel", url, "0" * 40],
    }[command]


COMMANDS = ["upload", "download", "ls", "status", "cancel"]


@pytest.mark.parametrize("command", COMMANDS)
async def test_a_url_that_is_not_http_is_one_line(command: str, tmp_path: Path) -> None:
    await asyncio.to_thread(write_files, tmp_path, {"file.txt": b"file"})
    ran = await datastore(*command_for(command, "ftp://x/files/", tmp_path))
    target = "ftp://x/files/file.txt" if command == "download" else "ftp://x/files/"
    assert_one_line_failure(ran, 2, f"datastore: not an http(s) URL: {target!r}")


@pytest.mark.parametrize("command", COMMANDS)
async def test_a_url_where_nothing_listens_fails_promptly_with_one_line(
    command: str, tmp_path: Path, closed_port: int
) -> None:
    await asyncio.to_thread(write_files, tmp_path, {"file.txt": b"file"})
    base = f"http://127.0.0.1:{closed_port}"
    ran = await datastore(*command_for(command, base + "/files/", tmp_path), timeout=30)
    assert_one_line_failure(ran, 1, re.compile(rf"datastore: cannot connect to {re.escape(base)}: .+"))
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


# -- TLS ---------------------------------------------------------------------------------------


async def test_tls_upload_and_ls_with_a_client_certificate(tmp_path: Path) -> None:
    paths = await asyncio.to_thread(write_files, tmp_path / "sources", {"tls.bin": payload(CHUNK + 5, 26)})
    async with running_tls_store(tmp_path / "tls") as tls:
        base = tls.url
        url = f"{base}/files/"
        credentials = ["--cacert", str(tls.ca), "--cert", str(tls.cert), "--key", str(tls.key)]
        upload = await datastore("upload", *credentials, url, str(paths[0]))
        listing = await datastore("ls", "--json", *credentials, url)
        anonymous = await datastore("ls", "--cacert", str(tls.ca), url)
        untrusted = await datastore("ls", "--cert", str(tls.cert), "--key", str(tls.key), url)
    plain = await datastore("ls", *credentials, "http://127.0.0.1:1/files/")

    assert upload.returncode == 0, upload
    assert upload.stdout.startswith(f"{url}tls.bin  {CHUNK + 5} bytes  sha256 ")
    assert [(e["name"], e["owner"], e["owner_authenticated"]) for e in json.loads(listing.stdout)] == [
        ("tls.bin", ADA_CERT_DN, True)
    ]
    # Without a certificate the server hangs up; without the CA the client does not trust the server.
    assert_one_line_failure(anonymous, 1, re.compile(rf"datastore: .*{re.escape(base)}.*"))
    assert_one_line_failure(untrusted, 1, re.compile(rf"datastore: TLS certificate problem with {re.escape(base)}: .+"))
    assert_one_line_failure(plain, 2, "datastore: --cacert/--cert/--key need an https URL")


@pytest.mark.parametrize("missing", ["--cacert", "--cert", "--key"])
async def test_a_missing_tls_file_is_named_in_one_line(missing: str, tmp_path: Path) -> None:
    tls = await asyncio.to_thread(build_tls_store, tmp_path / "tls")
    files = {"--cacert": tls.ca, "--cert": tls.cert, "--key": tls.key}
    absent = tmp_path / "absent.pem"
    options = [part for option, path in files.items() for part in (option, str(absent if option == missing else path))]
    ran = await datastore("ls", *options, "https://127.0.0.1:1/files/")
    assert_one_line_failure(ran, 2, f"datastore: {absent}: no such file")
