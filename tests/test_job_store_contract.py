"""The contract suite of the job store (``datastore/state/jobs.py``), on every backend of
``test_state_contract`` (its ``state`` fixture): submitting, the queue's order and limits, leases,
the end of attempts and of jobs, the user's steps, expiry and purging, and the events each appends.
Time is given, nothing sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from datastore.errors import QuotaExceeded
from datastore.jobs.states import FailureReason, FileJobState, JobState, JobStep
from datastore.lifecycle.states import EventType
from datastore.security.identity import Identity, IdentityKind
from datastore.state.interface import StateStore
from datastore.state.jobs import ClaimedFile, JobFileSpec, JobQuota, JobSpec, JobStore, RunnerLimits
from datastore.state.sqlite import SqliteState

from .test_state_contract import Opener, open_store, state  # noqa: F401  (fixtures)

T0 = 1_000_000.0
LEASE = 30.0
ADA = Identity(IdentityKind.TOKEN, "ada", None, dn="ada")
BOB = Identity(IdentityKind.TOKEN, "bob", None, dn="bob")
QUOTA = JobQuota()
LIMITS = RunnerLimits(per_job=8, per_host=8, total=8, per_owner=8)


def spec(*names: str, priority: int = 3, **options: object) -> JobSpec:
    files = tuple(
        JobFileSpec(f"https://src.example:8443/files/{name}?sig=secret", f"local:/dest/{name}", size=10)
        for name in names
    )
    return JobSpec(files=files, priority=priority, **options)  # type: ignore[arg-type]


async def claim_next(store: JobStore, holder: str, **options: object) -> ClaimedFile | None:
    """The one file a claim of one takes, or None."""
    claims = (await store.claim_files(holder, **options)).files  # type: ignore[arg-type]
    assert len(claims) <= 1
    return claims[0] if claims else None


async def types_after(state: StateStore, last: int) -> list[str]:
    return [str(e.type) for e in await state.events_after(last, limit=1000)]


async def test_submit_stores_a_queued_job_and_announces_it(state: StateStore) -> None:
    before = await state.last_event_id()
    job, created = await state.submit(ADA, spec("a", "b", source_token="tok"), commit=True, now=T0, quota=QUOTA)
    assert created and job.state is JobState.QUEUED and len(job.id) == 32
    assert [f.state for f in job.files] == [FileJobState.QUEUED] * 2
    assert job.spec.source_token == "tok" and job.owner == ADA
    assert await types_after(state, before) == ["job.submitted", "job.queued"]
    loaded = await state.job(job.id)
    assert loaded == job  # the job a submission answers is the one stored


async def test_a_submission_id_returns_the_same_job_per_owner(state: StateStore) -> None:
    first, created = await state.submit(ADA, spec("a", submission_id="s1"), commit=True, now=T0, quota=QUOTA)
    again, created_again = await state.submit(ADA, spec("b", submission_id="s1"), commit=True, now=T0, quota=QUOTA)
    other, created_other = await state.submit(BOB, spec("a", submission_id="s1"), commit=True, now=T0, quota=QUOTA)
    assert created and not created_again and again.id == first.id
    assert created_other and other.id != first.id


async def test_the_quota_bounds_unfinished_jobs_and_files(state: StateStore) -> None:
    small = JobQuota(jobs=1, files=2)
    await state.submit(ADA, spec("a"), commit=True, now=T0, quota=small)
    with pytest.raises(QuotaExceeded, match="limit is 1"):
        await state.submit(ADA, spec("b"), commit=True, now=T0, quota=small)
    with pytest.raises(QuotaExceeded, match="at most 2 files"):
        await state.submit(BOB, spec("a", "b", "c"), commit=True, now=T0, quota=small)


async def test_claims_go_by_priority_then_age_and_skip_uncommitted_jobs(state: StateStore) -> None:
    low, _ = await state.submit(ADA, spec("low", priority=2), commit=True, now=T0, quota=QUOTA)
    held, _ = await state.submit(ADA, spec("held", priority=5), commit=False, now=T0, quota=QUOTA)
    old, _ = await state.submit(ADA, spec("old", priority=4), commit=True, now=T0 + 1, quota=QUOTA)
    new, _ = await state.submit(ADA, spec("new", priority=4), commit=True, now=T0 + 2, quota=QUOTA)
    order = []
    for _ in range(4):
        claimed = await claim_next(state, "r1", lease=LEASE, now=T0 + 3, limits=LIMITS)
        if claimed is None:
            break
        order.append(claimed.job.id)
    assert order == [old.id, new.id, low.id]
    assert held.id not in order


async def test_limits_per_job_per_host_and_in_all(state: StateStore) -> None:
    job, _ = await state.submit(ADA, spec("a", "b", "c"), commit=True, now=T0, quota=QUOTA)
    limits = RunnerLimits(per_job=2, per_host=8, total=8)
    assert await claim_next(state, "r", lease=LEASE, now=T0, limits=limits) is not None
    assert await claim_next(state, "r", lease=LEASE, now=T0, limits=limits) is not None
    assert await claim_next(state, "r", lease=LEASE, now=T0, limits=limits) is None
    other, _ = await state.submit(BOB, spec("x"), commit=True, now=T0, quota=QUOTA)
    assert await claim_next(state, "r", lease=LEASE, now=T0, limits=RunnerLimits(8, 2, 8, 8)) is None  # one host: dest
    claimed = await claim_next(state, "r", lease=LEASE, now=T0, limits=RunnerLimits(8, 8, 3, 8))
    assert claimed is not None and claimed.job.id == job.id
    assert await claim_next(state, "r", lease=LEASE, now=T0, limits=RunnerLimits(8, 8, 3, 8)) is None
    assert other.state is JobState.QUEUED


async def test_one_claim_takes_several_files_within_the_limits(state: StateStore) -> None:
    first, _ = await state.submit(ADA, spec("a", "b", "c"), commit=True, now=T0, quota=QUOTA)
    second, _ = await state.submit(BOB, spec("x", "y"), commit=True, now=T0 + 1, quota=QUOTA)
    limits = RunnerLimits(per_job=2, per_host=8, total=3, per_owner=8)
    claims = (await state.claim_files("r", lease=LEASE, now=T0, limits=limits, count=5)).files
    assert [(c.job.id, c.file.index) for c in claims] == [(first.id, 0), (first.id, 1), (second.id, 0)]
    assert all(c.attempt == 1 and c.file.state is FileJobState.ACTIVE for c in claims)
    assert (await state.claim_files("r", lease=LEASE, now=T0, limits=limits, count=5)).files == ()
    more = (await state.claim_files("r", lease=LEASE, now=T0, limits=RunnerLimits(2, 8, 8, 8), count=5)).files
    assert [(c.job.id, c.file.index) for c in more] == [(second.id, 1)]


async def test_one_owner_never_takes_every_slot(state: StateStore) -> None:
    await state.submit(ADA, spec("a", "b", "c"), commit=True, now=T0, quota=QUOTA)
    await state.submit(ADA, spec("d"), commit=True, now=T0 + 1, quota=QUOTA)
    bobs, _ = await state.submit(BOB, spec("x"), commit=True, now=T0 + 2, quota=QUOTA)
    limits = RunnerLimits(per_job=8, per_host=8, total=8, per_owner=2)
    taken = [await claim_next(state, "r", lease=LEASE, now=T0, limits=limits) for _ in range(4)]
    owners = [c.job.owner if c is not None else None for c in taken]
    assert owners == [ADA, ADA, BOB, None]
    assert taken[2] is not None and taken[2].job.id == bobs.id


async def test_two_runners_never_claim_the_same_file(open_store: Opener) -> None:
    one, two = open_store(), open_store()
    await one.submit(ADA, spec(*[f"f{i}" for i in range(6)]), commit=True, now=T0, quota=QUOTA)
    claims = await asyncio.gather(
        *[
            claim_next(store, holder, lease=LEASE, now=T0, limits=LIMITS)
            for store, holder in [(one, "r1"), (two, "r2")] * 4
        ]
    )
    got = [(c.job.id, c.file.index) for c in claims if c is not None]
    assert len(got) == 6 == len(set(got))


async def test_a_finished_file_settles_the_job_with_its_digests(state: StateStore) -> None:
    job, _ = await state.submit(ADA, spec("a", "b"), commit=True, now=T0, quota=QUOTA)
    before = await state.last_event_id()
    a = await claim_next(state, "r", lease=LEASE, now=T0, limits=LIMITS)
    b = await claim_next(state, "r", lease=LEASE, now=T0, limits=LIMITS)
    assert a is not None and b is not None and a.attempt == 1
    assert await state.set_handle(job.id, 0, "r", {"upload_url": "u"}, size=10)
    assert await state.progress(job.id, 0, "r", bytes=5, rate=100.0, announce=True)
    after = await state.end_attempt(job.id, 0, "r", JobStep.FINISH, now=T0 + 1, bytes=10, md5="m", sha256="s")
    assert after is not None and after.state is JobState.ACTIVE
    done = await state.end_attempt(
        job.id, 1, "r", JobStep.FAIL, now=T0 + 2, bytes=0, reason=FailureReason.NOT_FOUND, error="404"
    )
    assert done is not None and done.state is JobState.FINISHED_DIRTY and done.finished_at == T0 + 2
    first = done.files[0]
    assert (first.state, first.bytes, first.published_md5, first.handle) == (
        FileJobState.FINISHED,
        10,
        "m",
        {"upload_url": "u"},
    )
    assert (done.files[1].reason, done.files[1].error) == (FailureReason.NOT_FOUND, "404")
    events = await state.events_after(before, limit=100)
    assert [str(e.type) for e in events] == [
        "job.active",
        "job.file.started",
        "job.file.started",
        "job.file.progress",
        "job.file.finished",
        "job.file.failed",
        "job.finished_dirty",
    ]
    # Events name the destination without credentials; the source's signed query never shows.
    assert all("secret" not in repr(e) for e in events)
    attempts = await state.attempts(job.id)
    assert [(a.index, a.outcome, a.bytes) for a in attempts] == [(0, "finished", 10), (1, "failed", 0)]


async def test_a_requeued_file_waits_for_its_time_and_a_stale_holder_changes_nothing(state: StateStore) -> None:
    job, _ = await state.submit(ADA, spec("a"), commit=True, now=T0, quota=QUOTA)
    await claim_next(state, "r", lease=LEASE, now=T0, limits=LIMITS)
    assert await state.end_attempt(job.id, 0, "other", JobStep.FINISH, now=T0, bytes=10) is None
    await state.end_attempt(
        job.id, 0, "r", JobStep.REQUEUE, now=T0, bytes=4, reason=FailureReason.CONNECTION, not_before=T0 + 10
    )
    waiting = await state.claim_files("r", lease=LEASE, now=T0 + 5, limits=LIMITS)
    assert waiting.files == () and waiting.next_due == T0 + 10
    assert await state.next_due(T0 + 5) == T0 + 10
    again = await claim_next(state, "r", lease=LEASE, now=T0 + 10, limits=LIMITS)
    assert again is not None and again.attempt == 2 and again.file.bytes == 4
    attempts = await state.attempts(job.id)
    assert [(a.offset, a.outcome, a.reason) for a in attempts] == [
        (0, "retrying", FailureReason.CONNECTION),
        (4, None, None),
    ]


async def test_an_expired_lease_is_found_and_its_file_requeued_by_anyone(state: StateStore) -> None:
    job, _ = await state.submit(ADA, spec("a"), commit=True, now=T0, quota=QUOTA)
    await claim_next(state, "dead", lease=LEASE, now=T0, limits=LIMITS)
    assert await state.expired_job_leases(T0 + LEASE - 1) == []
    assert await state.held_by("dead") == await state.held_by(None) == [(job.id, 0, "dead")]
    renewed = await state.renew_job_file(job.id, 0, "dead", lease=LEASE, now=T0 + 10)
    assert renewed.held and renewed.stop_request is None
    assert await state.expired_job_leases(T0 + 10 + LEASE) == [(job.id, 0, "dead")]
    assert await state.progress(job.id, 0, "dead", bytes=4, rate=0.0, announce=False)
    # Whoever finds the lease ran out cannot tell how far the file got: it keeps what was recorded.
    await state.end_attempt(
        job.id, 0, "dead", JobStep.REQUEUE, now=T0 + 41, bytes=None, reason=FailureReason.LEASE_EXPIRED
    )
    loaded = await state.job(job.id)
    assert loaded is not None and loaded.files[0].state is FileJobState.QUEUED
    assert (loaded.files[0].bytes, loaded.files[0].idle_attempts) == (4, 0)
    assert not (await state.renew_job_file(job.id, 0, "dead", lease=LEASE, now=T0 + 42)).held
    # An attempt that moves no byte more counts as idle.
    await claim_next(state, "r", lease=LEASE, now=T0 + 43, limits=LIMITS)
    await state.end_attempt(job.id, 0, "r", JobStep.REQUEUE, now=T0 + 44, bytes=4, reason=FailureReason.TIMEOUT)
    again = await state.job(job.id)
    assert again is not None and again.files[0].idle_attempts == 1


async def test_pause_asks_the_runner_and_the_file_takes_the_jobs_state_then_resume_requeues(state: StateStore) -> None:
    job, _ = await state.submit(ADA, spec("a", "b"), commit=True, now=T0, quota=QUOTA)
    await claim_next(state, "r", lease=LEASE, now=T0, limits=RunnerLimits(1, 8, 8, 8))
    paused = await state.step(job.id, JobStep.PAUSE, now=T0 + 1)
    assert paused is not None and paused.state is JobState.PAUSED
    assert [f.state for f in paused.files] == [FileJobState.ACTIVE, FileJobState.PAUSED]
    lease = await state.renew_job_file(job.id, 0, "r", lease=LEASE, now=T0 + 1)
    assert lease.stop_request == "pause" and lease.job_state is JobState.PAUSED
    assert await claim_next(state, "r", lease=LEASE, now=T0 + 1, limits=LIMITS) is None
    await state.end_attempt(job.id, 0, "r", JobStep.REQUEUE, now=T0 + 2, bytes=6, reason=FailureReason.CONNECTION)
    loaded = await state.job(job.id)
    assert loaded is not None and [f.state for f in loaded.files] == [FileJobState.PAUSED] * 2
    assert loaded.files[0].bytes == 6
    assert await state.step(job.id, JobStep.PAUSE, now=T0 + 3) is None
    resumed = await state.step(job.id, JobStep.RESUME, now=T0 + 3)
    assert resumed is not None and resumed.state is JobState.QUEUED
    assert [f.state for f in resumed.files] == [FileJobState.QUEUED] * 2


async def test_stop_keeps_what_was_done_and_a_stopped_job_may_resume_or_be_cleared(state: StateStore) -> None:
    job, _ = await state.submit(ADA, spec("a"), commit=True, now=T0, quota=QUOTA)
    await claim_next(state, "r", lease=LEASE, now=T0, limits=LIMITS)
    stopped = await state.step(job.id, JobStep.STOP, now=T0 + 1, reason="stopped by ada")
    assert stopped is not None and stopped.state is JobState.USER_STOPPED and stopped.reason == "stopped by ada"
    assert await state.clear(job.id) is None  # a runner still holds its file
    await state.end_attempt(job.id, 0, "r", JobStep.REQUEUE, now=T0 + 2, bytes=3)
    loaded = await state.job(job.id)
    assert loaded is not None and loaded.files[0].state is FileJobState.USER_STOPPED and loaded.files[0].bytes == 3
    cleared = await state.clear(job.id)
    assert cleared is not None and cleared.id == job.id and await state.job(job.id) is None


async def test_commit_priority_and_clear_follow_pyrfts_rules(state: StateStore) -> None:
    job, _ = await state.submit(ADA, spec("a"), commit=False, now=T0, quota=QUOTA)
    assert job.state is JobState.SUBMITTED
    changed = await state.set_priority(job.id, 5)
    assert changed is not None and changed.priority == 5
    committed = await state.step(job.id, JobStep.COMMIT, now=T0 + 1)
    assert committed is not None and committed.state is JobState.QUEUED and committed.committed_at == T0 + 1
    assert await state.step(job.id, JobStep.COMMIT, now=T0 + 1) is None
    assert await state.clear(job.id) is None  # committed and not finished
    await claim_next(state, "r", lease=LEASE, now=T0 + 2, limits=LIMITS)
    assert await state.set_priority(job.id, 1) is None  # active


async def test_retry_brings_failed_files_back_with_a_fresh_count(state: StateStore) -> None:
    job, _ = await state.submit(ADA, spec("a", "b"), commit=True, now=T0, quota=QUOTA)
    for _ in (0, 1):
        await claim_next(state, "r", lease=LEASE, now=T0, limits=LIMITS)
    await state.end_attempt(job.id, 0, "r", JobStep.FINISH, now=T0, bytes=10)
    failed = await state.end_attempt(job.id, 1, "r", JobStep.FAIL, now=T0, bytes=2, reason=FailureReason.NO_PROGRESS)
    assert failed is not None and failed.state is JobState.FINISHED_DIRTY
    retried = await state.step(job.id, JobStep.RETRY, now=T0 + 1)
    assert retried is not None and retried.state is JobState.QUEUED and retried.finished_at is None
    assert [f.state for f in retried.files] == [FileJobState.FINISHED, FileJobState.QUEUED]
    assert (retried.files[1].attempts, retried.files[1].attempts_base, retried.files[1].bytes) == (1, 1, 2)
    again = await claim_next(state, "r", lease=LEASE, now=T0 + 2, limits=LIMITS)
    assert again is not None and again.attempt == 2


async def test_expiry_by_time_in_queue_and_by_deadline_then_purge(state: StateStore) -> None:
    waiting, _ = await state.submit(ADA, spec("a", max_time_in_queue=60.0), commit=True, now=T0, quota=QUOTA)
    late, _ = await state.submit(ADA, spec("b", deadline=T0 + 100), commit=True, now=T0, quota=QUOTA)
    fine, _ = await state.submit(ADA, spec("c"), commit=True, now=T0, quota=QUOTA)
    assert await state.expire_due_jobs(T0 + 59) == []
    assert [j.id for j in await state.expire_due_jobs(T0 + 60)] == [waiting.id]
    assert [j.id for j in await state.expire_due_jobs(T0 + 100)] == [late.id]
    expired = await state.job(waiting.id)
    assert expired is not None and expired.state is JobState.EXPIRED and expired.files[0].state is FileJobState.EXPIRED
    assert await state.purge_jobs(T0 + 60) == 0
    assert await state.purge_jobs(T0 + 101) == 2
    assert await state.job(waiting.id) is None and await state.job(fine.id) is not None


async def test_lists_are_per_owner_filtered_and_paginated(state: StateStore) -> None:
    ids = [(await state.submit(ADA, spec(f"f{i}"), commit=i % 2 == 0, now=T0, quota=QUOTA))[0] for i in range(5)]
    await state.submit(BOB, spec("x"), commit=True, now=T0, quota=QUOTA)
    page = await state.jobs(ADA, limit=2)
    assert [j.id for j in page] == [ids[0].id, ids[1].id]
    rest = await state.jobs(ADA, limit=10, after=page[-1].seq)
    assert [j.id for j in rest] == [j.id for j in ids[2:]]
    submitted = await state.jobs(ADA, states=[JobState.SUBMITTED])
    assert [j.id for j in submitted] == [ids[1].id, ids[3].id]
    assert len(await state.jobs(None)) == 6


def test_every_job_event_type_is_an_event_type() -> None:
    assert EventType("job.file.finished") is EventType.JOB_FILE_FINISHED


async def test_a_sqlite_file_from_before_the_queue_index_is_brought_up_to_date(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    before = SqliteState(path)
    low, _ = await before.submit(ADA, spec("low", priority=2), commit=True, now=T0, quota=QUOTA)
    high, _ = await before.submit(ADA, spec("high", priority=5), commit=True, now=T0 + 1, quota=QUOTA)
    await before.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DROP INDEX job_files_queue")
        db.execute("ALTER TABLE job_files DROP COLUMN priority")
        db.commit()
    after = SqliteState(path)
    try:
        claims = await after.claim_files("r", lease=LEASE, now=T0 + 2, limits=LIMITS, count=2)
        assert [c.job.id for c in claims.files] == [high.id, low.id]
    finally:
        await after.close()
