"""The SQLite backend of the job store (``jobs.py``): tables ``jobs``, ``job_files`` and
``job_attempts`` in the state's database, beside the transfers, so that a job's events share the
event log and its transactions.

:class:`SqliteJobs` is mixed into ``SqliteState``; each method is one transaction on the database
thread. Every state change is an UPDATE guarded by the states ``jobs.states``' tables let the step
leave and, for a runner's steps, by the lease's holder; the step's events go in the same transaction.
How rows read back as jobs, files and attempts, what the events of a job say and what its steps
decide is shared with ``postgres_jobs.py`` (``job_records.py``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

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
from .database import Database
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
from .sqlite_events import insert_events

JOBS_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
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
    deadline REAL,
    max_wait REAL,
    reason TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    committed_at REAL,
    started_at REAL,
    finished_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_submission ON jobs (owner_id, submission_id)
    WHERE submission_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner_id, seq);
-- Covers the quota's count of an owner's unfinished jobs at each submission (without it, every
-- submission reads all the owner's job rows: 2 ms with 10,000 queued).
CREATE INDEX IF NOT EXISTS jobs_by_owner_state ON jobs (owner_id, state);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, finished_at);
CREATE INDEX IF NOT EXISTS jobs_by_priority ON jobs (state, priority DESC, seq);
CREATE TABLE IF NOT EXISTS job_files (
    job_seq INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    -- The destination's host: what the per-host limit counts.
    host TEXT NOT NULL,
    size INTEGER,
    declared_size INTEGER,
    md5 TEXT,
    sha256 TEXT,
    state TEXT NOT NULL,
    -- The job's priority, kept here too so that the queue is read in its order from one index.
    priority INTEGER NOT NULL DEFAULT 3,
    bytes INTEGER NOT NULL DEFAULT 0,
    rate REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    -- The attempts made before the last retry (a retry starts a fresh count of them).
    attempts_base INTEGER NOT NULL DEFAULT 0,
    idle_attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    error TEXT,
    not_before REAL NOT NULL DEFAULT 0,
    claimed_by TEXT,
    lease_until REAL,
    stop_request TEXT,
    handle TEXT NOT NULL DEFAULT '{}',
    published_md5 TEXT,
    published_sha256 TEXT,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (job_seq, idx)
);
CREATE INDEX IF NOT EXISTS job_files_by_state ON job_files (state, not_before);
-- Whether a job has a file left to work on, asked as each of its files ends (without it, counting a
-- big job's files at each end cost the square of their number).
CREATE INDEX IF NOT EXISTS job_files_by_job_state ON job_files (job_seq, state);
CREATE TABLE IF NOT EXISTS job_attempts (
    job_seq INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    number INTEGER NOT NULL,
    holder TEXT NOT NULL,
    started_at REAL NOT NULL,
    offset INTEGER NOT NULL,
    ended_at REAL,
    bytes INTEGER,
    outcome TEXT,
    reason TEXT,
    error TEXT,
    PRIMARY KEY (job_seq, idx, number)
);
"""

T = TypeVar("T")

_F = FileJobState
_J = JobState


def _in(states: Sequence[object]) -> str:
    return "(" + ", ".join("?" * len(states)) + ")"


