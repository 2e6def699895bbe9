"""The PostgreSQL backend of the job store (``jobs.py``): tables ``jobs``, ``job_files`` and
``job_attempts`` in the state's database, beside the transfers, so that a job's events share the
event log and its transactions (component ``jobs`` of ``datastore_schema``).

:class:`PostgresJobs` is mixed into ``PostgresState``; each method is one transaction, a write
taking the state store's turn as every write does (``postgres.py``). Every state change is an
UPDATE guarded by the states ``jobs.states``' tables let the step leave and, for a runner's steps,
by the lease's holder; the step's events go in the same transaction. How rows read back as jobs,
files and attempts, what the events of a job say and what its steps decide is shared with
``sqlite_jobs.py`` (``job_records.py``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from psycopg.rows import DictRow

from ..jobs.states import (
    JOB_STATE_EVENTS,
    REPRIORITIZABLE_JOB_STATES,
    FailureReason,
    FileJobState,
    JobState,
    JobStep,
    job_sources,
)
from ..lifecycle.states import EventType
from ..security.identity import Identity
from .job_records import (
    FINAL,
    RUNNABLE,
    UNFINISHED,
    UNSETTLED,
    Slots,
    attempt_end,
    attempt_from_row,
    clearable,
    destination_host,
    expire_jobs,
    file_event,
    handle_json,
    job_event,
    job_file_from_row,
    job_from_row,
    lease_of,
    new_job_id,
    settings_json,
    settings_with_priority,
    settled_in,
    started_events,
    step_changes,
    submission_events,
    submission_state,
    submitted_job,
)
from .jobs import Attempt, ClaimedFile, Claims, Job, JobQuota, JobSpec, Lease, RunnerLimits
from .postgres_database import Connection, Migration, PostgresDatabase, fetch_all, fetch_one
from .postgres_events import insert_events
from .postgres_signals import JOB_SIGNALS

MIGRATIONS = (
    Migration(
        1,
        (
            """
            CREATE TABLE jobs (
                seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                owner TEXT,
                owner_id TEXT,
                state TEXT NOT NULL,
                priority INTEGER NOT NULL,
                -- The settings of the submission (JSON), without its files and credentials.
                spec TEXT NOT NULL,
                submission_id TEXT,
                source_token TEXT,
                destination_token TEXT,
                -- The invitation asked of the destination store (JSON, without its token), or NULL.
                invitation TEXT,
                -- The spec's deadline and max_time_in_queue, for finding the jobs due to expire in SQL.
                deadline DOUBLE PRECISION,
                max_wait DOUBLE PRECISION,
                reason TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                committed_at DOUBLE PRECISION,
                started_at DOUBLE PRECISION,
                finished_at DOUBLE PRECISION
            )
            """,
            "CREATE UNIQUE INDEX jobs_by_submission ON jobs (owner_id, submission_id) WHERE submission_id IS NOT NULL",
            "CREATE INDEX jobs_by_owner ON jobs (owner_id, seq)",
            "CREATE INDEX jobs_by_owner_state ON jobs (owner_id, state)",
            "CREATE INDEX jobs_by_state ON jobs (state, finished_at)",
            "CREATE INDEX jobs_by_priority ON jobs (state, priority DESC, seq)",
            """
            CREATE TABLE job_files (
                job_seq BIGINT NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
                idx INTEGER NOT NULL,
                source TEXT NOT NULL,
                destination TEXT NOT NULL,
                -- The destination's host: what the per-host limit counts.
                host TEXT NOT NULL,
                size BIGINT,
                declared_size BIGINT,
                md5 TEXT,
                sha256 TEXT,
                state TEXT NOT NULL,
                -- The job's priority, kept here too so that the queue is read in its order from one index.
                priority INTEGER NOT NULL DEFAULT 3,
                bytes BIGINT NOT NULL DEFAULT 0,
                rate DOUBLE PRECISION NOT NULL DEFAULT 0,
                attempts INTEGER NOT NULL DEFAULT 0,
                -- The attempts made before the last retry (a retry starts a fresh count of them).
                attempts_base INTEGER NOT NULL DEFAULT 0,
                idle_attempts INTEGER NOT NULL DEFAULT 0,
                reason TEXT,
                error TEXT,
                not_before DOUBLE PRECISION NOT NULL DEFAULT 0,
                claimed_by TEXT,
                lease_until DOUBLE PRECISION,
                stop_request TEXT,
                handle TEXT NOT NULL DEFAULT '{}',
                published_md5 TEXT,
                published_sha256 TEXT,
                started_at DOUBLE PRECISION,
                finished_at DOUBLE PRECISION,
                updated_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (job_seq, idx)
            )
            """,
            "CREATE INDEX job_files_by_state ON job_files (state, not_before)",
            "CREATE INDEX job_files_by_job_state ON job_files (job_seq, state)",
            # The queue per destination host, in the order files are claimed.
            "CREATE INDEX job_files_queue ON job_files (state, host, priority DESC, job_seq, idx)",
            """
            CREATE TABLE job_attempts (
                job_seq BIGINT NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
                idx INTEGER NOT NULL,
                number INTEGER NOT NULL,
                holder TEXT NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                "offset" BIGINT NOT NULL,
                ended_at DOUBLE PRECISION,
                bytes BIGINT,
                outcome TEXT,
                reason TEXT,
                error TEXT,
                PRIMARY KEY (job_seq, idx, number)
            )
            """,
        ),
    ),
    # Cross-node signals (``postgres_signals.py``).
    Migration(2, JOB_SIGNALS),
)

T = TypeVar("T")

_F = FileJobState
_J = JobState


def _in(states: Sequence[object]) -> str:
    return "(" + ", ".join(["%s"] * len(states)) + ")"


class PostgresJobs:
    """The job store's methods of ``PostgresState`` (which provides ``_db`` and ``_run``)."""

    _db: PostgresDatabase
    _run: Callable[[Callable[[Connection], Awaitable[Any]]], Awaitable[Any]]

    async def submit(
        self, owner: Identity, spec: JobSpec, *, commit: bool, now: float, quota: JobQuota, invite: bool = False
    ) -> tuple[Job, bool]:
        async def submit(db: Connection) -> tuple[Job, bool]:
            if spec.submission_id is not None:
                row = await fetch_one(
                    db,
                    "SELECT seq FROM jobs WHERE owner_id IS NOT DISTINCT FROM %s AND submission_id = %s",
                    (owner.principal, spec.submission_id),
                )
                if row is not None:
                    job = await _load(db, seq=row["seq"])
                    assert job is not None
                    return job, False
            # Counted up to the quota only: what the check needs, in bounded time however long the queue.
            counted = await fetch_one(
                db,
                "SELECT COUNT(*) AS n FROM (SELECT 1 FROM jobs WHERE owner_id IS NOT DISTINCT FROM %s"
                f" AND state IN {_in(UNFINISHED)} LIMIT %s) AS open_jobs",
                (owner.principal, *UNFINISHED, quota.jobs),
            )
            assert counted is not None
            quota.check(int(counted["n"]), len(spec.files))
            state = submission_state(commit=commit, invite=invite)
            job_id = new_job_id()
            inserted = await fetch_one(
                db,
                "INSERT INTO jobs (id, owner, owner_id, state, priority, spec, submission_id, source_token,"
                " destination_token, created_at, updated_at, committed_at, deadline, max_wait)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING seq",
                (
                    job_id,
                    owner.dn,
                    owner.principal,
                    state,
                    spec.priority,
                    settings_json(spec),
                    spec.submission_id,
                    spec.source_token,
                    spec.destination_token,
                    now,
                    now,
                    now if commit else None,
                    spec.deadline,
                    spec.max_time_in_queue,
                ),
            )
            assert inserted is not None
            seq = int(inserted["seq"])
            async with db.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO job_files (job_seq, idx, source, destination, host, size, declared_size, md5,"
                    " sha256, state, priority, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [
                        (
                            seq,
                            i,
                            f.source,
                            f.destination,
                            destination_host(f.destination),
                            f.size,
                            f.size,
                            f.md5,
                            f.sha256,
                            state,
                            spec.priority,
                            now,
                        )
                        for i, f in enumerate(spec.files)
                    ],
                )
            job = submitted_job(job_id, owner, spec, state, commit=commit, now=now, seq=seq)
            await insert_events(db, submission_events(job))
            return job, True

        result: tuple[Job, bool] = await self._run(submit)
        return result

    async def job(self, job_id: str) -> Job | None:
        return await self._db.read(lambda db: _load(db, job_id=job_id))

    async def attempts(self, job_id: str) -> list[Attempt]:
        async def read(db: Connection) -> list[Attempt]:
            rows = await fetch_all(
                db,
                "SELECT a.* FROM job_attempts a JOIN jobs j ON j.seq = a.job_seq WHERE j.id = %s"
                " ORDER BY a.started_at, a.idx, a.number",
                (job_id,),
            )
            return [attempt_from_row(row) for row in rows]

        return await self._db.read(read)

    async def jobs(
        self, owner: Identity | None, *, states: Sequence[JobState] = (), limit: int = 100, after: int = 0
    ) -> list[Job]:
        async def read(db: Connection) -> list[Job]:
            where, values = ["seq > %s"], [after]
            if owner is not None:
                where.append("owner_id IS NOT DISTINCT FROM %s")
                values.append(owner.principal)  # type: ignore[arg-type]
            if states:
                where.append(f"state IN {_in(states)}")
                values.extend(states)  # type: ignore[arg-type]
            rows = await fetch_all(
                db, f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq LIMIT %s", (*values, limit)
            )
            return [job_from_row(row) for row in rows]

        return await self._db.read(read)

    async def step(self, job_id: str, step: JobStep, *, now: float, reason: str | None = None) -> Job | None:
        async def make(db: Connection) -> Job | None:
            row = await fetch_one(db, "SELECT * FROM jobs WHERE id = %s", (job_id,))
            if row is None or JobState(row["state"]) not in job_sources(step):
                return None
            before = JobState(row["state"])
            seq = row["seq"]
            changes = step_changes(before, step, now=now, reason=reason)
            if changes.unask_stop:
                await db.execute(
                    "UPDATE job_files SET stop_request = NULL WHERE job_seq = %s AND state = %s", (seq, _F.ACTIVE)
                )
            if changes.ask_stop:
                await db.execute(
                    "UPDATE job_files SET stop_request = %s WHERE job_seq = %s AND state = %s", (step, seq, _F.ACTIVE)
                )
            if changes.rebase_attempts:
                await db.execute("UPDATE job_files SET attempts_base = attempts WHERE job_seq = %s", (seq,))
            if changes.file_states:
                assignments = ", ".join(f"{column} = %s" for column in changes.file_values)
                await db.execute(
                    f"UPDATE job_files SET {assignments} WHERE job_seq = %s AND state IN {_in(changes.file_states)}",
                    (*changes.file_values.values(), seq, *changes.file_states),
                )
            await _update_job(db, seq, before, changes.job_values)
            job = await _load(db, seq=seq)
            assert job is not None
            await insert_events(db, [job_event(JOB_STATE_EVENTS[changes.after], job, reason=reason)])
            if changes.may_settle:
                return await _settle(db, job, now) or job
            return job

        result: Job | None = await self._run(make)
        return result

    async def set_invitation(self, job_id: str, invitation: Mapping[str, Any], token: str | None = None) -> bool:
        async def record(db: Connection) -> bool:
            changed = await db.execute(
                "UPDATE jobs SET invitation = %s, destination_token = COALESCE(%s, destination_token) WHERE id = %s",
                (json.dumps(dict(invitation)), token, job_id),
            )
            return changed.rowcount > 0

        result: bool = await self._run(record)
        return result

    async def set_priority(self, job_id: str, priority: int) -> Job | None:
        async def change(db: Connection) -> Job | None:
            states = tuple(REPRIORITIZABLE_JOB_STATES)
            row = await fetch_one(
                db, f"SELECT seq, spec FROM jobs WHERE id = %s AND state IN {_in(states)}", (job_id, *states)
            )
            if row is None:
                return None
            settings = settings_with_priority(row["spec"], priority)
            await db.execute(
                "UPDATE jobs SET priority = %s, spec = %s WHERE seq = %s", (priority, settings, row["seq"])
            )
            await db.execute("UPDATE job_files SET priority = %s WHERE job_seq = %s", (priority, row["seq"]))
            job = await _load(db, seq=row["seq"])
            assert job is not None
            await insert_events(db, [job_event(EventType.JOB_PRIORITY, job, reason=str(priority))])
            return job

        result: Job | None = await self._run(change)
        return result

    async def clear(self, job_id: str) -> Job | None:
        async def clear(db: Connection) -> Job | None:
            job = await _load(db, job_id=job_id)
            if job is None or not clearable(job):
                return None
            await db.execute("DELETE FROM jobs WHERE seq = %s", (job.seq,))
            return job

        result: Job | None = await self._run(clear)
        return result

    async def claim_files(
        self, holder: str, *, lease: float, now: float, limits: RunnerLimits, count: int = 1
    ) -> Claims:
        async def claim(db: Connection) -> Claims:
            active = await fetch_all(
                db,
                "SELECT f.job_seq, f.host, j.owner_id FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
                " WHERE f.state = %s",
                (_F.ACTIVE,),
            )
            slots = Slots(limits, active)
            queued_hosts = [
                row["host"]
                for row in await fetch_all(db, "SELECT DISTINCT host FROM job_files WHERE state = %s", (_F.QUEUED,))
            ]
            claimed: list[ClaimedFile] = []
            while len(claimed) < count and slots.left():
                # Per host below its limit, the first due file of a job and owner below theirs, in the
                # queue's order; the best of them is the one to claim.
                full_jobs, full_owners = slots.full_jobs(), slots.full_owners()
                candidates = []
                for host in queued_hosts:
                    if not slots.host_open(host):
                        continue
                    row = await fetch_one(
                        db,
                        "SELECT f.job_seq, f.idx, f.host, f.priority, j.owner_id"
                        " FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
                        " WHERE f.state = %s AND f.host = %s AND f.not_before <= %s"
                        f" AND j.state IN {_in(RUNNABLE)} AND f.job_seq <> ALL(%s::bigint[])"
                        " AND COALESCE(j.owner_id, '') <> ALL(%s::text[])"
                        " ORDER BY f.priority DESC, f.job_seq, f.idx LIMIT 1",
                        (_F.QUEUED, host, now, *RUNNABLE, full_jobs, full_owners),
                    )
                    if row is not None:
                        candidates.append(row)
                if not candidates:
                    break
                best = slots.take(candidates)
                claimed.append(await _claim(db, best["job_seq"], best["idx"], holder, lease=lease, now=now))
            return Claims(tuple(claimed), await _next_due(db, now))

        result: Claims = await self._run(claim)
        return result

    async def renew_job_file(self, job_id: str, index: int, holder: str, *, lease: float, now: float) -> Lease:
        async def renew(db: Connection) -> Lease:
            row = await _held(db, job_id, index, holder)
            if row is None:
                state = await fetch_one(db, "SELECT state FROM jobs WHERE id = %s", (job_id,))
                return Lease(False, None, None if state is None else JobState(state["state"]))
            await db.execute(
                "UPDATE job_files SET lease_until = %s WHERE job_seq = %s AND idx = %s",
                (now + lease, row["job_seq"], index),
            )
            return lease_of(row)

        result: Lease = await self._run(renew)
        return result

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
        async def record(db: Connection) -> bool:
            row = await _held(db, job_id, index, holder)
            if row is None:
                return False
            await db.execute(
                "UPDATE job_files SET bytes = %s, rate = %s, handle = COALESCE(%s, handle)"
                " WHERE job_seq = %s AND idx = %s",
                (bytes, rate, handle_json(handle), row["job_seq"], index),
            )
            if resumed:
                await db.execute(
                    'UPDATE job_attempts SET "offset" = %s WHERE job_seq = %s AND idx = %s AND number = %s',
                    (bytes, row["job_seq"], index, row["attempts"]),
                )
            if announce:
                job = await _load(db, seq=row["job_seq"], files=False)
                assert job is not None
                event = file_event(
                    EventType.JOB_FILE_PROGRESS, job, job_file_from_row(row), bytes=bytes, size=row["size"]
                )
                await insert_events(db, [event])
            return True

        result: bool = await self._run(record)
        return result

    async def set_handle(
        self, job_id: str, index: int, holder: str, handle: Mapping[str, Any], *, size: int | None = None
    ) -> bool:
        async def record(db: Connection) -> bool:
            row = await _held(db, job_id, index, holder)
            if row is None:
                return False
            await db.execute(
                "UPDATE job_files SET handle = %s, size = COALESCE(%s, size) WHERE job_seq = %s AND idx = %s",
                (handle_json(handle), size, row["job_seq"], index),
            )
            return True

        result: bool = await self._run(record)
        return result

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
        async def end(db: Connection) -> Job | None:
            row = await _held(db, job_id, index, holder)
            if row is None:
                return None
            seq = row["job_seq"]
            ended = attempt_end(row, outcome, bytes=bytes, now=now)
            await db.execute(
                "UPDATE job_files SET state = %s, bytes = %s, rate = 0, claimed_by = NULL, lease_until = NULL,"
                " stop_request = NULL, reason = %s, error = %s, not_before = %s, idle_attempts = %s,"
                " published_md5 = COALESCE(%s, published_md5), published_sha256 = COALESCE(%s, published_sha256),"
                " handle = COALESCE(%s, handle), finished_at = %s, updated_at = %s WHERE job_seq = %s AND idx = %s",
                (
                    ended.state,
                    ended.bytes,
                    reason,
                    error,
                    not_before,
                    ended.idle_attempts,
                    md5,
                    sha256,
                    handle_json(handle),
                    ended.finished_at,
                    now,
                    seq,
                    index,
                ),
            )
            await db.execute(
                "UPDATE job_attempts SET ended_at = %s, bytes = %s, outcome = %s, reason = %s, error = %s"
                " WHERE job_seq = %s AND idx = %s AND number = %s",
                (now, ended.bytes, ended.outcome, reason, error, seq, index, row["attempts"]),
            )
            job = await _load(db, seq=seq, files=False)
            assert job is not None
            await insert_events(db, [ended.file_event(job, row, md5=md5, sha256=sha256, reason=reason)])
            # Without its files (reading them all for each file would make a big job's files cost
            # the square of their number); with them once it settled.
            return await _settle(db, job, now) or job

        result: Job | None = await self._run(end)
        return result

    async def expired_job_leases(self, now: float) -> list[tuple[str, int, str]]:
        async def read(db: Connection) -> list[tuple[str, int, str]]:
            rows = await fetch_all(
                db,
                "SELECT j.id, f.idx, f.claimed_by FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
                " WHERE f.state = %s AND f.lease_until <= %s",
                (_F.ACTIVE, now),
            )
            return [(row["id"], row["idx"], row["claimed_by"]) for row in rows]

        return await self._db.read(read)

    async def held_by(self, holder: str | None) -> list[tuple[str, int, str]]:
        async def read(db: Connection) -> list[tuple[str, int, str]]:
            rows = await fetch_all(
                db,
                "SELECT j.id, f.idx, f.claimed_by FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
                " WHERE f.state = %s AND (%s::text IS NULL OR f.claimed_by = %s)",
                (_F.ACTIVE, holder, holder),
            )
            return [(row["id"], row["idx"], row["claimed_by"]) for row in rows]

        return await self._db.read(read)

    async def expire_due_jobs(self, now: float) -> list[Job]:
        async def due(db: Connection) -> list[str]:
            states = job_sources(JobStep.EXPIRE)
            rows = await fetch_all(
                db,
                f"SELECT id FROM jobs WHERE state IN {_in(states)} AND (deadline <= %s"
                " OR (started_at IS NULL AND committed_at + max_wait <= %s))",
                (*states, now, now),
            )
            return [row["id"] for row in rows]

        return await expire_jobs(self, await self._db.read(due), now)

    async def next_due(self, now: float) -> float | None:
        return await self._db.read(lambda db: _next_due(db, now))

    async def purge_jobs(self, before: float) -> int:
        async def purge(db: Connection) -> int:
            removed = await db.execute(
                f"DELETE FROM jobs WHERE state IN {_in(FINAL)} AND finished_at < %s", (*FINAL, before)
            )
            return removed.rowcount

        result: int = await self._run(purge)
        return result


