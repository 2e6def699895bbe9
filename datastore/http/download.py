"""Reading the store: downloads, the listing (as JSON, or in the page ``page.py`` renders), and deletion.

A download asks the prefix's handler for the file's path and hands it to
aiohttp's ``FileResponse`` (sendfile, Range/206/416, If-Range, ETag,
Last-Modified, 304, HEAD). The server adds what a file store owes on top:
``Repr-Digest`` (RFC 9530) from the catalogue, ``Content-Disposition:
attachment`` and ``nosniff`` so that an uploaded page never runs as the
store's own origin, and it never serves a precompressed sibling (``x.gz``)
in place of the file asked for.

A small file (``Download.body``, from a handler that can locate downloads)
asked for whole and unconditionally is answered from memory with
``web.Response`` and the same headers FileResponse would send; a Range or
conditional request, or a larger file, goes to FileResponse.

Every ``GET`` of a file is counted in the metrics once its answer is sent
(``datastore_downloads_total`` by outcome, and the bytes of the file really
sent: a Range's, not the whole file's); ``HEAD`` is not a download.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pathlib
import weakref
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from .. import metrics
from ..errors import CertificateRefused, DatastoreError, FileNotFound, NotAuthorized, NotFound, Unauthorized
from ..handlers.interface import Download, StoredFile
from ..handlers.mounts import Mount, file_etag
from ..protocol.names import validate_name
from ..security.identity import Identity
from ..security.policy import Action, Audience
from .context import CONTEXT, base_url, identify
from .page import Listed, page_response, refused_page, wants_page
from .vouchers import charge

#: The outcome of a download, by the status of its answer (else "error").
OUTCOMES = {
    200: "ok",
    206: "partial",
    304: "not_modified",
    400: "bad_request",
    401: "refused",
    403: "refused",
    404: "not_found",
    412: "precondition_failed",
    416: "range_not_satisfiable",
}


class StoredFileResponse(web.FileResponse):
    """A FileResponse that serves exactly the file named, never ``NAME.gz``/``NAME.br``.

    With ``ignore_range`` it answers the whole file whatever Range the
    request carries (an ``If-Range`` entity-tag that no longer matches).
    With ``counted`` it counts the download once its answer is sent (or
    fails): its outcome, and the bytes of the file handed to the connection.
    """

    def __init__(self, path: pathlib.Path, *, ignore_range: bool = False, counted: bool = False, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._ignore_range = ignore_range
        self._counted = counted
        self._sent = 0

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self._ignore_range:
            headers = request.headers.copy()
            headers.popall(hdrs.RANGE, None)
            request = request.clone(headers=headers)
        counted, self._counted = self._counted, False
        if not counted:
            return await super().prepare(request)
        # FileResponse sends the whole answer here: the file through sendfile, or only the head
        # (304, 412, 416, an empty file), whose end is written by write_eof.
        try:
            writer = await super().prepare(request)
        except BaseException:
            metrics.count_download("interrupted", self._sent)
            raise
        metrics.count_download(OUTCOMES.get(self.status, "error"), self._sent)
        return writer

    async def _sendfile(self, request: BaseRequest, fobj: Any, offset: int, count: int) -> AbstractStreamWriter:
        try:
            writer = await super()._sendfile(request, fobj, offset, count)
        except BaseException:
            # asyncio's sendfile leaves the file's position after the bytes it handed to the
            # connection, also when the connection fails (aiohttp's own fallback, after those it read).
            with contextlib.suppress(OSError, ValueError):
                self._sent = min(count, max(0, fobj.tell() - offset))
            raise
        self._sent = count
        return writer

    def _get_file_path_stat_encoding(
        self, accept_encoding: str
    ) -> tuple[pathlib.Path | None, os.stat_result, str | None]:
        # In a store, "report.gz" is another user's file, not an encoding of "report".
        return super()._get_file_path_stat_encoding("")


class SmallFileResponse(web.Response):
    """A small file answered from memory; with ``counted``, counted as a download once sent."""

    def __init__(self, body: bytes, headers: dict[str, str], *, counted: bool) -> None:
        super().__init__(body=body, headers=headers)
        self._counted = counted
        self._length = len(body)

    async def write_eof(self, data: bytes = b"") -> None:
        counted, self._counted = self._counted, False
        if not counted:
            return await super().write_eof(data)
        try:
            await super().write_eof(data)
        except BaseException:
            metrics.count_download("interrupted", 0)
            raise
        metrics.count_download("ok", self._length)


async def handle_download(request: web.Request) -> web.StreamResponse:
    """``GET``/``HEAD /{prefix}/{name}``; a GET refused before its answer is counted here, one answered
    once the answer is sent (:class:`StoredFileResponse`, :class:`SmallFileResponse`)."""
    if request.method != "GET":
        return await _download(request, counted=False)
    try:
        return await _download(request, counted=True)
    except DatastoreError as exc:
        metrics.count_download(OUTCOMES.get(exc.status, "error"), 0)
        raise
    except Exception:
        metrics.count_download("error", 0)
        raise


async def _download(request: web.Request, *, counted: bool) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    mount = ctx.mount(request.match_info["prefix"])
    identity = await identify(request)
    name = _valid_name(request.match_info["name"])
    await mount.authorize(identity, Action.READ, name)
    download = await mount.locate(identity, name)
    if download.stored is not None and _tls_only(mount, download.stored) and not request.secure:
        raise NotAuthorized("this file was uploaded over TLS and is served over TLS only")
    if request.method == "GET":
        # A voucher's budget counts the whole file (a refused download is not counted).
        await charge(ctx, identity, download.stat.st_size)
    if download.body is not None and not any(header in request.headers for header in _CONDITIONAL):
        # A small file, whole, unconditionally: from memory, with the headers FileResponse would send.
        headers = _PREPARED.get(download)
        if headers is None:
            headers = _file_headers(name, download)
            validators = web.StreamResponse()
            validators.etag = file_etag(download.stat)
            validators.last_modified = download.stat.st_mtime
            headers[hdrs.ETAG] = validators.headers[hdrs.ETAG]
            headers[hdrs.LAST_MODIFIED] = validators.headers[hdrs.LAST_MODIFIED]
            headers[hdrs.ACCEPT_RANGES] = "bytes"
            _PREPARED[download] = headers
        return SmallFileResponse(download.body, headers, counted=counted)
    return StoredFileResponse(
        download.path,
        chunk_size=ctx.settings.chunk_size,
        headers=_file_headers(name, download),
        ignore_range=_if_range_fails(request, download.stat),
        counted=counted,
    )


def _file_headers(name: str, download: Download) -> dict[str, str]:
    """What every download answer carries besides the validators FileResponse adds."""
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Disposition": _attachment(name),
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    if download.stored is not None and download.stored.size == download.stat.st_size:
        digest = repr_digest(download.stored)
        if digest:
            headers["Repr-Digest"] = digest
    return headers


#: The headers of small downloads answered from memory, for as long as their handler keeps them.
_PREPARED: weakref.WeakKeyDictionary[Download, dict[str, str]] = weakref.WeakKeyDictionary()

#: Request headers that make a download partial or conditional: FileResponse answers those.
_CONDITIONAL = (
    hdrs.RANGE,
    hdrs.IF_RANGE,
    hdrs.IF_MATCH,
    hdrs.IF_NONE_MATCH,
    hdrs.IF_MODIFIED_SINCE,
    hdrs.IF_UNMODIFIED_SINCE,
)


async def handle_listing(request: web.Request) -> web.StreamResponse:
    """``GET /{prefix}/``: the files a client may list, as JSON or inside the browser page (``page.py``).

    Both answers come from :func:`_list`: the same rules, the same files,
    the same owners shown; a client refused the list gets the page without
    it, with the status the JSON listing would have.
    """
    mount = request.app[CONTEXT].mount(request.match_info["prefix"])
    if not wants_page(request):
        return web.json_response(
            {"prefix": mount.prefix, "files": await _list(request, mount)},
            headers={"Cache-Control": "no-cache", "Vary": "Accept"},
        )
    try:
        files = await _list(request, mount)
    except CertificateRefused:
        raise  # the connection's refusal, not the listing's: answered and closed as any request's
    except (Unauthorized, NotAuthorized, NotFound) as refused:
        return refused_page(mount.prefix, refused)
    return page_response(mount.prefix, files)


async def _list(request: web.Request, mount: Mount) -> list[Listed]:
    """The files of ``mount`` that the request's client may see (401/403/404 if it may not list)."""
    if mount.lister is None:
        raise NotFound("this prefix offers no listing")
    identity = await identify(request)
    await mount.authorize(identity, Action.LIST)
    files = await mount.lister.list_files(identity)
    base = base_url(request)
    return [
        _listed(f, identity, mount, f"{base}/{mount.prefix}/{quote(f.name, safe='')}")
        for f in files
        if request.secure or not _tls_only(mount, f)
    ]


