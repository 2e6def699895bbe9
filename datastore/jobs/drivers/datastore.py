"""The datastore destination driver: :class:`DatastoreDestination` writes one file to another
datastore at ``http(s)://host:port/PREFIX/NAME``, as a one-file JSON manifest and a tus upload.

The handle it keeps (JSON-able, persisted by the runner)::

    idempotency_key   made by plan (no network), sent as Idempotency-Key with the manifest
    key_validator     the source validator that key was made for (a new version gets a new key)
    transfer_key      the other store's transfer
    upload_url        the tus upload URL of the file
    validator         the source validator the upload is written from

The upload URL is addressed from the URL the driver was given (``BASE/PREFIX/KEY/NUM``, the store's
URL layout), not taken from the manifest's answer as is: the store names its own socket address
there, which a client behind a proxy or NAT may not reach.

The store verifies the whole file against the declared digests when the last byte arrives and
publishes it before answering the PATCH that carried it; :meth:`finish` reads the published file's
size and digests back from the download URL's ``Repr-Digest``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
from yarl import URL

from ..states import FailureReason, public_url
from .http import driver_error, refuse
from .interface import DriverError, Handle, Order, Published

TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
#: Words in a refusal's per-file reason that say the name is taken (not a permission).
_TAKEN = ("exist", "taken", "already")


class DatastoreDestination:
    """One file on another datastore, written with the caller's session (which it does not close)."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        headers: Mapping[str, str] | None = None,
        chunk_size: int = 1 << 20,
    ) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise DriverError(FailureReason.BAD_REQUEST, f"not an http(s) URL: {public_url(url)}")
        folder, _, name = parsed.path.rpartition("/")
        prefix = folder.strip("/")
        if not prefix or not name:
            raise DriverError(FailureReason.BAD_REQUEST, f"not a PREFIX/NAME URL: {public_url(url)}")
        self.url = url
        self.session = session
        self.headers = dict(headers or {})
        self.chunk_size = chunk_size
        # Credentials in the URL travel as Basic auth, never in the URLs the handle keeps.
        self.auth = aiohttp.BasicAuth(parsed.user or "", parsed.password or "") if parsed.user else None
        self.base = str(parsed.origin())
        self.prefix = prefix
        self.name = unquote(name)
        self.download_url = f"{self.base}/{prefix}/{quote(self.name, safe='')}"
        self._shown = public_url(url)

    # -- the Destination protocol ---------------------------------------------------------------

    def plan(self, handle: Handle, order: Order) -> Handle:
        planned = dict(handle)
        if "idempotency_key" not in planned or planned.get("key_validator") != order.validator:
            planned["idempotency_key"] = secrets.token_hex(16)
            planned["key_validator"] = order.validator
        return planned

    async def open(self, handle: Handle, order: Order) -> Handle:
        what = f"open {self._shown}"
        upload_url = handle.get("upload_url")
        if isinstance(upload_url, str):
            if handle.get("validator") == order.validator:
                found = await self._probe(upload_url, order, what)
                if found:
                    return dict(handle)
            else:
                await self._terminate(upload_url)
        return await self._create(handle, order, what)

    async def offset(self, handle: Handle) -> int:
        what = f"offset of {self._shown}"
        try:
            async with self._request("HEAD", self._upload_url(handle), headers=self._headers(TUS)) as response:
                if response.status != 200:
                    refuse(response.status, what, response.reason)
                return _offset(response, what)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise driver_error(exc, what) from None

    async def write(self, handle: Handle, offset: int, chunks: AsyncIterator[bytes]) -> int:
        what = f"write {self._shown} from byte {offset}"
        upload_url = self._upload_url(handle)
        headers = self._headers({**TUS, "Content-Type": OFFSET_CONTENT_TYPE, "Upload-Offset": str(offset)})
        try:
            async with self._request("PATCH", upload_url, data=chunks, headers=headers) as response:
                if response.status == 204:
                    return _offset(response, what)
                reason = response.reason or ""
                body = await _message(response)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise driver_error(exc, what) from None
        if response.status == 460 or (response.status == 405 and "checksum" in f"{reason} {body}".lower()):
            raise DriverError(FailureReason.CHECKSUM_MISMATCH, f"{what}: the store found the file's checksum wrong")
        if response.status == 405 and "size" in reason.lower():
            raise DriverError(FailureReason.SIZE_MISMATCH, f"{what}: {_one_line(reason)}")
        if response.status == 409:
            # Another offset than ours (an earlier request's bytes arrived after all): resume from it.
            held = await self.offset(handle)
            raise DriverError(FailureReason.CONNECTION, f"{what}: the store holds {held} bytes; resume from there")
        refuse(response.status, what, reason, response.headers)

    async def finish(self, handle: Handle) -> Published:
        """The published file as its transfer's status tells its owner (this upload's identity, which
        a push voucher lets upload but not read): state, size and the digests the store computed."""
        what = f"finish {self._shown}"
        key = handle.get("transfer_key")
        if not isinstance(key, str):
            raise DriverError(FailureReason.RESTARTED, f"{what}: the upload is unknown; it starts again")
        try:
            async with self._request(
                "GET", f"{self.base}/_api/v1/transfers/{key}", headers={**self.headers, "Accept": "application/json"}
            ) as response:
                if response.status != 200:
                    refuse(response.status, what, response.reason, response.headers)
                status = await response.json()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise driver_error(exc, what) from None
        files = status.get("files") if isinstance(status, dict) else None
        file = files[0] if isinstance(files, list) and files and isinstance(files[0], dict) else {}
        if file.get("state") != "FINISHED" or not isinstance(file.get("size"), int):
            state = file.get("state")
            raise DriverError(FailureReason.SERVER_ERROR, f"{what}: the store has not published it ({state})")
        return Published(file["size"], file.get("md5"), file.get("sha256"))

    async def discard(self, handle: Handle) -> None:
        upload_url = handle.get("upload_url")
        if not isinstance(upload_url, str):
            return
        what = f"discard {self._shown}"
        try:
            async with self._request("DELETE", self._upload_url(handle), headers=self._headers(TUS)) as response:
                if response.status in (200, 204, 404, 410):
                    return
                refuse(response.status, what, response.reason)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise driver_error(exc, what) from None

    async def close(self) -> None:
        """Nothing: the session is the caller's."""

    # -- helpers --------------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """``session.request`` with the URL's credentials, if it had any (never following a redirect: a
        store's upload API does not move)."""
        return self.session.request(method, url, auth=self.auth, allow_redirects=False, **kwargs)

    def _headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        return {**self.headers, **extra}

    def _upload_url(self, handle: Handle) -> str:
        upload_url = handle.get("upload_url")
        if not isinstance(upload_url, str):
            raise DriverError(FailureReason.BAD_REQUEST, f"{self._shown}: no upload opened")
        return upload_url

    async def _probe(self, upload_url: str, order: Order, what: str) -> bool:
        """Whether the upload at ``upload_url`` still exists for ``order`` (a tus HEAD)."""
        try:
            async with self._request("HEAD", upload_url, headers=self._headers(TUS)) as response:
                if response.status in (404, 410):
                    return False
                if response.status != 200:
                    refuse(response.status, what, response.reason)
                length = response.headers.get("Upload-Length")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise driver_error(exc, what) from None
        if length is not None and length.strip() != str(order.size):
            await self._terminate(upload_url)
            return False
        return True

    async def _terminate(self, upload_url: str) -> None:
        """Terminate an upload this handle no longer wants; any failure is ignored (it expires)."""
        try:
            async with self._request("DELETE", upload_url, headers=self._headers(TUS)) as response:
                await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass

    async def _create(self, handle: Handle, order: Order, what: str) -> Handle:
        """Post a one-file manifest; the handle of the new upload."""
        key = handle.get("idempotency_key")
        if not isinstance(key, str):
            key = secrets.token_hex(16)
        entry: dict[str, Any] = {"name": self.name, "size": order.size}
        if order.md5 is not None:
            entry["md5"] = order.md5
        if order.sha256 is not None:
            entry["sha256"] = order.sha256
        manifest_url = f"{self.base}/{self.prefix}/manifest"
        headers = self._headers({"Idempotency-Key": key})
        try:
            async with self._request("POST", manifest_url, json={"files": [entry]}, headers=headers) as response:
                status, reason = response.status, response.reason or ""
                body = await _json(response)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise driver_error(exc, what) from None
        if status == 403 and isinstance(body.get("files"), list):
            reasons = " ".join(str(f.get("reason", "")) for f in body["files"] if isinstance(f, dict)).lower()
            if any(word in reasons for word in _TAKEN):
                raise DriverError(FailureReason.EXISTS, f"{what}: the name is taken")
            raise DriverError(FailureReason.FORBIDDEN, f"{what}: the store refused the name")
        if status != 201:
            refuse(status, what, str(body.get("message") or reason))
        try:
            transfer_key = str(body["transfer_key"])
            num = int(body["files"][0]["num"])
        except (KeyError, IndexError, TypeError, ValueError):
            raise DriverError(
                FailureReason.BAD_REQUEST, f"{what}: the store's answer is not a manifest reply"
            ) from None
        if not transfer_key.isalnum():
            raise DriverError(FailureReason.BAD_REQUEST, f"{what}: the store's transfer key is not URL-safe")
        return {
            **handle,
            "idempotency_key": key,
            "key_validator": handle.get("key_validator", order.validator),
            "transfer_key": transfer_key,
            "upload_url": f"{self.base}/{self.prefix}/{transfer_key}/{num}",
            "validator": order.validator,
        }


def _offset(response: aiohttp.ClientResponse, what: str) -> int:
    text = response.headers.get("Upload-Offset", "")
    if not text.isascii() or not text.isdigit():
        raise DriverError(FailureReason.BAD_REQUEST, f"{what}: no Upload-Offset in the store's answer")
    return int(text)


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await response.json(content_type=None)
    except ValueError:
        return {"message": await _message(response)}
    return body if isinstance(body, dict) else {}


async def _message(response: aiohttp.ClientResponse) -> str:
    text = (await response.text(errors="replace")).strip()
    return _one_line(text.splitlines()[0]) if text else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]