async def _next_due(db: Connection, now: float) -> float | None:
    row = await fetch_one(
        db,
        "SELECT MIN(f.not_before) AS due FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
        f" WHERE f.state = %s AND f.not_before > %s AND j.state IN {_in(RUNNABLE)}",
        (_F.QUEUED, now, *RUNNABLE),
    )
    return None if row is None or row["due"] is None else float(row["due"])


async def _claim(db: Connection, seq: int, index: int, holder: str, *, lease: float, now: float) -> ClaimedFile:
    row = await fetch_one(
        db,
        "UPDATE job_files SET state = %s, claimed_by = %s, lease_until = %s, attempts = attempts + 1, rate = 0,"
        " stop_request = NULL, started_at = COALESCE(started_at, %s), updated_at = %s"
        " WHERE job_seq = %s AND idx = %s RETURNING *",
        (_F.ACTIVE, holder, now + lease, now, now, seq, index),
    )
    assert row is not None
    await db.execute(
        'INSERT INTO job_attempts (job_seq, idx, number, holder, started_at, "offset") VALUES (%s, %s, %s, %s, %s, %s)',
        (seq, index, row["attempts"], holder, now, row["bytes"]),
    )
    job = await _load(db, seq=seq, files=False)
    assert job is not None
    activated = job.state is _J.QUEUED
    if activated:
        await _update_job(
            db, seq, _J.QUEUED, {"state": _J.ACTIVE, "started_at": job.started_at or now, "updated_at": now}
        )
        job = await _load(db, seq=seq, files=False)
        assert job is not None
    file = job_file_from_row(row)
    await insert_events(db, started_events(job, file, activated=activated))
    return ClaimedFile(job, file, row["attempts"])


