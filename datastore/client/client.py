"""A client for datastore servers: upload (manifest, resumable), download (Range resume), list, status, cancel,
transfer jobs, and invitations (asked, answered, extended, revoked).

::

    async with DataStoreClient("http://127.0.0.1:8006") as store:
        results = await store.upload("files", ["report.pdf", "data.csv"])
        await store.download(results[0].url, Path("copy.pdf"))

Uploads compute each file's SHA-256 (several files in parallel threads), post
a JSON manifest declaring it (the server then verifies that alone as the bytes
arrive, and computes the MD5 after publishing), and send each file by tus ``PATCH`` in chunks that carry a SHA-256
``Upload-Checksum``. On a connection error or a 5xx the client waits (bounded
exponential backoff), asks the server for its offset with ``HEAD`` and goes
on from there, so nothing is sent twice. Downloads write to ``NAME.part``,
resume it with ``Range`` + ``If-Range``, verify the server's ``Repr-Digest``
over the whole file and only then rename it to ``NAME``: a bad file never
lies under the final name.

A progress callback may cancel, as the AccessGrid client's could: for an
upload it is called ``progress(name, bytes_sent, total_bytes, file_done,
transfer_done)``, for a download ``progress(bytes_so_far, total_bytes,
done)``; returning true stops the transfer (an upload's transfer is
cancelled on the server too) and raises :class:`Cancelled`.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import hashlib
import logging
import os
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from yarl import URL

from ..protocol.digests import parse_repr_digest
from .events import read_events

log = logging.getLogger(__name__)

UploadProgress = Callable[[str, int, int, bool, bool], Any]
DownloadProgress = Callable[[int, int, bool], Any]

_TUS = {"Tus-Resumable": "1.0.0"}

#: The job states :meth:`DataStoreClient.wait_job` waits for by default: those the job stays in
#: until someone acts (the store's final states, and stopped).
FINAL_JOB_STATES = frozenset(
    {
        "FINISHED",
        "FINISHED_DIRTY",
        "FAILED",
        "EXPIRED",
        "DECLINED",
        "INVITE_NOT_ACCEPTED_ON_TIME",
        "USER_STOPPED",
    }
)
#: Jobs asked for per page of a listing, and the most pages followed.
JOB_PAGE = 1000
MAX_JOB_PAGES = 100


class ClientError(Exception):
    """Base of the client's errors; the message is one line for a person."""


class RequestFailed(ClientError):
    """The server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


class UploadRefused(RequestFailed):
    """The store refused the manifest; ``names`` are the refused files."""

    def __init__(self, status: int, message: str, names: Sequence[str]) -> None:
        super().__init__(status, message)
        self.names = list(names)


class Cancelled(ClientError):
    """The progress callback asked to stop."""


class DigestMismatch(ClientError):
    """A downloaded file does not match the server's Repr-Digest; it was removed."""


class RetriesExhausted(ClientError):
    """The connection kept failing; the transfer may be resumed later."""


