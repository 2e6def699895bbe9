"""The job runner: takes the files of transfer jobs from the queue and copies each, verified, from
its source to its destination, through crashes, dropped connections and restarts.

One runner runs in each serving process; they share the queue through the state store, which hands
each file to one of them at a time (``JobStore.claim_files``: priority, then age, within the limits per
job, per destination host and in all) under a lease the runner renews while it works. Each attempt
at a file (:meth:`JobRunner._attempt`):

1. asks the source what it holds (size, validator, digests), and checks it against what the job
   declared;
2. persists the destination's plan (its idempotency key: the *intent*) before asking the destination
   to open the upload, and what it opened with the next record it writes (progress, or the attempt's
   end); so a runner that dies before that finds the same upload again instead of making a second one;
3. asks the destination how far it got and streams the rest from the source from that offset, counting
   the bytes, reporting progress, holding to the job's bandwidth, and watching for a stall: no byte
   (or no answer from either end) for ``job_stall_timeout`` seconds ends the attempt as *stalled*;
4. verifies end to end: the destination's digests of the published file must be the source's (as the
   source states them, or as computed from its bytes) and the job's declared checksum.

A failed attempt is classified (``FailureReason.kind``, as FTS3 does): permanent failures fail the
file at once; transient ones are retried after an exponential backoff with jitter, until the job's
``retry`` count is used up or ``job_max_idle_attempts`` attempts in a row moved no byte. A source
that changed since the destination's partial bytes were written restarts the file from zero.
Pausing, stopping or expiring a job reaches its running files through their leases: each ends its
attempt keeping the bytes the destination holds, and a resume continues from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..lifecycle.machine import Lifecycle
from ..security.logsafe import redact
from ..state.interface import Signal, SignalKind
from ..state.jobs import ClaimedFile, Job, JobFile, JobQuota, RunnerLimits
from .drivers.interface import Destination, DriverError, Order, Published, Source, SourceInfo
from .ends import Ends
from .invitations import VOUCHER_PAUSE, answer_of, ask, destination_name, invitation_target
from .states import FailureKind, FailureReason, FileJobState, JobState, JobStep, VerifyChecksum, public_url

log = logging.getLogger(__name__)

#: At most one progress event per file in this many seconds.
PROGRESS_INTERVAL = 1.0
#: Longest wait before a retry, however many attempts failed.
MAX_BACKOFF = 3600.0
#: The runner looks at the queue at least this often (other processes' submissions, due retries).
POLL_INTERVAL = 1.0
#: Hashing a chunk this large goes to a thread (it would hold the loop).
HASH_IN_THREAD = 256 << 10
#: How often a job waiting for an invitation's answer (or a voucher's extension) asks again.
INVITATION_POLL = 2.0


def job_quota(settings: Settings) -> JobQuota:
    """What one identity may keep in the queue."""
    return JobQuota(jobs=settings.max_jobs_per_client, files=settings.max_job_files)


def runner_limits(settings: Settings) -> RunnerLimits:
    """How many files may be copied at once."""
    return RunnerLimits(
        per_job=settings.job_concurrency_per_job,
        per_host=settings.job_concurrency_per_host,
        total=settings.job_concurrency,
        per_owner=settings.job_concurrency_per_client,
    )


class _Ended(Exception):
    """The attempt was told to end (pause, stop, expiry, a lost lease, the process stopping)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(eq=False)
class _Running:
    """One attempt under way: its task and why it is being ended, if it is."""

    claimed: ClaimedFile
    task: asyncio.Task[None] | None = None
    ending: str | None = None
    #: Bytes the destination held at the start of this attempt, and now.
    start_offset: int = 0
    offset: int = 0
    started: float = field(default_factory=time.monotonic)
    #: What the destination opened, not yet recorded: it goes with the next progress record or the end
    #: of the attempt (the intent recorded before the open finds the same upload again meanwhile).
    unrecorded: dict[str, Any] | None = None

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.offset - self.start_offset) / elapsed if elapsed > 0 else 0.0


