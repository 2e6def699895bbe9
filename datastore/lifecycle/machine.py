"""The lifecycle: the one place where transfers and their files change state.

Registering a manifest, claiming a file, staging its bytes, verifying, publishing, pausing,
interrupting, failing, terminating, cancelling, expiring, reaping the files of a dead process and
announcing deletions are methods here; each stored change is one step of the transition table in
``states.py``, made through the state store (``state/interface.py``), which appends the step's
events in the same transaction. The HTTP adapters (``http/upload.py``, ``http/tus.py``,
``http/api.py``) only translate requests into these calls and their results into responses; nothing
here knows of aiohttp.

An upload holds its file by a lease that it renews while it runs (:meth:`Lifecycle.claimed`); with
other processes sharing the state the same watch lets another process stop it (a cancellation, a
termination, a newer request superseding it). Whatever stops an attempt, :meth:`FileUpload.end`
decides in one place what is kept: a whole-body upload is all or nothing; a resumable one keeps the
bytes that reached the disk, unless the whole file failed verification. An HTTP request so stopped
then raises the error that says why (410 cancelled or expired, 409 taken over), for its client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import metrics
from ..config import Settings
from ..errors import (
    BadRequest,
    ChecksumMismatch,
    ChunkChecksumMismatch,
    Conflict,
    DatastoreError,
    IncompleteUpload,
    InsufficientStorage,
    LengthRequired,
    NotAuthorized,
    NotEnoughSpace,
    OffsetMismatch,
    PathNotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    SizeMismatch,
    TooManyUploads,
    TransferCancelled,
    TransferExpired,
    UploadFileNotFound,
    UploadInProgress,
)
from ..handlers.interface import FileInfo
from ..handlers.mounts import Mount
from ..jobs.states import FailureReason, JobStep
from ..protocol.manifest import Manifest
from ..security.identity import Identity
from ..security.logsafe import redact
from ..state.interface import (
    Claim,
    ClientQuota,
    DuplicateRequest,
    LeaseExpired,
    Signal,
    SignalKind,
    StagedFile,
    StateStore,
    Transfer,
    TransferFile,
)
from ..storage import staging
from ..storage.staging import BufferBudget, Digests
from .digests import Digester, Undigested
from .states import Event, EventType, FileState, NewEvent, StopReason, TransferState

log = logging.getLogger(__name__)

#: Seconds between a running upload's looks at its lease, when other processes share the state.
CLAIM_WATCH_INTERVAL = 0.5
#: How long a request waits for another process's upload it superseded to stop, and how often it looks.
SUPERSEDE_WAIT = 4 * CLAIM_WATCH_INTERVAL + 1.0
SUPERSEDE_POLL = 0.05
#: At most one ``file.progress`` event per file in this many seconds.
PROGRESS_INTERVAL = 1.0

#: Failures that end an attempt, by the reason they give (the first match wins).
_REASONS: tuple[tuple[type[BaseException], StopReason], ...] = (
    (IncompleteUpload, StopReason.CONNECTION_LOST),
    (RequestTimeout, StopReason.TOO_SLOW),
    (SizeMismatch, StopReason.SIZE_MISMATCH),
    (ChecksumMismatch, StopReason.CHECKSUM_MISMATCH),
    (ChunkChecksumMismatch, StopReason.CHUNK_CHECKSUM_MISMATCH),
    (OffsetMismatch, StopReason.OFFSET_MISMATCH),
    (PayloadTooLarge, StopReason.TOO_LARGE),
    (NotEnoughSpace, StopReason.DISK_FULL),
    (InsufficientStorage, StopReason.DISK_FULL),
    (UploadFileNotFound, StopReason.REFUSED),
    (NotAuthorized, StopReason.REFUSED),
    (TransferCancelled, StopReason.CANCELLED),
    (BadRequest, StopReason.BAD_REQUEST),
    (LengthRequired, StopReason.BAD_REQUEST),
    (asyncio.CancelledError, StopReason.CONNECTION_LOST),
    (ConnectionError, StopReason.CONNECTION_LOST),
)


#: How the end of an upload attempt is counted, by the event that announces it.
_UPLOAD_OUTCOMES = {
    EventType.FILE_COMPLETED: "completed",
    EventType.FILE_FAILED: "failed",
    EventType.FILE_INTERRUPTED: "interrupted",
    EventType.FILE_CANCELLED: "cancelled",
}


def holder_id(node: str, pid: int) -> str:
    """Who the process ``pid`` of ``node`` is in the leases it holds (``node:pid``: processes of
    several hosts share the state)."""
    return f"{node}:{pid}"


def stop_reason(exc: BaseException) -> StopReason:
    """Why ``exc`` stopped an upload attempt."""
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return StopReason.BAD_REQUEST if isinstance(exc, DatastoreError) else StopReason.SERVER_ERROR


@dataclass(slots=True)
class RunningUpload:
    """An upload request now writing a file of a transfer, in this process."""

    task: asyncio.Task[Any]
    resumable: bool
    #: Set by whoever cancels the task: TERMINATED (the canceller cleans up), ENDED_ELSEWHERE
    #: (another process ended the lease; only the staging file is left to remove) or SUPERSEDED
    #: (a newer request of the same client takes over; the bytes are kept).
    stop_reason: StopReason | None = None
    #: Set once the file's last byte has arrived: from then on the upload is waited for, never cancelled.
    finishing: bool = False
    #: How many times :meth:`interrupt` cancelled the task (taken back when the request answers why).
    interruptions: int = 0
    #: Set once the upload let go of the file (its attempt ended, its lease released or handed on):
    #: what a stopper waits for, not the end of the request, which still answers its client.
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def interrupt(self, reason: StopReason) -> None:
        """Cancel the request's task for ``reason``."""
        self.stop_reason = reason
        self.interruptions += 1
        self.task.cancel()

    async def stop(self, reason: StopReason) -> None:
        """Stop the request (or, once it is finishing, let it finish) and wait until it let go of the file."""
        if self.task.done() or self.released.is_set():
            return
        if not self.finishing:
            self.interrupt(reason)
        released = asyncio.ensure_future(self.released.wait())
        try:
            await asyncio.wait([released, self.task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            released.cancel()

    def take_back(self) -> bool:
        """Whether the task's cancellation was only this upload's :meth:`interrupt`: then it is taken
        back (the request goes on, to answer why it stopped); False if anyone else cancelled it too."""
        if self.stop_reason is None or not self.interruptions:
            return False
        for _ in range(self.interruptions):
            self.task.uncancel()
        self.interruptions = 0
        return self.task.cancelling() == 0


@dataclass(frozen=True, slots=True)
class Appended:
    """What an append left: the file's new offset, and the file as published if the append published it."""

    offset: int
    published: FileInfo | None = None


#: A file up to this size is hashed both ways as it arrives, whatever its client declared: the second
#: digest costs less inline (about half a millisecond at this size) than computing it after
#: publishing, which rereads the file and takes two more writes of the catalogue and the state.
EVERY_DIGEST_INLINE_UP_TO = 256 << 10


@dataclass(frozen=True, slots=True)
class UploadTarget:
    """The transfer and file an upload names, resolved for one client."""

    mount: Mount
    identity: Identity
    transfer: Transfer
    file: TransferFile
    #: Whose share of the store the upload uses (a proved identity, else the client's network).
    client: str
    #: Compute both digests while the bytes arrive, whatever the client declared (a transfer job's
    #: destination, whose verification compares both with its source's).
    every_digest: bool = False

    @property
    def inline_digests(self) -> tuple[bool, bool]:
        """Which digests (MD5, SHA-256) the upload computes as its bytes arrive: those its
        verification needs (the ones declared) when the handler records the others once they are
        computed after publishing (``digests.py``); else, if asked, or for a small file, both."""
        if self.every_digest or self.mount.digests is None or self.file.size <= EVERY_DIGEST_INLINE_UP_TO:
            return True, True
        return self.file.md5 is not None, self.file.sha256 is not None

    @property
    def place(self) -> tuple[str, int]:
        """(key, num)."""
        return (self.transfer.key, self.file.num)


@dataclass(slots=True)
class Lifecycle:
    """Every transition of the transfers of one store, and what this process knows of its running uploads."""

    settings: Settings
    state: StateStore
    mounts: dict[str, Mount]
    staging_dir: Path
    #: Who this process is in the leases it holds.
    holder: str
    #: Whether other processes share the state (``serve --workers N``): then running uploads watch
    #: their leases often, so that another process can stop them.
    shared: bool = False
    #: Called after every change this process commits (the event bus reads the new events).
    on_change: Callable[[Sequence[Event]], None] = lambda _: None
    buffers: BufferBudget = field(init=False)
    #: Computes the digests of published files that their uploads did not (``digests.py``).
    digester: Digester = field(init=False)
    active_uploads: int = 0
    #: Uploads now running in this process, by client.
    uploads_by_client: Counter[str] = field(default_factory=Counter)
    #: Declared bytes of the uploads now running, counted against free space.
    bytes_in_flight: int = 0
    #: Hash state of resumable uploads, by (key, num), with the number of the claim it was built
    #: under; rebuilt from the staged bytes when missing (after a restart) or stale (another
    #: process appended since).
    digests: dict[tuple[str, int], tuple[int, Digests]] = field(default_factory=dict)
    running: dict[tuple[str, int], RunningUpload] = field(default_factory=dict)
    #: Whether the state signals other processes' changes (:meth:`heard`): then running uploads and
    #: superseding requests wait for a signal instead of looking every CLAIM_WATCH_INTERVAL.
    signalled: bool = False
    #: Who waits for a signal about each file: set when one comes.
    pokes: dict[tuple[str, int], set[asyncio.Event]] = field(default_factory=dict)
    #: When each running upload last announced its progress, and how far it was.
    progress_at: dict[tuple[str, int], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.buffers = BufferBudget(self.settings.upload_buffer_budget // self.settings.chunk_size)
        self.digester = Digester(self)
        self.state.on_appended = self._appended

    def _appended(self, events: Sequence[Event]) -> None:
        """This process committed ``events``: they are counted (here, once, whichever process follows
        them), and the bus reads them now."""
        for event in events:
            metrics.event_emitted(event.type)
            outcome = _UPLOAD_OUTCOMES.get(event.type)
            if outcome is not None:
                metrics.upload_ended(outcome, event.reason or "none")
        self.on_change(events)

    # -- what the store holds ---------------------------------------------------------------

    def staging_path(self, key: str, num: int) -> Path:
        """Where the bytes of file ``num`` of transfer ``key`` are staged."""
        return self.staging_dir / f"{key}.{num}.part"

    def mount(self, prefix: str) -> Mount:
        """The mount of ``prefix``; PathNotFound (404) if there is none."""
        try:
            return self.mounts[prefix]
        except KeyError:
            raise PathNotFound() from None

    @property
    def quota(self) -> ClientQuota:
        """What one client's open transfers may hold at once."""
        settings = self.settings
        return ClientQuota(
            settings.max_transfers_per_client,
            settings.max_reserved_names_per_client,
            settings.max_reserved_bytes_per_client,
        )

    async def check_quota(self, client: str, names: int, size: int) -> None:
        """QuotaExceeded (429) unless ``client`` may open one more transfer of ``names`` files and ``size`` bytes."""
        self.quota.check(await self.state.holdings(client), names, size)

    @contextlib.contextmanager
    def upload_slot(self, size: int, client: str) -> Iterator[None]:
        """Count one running upload of ``size`` bytes for ``client``: 429 when the client already runs as
        many as it may, 503 when the store runs as many as it may."""
        limit = self.settings.max_uploads_per_client
        if self.uploads_by_client[client] >= limit:
            raise TooManyUploads(f"you are running {limit} uploads, as many as one client may at once")
        if self.active_uploads >= self.settings.max_concurrent_uploads:
            raise ServiceUnavailable()
        self.active_uploads += 1
        self.uploads_by_client[client] += 1
        self.bytes_in_flight += size
        metrics.upload_started()
        try:
            yield
        finally:
            metrics.upload_stopped()
            self.active_uploads -= 1
            self.bytes_in_flight -= size
            self.uploads_by_client[client] -= 1
            if not self.uploads_by_client[client]:
                del self.uploads_by_client[client]

    async def check_space(self) -> None:
        """405 when the running uploads would not leave the configured margin free."""
        usage = await asyncio.to_thread(shutil.disk_usage, self.staging_dir)
        if usage.free - self.settings.min_free_bytes < self.bytes_in_flight:
            raise NotEnoughSpace()

    # -- registering ------------------------------------------------------------------------

    async def register(
        self,
        mount: Mount,
        identity: Identity,
        client: str,
        manifest: Manifest,
        upload_metadata: str | None = None,
        idempotency_key: str | None = None,
        new_key: bool = False,
    ) -> tuple[Transfer | None, list[str]]:
        """Gate ``manifest`` through the handler and register it: (transfer, []) or (None, refused names).

        ``client`` is whose quota it counts against; ``upload_metadata``: a tus creation's header,
        kept with the file as sent. Raises QuotaExceeded (429) if the client's open transfers would
        hold more than its share, InsufficientStorage (507) if the declared sizes do not fit in the
        free space less what open transfers may still write and the margin.

        With an ``idempotency_key`` (a known identity's; an anonymous client's is ignored), a manifest
        sent again, say after its answer was lost, finds the transfer registered the first time,
        in whatever state it is now; the same key with other files is a Conflict (409). ``new_key``:
        the caller made the key itself just now, so nothing can be registered under it yet (it is
        not looked up first).
        """
        mount.authorize_names(identity, [f.name for f in manifest.files])
        if idempotency_key is not None and not identity.anonymous:
            found = None if new_key else await self._idempotent(mount, identity, manifest, idempotency_key)
            if found is not None:
                return found, []
        else:
            idempotency_key = None
        # Checked again where the transfer is inserted; this first look spares the handler's work.
        await self.check_quota(client, len(manifest.files), manifest.total_size)
        usage = await asyncio.to_thread(shutil.disk_usage, self.staging_dir)
        # What the open transfers may still write is counted where the transfer is inserted.
        space = usage.free - self.settings.min_free_bytes
        if manifest.total_size > space:
            raise InsufficientStorage(f"{manifest.total_size} bytes declared, {max(0, space)} available")
        infos = [FileInfo(f.name, f.size, f.md5, f.sha256) for f in manifest.files]
        # Reserving and recording go to their end together, even for a caller cancelled meanwhile (a
        # client gone, a job paused): cut between the two, a reservation would hold its names for no
        # transfer. A caller cancelled meanwhile leaves a transfer that expires, or that its
        # idempotency key finds again.
        return await staging.uncancellable(
            self._reserve_and_create(mount, identity, client, manifest, infos, upload_metadata, idempotency_key, space)
        )

    async def _reserve_and_create(
        self,
        mount: Mount,
        identity: Identity,
        client: str,
        manifest: Manifest,
        infos: list[FileInfo],
        upload_metadata: str | None,
        idempotency_key: str | None,
        space: int,
    ) -> tuple[Transfer | None, list[str]]:
        async with mount.lock:
            reserved: list[FileInfo] = []
            if mount.reserver is not None:
                refused = await mount.reserver.reserve_many(identity, infos)
                if refused:
                    return None, refused
                reserved = list(infos)
            else:
                refused = [info.name for info in infos if not await mount.handler.can_upload(identity, info)]
                if refused:
                    return None, refused
            try:
                for info in infos[len(reserved) :]:
                    await mount.handler.add_pending_upload(identity, info)
                    reserved.append(info)
                transfer = await self.state.create(
                    mount.prefix,
                    identity,
                    manifest.files,
                    lifetime=self.settings.key_lifetime,
                    now=time.time(),
                    upload_metadata=upload_metadata,
                    client=client,
                    quota=self.quota,
                    idempotency_key=idempotency_key,
                    space=space,
                )
            except BaseException as exc:
                for info in reserved:
                    await _quietly(mount.handler.cancel_upload(identity, info), "cancel_upload")
                if isinstance(exc, DuplicateRequest) and idempotency_key is not None:
                    # The same request, registered meanwhile by another process.
                    return await self._idempotent(mount, identity, manifest, idempotency_key), []
                raise
        return transfer, []

    async def _idempotent(
        self, mount: Mount, identity: Identity, manifest: Manifest, idempotency_key: str
    ) -> Transfer | None:
        found = await self.state.idempotent(mount.prefix, identity, idempotency_key)
        if found is not None and [(f.name, f.size) for f in found.files] != [(f.name, f.size) for f in manifest.files]:
            raise Conflict("this Idempotency-Key was sent with other files")
        return found

    # -- uploading --------------------------------------------------------------------------

    @asynccontextmanager
    async def claimed(
        self, target: UploadTarget, *, resumable: bool, answer_stops: bool = False
    ) -> AsyncIterator[FileUpload]:
        """Take an upload slot and the file's lease for the current request.

        While inside, the request's task is registered as the file's running upload, so that a
        cancellation, termination or expiry can stop it, and a watch renews the lease (and, with
        other processes sharing the state, lets their requests stop it too). Such a stop cancels
        the task; with ``answer_stops`` (an HTTP request, which has a client to tell) the
        cancellation is taken back once the attempt ended and the stop is raised as the error that
        says why (:meth:`_stopped_answer`); without (a transfer job) it stays a cancellation.
        """
        place = target.place
        # Watched from before the claim: a signal that comes while it is made is not missed.
        with self.upload_slot(target.file.size, target.client), self._watching(place) as poke:
            claiming = asyncio.ensure_future(self._claim(place))
            try:
                claim = await asyncio.shield(claiming)
            except asyncio.CancelledError:
                # Cancelled while the claim ran in the database thread: give it back, or the file
                # would stay "uploading" until its lease ran out.
                with contextlib.suppress(Exception):
                    taken = await claiming
                    await staging.uncancellable(
                        self.state.restore(*place, self.holder, released=taken.before.state is FileState.RELEASED)
                    )
                raise
            cached = self.digests.get(place)
            if cached is not None:
                # This process's hash state stays good only if no other request claimed the file since.
                if cached[0] == claim.number - 1:
                    self.digests[place] = (claim.number, cached[1])
                else:
                    del self.digests[place]
            task = asyncio.current_task()
            assert task is not None
            running = RunningUpload(task, resumable)
            self.running[place] = running
            self.progress_at[place] = time.monotonic()
            watch = asyncio.create_task(self._keep_lease(place, running, poke))
            try:
                try:
                    yield FileUpload(self, target, claim.before, claim.number, running)
                finally:
                    watch.cancel()
                    if self.running.get(place) is running:
                        del self.running[place]
                        self.progress_at.pop(place, None)
                    running.released.set()
            except asyncio.CancelledError:
                # Stopped from elsewhere (a cancellation, a termination, expiry, a newer request): a
                # request that answers stops (``answer_stops``) says why instead of vanishing, which its
                # client, or a balancer in front of this node, could only take for a crash.
                if not answer_stops or not running.take_back():
                    raise
                raise await self._stopped_answer(place, running.stop_reason) from None

    async def _stopped_answer(self, place: tuple[str, int], reason: StopReason | None) -> DatastoreError:
        """Why an upload stopped from elsewhere ended, as its request answers it: 409 when a newer request
        took it over (SUPERSEDED, or another holder has it now); 410 when its transfer was cancelled or
        expired, or the file terminated (as the state now has it)."""
        if reason is StopReason.SUPERSEDED:
            return UploadInProgress("a newer request took the upload over")
        found = await self.state.get_file(*place)
        transfer, file = found if found is not None else (None, None)
        if transfer is not None and transfer.state is TransferState.EXPIRED:
            return TransferExpired()
        if transfer is None or transfer.state is TransferState.CANCELLED:
            return TransferCancelled()
        if file is not None and file.state is FileState.CANCELLED:
            return TransferCancelled("this upload was terminated")
        return UploadInProgress("another request took the upload over")

    async def append_resumable(
        self,
        target: UploadTarget,
        claimed_offset: int,
        chunks: AsyncIterator[bytes],
        *,
        length: int | None = None,
        checksum: tuple[Any, bytes] | None = None,
        answer_stops: bool = False,
    ) -> Appended:
        """Append ``chunks`` (``length`` bytes, if known) to the file at ``claimed_offset``: the new
        offset (and the published file, if it was the last byte). ``checksum``: a hash object and the
        digest the chunk must have (tus Upload-Checksum).

        When the last byte arrives the file is verified and published. A failure keeps the bytes that
        reached the disk (except a chunk whose checksum did not match, which is cut off); only a failed
        verification of the whole file discards the upload and releases its reservation. A tus PATCH
        and a transfer job's local destination both append this way (``answer_stops``: see :meth:`claimed`).
        """
        await self.supersede(target.place)
        async with self.claimed(target, resumable=True, answer_stops=answer_stops) as upload:
            received = upload.resumed_at
            finishing = False
            digests: Digests | None = None
            try:
                if not upload.reserved:
                    await upload.regate()
                if claimed_offset != received:
                    raise OffsetMismatch(f"the upload is at byte {received}, not {claimed_offset}")
                if length is not None and received + length > target.file.size:
                    raise PayloadTooLarge(f"{received} + {length} bytes is more than Upload-Length {target.file.size}")
                path = await upload.upload_path()
                await self.check_space()
                digests = await upload.digests_at(received)
                # A request that cannot end the file is answered before its bytes are durable (they
                # are made so in the background, and the next request waits for that): the client's
                # next request overlaps the flush. The one that ends it is durable before it publishes.
                ends = length is None or received + length >= target.file.size
                await upload.append_chunk(chunks, digests, checksum, flush_late=not ends)
                if digests.offset < target.file.size:
                    await upload.pause(digests.offset)
                    return Appended(digests.offset)
                finishing = True
                try:
                    published = await upload.finish(digests, path)
                except ChecksumMismatch:
                    raise ChunkChecksumMismatch("the whole file does not match the declared checksum") from None
                return Appended(digests.offset, published)
            except BaseException as exc:
                offset = digests.offset if digests is not None else received
                await upload.end(exc, resumable=True, finishing=finishing, offset=offset)
                raise

    async def _claim(self, place: tuple[str, int]) -> Claim:
        lease = self.settings.lease_time
        try:
            return await self.state.claim(*place, self.holder, lease=lease, now=time.time())
        except LeaseExpired as expired:
            # Its holder is gone: what it staged is reconciled with the disk, then the file is free.
            await self.reap(expired.staged)
            return await self.state.claim(*place, self.holder, lease=lease, now=time.time())

    async def _keep_lease(self, place: tuple[str, int], running: RunningUpload, poke: asyncio.Event) -> None:
        """Renew the lease while ``running`` runs, and stop it when another process ends the lease
        or asks it to stop.

        A file no longer UPLOADING under this holder's lease was terminated, cancelled or expired
        elsewhere, and that process cleans up (ENDED_ELSEWHERE); a stop request SUPERSEDED comes
        from a newer request of the same client in another process, and only a resumable upload
        heeds it. With signals the watch looks when one comes for the file (``poke``), else every
        CLAIM_WATCH_INTERVAL when others share the state.
        """
        lease = self.settings.lease_time
        renewed = time.monotonic()
        while not running.task.done():
            if self.signalled:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, renewed + lease / 3 - time.monotonic())):
                        await poke.wait()
                poke.clear()
            else:
                await asyncio.sleep(CLAIM_WATCH_INTERVAL if self.shared else lease / 3)
            try:
                if time.monotonic() - renewed >= lease / 3:
                    status = await self.state.renew(*place, self.holder, lease=lease, now=time.time())
                    renewed = time.monotonic()
                else:
                    status = await self.state.status(*place)
            except Exception:
                log.exception("renewing the lease of an upload failed")
                continue
            if running.finishing:
                return
            if status is None or status.state is not FileState.UPLOADING or status.holder != self.holder:
                running.interrupt(StopReason.ENDED_ELSEWHERE)
                return
            if status.stop_request == StopReason.SUPERSEDED and running.resumable:
                running.interrupt(StopReason.SUPERSEDED)
                return

    @contextlib.contextmanager
    def _watching(self, place: tuple[str, int]) -> Iterator[asyncio.Event]:
        """An event set whenever a signal about file ``place`` comes, while inside."""
        poke = asyncio.Event()
        self.pokes.setdefault(place, set()).add(poke)
        try:
            yield poke
        finally:
            waiting = self.pokes.get(place)
            if waiting is not None:
                waiting.discard(poke)
                if not waiting:
                    del self.pokes[place]

    def heard(self, signal: Signal) -> None:
        """Another process (or this one) changed the state: wake whoever waits for a file it names
        (everyone, if signals may have been missed)."""
        if signal.kind is SignalKind.FILE and signal.subject is not None and signal.num is not None:
            places = [(signal.subject, signal.num)]
        elif signal.kind is SignalKind.MISSED:
            places = list(self.pokes)
        else:
            return
        for place in places:
            for poke in self.pokes.get(place, ()):
                poke.set()

    async def supersede(self, place: tuple[str, int]) -> None:
        """Stop an older resumable request for the same upload that is still hanging.

        One that is already verifying and publishing the complete file is waited for instead; the
        newer request then finds the file published (409).
        """
        running = self.running.get(place)
        if running is not None:
            if running.resumable:
                await running.stop(StopReason.SUPERSEDED)
            return
        if not self.shared:
            return
        # Another process may hold the lease: ask it to stop, and wait (bounded) until it has:
        # for its signal, or looking every SUPERSEDE_POLL without signals.
        with self._watching(place) as poke:
            holder = await self.state.request_stop(*place, StopReason.SUPERSEDED)
            if holder is None or holder == self.holder:
                return
            loop = asyncio.get_running_loop()
            deadline = loop.time() + SUPERSEDE_WAIT
            while loop.time() < deadline:
                if self.signalled:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(deadline - loop.time()):
                            await poke.wait()
                    poke.clear()
                else:
                    await asyncio.sleep(SUPERSEDE_POLL)
                status = await self.state.status(*place)
                if status is None or status.state is not FileState.UPLOADING or status.holder != holder:
                    return
        # Still held (a whole-body upload, or one publishing): the claim answers 409.

    async def progress(self, upload: FileUpload, received: int) -> None:
        """Announce how far ``upload`` got, at most once every PROGRESS_INTERVAL."""
        now = time.monotonic()
        if now - self.progress_at.get(upload.place, now) < PROGRESS_INTERVAL:
            return
        self.progress_at[upload.place] = now
        transfer, file = upload.transfer, upload.file
        event = NewEvent(
            EventType.FILE_PROGRESS,
            transfer.prefix,
            transfer.key,
            file.num,
            file.name,
            transfer.owner.dn,
            transfer.owner.principal,
            bytes=received,
            size=file.size,
        )
        try:
            await self.state.append([event], now=time.time())
        except Exception:
            log.exception("recording the progress of an upload failed")

    # -- stopping uploads: cancel, terminate, expire, reap -----------------------------------

    async def cancel(self, key: str) -> bool:
        """Cancel an open transfer: False if it was not open."""
        ended = await self.state.cancel(key, now=time.time())
        if ended is None:
            return False
        await self._discard(ended.transfer, ended.files)
        log.info("transfer %s… for /%s cancelled", key[:8], ended.transfer.prefix)
        return True

    async def terminate(self, transfer: Transfer, num: int) -> None:
        """tus termination of one file: its staged bytes go, its reservation is released."""
        before = await self.state.terminate(transfer.key, num)
        await self._discard(transfer, (before,))
        log.info("upload %s…/%d of /%s terminated", transfer.key[:8], num, transfer.prefix)

    async def expire(self, now: float | None = None) -> int:
        """Expire every transfer past its lifetime (or never started in time) and release it. Returns
        how many expired."""
        now = time.time() if now is None else now
        expired = await self.state.expire_due(now, self.settings.start_timeout)
        for ended in expired:
            log.info("transfer %s… for /%s expired", ended.transfer.key[:8], ended.transfer.prefix)
            await self._discard(ended.transfer, ended.files)
        return len(expired)

    async def sweep(self, now: float | None = None) -> int:
        """The periodic work: expire transfers, reap files whose lease ran out, forget old records
        and events. Returns how many transfers expired."""
        now = time.time() if now is None else now
        expired = await self.expire(now)
        for staged in await self.state.expired_leases(now):
            await self.reap(staged)
        await self.release_orphaned_names(now)
        await self.state.purge(now - self.settings.transfer_retention)
        await self.state.purge_jobs(now - self.settings.job_retention)
        await self.state.prune_events(now - self.settings.event_retention)
        return expired

    async def release_orphaned_names(self, now: float) -> int:
        """Release the names reserved more than ``lease_time`` ago that no open transfer holds. Reserving
        a manifest's names (the handler's catalogue) and recording its transfer (the state) are two
        transactions: a process that died between them left the names reserved for nothing, and the
        manifest sent again would be refused them forever. Returns how many were released."""
        released = 0
        for mount in list(self.mounts.values()):
            if mount.reclaimer is None:
                continue
            names = await mount.reclaimer.reserved_before(now - self.settings.lease_time)
            if not names:
                continue
            held = await self.state.open_names(mount.prefix, names)
            for name in names:
                if name not in held:
                    log.info("releasing /%s/%s: reserved for a transfer that was never recorded", mount.prefix, name)
                    await mount.reclaimer.release_reservation(name)
                    released += 1
        return released

    async def _discard(self, transfer: Transfer, files: tuple[TransferFile, ...] | list[TransferFile]) -> None:
        """Stop ``files`` of a transfer the state has just ended, and release them.

        Running uploads of these files in this process are cancelled and waited for (one already
        publishing is let finish); their staged bytes are removed; the handler's reservations are
        cancelled.
        """
        places = [(transfer.key, f.num) for f in files]
        await asyncio.gather(*(self.running[p].stop(StopReason.TERMINATED) for p in places if p in self.running))
        for place in places:
            self.digests.pop(place, None)
        await staging.discard(self.staging_path(*place) for place in places)
        mount = self.mounts.get(transfer.prefix)
        if mount is None:
            return
        for file in files:
            if file.state in (FileState.RESERVED, FileState.UPLOADING):
                info = FileInfo(file.name, file.size, file.md5, file.sha256)
                await _quietly(mount.handler.cancel_upload(transfer.owner, info), "cancel_upload")

    async def reap(self, staged: StagedFile) -> bool:
        """A file's holder is gone (its lease ran out, or its process died): keep what it really staged."""
        if staged.holder is None:
            return False
        offsets = await asyncio.to_thread(
            staging.reconcile_files, self.staging_dir, {(staged.key, staged.num): (staged.received, staged.verifying)}
        )
        received = offsets[(staged.key, staged.num)]
        if received == 0 and await self._published_by(staged.key, staged.num, staged.holder):
            log.info(
                "the upload %s…/%d held by %s was published before it died", staged.key[:8], staged.num, staged.holder
            )
            return True
        reaped = await self.state.reap(staged.key, staged.num, staged.holder, received=received, now=time.time())
        if reaped:
            log.info(
                "the upload %s…/%d held by %s was left: it resumes from byte %d",
                staged.key[:8],
                staged.num,
                staged.holder,
                received,
            )
        return reaped

    async def _published_by(self, key: str, num: int, holder: str) -> bool:
        """Whether ``holder`` had published the file in the handler's catalogue (its staged bytes moved into
        place), then died before recording it in the state (``FileUpload.finish``: two transactions, where the
        catalogue is not in the state's database):
        then the publish is recorded now, for it, with the digests it verified."""
        found = await self.state.get_file(key, num)
        file = found[1] if found is not None else None
        if found is None or file is None:
            return False
        transfer = found[0]
        mount = self.mounts.get(transfer.prefix)
        if mount is None or mount.describer is None:
            return False
        record = await mount.describer.describe_file(transfer.owner, file.name)
        if (
            record is None
            or record.size != file.size
            or record.owner_id != transfer.owner.principal
            or record.uploaded_at < transfer.created_at
            or (file.md5 is not None and record.md5 != file.md5)
            or (file.sha256 is not None and record.sha256 != file.sha256)
        ):
            return False
        return await self.state.publish(key, num, holder, md5=record.md5, sha256=record.sha256)

    async def settled(self, target: UploadTarget) -> TransferFile:
        """``target``'s file as it stands once a lease that ran out is reaped (so that its offset is
        what its dead holder really staged)."""
        if target.file.state is not FileState.UPLOADING:
            return target.file
        for staged in await self.state.expired_leases(time.time()):
            if (staged.key, staged.num) == target.place:
                await self.reap(staged)
                found = await self.state.get_file(*target.place)
                if found is not None and found[1] is not None:
                    return found[1]
        return target.file

    async def recover_holder(self, holder: str) -> int:
        """A process that held leases died: end them now, keeping what its uploads really staged.
        Returns how many uploads it was running."""
        reaped = 0
        for staged in await self.state.claims_of(holder):
            reaped += await self.reap(staged)
        return reaped + await self._release_job_files(holder)

    async def _release_job_files(self, holder: str | None) -> int:
        """The transfer-job files ``holder`` (None: any process) was copying go back to the queue; the
        bytes their destinations hold are kept for the next attempt."""
        released = 0
        for job_id, index, owner in await self.state.held_by(holder):
            ended = await self.state.end_attempt(
                job_id,
                index,
                owner,
                JobStep.REQUEUE,
                now=time.time(),
                bytes=None,
                reason=FailureReason.RESTARTED,
                error="the store restarted",
            )
            released += ended is not None
        return released

    async def recover(self) -> None:
        """At the start of the only process using the state: no upload is running; the staged bytes
        of open transfers are kept.

        Each live staging file keeps what is really on disk (fsync'd), a chunk still awaiting its
        checksum is cut back, and the state records the resulting offsets; staging files of nothing
        live are removed. The uploads the stop cut short are reaped as a dead process's are, so each
        is announced (``file.interrupted``, with the bytes kept) before its client resumes it.
        """
        interrupted = 0
        for staged in await self.state.staged_files():
            if staged.holder is not None:
                interrupted += await self.reap(staged)
        # What is left: a file some stopped process had begun publishing (its transfer ended meanwhile).
        interrupted += await self.state.recover()
        if copies := await self._release_job_files(None):
            log.info("%d transfer-job file(s) were being copied at the stop; they go on from their offsets", copies)
        live = {(f.key, f.num): (f.received, f.verifying) for f in await self.state.staged_files()}
        offsets = await asyncio.to_thread(staging.reconcile, self.staging_dir, live)
        for (key, num), offset in offsets.items():
            if offset != live[(key, num)][0]:
                await self.state.set_received(key, num, offset)
        if interrupted:
            log.info("%d upload(s) were interrupted by a stop; they resume from the staged bytes", interrupted)

    # -- published files ----------------------------------------------------------------------

    async def deleted(self, mount: Mount, name: str, owner: str | None, owner_id: str | None, size: int | None) -> None:
        """Announce that a published file was deleted."""
        event = NewEvent(EventType.FILE_DELETED, mount.prefix, name=name, owner=owner, owner_id=owner_id, size=size)
        await self.state.append([event], now=time.time())


class FileUpload:
    """One claimed upload attempt of one file: everything between the claim and the answer."""

    def __init__(
        self, lifecycle: Lifecycle, target: UploadTarget, before: TransferFile, claim: int, running: RunningUpload
    ) -> None:
        self.lifecycle = lifecycle
        self.mount = target.mount
        self.identity = target.identity
        self.transfer = target.transfer
        self.file = target.file
        self.before = before
        #: The number of this request's claim on the file (see ``Lifecycle.digests``).
        self.claim = claim
        self.running = running
        self.inline_digests = target.inline_digests
        self.info = FileInfo(self.file.name, self.file.size, self.file.md5, self.file.sha256)
        #: Whether the handler holds a reservation this upload answers for.
        self.reserved = before.state is FileState.RESERVED
        self.staging_path = lifecycle.staging_path(self.transfer.key, self.file.num)
        self._published: Path | None = None

    @property
    def place(self) -> tuple[str, int]:
        """(key, num)."""
        return (self.transfer.key, self.file.num)

    @property
    def resumed_at(self) -> int:
        """The offset this attempt starts from: the staged bytes, unless an earlier attempt failed."""
        return self.before.received if self.reserved else 0

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

    async def digests_at(self, offset: int) -> Digests:
        """The hash state of the first ``offset`` staged bytes: cached, or re-hashed after a restart."""
        cache = self.lifecycle.digests
        cached = cache.get(self.place)
        if cached is not None and cached[1].offset == offset:
            return cached[1]
        if offset == 0:
            digests = self.new_digests()
        else:
            md5, sha256 = self.inline_digests
            digests = await staging.rehash(self.staging_path, offset, md5=md5, sha256=sha256)
        cache[self.place] = (self.claim, digests)
        return digests

    def new_digests(self) -> Digests:
        """Digests of no bytes yet, of the kinds this upload computes inline."""
        md5, sha256 = self.inline_digests
        return Digests.inline(md5=md5, sha256=sha256)

    async def begin_chunk(self, *, verifying: bool) -> None:
        """A resumable request starts appending; whether its chunk is checksummed (a crash cuts its
        unverified bytes off)."""
        await self.lifecycle.state.begin_chunk(*self.place, verifying=verifying)

    async def track(self, chunks: AsyncIterator[bytes], offset: int) -> AsyncIterator[bytes]:
        """``chunks`` (appended at ``offset``), announcing progress; once the file's last byte has
        arrived the upload is finishing.

        From then on a newer request (or a cancellation) waits for it to verify and publish the
        file instead of stopping it: stopped there, it would leave every byte staged and the file
        unpublished, while HEAD answers that the upload is complete.
        """
        async for chunk in chunks:
            offset += len(chunk)
            if offset >= self.file.size:
                self.running.finishing = True
            yield chunk
            await self.lifecycle.progress(self, offset)

    async def append(
        self, chunks: AsyncIterator[bytes], digests: Digests, *, chunk_hash: Any = None, flush_late: bool = False
    ) -> None:
        """Stage ``chunks`` at ``digests.offset`` (see :func:`staging.append`)."""
        settings = self.lifecycle.settings
        await staging.append(
            self.track(chunks, digests.offset),
            self.staging_path,
            digests,
            limit=self.file.size,
            chunk_size=settings.chunk_size,
            fsync=settings.fsync,
            chunk_hash=chunk_hash,
            budget=self.lifecycle.buffers,
            flush_late=flush_late,
        )

    async def append_chunk(
        self,
        chunks: AsyncIterator[bytes],
        digests: Digests,
        checksum: tuple[Any, bytes] | None,
        *,
        flush_late: bool = False,
    ) -> None:
        """Stage one resumable request's ``chunks``; with a ``checksum`` (hash, expected digest) the chunk
        is cut off again unless it matches (ChunkChecksumMismatch). ``flush_late``: see :func:`staging.append`."""
        chunk_hash, expected = checksum if checksum is not None else (None, b"")
        before = digests.copy() if chunk_hash is not None else None
        if chunk_hash is not None:
            # Only a checksummed chunk is marked (a crash cuts it off): every claim starts unmarked.
            await self.begin_chunk(verifying=True)
        try:
            await self.append(chunks, digests, chunk_hash=chunk_hash, flush_late=flush_late)
        except staging.ReadFailed as failure:
            if before is not None:
                await staging.uncancellable(self._roll_back(digests, before))
            raise failure.cause from None
        except BaseException:
            if before is not None:
                await staging.uncancellable(self._roll_back(digests, before))
            raise
        if chunk_hash is not None and before is not None and chunk_hash.digest() != expected:
            await staging.uncancellable(self._roll_back(digests, before))
            raise ChunkChecksumMismatch()

    async def _roll_back(self, digests: Digests, before: Digests) -> None:
        await staging.truncate(self.staging_path, before.offset, self.lifecycle.settings.fsync)
        digests.restore(before)

    async def finish(self, digests: Digests, path: Path) -> FileInfo:
        """Verify the staged file against the manifest, publish it, record it."""
        self.running.finishing = True
        if digests.offset != self.file.size:
            raise SizeMismatch(f"received {digests.offset} bytes, the manifest declares {self.file.size}")
        md5, sha256 = digests.hexdigests()
        if (self.file.md5 is not None and md5 != self.file.md5) or (
            self.file.sha256 is not None and sha256 != self.file.sha256
        ):
            raise ChecksumMismatch()
        state, holder = self.lifecycle.state, self.lifecycle.holder
        if not await staging.uncancellable(state.begin_publish(*self.place, holder)):
            raise TransferCancelled("the upload was cancelled")
        with staging.disk_full_refused():  # publishing copies when staging is on another filesystem
            await staging.uncancellable(
                asyncio.to_thread(staging.publish, self.staging_path, path, self.lifecycle.settings.fsync)
            )
        self._published = path
        verified = FileInfo(self.file.name, digests.offset, md5, sha256)
        # The handler's record of the file commits with the state's where they share a database.
        with state.publishing_together():
            await self.mount.handler.complete_upload(self.identity, verified)
            published = await staging.uncancellable(state.publish(*self.place, holder, md5=md5, sha256=sha256))
        if not published:
            # The lease was lost meanwhile (this process stalled past it): the file is not ours to publish.
            raise TransferCancelled("the upload's hold on the file ran out before it was published")
        self.lifecycle.digests.pop(self.place, None)
        log.info("published /%s/%s (%d bytes) for %s", self.mount.prefix, self.file.name, self.file.size, self.identity)
        if md5 is None or sha256 is None:
            self.lifecycle.digester.submit(Undigested(self.mount.prefix, self.file.name, *self.place))
        return verified

    async def pause(self, received: int) -> None:
        """A resumable request ends as planned with ``received`` bytes staged; the client goes on later."""
        lifecycle = self.lifecycle
        await lifecycle.progress(self, received)
        if not await lifecycle.state.pause(*self.place, lifecycle.holder, received=received):
            if await self._ended_elsewhere():
                raise TransferCancelled("the upload was cancelled meanwhile")
            raise UploadInProgress("another request took the upload over")

    async def end(self, exc: BaseException, *, resumable: bool, finishing: bool = False, offset: int = 0) -> None:
        """The attempt failed with ``exc``: the one place that decides what is kept.

        Nothing to do for an upload stopped by a termination (whose caller cleans up); only the
        staging file to remove when another process ended the lease. A whole-body upload, a
        resumable one whose complete file failed (``finishing``), or one the handler or the disk
        refused, is undone: staged and published bytes removed, the reservation cancelled, the
        file RELEASED. A resumable upload that failed otherwise keeps its ``offset`` bytes staged.
        A failure while undoing is logged, so that the client still hears why its upload failed.
        """
        try:
            await staging.uncancellable(self._end(exc, resumable=resumable, finishing=finishing, offset=offset))
        except Exception:
            log.exception("cleaning up after a failed upload failed")

    async def _end(self, exc: BaseException, *, resumable: bool, finishing: bool, offset: int) -> None:
        lifecycle = self.lifecycle
        if self.running.stop_reason is StopReason.TERMINATED:
            return
        if self.running.stop_reason is StopReason.ENDED_ELSEWHERE:
            await self._ended_elsewhere()
            return
        reason = self.running.stop_reason or stop_reason(exc)
        message = exc.message if isinstance(exc, DatastoreError) else repr(exc)
        if not resumable or finishing or isinstance(exc, UploadFileNotFound | NotEnoughSpace):
            # A full disk is relieved of what the upload staged: the client starts again later.
            level = logging.INFO if isinstance(exc, DatastoreError) else logging.WARNING
            log.log(level, "upload of %r to /%s failed: %s", self.file.name, self.mount.prefix, redact(message))
            lifecycle.digests.pop(self.place, None)
            paths = [self.staging_path] + ([self._published] if self._published is not None else [])
            await staging.discard(paths)
            if self.reserved:
                await _quietly(self.mount.handler.cancel_upload(self.identity, self.info), "cancel_upload")
            await lifecycle.state.fail(*self.place, lifecycle.holder, reason=reason, message=message)
        elif not self.reserved:
            # Re-gating failed: the file stays released.
            await lifecycle.state.fail(*self.place, lifecycle.holder, reason=reason, message=message)
        elif reason is StopReason.OFFSET_MISMATCH:
            # Refused before a byte was read: the attempt goes on with the client's next request.
            if not await lifecycle.state.pause(*self.place, lifecycle.holder, received=offset):
                await self._ended_elsewhere()
        elif not await lifecycle.state.interrupt(*self.place, lifecycle.holder, received=offset, reason=reason):
            await self._ended_elsewhere()

    async def _ended_elsewhere(self) -> bool:
        """Another process ended the file while this attempt held it (its transfer cancelled, the file
        terminated or expired there): that process removed the staging file, perhaps before this attempt
        wrote its last bytes, which go now. A file another request took over (this process stalled past
        its lease, which ran out) is left to it. Whether the file was ended."""
        self.lifecycle.digests.pop(self.place, None)
        status = await self.lifecycle.state.status(*self.place)
        if status is not None and status.state is not FileState.CANCELLED:
            return False
        await staging.discard([self.staging_path])
        return True


async def _quietly(call: Awaitable[None], what: str) -> None:
    """Run a handler callback during cleanup; a failure there is logged, not raised."""
    try:
        await call
    except Exception:
        log.exception("%s failed during cleanup", what)
