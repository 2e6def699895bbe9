"""The driver for rclone remotes: a job's end written ``rclone:NAME:path/to/file``, where NAME is a
remote the operator named in the store's rclone configuration file.

This module owns three things:

* :func:`parse_remote`, the one check of such a URL: only remotes named in the operator's
  configuration (``rclone listremotes --long --config FILE``) are allowed, never an on-the-fly
  connection string (``:backend:``, ``name,option=value:``), never a remote of type ``local`` nor
  one of the wrappers that could expose the server's own disk (alias, union, combine, chunker,
  crypt, compress, hasher, cache); a path holds no ``..`` segment and no control character.
  Refusals are ``DriverError(FORBIDDEN)``, raised before any copy runs.
* :class:`RcloneSource`: ``stat`` is ``rclone lsjson --stat --hash`` (size; ModTime with the size as
  the validator; md5 and sha256 where the backend states them), ``read`` re-stats (SOURCE_CHANGED if
  the validator moved) and streams ``rclone cat --offset N``.
* :class:`RcloneDestination`: most remotes cannot append, so an upload is never resumed. Each attempt
  writes the whole file to a temporary name beside the target (``.NAME.datastore-<hex>.partial``,
  chosen in ``plan`` so that the runner persists it and a crash leaves a name to clean), ``open``
  deletes what an earlier attempt left there and ``offset`` is always 0: the runner sends the file
  again from its first byte. ``write`` pipes the chunks into ``rclone rcat``; ``finish`` checks the
  temporary's size and digests, then publishes it with ``rclone moveto`` (so a half-written file never
  lies under the final name) and reports the final object's size and digests.

Every rclone runs with ``--config FILE`` (never the user's default configuration), without
prompting for a password, and with rclone's own retries off: drivers do not retry, the runner does,
from the classified :class:`~datastore.jobs.drivers.interface.DriverError` a failure raises. Every
process a driver starts is killed and awaited when the task that started it is cancelled or fails.
Messages are one line, taken from rclone's last error line, with URL credentials and queries cut out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import re
import secrets
import unicodedata
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...security.logsafe import printable, redact
from ..states import FailureReason
from .interface import DriverError, Handle, Order, Published, SourceInfo

#: How a job names an rclone end: ``rclone:NAME:path``.
SCHEME = "rclone:"

#: Remote types refused even when the operator's configuration names them: the server's own disk,
#: or a wrapper around another remote (which may be the server's disk, or be given one at run time).
FORBIDDEN_TYPES = frozenset({"local", "alias", "union", "combine", "chunker", "crypt", "compress", "hasher", "cache"})

#: Flags every rclone gets besides ``--config``: no password prompt (stdin carries data), no retries
#: of rclone's own (the runner retries), errors only on stderr.
_COMMON_FLAGS = ("--ask-password=false", "--retries", "1", "--low-level-retries", "1", "--log-level", "ERROR")

#: rclone's exit codes (``rclone help``, "Exit Code").
_DIRECTORY_NOT_FOUND, _FILE_NOT_FOUND, _TEMPORARY, _FATAL = 3, 4, 5, 7

#: The temporary name a destination writes to beside ``NAME``: ``.NAME.datastore-<16 hex>.partial``.
_TEMPORARY_NAME = re.compile(r"\.[^/\\\x00-\x1f\x7f]*\.datastore-[0-9a-f]{16}\.partial")

#: What rclone says of a connection that failed or broke.
_CONNECTION_WORDS = (
    "connection refused",
    "connection reset",
    "no such host",
    "network is unreachable",
    "broken pipe",
    "unexpected eof",
    ": eof",
)

#: The longest message a failure carries.
_MESSAGE_LIMIT = 300


@dataclass(frozen=True, slots=True)
class RemotePath:
    """A checked ``rclone:NAME:path``: a remote the configuration names, its type, and a clean path."""

    remote: str
    type: str
    path: str

    @property
    def spec(self) -> str:
        """The ``NAME:path`` argument rclone takes."""
        return f"{self.remote}:{self.path}"

    def beside(self, name: str) -> RemotePath:
        """The path ``name`` in the same folder as this one."""
        folder = posixpath.dirname(self.path)
        return RemotePath(self.remote, self.type, posixpath.join(folder, name) if folder else name)


#: Per (binary, configuration file): the file's (mtime, size) when read, and its remotes' types.
_REMOTES: dict[tuple[str, str], tuple[tuple[int, int] | None, dict[str, str]]] = {}


def _stamp(config: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(config)
    except FileNotFoundError:
        return None
    return found.st_mtime_ns, found.st_size


async def configured_remotes(config: Path, binary: str = "rclone") -> dict[str, str]:
    """The remotes ``config`` names and their types (``rclone listremotes --long``), read again only
    when the file changed."""
    key = (binary, str(config))
    stamp = await asyncio.to_thread(_stamp, config)
    cached = _REMOTES.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    output = await _run(binary, config, "listremotes", "--long")
    remotes = {}
    for line in output.decode(errors="replace").splitlines():
        name, colon, kind = line.partition(":")
        if colon and name:
            remotes[name] = kind.strip()
    _REMOTES[key] = (stamp, remotes)
    return remotes


def _check_path(path: str) -> str:
    if not path or path.endswith("/"):
        raise DriverError(FailureReason.BAD_REQUEST, "an rclone URL must name a file: rclone:NAME:path/to/file")
    if any(unicodedata.category(c) == "Cc" for c in path):
        raise DriverError(FailureReason.FORBIDDEN, "an rclone path may not hold control characters")
    if any(segment == ".." for segment in re.split(r"[/\\]", path)):
        raise DriverError(FailureReason.FORBIDDEN, "an rclone path may not hold '..' segments")
    return path


async def parse_remote(url: str, config: Path, binary: str = "rclone") -> RemotePath:
    """``rclone:NAME:path`` checked against the operator's configuration ``config``.

    DriverError FORBIDDEN for a connection string (a name starting with ``:`` or holding options
    after a ``,``), a name the configuration does not hold, a remote of a forbidden type
    (:data:`FORBIDDEN_TYPES`), a path with ``..`` segments or control characters; BAD_REQUEST for
    something that is no rclone URL of a file."""
    if not url.startswith(SCHEME):
        raise DriverError(FailureReason.BAD_REQUEST, "not an rclone URL (rclone:NAME:path)")
    name, colon, path = url[len(SCHEME) :].partition(":")
    if not name or "," in name or name.startswith("-") or any(unicodedata.category(c) == "Cc" for c in name):
        raise DriverError(FailureReason.FORBIDDEN, "only remotes named in the store's rclone configuration are allowed")
    if not colon:
        raise DriverError(FailureReason.BAD_REQUEST, "not an rclone URL (rclone:NAME:path)")
    _check_path(path)
    remotes = await configured_remotes(config, binary)
    kind = remotes.get(name)
    if kind is None:
        raise DriverError(FailureReason.FORBIDDEN, f"no rclone remote {printable(name)!r} in the store's configuration")
    if kind in FORBIDDEN_TYPES:
        raise DriverError(FailureReason.FORBIDDEN, f"rclone remotes of type {printable(kind)!r} are not allowed")
    return RemotePath(name, kind, path)


# --- processes ---------------------------------------------------------------------------------

#: rclone's log prefix (``2026/01/02 03:04:05 ERROR : ``) and credentials or queries in URLs.
_LOG_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(?:\.\d+)? (?:[A-Z]+\s*: )?")
_USERINFO = re.compile(r"(?<=://)[^/@\s\"]*@")
_QUERY = re.compile(r"\?[^\s\"]*")


def _last_line(stderr: bytes) -> str:
    """rclone's last error line, one line without its timestamp, credentials or URL queries."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    if not lines:
        return "no message"
    line = _LOG_PREFIX.sub("", lines[-1])
    line = _QUERY.sub("?…", _USERINFO.sub("…@", line))
    return printable(redact(line))[:_MESSAGE_LIMIT]


