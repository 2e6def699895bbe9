"""This store as a job's end, without the network: ``local:/PREFIX/NAME`` is read and written
in-process through the same mount, policy, handler callbacks and lifecycle as an HTTP request by the
job's owner would be.

A :class:`LocalSource` reads a published file as a download does (the prefix's policy and handler
decide; a file uploaded over TLS that the prefix keeps off plain HTTP goes only to a secure
destination). A :class:`LocalDestination` registers a one-file transfer as a manifest does (under an
idempotency key planned and persisted before, so that a runner that crashed after registering finds
its transfer again) and appends to it as a tus PATCH does (``Lifecycle.append_resumable``): the
bytes are staged, verified against the declared digests and published atomically, and a new attempt
resumes from the staged offset.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from typing import IO

from ...errors import (
    AlreadyUploaded,
    ChecksumMismatch,
    ChunkChecksumMismatch,
    DatastoreError,
    InsufficientStorage,
    NotEnoughSpace,
    OffsetMismatch,
    QuotaExceeded,
    SizeMismatch,
)
from ...handlers.interface import Download
from ...handlers.mounts import Mount, file_etag
from ...lifecycle.digests import Undigested
from ...lifecycle.machine import Lifecycle, UploadTarget
from ...lifecycle.states import FileState, TransferState
from ...protocol.manifest import Manifest, ManifestFile
from ...protocol.names import validate_name
from ...security.identity import Identity
from ...security.policy import Action
from ..states import FailureReason, failure_for_status
from .interface import DriverError, Handle, Order, Published, SourceInfo

#: How a job names a file of this store.
SCHEME = "local:"


def parse_local(url: str) -> tuple[str, str]:
    """``local:/PREFIX/NAME`` -> (prefix, name), the name checked as a manifest's is; DriverError
    BAD_REQUEST otherwise."""
    path = url[len(SCHEME) :] if url.startswith(SCHEME) else url
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != "" or not parts[1]:
        raise DriverError(FailureReason.BAD_REQUEST, f"{url!r} is not local:/PREFIX/NAME")
    try:
        return parts[1], validate_name(parts[2])
    except DatastoreError as exc:
        raise DriverError(FailureReason.BAD_REQUEST, f"{url!r}: {exc.message}") from None


def failure_of(exc: DatastoreError) -> DriverError:
    """The classified failure of a refusal by this store."""
    if isinstance(exc, ChecksumMismatch | ChunkChecksumMismatch):
        reason = FailureReason.CHECKSUM_MISMATCH
    elif isinstance(exc, SizeMismatch):
        reason = FailureReason.SIZE_MISMATCH
    elif isinstance(exc, NotEnoughSpace | InsufficientStorage):
        reason = FailureReason.NO_SPACE
    elif isinstance(exc, QuotaExceeded | OffsetMismatch):
        reason = FailureReason.THROTTLED if isinstance(exc, QuotaExceeded) else FailureReason.CONNECTION
    else:
        reason = failure_for_status(exc.status)
    return DriverError(reason, f"this store: {exc.message}")


class _Local:
    def __init__(self, lifecycle: Lifecycle, url: str, identity: Identity) -> None:
        self.lifecycle = lifecycle
        self.prefix, self.name = parse_local(url)
        self.identity = identity

    async def _mount(self, action: Action) -> Mount:
        try:
            mount = self.lifecycle.mount(self.prefix)
            await mount.authorize(self.identity, action, self.name)
        except DatastoreError as exc:
            raise failure_of(exc) from None
        return mount

    async def close(self) -> None:
        pass


class LocalSource(_Local):
    """A published file of this store, read as its owner's download would be."""

    def __init__(
        self, lifecycle: Lifecycle, url: str, identity: Identity, *, chunk_size: int, secure: bool = True
    ) -> None:
        super().__init__(lifecycle, url, identity)
        self.chunk_size = chunk_size
        #: The file as :meth:`stat` located it (read then checks it is still that file).
        self._located: Download | None = None
        #: Whether the bytes go only where TLS (or this store) protects them.
        self.secure = secure

    async def _locate(self) -> Download:
        mount = await self._mount(Action.READ)
        try:
            download = await mount.locate(self.identity, self.name)
        except DatastoreError as exc:
            raise failure_of(exc) from None
        stored = download.stored
        if stored is not None and stored.tls and mount.policy.tls_only and not self.secure:
            raise DriverError(FailureReason.FORBIDDEN, "this file is served over TLS only: copy it to https or local")
        return download

    async def stat(self) -> SourceInfo:
        download = self._located = await self._locate()
        stored = download.stored
        if stored is not None and (stored.md5 is None or stored.sha256 is None):
            # Its upload declared only some digests, and the others are still to be computed: the
            # copy is verified by them, so they are computed now (the background work would be later).
            await self.lifecycle.digester.complete(Undigested(self.prefix, self.name))
            download = self._located = await self._locate()
            stored = download.stored
        whole = stored is not None and stored.size == download.stat.st_size
        return SourceInfo(
            size=download.stat.st_size,
            validator=file_etag(download.stat),
            md5=stored.md5 if whole and stored is not None else None,
            sha256=stored.sha256 if whole and stored is not None else None,
        )

    async def read(self, offset: int, info: SourceInfo) -> AsyncIterator[bytes]:
        download = self._located or await self._locate()
        if download.body is not None and file_etag(download.stat) == info.validator:
            # A small file the handler read whole when it located it: those bytes are the version stated.
            for start in range(offset, len(download.body), self.chunk_size):
                yield download.body[start : start + self.chunk_size]
            return
        try:
            handle, now, first = await asyncio.to_thread(_open_at, download, offset, self.chunk_size)
        except OSError:
            raise DriverError(FailureReason.SOURCE_CHANGED, f"/{self.prefix}/{self.name} is gone") from None
        try:
            if file_etag(now) != info.validator:
                raise DriverError(FailureReason.SOURCE_CHANGED, f"/{self.prefix}/{self.name} changed")
            if first:
                yield first
            while handle is not None and (chunk := await asyncio.to_thread(handle.read, self.chunk_size)):
                yield chunk
        finally:
            if handle is not None:
                await asyncio.to_thread(handle.close)