def _listed(stored: StoredFile, identity: Identity, mount: Mount, url: str) -> Listed:
    """One file of a listing; its owner only for those the policy shows owners to."""
    shown = mount.policy.shows_owner(identity, stored.owner_id)
    return {
        "name": stored.name,
        "size": stored.size,
        "md5": stored.md5,
        "sha256": stored.sha256,
        "digests": "pending" if stored.md5 is None or stored.sha256 is None else "complete",
        "owner": stored.owner if shown else None,
        "owner_authenticated": stored.owner_authenticated if shown else None,
        "yours": identity.owns(stored.owner_id),
        "uploaded_at": stored.uploaded_at,
        "url": url,
    }


def _tls_only(mount: Mount, stored: StoredFile) -> bool:
    """Whether ``stored`` came over TLS and the prefix keeps such files off plain HTTP."""
    return stored.tls and mount.policy.tls_only


async def handle_delete(request: web.Request) -> web.Response:
    """``DELETE /{prefix}/{name}``: remove a published file, if the handler can."""
    ctx = request.app[CONTEXT]
    mount = ctx.mount(request.match_info["prefix"])
    if mount.deleter is None:
        raise web.HTTPMethodNotAllowed("DELETE", ["GET", "HEAD"])
    identity = await identify(request)
    name = validate_name(request.match_info["name"])
    await mount.authorize(identity, Action.DELETE, name)
    stored = await mount.describer.describe_file(identity, name) if mount.describer is not None else None
    if mount.policy.delete is Audience.OWNER and mount.describer is not None:
        if stored is None:
            raise FileNotFound()
        if not identity.may_manage(stored.owner_id):
            raise NotAuthorized("only the owner (or an administrator) may delete a file")
    await mount.deleter.delete_file(identity, name)
    owner = (stored.owner, stored.owner_id) if stored is not None else (identity.dn, identity.principal)
    await ctx.lifecycle.deleted(mount, name, *owner, stored.size if stored is not None else None)
    return web.Response(status=204)