class SqliteJobs:
    """The job store's methods of ``SqliteState`` (which provides ``_db`` and ``_run``)."""

    _db: Database
    _run: Callable[..., Any]

    async def submit(
        self, owner: Identity, spec: JobSpec, *, commit: bool, now: float, quota: JobQuota, invite: bool = False
    ) -> tuple[Job, bool]:
        def submit(db: sqlite3.Connection) -> tuple[Job, bool]:
            if spec.submission_id is not None:
                row = db.execute(
                    "SELECT seq FROM jobs WHERE owner_id IS ? AND submission_id = ?",
                    (owner.principal, spec.submission_id),
                ).fetchone()
                if row is not None:
                    job = _load(db, seq=row["seq"])
                    assert job is not None
                    return job, False
            # Counted up to the quota only: what the check needs, in bounded time however long the queue.
            open_jobs = db.execute(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE owner_id IS ? AND state IN {_in(UNFINISHED)} LIMIT ?)",
                (owner.principal, *UNFINISHED, quota.jobs),
            ).fetchone()[0]
            quota.check(open_jobs, len(spec.files))
            state = submission_state(commit=commit, invite=invite)
            settings = settings_json(spec)
            job_id = new_job_id()
            cursor = db.execute(
                "INSERT INTO jobs (id, owner, owner_id, state, priority, spec, submission_id, source_token,"
                " destination_token, created_at, updated_at, committed_at, deadline, max_wait)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    owner.dn,
                    owner.principal,
                    state,
                    spec.priority,
                    settings,
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
            seq = cursor.lastrowid
            assert seq is not None
            db.executemany(
                "INSERT INTO job_files (job_seq, idx, source, destination, host, size, declared_size, md5, sha256,"
                " state, priority, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            insert_events(db, submission_events(job))
            return job, True

        result: tuple[Job, bool] = await self._run(submit)
        return result

    async def job(self, job_id: str) -> Job | None:
        return await self._db.read(lambda db: _load(db, job_id=job_id))

    async def attempts(self, job_id: str) -> list[Attempt]:
        def read(db: sqlite3.Connection) -> list[Attempt]:
            rows = db.execute(
                "SELECT a.* FROM job_attempts a JOIN jobs j ON j.seq = a.job_seq WHERE j.id = ?"
                " ORDER BY a.started_at, a.idx, a.number",
                (job_id,),
            ).fetchall()
            return [attempt_from_row(row) for row in rows]

        return await self._db.read(read)

    async def jobs(
        self, owner: Identity | None, *, states: Sequence[JobState] = (), limit: int = 100, after: int = 0
    ) -> list[Job]:
        def read(db: sqlite3.Connection) -> list[Job]:
            where, values = ["seq > ?"], [after]
            if owner is not None:
                where.append("owner_id IS ?")
                values.append(owner.principal)  # type: ignore[arg-type]
            if states:
                where.append(f"state IN {_in(states)}")
                values.extend(states)  # type: ignore[arg-type]
            rows = db.execute(
                f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?", (*values, limit)
            ).fetchall()
            return [job_from_row(row) for row in rows]

        return await self._db.read(read)

    async def step(self, job_id: str, step: JobStep, *, now: float, reason: str | None = None) -> Job | None:
        def make(db: sqlite3.Connection) -> Job | None:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or JobState(row["state"]) not in job_sources(step):
                return None
            before = JobState(row["state"])
            seq = row["seq"]
            changes = step_changes(before, step, now=now, reason=reason)
            if changes.unask_stop:
                db.execute("UPDATE job_files SET stop_request = NULL WHERE job_seq = ? AND state = ?", (seq, _F.ACTIVE))
            if changes.ask_stop:
                db.execute(
                    "UPDATE job_files SET stop_request = ? WHERE job_seq = ? AND state = ?", (step, seq, _F.ACTIVE)
                )
            if changes.rebase_attempts:
                db.execute("UPDATE job_files SET attempts_base = attempts WHERE job_seq = ?", (seq,))
            if changes.file_states:
                assignments = ", ".join(f"{column} = ?" for column in changes.file_values)
                db.execute(
                    f"UPDATE job_files SET {assignments} WHERE job_seq = ? AND state IN {_in(changes.file_states)}",
                    (*changes.file_values.values(), seq, *changes.file_states),
                )
            _update_job(db, seq, before, changes.job_values)
            job = _load(db, seq=seq)
            assert job is not None
            insert_events(db, [job_event(JOB_STATE_EVENTS[changes.after], job, reason=reason)])
            if changes.may_settle:
                return _settle(db, job, now) or job
            return job

        result: Job | None = await self._run(make)
        return result

    async def set_invitation(self, job_id: str, invitation: Mapping[str, Any], token: str | None = None) -> bool:
        def record(db: sqlite3.Connection) -> bool:
            changed = db.execute(
                "UPDATE jobs SET invitation = ?, destination_token = COALESCE(?, destination_token) WHERE id = ?",
                (json.dumps(dict(invitation)), token, job_id),
            ).rowcount
            return bool(changed)

        result: bool = await self._run(record)
        return result

    async def set_priority(self, job_id: str, priority: int) -> Job | None:
        def change(db: sqlite3.Connection) -> Job | None:
            states = tuple(REPRIORITIZABLE_JOB_STATES)
            row = db.execute(
                f"SELECT seq, spec FROM jobs WHERE id = ? AND state IN {_in(states)}", (job_id, *states)
            ).fetchone()
            if row is None:
                return None
            settings = settings_with_priority(row["spec"], priority)
            db.execute("UPDATE jobs SET priority = ?, spec = ? WHERE seq = ?", (priority, settings, row["seq"]))
            db.execute("UPDATE job_files SET priority = ? WHERE job_seq = ?", (priority, row["seq"]))
            job = _load(db, seq=row["seq"])
            assert job is not None
            insert_events(db, [job_event(EventType.JOB_PRIORITY, job, reason=str(priority))])
            return job

        result: Job | None = await self._run(change)
        return result

    async def clear(self, job_id: str) -> Job | None:
        def clear(db: sqlite3.Connection) -> Job | None:
            job = _load(db, job_id=job_id)
            if job is None or not clearable(job):
                return None
            db.execute("DELETE FROM jobs WHERE seq = ?", (job.seq,))
            return job

        result: Job | None = await self._run(clear)
        return result

    async def claim_files(
        self, holder: str, *, lease: float, now: float, limits: RunnerLimits, count: int = 1
    ) -> Claims:
        def claim(db: sqlite3.Connection) -> Claims:
            active = db.execute(
                "SELECT f.job_seq, f.host, j.owner_id FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
                " WHERE f.state = ?",
                (_F.ACTIVE,),
            ).fetchall()
            slots = Slots(limits, active)
            # The hosts files are queued for, each found by one seek of the queue's index.
            queued_hosts = [
                row[0]
                for row in db.execute(
                    "WITH RECURSIVE h(host) AS (SELECT MIN(host) FROM job_files WHERE state = ?1"
                    " UNION ALL SELECT (SELECT MIN(host) FROM job_files WHERE state = ?1 AND host > h.host)"
                    " FROM h WHERE h.host IS NOT NULL) SELECT host FROM h WHERE host IS NOT NULL",
                    (_F.QUEUED,),
                )
            ]
            claimed: list[ClaimedFile] = []
            while len(claimed) < count and slots.left():
                # Per host below its limit, the first due file of a job and owner below theirs, in the
                # queue's order (the index's: the walk stops there; a host at its limit is not walked,
                # however many files wait for it); the best of them is the one to claim.
                full_jobs, full_owners = slots.full_jobs(), slots.full_owners()
                candidates = [
                    row
                    for host in queued_hosts
                    if slots.host_open(host)
                    and (
                        row := db.execute(
                            "SELECT f.job_seq, f.idx, f.host, f.priority, j.owner_id"
                            " FROM job_files f INDEXED BY job_files_queue JOIN jobs j ON j.seq = f.job_seq"
                            f" WHERE f.state = ? AND f.host = ? AND f.not_before <= ? AND j.state IN {_in(RUNNABLE)}"
                            f" AND f.job_seq NOT IN {_in(full_jobs)}"
                            f" AND COALESCE(j.owner_id, '') NOT IN {_in(full_owners)}"
                            " ORDER BY f.priority DESC, f.job_seq, f.idx LIMIT 1",
                            (_F.QUEUED, host, now, *RUNNABLE, *full_jobs, *full_owners),
                        ).fetchone()
                    )
                    is not None
                ]
                if not candidates:
                    break
                row = slots.take(candidates)
                claimed.append(_claim(db, row["job_seq"], row["idx"], holder, lease=lease, now=now))
            return Claims(tuple(claimed), _next_due(db, now))

        result: Claims = await self._run(claim)
        return result

    async def renew_job_file(self, job_id: str, index: int, holder: str, *, lease: float, now: float) -> Lease:
        def renew(db: sqlite3.Connection) -> Lease:
            row = _held(db, job_id, index, holder)
            if row is None:
                state = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                return Lease(False, None, None if state is None else JobState(state[0]))
            db.execute(
                "UPDATE job_files SET lease_until = ? WHERE job_seq = ? AND idx = ?",
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
        def record(db: sqlite3.Connection) -> bool:
            row = _held(db, job_id, index, holder)
            if row is None:
                return False
            db.execute(
                "UPDATE job_files SET bytes = ?, rate = ?, handle = COALESCE(?, handle) WHERE job_seq = ? AND idx = ?",
                (bytes, rate, handle_json(handle), row["job_seq"], index),
            )
            if resumed:
                db.execute(
                    "UPDATE job_attempts SET offset = ? WHERE job_seq = ? AND idx = ? AND number = ?",
                    (bytes, row["job_seq"], index, row["attempts"]),
                )
            if announce:
                job = _load(db, seq=row["job_seq"], files=False)
                assert job is not None
                event = file_event(
                    EventType.JOB_FILE_PROGRESS, job, job_file_from_row(row), bytes=bytes, size=row["size"]
                )
                insert_events(db, [event])
            return True

        result: bool = await self._run(record)
        return result

    async def set_handle(
        self, job_id: str, index: int, holder: str, handle: Mapping[str, Any], *, size: int | None = None
    ) -> bool:
        def record(db: sqlite3.Connection) -> bool:
            row = _held(db, job_id, index, holder)
            if row is None:
                return False
            db.execute(
                "UPDATE job_files SET handle = ?, size = COALESCE(?, size) WHERE job_seq = ? AND idx = ?",
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
        def end(db: sqlite3.Connection) -> Job | None:
            row = _held(db, job_id, index, holder)
            if row is None:
                return None
            seq = row["job_seq"]
            ended = attempt_end(row, outcome, bytes=bytes, now=now)
            db.execute(
                "UPDATE job_files SET state = ?, bytes = ?, rate = 0, claimed_by = NULL, lease_until = NULL,"
                " stop_request = NULL, reason = ?, error = ?, not_before = ?, idle_attempts = ?,"
                " published_md5 = COALESCE(?, published_md5), published_sha256 = COALESCE(?, published_sha256),"
                " handle = COALESCE(?, handle), finished_at = ?, updated_at = ? WHERE job_seq = ? AND idx = ?",
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
            db.execute(
                "UPDATE job_attempts SET ended_at = ?, bytes = ?, outcome = ?, reason = ?, error = ?"
                " WHERE job_seq = ? AND idx = ? AND number = ?",
                (now, ended.bytes, ended.outcome, reason, error, seq, index, row["attempts"]),
            )
            job = _load(db, seq=seq, files=False)
            assert job is not None
            insert_events(db, [ended.file_event(job, row, md5=md5, sha256=sha256, reason=reason)])
            # Without its files (reading them all for each file would make a big job's files cost
            # the square of their number); with them once it settled.
            return _settle(db, job, now) or job

        result: Job | None = await self._run(end)
        return result

    async def expired_job_leases(self, now: float) -> list[tuple[str, int, str]]:
        def read(db: sqlite3.Connection) -> list[tuple[str, int, str]]:
            rows = db.execute(
                "SELECT j.id, f.idx, f.claimed_by FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
                " WHERE f.state = ? AND f.lease_until <= ?",
                (_F.ACTIVE, now),
            ).fetchall()
            return [(row[0], row[1], row[2]) for row in rows]

        return await self._db.read(read)

    async def held_by(self, holder: str | None) -> list[tuple[str, int, str]]:
        def read(db: sqlite3.Connection) -> list[tuple[str, int, str]]:
            rows = db.execute(
                "SELECT j.id, f.idx, f.claimed_by FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
                " WHERE f.state = ? AND (? IS NULL OR f.claimed_by = ?)",
                (_F.ACTIVE, holder, holder),
            ).fetchall()
            return [(row[0], row[1], row[2]) for row in rows]

        return await self._db.read(read)

    async def expire_due_jobs(self, now: float) -> list[Job]:
        def due(db: sqlite3.Connection) -> list[str]:
            states = job_sources(JobStep.EXPIRE)
            rows = db.execute(
                f"SELECT id FROM jobs WHERE state IN {_in(states)} AND (deadline <= ?"
                " OR (started_at IS NULL AND committed_at + max_wait <= ?))",
                (*states, now, now),
            ).fetchall()
            return [row["id"] for row in rows]

        return await expire_jobs(self, await self._db.read(due), now)

    async def next_due(self, now: float) -> float | None:
        return await self._db.read(lambda db: _next_due(db, now))

    async def purge_jobs(self, before: float) -> int:
        def purge(db: sqlite3.Connection) -> int:
            return int(
                db.execute(
                    f"DELETE FROM jobs WHERE state IN {_in(FINAL)} AND finished_at < ?", (*FINAL, before)
                ).rowcount
            )

        result: int = await self._run(purge)
        return result


def migrate_jobs(db: sqlite3.Connection) -> None:
    """Bring the job tables of an older file up to date (after ``JOBS_SCHEMA`` created what was missing)."""
    columns = {row["name"] for row in db.execute("PRAGMA table_info(job_files)")}
    if not columns:
        return  # no job tables (a file migrated piece by piece): the schema makes them whole
    if "priority" not in columns:
        db.execute("ALTER TABLE job_files ADD COLUMN priority INTEGER NOT NULL DEFAULT 3")
        db.execute("UPDATE job_files SET priority = (SELECT priority FROM jobs WHERE seq = job_seq)")
    # The queue per destination host, in the order files are claimed (the first due one is near its start).
    db.execute("CREATE INDEX IF NOT EXISTS job_files_queue ON job_files (state, host, priority DESC, job_seq, idx)")


def _next_due(db: sqlite3.Connection, now: float) -> float | None:
    row = db.execute(
        "SELECT MIN(f.not_before) FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
        f" WHERE f.state = ? AND f.not_before > ? AND j.state IN {_in(RUNNABLE)}",
        (_F.QUEUED, now, *RUNNABLE),
    ).fetchone()
    return None if row[0] is None else float(row[0])


def _claim(db: sqlite3.Connection, seq: int, index: int, holder: str, *, lease: float, now: float) -> ClaimedFile:
    db.execute(
        "UPDATE job_files SET state = ?, claimed_by = ?, lease_until = ?, attempts = attempts + 1, rate = 0,"
        " stop_request = NULL, started_at = COALESCE(started_at, ?), updated_at = ? WHERE job_seq = ? AND idx = ?",
        (_F.ACTIVE, holder, now + lease, now, now, seq, index),
    )
    row = db.execute("SELECT * FROM job_files WHERE job_seq = ? AND idx = ?", (seq, index)).fetchone()
    db.execute(
        "INSERT INTO job_attempts (job_seq, idx, number, holder, started_at, offset) VALUES (?, ?, ?, ?, ?, ?)",
        (seq, index, row["attempts"], holder, now, row["bytes"]),
    )
    job = _load(db, seq=seq, files=False)
    assert job is not None
    activated = job.state is _J.QUEUED
    if activated:
        _update_job(db, seq, _J.QUEUED, {"state": _J.ACTIVE, "started_at": job.started_at or now, "updated_at": now})
        job = _load(db, seq=seq, files=False)
        assert job is not None
    file = job_file_from_row(row)
    insert_events(db, started_events(job, file, activated=activated))
    return ClaimedFile(job, file, row["attempts"])


def _settle(db: sqlite3.Connection, job: Job, now: float) -> Job | None:
    """End ``job`` if every file ended (finished or failed): the job after it (with its files), or None.
    Its files are counted in SQL: ``job`` need not hold them."""
    if job.state not in job_sources(JobStep.SETTLE):
        return None
    left = db.execute(
        f"SELECT 1 FROM job_files WHERE job_seq = ? AND state IN {_in(UNSETTLED)} LIMIT 1", (job.seq, *UNSETTLED)
    ).fetchone()
    if left is not None:
        return None
    counts = {
        FileJobState(row[0]): row[1]
        for row in db.execute("SELECT state, COUNT(*) FROM job_files WHERE job_seq = ? GROUP BY state", (job.seq,))
    }
    after = settled_in(counts)
    _update_job(db, job.seq, job.state, {"state": after, "finished_at": now, "updated_at": now})
    settled = _load(db, seq=job.seq)
    assert settled is not None
    insert_events(db, [job_event(JOB_STATE_EVENTS[after], settled)])
    return settled


def _update_job(db: sqlite3.Connection, seq: int, before: JobState, values: Mapping[str, object]) -> None:
    assignments = ", ".join(f"{column} = ?" for column in values)
    changed = db.execute(
        f"UPDATE jobs SET {assignments} WHERE seq = ? AND state = ?", (*values.values(), seq, before)
    ).rowcount
    assert changed == 1, (seq, before)


def _held(db: sqlite3.Connection, job_id: str, index: int, holder: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        "SELECT f.*, j.state AS job_state,"
        " (SELECT offset FROM job_attempts a WHERE a.job_seq = f.job_seq AND a.idx = f.idx"
        "  AND a.number = f.attempts) AS bytes_at_start"
        " FROM job_files f JOIN jobs j ON j.seq = f.job_seq"
        " WHERE j.id = ? AND f.idx = ? AND f.state = ? AND f.claimed_by = ?",
        (job_id, index, _F.ACTIVE, holder),
    ).fetchone()
    return row


def _load(
    db: sqlite3.Connection, *, job_id: str | None = None, seq: int | None = None, files: bool = True
) -> Job | None:
    if job_id is not None:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    else:
        row = db.execute("SELECT * FROM jobs WHERE seq = ?", (seq,)).fetchone()
    if row is None:
        return None
    job = job_from_row(row)
    if not files:
        return job
    rows = db.execute("SELECT * FROM job_files WHERE job_seq = ? ORDER BY idx", (row["seq"],)).fetchall()
    return replace(job, files=tuple(job_file_from_row(f) for f in rows))
