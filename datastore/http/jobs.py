"""The transfer jobs API under ``/_api/v1/jobs``: submit, list, status, events, priority, commit,
pause, resume, stop, retry and clear (pyRFT's calls, the CS3 notes' states), for the job's owner
(and administrators).

``POST /_api/v1/jobs`` takes ``{"files": [{"source", "destination", "size"?, "checksum"?}], ...}``
and answers 201 with the job (200 and the same job for a ``submission_id`` the owner used before).
A job is a known identity's (a certificate, a token issued for ``jobs``, or a DN the operator
trusts); each end is checked at submission: this store's prefixes as the submitter may use them
(read a source, upload a destination), http(s) hosts against ``job_hosts``, rclone remotes against
the operator's configuration. Credentials for the other ends travel in ``source_token`` and
``destination_token``, stored with the job and never shown again.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

from aiohttp import web

from ..errors import (
    BadRequest,
    Conflict,
    IdentityMismatch,
    NotAuthorized,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
)
from ..jobs.drivers.interface import DriverError
from ..jobs.ends import check_url
from ..jobs.invitations import needs_invitation
from ..jobs.runner import job_quota
from ..jobs.states import (
    CLEARABLE_JOB_STATES,
    FailureReason,
    JobState,
    JobStep,
    VerifyChecksum,
    job_sources,
    public_url,
)
from ..lifecycle.events import is_job_event, job_event_document
from ..lifecycle.states import Event
from ..protocol.timestamps import iso_time
from ..security.identity import Identity
from ..security.policy import Action
from ..state.jobs import Attempt, Job, JobFileSpec, JobSpec
from .bodies import read_json_object
from .context import CONTEXT, StoreContext, identify
from .sse import stream_events

#: Largest submission body accepted (a job of 10,000 files with long URLs fits).
MAX_JOB_REQUEST = 16 << 20
#: Longest URL or credential accepted for an end.
MAX_URL = 4096
_HEX = re.compile(r"^[0-9a-fA-F]+$")
#: The fields a submission may carry.
JOB_FIELDS = {
    "files",
    "priority",
    "verify_checksum",
    "retry",
    "retry_delay",
    "max_time_in_queue",
    "deadline",
    "commit",
    "submission_id",
    "bandwidth",
    "chunk_size",
    "source_token",
    "destination_token",
}
#: The user's steps: the URL's verb and the step.
JOB_STEPS = {
    "commit": JobStep.COMMIT,
    "pause": JobStep.PAUSE,
    "resume": JobStep.RESUME,
    "stop": JobStep.STOP,
    "retry": JobStep.RETRY,
}


async def handle_job_submit(request: web.Request) -> web.Response:
    """``POST /_api/v1/jobs``: submit a job (committed unless ``"commit": false``)."""
    ctx = request.app[CONTEXT]
    identity = await _job_identity(request)
    document = await read_json_object(request, MAX_JOB_REQUEST, ctx.settings, what="the job")
    spec, commit = parse_job(document, ctx)
    for file in spec.files:
        await _check_ends(ctx, identity, file)
    try:
        invite = needs_invitation(
            spec.destination_token,
            [f.destination for f in spec.files],
            certificate=ctx.settings.job_tls_cert is not None,
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    job, created = await ctx.state.submit(
        identity, spec, commit=commit, now=time.time(), quota=job_quota(ctx.settings), invite=invite
    )
    if created and ctx.jobs is not None:
        ctx.jobs.wake()
    return web.json_response(
        job_document(job, []),
        status=201 if created else 200,
        headers={"Location": _job_url(job), "Cache-Control": "no-store"},
    )


async def handle_job_list(request: web.Request) -> web.Response:
    """``GET /_api/v1/jobs[?state=S...][&limit=N][&after=CURSOR][&all=1]``: the client's jobs, oldest
    first (an administrator's ``all=1``: everyone's); ``next`` is the cursor of the following page."""
    ctx = request.app[CONTEXT]
    identity = await _job_identity(request)
    try:
        states = [JobState(s.upper()) for s in request.query.getall("state", [])]
    except ValueError:
        raise BadRequest(f"state must be one of {', '.join(JobState)}") from None
    limit = _query_int(request, "limit", 100, 1, 1000)
    after = _query_int(request, "after", 0, 0, 2**62)
    owner = None if identity.admin and request.query.get("all") in ("1", "true") else identity
    jobs = await ctx.state.jobs(owner, states=states, limit=limit, after=after)
    return web.json_response(
        {
            "jobs": [job_summary(job) for job in jobs],
            "next": jobs[-1].seq if len(jobs) == limit else None,
        },
        headers={"Cache-Control": "no-store"},
    )


async def handle_job_status(request: web.Request) -> web.Response:
    """``GET /_api/v1/jobs/{id}``: the job, its files and their attempts."""
    ctx = request.app[CONTEXT]
    job = await _owned_job(request)
    return web.json_response(job_document(job, await ctx.state.attempts(job.id)), headers={"Cache-Control": "no-store"})


async def handle_job_priority(request: web.Request) -> web.Response:
    """``PATCH /_api/v1/jobs/{id}`` with ``{"priority": 1-5}``: refused (409) once the job is active or finished."""
    ctx = request.app[CONTEXT]
    job = await _owned_job(request)
    document = await read_json_object(request, 4096, ctx.settings)
    if set(document) != {"priority"}:
        raise BadRequest('send {"priority": 1-5}')
    priority = _integer(document, "priority", 3, 1, 5)
    changed = await ctx.state.set_priority(job.id, priority)
    if changed is None:
        raise Conflict(f"the job is {job.state}: its priority can change only before it runs")
    return web.json_response(job_document(changed, await ctx.state.attempts(job.id)))


async def handle_job_step(request: web.Request) -> web.Response:
    """``POST /_api/v1/jobs/{id}/{commit|pause|resume|stop|retry}``: 409 if the job's state does not allow it."""
    ctx = request.app[CONTEXT]
    job = await _owned_job(request)
    verb = request.match_info["step"]
    step = JOB_STEPS.get(verb)
    if step is None:
        raise NotFound(f"no such step {verb!r}: use {', '.join(JOB_STEPS)}")
    identity = await identify(request)
    reason = f"{verb} by {identity.dn or identity.subject}" if step in (JobStep.STOP, JobStep.PAUSE) else None
    destinations = [f.destination for f in job.files]
    certificate = ctx.settings.job_tls_cert is not None
    if step is JobStep.COMMIT and needs_invitation(job.spec.destination_token, destinations, certificate=certificate):
        step = JobStep.INVITE  # committed, it first asks its destination store for an invitation
    after = await ctx.state.step(job.id, step, now=time.time(), reason=reason)
    if after is None:
        allowed = ", ".join(str(s) for s in job_sources(step))
        raise Conflict(f"the job is {job.state}: {verb} applies to a job that is {allowed}")
    if step in (JobStep.COMMIT, JobStep.RESUME, JobStep.RETRY) and ctx.jobs is not None:
        ctx.jobs.wake()
    if step in (JobStep.PAUSE, JobStep.STOP) and ctx.jobs is not None:
        await ctx.jobs.notice(job.id)
    return web.json_response(job_document(after, await ctx.state.attempts(job.id)))


