"""What the two backends of the job store (``sqlite_jobs.py``, ``postgres_jobs.py``) share besides its
contracts (``jobs.py``): the job ids, the record a submission makes, how rows of ``jobs``,
``job_files`` and ``job_attempts`` (the same columns in both databases) read back as records and how
the settings are stored in them, what the events of a job say, and the decisions of its steps (what a
step changes, what the end of an attempt makes of its file, which files keep a job from settling
and what it settles in, which files a claim may take within the runners' limits, how due jobs
expire). Pure Python: the SQL, and what differs between the databases, stays in each backend.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import urlsplit

from ..jobs.states import (
    CLEARABLE_JOB_STATES,
    FILE_STATE_UNDER_JOB,
    FINAL_JOB_STATES,
    JOB_STATE_EVENTS,
    OPEN_FILE_STATES,
    FailureReason,
    FileJobState,
    JobState,
    JobStep,
    VerifyChecksum,
    file_sources,
    file_target,
    job_target,
    public_url,
    settled_state,
)
from ..lifecycle.states import EventType, NewEvent
from ..security.identity import Identity
from .jobs import Attempt, Job, JobFile, JobSpec, JobStore, Lease, RunnerLimits
from .records import Row

_F = FileJobState
_J = JobState
#: Job states in which a runner works on the job's files.
RUNNABLE = (_J.QUEUED, _J.ACTIVE)
#: Job states whose files wait for a resume (a file ending its attempt then takes the job's state).
_HALTED_FILES = (_F.PAUSED, _F.USER_STOPPED)
#: The files that keep their job from settling.
UNSETTLED = tuple(sorted(OPEN_FILE_STATES | set(_HALTED_FILES)))
#: Job states a job ends in, and those it has not ended in.
FINAL = tuple(s for s in JobState if s in FINAL_JOB_STATES)
UNFINISHED = tuple(s for s in JobState if s not in FINAL_JOB_STATES)
#: What each outcome of an attempt is called in the attempts list, and the file's event.
_OUTCOMES: Mapping[JobStep, tuple[str, EventType]] = {
    JobStep.FINISH: ("finished", EventType.JOB_FILE_FINISHED),
    JobStep.REQUEUE: ("retrying", EventType.JOB_FILE_RETRYING),
    JobStep.FAIL: ("failed", EventType.JOB_FILE_FAILED),
}
#: The spec's fields kept apart from its settings (in their own columns and rows).
_NOT_SETTINGS = frozenset({"files", "source_token", "destination_token"})


def new_job_id() -> str:
    """An unguessable job id: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


# -- submitting -------------------------------------------------------------------------------------


def submission_state(*, commit: bool, invite: bool) -> JobState:
    """The state a submission is stored in (``JobStore.submit``)."""
    return (_J.AWAITING_ACCEPTANCE if invite else _J.QUEUED) if commit else _J.SUBMITTED


def submitted_job(
    job_id: str, owner: Identity, spec: JobSpec, state: JobState, *, commit: bool, now: float, seq: int
) -> Job:
    """The job a submission stored as row ``seq``, as it reads back (without reading it: a submission
    is one insert)."""
    file_state = FileJobState(state)
    return Job(
        id=job_id,
        owner=Identity.from_principal(owner.principal, owner.dn),
        state=state,
        spec=replace(spec, files=()),
        created_at=now,
        updated_at=now,
        files=tuple(
            JobFile(
                i, f.source, f.destination, f.size, f.md5, f.sha256, file_state, updated_at=now, declared_size=f.size
            )
            for i, f in enumerate(spec.files)
        ),
        committed_at=now if commit else None,
        seq=seq,
    )


def submission_events(job: Job) -> list[NewEvent]:
    """``job.submitted`` of a job :func:`submitted_job` made, and the event of the state it is
    committed in, if it was."""
    events = [job_event(EventType.JOB_SUBMITTED, job, size=sum(f.size or 0 for f in job.files))]
    if job.committed_at is not None:
        events.append(job_event(JOB_STATE_EVENTS[job.state], job))
    return events