@dataclass(frozen=True, slots=True)
class UploadResult:
    """One uploaded file, verified by the server."""

    name: str
    size: int
    #: Not computed here: the client declares and the server verifies the SHA-256 (the server
    #: computes the MD5 after publishing; its listing and downloads give it then).
    md5: str | None
    sha256: str
    url: str
    transfer_key: str


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """One downloaded file; ``verified`` when the server sent a digest and it matched."""

    path: Path
    size: int
    sha256: str
    verified: bool
    resumed_from: int


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file to upload, with the digest the manifest declares (SHA-256: the server verifies it as
    the bytes arrive, and nothing else, which is its fastest path)."""

    path: Path
    name: str
    size: int
    sha256: str


class DataStoreClient:
    """An async client of one server (``url`` is its base, e.g. ``https://host:8443``).

    ``ssl`` is an SSLContext (with a client certificate for the TLS server),
    ``token`` a bearer token the store issued (``datastore tokens create``),
    ``identity`` an ``X-Client-DN`` to assert on plain HTTP (honoured only by
    a store that trusts the header).
    """

    def __init__(
        self,
        url: str,
        *,
        ssl: ssl.SSLContext | None = None,
        identity: str | None = None,
        token: str | None = None,
        chunk_size: int = 8 << 20,
        retries: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 300.0,
    ) -> None:
        self.base = url.rstrip("/")
        self._ssl = ssl
        self._headers = {"X-Client-DN": identity} if identity is not None else {}
        self._token = token
        self.chunk_size = chunk_size
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> DataStoreClient:
        connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self._headers, timeout=self._timeout, middlewares=(self._authorize,)
        )
        return self

    async def _authorize(
        self, request: aiohttp.ClientRequest, send: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        """Add the token to requests for this store's origin only: a URL elsewhere never sees it."""
        if self._token is not None and request.url.origin() == URL(self.base).origin():
            request.headers["Authorization"] = f"Bearer {self._token}"
        return await send(request)

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use 'async with DataStoreClient(...)'")
        return self._session

    # -- uploads ----------------------------------------------------------------------------

    async def upload(
        self,
        prefix: str,
        paths: Iterable[str | os.PathLike[str]],
        *,
        progress: UploadProgress | None = None,
        resume: str | None = None,
        on_registered: Callable[[str, list[LocalFile]], Any] | None = None,
    ) -> list[UploadResult]:
        """Upload files (directories are walked) under ``prefix``; return a result per file.

        ``resume`` is the key of an earlier, interrupted run with the same
        files: files already finished are skipped, the others continue from
        the server's offset. ``on_registered(key, files)`` hears the transfer
        key and the files as soon as they are registered, before the long
        part starts.
        """
        given = list(paths)
        files = await asyncio.to_thread(lambda: describe_local_files(expand_paths(given)))
        if not files:
            raise ClientError("nothing to upload")
        if resume is None:
            key, urls = await self._register(prefix, files)
        else:
            key, urls = await self._resume(prefix, resume, files)
        if on_registered is not None:
            on_registered(key, files)
        results = []
        try:
            for number, local in enumerate(files):
                last = number == len(files) - 1
                await self._send(urls[number], local, progress, last)
                results.append(
                    UploadResult(
                        local.name,
                        local.size,
                        None,
                        local.sha256,
                        f"{self.base}/{prefix}/{quote(local.name, safe='')}",
                        key,
                    )
                )
        except Cancelled:
            await self.cancel(key)
            raise
        return results

    async def _register(self, prefix: str, files: Sequence[LocalFile]) -> tuple[str, list[str]]:
        manifest = {"files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in files]}
        async with self.session.post(
            f"{self.base}/{prefix}/manifest", json=manifest, headers={"Accept": "application/json"}
        ) as response:
            body = await _json(response)
            if response.status == 403 and "files" in body:
                names = [entry["name"] for entry in body["files"]]
                raise UploadRefused(403, f"the store refused {', '.join(names)}", names)
            if response.status != 201:
                raise RequestFailed(response.status, str(body.get("message", response.reason)))
        key = str(body["transfer_key"])
        # The upload URLs have one shape: built on the address this client reaches the store at
        # (which a proxy or a port forward may make other than the one the store answers with).
        return key, [f"{self.base}/{prefix}/{key}/{entry['num']}" for entry in body["files"]]

    async def _resume(self, prefix: str, key: str, files: Sequence[LocalFile]) -> tuple[str, list[str]]:
        status = await self.status(key)
        by_name = {entry["name"]: entry for entry in status["files"]}
        urls = []
        for local in files:
            entry = by_name.get(local.name)
            if entry is None or entry["size"] != local.size:
                raise ClientError(f"{local.name} is not part of transfer {key} (or its size changed)")
            urls.append(f"{self.base}/{prefix}/{key}/{entry['num']}")
        return key, urls

    async def _send(self, url: str, local: LocalFile, progress: UploadProgress | None, last: bool) -> None:
        """Send one file by tus PATCH from the server's offset, resuming after failures."""
        failures = 0
        offset = await self._with_retries(lambda: self._offset(url), "asking for the offset")
        if local.size == 0:
            # Nothing to append, but the empty file still has to be sent to be published.
            await self._with_retries(lambda: self._send_empty(url, local), "sending an empty file")
            offset = 0
            if progress is not None and progress(local.name, 0, 0, True, last):
                raise Cancelled("cancelled by the progress callback")
            return
        while True:
            done = offset >= local.size
            if progress is not None and progress(local.name, offset, local.size, done, last and done):
                raise Cancelled("cancelled by the progress callback")
            if offset >= local.size:
                return
            try:
                offset = await self._patch(url, local, offset)
                failures = 0
            except (aiohttp.ClientError, TimeoutError, _Retry) as exc:
                failures += 1
                if failures > self.retries:
                    raise RetriesExhausted(f"{local.name}: giving up after {self.retries} retries: {exc}") from None
                delay = min(self.max_backoff, self.backoff * 2 ** (failures - 1))
                log.info("%s: %s; resuming in %.1f s", local.name, exc or type(exc).__name__, delay)
                await asyncio.sleep(delay)
                offset = await self._with_retries(lambda: self._offset(url), "asking for the offset")

    async def _patch(self, url: str, local: LocalFile, offset: int) -> int:
        data = await asyncio.to_thread(_read_at, local.path, offset, min(self.chunk_size, local.size - offset))
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        headers = {
            **_TUS,
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": str(offset),
            "Upload-Checksum": f"sha256 {checksum}",
        }
        async with self.session.patch(url, data=data, headers=headers) as response:
            if response.status == 204:
                return int(response.headers["Upload-Offset"])
            message = await _message(response)
            if response.status in (409, 423, 460) or response.status >= 500:
                if response.status == 460 and "whole file" in message:
                    raise RequestFailed(460, f"{local.name}: {message} (did the file change while uploading?)")
                raise _Retry(f"{response.status} {message}")
            raise RequestFailed(response.status, f"{local.name}: {message}")

    async def _send_empty(self, url: str, local: LocalFile) -> None:
        headers = {**_TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
        async with self.session.patch(url, data=b"", headers=headers) as response:
            if response.status in (204, 409):  # 409: published by an earlier run
                return
            message = await _message(response)
            if response.status >= 500:
                raise _Retry(f"{response.status} {message}")
            raise RequestFailed(response.status, f"{local.name}: {message}")

    async def _offset(self, url: str) -> int:
        async with self.session.head(url, headers=_TUS) as response:
            if response.status >= 500:
                raise _Retry(f"{response.status} {response.reason}")
            if response.status != 200:
                raise RequestFailed(response.status, response.reason or "upload not found")
            return int(response.headers["Upload-Offset"])

    async def _with_retries(self, call: Callable[[], Any], what: str) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except (aiohttp.ClientError, TimeoutError, _Retry) as exc:
                if attempt == self.retries:
                    raise RetriesExhausted(f"giving up {what} after {self.retries} retries: {exc}") from None
                await asyncio.sleep(min(self.max_backoff, self.backoff * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- downloads --------------------------------------------------------------------------

    async def download(
        self,
        url: str,
        dest: str | os.PathLike[str] | None = None,
        *,
        resume: bool = True,
        progress: DownloadProgress | None = None,
    ) -> DownloadResult:
        """Download ``url`` (absolute, or a path on this server) to ``dest``.

        ``dest`` defaults to the file's name in the current directory; a
        directory gets the file's name inside it. A partial ``dest.part``
        from an earlier attempt is resumed unless ``resume`` is false.
        """
        url = url if "://" in url else f"{self.base}/{url.lstrip('/')}"
        name = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
        target = Path(dest) if dest is not None else Path(name)
        if str(dest).endswith(("/", os.sep)) or await asyncio.to_thread(target.is_dir):
            target = target / name
        part = target.with_name(target.name + ".part")
        validator = target.with_name(target.name + ".part.etag")
        failures = 0
        while True:
            try:
                return await self._download_once(url, target, part, validator, resume, progress)
            except aiohttp.ClientConnectorError:
                if failures == 0:
                    raise  # nothing listens there: say so now, not after minutes of retries
                failures += 1
                if failures > self.retries:
                    raise
                await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** (failures - 1)))
            except (aiohttp.ClientError, TimeoutError, _Retry) as exc:
                failures += 1
                if failures > self.retries:
                    raise RetriesExhausted(f"{name}: giving up after {self.retries} retries: {exc}") from None
                await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** (failures - 1)))
                resume = True

    async def _download_once(
        self,
        url: str,
        target: Path,
        part: Path,
        validator: Path,
        resume: bool,
        progress: DownloadProgress | None,
    ) -> DownloadResult:
        offset, etag = await asyncio.to_thread(_partial_state, part, validator, resume)
        headers = {"Range": f"bytes={offset}-", "If-Range": etag} if offset and etag else {}
        async with self.session.get(url, headers=headers) as response:
            if response.status == 416 and offset:
                await asyncio.to_thread(_remove, part, validator)
                raise _Retry("the partial file no longer fits the server's file")
            if response.status >= 500:
                raise _Retry(f"{response.status} {response.reason}")
            if response.status not in (200, 206):
                raise RequestFailed(response.status, await _message(response))
            if response.status == 200:
                offset = 0
            digests = parse_repr_digest(response.headers.get("Repr-Digest", ""))
            length = response.content_length
            total = offset + length if length is not None else -1
            sha256 = await asyncio.to_thread(_prefix_sha256, part, offset)
            await asyncio.to_thread(_start_part, part, validator, offset, response.headers.get("ETag"))
            received = offset
            handle = await asyncio.to_thread(open, part, "ab")
            try:
                async for chunk in response.content.iter_chunked(1 << 20):
                    await asyncio.to_thread(_write_and_hash, handle, chunk, sha256)
                    received += len(chunk)
                    if progress is not None and progress(received, total, False):
                        raise Cancelled("cancelled by the progress callback")
            except Cancelled:
                await asyncio.to_thread(handle.close)
                await asyncio.to_thread(_remove, part, validator)
                raise
            finally:
                await asyncio.to_thread(handle.close)
        if length is not None and received != total:
            raise _Retry(f"the connection ended after {received} of {total} bytes")
        actual = sha256.hexdigest()
        expected = digests.get("sha-256")
        if expected is not None and expected != actual:
            await asyncio.to_thread(_remove, part, validator)
            raise DigestMismatch(f"{target.name}: SHA-256 {actual} is not the server's {expected}; removed")
        await asyncio.to_thread(_finish_part, part, validator, target)
        if progress is not None:
            progress(received, received, True)
        return DownloadResult(target, received, actual, expected is not None, offset)

    # -- the rest ---------------------------------------------------------------------------

    async def list(self, prefix: str) -> list[dict[str, Any]]:
        """The files of ``prefix`` as the server lists them."""
        async with self.session.get(f"{self.base}/{prefix}/", headers={"Accept": "application/json"}) as response:
            body = await _json(response)
            if response.status != 200:
                raise RequestFailed(response.status, str(body.get("message", response.reason)))
        files: list[dict[str, Any]] = body["files"]
        return files

    async def status(self, key: str) -> dict[str, Any]:
        """The state of transfer ``key`` with its files."""
        return await self._transfer("GET", key)

    async def cancel(self, key: str) -> dict[str, Any]:
        """Cancel transfer ``key``; returns its final state."""
        return await self._transfer("DELETE", key)

    async def events(
        self,
        prefix: str | None = None,
        *,
        key: str | None = None,
        after: int | None = None,
        reconnect: bool = True,
        on_reconnect: Callable[[int | None, BaseException], Any] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Follow the store's events live (of ``prefix``, or of transfer ``key``), as dicts; never ends.

        With ``after``, the events after that id come first. A dropped connection is opened again
        after a growing pause (``reconnect``), asking for the events after the last one received
        (``Last-Event-ID``): none is missed or repeated. ``on_reconnect(last_id, error)`` hears of
        each. A refusal (401, 403, 404) raises RequestFailed at once.
        """
        if key is not None:
            url = f"{self.base}/_api/v1/transfers/{quote(key, safe='')}/events"
        else:
            url = f"{self.base}/_api/v1/events" + (f"?prefix={quote(prefix, safe='')}" if prefix else "")
        async for event in self._follow(url, after, reconnect, on_reconnect):
            if event is not None:
                yield event

    async def _follow(
        self,
        url: str,
        after: int | None,
        reconnect: bool,
        on_reconnect: Callable[[int | None, BaseException], Any] | None,
    ) -> AsyncIterator[dict[str, Any] | None]:
        """The events of the SSE stream at ``url``, each connection's start marked by a ``None`` (from
        then on the store sends every new event, so a state read then misses nothing)."""
        last = after
        pause = self.backoff
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
                async with self.session.get(url, headers=headers, timeout=timeout) as response:
                    if response.status != 200:
                        body = await _json(response)
                        raise RequestFailed(response.status, str(body.get("message", response.reason)))
                    pause = self.backoff
                    yield None
                    async for message in read_events(response.content):
                        event: dict[str, Any] = message.json()
                        last = int(event["id"])
                        yield event
                failure: BaseException = ConnectionError("the stream ended")
            except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                failure = exc
            if not reconnect:
                raise failure
            if on_reconnect is not None:
                on_reconnect(last, failure)
            await asyncio.sleep(pause)
            pause = min(pause * 2, self.max_backoff)

    # -- transfer jobs ----------------------------------------------------------------------

    async def submit_job(
        self, files: Sequence[tuple[str, str]] | Sequence[Mapping[str, Any]], **options: Any
    ) -> dict[str, Any]:
        """Submit a transfer job copying each ``(source, destination)`` (or ``{"source", "destination",
        "size"?, "checksum"?}``); return the job. ``options`` are the API's fields (``priority``,
        ``verify_checksum``, ``retry``, ``retry_delay``, ``max_time_in_queue``, ``deadline``, ``commit``
        (default true), ``submission_id``, ``bandwidth``, ``chunk_size``, ``source_token``,
        ``destination_token``); those given as None are left out."""
        entries = [
            dict(entry) if isinstance(entry, Mapping) else {"source": entry[0], "destination": entry[1]}
            for entry in files
        ]
        document = {"files": entries, **{k: v for k, v in options.items() if v is not None}}
        return await self._jobs_request("POST", "", json_body=document, expect=(200, 201))

    async def jobs(self, states: Iterable[str] = (), all: bool = False) -> builtins.list[dict[str, Any]]:
        """The client's jobs (``all``: everyone's, for an administrator), oldest first, optionally only
        those in ``states``; every page, up to MAX_JOB_PAGES of them."""
        query: list[tuple[str, str]] = [("state", str(state)) for state in states]
        if all:
            query.append(("all", "1"))
        query.append(("limit", str(JOB_PAGE)))
        found: builtins.list[dict[str, Any]] = []
        after: Any = None
        for _ in range(MAX_JOB_PAGES):
            page = await self._jobs_request("GET", "", query=query + ([("after", str(after))] if after else []))
            found.extend(page["jobs"])
            after = page.get("next")
            if after is None:
                return found
        raise ClientError(f"more than {MAX_JOB_PAGES * JOB_PAGE} jobs: filter them by --state")

    async def job(self, job_id: str) -> dict[str, Any]:
        """The job ``job_id`` with its files, their attempts, its totals and its last error."""
        return await self._jobs_request("GET", job_id)

    async def commit_job(self, job_id: str) -> dict[str, Any]:
        """Commit a job submitted with ``commit=False``; return it."""
        return await self._jobs_request("POST", f"{job_id}/commit")

    async def pause_job(self, job_id: str) -> dict[str, Any]:
        """Pause a queued or active job; return it."""
        return await self._jobs_request("POST", f"{job_id}/pause")

    async def resume_job(self, job_id: str) -> dict[str, Any]:
        """Resume a paused or stopped job; return it."""
        return await self._jobs_request("POST", f"{job_id}/resume")

    async def stop_job(self, job_id: str) -> dict[str, Any]:
        """Stop a job (its partial data is kept for a resume); return it."""
        return await self._jobs_request("POST", f"{job_id}/stop")

    async def retry_job(self, job_id: str) -> dict[str, Any]:
        """Queue again the files of a failed, dirty or expired job that did not finish; return it."""
        return await self._jobs_request("POST", f"{job_id}/retry")

    async def set_job_priority(self, job_id: str, priority: int) -> dict[str, Any]:
        """Change the priority (1-5) of a job that has not started; return it."""
        return await self._jobs_request("PATCH", job_id, json_body={"priority": priority})

    async def clear_job(self, job_id: str) -> None:
        """Forget a job that is not committed, stopped or finished."""
        await self._jobs_request("DELETE", job_id, expect=(204,))

    async def job_events(
        self,
        job_id: str | None = None,
        *,
        after: int | None = None,
        reconnect: bool = True,
        on_reconnect: Callable[[int | None, BaseException], Any] | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Follow the events of job ``job_id`` (None: of all the client's jobs) live, as dicts; never
        ends. ``after``, ``reconnect`` and ``on_reconnect`` as for :meth:`events`."""
        async for event in self._follow(self._job_events_url(job_id), after, reconnect, on_reconnect):
            if event is not None:
                yield event

    async def wait_job(
        self,
        job_id: str,
        states: Iterable[str] = FINAL_JOB_STATES,
        *,
        on_event: Callable[[dict[str, Any]], Any] | None = None,
        on_status: Callable[[dict[str, Any]], Any] | None = None,
        on_reconnect: Callable[[int | None, BaseException], Any] | None = None,
    ) -> dict[str, Any]:
        """Follow job ``job_id``'s events until it is in one of ``states`` (default: the final ones,
        stopped included); return its status. ``on_event`` hears each event, ``on_status`` each status
        read (when the stream opens, and after each change of the job's state)."""
        wanted = {str(state) for state in states}
        async for event in self._follow(self._job_events_url(job_id), None, True, on_reconnect):
            if event is not None:
                if on_event is not None:
                    on_event(event)
                if event["type"].startswith("job.file.") or event["type"] == "job.priority":
                    continue
            # The stream is open (or the job changed state): what the job is now decides.
            status = await self.job(job_id)
            if on_status is not None:
                on_status(status)
            if status["state"] in wanted:
                return status
        raise AssertionError("unreachable")  # pragma: no cover

    def _job_events_url(self, job_id: str | None) -> str:
        if job_id is None:
            return f"{self.base}/_api/v1/jobs/events"
        return f"{self.base}/_api/v1/jobs/{quote(job_id, safe='')}/events"

    async def _jobs_request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        query: Sequence[tuple[str, str]] = (),
        expect: tuple[int, ...] = (200,),
    ) -> dict[str, Any]:
        url = f"{self.base}/_api/v1/jobs" + (f"/{quote(path, safe='/')}" if path else "")
        async with self.session.request(
            method, url, json=json_body, params=list(query) or None, headers={"Accept": "application/json"}
        ) as response:
            if response.status not in expect:
                body = await _json(response)
                raise RequestFailed(response.status, str(body.get("message", response.reason)))
            if response.status == 204:
                return {}
            return await _json(response)

    # -- invitations and vouchers -----------------------------------------------------------

    async def invitations(self) -> builtins.list[dict[str, Any]]:
        """The invitations this client may answer (those to prefixes it may upload to; every one, for
        an administrator), newest first, whatever their state."""
        found: builtins.list[dict[str, Any]] = (await self._invitations_request("GET", ""))["invitations"]
        return found

    async def invitation(self, invitation_id: str) -> dict[str, Any]:
        """The invitation ``invitation_id`` (to its answerers, or to its asker holding its token)."""
        return await self._invitations_request("GET", invitation_id)

    async def accept_invitation(
        self, invitation_id: str, budget: int | None = None, lifetime: float | None = None
    ) -> dict[str, Any]:
        """Accept a pending invitation: its token becomes a voucher for ``budget`` bytes (default: the
        size asked) that works for ``lifetime`` seconds (default: the store's); return it."""
        answer = {k: v for k, v in (("budget", budget), ("lifetime", lifetime)) if v is not None}
        return await self._invitations_request("POST", f"{invitation_id}/accept", json_body=answer)

    async def decline_invitation(self, invitation_id: str) -> dict[str, Any]:
        """Decline a pending invitation (its token never works); return it."""
        return await self._invitations_request("POST", f"{invitation_id}/decline")

    async def extend_invitation(self, invitation_id: str, bytes: int) -> dict[str, Any]:
        """Add ``bytes`` to an accepted voucher's budget (a job paused for it resumes); return it."""
        return await self._invitations_request("POST", f"{invitation_id}/extend", json_body={"bytes": bytes})

    async def revoke_invitation(self, invitation_id: str) -> dict[str, Any]:
        """Revoke an invitation or its voucher: it stops working at once; return it."""
        return await self._invitations_request("DELETE", invitation_id)

    async def ask_invitation(
        self,
        prefix: str,
        names: Iterable[str],
        size: int,
        direction: str = "push",
        requester: str | None = None,
        wait: float | None = None,
    ) -> dict[str, Any]:
        """Ask the store for an invitation to push ``names`` (``size`` bytes in all) into ``prefix`` (or,
        ``direction="pull"``, to read them from it), answered within ``wait`` seconds (default: the
        store's longest). The answer holds its ``token``, this once: once accepted, it is the voucher."""
        document: dict[str, Any] = {"prefix": prefix, "direction": direction, "names": list(names), "size": size}
        if requester is not None:
            document["requester"] = requester
        if wait is not None:
            document["wait"] = wait
        return await self._invitations_request("POST", "", json_body=document, expect=(201,))

    async def _invitations_request(
        self, method: str, path: str, *, json_body: Any = None, expect: tuple[int, ...] = (200,)
    ) -> dict[str, Any]:
        url = f"{self.base}/_api/v1/invitations" + (f"/{quote(path, safe='/')}" if path else "")
        async with self.session.request(
            method, url, json=json_body, headers={"Accept": "application/json"}
        ) as response:
            body = await _json(response)
            if response.status not in expect:
                raise RequestFailed(response.status, str(body.get("message", response.reason)))
        return body

    async def _transfer(self, method: str, key: str) -> dict[str, Any]:
        url = f"{self.base}/_api/v1/transfers/{quote(key, safe='')}"
        async with self.session.request(method, url, headers={"Accept": "application/json"}) as response:
            body = await _json(response)
            if response.status != 200:
                raise RequestFailed(response.status, str(body.get("message", response.reason)))
        return body


