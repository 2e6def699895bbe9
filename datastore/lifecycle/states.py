"""The vocabulary of the lifecycle: the states of a transfer and of its files, the steps between
them in one transition table, why an upload stops, and the events each step announces.

Pure data, as h11 keeps its states in ``_state.py``: no I/O, no aiohttp, no database. The state
backends guard every stored change with :func:`sources` (an SQL ``WHERE state IN (...)``), and
build the events of a step with :func:`events_of`, in the transaction that makes the step, so a
backend cannot disagree with the table. A transfer::

    OPEN --every file published---------> FINISHED
    OPEN --the last open file published,--> CANCELLED
           another one terminated
    OPEN --DELETE by its owner, or the----> CANCELLED
           last open file terminated
    OPEN --lifetime or start timeout-----> EXPIRED

and each of its files::

    RESERVED  --claim-->      UPLOADING   (an upload request holds the lease)
    RELEASED  --claim-->      UPLOADING   (the handler's reservation is taken again)
    UPLOADING --pause-->      RESERVED    (a resumable request ended; its bytes are kept)
    UPLOADING --interrupt-->  RESERVED    (the request failed; the bytes that arrived are kept)
    UPLOADING --reap-->       RESERVED    (its lease ran out: the process holding it is gone)
    UPLOADING --restore-->    RESERVED or RELEASED (a claim never used)
    UPLOADING --fail-->       RELEASED    (staged bytes dropped, reservation cancelled)
    UPLOADING --publish-->    PUBLISHED   (verified and in place; final)
    any but PUBLISHED --terminate/cancel/expire--> CANCELLED (final)

A file whose holder has begun publishing it (verified, being moved into place) is not cancelled:
its publishing finishes, even in a transfer cancelled meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class TransferState(StrEnum):
    """Where a transfer as a whole stands, as stored."""

    OPEN = "OPEN"
    FINISHED = "FINISHED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


class FileState(StrEnum):
    """Where one file of a transfer stands, as stored."""

    RESERVED = "RESERVED"
    UPLOADING = "UPLOADING"
    PUBLISHED = "PUBLISHED"
    RELEASED = "RELEASED"
    CANCELLED = "CANCELLED"


class Step(StrEnum):
    """A transition of a file (and, through it, of its transfer)."""

    CLAIM = "claim"
    PAUSE = "pause"
    INTERRUPT = "interrupt"
    REAP = "reap"
    RESTORE = "restore"
    RESTORE_RELEASED = "restore_released"
    FAIL = "fail"
    PUBLISH = "publish"
    TERMINATE = "terminate"
    CANCEL = "cancel"
    EXPIRE = "expire"


_S = FileState

#: The transition table: (state, step) -> the state after it. A step not listed is refused.
FILE_TRANSITIONS: Mapping[tuple[FileState, Step], FileState] = {
    (_S.RESERVED, Step.CLAIM): _S.UPLOADING,
    (_S.RELEASED, Step.CLAIM): _S.UPLOADING,
    (_S.UPLOADING, Step.PAUSE): _S.RESERVED,
    (_S.UPLOADING, Step.INTERRUPT): _S.RESERVED,
    (_S.UPLOADING, Step.REAP): _S.RESERVED,
    (_S.UPLOADING, Step.RESTORE): _S.RESERVED,
    (_S.UPLOADING, Step.RESTORE_RELEASED): _S.RELEASED,
    (_S.UPLOADING, Step.FAIL): _S.RELEASED,
    (_S.UPLOADING, Step.PUBLISH): _S.PUBLISHED,
    **{(state, Step.TERMINATE): _S.CANCELLED for state in (_S.RESERVED, _S.UPLOADING, _S.RELEASED)},
    **{(state, Step.CANCEL): _S.CANCELLED for state in (_S.RESERVED, _S.UPLOADING, _S.RELEASED)},
    **{(state, Step.EXPIRE): _S.CANCELLED for state in (_S.RESERVED, _S.UPLOADING, _S.RELEASED)},
}

#: A transfer's own transitions; only an OPEN transfer changes.
TRANSFER_TRANSITIONS: Mapping[tuple[TransferState, Step], TransferState] = {
    # When it was the last open file: FINISHED, or CANCELLED if another file was terminated.
    (TransferState.OPEN, Step.PUBLISH): TransferState.FINISHED,
    (TransferState.OPEN, Step.TERMINATE): TransferState.CANCELLED,  # when no file is left open
    (TransferState.OPEN, Step.CANCEL): TransferState.CANCELLED,
    (TransferState.OPEN, Step.EXPIRE): TransferState.EXPIRED,
}

FINAL_FILE_STATES = frozenset(state for state in FileState if not any(s == state for s, _ in FILE_TRANSITIONS))


def sources(step: Step) -> tuple[FileState, ...]:
    """The file states ``step`` may leave, in table order."""
    return tuple(state for state, s in FILE_TRANSITIONS if s is step)


def target(state: FileState, step: Step) -> FileState:
    """The state after ``step`` from ``state``; ValueError if the table has no such transition."""
    try:
        return FILE_TRANSITIONS[(state, step)]
    except KeyError:
        raise ValueError(f"no transition {step} from {state}") from None


class StopReason(StrEnum):
    """Why an upload attempt (or a file, or a transfer) stopped short of publishing."""

    CONNECTION_LOST = "connection_lost"
    TOO_SLOW = "too_slow"
    SIZE_MISMATCH = "size_mismatch"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    CHUNK_CHECKSUM_MISMATCH = "chunk_checksum_mismatch"
    OFFSET_MISMATCH = "offset_mismatch"
    TOO_LARGE = "too_large"
    BAD_REQUEST = "bad_request"
    DISK_FULL = "disk_full"
    REFUSED = "refused"
    SUPERSEDED = "superseded"
    TERMINATED = "terminated"
    #: Another process ended the claim (cancelled, expired or terminated the file there).
    ENDED_ELSEWHERE = "ended_elsewhere"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    LEASE_EXPIRED = "lease_expired"
    SERVER_ERROR = "server_error"


class EventType(StrEnum):
    """What an event announces."""

    TRANSFER_CREATED = "transfer.created"
    FILE_STARTED = "file.started"
    FILE_PROGRESS = "file.progress"
    FILE_INTERRUPTED = "file.interrupted"
    FILE_COMPLETED = "file.completed"
    FILE_DIGESTED = "file.digested"
    FILE_FAILED = "file.failed"
    FILE_CANCELLED = "file.cancelled"
    FILE_DELETED = "file.deleted"
    TRANSFER_FINISHED = "transfer.finished"
    TRANSFER_CANCELLED = "transfer.cancelled"
    TRANSFER_EXPIRED = "transfer.expired"
    # Transfer jobs (``jobs/states.py``): ``key`` is the job's id, ``num`` the file's index,
    # ``name`` its destination (without credentials), ``prefix`` empty.
    JOB_SUBMITTED = "job.submitted"
    JOB_QUEUED = "job.queued"
    JOB_ACTIVE = "job.active"
    JOB_PAUSED = "job.paused"
    JOB_USER_STOPPED = "job.user_stopped"
    JOB_FINISHED = "job.finished"
    JOB_FINISHED_DIRTY = "job.finished_dirty"
    JOB_FAILED = "job.failed"
    JOB_EXPIRED = "job.expired"
    JOB_AWAITING_ACCEPTANCE = "job.awaiting_acceptance"
    JOB_DECLINED = "job.declined"
    JOB_INVITE_NOT_ACCEPTED_ON_TIME = "job.invite_not_accepted_on_time"
    JOB_PRIORITY = "job.priority"
    JOB_FILE_STARTED = "job.file.started"
    JOB_FILE_PROGRESS = "job.file.progress"
    JOB_FILE_RETRYING = "job.file.retrying"
    JOB_FILE_INTERRUPTED = "job.file.interrupted"
    JOB_FILE_FINISHED = "job.file.finished"
    JOB_FILE_FAILED = "job.file.failed"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event before the log gives it an id and a time.

    ``owner`` is who the transfer or file belongs to, as shown to those
    allowed to see owners; ``owner_id`` its principal (for deciding that).
    ``bytes`` is how far the file got (received, or its size once complete).
    """

    type: EventType
    prefix: str
    key: str | None = None
    num: int | None = None
    name: str | None = None
    owner: str | None = None
    owner_id: str | None = None
    bytes: int | None = None
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Event(NewEvent):
    """An event as the log keeps it: ``id`` grows with every event, in the order they were committed."""

    id: int = 0
    time: float = 0.0