class _Throttle:
    """A job's bandwidth limit, shared by its files in this process (up to a second's burst)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.until = time.monotonic()

    async def take(self, size: int) -> None:
        now = time.monotonic()
        self.until = max(self.until, now - 1.0) + size / self.rate
        if self.until > now:
            await asyncio.sleep(self.until - now)


class _Hasher:
    """The MD5 and SHA-256 of a source's bytes, for a source that states no digest."""

    def __init__(self) -> None:
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.size = 0

    async def update(self, chunk: bytes) -> None:
        if len(chunk) >= HASH_IN_THREAD:
            await asyncio.gather(
                asyncio.to_thread(self.md5.update, chunk), asyncio.to_thread(self.sha256.update, chunk)
            )
        else:
            self.md5.update(chunk)
            self.sha256.update(chunk)
        self.size += len(chunk)


class JobRunner:
    """Runs the queue's files in this process until :meth:`stop`."""

    def __init__(self, lifecycle: Lifecycle, settings: Settings) -> None:
        self.lifecycle = lifecycle
        self.state = lifecycle.state
        self.settings = settings
        self.holder = lifecycle.holder
        self.ends = Ends(lifecycle, settings)
        self.limits = runner_limits(settings)
        self.running: dict[tuple[str, int], _Running] = {}
        self._wake = asyncio.Event()
        #: Looks at leases that signals started, running.
        self._looks: set[asyncio.Task[None]] = set()
        self._throttles: dict[str, _Throttle] = {}
        self._stopping = False
        #: When each job waiting on another store's answer asks again.
        self._next_look: dict[str, float] = {}
        #: Expired jobs and leases are looked for this often (not at every wake: each file that ends
        #: wakes the runner), and when the next look is due (monotonic clock).
        self.housekeeping_interval = min(POLL_INTERVAL, settings.lease_time / 3)
        self._housekeeping_at = 0.0

    def wake(self) -> None:
        """Look at the queue now (a job was submitted, committed, resumed or retried here)."""
        self._wake.set()

    def heard(self, signal: Signal) -> None:
        """Another process changed the state: a queued file is claimed now; a job that changed
        state has its files here look at their leases now (all of them, if signals were missed)."""
        if signal.kind in (SignalKind.QUEUED, SignalKind.MISSED):
            self.wake()
        if signal.kind in (SignalKind.JOB, SignalKind.MISSED):
            for attempt in list(self.running.values()):
                if signal.kind is SignalKind.MISSED or attempt.claimed.job.id == signal.subject:
                    task = asyncio.create_task(self._look_when_signalled(attempt), name="datastore-job-signal")
                    self._looks.add(task)
                    task.add_done_callback(self._looks.discard)

    async def _look_when_signalled(self, attempt: _Running) -> None:
        try:
            await self._look_at_lease(attempt)
        except Exception:
            log.exception("looking at a job file's lease failed")

    async def notice(self, job_id: str) -> None:
        """A job was paused, stopped or expired here: its running files end now, not at their next
        lease renewal (other processes' files end at theirs)."""
        for attempt in list(self.running.values()):
            if attempt.claimed.job.id == job_id:
                await self._look_at_lease(attempt)

    async def run(self) -> None:
        """Claim and copy files until cancelled (and, beside, follow the invitations jobs wait for)."""
        invitations = asyncio.create_task(self._invitations_loop(), name="datastore-job-invitations")
        try:
            while True:
                now = time.time()
                try:
                    if time.monotonic() >= self._housekeeping_at:
                        self._housekeeping_at = time.monotonic() + self.housekeeping_interval
                        await self._housekeeping(now)
                    delay = self._delay(now, await self._fill(now))
                except Exception:
                    log.exception("the job runner's round failed")
                    delay = POLL_INTERVAL
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        finally:
            invitations.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await invitations
            await self.stop()

    async def _invitations_loop(self) -> None:
        """Every INVITATION_POLL: ask and follow invitations, apart from the claims (another store
        slow to answer holds up no copy)."""
        while True:
            try:
                await self._follow_invitations(time.time())
            except Exception:
                log.exception("following the jobs' invitations failed")
            await asyncio.sleep(INVITATION_POLL)

    async def stop(self) -> None:
        """End every running attempt (its file goes back to the queue, its bytes kept) and close."""
        self._stopping = True
        running = list(self.running.values())
        for attempt in running:
            attempt.ending = attempt.ending or "restarted"
            if attempt.task is not None:
                attempt.task.cancel()
        for attempt in running:
            if attempt.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await attempt.task
        await self.ends.close()

    async def discard(self, job: Job) -> None:
        """Drop what the destinations hold of a cleared job's unfinished files (best effort: an
        upload left behind expires there by itself)."""
        for file in job.files:
            if file.state is FileJobState.FINISHED or not file.handle:
                continue
            try:
                destination = self.ends.destination(job, file.destination)
                try:
                    await destination.discard(dict(file.handle))
                finally:
                    await destination.close()
            except Exception as exc:
                log.info("job %s: dropping the partial %s failed: %s", job.id[:8], public_url(file.destination), exc)

    async def _housekeeping(self, now: float) -> None:
        for job in await self.state.expire_due_jobs(now):
            log.info("job %s expired", job.id[:8])
            await self.notice(job.id)
        for job_id, index, holder in await self.state.expired_job_leases(now):
            if (job_id, index) in self.running and holder == self.holder:
                continue
            await self.state.end_attempt(
                job_id,
                index,
                holder,
                JobStep.REQUEUE,
                now=now,
                bytes=None,
                reason=FailureReason.LEASE_EXPIRED,
                error="the runner copying it stopped answering",
            )

    # -- invitations ----------------------------------------------------------------------------

    async def _follow_invitations(self, now: float) -> None:
        """Ask for the invitations jobs wait for, and follow their answers (one process per job)."""
        waiting = await self.state.jobs(None, states=[JobState.AWAITING_ACCEPTANCE, JobState.PAUSED], limit=1000)
        ids = {job.id for job in waiting}
        self._next_look = {job_id: when for job_id, when in self._next_look.items() if job_id in ids}
        for job in waiting:
            if job.state is JobState.PAUSED and not (job.reason or "").startswith(VOUCHER_PAUSE):
                continue
            if self._next_look.get(job.id, 0.0) > now:
                continue
            self._next_look[job.id] = now + INVITATION_POLL
            lease = f"job-invitation:{job.id}"
            if not await self.state.acquire(lease, self.holder, lease=60.0, now=now):
                continue
            try:
                async with asyncio.timeout(self.settings.job_stall_timeout):
                    await self._invitation(job, now)
            except TimeoutError:
                log.info("job %s: its destination store did not answer about the invitation", job.id[:8])
            except DriverError as exc:
                log.info("job %s: the invitation: %s", job.id[:8], exc.message)
            except Exception:
                log.exception("job %s: following its invitation failed", job.id[:8])
            finally:
                await self.state.release(lease, self.holder)

    async def _invitation(self, summary: Job, now: float) -> None:
        job = await self.state.job(summary.id)
        if job is None:
            return
        invitation = dict(job.invitation or {})
        if "id" not in invitation:
            if job.state is JobState.AWAITING_ACCEPTANCE:
                await self._ask(job, now)
            return
        token = job.spec.destination_token
        if token is None:
            return
        answer = await answer_of(self.ends.session, invitation, token)
        state = str(answer.get("state"))
        if state != invitation.get("state") or answer.get("left") != invitation.get("left"):
            await self.state.set_invitation(job.id, {**invitation, "state": state, "left": answer.get("left")})
        if job.state is JobState.AWAITING_ACCEPTANCE:
            if state == "ACCEPTED":
                await self.state.step(job.id, JobStep.ACCEPT, now=now)
                self.wake()
            elif state == "DECLINED":
                reason = f"declined by {answer.get('answered_by')}"
                await self.state.step(job.id, JobStep.DECLINE, now=now, reason=reason)
            elif state in ("EXPIRED", "REVOKED"):
                reason = f"the invitation was not accepted by {answer.get('answer_by')}"
                await self.state.step(job.id, JobStep.INVITE_TIMEOUT, now=now, reason=reason)
        elif state == "ACCEPTED" and (answer.get("left") is None or answer["left"] > 0):
            log.info("job %s: its voucher was extended; it resumes", job.id[:8])
            await self.state.step(job.id, JobStep.RESUME, now=now)
            self.wake()

    async def _ask(self, job: Job, now: float) -> None:
        """Ask the destination store for the invitation the job waits for."""
        certificate = self.settings.job_tls_cert is not None
        target = invitation_target([f.destination for f in job.files], certificate=certificate)
        if target is None:
            await self.state.step(job.id, JobStep.ACCEPT, now=now)
            return
        base, prefix = target
        mine = [f for f in job.files if f.destination.startswith(f"{base}/")]
        size = 0
        for file in mine:
            if file.declared_size is not None:
                size += file.declared_size
                continue
            source = self.ends.source(job, file.source, file.destination)
            try:
                size += (await source.stat()).size
            finally:
                await source.close()
        await self.state.set_invitation(job.id, {"base": base, "prefix": prefix, "state": "ASKING"})
        owner = job.owner.dn or job.owner.subject
        requester = f"{self.settings.public_url or 'a datastore'}: job {job.id[:8]} of {owner}"[:200]
        try:
            document, token = await ask(
                self.ends.session,
                base,
                prefix,
                names=sorted({destination_name(f.destination) for f in mine}),
                size=size,
                requester="".join(c if c.isprintable() else "?" for c in requester),
                wait=job.spec.max_time_in_queue,
            )
        except DriverError as exc:
            if exc.reason.kind is FailureKind.PERMANENT:
                reason = f"the destination refused the invitation: {exc.message}"
                await self.state.step(job.id, JobStep.DECLINE, now=now, reason=reason)
            raise
        invitation = {"base": base, "prefix": prefix, "id": document["id"], "state": document["state"]}
        await self.state.set_invitation(job.id, {**invitation, "answer_by": document.get("answer_by")}, token)
        log.info("job %s: asked %s for an invitation to /%s/", job.id[:8], public_url(base), prefix)

    async def _fill(self, now: float) -> float | None:
        """Claim as many files as there are free slots (one transaction); when the earliest file
        waiting for a retry becomes due (None: none waits, or no slot is free)."""
        free = self.limits.total - len(self.running)
        if self._stopping or free <= 0:
            return None
        claims = await self.state.claim_files(
            self.holder, lease=self.settings.lease_time, now=now, limits=self.limits, count=free
        )
        for claimed in claims.files:
            attempt = _Running(claimed, start_offset=claimed.file.bytes, offset=claimed.file.bytes)
            place = (claimed.job.id, claimed.file.index)
            self.running[place] = attempt
            attempt.task = asyncio.create_task(self._run_attempt(attempt), name=f"job-{claimed.job.id[:8]}")
        return claims.next_due

    def _delay(self, now: float, due: float | None) -> float:
        """How long until the next round unless woken: until a retry is due, a housekeeping round at most."""
        delay = POLL_INTERVAL if due is None else min(POLL_INTERVAL, max(0.0, due - now))
        return min(delay, self.housekeeping_interval)

    # -- one attempt ----------------------------------------------------------------------------

    async def _run_attempt(self, attempt: _Running) -> None:
        job, file = attempt.claimed.job, attempt.claimed.file
        place = (job.id, file.index)
        keeper = asyncio.create_task(self._keep_lease(attempt))
        source: Source | None = None
        destination: Destination | None = None
        try:
            source = self.ends.source(job, file.source, file.destination)
            destination = self.ends.destination(job, file.destination)
            published = await self._attempt(attempt, source, destination)
            await self._end(attempt, JobStep.FINISH, md5=published.md5, sha256=published.sha256, bytes=published.size)
            log.info("job %s: %s copied (%d bytes)", job.id[:8], public_url(file.destination), published.size)
        except asyncio.CancelledError:
            await self._ended(attempt, attempt.ending or "restarted")
            if not self._stopping and attempt.ending is None:
                raise
        except _Ended as ended:
            await self._ended(attempt, ended.why)
        except DriverError as failure:
            await self._failed(attempt, failure)
        except Exception as exc:
            log.exception("job %s: copying %s failed unexpectedly", job.id[:8], public_url(file.destination))
            internal = DriverError(FailureReason.SERVER_ERROR, f"an internal error ({type(exc).__name__})")
            await self._failed(attempt, internal)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            for end in (source, destination):
                if end is not None:
                    with contextlib.suppress(Exception):
                        await end.close()
            self.running.pop(place, None)
            if not any(other.claimed.job.id == job.id for other in self.running.values()):
                self._throttles.pop(job.id, None)
            if not self._stopping:
                self._wake.set()

    async def _attempt(self, attempt: _Running, source: Source, destination: Destination) -> Published:
        """One attempt at the file: stat, plan, open, resume, stream, verify."""
        job, file = attempt.claimed.job, attempt.claimed.file
        loop = asyncio.get_running_loop()
        stall = self.settings.job_stall_timeout
        streaming = False
        handle: dict[str, Any] = dict(file.handle)
        try:
            async with asyncio.timeout(stall) as watch:

                def alive() -> None:
                    watch.reschedule(loop.time() + stall)

                info = await source.stat()
                alive()
                _check_declared(job, file, info)
                order = _order(job, file, info)
                handle = destination.plan(handle, order)
                await self._persist(attempt, handle, info.size)
                planned = handle
                handle = await destination.open(handle, order)
                alive()
                if handle.get("idempotency_key") != planned.get("idempotency_key"):
                    # The destination chose a new intent itself: it is recorded now, as a plan is.
                    await self._persist(attempt, handle, info.size)
                elif handle != planned:
                    attempt.unrecorded = handle
                offset = await destination.offset(handle)
                alive()
                if offset > info.size:
                    raise DriverError(FailureReason.SOURCE_CHANGED, "the destination holds more than the source")
                if offset != attempt.start_offset:
                    # The destination holds other than recorded (less staged than counted, or a restart).
                    await self.state.progress(
                        *self._place(attempt),
                        self.holder,
                        bytes=offset,
                        rate=0.0,
                        announce=False,
                        resumed=True,
                        handle=self._unrecorded(attempt),
                    )
                attempt.start_offset = attempt.offset = offset
                hasher = None if _source_digest_known(job, info) else _Hasher()
                if hasher is not None and offset > 0:
                    # The source states no digest: hash what the destination already holds, from the source.
                    async for chunk in _limit(source.read(0, info), offset):
                        alive()
                        await hasher.update(chunk)
                if offset < info.size or info.size == 0:
                    streaming = True
                    chunks = self._metered(attempt, source.read(offset, info), hasher, alive, job)
                    reached = await destination.write(handle, offset, chunks)
                    streaming = False
                    attempt.offset = reached
                    if reached < info.size:
                        raise DriverError(
                            FailureReason.CONNECTION, f"the destination took {reached} of {info.size} bytes"
                        )
                # Verifying may read the whole file again (an rclone remote without digests): a mebibyte
                # a second is allowed on top of the stall time.
                watch.reschedule(loop.time() + stall + info.size / (1 << 20))
                published = await destination.finish(handle)
        except TimeoutError:
            what = "no byte moved" if streaming else "an end did not answer"
            raise DriverError(
                FailureReason.STALLED if streaming else FailureReason.TIMEOUT, f"{what} for {stall:g} s"
            ) from None
        except DriverError as failure:
            if failure.reason is FailureReason.SOURCE_CHANGED:
                # What the destination holds came from another version: it goes, the next attempt starts at 0.
                with contextlib.suppress(Exception):
                    await destination.discard(handle)
                await self._persist(attempt, {}, None)
                attempt.offset = 0
            raise
        _verify(job, file, info, published, hasher)
        return published

    async def _metered(
        self, attempt: _Running, chunks: AsyncIterator[bytes], hasher: _Hasher | None, alive: Any, job: Job
    ) -> AsyncIterator[bytes]:
        """``chunks`` as they flow to the destination: counted, hashed, throttled, reported, watched."""
        throttle = self._throttle(job)
        reported = time.monotonic()
        async for chunk in chunks:
            if attempt.ending is not None:
                raise _Ended(attempt.ending)
            alive()
            if hasher is not None:
                await hasher.update(chunk)
            if throttle is not None:
                await throttle.take(len(chunk))
            yield chunk
            attempt.offset += len(chunk)
            alive()
            if time.monotonic() - reported >= PROGRESS_INTERVAL:
                reported = time.monotonic()
                await self.state.progress(
                    *self._place(attempt),
                    self.holder,
                    bytes=attempt.offset,
                    rate=attempt.rate,
                    announce=True,
                    handle=self._unrecorded(attempt),
                )

    def _throttle(self, job: Job) -> _Throttle | None:
        if job.spec.bandwidth is None:
            return None
        throttle = self._throttles.get(job.id)
        if throttle is None or throttle.rate != job.spec.bandwidth:
            throttle = self._throttles[job.id] = _Throttle(job.spec.bandwidth)
        return throttle

    async def _keep_lease(self, attempt: _Running) -> None:
        """Renew the file's lease while the attempt runs; end the attempt when asked to (or if lost)."""
        interval = self.settings.lease_time / 3
        while attempt.ending is None:
            await asyncio.sleep(interval)
            await self._look_at_lease(attempt)

    async def _look_at_lease(self, attempt: _Running) -> None:
        """Renew the attempt's lease; end the attempt if it was lost or a stop was asked."""
        if attempt.ending is not None:
            return
        lease = await self.state.renew_job_file(
            *self._place(attempt), self.holder, lease=self.settings.lease_time, now=time.time()
        )
        why = "lost" if not lease.held else lease.stop_request
        if why is not None and attempt.task is not None and attempt.ending is None:
            attempt.ending = why
            attempt.task.cancel()

    async def _persist(self, attempt: _Running, handle: dict[str, Any], size: int | None) -> None:
        """Record ``handle`` now (an intent, before the external call it names)."""
        attempt.unrecorded = None
        if not await self.state.set_handle(*self._place(attempt), self.holder, handle, size=size):
            raise _Ended("lost")

    @staticmethod
    def _unrecorded(attempt: _Running) -> dict[str, Any] | None:
        """The opened handle for the record about to be written (and then no longer unrecorded)."""
        handle, attempt.unrecorded = attempt.unrecorded, None
        return handle

    # -- ending an attempt ----------------------------------------------------------------------

    def _place(self, attempt: _Running) -> tuple[str, int]:
        return attempt.claimed.job.id, attempt.claimed.file.index

    async def _end(self, attempt: _Running, outcome: JobStep, **values: Any) -> Job | None:
        values.setdefault("bytes", attempt.offset)
        values.setdefault("handle", self._unrecorded(attempt))
        call = self.state.end_attempt(*self._place(attempt), self.holder, outcome, now=time.time(), **values)
        return await asyncio.shield(call)

    async def _ended(self, attempt: _Running, why: str) -> None:
        """The attempt was ended from outside: its file waits (the job's state decides how)."""
        if why == "lost":
            return  # another runner holds it now
        reason = FailureReason.RESTARTED if why == "restarted" else None
        error = None if reason is None else "the store restarted"
        await self._end(attempt, JobStep.REQUEUE, reason=reason, error=error)

    async def _failed(self, attempt: _Running, failure: DriverError) -> None:
        job, file = attempt.claimed.job, attempt.claimed.file
        message = redact(failure.message)
        if failure.reason is FailureReason.VOUCHER_EXHAUSTED:
            # The job waits (its bytes kept) until the voucher's issuer extends it; then it resumes.
            reason = f"{VOUCHER_PAUSE}: the destination's voucher is used up; waiting for its issuer to extend it"
            await self.state.step(job.id, JobStep.PAUSE, now=time.time(), reason=reason)
            self._next_look.pop(job.id, None)
            await self._end(attempt, JobStep.REQUEUE, reason=failure.reason, error=message)
            return
        idle = file.idle_attempts + (1 if attempt.offset <= attempt.start_offset else 0)
        transient = failure.reason.kind is FailureKind.TRANSIENT
        if transient and idle >= self.settings.job_max_idle_attempts:
            reason, message = FailureReason.NO_PROGRESS, f"no progress over {idle} attempts; the last: {message}"
            transient = False
        else:
            reason = failure.reason
        if transient and attempt.claimed.attempt - file.attempts_base <= job.spec.retry:
            delay = _backoff(job.spec.retry_delay, attempt.claimed.attempt)
            log.info(
                "job %s: %s attempt %d failed (%s: %s); again in %.1f s",
                job.id[:8],
                public_url(file.destination),
                attempt.claimed.attempt,
                reason,
                message,
                delay,
            )
            await self._end(attempt, JobStep.REQUEUE, reason=reason, error=message, not_before=time.time() + delay)
        else:
            log.info("job %s: %s failed (%s: %s)", job.id[:8], public_url(file.destination), reason, message)
            await self._end(attempt, JobStep.FAIL, reason=reason, error=message)


