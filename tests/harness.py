"""A real store on loopback for tests, and the few requests every test makes.

``Store`` wraps an :class:`HTTPTransferServer` app served by pytest-aiohttp's
test server (real sockets on 127.0.0.1) with the root, state directory and
handler the test chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from datastore.config import Settings
from datastore.http.server import HTTPTransferServer
from datastore.security.policy import Audience, Policy

#: The policy of the stores most tests start: every client may list, read and upload, so that
#: tests of other behaviour need no credentials; deleting stays the owner's. The defaults are
#: tested as such in the security tests.
OPEN_POLICY = Policy(list=Audience.ANYONE, read=Audience.ANYONE, upload=Audience.ANYONE)

#: The same for a ``datastore serve`` process, with X-Client-DN trusted as the tests' identities.
OPEN_STORE_ENV = {"DATASTORE_TRUST_CLIENT_DN": "true", "DATASTORE_POLICY": "list=anyone,read=anyone,upload=anyone"}


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ini_manifest(files: Sequence[tuple[str, bytes]]) -> bytes:
    """The INI manifest an AccessGrid client would send for ``(name, content)`` pairs."""
    lines = ["[manifest]", f"num_files = {len(files)}", ""]
    for index, (name, content) in enumerate(files):
        lines += [f"[{index}]", f"name = {name}", f"size = {len(content)}", f"checksum = {md5_hex(content)}", ""]
    return "\n".join(lines).encode()


def json_manifest(files: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    return {
        "files": [
            {"name": name, "size": len(content), "md5": md5_hex(content), "sha256": sha256_hex(content)}
            for name, content in files
        ]
    }


def parse_legacy_reply(text: str) -> dict[str, list[str]]:
    """Parse ``key: value`` lines as the AccessGrid client did."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip():
            key, _, value = line.partition(": ")
            values.setdefault(key, []).append(value)
    return values


@dataclass
class Store:
    """A running store and its directories."""

    client: TestClient[Any, Any]
    server: HTTPTransferServer
    root: Path
    state_dir: Path
    handler: Any
    prefix: str = "files"
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def staging(self) -> Path:
        return self.state_dir / "staging"

    def staged_files(self) -> list[str]:
        return sorted(os.listdir(self.staging)) if self.staging.exists() else []

    def served_files(self) -> list[str]:
        folder = self.root / self.prefix
        return sorted(os.listdir(folder)) if folder.exists() else []

    async def register(
        self, files: Sequence[tuple[str, bytes]], *, identity: str | None = None, prefix: str | None = None
    ) -> str:
        """Post a JSON manifest and return the transfer key (asserting success)."""
        headers = {"X-Client-DN": identity} if identity is not None else {}
        response = await self.client.post(
            f"/{prefix or self.prefix}/manifest", json=json_manifest(files), headers=headers
        )
        body = await response.json()
        assert response.status == 201, body
        key: str = body["transfer_key"]
        return key

    async def put(
        self,
        key: str,
        num: int,
        data: bytes,
        *,
        identity: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, str]:
        """PUT a raw body; return (status, reason)."""
        all_headers = dict(headers or {})
        if identity is not None:
            all_headers["X-Client-DN"] = identity
        response = await self.client.put(f"/{self.prefix}/{key}/{num}", data=data, headers=all_headers)
        await response.read()
        return response.status, response.reason or ""


def make_settings(root: Path, state_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test store: open (``OPEN_POLICY``, X-Client-DN trusted) unless ``overrides`` say otherwise."""
    return Settings(
        **{"policy": OPEN_POLICY, "trust_client_dn": True, **overrides}, root=root, state_dir=state_dir, port=0
    )


async def start_stalled_upload(
    host: str, port: int, prefix: str, key: str, num: int, declared: int, sent: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """PUT a body declared as ``declared`` bytes but send only ``sent``, and keep the socket open."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"PUT /{prefix}/{key}/{num} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {declared}\r\n"
        "\r\n"
    ).encode()
    writer.write(head + sent)
    await writer.drain()
    return reader, writer


@dataclass(frozen=True)
class RawAnswer:
    """One HTTP answer read off a raw connection."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def code(self) -> str | None:
        """The error's code, for an error answered as JSON."""
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            return None
        code: str | None = json.loads(self.body).get("error")
        return code


