"""Uploads: a manifest becomes a transfer key; a request body becomes a
published file.

``handle_manifest`` gates every announced file through the prefix's handler
(all-or-nothing, under the prefix lock, after checking the disk has room)
and registers the transfer. ``handle_upload`` takes one whole body (raw
``POST``/``PUT`` or a browser's ``multipart/form-data`` form) for file
``num`` of a transfer; the tus endpoints (``tus.py``) append to the same
staging file piece by piece. Both follow the house rule: stream, bound,
verify, publish, then answer. :class:`FileUpload` is the one place that
verifies, publishes and calls ``complete_upload`` or ``cancel_upload``.

A whole-body upload is all or nothing: any failure removes its staging
file and calls ``cancel_upload``; sending it again re-gates the file. A
resumable upload keeps what reached the disk when a request fails, and only
a failed verification of the whole file (or cancellation, termination,
expiry) throws its bytes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from ..errors import (
    AlreadyUploaded,
    ChecksumMismatch,
    DatastoreError,
    FileNumberNotFound,
    IdentityMismatch,
    InsufficientStorage,
    LengthRequired,
    NotAuthorized,
    NotEnoughSpace,
    PayloadTooLarge,
    SizeMismatch,
    TransferCancelled,
    TransferExpired,
    TransferNotFound,
    UploadFileNotFound,
    UploadInProgress,
)
from ..handlers.interface import FileInfo
from ..protocol.manifest import Manifest, format_ini_accepted, format_ini_refused, parse_ini, parse_json
from ..protocol.timestamps import iso_time
from ..security.identity import Identity
from ..security.logsafe import redact
from ..security.policy import Action
from ..state.transfers import FileState, Transfer, TransferFile, TransferState
from ..storage import staging
from ..storage.staging import Digests
from .bodies import FORM_OVERHEAD, check_form, form_file_chunks, read_bounded, stream_chunks
from .context import (
    CONTEXT,
    Mount,
    RunningUpload,
    StoreContext,
    base_url,
    client_key,
    identify,
    prefers_json,
    render_error,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


# -- manifests ------------------------------------------------------------------------------


async def handle_manifest(request: web.Request) -> web.Response:
    """``POST /{prefix}/manifest``: register a transfer, answer its key."""
    ctx = request.app[CONTEXT]
    mount = ctx.mount(request.match_info["prefix"])
    identity = await identify(request)
    await mount.authorize(identity, Action.UPLOAD)
    client = client_key(request, identity)
    # A client that holds all the transfers it may is refused before a byte of its manifest is read.
    await ctx.registry.check_quota(client, ctx.quota, 1, 0)
    as_json = request.content_type == "application/json"
    with ctx.manifest_memory.holding() as held:
        body = await read_bounded(request, ctx.settings.max_manifest_bytes, ctx.settings, held)
        manifest = await parse_manifest(ctx, body, as_json)
    try:
        transfer, refused = await register_transfer(ctx, mount, identity, client, manifest)
    except InsufficientStorage:
        if as_json:
            raise
        raise NotEnoughSpace() from None

    if transfer is None:
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

    log.info("transfer %s… for /%s: %d file(s) for %s", transfer.key[:8], mount.prefix, len(manifest.files), identity)
    if as_json:
        # Prefix and key are URL-safe by construction, so the URLs are joined as text.
        base = base_url(request)
        uploads = f"{base}/{mount.prefix}/{transfer.key}/"
        return web.json_response(
            {
                "transfer_key": transfer.key,
                "expires_at": iso_time(transfer.expires_at),
                "status_url": f"{base}/_api/v1/transfers/{transfer.key}",
                "files": [
                    {"num": f.num, "name": f.name, "size": f.size, "upload_url": f"{uploads}{f.num}"}
                    for f in transfer.files
                ],
            },
            status=201,
        )
    return web.Response(body=format_ini_accepted(transfer.key), content_type="text/plain")


#: Manifests larger than this are parsed in a thread, two at a time (``StoreContext.parses``):
#: a 10,000-file INI manifest takes ConfigParser about a second, and even 64 KiB of sections a
#: tenth of one. Up to this size the worst shape costs a few milliseconds.
PARSE_ON_THE_LOOP = 4 << 10


async def parse_manifest(ctx: StoreContext, body: bytes, as_json: bool) -> Manifest:
    """The manifest in ``body`` (JSON or INI); any but a small one is parsed off the event loop."""
    parse = parse_json if as_json else parse_ini
    if len(body) <= PARSE_ON_THE_LOOP:
        return parse(body, ctx.settings.manifest_limits)
    async with ctx.parses:
        return await asyncio.to_thread(parse, body, ctx.settings.manifest_limits)


async def register_transfer(
    ctx: StoreContext,
    mount: Mount,
    identity: Identity,
    client: str,
    manifest: Manifest,
    upload_metadata: str | None = None,
) -> tuple[Transfer | None, list[str]]:
    """Gate ``manifest`` through the handler and register it: (transfer, []) or (None, refused names).

    ``client`` is whose quota it counts against (:func:`client_key`);
    ``upload_metadata``: a tus creation's header, kept with the file as sent.

    Raises QuotaExceeded (429) if the client's open transfers would hold
    more than its share, InsufficientStorage (507) if the declared sizes do
    not fit in the free space less what open transfers may still write and
    the margin.
    """
    # Checked again where the transfer is inserted; this first look spares the handler's work.
    await ctx.registry.check_quota(client, ctx.quota, len(manifest.files), manifest.total_size)
    usage = await asyncio.to_thread(shutil.disk_usage, ctx.staging_dir)
    reserved = await ctx.registry.reserved_bytes()
    if manifest.total_size > usage.free - reserved - ctx.settings.min_free_bytes:
        raise InsufficientStorage(
            f"{manifest.total_size} bytes declared, {max(0, usage.free - reserved - ctx.settings.min_free_bytes)}"
            " available"
        )
    infos = [FileInfo(f.name, f.size, f.md5, f.sha256) for f in manifest.files]
    async with mount.lock:
        reserved_infos: list[FileInfo] = []
        if mount.reserver is not None:
            refused = await mount.reserver.reserve_many(identity, infos)
            if refused:
                return None, refused
            reserved_infos = list(infos)
        else:
            refused = [info.name for info in infos if not await mount.handler.can_upload(identity, info)]
            if refused:
                return None, refused
        try:
            for info in infos[len(reserved_infos) :]:
                await mount.handler.add_pending_upload(identity, info)
                reserved_infos.append(info)
            transfer = await ctx.registry.create(
                mount.prefix,
                identity,
                manifest,
                ctx.settings.key_lifetime,
                upload_metadata,
                client=client,
                quota=ctx.quota,
            )
        except BaseException:
            for info in reserved_infos:
                await _quietly(mount.handler.cancel_upload(identity, info), "cancel_upload")
            raise
    return transfer, []


# -- whole-body uploads ---------------------------------------------------------------------


async def handle_upload(request: web.Request) -> web.Response:
    """``POST``/``PUT /{prefix}/{key}/{num}``: receive, verify and publish one file.

    A disk that fills up answers as the manifest would have: 507 for clients
    that speak JSON, the legacy 405 ``Not enough disk space for upload`` for
    the others.
    """
    try:
        return await _receive_whole(request)
    except NotEnoughSpace as exc:
        if prefers_json(request):
            raise InsufficientStorage(exc.detail) from None
        raise


async def _receive_whole(request: web.Request) -> web.Response:
    target = await resolve_upload(request)
    ctx = target.ctx
    async with claimed_upload(target, resumable=False) as upload:
        try:
            chunks = _body_chunks(request, target.file.size, ctx)
            if not upload.reserved:
                await upload.regate()
            path = await upload.upload_path()
            await check_space(ctx)
            digests = Digests()
            try:
                await staging.append(
                    chunks,
                    upload.staging_path,
                    digests,
                    limit=target.file.size,
                    chunk_size=ctx.settings.chunk_size,
                    fsync=ctx.settings.fsync,
                    budget=ctx.buffers,
                )
            except staging.ReadFailed as failure:
                raise failure.cause from None
            verified = await upload.finish(digests, path)
        except BaseException as exc:
            await staging.uncancellable(quietly_undo(upload.fail(exc)))
            raise
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
        target = await resolve_upload(request)
        if target.file.state is FileState.UPLOADING:
            raise UploadInProgress()
        if target.file.state is FileState.PUBLISHED:
            raise AlreadyUploaded()
        if target.file.state is FileState.CANCELLED:
            raise TransferCancelled()
    except DatastoreError as exc:
        return render_error(request, exc)
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # What the 100 wrote is not part of the response's size.
    request.writer.output_size = 0
    return None


@dataclass(frozen=True, slots=True)
class UploadTarget:
    """The transfer and file an upload URL names, resolved for one client."""

    ctx: StoreContext
    mount: Mount
    identity: Identity
    transfer: Transfer
    file: TransferFile
    #: Whose share of the store the upload uses (:func:`client_key`).
    client: str


async def resolve_upload(request: web.Request) -> UploadTarget:
    """Resolve ``/{prefix}/{key}/{num}`` and check it against the client.

    404 for an unknown prefix, key or number; 403 for another identity;
    410 for an expired or cancelled transfer.
    """
    ctx = request.app[CONTEXT]
    prefix = request.match_info["prefix"]
    mount = ctx.mount(prefix)
    identity = await identify(request)
    mount.policy.check(identity, Action.UPLOAD, prefix)
    key = request.match_info["key"]
    num_text = request.match_info["num"]
    if not (num_text.isascii() and num_text.isdigit()) or len(num_text) > 9:
        raise FileNumberNotFound(num_text)
    found = await ctx.registry.lookup_file(key, int(num_text))
    if found is None or found[0].prefix != prefix:
        raise TransferNotFound()
    transfer, file = found
    if not transfer.usable_by(identity):
        raise IdentityMismatch()
    if transfer.state is TransferState.CANCELLED:
        raise TransferCancelled()
    if transfer.expired(time.time()):
        raise TransferExpired()
    if file is None:
        raise FileNumberNotFound(num_text)
    return UploadTarget(ctx, mount, identity, transfer, file, client_key(request, identity))


@asynccontextmanager
async def claimed_upload(target: UploadTarget, *, resumable: bool) -> AsyncIterator[FileUpload]:
    """Take an upload slot and the file's claim for the current request.

    While inside, the request's task is registered as the file's running
    upload, so a cancellation, termination or expiry can stop it; with
    workers sharing the state, a watch on the claim lets another worker's
    request do so too (:func:`_watch_claim`).
    """
    ctx, place = target.ctx, (target.transfer.key, target.file.num)
    with ctx.upload_slot(target.file.size, target.client):
        claiming = asyncio.ensure_future(ctx.registry.claim(*place, ctx.worker))
        try:
            before, number = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # Cancelled while the claim ran in the database thread: undo it, or the
            # file would stay "uploading" with nobody uploading it.
            with contextlib.suppress(Exception):
                claimed, _ = await claiming
                await staging.uncancellable(ctx.registry.restore(*place, claimed.state, ctx.worker))
            raise
        cached = ctx.digests.get(place)
        if cached is not None:
            # This process's hash state stays good only if no other request claimed the file since.
            if cached[0] == number - 1:
                ctx.digests[place] = (number, cached[1])
            else:
                del ctx.digests[place]
        task = asyncio.current_task()
        assert task is not None
        running = RunningUpload(task, resumable)
        ctx.running[place] = running
        watch = asyncio.create_task(_watch_claim(ctx, place, running)) if ctx.shared else None
        try:
            yield FileUpload(target, before, number, running)
        finally:
            if watch is not None:
                watch.cancel()
            if ctx.running.get(place) is running:
                del ctx.running[place]


#: Seconds between a running upload's checks of its claim, when workers share the state.
CLAIM_WATCH_INTERVAL = 0.5


async def _watch_claim(ctx: StoreContext, place: tuple[str, int], running: RunningUpload) -> None:
    """Stop ``running`` when another worker ends its claim or asks it to stop.

    A file no longer UPLOADING under this worker's claim was terminated,
    cancelled or expired by another worker, which cleans up ("terminated");
    a stop request "superseded" comes from a newer request of the same
    client on another worker, and only a resumable upload heeds it.
    """
    while not running.task.done():
        await asyncio.sleep(CLAIM_WATCH_INTERVAL)
        try:
            status = await ctx.registry.claim_status(*place)
        except Exception:
            log.exception("checking the claim of an upload failed")
            continue
        if running.finishing:
            return
        if status is None or status[0] is not FileState.UPLOADING or status[1] != ctx.worker:
            running.stop_reason = "ended"
            running.task.cancel()
            return
        if status[2] == "superseded" and running.resumable:
            running.stop_reason = "superseded"
            running.task.cancel()
            return


class FileUpload:
    """One claimed upload of one file: everything between the claim and the answer."""

    def __init__(self, target: UploadTarget, before: TransferFile, claim: int, running: RunningUpload) -> None:
        self.ctx = target.ctx
        self.mount = target.mount
        self.identity = target.identity
        self.transfer = target.transfer
        self.file = target.file
        self.before = before
        #: The number of this request's claim on the file (see ``StoreContext.digests``).
        self.claim = claim
        self.running = running
        self.info = FileInfo(self.file.name, self.file.size, self.file.md5, self.file.sha256)
        #: Whether the handler holds a reservation this upload answers for.
        self.reserved = before.state is FileState.RESERVED
        self.staging_path = self.ctx.staging_path(self.transfer.key, self.file.num)
        self._published: Path | None = None

    @property
    def place(self) -> tuple[str, int]:
        """(key, num)."""
        return (self.transfer.key, self.file.num)

    async def regate(self) -> None:
        """A failed earlier attempt released the reservation: take it again."""
        async with self.mount.lock:
            if not await self.mount.handler.can_upload(self.identity, self.info):
                raise NotAuthorized("the store no longer accepts this file")
            await self.mount.handler.add_pending_upload(self.identity, self.info)
        self.reserved = True

    async def upload_path(self) -> Path:
        """The handler's final path for the file; 404 if it refuses."""
        path = await self.mount.handler.get_upload_filename(self.identity, self.info)
        if path is None:
            raise UploadFileNotFound()
        return path

    async def finish(self, digests: Digests, path: Path) -> FileInfo:
        """Verify the staged file against the manifest, publish it, record it."""
        self.running.finishing = True
        if digests.offset != self.file.size:
            raise SizeMismatch(f"received {digests.offset} bytes, the manifest declares {self.file.size}")
        md5, sha256 = digests.md5.hexdigest(), digests.sha256.hexdigest()
        if (self.file.md5 is not None and md5 != self.file.md5) or (
            self.file.sha256 is not None and sha256 != self.file.sha256
        ):
            raise ChecksumMismatch()
        with staging.disk_full_refused():  # publishing copies when staging is on another filesystem
            await staging.uncancellable(
                asyncio.to_thread(staging.publish, self.staging_path, path, self.ctx.settings.fsync)
            )
        self._published = path
        verified = FileInfo(self.file.name, digests.offset, md5, sha256)
        await self.mount.handler.complete_upload(self.identity, verified)
        await self.ctx.registry.publish(self.transfer.key, self.file.num, md5, sha256)
        self.ctx.digests.pop(self.place, None)
        log.info("published /%s/%s (%d bytes) for %s", self.mount.prefix, self.file.name, self.file.size, self.identity)
        return verified

    async def pause(self, received: int) -> None:
        """A resumable upload stops with ``received`` bytes staged; the client may go on."""
        await self.ctx.registry.pause(self.transfer.key, self.file.num, received, self.ctx.worker)

    async def fail(self, exc: BaseException) -> None:
        """Undo the attempt: staging and anything published removed, reservation cancelled.

        Nothing to do when the upload was stopped by a termination, whose
        caller cleans up.
        """
        if self.running.stop_reason == "terminated":
            return
        if self.running.stop_reason == "ended":
            await staging.discard([self.staging_path])
            return
        message = exc.message if isinstance(exc, DatastoreError) else repr(exc)
        level = logging.INFO if isinstance(exc, DatastoreError) else logging.WARNING
        log.log(level, "upload of %r to /%s failed: %s", self.file.name, self.mount.prefix, redact(message))
        self.ctx.digests.pop(self.place, None)
        paths = [self.staging_path] + ([self._published] if self._published is not None else [])
        await staging.discard(paths)
        if self.reserved:
            await _quietly(self.mount.handler.cancel_upload(self.identity, self.info), "cancel_upload")
        await self.ctx.registry.release(self.transfer.key, self.file.num, message, self.ctx.worker)