def destination_host(url: str) -> str:
    """A destination's host, as the per-host limit counts it (column ``host``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    if parts.scheme in ("http", "https"):
        return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    return url.split(":", 2)[1] if url.startswith("rclone:") else parts.scheme


# -- the settings and rows --------------------------------------------------------------------------


def settings_json(spec: JobSpec) -> str:
    """The spec's settings (column ``spec``), without its files and credentials (kept apart)."""
    return json.dumps({f.name: getattr(spec, f.name) for f in fields(spec) if f.name not in _NOT_SETTINGS})


def settings_with_priority(settings: str, priority: int) -> str:
    """Stored settings (column ``spec``) with another priority."""
    return json.dumps({**json.loads(settings), "priority": priority})


def handle_json(handle: Mapping[str, Any] | None) -> str | None:
    """A destination's resume state as column ``handle`` stores it (None: left as it is)."""
    return None if handle is None else json.dumps(dict(handle))


def job_from_row(row: Row) -> Job:
    """A job (without its files) as its ``jobs`` row holds it."""
    return Job(
        id=row["id"],
        owner=Identity.from_principal(row["owner_id"], row["owner"]),
        state=JobState(row["state"]),
        spec=_spec(row["spec"], row["source_token"], row["destination_token"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        committed_at=row["committed_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        reason=row["reason"],
        seq=row["seq"],
        invitation=None if row["invitation"] is None else json.loads(row["invitation"]),
    )


@functools.lru_cache(maxsize=1024)
def _spec(settings: str, source_token: str | None, destination_token: str | None) -> JobSpec:
    """A stored job's spec (without its files); the specs of the jobs loaded lately are remembered
    (a job is loaded at each of its files' claims and ends)."""
    values = json.loads(settings)
    values["verify_checksum"] = VerifyChecksum(values["verify_checksum"])
    return JobSpec(files=(), **values, source_token=source_token, destination_token=destination_token)


def job_file_from_row(row: Row) -> JobFile:
    """A job's file as its ``job_files`` row holds it."""
    return JobFile(
        index=row["idx"],
        source=row["source"],
        destination=row["destination"],
        size=row["size"],
        md5=row["md5"],
        sha256=row["sha256"],
        state=FileJobState(row["state"]),
        bytes=row["bytes"],
        rate=row["rate"],
        attempts=row["attempts"],
        attempts_base=row["attempts_base"],
        idle_attempts=row["idle_attempts"],
        reason=None if row["reason"] is None else FailureReason(row["reason"]),
        error=row["error"],
        not_before=row["not_before"],
        holder=row["claimed_by"],
        lease_until=row["lease_until"],
        stop_request=row["stop_request"],
        handle=json.loads(row["handle"]),
        published_md5=row["published_md5"],
        published_sha256=row["published_sha256"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
        declared_size=row["declared_size"],
    )


def attempt_from_row(row: Row) -> Attempt:
    """An attempt as its ``job_attempts`` row holds it."""
    return Attempt(
        index=row["idx"],
        number=row["number"],
        started_at=row["started_at"],
        offset=row["offset"],
        holder=row["holder"],
        ended_at=row["ended_at"],
        bytes=row["bytes"],
        outcome=row["outcome"],
        reason=None if row["reason"] is None else FailureReason(row["reason"]),
        error=row["error"],
    )


def lease_of(held: Row) -> Lease:
    """The lease on a held file, as its ``job_files`` row with its job's state (``job_state``) says."""
    return Lease(True, held["stop_request"], JobState(held["job_state"]))


# -- events -----------------------------------------------------------------------------------------


def job_event(type: EventType, job: Job, *, size: int | None = None, reason: str | None = None) -> NewEvent:
    """An event of ``job`` as a whole."""
    return NewEvent(type, "", job.id, owner=job.owner.dn, owner_id=job.owner.principal, size=size, reason=reason)


def file_event(
    type: EventType,
    job: Job,
    file: JobFile,
    *,
    bytes: int | None = None,
    size: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    reason: str | None = None,
) -> NewEvent:
    """An event of one of ``job``'s files."""
    return NewEvent(
        type,
        "",
        job.id,
        file.index,
        public_url(file.destination),
        job.owner.dn,
        job.owner.principal,
        bytes=bytes,
        size=size,
        md5=md5,
        sha256=sha256,
        reason=reason,
    )


def started_events(job: Job, file: JobFile, *, activated: bool) -> list[NewEvent]:
    """The events of a claim of ``file``: ``job.active`` if it ``activated`` the job, then ``job.file.started``."""
    events = [job_event(EventType.JOB_ACTIVE, job)] if activated else []
    events.append(file_event(EventType.JOB_FILE_STARTED, job, file, bytes=file.bytes, size=file.size))
    return events


# -- the decisions of the steps ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepChanges:
    """What a job's step (``JobStore.step``) changes, in the order the backends make the changes."""

    after: JobState
    #: Whether the files a runner holds no longer are asked to stop (resume: they go on).
    unask_stop: bool
    #: Whether the files a runner holds are asked to stop (their column ``stop_request``: the step);
    #: they take the job's state when their attempt ends.
    ask_stop: bool
    #: Whether each file's attempts so far become its ``attempts_base`` (retry: a fresh count).
    rebase_attempts: bool
    #: The files that change (their states; none: no file does), and the columns they change.
    file_states: tuple[FileJobState, ...]
    file_values: Mapping[str, object]
    #: The columns the job changes.
    job_values: Mapping[str, object]
    #: Whether the job settles after it if no file is left to work on.
    may_settle: bool


def step_changes(before: JobState, step: JobStep, *, now: float, reason: str | None) -> StepChanges:
    """What ``step`` changes of a job in state ``before`` (one it may leave by ``step``) and its files."""
    after = job_target(before, step)
    ask_stop = step in (JobStep.PAUSE, JobStep.STOP, JobStep.EXPIRE)
    file_states = tuple(s for s in file_sources(step) if not (ask_stop and s is _F.ACTIVE))
    file_values: dict[str, object] = {"state": file_target(step), "updated_at": now}
    if step is JobStep.RETRY:
        file_values.update(idle_attempts=0, not_before=0.0, reason=None, error=None)
    if step in (JobStep.RESUME, JobStep.RETRY):
        file_values["not_before"] = 0.0
    job_values: dict[str, object] = {"state": after, "updated_at": now, "reason": reason}
    if step is JobStep.COMMIT:
        job_values["committed_at"] = now
    if step in (JobStep.RETRY, JobStep.RESUME):
        job_values["finished_at"] = None
    if after in FINAL:
        job_values["finished_at"] = now
    return StepChanges(
        after=after,
        unask_stop=step is JobStep.RESUME,
        ask_stop=ask_stop,
        rebase_attempts=step is JobStep.RETRY,
        file_states=file_states,
        file_values=file_values,
        job_values=job_values,
        may_settle=after in RUNNABLE or after is _J.PAUSED,
    )


async def expire_jobs(store: JobStore, job_ids: Iterable[str], now: float) -> list[Job]:
    """EXPIRED for each of ``job_ids`` (due to expire, as ``JobStore.expire_due_jobs`` finds them) that
    may still take the step, each in a transaction of its own: the jobs that did."""
    expired = []
    for job_id in job_ids:
        job = await store.step(job_id, JobStep.EXPIRE, now=now, reason="expired")
        if job is not None:
            expired.append(job)
    return expired


def clearable(job: Job) -> bool:
    """Whether ``job`` (with its files) may be cleared: not committed or inactive, and no file held."""
    return job.state in CLEARABLE_JOB_STATES and not any(f.state is _F.ACTIVE for f in job.files)


@dataclass(frozen=True, slots=True)
class AttemptEnd:
    """What ``JobStore.end_attempt`` makes of a held file."""

    state: FileJobState
    #: The attempt's outcome as the attempts list calls it.
    outcome: str
    event: EventType
    #: How far the destination got.
    bytes: int
    idle_attempts: int
    finished_at: float | None

    def file_event(
        self, job: Job, held: Row, *, md5: str | None, sha256: str | None, reason: FailureReason | None
    ) -> NewEvent:
        """The file's event, for the file's ``held`` row as it was before the end."""
        file = replace(job_file_from_row(held), state=self.state)
        return file_event(
            self.event, job, file, bytes=self.bytes, size=held["size"], md5=md5, sha256=sha256, reason=reason
        )


def attempt_end(held: Row, outcome: JobStep, *, bytes: int | None, now: float) -> AttemptEnd:
    """The end of the attempt at the file of ``held`` (its ``job_files`` row with its job's state,
    ``job_state``, and the attempt's offset, ``bytes_at_start``) by ``outcome``; ``bytes`` None: as
    last recorded."""
    reached: int = held["bytes"] if bytes is None else bytes
    label, event_type = _OUTCOMES[outcome]
    state = file_target(outcome)
    job_state = JobState(held["job_state"])
    if outcome is not JobStep.FINISH and job_state in FILE_STATE_UNDER_JOB:
        state, label, event_type = FILE_STATE_UNDER_JOB[job_state], "interrupted", EventType.JOB_FILE_INTERRUPTED
    idle = held["idle_attempts"] + 1 if reached <= held["bytes_at_start"] and outcome is not JobStep.FINISH else 0
    finished_at = now if state in (_F.FINISHED, _F.FAILED) else None
    return AttemptEnd(state, label, event_type, reached, idle, finished_at)


def settled_in(counts: Mapping[FileJobState, int]) -> JobState:
    """The state a job settles in whose files (none of them :data:`UNSETTLED`) are in states ``counts``."""
    finished = counts.get(_F.FINISHED, 0)
    return settled_state(finished, sum(counts.values()) - finished)


class Slots:
    """What one claim may still take within ``RunnerLimits``: the ACTIVE files (of every runner, as
    rows with ``job_seq``, ``host`` and ``owner_id``) counted per job, destination host and owner,
    and those the claim took."""

    def __init__(self, limits: RunnerLimits, active: Sequence[Row]) -> None:
        self.limits = limits
        self.taken = len(active)
        self.jobs = Counter(row["job_seq"] for row in active)
        self.hosts = Counter(row["host"] for row in active)
        self.owners = Counter(row["owner_id"] or "" for row in active)

    def left(self) -> bool:
        """Whether any runner may take one more file."""
        return self.taken < self.limits.total

    def full_jobs(self) -> list[int]:
        """The jobs (their ``seq``) that may take no more."""
        return [seq for seq, n in self.jobs.items() if n >= self.limits.per_job]

    def full_owners(self) -> list[str]:
        """The owners (``owner_id``, '' for anonymous) whose jobs may take no more."""
        return [owner for owner, n in self.owners.items() if n >= self.limits.per_owner]

    def host_open(self, host: str) -> bool:
        """Whether files for ``host`` may be taken."""
        return self.hosts[host] < self.limits.per_host

    def take(self, candidates: Sequence[Row]) -> Row:
        """Of the first due file of each host (rows with ``job_seq``, ``idx``, ``host``, ``priority``
        and ``owner_id``), the one to claim: highest priority, then oldest job, then lowest index;
        counted as taken."""
        row = min(candidates, key=lambda r: (-r["priority"], r["job_seq"], r["idx"]))
        self.taken += 1
        self.jobs[row["job_seq"]] += 1
        self.hosts[row["host"]] += 1
        self.owners[row["owner_id"] or ""] += 1
        return row
