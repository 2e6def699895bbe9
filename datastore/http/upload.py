"""Uploads over HTTP: a manifest becomes a transfer key; a request body becomes a published file.

The HTTP adapter of the lifecycle (``lifecycle/machine.py``), which decides every state change:
``handle_manifest`` reads and parses a manifest (bounded) and asks the lifecycle to register it;
``handle_upload`` takes one whole body (raw ``POST``/``PUT`` or a browser's
``multipart/form-data`` form) for file ``num`` of a transfer, checks its framing against the
manifest and streams it through the lifecycle's claimed upload; the tus endpoints (``tus.py``)
append to the same staging file piece by piece. Both follow the house rule: stream, bound, verify,
publish, then answer. A whole-body upload is all or nothing: any failure undoes it, and sending it
again re-gates the file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from ..config import Settings
from ..errors import (
    AlreadyUploaded,
    BadRequest,
    DatastoreError,
    FileNumberNotFound,
    IdentityMismatch,
    InsufficientStorage,
    LengthRequired,
    NotEnoughSpace,
    PayloadTooLarge,
    SizeMismatch,
    TransferCancelled,
    TransferExpired,
    TransferNotFound,
    UploadInProgress,
)
from ..lifecycle.machine import UploadTarget
from ..lifecycle.states import FileState, TransferState
from ..protocol.manifest import Manifest, format_ini_accepted, format_ini_refused, parse_ini, parse_json
from ..protocol.timestamps import iso_time
from ..security.policy import Action
from ..storage import staging
from .bodies import FORM_OVERHEAD, check_form, form_file_chunks, read_bounded, stream_chunks
from .context import CONTEXT, StoreContext, base_url, client_key, identify, prefers_json, render_error
from .vouchers import Limit, spending

log = logging.getLogger(__name__)


# -- manifests ------------------------------------------------------------------------------


async def handle_manifest(request: web.Request) -> web.Response:
    """``POST /{prefix}/manifest``: register a transfer, answer its key."""
    ctx = request.app[CONTEXT]
    mount = ctx.mount(request.match_info["prefix"])
    identity = await identify(request)
    await mount.authorize(identity, Action.UPLOAD)
    client = client_key(request, identity)
    # A client that holds all the transfers it may is refused before a byte of its manifest is read.
    await ctx.lifecycle.check_quota(client, 1, 0)
    as_json = request.content_type == "application/json"
    with ctx.manifest_memory.holding() as held:
        body = await read_bounded(request, ctx.settings.max_manifest_bytes, ctx.settings, held)
        manifest = await parse_manifest(ctx, body, as_json)
    try:
        transfer, refused = await ctx.lifecycle.register(
            mount, identity, client, manifest, idempotency_key=_idempotency_key(request)
        )
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


def _idempotency_key(request: web.Request) -> str | None:
    """The request's ``Idempotency-Key`` (a client's name for it, so that sending it again after a lost
    answer registers nothing new): up to 255 printable ASCII characters, else 400."""
    value = request.headers.get("Idempotency-Key")
    if value is None:
        return None
    value = value.strip().strip('"')
    if not 0 < len(value) <= 255 or not all(" " < c < "\x7f" for c in value):
        raise BadRequest("Idempotency-Key must be 1 to 255 printable ASCII characters")
    return value


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
    ctx = request.app[CONTEXT]
    async with spending(ctx, target.identity, target.file.size, whole=True) as within_budget:
        return await _receive_within(request, target, within_budget)


async def _receive_within(request: web.Request, target: UploadTarget, within_budget: Limit) -> web.Response:
    ctx = request.app[CONTEXT]
    lifecycle = ctx.lifecycle
    # A stop from elsewhere (a cancellation, expiry) is answered, 410, like any other failure.
    async with lifecycle.claimed(target, resumable=False, answer_stops=True) as upload:
        try:
            chunks = within_budget(_body_chunks(request, target.file.size, ctx.settings))
            if not upload.reserved:
                await upload.regate()
            path = await upload.upload_path()
            await lifecycle.check_space()
            digests = upload.new_digests()
            try:
                await upload.append(chunks, digests)
            except staging.ReadFailed as failure:
                raise failure.cause from None
            verified = await upload.finish(digests, path)
        except BaseException as exc:
            await upload.end(exc, resumable=False)
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
    found = await ctx.state.get_file(key, int(num_text))
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
    return UploadTarget(mount, identity, transfer, file, client_key(request, identity))


# -- request bodies -------------------------------------------------------------------------


def _body_chunks(request: web.Request, size: int, settings: Settings) -> AsyncIterator[bytes]:
    """Check the request's framing against the manifest; return its file's bytes."""
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
