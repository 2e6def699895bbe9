"""The vocabulary of transfer jobs: the states of a job and of its files, the steps between them in
one transition table, how a failure is classified, and the events each step announces.

Pure data, as ``lifecycle/states.py`` is for uploads: the state backends guard every stored change
of a job with :func:`job_sources` / :func:`file_sources` (an SQL ``WHERE state IN (...)``), so a
backend cannot disagree with the table. A job::

    SUBMITTED --commit--> QUEUED (or AWAITING_ACCEPTANCE while the destination's owner is asked)
    AWAITING_ACCEPTANCE --accept--> QUEUED | --decline--> DECLINED | --no answer--> INVITE_NOT_ACCEPTED_ON_TIME
    QUEUED --a runner starts a file--> ACTIVE
    QUEUED, ACTIVE --pause--> PAUSED --resume--> QUEUED
    SUBMITTED... ACTIVE, PAUSED --stop--> USER_STOPPED --resume--> QUEUED (partial data kept)
    QUEUED, ACTIVE, PAUSED, USER_STOPPED --every file ended--> FINISHED | FINISHED_DIRTY (some failed) | FAILED
    QUEUED, ACTIVE, PAUSED, AWAITING_ACCEPTANCE --max time in queue or deadline--> EXPIRED
    FINISHED_DIRTY, FAILED, EXPIRED --retry--> QUEUED (the files that did not finish, again)

and each of its files::

    QUEUED --claim--> ACTIVE (a runner holds its lease)
    ACTIVE --requeue--> QUEUED (a retry after a transient failure, or a lease that ran out)
    ACTIVE --finish--> FINISHED (verified at the destination)   ACTIVE --fail--> FAILED
    QUEUED, ACTIVE --pause--> PAUSED --resume--> QUEUED
    and as the job: stop, expire, decline, invitation timeout; retry brings FAILED back to QUEUED.

A file that ends its attempt while its job is paused, stopped or expired takes the job's state
(its bytes stay where they are, so that a resume continues from them).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from enum import StrEnum
from urllib.parse import urlsplit, urlunsplit

from ..lifecycle.states import EventType


class JobState(StrEnum):
    """Where a job stands (pyRFT's and the CS3 notes' states, and FTS3's FINISHED_DIRTY)."""

    SUBMITTED = "SUBMITTED"
    QUEUED = "QUEUED"
    AWAITING_ACCEPTANCE = "AWAITING_ACCEPTANCE"
    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    FINISHED = "FINISHED"
    FINISHED_DIRTY = "FINISHED_DIRTY"
    FAILED = "FAILED"
    USER_STOPPED = "USER_STOPPED"
    INVITE_NOT_ACCEPTED_ON_TIME = "INVITE_NOT_ACCEPTED_ON_TIME"
    DECLINED = "DECLINED"
    EXPIRED = "EXPIRED"


class FileJobState(StrEnum):
    """Where one file of a job stands: the job's states but the mixed outcome."""

    SUBMITTED = "SUBMITTED"
    QUEUED = "QUEUED"
    AWAITING_ACCEPTANCE = "AWAITING_ACCEPTANCE"
    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    USER_STOPPED = "USER_STOPPED"
    INVITE_NOT_ACCEPTED_ON_TIME = "INVITE_NOT_ACCEPTED_ON_TIME"
    DECLINED = "DECLINED"
    EXPIRED = "EXPIRED"


class JobStep(StrEnum):
    """A transition of a job or of its files."""

    COMMIT = "commit"
    INVITE = "invite"
    ACCEPT = "accept"
    DECLINE = "decline"
    INVITE_TIMEOUT = "invite_timeout"
    START = "start"
    CLAIM = "claim"
    REQUEUE = "requeue"
    FINISH = "finish"
    FAIL = "fail"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    EXPIRE = "expire"
    RETRY = "retry"
    #: The last open file ended: the job ends with the outcome of its files.
    SETTLE = "settle"


_J = JobState
_F = FileJobState
_S = JobStep

#: The job transitions: (state, step) -> the state after it. SETTLE's target depends on the files
#: (:func:`settled_state`); the table lists FINISHED for it.
JOB_TRANSITIONS: Mapping[tuple[JobState, JobStep], JobState] = {
    (_J.SUBMITTED, _S.COMMIT): _J.QUEUED,
    (_J.SUBMITTED, _S.INVITE): _J.AWAITING_ACCEPTANCE,
    (_J.AWAITING_ACCEPTANCE, _S.ACCEPT): _J.QUEUED,
    (_J.AWAITING_ACCEPTANCE, _S.DECLINE): _J.DECLINED,
    (_J.AWAITING_ACCEPTANCE, _S.INVITE_TIMEOUT): _J.INVITE_NOT_ACCEPTED_ON_TIME,
    (_J.QUEUED, _S.START): _J.ACTIVE,
    (_J.QUEUED, _S.PAUSE): _J.PAUSED,
    (_J.ACTIVE, _S.PAUSE): _J.PAUSED,
    (_J.PAUSED, _S.RESUME): _J.QUEUED,
    (_J.USER_STOPPED, _S.RESUME): _J.QUEUED,
    **{(state, _S.STOP): _J.USER_STOPPED for state in (_J.QUEUED, _J.AWAITING_ACCEPTANCE, _J.ACTIVE, _J.PAUSED)},
    **{(state, _S.SETTLE): _J.FINISHED for state in (_J.QUEUED, _J.ACTIVE, _J.PAUSED, _J.USER_STOPPED)},
    **{(state, _S.EXPIRE): _J.EXPIRED for state in (_J.QUEUED, _J.AWAITING_ACCEPTANCE, _J.ACTIVE, _J.PAUSED)},
    **{(state, _S.RETRY): _J.QUEUED for state in (_J.FINISHED_DIRTY, _J.FAILED, _J.EXPIRED)},
}

#: The file transitions: (state, step) -> the state after it.
FILE_JOB_TRANSITIONS: Mapping[tuple[FileJobState, JobStep], FileJobState] = {
    (_F.SUBMITTED, _S.COMMIT): _F.QUEUED,
    (_F.SUBMITTED, _S.INVITE): _F.AWAITING_ACCEPTANCE,
    (_F.AWAITING_ACCEPTANCE, _S.ACCEPT): _F.QUEUED,
    (_F.AWAITING_ACCEPTANCE, _S.DECLINE): _F.DECLINED,
    (_F.AWAITING_ACCEPTANCE, _S.INVITE_TIMEOUT): _F.INVITE_NOT_ACCEPTED_ON_TIME,
    (_F.QUEUED, _S.CLAIM): _F.ACTIVE,
    (_F.ACTIVE, _S.REQUEUE): _F.QUEUED,
    (_F.ACTIVE, _S.FINISH): _F.FINISHED,
    (_F.ACTIVE, _S.FAIL): _F.FAILED,
    (_F.QUEUED, _S.PAUSE): _F.PAUSED,
    (_F.ACTIVE, _S.PAUSE): _F.PAUSED,
    (_F.PAUSED, _S.RESUME): _F.QUEUED,
    (_F.USER_STOPPED, _S.RESUME): _F.QUEUED,
    **{(state, _S.STOP): _F.USER_STOPPED for state in (_F.QUEUED, _F.AWAITING_ACCEPTANCE, _F.ACTIVE, _F.PAUSED)},
    **{(state, _S.EXPIRE): _F.EXPIRED for state in (_F.QUEUED, _F.AWAITING_ACCEPTANCE, _F.ACTIVE, _F.PAUSED)},
    **{(state, _S.RETRY): _F.QUEUED for state in (_F.FAILED, _F.EXPIRED)},
}

#: Job states no step leaves but a user's retry or resume: the job is done.
FINAL_JOB_STATES = frozenset(
    {_J.FINISHED, _J.FINISHED_DIRTY, _J.FAILED, _J.INVITE_NOT_ACCEPTED_ON_TIME, _J.DECLINED, _J.EXPIRED}
)
#: File states in which a file still wants work (or waits for it).
OPEN_FILE_STATES = frozenset({_F.SUBMITTED, _F.QUEUED, _F.AWAITING_ACCEPTANCE, _F.ACTIVE, _F.PAUSED})
#: Job states a record may be cleared in: not committed, or inactive (pyRFT's clearRecord).
CLEARABLE_JOB_STATES = frozenset({_J.SUBMITTED, _J.USER_STOPPED} | FINAL_JOB_STATES)
#: Job states whose priority may still change (pyRFT: not once active or finished).
REPRIORITIZABLE_JOB_STATES = frozenset({_J.SUBMITTED, _J.QUEUED, _J.AWAITING_ACCEPTANCE})
#: What a file whose attempt ends becomes, when its job was meanwhile paused, stopped or expired.
FILE_STATE_UNDER_JOB: Mapping[JobState, FileJobState] = {
    _J.PAUSED: _F.PAUSED,
    _J.USER_STOPPED: _F.USER_STOPPED,
    _J.EXPIRED: _F.EXPIRED,
}


#: The event announcing that a job entered each state.
JOB_STATE_EVENTS: Mapping[JobState, EventType] = {
    _J.SUBMITTED: EventType.JOB_SUBMITTED,
    _J.QUEUED: EventType.JOB_QUEUED,
    _J.AWAITING_ACCEPTANCE: EventType.JOB_AWAITING_ACCEPTANCE,
    _J.ACTIVE: EventType.JOB_ACTIVE,
    _J.PAUSED: EventType.JOB_PAUSED,
    _J.FINISHED: EventType.JOB_FINISHED,
    _J.FINISHED_DIRTY: EventType.JOB_FINISHED_DIRTY,
    _J.FAILED: EventType.JOB_FAILED,
    _J.USER_STOPPED: EventType.JOB_USER_STOPPED,
    _J.INVITE_NOT_ACCEPTED_ON_TIME: EventType.JOB_INVITE_NOT_ACCEPTED_ON_TIME,
    _J.DECLINED: EventType.JOB_DECLINED,
    _J.EXPIRED: EventType.JOB_EXPIRED,
}


def job_sources(step: JobStep) -> tuple[JobState, ...]:
    """The job states ``step`` may leave, in table order."""
    return tuple(state for state, s in JOB_TRANSITIONS if s is step)


def file_sources(step: JobStep) -> tuple[FileJobState, ...]:
    """The file states ``step`` may leave, in table order."""
    return tuple(state for state, s in FILE_JOB_TRANSITIONS if s is step)


def job_target(state: JobState, step: JobStep) -> JobState:
    """The job state after ``step`` from ``state``; ValueError if the table has no such transition."""
    try:
        return JOB_TRANSITIONS[(state, step)]
    except KeyError:
        raise ValueError(f"no job transition {step} from {state}") from None


def file_target(step: JobStep) -> FileJobState:
    """The file state ``step`` leads to (the same from every state it may leave)."""
    targets = {after for (_, s), after in FILE_JOB_TRANSITIONS.items() if s is step}
    assert len(targets) == 1, step
    return targets.pop()


def settled_state(finished: int, failed: int) -> JobState:
    """The state of a job none of whose files is open: FINISHED if none failed, FAILED if none
    finished, else FINISHED_DIRTY. (Files stopped or expired count as failed here.)"""
    if not failed:
        return JobState.FINISHED
    return JobState.FAILED if not finished else JobState.FINISHED_DIRTY


class FailureKind(StrEnum):
    """How a failed attempt is treated (FTS3's classification)."""

    #: Worth retrying: timeouts, resets, 5xx, a stall, a lost lease.
    TRANSIENT = "transient"
    #: Never retried: not found, forbidden, exists, no space, checksum mismatch on identical bytes.
    PERMANENT = "permanent"


class FailureReason(StrEnum):
    """Why an attempt ended short of a verified file; each reason has one kind."""

    TIMEOUT = "timeout"
    CONNECTION = "connection"
    SERVER_ERROR = "server_error"
    STALLED = "stalled"
    LEASE_EXPIRED = "lease_expired"
    RESTARTED = "restarted"
    SOURCE_CHANGED = "source_changed"
    THROTTLED = "throttled"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    EXISTS = "exists"
    NO_SPACE = "no_space"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    SIZE_MISMATCH = "size_mismatch"
    BAD_REQUEST = "bad_request"
    UNSUPPORTED = "unsupported"
    NO_PROGRESS = "no_progress"
    VOUCHER_EXHAUSTED = "voucher_exhausted"

    @property
    def kind(self) -> FailureKind:
        """Whether a failure for this reason is retried."""
        return FailureKind.TRANSIENT if self in _TRANSIENT else FailureKind.PERMANENT


_TRANSIENT = frozenset(
    {
        FailureReason.TIMEOUT,
        FailureReason.CONNECTION,
        FailureReason.SERVER_ERROR,
        FailureReason.STALLED,
        FailureReason.LEASE_EXPIRED,
        FailureReason.RESTARTED,
        FailureReason.SOURCE_CHANGED,
        FailureReason.THROTTLED,
        FailureReason.VOUCHER_EXHAUSTED,
    }
)


class VerifyChecksum(StrEnum):
    """Which end's checksum a file is verified against (FTS3's ``verify_checksum``).

    ``source``: the destination's digest of the bytes it published must equal the source's (as
    the source states it, or as computed from the bytes read); ``destination``: it must equal the
    checksum the job declares; ``both``: both; ``none``: only the size is checked.
    """

    NONE = "none"
    SOURCE = "source"
    DESTINATION = "destination"
    BOTH = "both"


@functools.lru_cache(maxsize=4096)
def public_url(url: str) -> str:
    """``url`` as events, statuses and logs may show it: without user information, query or fragment
    (which may carry credentials, as a signed URL's query does). Remembered for the URLs met lately
    (each file's events and log lines show its destination)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an invalid URL)"
    if parts.scheme not in ("http", "https"):
        return url.split("?", 1)[0]
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def failure_for_status(status: int) -> FailureReason:
    """The failure an HTTP error status means for a copy (a store's or any server's answer)."""
    if status in (404, 410):
        return FailureReason.NOT_FOUND
    if status in (401, 403):
        return FailureReason.FORBIDDEN
    if status == 408:
        return FailureReason.TIMEOUT
    if status == 416:
        return FailureReason.SOURCE_CHANGED
    if status == 429:
        return FailureReason.THROTTLED
    if status == 460:
        return FailureReason.CHECKSUM_MISMATCH
    if status == 507:
        return FailureReason.NO_SPACE
    if status >= 500:
        return FailureReason.SERVER_ERROR
    return FailureReason.BAD_REQUEST