async def check_space(ctx: StoreContext) -> None:
    """405 when the running uploads would not leave the configured margin free."""
    usage = await asyncio.to_thread(shutil.disk_usage, ctx.staging_dir)
    if usage.free - ctx.settings.min_free_bytes < ctx.bytes_in_flight:
        raise NotEnoughSpace()


# -- stopping uploads: cancel, terminate, expire ---------------------------------------------


async def discard_files(ctx: StoreContext, before: Transfer, files: list[TransferFile]) -> None:
    """Stop ``files`` of a transfer the registry has just ended, and release them.

    Running uploads of these files in this process are cancelled (and waited
    for; one already publishing is let finish); their staged bytes are
    removed; the handler's reservations are cancelled.
    """
    running = [ctx.running[(before.key, f.num)] for f in files if (before.key, f.num) in ctx.running]
    # An upload already publishing is let finish: its file was complete and verified.
    await asyncio.gather(*(upload.stop("terminated") for upload in running))
    for file in files:
        ctx.digests.pop((before.key, file.num), None)
    await staging.discard(ctx.staging_path(before.key, file.num) for file in files)
    mount = ctx.mounts.get(before.prefix)
    if mount is None:
        return
    for file in files:
        if file.state in (FileState.RESERVED, FileState.UPLOADING):
            info = FileInfo(file.name, file.size, file.md5, file.sha256)
            await _quietly(mount.handler.cancel_upload(before.owner, info), "cancel_upload")