def classify(command: str, returncode: int, stderr: bytes) -> DriverError:
    """The DriverError for an rclone ``command`` that exited with ``returncode`` and ``stderr``."""
    line = _last_line(stderr)
    text = line.lower()
    message = f"rclone {command} failed (exit {returncode}): {line}"

    def has(*words: str) -> bool:
        # Whole words: an HTTP status must not be found inside a name's random hex digits.
        return any(re.search(rf"(?<![0-9a-z]){re.escape(word)}(?![0-9a-z])", text) for word in words)

    if has("403", "forbidden", "401", "unauthorized", "permission denied", "access denied"):
        reason = FailureReason.FORBIDDEN
    elif has("507", "insufficient storage", "no space left", "quota"):
        reason = FailureReason.NO_SPACE
    elif returncode in (_DIRECTORY_NOT_FOUND, _FILE_NOT_FOUND) or has("not found", "doesn't exist", "404"):
        reason = FailureReason.NOT_FOUND
    elif has("429", "too many requests", "rate limit"):
        reason = FailureReason.THROTTLED
    elif has("timeout", "timed out", "deadline exceeded"):
        reason = FailureReason.TIMEOUT
    elif returncode == _TEMPORARY or has(*_CONNECTION_WORDS):
        reason = FailureReason.CONNECTION
    elif returncode == _FATAL:
        # rclone: "fatal error (one that more retries won't fix, like account suspended)".
        reason = FailureReason.BAD_REQUEST
    else:
        reason = FailureReason.SERVER_ERROR
    return DriverError(reason, message)