def _backoff(base: float, attempt: int) -> float:
    """Exponential backoff with full jitter between half and all of ``base * 2**(attempt-1)``."""
    ceiling: float = min(MAX_BACKOFF, base * 2.0 ** max(0, attempt - 1))
    return ceiling * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not a secret


def _check_declared(job: Job, file: JobFile, info: SourceInfo) -> None:
    """A source that is not what the job declared fails at once (permanent)."""
    if file.declared_size is not None and file.declared_size != info.size:
        raise DriverError(
            FailureReason.SIZE_MISMATCH, f"the source has {info.size} bytes, the job declared {file.declared_size}"
        )
    if job.spec.verify_checksum in (VerifyChecksum.DESTINATION, VerifyChecksum.BOTH) and (
        _differ(file.md5, info.md5) or _differ(file.sha256, info.sha256)
    ):
        raise DriverError(FailureReason.CHECKSUM_MISMATCH, "the source's checksum is not the one the job declared")


def _differ(declared: str | None, stated: str | None) -> bool:
    return bool(declared and stated and declared != stated)


def _order(job: Job, file: JobFile, info: SourceInfo) -> Order:
    """What the destination is to hold and verify itself: the declared digests, else the source's."""
    verify = job.spec.verify_checksum
    md5 = file.md5 if verify in (VerifyChecksum.DESTINATION, VerifyChecksum.BOTH) else None
    sha256 = file.sha256 if verify in (VerifyChecksum.DESTINATION, VerifyChecksum.BOTH) else None
    if verify in (VerifyChecksum.SOURCE, VerifyChecksum.BOTH):
        md5, sha256 = md5 or info.md5, sha256 or info.sha256
    return Order(info.size, md5, sha256, info.validator)