async def _settle(db: Connection, job: Job, now: float) -> Job | None:
    """End ``job`` if every file ended (finished or failed): the job after it (with its files), or None.
    Its files are counted in SQL: ``job`` need not hold them."""
    if job.state not in job_sources(JobStep.SETTLE):
        return None
    left = await fetch_one(
        db,
        f"SELECT 1 FROM job_files WHERE job_seq = %s AND state IN {_in(UNSETTLED)} LIMIT 1",
        (job.seq, *UNSETTLED),
    )
    if left is not None:
        return None
    counts = {
        FileJobState(row["state"]): int(row["n"])
        for row in await fetch_all(
            db, "SELECT state, COUNT(*) AS n FROM job_files WHERE job_seq = %s GROUP BY state", (job.seq,)
        )
    }
    after = settled_in(counts)
    await _update_job(db, job.seq, job.state, {"state": after, "finished_at": now, "updated_at": now})
    settled = await _load(db, seq=job.seq)
    assert settled is not None
    await insert_events(db, [job_event(JOB_STATE_EVENTS[after], settled)])
    return settled


async def _update_job(db: Connection, seq: int, before: JobState, values: Mapping[str, object]) -> None:
    assignments = ", ".join(f"{column} = %s" for column in values)
    changed = await db.execute(
        f"UPDATE jobs SET {assignments} WHERE seq = %s AND state = %s", (*values.values(), seq, before)
    )
    assert changed.rowcount == 1, (seq, before)


async def _held(db: Connection, job_id: str, index: int, holder: str) -> DictRow | None:
    return await fetch_one(
        db,
        'SELECT f.*, j.state AS job_state, (SELECT a."offset" FROM job_attempts a'
        " WHERE a.job_seq = f.job_seq AND a.idx = f.idx AND a.number = f.attempts) AS bytes_at_start"
        " FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
        " WHERE j.id = %s AND f.idx = %s AND f.state = %s AND f.claimed_by = %s",
        (job_id, index, _F.ACTIVE, holder),
    )


async def _load(db: Connection, *, job_id: str | None = None, seq: int | None = None, files: bool = True) -> Job | None:
    if job_id is not None:
        row = await fetch_one(db, "SELECT * FROM jobs WHERE id = %s", (job_id,))
    else:
        row = await fetch_one(db, "SELECT * FROM jobs WHERE seq = %s", (seq,))
    if row is None:
        return None
    job = job_from_row(row)
    if not files:
        return job
    rows = await fetch_all(db, "SELECT * FROM job_files WHERE job_seq = %s ORDER BY idx", (row["seq"],))
    return replace(job, files=tuple(job_file_from_row(f) for f in rows))