async def read_answer(reader: asyncio.StreamReader) -> RawAnswer:
    """The next answer on a raw connection, read as soon as it is whole (its head, then Content-Length
    bytes): whether the connection ends then is another matter (a balancer keeps it open while the
    request's body is still due)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in filter(None, lines):
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    body = await reader.readexactly(int(headers.get("Content-Length", "0")))
    return RawAnswer(int(status_line.split(" ", 2)[1]), headers, body)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds (a state observed on disk), failing after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            # Nothing signals "bytes reached staging" (in the crash test it is another process),
            # so the disk is polled until it shows the state; the timeout only bounds a failure.
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Wait until ``await condition()`` holds (a state a store reports), failing after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            # A job runs in the store's own time (another process, often): its state is read until it
            # shows the condition; the timeout only bounds a failure.
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


def staged_bytes(staging: Path) -> int:
    if not staging.exists():
        return 0
    return sum(entry.stat().st_size for entry in staging.iterdir())


#: The line ``datastore serve`` prints for every prefix it serves.
SERVING = re.compile(
    r"serving \S+ at (?P<url>(?P<base>(?P<scheme>https?)://(?P<host>127\.0\.0\.1):(?P<port>\d+))/(?P<prefix>[^/ ]+)/)"
)


async def spawn_serve(
    *args: str,
    env: Mapping[str, str] | None = None,
    stderr: Any = asyncio.subprocess.DEVNULL,
    urls: int = 1,
    timeout: float = 30.0,
    open_store: bool = True,
    preexec_fn: Callable[[], None] | None = None,
) -> tuple[asyncio.subprocess.Process, list[re.Match[str]]]:
    """Start ``python -m datastore serve --port 0 ARGS`` as a user would.

    Returns the process once it printed ``urls`` serving lines, with those
    lines' matches of :data:`SERVING`; the caller stops the process. With
    ``open_store`` it runs with :data:`OPEN_STORE_ENV` (then ``env``);
    ``preexec_fn`` runs in the child before the store starts (to lower a limit, say).
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "datastore",
        "serve",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env={**os.environ, **(OPEN_STORE_ENV if open_store else {}), **(env or {})},
        preexec_fn=preexec_fn,
    )
    assert process.stdout is not None
    found: list[re.Match[str]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(found) < urls:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise AssertionError("the server exited before printing its URL")
                if match := SERVING.search(line):
                    found.append(match)
    except BaseException:
        if process.returncode is None:
            process.kill()
        await process.wait()
        raise
    return process, found


#: The line the upload command prints first (on standard error): the key to --resume.
KEY_LINE = re.compile(r"transfer key ([0-9a-f]{40})")


@dataclass
class Ran:
    """A finished command."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        """The lines written to standard error."""
        return self.stderr.splitlines()

    @property
    def key(self) -> str:
        match = KEY_LINE.search(self.stderr)
        assert match, self.stderr
        return match[1]


async def datastore(*args: str, cwd: Path | None = None, timeout: float = 60.0) -> Ran:
    """Run ``python -m datastore ARGS`` to the end (failing after ``timeout`` seconds)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "datastore",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.communicate()
        raise AssertionError(f"datastore {' '.join(args)} was still running after {timeout} s") from None
    assert process.returncode is not None
    return Ran(args, process.returncode, stdout.decode(), stderr.decode())


@contextlib.asynccontextmanager
async def job_store(folder: Path, data: bytes, owner: str) -> AsyncIterator[re.Match[str]]:
    """One ``datastore serve`` whose jobs may reach 127.0.0.1, with ``a.bin`` (``data``) uploaded by
    ``owner``: its serving line's match; stopped by its PID at the end."""
    process, (match,) = await spawn_serve("--root", str(folder / "served"), env={"DATASTORE_JOB_HOSTS": "127.0.0.1"})
    try:
        source = folder / "a.bin"
        await asyncio.to_thread(source.write_bytes, data)
        upload = await datastore("upload", match["url"], str(source), "--identity", owner, "--quiet")
        assert upload.returncode == 0, upload
        yield match
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGTERM)
        async with asyncio.timeout(30):
            await process.communicate()


def assert_one_line_failure(ran: Ran, status: int, line: str | re.Pattern[str]) -> None:
    """Exit ``status``, nothing on standard output, exactly one line on standard error."""
    assert ran.returncode == status, ran
    assert "Traceback" not in ran.stderr
    assert ran.stdout == ""
    assert len(ran.errors) == 1, f"expected one line on stderr, got {ran.stderr!r}"
    if isinstance(line, str):
        assert ran.errors[0] == line
    else:
        assert line.fullmatch(ran.errors[0]), ran.errors[0]
