"""tus 1.0.0 resumable uploads on the upload URLs ``/{prefix}/{key}/{num}``.

Core protocol (``HEAD`` for the offset, ``PATCH`` to append from it,
``OPTIONS`` for what the server supports) and the extensions creation and
creation-with-upload (``POST /{prefix}/`` makes a one-file transfer through
the same handler gate as a manifest), termination (``DELETE``), checksum
(``Upload-Checksum`` per request: md5, sha1, sha256; 460 and the chunk
discarded on a mismatch) and expiration (``Upload-Expires``). A request
carrying ``X-HTTP-Method-Override`` is routed as that method (server.py).

Bytes go to the same staging file as a whole-body upload and end the same
way: when the last byte arrives, the whole file's MD5 and SHA-256 are
checked against the manifest before it is published. What reached the disk
survives a dropped connection and a crash of the server; a newer PATCH for
an upload whose old request is still hanging takes over from it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from aiohttp import web

from ..config import Settings
from ..errors import (
    AlreadyUploaded,
    BadRequest,
    ChunkChecksumMismatch,
    DatastoreError,
    InsufficientStorage,
    ManifestError,
    NotAuthorized,
    NotEnoughSpace,
    TransferCancelled,
    TusVersionUnsupported,
    UnsupportedMediaType,
)
from ..lifecycle.machine import UploadTarget
from ..lifecycle.states import FileState
from ..protocol.manifest import single_file
from ..security.policy import Action
from ..state.interface import Transfer
from .bodies import stream_chunks
from .context import CONTEXT, client_key, identify
from .upload import resolve_upload
from .vouchers import spending

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,checksum,expiration"
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
CHECKSUM_ALGORITHMS = {"md5": "md5", "sha1": "sha1", "sha256": "sha256"}
#: The longest Upload-Metadata a creation may send (UTF-8 bytes); it is kept and sent back on HEAD.
MAX_METADATA_BYTES = 4096


async def handle_options(request: web.Request) -> web.Response:
    """``OPTIONS`` on ``/{prefix}/`` or an upload URL: what this server speaks."""
    ctx = request.app[CONTEXT]
    ctx.mount(request.match_info["prefix"])
    return web.Response(
        status=204,
        headers={
            "Tus-Resumable": TUS_VERSION,
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": EXTENSIONS,
            "Tus-Max-Size": str(ctx.settings.max_file_size),
            "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
        },
    )


async def handle_head(request: web.Request) -> web.Response:
    """``HEAD /{prefix}/{key}/{num}``: the offset the upload is at."""
    target = await resolve_upload(request)
    file = await request.app[CONTEXT].lifecycle.settled(target)
    if file.state is FileState.CANCELLED:
        raise TransferCancelled("this upload was terminated")
    if file.state is FileState.PUBLISHED:
        offset = file.size
    elif file.state is FileState.RELEASED:
        offset = 0
    else:
        offset = file.received
    return web.Response(
        status=200,
        headers={
            **_headers(target.transfer),
            "Upload-Offset": str(offset),
            "Upload-Length": str(file.size),
            # As sent at creation; a manifest's file is described by its name.
            "Upload-Metadata": file.upload_metadata
            if file.upload_metadata is not None
            else "filename " + base64.b64encode(file.name.encode()).decode(),
            "Cache-Control": "no-store",
        },
    )


async def handle_patch(request: web.Request) -> web.Response:
    """``PATCH /{prefix}/{key}/{num}``: append at ``Upload-Offset``."""
    target = await resolve_upload(request)
    _require_tus(request)
    if request.content_type != OFFSET_CONTENT_TYPE:
        raise UnsupportedMediaType(f"PATCH needs Content-Type: {OFFSET_CONTENT_TYPE}")
    offset = _parse_offset(request.headers.get("Upload-Offset"))
    checksum = _parse_checksum(request.headers.get("Upload-Checksum"))
    if target.file.state is FileState.PUBLISHED:
        new_offset = await _patch_complete(request, target, offset, checksum)
    else:
        try:
            new_offset = await append_resumable(request, target, offset, checksum)
        except AlreadyUploaded:  # another request completed it meanwhile
            new_offset = await _patch_complete(request, target, offset, checksum)
    return web.Response(status=204, headers={**_headers(target.transfer), "Upload-Offset": str(new_offset)})


async def _patch_complete(
    request: web.Request, target: UploadTarget, offset: int, checksum: tuple[Any, bytes] | None
) -> int:
    """A PATCH to a complete upload: one of no bytes at its end changes nothing and is
    accepted (tus answers 409 only for another offset); any other is 409."""
    if offset != target.file.size or not await _no_bytes(request, request.app[CONTEXT].settings):
        raise AlreadyUploaded()
    if checksum is not None and checksum[0].digest() != checksum[1]:
        raise ChunkChecksumMismatch()
    return offset


async def handle_terminate(request: web.Request) -> web.Response:
    """``DELETE /{prefix}/{key}/{num}``: termination; staged bytes go, the reservation is released."""
    target = await resolve_upload(request)
    _require_tus(request)
    await request.app[CONTEXT].lifecycle.terminate(target.transfer, target.file.num)
    return web.Response(status=204, headers={"Tus-Resumable": TUS_VERSION})


async def handle_create(request: web.Request) -> web.Response:
    """``POST /{prefix}/``: creation (and creation-with-upload) of a one-file transfer."""
    ctx = request.app[CONTEXT]
    mount = ctx.mount(request.match_info["prefix"])
    identity = await identify(request)
    _require_tus(request)
    await mount.authorize(identity, Action.UPLOAD)
    if "Upload-Defer-Length" in request.headers:
        raise BadRequest("Upload-Defer-Length is not supported: send Upload-Length")
    length_text = request.headers.get("Upload-Length")
    if length_text is None:
        raise BadRequest("Upload-Length is required")
    raw_metadata = _raw_metadata(request)
    metadata = _parse_metadata(raw_metadata)
    name = metadata.get("filename") or metadata.get("name")
    if not name:
        raise BadRequest("Upload-Metadata must name the file (filename)")
    fields = {"name": name, "size": length_text.strip()}
    for key in ("md5", "sha256", "checksum"):
        if metadata.get(key):
            fields[key] = metadata[key]
    try:
        manifest = single_file(fields, ctx.settings.manifest_limits)
    except ManifestError as exc:
        raise BadRequest(str(exc.detail).replace("upload ", "Upload-Metadata ", 1)) from None
    with_upload = request.content_type == OFFSET_CONTENT_TYPE and bool(request.content_length or request.body_exists)
    # Checked before the transfer exists: a 400 after it would leave its name reserved, with no key to free it.
    checksum = _parse_checksum(request.headers.get("Upload-Checksum")) if with_upload else None
    client = client_key(request, identity)
    transfer, refused = await ctx.lifecycle.register(mount, identity, client, manifest, raw_metadata)
    if transfer is None:
        raise NotAuthorized(f"the store refused {refused[0]!r}")
    headers = {**_headers(transfer), "Location": f"/{mount.prefix}/{transfer.key}/0"}
    log.info("tus upload %s… of %r created in /%s for %s", transfer.key[:8], name, mount.prefix, identity)
    if with_upload:
        target = UploadTarget(mount, identity, transfer, transfer.files[0], client)
        try:
            offset = await append_resumable(request, target, 0, checksum)
        except DatastoreError as exc:
            # The upload exists either way; the client learns its offset and resumes.
            log.info("creation-with-upload of %r stopped: %s", name, exc.message)
            found = await ctx.state.get_file(transfer.key, 0)
            offset = found[1].received if found is not None and found[1] is not None else 0
        headers["Upload-Offset"] = str(offset)
    return web.Response(status=201, headers=headers)


async def append_resumable(
    request: web.Request, target: UploadTarget, claimed_offset: int, checksum: tuple[Any, bytes] | None
) -> int:
    """Append the request's body to the file at ``claimed_offset`` (``Lifecycle.append_resumable``);
    the new offset. A full disk is a tus client's 507, not a legacy client's 405."""
    ctx = request.app[CONTEXT]
    length = request.content_length
    wanted = length if length is not None else max(0, target.file.size - claimed_offset)
    try:
        async with spending(ctx, target.identity, wanted, whole=False) as within_budget:
            chunks = within_budget(stream_chunks(request, ctx.settings))
            # A stop from elsewhere is answered: 410 (cancelled, terminated, expired) or 409 (superseded).
            appended = await ctx.lifecycle.append_resumable(
                target, claimed_offset, chunks, length=length, checksum=checksum, answer_stops=True
            )
            return appended.offset
    except NotEnoughSpace as exc:
        raise InsufficientStorage(exc.detail) from None


def _require_tus(request: web.Request) -> None:
    if request.headers.get("Tus-Resumable") != TUS_VERSION:
        raise TusVersionUnsupported()


def _parse_offset(text: str | None) -> int:
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 18:
        raise BadRequest("Upload-Offset must be a non-negative integer")
    return int(text)


def _parse_checksum(text: str | None) -> tuple[Any, bytes] | None:
    """``Upload-Checksum: sha1 BASE64`` -> (a fresh hash, the expected digest)."""
    if text is None:
        return None
    algorithm, _, encoded = text.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise BadRequest(f"Upload-Checksum algorithm {algorithm!r} is not one of {', '.join(CHECKSUM_ALGORITHMS)}")
    try:
        expected = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("Upload-Checksum digest is not base64") from None
    return hashlib.new(CHECKSUM_ALGORITHMS[algorithm], usedforsecurity=False), expected


def _raw_metadata(request: web.Request) -> str:
    """The Upload-Metadata header as sent (several lines joined, as the list they make), bounded.

    It is sent back on HEAD, so it must be printable UTF-8: no control character but tab.
    """
    text = ",".join(request.headers.getall("Upload-Metadata", ()))
    size = len(text.encode("utf-8", "replace"))
    if size > MAX_METADATA_BYTES:
        raise BadRequest(f"Upload-Metadata is {size} bytes, more than the limit of {MAX_METADATA_BYTES}")
    if not text.replace("\t", " ").isprintable():
        raise BadRequest("Upload-Metadata must be printable UTF-8")
    return text


async def _no_bytes(request: web.Request, settings: Settings) -> bool:
    """Whether the request's body is empty (reading at most its first chunk)."""
    if not request.body_exists:
        return True
    if request.content_length is not None:
        return request.content_length == 0
    async for _chunk in stream_chunks(request, settings):
        return False
    return True


def _parse_metadata(text: str) -> dict[str, str]:
    """``Upload-Metadata: filename d29ybGQ=,is_confidential`` -> {"filename": "world", ...}."""
    metadata: dict[str, str] = {}
    for pair in text.split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, _, encoded = pair.partition(" ")
        try:
            metadata[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise BadRequest(f"Upload-Metadata value of {key!r} is not base64 of UTF-8") from None
    return metadata


def _headers(transfer: Transfer) -> dict[str, str]:
    return {
        "Tus-Resumable": TUS_VERSION,
        "Upload-Expires": format_datetime(datetime.fromtimestamp(transfer.expires_at, UTC), usegmt=True),
    }