async def handle_job_clear(request: web.Request) -> web.Response:
    """``DELETE /_api/v1/jobs/{id}``: forget a job that is not committed or no longer active; what its
    destinations hold of unfinished files is dropped."""
    ctx = request.app[CONTEXT]
    job = await _owned_job(request)
    cleared = await ctx.state.clear(job.id)
    if cleared is None:
        states = ", ".join(str(s) for s in sorted(CLEARABLE_JOB_STATES))
        raise Conflict(f"the job is {job.state}: only a job that is {states} (and idle) can be cleared")
    if ctx.jobs is not None:
        await ctx.jobs.discard(cleared)
    return web.Response(status=204)


async def handle_job_events(request: web.Request) -> web.StreamResponse:
    """``GET /_api/v1/jobs/{id}/events``: the job's events (SSE; ``Last-Event-ID`` replays)."""
    job = await _owned_job(request)

    def wants(event: Event) -> bool:
        return is_job_event(event) and event.key == job.id

    return await stream_events(request, wants, job_event_document)


async def handle_all_job_events(request: web.Request) -> web.StreamResponse:
    """``GET /_api/v1/jobs/events``: the events of all the client's jobs (an administrator's: everyone's)."""
    identity = await _job_identity(request)

    def wants(event: Event) -> bool:
        return is_job_event(event) and (identity.admin or event.owner_id == identity.principal)

    return await stream_events(request, wants, job_event_document)


# -- parsing a submission ---------------------------------------------------------------------