def _source_digest_known(job: Job, info: SourceInfo) -> bool:
    return job.spec.verify_checksum in (VerifyChecksum.NONE, VerifyChecksum.DESTINATION) or bool(
        info.md5 or info.sha256
    )


def _verify(job: Job, file: JobFile, info: SourceInfo, published: Published, hasher: _Hasher | None) -> None:
    """End to end: the published file is the source's bytes (and the declared ones), or the attempt fails."""
    if published.size != info.size:
        raise DriverError(FailureReason.SIZE_MISMATCH, f"the destination holds {published.size} of {info.size} bytes")
    verify = job.spec.verify_checksum
    checks: list[tuple[str, str | None, str | None]] = []
    if verify in (VerifyChecksum.SOURCE, VerifyChecksum.BOTH):
        md5 = info.md5 or (hasher.md5.hexdigest() if hasher is not None else None)
        sha256 = info.sha256 or (hasher.sha256.hexdigest() if hasher is not None else None)
        checks += [("source md5", md5, published.md5), ("source sha-256", sha256, published.sha256)]
        if not any(a and b for _, a, b in checks):
            raise DriverError(FailureReason.UNSUPPORTED, "neither end states a digest to verify the copy by")
    if verify in (VerifyChecksum.DESTINATION, VerifyChecksum.BOTH):
        checks += [("declared md5", file.md5, published.md5), ("declared sha-256", file.sha256, published.sha256)]
    for what, expected, actual in checks:
        if expected and actual and expected != actual:
            raise DriverError(FailureReason.CHECKSUM_MISMATCH, f"the copy's digest is not the {what}")


async def _limit(chunks: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """The first ``size`` bytes of ``chunks``."""
    left = size
    async for chunk in chunks:
        if left <= 0:
            break
        yield chunk[:left]
        left -= len(chunk)
    if hasattr(chunks, "aclose"):
        await chunks.aclose()
