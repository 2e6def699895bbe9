"""What the two backends of the job store (``sqlite_jobs.py``, ``postgres_jobs.py``) share besides its
contracts (``jobs.py``): the job ids, the states the steps look for, the destination's host, how
rows of ``jobs``, ``job_files`` and ``job_attempts`` (the same columns in both databases) read back
as records and how the settings are stored in them, and what the events of a job say. Pure Python:
the SQL, and what differs between the databases, stays in each backend.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Mapping
from dataclasses import fields
from typing import Any
from urllib.parse import urlsplit

from ..jobs.states import (
    FINAL_JOB_STATES,
    OPEN_FILE_STATES,
    FailureReason,
    FileJobState,
    JobState,
    JobStep,
    VerifyChecksum,
    public_url,
)
from ..lifecycle.states import EventType, NewEvent
from ..security.identity import Identity
from .jobs import Attempt, Job, JobFile, JobSpec
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
OUTCOMES: Mapping[JobStep, tuple[str, EventType]] = {
    JobStep.FINISH: ("finished", EventType.JOB_FILE_FINISHED),
    JobStep.REQUEUE: ("retrying", EventType.JOB_FILE_RETRYING),
    JobStep.FAIL: ("failed", EventType.JOB_FILE_FAILED),
}
#: The spec's fields kept apart from its settings (in their own columns and rows).
_NOT_SETTINGS = frozenset({"files", "source_token", "destination_token"})


def new_job_id() -> str:
    """An unguessable job id: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


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