def parse_job(document: Any, ctx: StoreContext) -> tuple[JobSpec, bool]:
    """The job a submission describes, and whether to commit it; BadRequest naming the field."""
    if not isinstance(document, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(document) - JOB_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    files = document.get("files")
    if not isinstance(files, list) or not files:
        raise BadRequest("files must be a non-empty list of {source, destination, size?, checksum?}")
    if len(files) > ctx.settings.max_job_files:
        raise PayloadTooLarge(f"a job may copy at most {ctx.settings.max_job_files} files; this one lists {len(files)}")
    specs = tuple(_file(entry, index) for index, entry in enumerate(files))
    if sum(spec.size or 0 for spec in specs) > MAX_SIZE:
        raise BadRequest(f"the files' sizes add up to more than {MAX_SIZE} bytes")
    verify = document.get("verify_checksum", VerifyChecksum.BOTH.value)
    if not isinstance(verify, str) or verify not in {v.value for v in VerifyChecksum}:
        raise BadRequest(f"verify_checksum must be one of {', '.join(VerifyChecksum)}")
    commit = document.get("commit", True)
    if not isinstance(commit, bool):
        raise BadRequest("commit must be true or false")
    spec = JobSpec(
        files=specs,
        priority=_integer(document, "priority", 3, 1, 5),
        verify_checksum=VerifyChecksum(verify),
        retry=_integer(document, "retry", 3, 0, 100),
        retry_delay=_number(document, "retry_delay", 5.0, 0.0, 86400.0),
        max_time_in_queue=_number(document, "max_time_in_queue", None, 1.0, 10 * 365 * 86400.0),
        deadline=_deadline(document.get("deadline")),
        submission_id=_text(document, "submission_id", 255),
        bandwidth=_integer(document, "bandwidth", None, 1024, 1 << 40),
        chunk_size=_integer(document, "chunk_size", None, 4096, 64 << 20),
        source_token=_text(document, "source_token", MAX_URL),
        destination_token=_text(document, "destination_token", MAX_URL),
    )
    return spec, commit


#: Largest declared size, of one file and of a job's files together (an SQLite integer).
MAX_SIZE = (1 << 63) - 1
#: Latest deadline, in epoch seconds: 9999-12-31T23:59:59Z (statuses show it as an ISO 8601 time).
LAST_DEADLINE = 253402300799.0


def _file(entry: Any, index: int) -> JobFileSpec:
    where = f"files[{index}]"
    if not isinstance(entry, dict):
        raise BadRequest(f"{where} must be an object")
    unknown = sorted(set(entry) - {"source", "destination", "size", "checksum"})
    if unknown:
        raise BadRequest(f"{where}: unknown field {unknown[0]!r}")
    source, destination = entry.get("source"), entry.get("destination")
    for name, value in (("source", source), ("destination", destination)):
        if not isinstance(value, str) or not value or len(value) > MAX_URL:
            raise BadRequest(f"{where}.{name} must be a URL of at most {MAX_URL} characters")
    size = entry.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_SIZE):
        raise BadRequest(f"{where}.size must be a number of bytes from 0 to {MAX_SIZE}")
    md5, sha256 = _checksum(entry.get("checksum"), where)
    assert isinstance(source, str) and isinstance(destination, str)
    return JobFileSpec(source, destination, size, md5, sha256)


def _checksum(value: Any, where: str) -> tuple[str | None, str | None]:
    """``md5:HEX``, ``sha256:HEX`` (or ``sha-256:``), or bare hex (32 digits MD5, 64 SHA-256)."""
    if value is None:
        return None, None
    if not isinstance(value, str):
        raise BadRequest(f"{where}.checksum must be a string such as md5:HEX or sha256:HEX")
    algorithm, _, digest = value.rpartition(":")
    algorithm = algorithm.lower().replace("-", "") or {32: "md5", 64: "sha256"}.get(len(digest), "")
    lengths = {"md5": 32, "sha256": 64}
    if algorithm not in lengths or len(digest) != lengths[algorithm] or not _HEX.fullmatch(digest):
        raise BadRequest(f"{where}.checksum must be md5:HEX (32 digits) or sha256:HEX (64 digits)")
    return (digest.lower(), None) if algorithm == "md5" else (None, digest.lower())


def _integer(document: dict[str, Any], name: str, default: Any, low: int, high: int) -> Any:
    value = document.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return value


def _number(document: dict[str, Any], name: str, default: Any, low: float, high: float) -> Any:
    value = document.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"{name} must be a number from {low:g} to {high:g}")
    return float(value)


def _text(document: dict[str, Any], name: str, longest: int) -> str | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= longest or not value.isprintable():
        raise BadRequest(f"{name} must be 1 to {longest} printable characters")
    return value


