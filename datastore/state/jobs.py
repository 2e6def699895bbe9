"""The state of transfer jobs: their records and the :class:`JobStore` protocol a state backend keeps
them by, with the same contracts as the transfers' (``interface.py``): each method one transaction,
every change a step of ``jobs.states``' tables guarded by the states it may leave, the step's events
appended in the same transaction, leases instead of locks, and time given as ``now``.

A job's files are worked on by runners that claim them (:meth:`JobStore.claim_files`),
hold them by a lease they renew, persist the destination's resume state (``handle``) before each
external call, and end each attempt with :meth:`JobStore.end_attempt`, which also ends the job
when its last file ended. A runner that dies leaves leases that run out; whoever finds them
requeues their files (:meth:`JobStore.end_attempt` for the dead holder).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import QuotaExceeded
from ..jobs.states import FailureReason, FileJobState, JobState, JobStep, VerifyChecksum
from ..security.identity import Identity


@dataclass(frozen=True, slots=True)
class JobFileSpec:
    """One copy a client asks for: from ``source`` to ``destination`` (URLs), optionally with the size
    and a checksum it expects (lowercase hex)."""

    source: str
    destination: str
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a client submits: the files and how to move them."""

    files: tuple[JobFileSpec, ...]
    priority: int = 3
    verify_checksum: VerifyChecksum = VerifyChecksum.BOTH
    #: Attempts after the first for a file whose attempt failed for a transient reason.
    retry: int = 3
    #: Seconds before the first retry; each further retry waits twice as long (with jitter).
    retry_delay: float = 5.0
    #: Seconds the job may wait queued before it expires (None: forever).
    max_time_in_queue: float | None = None
    #: The time (epoch seconds) by which the job must have finished, or it expires.
    deadline: float | None = None
    #: The client's name for the submission: submitting the same id again returns the same job.
    submission_id: str | None = None
    #: Bytes per second the job's files may move, all together (None: no limit).
    bandwidth: int | None = None
    #: Bytes per read and write step (None: the store's).
    chunk_size: int | None = None
    #: ``Authorization: Bearer`` credentials for the sources and for the destinations: stored with the
    #: job, used by its runner, never shown or logged.
    source_token: str | None = field(default=None, repr=False)
    destination_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class JobFile:
    """One file of a job as stored."""

    index: int
    source: str
    destination: str
    #: The source's size once a runner learned it, else the declared one.
    size: int | None
    md5: str | None
    sha256: str | None
    state: FileJobState
    #: Bytes the destination holds (the resume point), as last reported.
    bytes: int = 0
    #: Bytes per second over the running attempt (0 when none runs).
    rate: float = 0.0
    attempts: int = 0
    #: Of them, those made before the user's last retry (the job's ``retry`` counts the others).
    attempts_base: int = 0
    #: Attempts in a row that ended without a byte more at the destination.
    idle_attempts: int = 0
    reason: FailureReason | None = None
    error: str | None = None
    not_before: float = 0.0
    holder: str | None = None
    lease_until: float | None = None
    #: What was asked of the file's runner (a job step: pause, stop, expire), or None.
    stop_request: str | None = None
    #: The destination driver's resume state (``jobs/drivers/interface.Handle``).
    handle: Mapping[str, Any] = field(default_factory=dict)
    #: Digests of the file as published at the destination.
    published_md5: str | None = None
    published_sha256: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0
    #: The size the job declared (the source must have it), or None.
    declared_size: int | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """A job, its settings and its files in order."""

    id: str
    owner: Identity
    state: JobState
    spec: JobSpec
    created_at: float
    updated_at: float
    files: tuple[JobFile, ...] = ()
    committed_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    #: Why the job is where it is when that is not its files' doing (expired, stopped), or None.
    reason: str | None = None
    #: Its position in submission order (pagination cursor).
    seq: int = 0
    #: The invitation asked of its destination store (id, state, ...; never its token), or None.
    invitation: Mapping[str, Any] | None = None

    @property
    def priority(self) -> int:
        """1 (lowest) to 5 (highest)."""
        return self.spec.priority

    def manageable_by(self, identity: Identity) -> bool:
        """Whether ``identity`` may see or change this job: its owner or an administrator."""
        return identity.admin or (not identity.anonymous and self.owner == identity)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt at one file: when, from which offset to which, and how it ended (None: running)."""

    index: int
    number: int
    started_at: float
    offset: int
    holder: str
    ended_at: float | None = None
    bytes: int | None = None
    #: ``finished``, ``retrying``, ``failed``, ``interrupted`` (paused, stopped, expired), or None.
    outcome: str | None = None
    reason: FailureReason | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimedFile:
    """A file a runner claimed: the job (without the other files) and the file, with its attempt number."""

    job: Job
    file: JobFile
    attempt: int


@dataclass(frozen=True, slots=True)
class Claims:
    """What one claim took, and when the earliest file waiting for a retry becomes due (as
    :meth:`JobStore.next_due` tells), so that the runner knows how long it may wait."""

    files: tuple[ClaimedFile, ...]
    next_due: float | None


@dataclass(frozen=True, slots=True)
class RunnerLimits:
    """How many files may be ACTIVE at once: per job, per destination host, in all, and per owner (so
    that no one owner's jobs take every slot)."""

    per_job: int = 2
    per_host: int = 4
    total: int = 8
    per_owner: int = 8


@dataclass(frozen=True, slots=True)
class JobQuota:
    """What one client may keep in the queue: open jobs (neither final nor cleared) and files per job."""

    jobs: int = 1000
    files: int = 10_000

    def check(self, open_jobs: int, files: int) -> None:
        """QuotaExceeded (429, naming the limit) unless one more job of ``files`` files fits."""
        if files > self.files:
            raise QuotaExceeded(f"a job may copy at most {self.files} files; this one lists {files}")
        if open_jobs + 1 > self.jobs:
            raise QuotaExceeded(f"you have {open_jobs} unfinished jobs; the limit is {self.jobs}")


@dataclass(frozen=True, slots=True)
class Lease:
    """A runner's look at the file it works on: whether it still holds it, and what was asked of it."""

    held: bool
    stop_request: str | None
    job_state: JobState | None


class JobStore(Protocol):
    """Transfer jobs, their files, attempts and the leases on active files."""

    async def submit(
        self, owner: Identity, spec: JobSpec, *, commit: bool, now: float, quota: JobQuota, invite: bool = False
    ) -> tuple[Job, bool]:
        """Store a new job under a fresh unguessable id: QUEUED (``commit``; AWAITING_ACCEPTANCE if it
        must ``invite`` its destination first) or SUBMITTED, every file alike; appends
        ``job.submitted`` (and the event of the state it is committed in). With a ``spec.submission_id`` that
        ``owner`` used before, the job stored then, and False (nothing new). QuotaExceeded unless
        ``owner``'s unfinished jobs leave room."""
        ...

    async def job(self, job_id: str) -> Job | None:
        """The job with its files, or None."""
        ...

    async def attempts(self, job_id: str) -> list[Attempt]:
        """Every attempt at the job's files, oldest first."""
        ...

    async def jobs(
        self, owner: Identity | None, *, states: Sequence[JobState] = (), limit: int = 100, after: int = 0
    ) -> list[Job]:
        """Up to ``limit`` jobs (without their files) of ``owner`` (None: everyone's) in submission order,
        after position ``after``, in ``states`` if any are given."""
        ...

    async def step(self, job_id: str, step: JobStep, *, now: float, reason: str | None = None) -> Job | None:
        """Make ``step`` (commit, pause, resume, stop, retry, expire) on the job and its files: the job
        after it, or None if its state may not take the step (nothing changes). Files a runner holds are
        asked to stop (``stop_request``) and take the job's state when their attempt ends; resume and
        retry make the files that wait work again (retry: from a fresh count of attempts)."""
        ...

    async def set_invitation(self, job_id: str, invitation: Mapping[str, Any], token: str | None = None) -> bool:
        """Record the invitation asked of the job's destination (and, once known, its token, which
        becomes the job's destination credential); False if the job is gone."""
        ...

    async def set_priority(self, job_id: str, priority: int) -> Job | None:
        """The job with its new priority, or None if it is no longer SUBMITTED, QUEUED or awaiting acceptance."""
        ...

    async def clear(self, job_id: str) -> Job | None:
        """Forget a job that is not committed or inactive (``CLEARABLE_JOB_STATES``, no file held): the
        job as it was (so that the caller drops what its destinations hold), or None."""
        ...

    async def claim_files(
        self, holder: str, *, lease: float, now: float, limits: RunnerLimits, count: int = 1
    ) -> Claims:
        """Lease up to ``count`` files due to ``holder`` until ``now + lease``, in one transaction: each
        the QUEUED file of an unfinished QUEUED or ACTIVE job whose ``not_before`` passed, highest
        priority first, then oldest job, then lowest index, within ``limits`` (counted over every
        runner, and over the files claimed before it). Each file becomes ACTIVE (its attempts count
        one more, an attempt is recorded), its job ACTIVE; appends ``job.file.started`` (and
        ``job.active``). Fewer (or none) when no more are due within the limits; with them, what
        :meth:`next_due` would answer after the claim."""
        ...

    async def renew_job_file(self, job_id: str, index: int, holder: str, *, lease: float, now: float) -> Lease:
        """Extend ``holder``'s lease to ``now + lease`` if it still holds the file."""
        ...

    async def progress(
        self,
        job_id: str,
        index: int,
        holder: str,
        *,
        bytes: int,
        rate: float,
        announce: bool,
        resumed: bool = False,
        handle: Mapping[str, Any] | None = None,
    ) -> bool:
        """Record how far the destination got; with ``announce``, append ``job.file.progress``; with
        ``resumed``, ``bytes`` is where the destination says this attempt starts (the attempt's
        offset); with ``handle``, the destination's resume state too (as :meth:`set_handle`).
        False if ``holder`` no longer holds the file."""
        ...

    async def set_handle(
        self, job_id: str, index: int, holder: str, handle: Mapping[str, Any], *, size: int | None = None
    ) -> bool:
        """Persist the destination's resume state (an intent before an external call, or its result),
        and the size learned from the source. False if ``holder`` no longer holds the file."""
        ...

    async def end_attempt(
        self,
        job_id: str,
        index: int,
        holder: str,
        outcome: JobStep,
        *,
        now: float,
        bytes: int | None,
        reason: FailureReason | None = None,
        error: str | None = None,
        not_before: float = 0.0,
        md5: str | None = None,
        sha256: str | None = None,
        handle: Mapping[str, Any] | None = None,
    ) -> Job | None:
        """End ``holder``'s attempt: FINISH (verified at the destination, with its digests), REQUEUE (a
        retry at ``not_before``) or FAIL; a file whose job was paused, stopped or expired meanwhile
        takes the job's state instead (unless it finished); ``bytes`` is how far the destination got
        (None: as last recorded, for a holder that cannot tell); ``handle``, if given, is recorded as
        :meth:`set_handle` does. Appends the file's event, and when no file of the job is left to
        work on, settles the job (``settled_state``) and appends its event. Returns the job after it
        (with its files only if it settled: :meth:`job` reads them), or None if ``holder`` no longer
        held the file (nothing changes)."""
        ...

    async def expired_job_leases(self, now: float) -> list[tuple[str, int, str]]:
        """(job id, index, holder) of the ACTIVE files whose lease ran out by ``now``."""
        ...

    async def held_by(self, holder: str | None) -> list[tuple[str, int, str]]:
        """(job id, index, holder) of the ACTIVE files ``holder`` holds (None: anyone)."""
        ...

    async def expire_due_jobs(self, now: float) -> list[Job]:
        """EXPIRED for every job waiting longer than its ``max_time_in_queue`` since it was committed
        without a file started, or unfinished past its ``deadline``; appends ``job.expired`` for each."""
        ...

    async def next_due(self, now: float) -> float | None:
        """When the earliest QUEUED file waiting for a retry becomes due (None: none waits)."""
        ...

    async def purge_jobs(self, before: float) -> int:
        """Forget jobs that ended (final states) before ``before``; how many."""
        ...