def _argv(binary: str, config: Path, args: Sequence[str]) -> list[str]:
    return [binary, "--config", str(config), *_COMMON_FLAGS, *args]


async def _spawn(binary: str, config: Path, args: Sequence[str], *, stdin: bool = False) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *_argv(binary, config, args),
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as error:
        raise DriverError(FailureReason.UNSUPPORTED, f"cannot run rclone: {error.strerror}") from None


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Kill ``process`` if it still runs, and wait for it (even if this task is cancelled again)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(process.wait())


class _Processes:
    """The rclone processes a driver has running: each is killed and awaited when its task ends
    early, and by ``close``."""

    def __init__(self, binary: str, config: Path) -> None:
        self.binary = binary
        self.config = config
        self.running: set[asyncio.subprocess.Process] = set()

    @contextlib.asynccontextmanager
    async def started(self, args: Sequence[str], *, stdin: bool = False) -> AsyncIterator[_Running]:
        process = await _spawn(self.binary, self.config, args, stdin=stdin)
        self.running.add(process)
        assert process.stderr is not None
        running = _Running(process, asyncio.create_task(process.stderr.read()))
        try:
            yield running
        finally:
            running.stderr.cancel()
            await _reap(process)
            self.running.discard(process)

    async def run(self, *args: str) -> bytes:
        """Run rclone ``args`` to its end: its stdout, or the classified DriverError."""
        async with self.started(args) as running:
            assert running.process.stdout is not None
            stdout = await running.process.stdout.read()
            await running.check(args[0])
        return stdout

    async def close(self) -> None:
        for process in list(self.running):
            await _reap(process)
        self.running.clear()


@dataclass
class _Running:
    process: asyncio.subprocess.Process
    stderr: asyncio.Task[bytes]

    async def check(self, command: str) -> None:
        """Wait for the end; DriverError unless rclone exited 0."""
        returncode = await self.process.wait()
        if returncode != 0:
            raise classify(command, returncode, await self.stderr)


async def _run(binary: str, config: Path, *args: str) -> bytes:
    return await _Processes(binary, config).run(*args)


# --- objects -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Object:
    size: int
    mod_time: str
    md5: str | None
    sha256: str | None

    @property
    def validator(self) -> str:
        return f"{self.mod_time}/{self.size}"


async def _stat(processes: _Processes, where: RemotePath) -> _Object | None:
    """The object at ``where`` (``rclone lsjson --stat --hash``), None if there is none. DriverError
    BAD_REQUEST if it is a folder."""
    try:
        output = await processes.run("lsjson", "--stat", "--hash-type", "md5", "--hash-type", "sha256", where.spec)
    except DriverError as error:
        if error.reason is FailureReason.NOT_FOUND:
            return None
        raise
    try:
        entry: dict[str, Any] = json.loads(output)
        if entry.get("IsDir"):
            raise DriverError(FailureReason.BAD_REQUEST, f"{printable(where.spec)} is a folder, not a file")
        hashes = {key.lower(): str(value).lower() for key, value in (entry.get("Hashes") or {}).items() if value}
        return _Object(int(entry["Size"]), str(entry.get("ModTime", "")), hashes.get("md5"), hashes.get("sha256"))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DriverError(FailureReason.SERVER_ERROR, "rclone lsjson gave no usable answer") from None


async def _hashsum(processes: _Processes, kind: str, where: RemotePath) -> str:
    """``kind`` (md5, sha256) of the object at ``where``, downloaded and hashed by rclone."""
    output = await processes.run("hashsum", kind, "--download", where.spec)
    digest = output.decode(errors="replace").split(maxsplit=1)[:1]
    if not digest or not re.fullmatch(r"[0-9a-fA-F]+", digest[0]):
        raise DriverError(FailureReason.SERVER_ERROR, f"rclone hashsum {kind} gave no digest")
    return digest[0].lower()


# --- the ends ----------------------------------------------------------------------------------


