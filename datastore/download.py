"""Reading the store: downloads, the listing, and deletion.

A download asks the prefix's handler for the file's path and hands it to
aiohttp's ``FileResponse`` (sendfile, Range/206/416, If-Range, ETag,
Last-Modified, 304, HEAD). The server adds what a file store owes on top:
``Repr-Digest`` (RFC 9530) from the catalogue, ``Content-Disposition:
attachment`` and ``nosniff`` so that an uploaded page never runs as the
store's own origin, and it never serves a precompressed sibling (``x.gz``)
in place of the file asked for.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pathlib
import stat
from urllib.parse import quote

from aiohttp import web

from .context import CONTEXT
from .errors import FileNotFound, NotFound
from .handlers.interface import StoredFile
from .names import validate_name


class StoredFileResponse(web.FileResponse):
    """A FileResponse that serves exactly the file named, never ``NAME.gz``/``NAME.br``."""

    def _get_file_path_stat_encoding(
        self, accept_encoding: str
    ) -> tuple[pathlib.Path | None, os.stat_result, str | None]:
        # In a store, "report.gz" is another user's file, not an encoding of "report".
        return super()._get_file_path_stat_encoding("")


async def handle_download(request: web.Request) -> web.StreamResponse:
    """``GET``/``HEAD /{prefix}/{name}``."""
    ctx = request.app[CONTEXT]
    mount = ctx.mount(request.match_info["prefix"])
    identity = ctx.identify(request)
    name = validate_name(request.match_info["name"])
    path = await mount.handler.get_download_filename(identity, name)
    size = await asyncio.to_thread(_regular_file_size, path)
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Disposition": _attachment(name),
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    if mount.describer is not None:
        stored = await mount.describer.describe_file(identity, name)
        if stored is not None and stored.size == size:
            headers["Repr-Digest"] = repr_digest(stored)
    return StoredFileResponse(path, chunk_size=ctx.settings.chunk_size, headers=headers)


async def handle_listing(request: web.Request) -> web.Response:
    """``GET /{prefix}/``: the published files as JSON, if the handler can list."""
    ctx = request.app[CONTEXT]
    mount = ctx.mount(request.match_info["prefix"])
    if mount.lister is None:
        raise NotFound("this prefix offers no listing")
    identity = ctx.identify(request)
    files = await mount.lister.list_files(identity)
    base = request.url.origin()
    return web.json_response(
        {
            "prefix": mount.prefix,
            "files": [
                {
                    "name": f.name,
                    "size": f.size,
                    "md5": f.md5,
                    "sha256": f.sha256,
                    "owner": f.owner,
                    "uploaded_at": f.uploaded_at,
                    "url": str(base.with_path(f"/{mount.prefix}/{f.name}")),
                }
                for f in files
            ],
        },
        headers={"Cache-Control": "no-cache"},
    )


async def handle_delete(request: web.Request) -> web.Response:
    """``DELETE /{prefix}/{name}``: remove a published file, if the handler can."""
    ctx = request.app[CONTEXT]
    mount = ctx.mount(request.match_info["prefix"])
    if mount.deleter is None:
        raise web.HTTPMethodNotAllowed("DELETE", ["GET", "HEAD"])
    identity = ctx.identify(request)
    name = validate_name(request.match_info["name"])
    await mount.deleter.delete_file(identity, name)
    return web.Response(status=204)


def repr_digest(stored: StoredFile) -> str:
    """The RFC 9530 ``Repr-Digest`` value for a stored file."""
    sha256 = base64.b64encode(bytes.fromhex(stored.sha256)).decode()
    md5 = base64.b64encode(bytes.fromhex(stored.md5)).decode()
    return f"sha-256=:{sha256}:, md5=:{md5}:"


def _regular_file_size(path: pathlib.Path) -> int:
    try:
        st = path.stat()
    except OSError:
        raise FileNotFound() from None
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFound()
    return st.st_size


def _attachment(name: str) -> str:
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
