"""Mirroring a prefix with Debian's wget and rclone, as people do, against a real store.

``wget -r -np -nH`` and ``rclone copy :http:`` walk the page's plain links
(``GET /{prefix}/`` answers them the page: wget sends ``Accept: */*``, rclone
no Accept at all) and must bring back every file byte for byte, whatever its
name, and only what an anonymous reader may list: nothing from a prefix that
refuses anonymous listings, no file kept to TLS from the plain-HTTP listener.

These tests never skip: without wget or rclone they fail and say how to
install them (``make test`` installs both).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from .harness import Ran, datastore, spawn_serve
from .test_tls import PREFIX as TLS_PREFIX
from .test_tls import Pki, TlsStore, build_store

#: Names a mirror must carry through links: spaces, non-ASCII, URL delimiters, a leading dash, an
#: empty file. ("?" never gets here: it is one of the reserved characters a name may not hold.)
CONTENTS = {
    "big one.bin": os.urandom(3 << 20),
    "résumé ü€ 日本語.txt": "é, ü, € and 日本語 in the content too\n".encode() * 100,
    "hash#tag.txt": b"# not a fragment\n",
    "100% done.txt": b"% not an escape\n",
    "a&b=c;d+e.txt": b"& not an entity\n",
    "-leading-dash.txt": b"- not an option\n",
    "it's.txt": b"' not a quote\n",
    "empty.txt": b"",
}
SECRET = {"private report.txt": b"only for users\n"}

#: The store: "public" lets anonymous clients list and read, "private" keeps the shipped default (users only).
STORE_CONFIG = """\
prefixes = ["public", "private"]

[policy.public]
list = "anyone"
read = "anyone"
"""


def tool(name: str) -> str:
    """The path of Debian's ``name``; the test fails (never skips) without it."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run 'make test' (it installs Debian's {name}) or 'apt-get install {name}'")
    return found


async def run(*args: str, cwd: Path | None = None, timeout: float = 60.0) -> Ran:
    """Run a command to the end (failing after ``timeout`` seconds)."""
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.communicate()
        raise AssertionError(f"{args[0]} was still running after {timeout} s") from None
    assert process.returncode is not None
    return Ran(args, process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))


async def wget(url: str, dest: Path, *options: str) -> Ran:
    """``wget -r -np -nH URL`` into ``dest`` (no wgetrc of the machine's)."""
    return await run(tool("wget"), "--no-config", "-nv", "-r", "-np", "-nH", "-P", str(dest), *options, url)