def _deadline(value: Any) -> float | None:
    """An ISO 8601 time with a zone, or seconds since the epoch: from 1970 to the end of 9999."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= LAST_DEADLINE:
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None and 0 <= moment.timestamp() <= LAST_DEADLINE:
            return moment.timestamp()
    raise BadRequest(
        "deadline must be an ISO 8601 time with its zone (2026-12-31T23:00:00Z) or epoch seconds, from 1970 to 9999"
    )


async def _check_ends(ctx: StoreContext, identity: Identity, file: JobFileSpec) -> None:
    """Refuse at once an end the job could never reach (a clear 400/403 rather than a failed job)."""
    for url, destination in ((file.source, False), (file.destination, True)):
        try:
            local = check_url(url, ctx.settings, destination=destination)
        except DriverError as exc:
            message = f"{'destination' if destination else 'source'} {public_url(url)!r}: {exc.message}"
            if exc.reason is FailureReason.FORBIDDEN:
                raise NotAuthorized(message) from None
            raise BadRequest(message) from None
        if local is not None:
            prefix, name = local
            await ctx.mount(prefix).authorize(identity, Action.UPLOAD if destination else Action.READ, name)


# -- answers ----------------------------------------------------------------------------------


async def _job_identity(request: web.Request) -> Identity:
    """The client, if it may have jobs: a known identity whose token (if any) allows ``jobs``."""
    identity = await identify(request)
    if identity.anonymous:
        raise Unauthorized("sign in to use transfer jobs (a token or a client certificate)")
    if identity.grant is not None and not identity.grant.covers("jobs", None):
        raise NotAuthorized("the token does not allow jobs")
    return identity


async def _owned_job(request: web.Request) -> Job:
    identity = await _job_identity(request)
    job = await request.app[CONTEXT].state.job(request.match_info["id"])
    if job is None:
        raise NotFound("no such job")
    if not job.manageable_by(identity):
        raise IdentityMismatch()
    return job


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return value


def _job_url(job: Job) -> str:
    return f"/_api/v1/jobs/{job.id}"


def _time(value: float | None) -> str | None:
    return None if value is None else iso_time(value)


def job_summary(job: Job) -> dict[str, Any]:
    """A job without its files (lists)."""
    spec = job.spec
    return {
        "id": job.id,
        "url": _job_url(job),
        "state": str(job.state),
        "owner": job.owner.dn,
        "priority": spec.priority,
        "verify_checksum": str(spec.verify_checksum),
        "retry": spec.retry,
        "retry_delay": spec.retry_delay,
        "max_time_in_queue": spec.max_time_in_queue,
        "deadline": _time(spec.deadline),
        "submission_id": spec.submission_id,
        "bandwidth": spec.bandwidth,
        "chunk_size": spec.chunk_size,
        "reason": job.reason,
        "invitation": None if job.invitation is None else dict(job.invitation),
        "created_at": _time(job.created_at),
        "committed_at": _time(job.committed_at),
        "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at),
        "updated_at": _time(job.updated_at),
    }


def job_document(job: Job, attempts: list[Attempt]) -> dict[str, Any]:
    """A job with its files, their attempts, its totals and its last error."""
    history: dict[int, list[Attempt]] = {}
    for attempt in attempts:
        history.setdefault(attempt.index, []).append(attempt)
    counts: dict[str, int] = {}
    for file in job.files:
        counts[str(file.state)] = counts.get(str(file.state), 0) + 1
    failed = [f for f in job.files if f.error is not None]
    last = max(failed, key=lambda f: f.updated_at, default=None)
    sizes = [f.size for f in job.files]
    return {
        **job_summary(job),
        "files_by_state": counts,
        "bytes": sum(f.bytes for f in job.files),
        "size": None if None in sizes else sum(s for s in sizes if s is not None),
        "rate": sum(f.rate for f in job.files),
        "last_error": None
        if last is None
        else {"file": last.index, "reason": str(last.reason) if last.reason else None, "message": last.error},
        "files": [
            {
                "index": f.index,
                "source": public_url(f.source),
                "destination": public_url(f.destination),
                "state": str(f.state),
                "size": f.size,
                "bytes": f.bytes,
                "rate": f.rate,
                "attempts": f.attempts,
                "reason": str(f.reason) if f.reason else None,
                "error": f.error,
                "stalled": f.reason is FailureReason.STALLED,
                "next_attempt_at": _time(f.not_before) if f.not_before > time.time() else None,
                "md5": f.published_md5,
                "sha256": f.published_sha256,
                "started_at": _time(f.started_at),
                "finished_at": _time(f.finished_at),
                "history": [
                    {
                        "attempt": a.number,
                        "started_at": _time(a.started_at),
                        "ended_at": _time(a.ended_at),
                        "from": a.offset,
                        "to": a.bytes,
                        "outcome": a.outcome,
                        "reason": str(a.reason) if a.reason else None,
                        "error": a.error,
                    }
                    for a in history.get(f.index, [])
                ],
            }
            for f in job.files
        ],
    }
