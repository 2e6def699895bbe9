"""The HTTP source driver: :class:`HttpSource` reads one file from any http(s) URL (a datastore
download URL, nginx, ``rclone serve http``, ...) from any offset, with ``Range`` and ``If-Range``.

It also owns what the HTTP drivers share: the classification of aiohttp's exceptions and of
unexpected answers (``failure_for_status`` in ``jobs/states.py``) into DriverErrors, whose messages
name URLs only as ``public_url`` shows them (no userinfo, query or fragment).

Choices:

* The validator is a strong ``ETag``, else ``Last-Modified`` (a weak ETag is no validator for
  ``If-Range``); the size is checked on every response beside it (``Content-Range``'s total or
  ``Content-Length``), so that a change within Last-Modified's one-second resolution that changes
  the size is seen too.
* A server that ignores ``Range`` (answers 200 to a ranged GET) although the request carried
  ``If-Range``: the source changed (SOURCE_CHANGED). Without a validator (no If-Range sent), the
  200 is accepted if its length is the file's size, and the first ``offset`` bytes are read and
  dropped: slower, but the only way to read such a server at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import NoReturn

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from ...errors import VoucherExhausted
from ...protocol.digests import parse_repr_digest
from ..states import FailureReason, failure_for_status, public_url
from .interface import DriverError, SourceInfo

__all__ = ["HttpSource", "content_range", "driver_error"]


def driver_error(exc: BaseException, what: str) -> DriverError:
    """``exc`` (raised by aiohttp while doing ``what``) as a classified DriverError."""
    # A source's failure while aiohttp sent a request body arrives wrapped: it is the one to report.
    seen: BaseException | None = exc
    for _ in range(8):  # bounded: a chain may loop
        if seen is None:
            break
        if isinstance(seen, DriverError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, TimeoutError):
        return DriverError(FailureReason.TIMEOUT, f"{what}: timed out")
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        return DriverError(failure_for_status(exc.status), f"{what}: HTTP {exc.status}")
    if isinstance(exc, aiohttp.InvalidURL):
        return DriverError(FailureReason.BAD_REQUEST, f"{what}: invalid URL")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        # Connection refused or reset, a server that disconnected, a body cut short.
        return DriverError(FailureReason.CONNECTION, f"{what}: {name}")
    return DriverError(FailureReason.CONNECTION, f"{what}: {name}")


def refuse(status: int, what: str, reason: str | None = None, headers: Mapping[str, str] | None = None) -> NoReturn:
    """Raise the DriverError for an unexpected HTTP ``status`` (a datastore's 403 for a voucher whose
    budget is used up, by its ``WWW-Authenticate``, is VOUCHER_EXHAUSTED)."""
    phrase = f" {_one_line(reason)}" if reason else ""
    failure = failure_for_status(status)
    if status == 403 and headers is not None and headers.get("WWW-Authenticate") == _EXHAUSTED:
        failure = FailureReason.VOUCHER_EXHAUSTED
    raise DriverError(failure, f"{what}: HTTP {status}{phrase}")


_EXHAUSTED = VoucherExhausted.headers["WWW-Authenticate"]


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


def content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) -> (start, end, total); Nones where absent."""
    if not value:
        return None, None, None
    unit, _, rest = value.strip().partition(" ")
    if unit.lower() != "bytes":
        return None, None, None
    span, _, total_text = rest.partition("/")
    total = int(total_text) if total_text.strip().isdigit() else None
    first, dash, last = span.partition("-")
    if dash and first.strip().isdigit() and last.strip().isdigit():
        return int(first), int(last), total
    return None, None, total