def repr_digest(stored: StoredFile) -> str:
    """The RFC 9530 ``Repr-Digest`` value for a stored file: the digests known (one still being
    computed after publishing is left out, never guessed); empty if none is."""
    known = (("sha-256", stored.sha256), ("md5", stored.md5))
    return ", ".join(f"{label}=:{base64.b64encode(bytes.fromhex(hex_)).decode()}:" for label, hex_ in known if hex_)


def _if_range_fails(request: web.Request, st: os.stat_result) -> bool:
    """True if ``If-Range`` names an entity-tag other than the file's current one.

    aiohttp reads If-Range only as a date; RFC 9110 13.1.5 also allows a
    strong entity-tag, which must match exactly (a weak one never does) for
    the Range to apply. Resuming a download of a file that changed would
    otherwise splice old and new bytes.
    """
    if_range = request.headers.get(hdrs.IF_RANGE, "").strip()
    if not if_range.startswith(('"', "W/")) or hdrs.RANGE not in request.headers:
        return False
    return if_range != f'"{file_etag(st)}"'


@lru_cache(maxsize=4096)
def _valid_name(name: str) -> str:
    """``validate_name``, remembered for the names downloaded most (a refused name is not remembered)."""
    return validate_name(name)


def _attachment(name: str) -> str:
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