async def cancel_transfer(ctx: StoreContext, key: str) -> bool:
    """Cancel an open transfer: False if it was not open."""
    before = await ctx.registry.cancel(key)
    if before is None:
        return False
    await discard_files(ctx, before, [f for f in before.files if f.state is not FileState.PUBLISHED])
    log.info("transfer %s… for /%s cancelled", key[:8], before.prefix)
    return True


async def expire_transfers(ctx: StoreContext, now: float | None = None) -> int:
    """Expire every transfer past its lifetime, release it; forget old records. Returns how many expired."""
    now = time.time() if now is None else now
    expired = await ctx.registry.expire_due(now, ctx.settings.start_timeout)
    for before in expired:
        log.info("transfer %s… for /%s expired", before.key[:8], before.prefix)
        await discard_files(ctx, before, [f for f in before.files if f.state is not FileState.PUBLISHED])
    await ctx.registry.purge(now - ctx.settings.transfer_retention)
    return len(expired)


# -- request bodies -------------------------------------------------------------------------


def _body_chunks(request: web.Request, size: int, ctx: StoreContext) -> AsyncIterator[bytes]:
    """Check the request's framing against the manifest; return its file's bytes."""
    settings = ctx.settings
    length = request.content_length
    if request.method == "POST" and request.content_type == "multipart/form-data":
        if length is not None and length > size + FORM_OVERHEAD:
            raise PayloadTooLarge(f"the form is larger than the {size} bytes the manifest declares")
        check_form(request)
        return form_file_chunks(request, settings)
    if length is None:
        raise LengthRequired()
    if length > settings.max_file_size:
        raise PayloadTooLarge(f"{length} bytes, more than the limit of {settings.max_file_size}")
    if length != size:
        raise SizeMismatch()
    return stream_chunks(request, settings)


async def quietly_undo(undo: Awaitable[None]) -> None:
    """Undo a failed upload; a failure of the undoing (a full disk fails the state's writes too) is
    logged, so that the client still hears why its upload failed."""
    try:
        await undo
    except Exception:
        log.exception("cleaning up after a failed upload failed")


async def _quietly(call: Awaitable[None], what: str) -> None:
    """Run a handler callback during cleanup; a failure there is logged, not raised."""
    try:
        await call
    except Exception:
        log.exception("%s failed during cleanup", what)
