"""The state store: the one interface through which transfers, their files, leases and the event
log are persisted, as ``typing.Protocol``s with written contracts and typed records.

A backend (SQLite: ``sqlite.py``; PostgreSQL: ``postgres.py``) is whatever passes the contract suite
(``tests/test_state_contract.py``). The contracts every method keeps:

- **Atomic.** Each method is one transaction: it happens whole or not at all, and two callers (in
  one process, in several processes or on several hosts) never both win a conflict.
- **Guarded by the table.** A file changes state only along ``lifecycle.states.FILE_TRANSITIONS``;
  a method whose file is not in a state its step may leave changes nothing (and says so).
- **Announced in the same transaction.** Each transition appends the events
  ``lifecycle.states.events_of`` gives for it, so the log never misses a committed change and
  never holds one that was rolled back. Event ids grow in commit order.
- **Leases, not locks.** An upload holds a file by a lease (holder id and expiry) that it renews
  while it works; a lease that ran out is anybody's to reap, so a dead process frees its files by
  itself. A lease until ``t`` has run out at ``t`` (for files and named leases alike).
- **Signals, where the backend has them.** A backend shared by several hosts tells every process
  what the others changed as they commit it (:class:`Signal`, by :meth:`StateStore.listen`), so that
  followers wait instead of polling; one without them (SQLite) says so, and its followers look
  every poll interval.
- **Time is given.** Methods that compare against the clock take ``now``, so the contract suite
  tests expiry without waiting. The events a transition appends are stamped with the clock at
  commit, whatever ``now`` says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ..errors import QuotaExceeded
from ..lifecycle.states import Event, FileState, NewEvent, StopReason, TransferState
from ..protocol.manifest import ManifestFile
from ..security.identity import Identity
from .jobs import JobStore


@dataclass(frozen=True, slots=True)
class TransferFile:
    """One file of a transfer; digests are the declared ones until published."""

    num: int
    name: str
    size: int
    md5: str | None
    sha256: str | None
    state: FileState
    received: int = 0
    error: str | None = None
    updated_at: float = 0.0
    #: The Upload-Metadata of the tus creation request, as sent; None for a manifest's files.
    upload_metadata: str | None = None

    def public_state(self, transfer_state: TransferState) -> str:
        """The state a client sees for this file."""
        if self.state is FileState.PUBLISHED:
            return "FINISHED"
        if transfer_state is TransferState.EXPIRED:
            return "EXPIRED"
        if self.state is FileState.CANCELLED or transfer_state is TransferState.CANCELLED:
            return "CANCELLED"
        if self.state is FileState.RELEASED:
            return "FAILED"
        if self.state is FileState.UPLOADING or self.received > 0:
            return "IN_PROGRESS"
        return "PENDING"


@dataclass(frozen=True, slots=True)
class Transfer:
    """A transfer key and everything bound to it."""

    key: str
    prefix: str
    owner: Identity
    state: TransferState
    created_at: float
    updated_at: float
    expires_at: float
    files: tuple[TransferFile, ...]

    def usable_by(self, identity: Identity) -> bool:
        """Whether ``identity`` may upload under this key: the identity that registered it
        (an anonymous transfer, by anonymous clients that hold the key)."""
        return self.owner == identity

    def manageable_by(self, identity: Identity) -> bool:
        """Whether ``identity`` may see or cancel this transfer: as :meth:`usable_by`, or an administrator."""
        return identity.admin or self.usable_by(identity)

    def expired(self, now: float) -> bool:
        """True once the key's lifetime has passed (or the sweeper expired it)."""
        return self.state is TransferState.EXPIRED or (self.state is TransferState.OPEN and now >= self.expires_at)

    def public_state(self) -> str:
        """``PENDING``, ``IN_PROGRESS``, ``FINISHED``, ``FAILED``, ``CANCELLED`` or ``EXPIRED``.

        ``FAILED`` means the last attempt at some file failed and nothing is
        uploading; the key stays valid and the file may be sent again.
        """
        if self.state is not TransferState.OPEN:
            return self.state.value
        states = {f.public_state(self.state) for f in self.files}
        if "IN_PROGRESS" in states:
            return "IN_PROGRESS"
        if "FAILED" in states:
            return "FAILED"
        if states <= {"PENDING"}:
            return "PENDING"
        return "IN_PROGRESS"