@dataclass(frozen=True, slots=True)
class Subject:
    """What a step's events say about the transfer and the file it concerns."""

    prefix: str
    key: str
    owner: str | None
    owner_id: str | None
    num: int | None = None
    name: str | None = None
    size: int | None = None


#: The file event of each step that announces one. Silent: PAUSE (a request ended as planned) and
#: RESTORE (a claim never used: the attempt it may have started goes on with the next claim).
_STEP_EVENTS: Mapping[Step, EventType] = {
    Step.CLAIM: EventType.FILE_STARTED,
    Step.INTERRUPT: EventType.FILE_INTERRUPTED,
    Step.REAP: EventType.FILE_INTERRUPTED,
    Step.FAIL: EventType.FILE_FAILED,
    Step.PUBLISH: EventType.FILE_COMPLETED,
    Step.TERMINATE: EventType.FILE_CANCELLED,
}

#: The transfer event of each transfer transition.
_TRANSFER_EVENTS: Mapping[TransferState, EventType] = {
    TransferState.FINISHED: EventType.TRANSFER_FINISHED,
    TransferState.CANCELLED: EventType.TRANSFER_CANCELLED,
    TransferState.EXPIRED: EventType.TRANSFER_EXPIRED,
}


def events_of(
    step: Step,
    subject: Subject,
    *,
    transfer_after: TransferState | None = None,
    bytes: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    reason: str | None = None,
) -> list[NewEvent]:
    """The events announcing ``step`` on ``subject``; ``transfer_after`` if the transfer changed state too.

    The file's event comes first, then the transfer's.
    """
    events = []
    file_event = _STEP_EVENTS.get(step) if subject.num is not None else None
    if file_event is not None:
        events.append(
            NewEvent(
                file_event,
                subject.prefix,
                subject.key,
                subject.num,
                subject.name,
                subject.owner,
                subject.owner_id,
                bytes=bytes,
                size=subject.size,
                md5=md5 if step is Step.PUBLISH else None,
                sha256=sha256 if step is Step.PUBLISH else None,
                reason=reason,
            )
        )
    if transfer_after is not None and transfer_after in _TRANSFER_EVENTS:
        events.append(
            NewEvent(
                _TRANSFER_EVENTS[transfer_after],
                subject.prefix,
                subject.key,
                owner=subject.owner,
                owner_id=subject.owner_id,
                reason=reason if transfer_after is not TransferState.FINISHED else None,
            )
        )
    return events