class SyncDataStoreClient:
    """The same client for scripts without asyncio: every method blocks."""

    def __init__(self, url: str, **options: Any) -> None:
        self._runner = asyncio.Runner()
        self._client = DataStoreClient(url, **options)
        self._runner.run(self._client.__aenter__())

    def __enter__(self) -> SyncDataStoreClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and the event loop."""
        self._runner.run(self._client.close())
        self._runner.close()

    def upload(self, prefix: str, paths: Iterable[str | os.PathLike[str]], **options: Any) -> list[UploadResult]:
        """See :meth:`DataStoreClient.upload`."""
        return self._runner.run(self._client.upload(prefix, paths, **options))

    def download(self, url: str, dest: str | os.PathLike[str] | None = None, **options: Any) -> DownloadResult:
        """See :meth:`DataStoreClient.download`."""
        return self._runner.run(self._client.download(url, dest, **options))

    def list(self, prefix: str) -> list[dict[str, Any]]:
        """See :meth:`DataStoreClient.list`."""
        return self._runner.run(self._client.list(prefix))

    def status(self, key: str) -> dict[str, Any]:
        """See :meth:`DataStoreClient.status`."""
        return self._runner.run(self._client.status(key))

    def cancel(self, key: str) -> dict[str, Any]:
        """See :meth:`DataStoreClient.cancel`."""
        return self._runner.run(self._client.cancel(key))

    def submit_job(
        self, files: Sequence[tuple[str, str]] | Sequence[Mapping[str, Any]], **options: Any
    ) -> dict[str, Any]:
        """See :meth:`DataStoreClient.submit_job`."""
        return self._runner.run(self._client.submit_job(files, **options))

    def jobs(self, states: Iterable[str] = (), all: bool = False) -> builtins.list[dict[str, Any]]:
        """See :meth:`DataStoreClient.jobs`."""
        return self._runner.run(self._client.jobs(states, all))

    def job(self, job_id: str) -> dict[str, Any]:
        """See :meth:`DataStoreClient.job`."""
        return self._runner.run(self._client.job(job_id))

    def commit_job(self, job_id: str) -> dict[str, Any]:
        """See :meth:`DataStoreClient.commit_job`."""
        return self._runner.run(self._client.commit_job(job_id))

    def pause_job(self, job_id: str) -> dict[str, Any]:
        """See :meth:`DataStoreClient.pause_job`."""
        return self._runner.run(self._client.pause_job(job_id))

    def resume_job(self, job_id: str) -> dict[str, Any]:
        """See :meth:`DataStoreClient.resume_job`."""
        return self._runner.run(self._client.resume_job(job_id))

    def stop_job(self, job_id: str) -> dict[str, Any]:
        """See :meth:`DataStoreClient.stop_job`."""
        return self._runner.run(self._client.stop_job(job_id))

    def retry_job(self, job_id: str) -> dict[str, Any]:
        """See :meth:`DataStoreClient.retry_job`."""
        return self._runner.run(self._client.retry_job(job_id))

    def set_job_priority(self, job_id: str, priority: int) -> dict[str, Any]:
        """See :meth:`DataStoreClient.set_job_priority`."""
        return self._runner.run(self._client.set_job_priority(job_id, priority))

    def clear_job(self, job_id: str) -> None:
        """See :meth:`DataStoreClient.clear_job`."""
        self._runner.run(self._client.clear_job(job_id))

    def job_events(self, job_id: str | None = None, **options: Any) -> Iterator[dict[str, Any]]:
        """See :meth:`DataStoreClient.job_events`: a blocking iterator (close it to end the stream)."""
        stream = self._client.job_events(job_id, **options)

        async def following() -> dict[str, Any]:
            return await anext(stream)

        try:
            while True:
                try:
                    yield self._runner.run(following())
                except StopAsyncIteration:
                    return
        finally:
            self._runner.run(stream.aclose())

    def wait_job(self, job_id: str, states: Iterable[str] = FINAL_JOB_STATES, **options: Any) -> dict[str, Any]:
        """See :meth:`DataStoreClient.wait_job`."""
        return self._runner.run(self._client.wait_job(job_id, states, **options))

    def invitations(self) -> builtins.list[dict[str, Any]]:
        """See :meth:`DataStoreClient.invitations`."""
        return self._runner.run(self._client.invitations())

    def invitation(self, invitation_id: str) -> dict[str, Any]:
        """See :meth:`DataStoreClient.invitation`."""
        return self._runner.run(self._client.invitation(invitation_id))

    def accept_invitation(
        self, invitation_id: str, budget: int | None = None, lifetime: float | None = None
    ) -> dict[str, Any]:
        """See :meth:`DataStoreClient.accept_invitation`."""
        return self._runner.run(self._client.accept_invitation(invitation_id, budget, lifetime))

    def decline_invitation(self, invitation_id: str) -> dict[str, Any]:
        """See :meth:`DataStoreClient.decline_invitation`."""
        return self._runner.run(self._client.decline_invitation(invitation_id))

    def extend_invitation(self, invitation_id: str, bytes: int) -> dict[str, Any]:
        """See :meth:`DataStoreClient.extend_invitation`."""
        return self._runner.run(self._client.extend_invitation(invitation_id, bytes))

    def revoke_invitation(self, invitation_id: str) -> dict[str, Any]:
        """See :meth:`DataStoreClient.revoke_invitation`."""
        return self._runner.run(self._client.revoke_invitation(invitation_id))

    def ask_invitation(
        self,
        prefix: str,
        names: Iterable[str],
        size: int,
        direction: str = "push",
        requester: str | None = None,
        wait: float | None = None,
    ) -> dict[str, Any]:
        """See :meth:`DataStoreClient.ask_invitation`."""
        return self._runner.run(self._client.ask_invitation(prefix, names, size, direction, requester, wait))


def client_ssl_context(cafile: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client TLS context: trust ``cafile`` (or the system's), present ``cert``/``key`` if given."""
    for path in (cafile, cert, key):
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(2, "No such file", path)
    context = ssl.create_default_context(cafile=cafile)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, directories walked (sorted, hidden entries skipped)."""
    expanded: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                expanded.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
        else:
            expanded.append(path)
    return expanded


def describe_local_files(paths: Sequence[Path]) -> list[LocalFile]:
    """Size and SHA-256 of each of ``paths``, several files hashed at once (one thread per CPU:
    hashlib releases the GIL on the large blocks read)."""
    if len(paths) <= 1:
        return [describe_local_file(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1), thread_name_prefix="hash") as pool:
        return list(pool.map(describe_local_file, paths))


def describe_local_file(path: Path) -> LocalFile:
    """Size and SHA-256 of a local file (read once, in large blocks)."""
    if not path.is_file():
        raise ClientError(f"{path}: no such file")
    sha256 = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            sha256.update(block)
            size += len(block)
    return LocalFile(path, path.name, size, sha256.hexdigest())


class _Retry(Exception):
    """A failure worth retrying after a pause."""


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await response.json(content_type=None)
    except ValueError:
        return {"message": (await response.text()).strip() or response.reason}
    return body if isinstance(body, dict) else {"message": str(body)}


async def _message(response: aiohttp.ClientResponse) -> str:
    text = (await response.text()).strip()
    return text.splitlines()[0] if text else (response.reason or "")


def _read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def _partial_state(part: Path, validator: Path, resume: bool) -> tuple[int, str | None]:
    if resume and part.exists() and validator.exists():
        return part.stat().st_size, validator.read_text().strip() or None
    _remove(part, validator)
    return 0, None


def _prefix_sha256(part: Path, offset: int) -> Any:
    sha256 = hashlib.sha256()
    if offset:
        with open(part, "rb") as handle:
            remaining = offset
            while remaining and (block := handle.read(min(8 << 20, remaining))):
                sha256.update(block)
                remaining -= len(block)
    return sha256


def _start_part(part: Path, validator: Path, offset: int, etag: str | None) -> None:
    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "r+b" if offset and part.exists() else "wb") as handle:
        handle.truncate(offset)
    if etag:
        validator.write_text(etag)
    else:
        validator.unlink(missing_ok=True)


def _write_and_hash(handle: Any, chunk: bytes, sha256: Any) -> None:
    handle.write(chunk)
    sha256.update(chunk)


def _finish_part(part: Path, validator: Path, target: Path) -> None:
    os.replace(part, target)
    validator.unlink(missing_ok=True)


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