@dataclass(frozen=True, slots=True)
class ClientQuota:
    """What one client's open transfers may hold at once: transfers, reserved names, bytes still to come."""

    transfers: int
    names: int
    bytes: int

    def check(self, held: Holdings, names: int, size: int) -> None:
        """QuotaExceeded (429, naming the limit) unless ``held`` plus one transfer of ``names`` files and
        ``size`` bytes fits."""
        if held.transfers + 1 > self.transfers:
            raise QuotaExceeded(f"you hold {held.transfers} open transfers; the limit is {self.transfers}")
        if held.names + names > self.names:
            raise QuotaExceeded(
                f"your open transfers reserve {held.names} names and this one {names}; the limit is {self.names}"
            )
        if held.bytes + size > self.bytes:
            raise QuotaExceeded(
                f"your open transfers may still write {held.bytes} bytes and this one {size}; the limit is {self.bytes}"
            )


@dataclass(frozen=True, slots=True)
class Holdings:
    """What one client's open transfers hold: transfers, the names they reserve, bytes they may still write."""

    transfers: int
    names: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Claim:
    """A lease on a file, taken by :meth:`TransferStore.claim`: the file as it was before, and the
    number of this claim (every claim of a file gets the next one)."""

    before: TransferFile
    number: int


@dataclass(frozen=True, slots=True)
class ClaimStatus:
    """Who holds a file now: its state, the lease's holder and expiry, and what was asked of the holder."""

    state: FileState
    holder: str | None
    lease_until: float | None
    stop_request: str | None


@dataclass(frozen=True, slots=True)
class StagedFile:
    """A file that may hold staged bytes: ``received`` as recorded, and whether a checksummed chunk
    was being appended (its unverified bytes are cut off when the disk is reconciled)."""

    key: str
    num: int
    received: int
    verifying: bool
    holder: str | None = None


@dataclass(frozen=True, slots=True)
class Ended:
    """A transfer that was just cancelled or expired, as it was before, and the files that ended with it
    (all that were open, but one being published)."""

    transfer: Transfer
    files: tuple[TransferFile, ...]


class DuplicateRequest(Exception):
    """:meth:`TransferStore.create` found a transfer of the owner under the same idempotency key."""


class LeaseExpired(Exception):
    """:meth:`TransferStore.claim` found the file UPLOADING under a lease that ran out: its holder is gone.

    The caller reconciles the staged bytes with the disk, :meth:`TransferStore.reap` s the file and
    claims again.
    """

    def __init__(self, staged: StagedFile) -> None:
        super().__init__(f"the lease of {staged.holder} on the file ran out")
        self.staged = staged