async def rclone(url: str, dest: Path, *options: str) -> Ran:
    """``rclone copy :http: DEST --http-url URL`` (with an empty configuration of its own)."""
    config = dest.parent / f"{dest.name}.rclone.conf"
    config.write_text("")
    return await run(tool("rclone"), "copy", ":http:", str(dest), "--http-url", url, "--config", str(config), *options)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path: content)."""
    if not folder.exists():
        return {}
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@dataclass
class Served:
    base: str
    root: Path
    #: A token that may read (list and download) every prefix.
    reader: str


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """``datastore serve`` with "public" and "private" filled by the administrator (``datastore upload``)."""
    (tmp_path / "store.toml").write_text(STORE_CONFIG)
    root = tmp_path / "data"
    process, lines = await spawn_serve(
        "--root", str(root), "--config", str(tmp_path / "store.toml"), open_store=False, urls=2
    )
    try:
        base = lines[0]["base"]
        token = (root / ".datastore" / "admin.token").read_text().strip()
        sources = tmp_path / "sources"
        for prefix, contents in (("public", CONTENTS), ("private", SECRET)):
            folder = sources / prefix
            folder.mkdir(parents=True)
            for name, content in contents.items():
                (folder / name).write_bytes(content)
            ran = await datastore("upload", f"{base}/{prefix}/", *map(str, sorted(folder.iterdir())), "--token", token)
            assert ran.returncode == 0, ran
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session,
            session.post(f"{base}/_api/v1/tokens", json={"subject": "reader", "actions": ["read"]}) as response,
        ):
            assert response.status == 201, await response.text()
            reader = (await response.json())["token"]
        yield Served(base, root, reader)
    finally:
        process.terminate()
        await process.wait()


async def test_wget_mirrors_a_prefix_byte_for_byte(served: Served, tmp_path: Path) -> None:
    ran = await wget(f"{served.base}/public/", tmp_path / "mirror")

    assert ran.returncode == 0, ran
    mirrored = tree(tmp_path / "mirror")
    # wget keeps the page it walked as index.html beside the files.
    assert "<a href=" in mirrored.pop("public/index.html").decode()
    assert mirrored == {f"public/{name}": content for name, content in CONTENTS.items()}


async def test_rclone_mirrors_a_prefix_byte_for_byte(served: Served, tmp_path: Path) -> None:
    ran = await rclone(f"{served.base}/public/", tmp_path / "mirror")

    assert ran.returncode == 0, ran
    assert tree(tmp_path / "mirror") == CONTENTS
    # A second run finds everything there already (sizes and times agree) and copies nothing.
    again = await rclone(f"{served.base}/public/", tmp_path / "mirror", "-v")
    assert again.returncode == 0, again
    assert "There was nothing to transfer" in again.stderr, again.stderr
    assert re.search(rf"Checks:\s+{len(CONTENTS)} / {len(CONTENTS)}, 100%", again.stderr), again.stderr


async def test_a_prefix_that_refuses_anonymous_listings_yields_nothing(served: Served, tmp_path: Path) -> None:
    url = f"{served.base}/private/"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Accept": "application/json"}) as response:
            assert response.status == 401
        # The page for the mirroring tools: the same status, and no name.
        async with session.get(url, headers={"Accept": "*/*"}) as response:
            assert (response.status, response.content_type) == (401, "text/html")
            assert "private report" not in await response.text()

    fetched = await wget(url, tmp_path / "wget")
    copied = await rclone(url, tmp_path / "rclone")

    assert fetched.returncode == 6, fetched  # wget's "authentication failure"
    assert "Authentication Failed" in fetched.stderr
    assert copied.returncode != 0, copied
    assert "401" in copied.stderr
    assert tree(tmp_path / "wget") == {}
    assert tree(tmp_path / "rclone") == {}


async def test_a_reader_with_a_token_mirrors_the_prefix_that_refuses_anonymous_clients(
    served: Served, tmp_path: Path
) -> None:
    url, authorization = f"{served.base}/private/", f"Authorization: Bearer {served.reader}"

    fetched = await wget(url, tmp_path / "wget", f"--header={authorization}")
    copied = await rclone(url, tmp_path / "rclone", "--header", authorization)

    assert fetched.returncode == 0, fetched
    assert copied.returncode == 0, copied
    assert {k: v for k, v in tree(tmp_path / "wget").items() if k != "private/index.html"} == {
        f"private/{name}": content for name, content in SECRET.items()
    }
    assert tree(tmp_path / "rclone") == SECRET


# -- TLS-only files and the plain-HTTP listener ----------------------------------------------------


@pytest.fixture
async def tls_store(tmp_path: Path) -> AsyncIterator[TlsStore]:
    """A TLS store with a plain-HTTP listener beside it (see test_tls); anonymous clients may list."""
    pki = await asyncio.to_thread(Pki, tmp_path / "pki")
    store = await asyncio.to_thread(build_store, pki, tmp_path / "tls", True, {})
    await store.server.start()
    try:
        yield store
    finally:
        await store.server.stop()


async def test_files_uploaded_over_tls_are_not_mirrored_over_plain_http(tls_store: TlsStore, tmp_path: Path) -> None:
    store = tls_store
    ada = await asyncio.to_thread(store.pki.client, "ada")
    await store.upload(ada, "over tls.txt", b"kept to TLS\n")
    manifest = await store.plain("POST", f"/{TLS_PREFIX}/manifest", json={"files": [{"name": "plain.txt", "size": 6}]})
    assert manifest.status == 201, manifest
    put = await store.plain("PUT", f"/{TLS_PREFIX}/{manifest.json()['transfer_key']}/0", data=b"plain\n")
    assert put.status == 200, put

    plain = f"{store.plain_url}/{TLS_PREFIX}/"
    fetched, copied = await wget(plain, tmp_path / "wget"), await rclone(plain, tmp_path / "rclone")

    assert fetched.returncode == 0, fetched
    assert copied.returncode == 0, copied
    assert {k: v for k, v in tree(tmp_path / "wget").items() if not k.endswith("index.html")} == {
        f"{TLS_PREFIX}/plain.txt": b"plain\n"
    }
    assert tree(tmp_path / "rclone") == {"plain.txt": b"plain\n"}
    # Over TLS, with Ada's certificate, the page lists both.
    over_tls = await wget(
        f"{store.url}/{TLS_PREFIX}/",
        tmp_path / "over-tls",
        f"--ca-certificate={store.pki.ca_pem}",
        f"--certificate={ada.cert}",
        f"--private-key={ada.key}",
    )
    assert over_tls.returncode == 0, over_tls
    assert {k: v for k, v in tree(tmp_path / "over-tls").items() if not k.endswith("index.html")} == {
        f"{TLS_PREFIX}/plain.txt": b"plain\n",
        f"{TLS_PREFIX}/over tls.txt": b"kept to TLS\n",
    }