class RcloneSource:
    """A file on an rclone remote, read with ``rclone cat``."""

    def __init__(self, url: str, *, config: Path, binary: str = "rclone", chunk_size: int = 1 << 20) -> None:
        self.url = url
        self.chunk_size = chunk_size
        self._processes = _Processes(binary, config)
        self._where: RemotePath | None = None

    async def _remote(self) -> RemotePath:
        if self._where is None:
            self._where = await parse_remote(self.url, self._processes.config, self._processes.binary)
        return self._where

    async def stat(self) -> SourceInfo:
        """Size, validator (ModTime/size) and the md5/sha256 the backend states (None where it has none)."""
        where = await self._remote()
        found = await _stat(self._processes, where)
        if found is None:
            raise DriverError(FailureReason.NOT_FOUND, f"no file {printable(where.spec)}")
        return SourceInfo(size=found.size, validator=found.validator, md5=found.md5, sha256=found.sha256)

    async def read(self, offset: int, info: SourceInfo) -> AsyncIterator[bytes]:
        """The bytes from ``offset``: SOURCE_CHANGED first if the file is no longer ``info``'s version;
        a stream that ends short, or an rclone that fails, raises its classified DriverError."""
        now = await self.stat()
        if now.validator != info.validator:
            raise DriverError(FailureReason.SOURCE_CHANGED, "the source changed since it was stated")
        expected = info.size - offset
        if expected <= 0:
            return
        got = 0
        async with self._processes.started(["cat", "--offset", str(offset), (await self._remote()).spec]) as running:
            stdout = running.process.stdout
            assert stdout is not None
            while chunk := await stdout.read(self.chunk_size):
                got += len(chunk)
                if got > expected:
                    raise DriverError(FailureReason.SOURCE_CHANGED, "the source grew while it was read")
                yield chunk
            await running.check("cat")
        if got < expected:
            raise DriverError(FailureReason.SERVER_ERROR, f"rclone cat ended after {got} of {expected} bytes")

    async def close(self) -> None:
        await self._processes.close()