class TransferStore(Protocol):
    """Transfers, their files and the leases on them."""

    async def create(
        self,
        prefix: str,
        owner: Identity,
        files: Sequence[ManifestFile],
        *,
        lifetime: float,
        now: float,
        upload_metadata: str | None = None,
        client: str | None = None,
        quota: ClientQuota | None = None,
        idempotency_key: str | None = None,
        space: int | None = None,
    ) -> Transfer:
        """A new OPEN transfer under a fresh unguessable key, every file RESERVED; appends ``transfer.created``.

        With a ``quota``: QuotaExceeded, and nothing stored, unless ``client``'s holdings (checked in
        the same transaction) leave room for it. With an ``idempotency_key`` that ``owner`` used on
        ``prefix`` before: DuplicateRequest, and nothing stored (:meth:`idempotent` finds that transfer).
        With ``space`` (bytes the disk may still take): InsufficientStorage, and nothing stored,
        unless the files' sizes fit in it less what open transfers may still write
        (:meth:`reserved_bytes`, in the same transaction).
        """
        ...

    async def idempotent(self, prefix: str, owner: Identity, idempotency_key: str) -> Transfer | None:
        """The transfer (in any state) ``owner`` registered on ``prefix`` under ``idempotency_key``, or None."""
        ...

    async def holdings(self, client: str | None) -> Holdings:
        """What ``client``'s OPEN transfers hold (files neither published nor cancelled)."""
        ...

    async def open_names(self, prefix: str, names: Sequence[str]) -> set[str]:
        """Which of ``names`` a file of an OPEN transfer of ``prefix`` has, neither published nor cancelled."""
        ...

    async def get(self, key: str) -> Transfer | None:
        """The transfer under ``key`` with its files in order, or None."""
        ...

    async def get_file(self, key: str, num: int) -> tuple[Transfer, TransferFile | None] | None:
        """The transfer under ``key`` (without its file list) and its file ``num`` (None if no such
        number); None if no such key."""
        ...

    async def claim(self, key: str, num: int, holder: str, *, lease: float, now: float) -> Claim:
        """Lease file ``num`` to ``holder`` until ``now + lease``: RESERVED or RELEASED -> UPLOADING.

        Appends ``file.started`` unless the file's attempt is already under way (a resumable upload
        continuing after a request that ended as planned). Raises UploadInProgress (held under a
        live lease), LeaseExpired (held under a lease that ran out), AlreadyUploaded (PUBLISHED),
        TransferCancelled (CANCELLED).
        """
        ...

    async def renew(self, key: str, num: int, holder: str, *, lease: float, now: float) -> ClaimStatus | None:
        """Extend ``holder``'s lease to ``now + lease``; the file's status after it, or None if the file
        is gone. The lease is not extended (and the status says whose it is) if ``holder`` lost it."""
        ...

    async def status(self, key: str, num: int) -> ClaimStatus | None:
        """The file's status, or None if it is gone."""
        ...

    async def request_stop(self, key: str, num: int, reason: StopReason) -> str | None:
        """Ask the holder of an UPLOADING file to stop for ``reason``; returns the holder, or None."""
        ...

    async def restore(self, key: str, num: int, holder: str, *, released: bool) -> bool:
        """Give back ``holder``'s claim that was never used (to RELEASED if ``released``, else RESERVED)."""
        ...

    async def pause(self, key: str, num: int, holder: str, *, received: int) -> bool:
        """``holder``'s resumable request ended as planned with ``received`` bytes staged (no event).

        This and the other steps that end a lease change nothing, and return False, if ``holder``
        no longer holds the file.
        """
        ...

    async def interrupt(self, key: str, num: int, holder: str, *, received: int, reason: StopReason) -> bool:
        """``holder``'s request failed with ``received`` bytes kept for a resume; appends ``file.interrupted``."""
        ...

    async def fail(self, key: str, num: int, holder: str, *, reason: StopReason, message: str) -> bool:
        """``holder``'s attempt failed and its bytes are gone: RELEASED; appends ``file.failed``."""
        ...

    async def begin_publish(self, key: str, num: int, holder: str) -> bool:
        """``holder`` verified the file and begins moving it into place: from now on cancelling,
        expiring or terminating leaves it to finish. False (and nothing changes) if ``holder`` no
        longer holds it."""
        ...

    def publishing_together(self) -> AbstractContextManager[None]:
        """A context for a file's :meth:`publish` and what the handler records of it first: a
        catalogue's publish made inside, in this state's database, waits and commits in the same
        transaction as the :meth:`publish` that follows (both happen, or neither; without a publish
        it is dropped). Stores in another database (each SQLite file is one) write at once, as outside."""
        ...

    async def publish(self, key: str, num: int, holder: str, *, md5: str | None, sha256: str | None) -> bool:
        """The file is verified and published: PUBLISHED with its digests; appends ``file.completed``.
        A digest not computed before publishing (``None``) leaves the one the manifest declared, if any.

        If it was the last open file of an OPEN transfer, the transfer ends too, its event after the
        file's: FINISHED (``transfer.finished``) when every file is published; CANCELLED
        (``transfer.cancelled``, reason ``terminated``) when a file was terminated, as that
        :meth:`terminate` would have ended it had it come last."""
        ...

    async def reap(self, key: str, num: int, holder: str, *, received: int, now: float) -> bool:
        """End ``holder``'s claim because its process is gone (known dead, or its lease ran out),
        keeping ``received`` bytes (as reconciled with the disk); appends ``file.interrupted``."""
        ...

    async def terminate(self, key: str, num: int) -> TransferFile:
        """End one file for good (tus termination): CANCELLED, returned as it was; appends
        ``file.cancelled``, and ``transfer.cancelled`` if no file of the transfer is left open.
        AlreadyUploaded if it is PUBLISHED or being published."""
        ...

    async def cancel(self, key: str, *, now: float) -> Ended | None:
        """End an OPEN transfer: CANCELLED, its open files too (but one being published); None if it
        was not OPEN; appends ``transfer.cancelled``."""
        ...

    async def expire_due(self, now: float, start_timeout: float | None = None) -> list[Ended]:
        """EXPIRED for every OPEN transfer past its lifetime, or never claimed within ``start_timeout``
        seconds of its creation (their files as :meth:`cancel` ends them); appends ``transfer.expired``
        for each."""
        ...

    async def begin_chunk(self, key: str, num: int, *, verifying: bool) -> None:
        """A resumable request starts appending; remember whether its chunk is checksummed."""
        ...

    async def set_received(self, key: str, num: int, received: int) -> None:
        """Record the bytes really staged for a file (after a restart)."""
        ...

    async def claims_of(self, holder: str) -> list[StagedFile]:
        """The files ``holder`` leases."""
        ...

    async def expired_leases(self, now: float) -> list[StagedFile]:
        """The UPLOADING files whose lease ran out by ``now`` (those :meth:`claim` finds expired)."""
        ...

    async def staged_files(self) -> list[StagedFile]:
        """Every file of an OPEN transfer that may hold staged bytes (RESERVED or UPLOADING)."""
        ...

    async def recover(self) -> int:
        """At a start of the only process using this state: every lease ends (UPLOADING -> RESERVED,
        silently: the start announces nothing), and with it any publishing begun under it (the file
        is no longer left to finish). Returns how many did."""
        ...

    async def reserved_bytes(self) -> int:
        """Bytes that OPEN transfers may still write (declared sizes less what is staged)."""
        ...

    async def purge(self, before: float) -> int:
        """Forget transfers that ended (FINISHED, CANCELLED, EXPIRED) and last changed before ``before``."""
        ...