def _open_at(download: Download, offset: int, chunk_size: int) -> tuple[IO[bytes] | None, os.stat_result, bytes]:
    """The file's status as opened (what it is now, not at stat time) and its first chunk from
    ``offset``, with the file still open there, or closed (None) if that chunk reached its end: a
    small file is read in one step."""
    handle = download.path.open("rb")
    try:
        handle.seek(offset)
        now = os.fstat(handle.fileno())
        first = handle.read(chunk_size)
        if offset + len(first) < now.st_size:
            return handle, now, first
    except BaseException:
        handle.close()
        raise
    handle.close()
    return None, now, first


class LocalDestination(_Local):
    """A file to publish in this store, uploaded as its owner's resumable upload would be."""

    def __init__(self, lifecycle: Lifecycle, url: str, identity: Identity, *, client: str) -> None:
        super().__init__(lifecycle, url, identity)
        #: Whose share of the store the upload uses (the job's owner).
        self.client = client
        #: The upload as :meth:`open` found or made it (so that this attempt reads it once).
        self._opened: UploadTarget | None = None
        #: The idempotency key :meth:`plan` made (nothing can be registered under it before :meth:`open`).
        self._new_key: str | None = None
        #: The file as :meth:`write` published it.
        self._published: Published | None = None

    def plan(self, handle: Handle, order: Order) -> Handle:
        if "idempotency_key" in handle:
            return dict(handle)
        self._new_key = secrets.token_hex(16)
        return {"idempotency_key": self._new_key, "validator": order.validator}

    async def open(self, handle: Handle, order: Order) -> Handle:
        mount = await self._mount(Action.UPLOAD)
        state = self.lifecycle.state
        key = handle.get("key")
        new_key = self._new_key is not None and handle.get("idempotency_key") == self._new_key
        if key is None and isinstance(handle.get("idempotency_key"), str) and not new_key:
            # Registered by an attempt stopped before it could record the key: found by the intent.
            found = await state.idempotent(self.prefix, self.identity, handle["idempotency_key"])
            if found is not None:
                key = found.key
                handle = {**handle, "key": key}
        if key is not None:
            transfer = await state.get(key)
            usable = (
                transfer is not None
                and handle.get("validator") == order.validator
                and (
                    transfer.state is TransferState.FINISHED
                    or (transfer.state is TransferState.OPEN and transfer.files[0].state is not FileState.CANCELLED)
                )
            )
            if usable:
                assert transfer is not None
                self._opened = UploadTarget(
                    mount, self.identity, transfer, transfer.files[0], self.client, every_digest=True
                )
                return dict(handle)
            await self.discard(handle)
            handle = {"idempotency_key": secrets.token_hex(16), "validator": order.validator}
        manifest = Manifest((ManifestFile(self.name, order.size, order.md5, order.sha256),))
        try:
            registered, refused = await self.lifecycle.register(
                mount, self.identity, self.client, manifest, idempotency_key=handle["idempotency_key"], new_key=new_key
            )
        except DatastoreError as exc:
            raise failure_of(exc) from None
        if registered is None:
            raise DriverError(
                FailureReason.EXISTS if await _published(mount, self.identity, self.name) else FailureReason.FORBIDDEN,
                f"this store refused /{self.prefix}/{refused[0]}",
            )
        if registered.state not in (TransferState.OPEN, TransferState.FINISHED):
            # The transfer registered under this key ended (expired, cancelled): a new key, a new one.
            return await self.open({"key": registered.key, **handle, "validator": None}, order)
        self._opened = UploadTarget(
            mount, self.identity, registered, registered.files[0], self.client, every_digest=True
        )
        return {**handle, "key": registered.key}

    async def _file(self, handle: Handle, *, fresh: bool = False) -> UploadTarget:
        """The upload ``handle`` names: as :meth:`open` left it, or (``fresh``, or not opened by this
        object) as the state has it now."""
        opened = self._opened
        if not fresh and opened is not None and opened.transfer.key == handle.get("key"):
            return opened
        mount = await self._mount(Action.UPLOAD)
        found = await self.lifecycle.state.get_file(handle["key"], 0)
        file = found[1] if found is not None else None
        if found is None or file is None:
            raise DriverError(FailureReason.RESTARTED, "the upload ended; it starts again")
        return UploadTarget(mount, self.identity, found[0], file, self.client, every_digest=True)

    async def offset(self, handle: Handle) -> int:
        target = await self._file(handle)
        file = await self.lifecycle.settled(target)
        if file.state is FileState.PUBLISHED:
            return file.size
        if file.state in (FileState.RELEASED, FileState.CANCELLED):
            return 0
        return file.received

    async def write(self, handle: Handle, offset: int, chunks: AsyncIterator[bytes]) -> int:
        target = await self._file(handle)
        try:
            appended = await self.lifecycle.append_resumable(target, offset, chunks)
        except AlreadyUploaded:
            return target.file.size
        except DatastoreError as exc:
            raise failure_of(exc) from None
        if appended.published is not None:
            published = appended.published
            assert published.md5 is not None and published.sha256 is not None
            self._published = Published(published.size, published.md5, published.sha256)
        return appended.offset

    async def finish(self, handle: Handle) -> Published:
        if self._published is not None and self._opened is not None and self._opened.transfer.key == handle.get("key"):
            return self._published
        target = await self._file(handle, fresh=True)
        file = target.file
        if file.state is not FileState.PUBLISHED or file.md5 is None or file.sha256 is None:
            raise DriverError(FailureReason.SERVER_ERROR, f"/{self.prefix}/{self.name} was not published")
        return Published(file.size, file.md5, file.sha256)

    async def discard(self, handle: Handle) -> None:
        key = handle.get("key")
        if key is not None:
            await self.lifecycle.cancel(key)


async def _published(mount: Mount, identity: Identity, name: str) -> bool:
    """Whether ``name`` is a published file of ``mount`` (a refusal then means it exists)."""
    if mount.describer is None:
        return False
    return await mount.describer.describe_file(identity, name) is not None
