"""Uploads: a manifest becomes a transfer key; a request body becomes a
published file.

``handle_manifest`` gates every announced file through the prefix's handler
(all-or-nothing, under the prefix lock) and registers the transfer.
``handle_upload`` takes one body (raw ``POST``/``PUT`` or a browser's
``multipart/form-data`` form) for file ``num`` of a transfer and follows the
house rule: stream, bound, verify, publish, then answer. Bytes are read in
chunks, hashed (MD5 and SHA-256) and written to a staging file outside the
served folders while the next chunk arrives; size and digests are checked;
``os.replace`` publishes; ``complete_upload`` runs; only then does the client
hear ``200 File transfer OK``. Every failure removes the staging file, calls
``cancel_upload`` for a reservation the upload held, and leaves nothing at the
final name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from aiohttp import BodyPartReader, web

from .context import CONTEXT, Mount, StoreContext, prefers_json, render_error
from .errors import (
    AlreadyUploaded,
    BadRequest,
    ChecksumMismatch,
    DatastoreError,
    FileNumberNotFound,
    IdentityMismatch,
    IncompleteUpload,
    LengthRequired,
    NotAuthorized,
    NotEnoughSpace,
    PayloadTooLarge,
    RequestTimeout,
    SizeMismatch,
    TransferExpired,
    TransferNotFound,
    UploadFileNotFound,
    UploadInProgress,
)
from .handlers.interface import FileInfo
from .identity import Identity
from .manifest import Manifest, format_ini_accepted, format_ini_refused, parse_ini, parse_json
from .transfers import FileState, Transfer, TransferFile

log = logging.getLogger(__name__)

#: Room allowed for the multipart framing around a form's file.
FORM_OVERHEAD = 64 << 10


async def handle_manifest(request: web.Request) -> web.Response:
    """``POST /{prefix}/manifest``: register a transfer, answer its key."""
    ctx = request.app[CONTEXT]
    mount = ctx.mount(request.match_info["prefix"])
    identity = ctx.identify(request)
    as_json = request.content_type == "application/json"
    body = await _read_bounded(request, ctx.settings.max_manifest_bytes, ctx.settings.body_timeout)
    limits = ctx.settings.manifest_limits
    manifest = parse_json(body, limits) if as_json else parse_ini(body, limits)
    infos = [FileInfo(f.name, f.size, f.md5, f.sha256) for f in manifest.files]

    async with mount.lock:
        refused = [info.name for info in infos if not await mount.handler.can_upload(identity, info)]
        if not refused:
            transfer = await _reserve(ctx, mount, identity, manifest, infos)

    if refused:
        log.info("manifest for /%s refused for %s: %d file(s)", mount.prefix, identity, len(refused))
        if as_json:
            return web.json_response(
                {
                    "error": "refused",
                    "message": "the store refused these files",
                    "files": [{"name": name, "reason": "refused by the handler"} for name in refused],
                },
                status=403,
            )
        return web.Response(body=format_ini_refused(refused), content_type="text/plain")

    log.info("transfer %s… for /%s: %d file(s) for %s", transfer.key[:8], mount.prefix, len(infos), identity)
    if as_json:
        base = request.url.origin()
        return web.json_response(
            {
                "transfer_key": transfer.key,
                "expires_at": _iso(transfer.expires_at),
                "files": [
                    {
                        "num": f.num,
                        "name": f.name,
                        "size": f.size,
                        "upload_url": str(base.with_path(f"/{mount.prefix}/{transfer.key}/{f.num}")),
                    }
                    for f in transfer.files
                ],
            },
            status=201,
        )
    return web.Response(body=format_ini_accepted(transfer.key), content_type="text/plain")


async def _reserve(
    ctx: StoreContext, mount: Mount, identity: Identity, manifest: Manifest, infos: list[FileInfo]
) -> Transfer:
    """Reserve every file with the handler and register the transfer, or nothing."""
    reserved: list[FileInfo] = []
    try:
        for info in infos:
            await mount.handler.add_pending_upload(identity, info)
            reserved.append(info)
        return await ctx.registry.create(mount.prefix, identity, manifest, ctx.settings.key_lifetime)
    except BaseException:
        for info in reserved:
            await _quietly(mount.handler.cancel_upload(identity, info), "cancel_upload")
        raise


async def handle_upload(request: web.Request) -> web.Response:
    """``POST``/``PUT /{prefix}/{key}/{num}``: receive, verify and publish one file."""
    ctx, mount, identity, transfer, file = await _resolve_upload(request)
    with ctx.upload_slot(file.size):
        previous = await ctx.registry.claim(transfer.key, file.num)
        upload = _Upload(ctx, mount, identity, transfer, file, reserved=previous is FileState.RESERVED)
        verified = await upload.run(request)
    log.info("published /%s/%s (%d bytes) for %s", mount.prefix, file.name, file.size, identity)
    if prefers_json(request):
        return web.json_response(
            {"name": verified.name, "size": verified.size, "md5": verified.md5, "sha256": verified.sha256},
            reason="File transfer OK",
        )
    return web.Response(text="File transfer OK\n", reason="File transfer OK")


async def upload_expect_handler(request: web.Request) -> web.Response | None:
    """Answer ``Expect: 100-continue`` only for an upload that can start.

    curl asks before sending a large body; an unknown key, another
    identity, an expired key or a file already uploaded is refused before a
    byte of the body travels.
    """
    if request.version < (1, 1) or request.headers.get("Expect", "").lower() != "100-continue":
        return None
    try:
        _ctx, _mount, _identity, _transfer, file = await _resolve_upload(request)
        if file.state is FileState.UPLOADING:
            raise UploadInProgress()
        if file.state is FileState.PUBLISHED:
            raise AlreadyUploaded()
    except DatastoreError as exc:
        return render_error(request, exc)
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # What the 100 wrote is not part of the response's size.
    request.writer.output_size = 0
    return None


async def _resolve_upload(request: web.Request) -> tuple[StoreContext, Mount, Identity, Transfer, TransferFile]:
    """The transfer and file an upload URL names, checked against the client."""
    ctx = request.app[CONTEXT]
    prefix = request.match_info["prefix"]
    mount = ctx.mount(prefix)
    identity = ctx.identify(request)
    key = request.match_info["key"]
    num_text = request.match_info["num"]
    if not (num_text.isascii() and num_text.isdigit()) or len(num_text) > 9:
        raise FileNumberNotFound(num_text)
    found = await ctx.registry.lookup_file(key, int(num_text))
    if found is None or found[0].prefix != prefix:
        raise TransferNotFound()
    transfer, file = found
    if transfer.owner != identity:
        raise IdentityMismatch()
    if transfer.expired(time.time()):
        raise TransferExpired()
    if file is None:
        raise FileNumberNotFound(num_text)
    return ctx, mount, identity, transfer, file


@dataclass(frozen=True, slots=True)
class Received:
    """What arrived in the staging file."""

    size: int
    md5: str
    sha256: str


class _Upload:
    """One claimed upload of one file, with everything its cleanup needs."""

    def __init__(
        self,
        ctx: StoreContext,
        mount: Mount,
        identity: Identity,
        transfer: Transfer,
        file: TransferFile,
        *,
        reserved: bool,
    ) -> None:
        self.ctx = ctx
        self.mount = mount
        self.identity = identity
        self.transfer = transfer
        self.file = file
        self.info = FileInfo(file.name, file.size, file.md5, file.sha256)
        self.reserved = reserved
        self.staging = ctx.staging_dir / f"{transfer.key}.{file.num}.{secrets.token_hex(4)}.part"
        self.target: Path | None = None

    async def run(self, request: web.Request) -> FileInfo:
        handler = self.mount.handler
        published = False
        try:
            chunks = _body_chunks(request, self.file.size, self.ctx)
            if not self.reserved:
                await self._regate()
            target = await handler.get_upload_filename(self.identity, self.info)
            if target is None:
                raise UploadFileNotFound()
            await _check_space(self.ctx)
            received = await receive_to_staging(chunks, self.staging, self.file.size, self.ctx)
            _verify(received, self.file)
            await asyncio.to_thread(publish, self.staging, target, self.ctx.settings.fsync)
            published = True
            self.target = target
            verified = FileInfo(self.file.name, received.size, received.md5, received.sha256)
            await handler.complete_upload(self.identity, verified)
        except BaseException as exc:
            await asyncio.shield(self._fail(exc, published))
            raise
        await self.ctx.registry.publish(self.transfer.key, self.file.num, received.md5, received.sha256)
        return verified

    async def _regate(self) -> None:
        """A failed earlier attempt released the reservation: take it again."""
        async with self.mount.lock:
            if not await self.mount.handler.can_upload(self.identity, self.info):
                raise NotAuthorized("the store no longer accepts this file")
            await self.mount.handler.add_pending_upload(self.identity, self.info)
        self.reserved = True

    async def _fail(self, exc: BaseException, published: bool) -> None:
        if isinstance(exc, DatastoreError):
            log.info("upload of %r to /%s failed: %s", self.file.name, self.mount.prefix, exc.message)
        else:
            log.warning("upload of %r to /%s failed: %r", self.file.name, self.mount.prefix, exc)
        await asyncio.to_thread(_unlink_quietly, self.staging)
        if published and self.target is not None:
            await asyncio.to_thread(_unlink_quietly, self.target)
        if self.reserved:
            await _quietly(self.mount.handler.cancel_upload(self.identity, self.info), "cancel_upload")
        await self.ctx.registry.release(self.transfer.key, self.file.num)


def _body_chunks(request: web.Request, size: int, ctx: StoreContext) -> AsyncIterator[bytes]:
    """Check the request's framing against the manifest; return its file's bytes."""
    settings = ctx.settings
    length = request.content_length
    if request.method == "POST" and request.content_type == "multipart/form-data":
        if length is not None and length > size + FORM_OVERHEAD:
            raise PayloadTooLarge(f"the form is larger than the {size} bytes the manifest declares")
        return _form_file_chunks(request, settings.body_timeout, settings.chunk_size)
    if length is None:
        raise LengthRequired()
    if length > settings.max_file_size:
        raise PayloadTooLarge(f"{length} bytes, more than the limit of {settings.max_file_size}")
    if length != size:
        raise SizeMismatch()
    return _stream_chunks(request, settings.body_timeout)


async def _next_chunk(read: Awaitable[bytes], timeout: float) -> bytes:
    try:
        async with asyncio.timeout(timeout):
            return await read
    except TimeoutError:
        raise RequestTimeout(f"no data for {timeout:g} s") from None
    except DatastoreError:
        raise
    except Exception as exc:  # any failure of the transport: the body is cut short
        raise IncompleteUpload(f"the connection failed: {exc}") from None


async def _stream_chunks(request: web.Request, timeout: float) -> AsyncIterator[bytes]:
    while chunk := await _next_chunk(request.content.readany(), timeout):
        yield chunk


async def _form_file_chunks(request: web.Request, timeout: float, chunk_size: int) -> AsyncIterator[bytes]:
    """The bytes of the first file field of a ``multipart/form-data`` body."""
    reader = await request.multipart()
    skipped = 0
    while True:
        part = await _next_part(reader.next(), timeout)
        if part is None:
            raise BadRequest("the form has no file field")
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart forms are not supported")
        if part.filename is not None:
            while chunk := await _next_chunk(part.read_chunk(chunk_size), timeout):
                yield chunk
            return
        # A plain field before the file: skip it, within the framing allowance.
        while chunk := await _next_chunk(part.read_chunk(chunk_size), timeout):
            skipped += len(chunk)
            if skipped > FORM_OVERHEAD:
                raise PayloadTooLarge("the form's other fields are too large")


async def _next_part(read: Awaitable[Any], timeout: float) -> Any:
    try:
        async with asyncio.timeout(timeout):
            return await read
    except TimeoutError:
        raise RequestTimeout(f"no data for {timeout:g} s") from None
    except ValueError as exc:  # aiohttp's multipart parser reports bad framing so
        raise BadRequest(f"malformed multipart body: {exc}") from None


async def receive_to_staging(chunks: AsyncIterator[bytes], staging: Path, limit: int, ctx: StoreContext) -> Received:
    """Write ``chunks`` to ``staging`` while hashing; refuse more than ``limit`` bytes.

    Network reads overlap disk writes and hashing: while one buffer of
    ``chunk_size`` bytes is written and hashed in a worker thread (hashlib
    releases the GIL on large buffers), the next one is received.
    """
    loop = asyncio.get_running_loop()
    md5 = hashlib.md5(usedforsecurity=False)  # the protocol's checksum
    sha256 = hashlib.sha256()
    chunk_size = ctx.settings.chunk_size
    handle = await _open_staging_file(staging)
    pending: asyncio.Future[None] | None = None
    try:
        total = 0
        buffer = bytearray()
        async for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"more than the {limit} bytes the manifest declares")
            buffer += chunk
            if len(buffer) >= chunk_size:
                if pending is not None:
                    await pending
                pending = loop.run_in_executor(None, _write_and_hash, handle, buffer, md5, sha256)
                buffer = bytearray()
        if pending is not None:
            await pending
            pending = None
        if buffer:
            await loop.run_in_executor(None, _write_and_hash, handle, buffer, md5, sha256)
        if ctx.settings.fsync:
            await asyncio.to_thread(_flush_and_sync, handle)
    finally:
        if pending is not None:
            # Never close the file under a write still running in a thread.
            await asyncio.gather(pending, return_exceptions=True)
        await asyncio.to_thread(handle.close)
    return Received(size=total, md5=md5.hexdigest(), sha256=sha256.hexdigest())


def _verify(received: Received, file: TransferFile) -> None:
    if received.size != file.size:
        raise SizeMismatch(f"received {received.size} bytes, the manifest declares {file.size}")
    if file.md5 is not None and received.md5 != file.md5:
        raise ChecksumMismatch()
    if file.sha256 is not None and received.sha256 != file.sha256:
        raise ChecksumMismatch()


async def _check_space(ctx: StoreContext) -> None:
    usage = await asyncio.to_thread(shutil.disk_usage, ctx.staging_dir)
    if usage.free - ctx.settings.min_free_bytes < ctx.bytes_in_flight:
        raise NotEnoughSpace()


def publish(staging: Path, target: Path, fsync: bool) -> None:
    """Move the verified ``staging`` file to ``target`` atomically.

    ``os.replace`` is the only step that makes a file visible. If the staging
    directory is on another filesystem, the file is first copied beside the
    target under a hidden name (which no valid file name can reach) and then
    replaced. With ``fsync`` the directory entry is made durable too.
    """
    try:
        os.replace(staging, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
        try:
            shutil.copyfile(staging, partial)
            if fsync:
                with partial.open("rb+") as handle:
                    os.fsync(handle.fileno())
            os.replace(partial, target)
        finally:
            _unlink_quietly(partial)
        _unlink_quietly(staging)
    if fsync:
        directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


async def _open_staging_file(path: Path) -> IO[bytes]:
    """Open the staging file in a thread, safely against cancellation.

    If the request is cancelled (a client that disconnected, with handler
    cancellation on) while the thread opens the file, the thread is waited
    for and the file closed and removed before the cancellation goes on, so
    no descriptor leaks and no staging file appears after the cleanup ran.
    """
    opening = asyncio.ensure_future(asyncio.to_thread(_open_staging, path))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            handle = await opening
            await asyncio.to_thread(_close_and_unlink, handle)
        raise


def _close_and_unlink(handle: IO[bytes]) -> None:
    handle.close()
    _unlink_quietly(Path(str(handle.name)))


def _open_staging(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "xb", buffering=0)


def _write_and_hash(handle: IO[bytes], data: bytearray, md5: Any, sha256: Any) -> None:
    view = memoryview(data)
    while view:
        written = handle.write(view)
        view = view[written or 0 :]
    md5.update(data)
    sha256.update(data)


def _flush_and_sync(handle: IO[bytes]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path.name, exc)


async def _quietly(call: Awaitable[None], what: str) -> None:
    """Run a handler callback during cleanup; a failure there is logged, not raised."""
    try:
        await call
    except Exception:
        log.exception("%s failed during cleanup", what)


async def _read_bounded(request: web.Request, limit: int, timeout: float) -> bytes:
    """The whole (small) body, refusing more than ``limit`` bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the manifest is {length} bytes, more than the limit of {limit}")
    parts: list[bytes] = []
    total = 0
    while chunk := await _next_chunk(request.content.readany(), timeout):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"the manifest is more than the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")