class EventLog(Protocol):
    """The persisted events, in the order their transactions committed."""

    async def append(self, events: Sequence[NewEvent], *, now: float) -> list[Event]:
        """Append events that are no transition (progress, deletions), in one transaction."""
        ...

    async def events_after(self, last_id: int, *, limit: int) -> list[Event]:
        """Up to ``limit`` events with ids above ``last_id``, oldest first."""
        ...

    async def last_event_id(self) -> int:
        """The log's position: the id of the newest event ever appended (0 if none was). Pruning does
        not lower it: the events after it are those appended from now on."""
        ...

    async def prune_events(self, before: float) -> int:
        """Forget events older than ``before``; the ids of later events never change."""
        ...


class LeaseStore(Protocol):
    """Named leases: who does a piece of work that only one process may do at a time (delivering a
    webhook's events, running a job)."""

    async def acquire(self, name: str, holder: str, *, lease: float, now: float) -> bool:
        """Take or renew lease ``name`` for ``holder`` until ``now + lease``: True if ``holder`` holds
        it now (it was free, ran out, or was already ``holder``'s)."""
        ...

    async def release(self, name: str, holder: str) -> None:
        """Give lease ``name`` back, if ``holder`` holds it."""
        ...


class CursorStore(Protocol):
    """Named positions in the event log (how far a webhook has been delivered)."""

    async def cursor(self, name: str) -> int | None:
        """The position stored under ``name``, or None."""
        ...

    async def set_cursor(self, name: str, position: int) -> None:
        """Store ``position`` under ``name``."""
        ...


class SignalKind(StrEnum):
    """What another process or node changed."""

    #: Events were appended: read the log.
    EVENTS = "e"
    #: A file's upload lease ended, changed hands or was asked to stop (``subject`` key, ``num``).
    FILE = "f"
    #: A transfer job changed state (``subject``: its id).
    JOB = "j"
    #: A job's file is queued: there is work to claim.
    QUEUED = "q"
    #: Signals may have been missed (the listening connection was lost, or was just made): look at
    #: everything now.
    MISSED = "m"


@dataclass(frozen=True, slots=True)
class Signal:
    """One signal: what changed, and (for FILE and JOB) which one."""

    kind: SignalKind
    subject: str | None = None
    num: int | None = None


class StateStore(TransferStore, EventLog, LeaseStore, CursorStore, JobStore, Protocol):
    """Everything a store persists besides the bytes and the handlers' catalogues (transfer jobs: ``jobs.py``)."""

    #: Called after each transaction of this object that appended events, with those events (ids and
    #: times set), in commit order; not for other objects' or processes' transactions. The lifecycle
    #: counts them and wakes the event bus with it.
    on_appended: Callable[[Sequence[Event]], None]

    async def listen(self, on_signal: Callable[[Signal], None]) -> bool:
        """Call ``on_signal`` with every signal of every process sharing the state (this one's too),
        from now until :meth:`close`; first with MISSED, and again whenever the listening
        connection was lost and is made again. False if this backend has no signals (then nothing is
        called: whoever follows changes looks for them every poll interval)."""
        ...

    async def close(self) -> None:
        """Release the backend's connections (listening included); a later call reopens them."""
        ...