class RcloneDestination:
    """A file to write on an rclone remote, through a temporary name beside it.

    Not resumable: :meth:`offset` is always 0, and every attempt sends the whole file again (most
    remotes cannot append). The handle holds the temporary's name (``temp``), the size and digests
    ordered. :meth:`finish` reports the digests the backend states for the published object
    (``lsjson --hash``); where it states none, rclone downloads the temporary and hashes it
    (``hashsum md5 --download``, ``hashsum sha256 --download``) before publishing it with a move.
    With ``overwrite`` False an existing final object is never replaced (EXISTS), though a file
    created there between the check and the move may be. An attempt that crashed between the move
    and the runner's record of it leaves the next attempt the file it published: found under the
    final name, its temporary gone, with the size and a digest the order names, it is taken as this
    upload's (``published`` in the handle) rather than refused as EXISTS; without a digest to tell,
    it is refused.
    """

    def __init__(
        self,
        url: str,
        *,
        config: Path,
        binary: str = "rclone",
        chunk_size: int = 1 << 20,
        overwrite: bool = False,
    ) -> None:
        self.url = url
        self.chunk_size = chunk_size
        self.overwrite = overwrite
        self._processes = _Processes(binary, config)
        self._where: RemotePath | None = None

    async def _remote(self) -> RemotePath:
        if self._where is None:
            self._where = await parse_remote(self.url, self._processes.config, self._processes.binary)
        return self._where

    async def _temporary(self, handle: Handle) -> RemotePath:
        temp = handle.get("temp")
        if not isinstance(temp, str) or not _TEMPORARY_NAME.fullmatch(temp):
            raise DriverError(FailureReason.BAD_REQUEST, "the handle names no temporary file")
        return (await self._remote()).beside(temp)

    def plan(self, handle: Handle, order: Order) -> Handle:
        """The temporary name (kept from ``handle`` if it has one, so that ``open`` can delete what an
        earlier attempt left there) and the order's size and digests."""
        temp = handle.get("temp")
        again = isinstance(temp, str)
        if not isinstance(temp, str):
            name = self.url[len(SCHEME) :].partition(":")[2].rsplit("/", 1)[-1]
            temp = f".{name}.datastore-{secrets.token_hex(8)}.partial"
        return {"temp": temp, "size": order.size, "md5": order.md5, "sha256": order.sha256, "again": again}

    async def open(self, handle: Handle, order: Order) -> Handle:
        """Delete an earlier attempt's temporary; EXISTS if the final object exists (unless overwrite, or
        it is what an earlier attempt of this upload published)."""
        where = await self._remote()
        temp = await self._temporary(handle)
        left = await _stat(self._processes, temp) if handle.get("again") else None
        await self.discard(handle)
        final = await _stat(self._processes, where)
        if final is not None and handle.get("again") and left is None and await self._is_ours(final, where, order):
            return {**handle, "published": True}
        if not self.overwrite and final is not None:
            raise DriverError(FailureReason.EXISTS, f"{printable(where.spec)} exists")
        return {**handle, "published": False}

    async def _is_ours(self, final: _Object, where: RemotePath, order: Order) -> bool:
        """Whether the final object has the size and (at least one) digest of ``order``."""
        if final.size != order.size or not (order.md5 or order.sha256):
            return False
        md5, sha256 = final.md5, final.sha256
        if order.md5 and not md5:
            md5 = await _hashsum(self._processes, "md5", where)
        if order.sha256 and not sha256 and not md5:
            sha256 = await _hashsum(self._processes, "sha256", where)
        checks = [(order.md5, md5), (order.sha256, sha256)]
        return any(want and got for want, got in checks) and all(
            not (want and got) or want.lower() == got for want, got in checks
        )

    async def offset(self, handle: Handle) -> int:
        """0 (a partial temporary is never resumed, the file is sent again from its start), or the
        whole size for an upload an earlier attempt published."""
        size = handle.get("size")
        return size if handle.get("published") and isinstance(size, int) else 0

    async def write(self, handle: Handle, offset: int, chunks: AsyncIterator[bytes]) -> int:
        """Pipe ``chunks`` into ``rclone rcat`` of the temporary; the bytes written."""
        if offset != 0:
            raise DriverError(FailureReason.UNSUPPORTED, "an rclone destination is written from offset 0 only")
        temp = await self._temporary(handle)
        size = handle.get("size")
        sized = ["--size", str(size)] if isinstance(size, int) and size >= 0 else []
        written = 0
        async with self._processes.started(["rcat", *sized, temp.spec], stdin=True) as running:
            stdin = running.process.stdin
            assert stdin is not None
            try:
                async for chunk in chunks:
                    stdin.write(chunk)
                    await stdin.drain()
                    written += len(chunk)
                stdin.close()
                await stdin.wait_closed()
            except (BrokenPipeError, ConnectionResetError):
                pass  # rclone stopped reading: its exit status says why
            await running.check("rcat")
        return written

    async def finish(self, handle: Handle) -> Published:
        """Check the temporary (size, digests against those ordered), move it to the final name and
        report the final object's size and digests."""
        where = await self._remote()
        if handle.get("published"):
            final = await _stat(self._processes, where)
            if final is None:
                raise DriverError(FailureReason.RESTARTED, f"{printable(where.spec)} is gone; it is sent again")
            return Published(
                size=final.size,
                md5=final.md5 or await _hashsum(self._processes, "md5", where),
                sha256=final.sha256 or await _hashsum(self._processes, "sha256", where),
            )
        temp = await self._temporary(handle)
        written = await _stat(self._processes, temp)
        if written is None:
            raise DriverError(FailureReason.NOT_FOUND, "the temporary file is gone")
        if isinstance(handle.get("size"), int) and written.size != handle["size"]:
            await self.discard(handle)
            raise DriverError(FailureReason.SIZE_MISMATCH, f"wrote {written.size} bytes of {handle['size']}")
        md5, sha256 = written.md5, written.sha256
        async with asyncio.TaskGroup() as group:
            md5_task = None if md5 else group.create_task(_hashsum(self._processes, "md5", temp))
            sha256_task = None if sha256 else group.create_task(_hashsum(self._processes, "sha256", temp))
        md5 = md5 or (md5_task.result() if md5_task else None)
        sha256 = sha256 or (sha256_task.result() if sha256_task else None)
        for kind, got in (("md5", md5), ("sha256", sha256)):
            wanted = handle.get(kind)
            if isinstance(wanted, str) and got is not None and wanted.lower() != got:
                await self.discard(handle)
                raise DriverError(FailureReason.CHECKSUM_MISMATCH, f"the written file's {kind} is not the one ordered")
        if not self.overwrite and await _stat(self._processes, where) is not None:
            raise DriverError(FailureReason.EXISTS, f"{printable(where.spec)} exists")
        await self._processes.run("moveto", temp.spec, where.spec)
        published = await _stat(self._processes, where)
        if published is None:
            raise DriverError(FailureReason.NOT_FOUND, f"{printable(where.spec)} is gone after it was published")
        return Published(size=published.size, md5=published.md5 or md5, sha256=published.sha256 or sha256)

    async def discard(self, handle: Handle) -> None:
        """Delete the temporary (nothing if there is none)."""
        temp = await self._temporary(handle)
        try:
            await self._processes.run("deletefile", temp.spec)
        except DriverError as error:
            if error.reason is not FailureReason.NOT_FOUND:
                raise

    async def close(self) -> None:
        await self._processes.close()