def _validator(headers: Mapping[str, str]) -> str | None:
    """A strong ETag, else Last-Modified, else None."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified") or None


#: Redirects a source may go through, and the statuses that are one.
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


class HttpSource:
    """One file at an http(s) URL, read with the caller's session (which it does not close)."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        headers: Mapping[str, str] | None = None,
        chunk_size: int = 1 << 20,
        allowed: Callable[[URL], bool] | None = None,
    ) -> None:
        self.url = url
        self.session = session
        self.headers = dict(headers or {})
        self.chunk_size = chunk_size
        #: Whether a redirect may be followed to a URL (None: any).
        self.allowed = allowed
        self._shown = public_url(url)

    @asynccontextmanager
    async def _fetch(self, method: str, headers: Mapping[str, str], what: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """``method`` on the URL, following up to MAX_REDIRECTS redirects to URLs :attr:`allowed`
        (credentials go only to the URL's own origin)."""
        url, sent = URL(self.url), dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            async with self.session.request(method, url, headers=sent, allow_redirects=False) as response:
                location = response.headers.get("Location")
                if response.status not in _REDIRECTS or location is None:
                    yield response
                    return
                target = url.join(URL(location))
                if self.allowed is not None and not self.allowed(target):
                    raise DriverError(
                        FailureReason.FORBIDDEN, f"{what}: redirected to {target.host}, a host jobs may not reach"
                    )
                if target.origin() != url.origin():
                    sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
                url = target
        raise DriverError(FailureReason.BAD_REQUEST, f"{what}: more than {MAX_REDIRECTS} redirects")

    async def stat(self) -> SourceInfo:
        what = f"stat {self._shown}"
        try:
            async with self._fetch("HEAD", self.headers, what) as response:
                if response.status not in (405, 501):
                    if response.status != 200:
                        refuse(response.status, what, response.reason)
                    size = _int(response.headers.get("Content-Length"))
                    if size is None:
                        raise DriverError(FailureReason.UNSUPPORTED, f"{what}: the server states no size")
                    return self._info(size, response.headers)
            # HEAD refused: the first byte with GET tells the size in Content-Range.
            headers = {**self.headers, "Range": "bytes=0-0"}
            async with self._fetch("GET", headers, what) as response:
                if response.status == 206:
                    _, _, total = content_range(response.headers.get("Content-Range"))
                elif response.status == 416:  # an empty file has no byte 0
                    _, _, total = content_range(response.headers.get("Content-Range"))
                    if total != 0:
                        refuse(response.status, what, response.reason)
                elif response.status == 200:
                    total = _int(response.headers.get("Content-Length"))
                else:
                    refuse(response.status, what, response.reason)
                if total is None:
                    raise DriverError(FailureReason.UNSUPPORTED, f"{what}: the server states no size")
                return self._info(total, response.headers)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise driver_error(exc, what) from None

    def _info(self, size: int, headers: CIMultiDictProxy[str]) -> SourceInfo:
        digests = parse_repr_digest(", ".join(headers.getall("Repr-Digest", [])))
        return SourceInfo(size, _validator(headers), digests.get("md5"), digests.get("sha-256"))

    async def read(self, offset: int, info: SourceInfo) -> AsyncIterator[bytes]:
        what = f"read {self._shown} from byte {offset}"
        if offset > info.size:
            raise DriverError(FailureReason.SOURCE_CHANGED, f"{what}: beyond its {info.size} bytes")
        if offset == info.size:
            return
        headers = dict(self.headers)
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
            if info.validator is not None:
                headers["If-Range"] = info.validator
        try:
            async with self._fetch("GET", headers, what) as response:
                skip = self._check(response, offset, info, what, "If-Range" in headers)
                remaining = info.size - offset
                async for chunk in response.content.iter_chunked(self.chunk_size):
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk, skip = chunk[skip:], 0
                    if len(chunk) > remaining:
                        raise DriverError(FailureReason.SOURCE_CHANGED, f"{what}: more bytes than the file's size")
                    remaining -= len(chunk)
                    yield chunk
                if remaining or skip:
                    raise DriverError(FailureReason.CONNECTION, f"{what}: the body ended {remaining} bytes short")
        except (aiohttp.ClientError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise driver_error(exc, what) from None

    def _check(
        self, response: aiohttp.ClientResponse, offset: int, info: SourceInfo, what: str, conditional: bool
    ) -> int:
        """Check a GET's answer against ``info``; how many leading body bytes to drop."""
        status = response.status
        if status not in (200, 206):
            refuse(status, what, response.reason, response.headers)
        if info.validator is not None:
            # Like with like: an ETag with the answer's ETag, a date with its Last-Modified.
            header = "ETag" if info.validator.startswith('"') else "Last-Modified"
            now = response.headers.get(header)
            if now is not None and now != info.validator:
                raise DriverError(FailureReason.SOURCE_CHANGED, f"{what}: its validator changed")
        if status == 206:
            start, _, total = content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise DriverError(FailureReason.BAD_REQUEST, f"{what}: the server answered another range")
            if total is not None and total != info.size:
                raise DriverError(FailureReason.SOURCE_CHANGED, f"{what}: its size changed")
            return 0
        # 200: the whole file.
        if offset > 0 and conditional:
            raise DriverError(FailureReason.SOURCE_CHANGED, f"{what}: the server sent the whole file (If-Range failed)")
        length = response.content_length
        if length is not None and length != info.size:
            raise DriverError(FailureReason.SOURCE_CHANGED, f"{what}: its size changed")
        return offset

    async def close(self) -> None:
        """Nothing: the session is the caller's."""
