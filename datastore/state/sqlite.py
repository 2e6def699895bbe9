"""The SQLite backend of the state store (``interface.py``): the embedded default, one file in the
state directory shared by the processes of ``serve --workers N``.

Each method is one ``BEGIN IMMEDIATE`` transaction on the database thread (``database.py``), so
writers are serialised across processes and the event ids, which SQLite assigns in that order,
grow in commit order. Every state change is an UPDATE guarded by the states the transition table
lets it leave (``lifecycle.states.sources``) and, for an upload's steps, by the lease's holder; the
events of the step are inserted in the same transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from ..errors import AlreadyUploaded, InsufficientStorage, TransferCancelled, UploadInProgress
from ..lifecycle.states import (
    FINAL_FILE_STATES,
    Event,
    EventType,
    FileState,
    NewEvent,
    Step,
    StopReason,
    Subject,
    TransferState,
    events_of,
    sources,
    target,
)
from ..protocol.manifest import ManifestFile
from ..security.identity import Identity
from .database import Database
from .interface import (
    Claim,
    ClaimStatus,
    ClientQuota,
    DuplicateRequest,
    Ended,
    Holdings,
    LeaseExpired,
    Signal,
    StagedFile,
    Transfer,
    TransferFile,
)
from .records import OPEN_FILE_STATES as _OPEN_FILE_STATES
from .records import end_events, new_transfer, new_transfer_key, status_from_row, subject_from_rows
from .records import event_from_row as _event
from .records import file_from_row as _file
from .records import staged_from_row as _staged
from .records import transfer_from_row as _transfer
from .sqlite_events import appended as _appended
from .sqlite_events import insert_events as _insert_events
from .sqlite_jobs import JOBS_SCHEMA, SqliteJobs, migrate_jobs

_SCHEMA = """
CREATE TABLE IF NOT EXISTS transfers (
    key TEXT PRIMARY KEY,
    prefix TEXT NOT NULL,
    -- The owner once per transfer: its name for display, and its principal
    -- (kind, subject, issuer: what ownership is compared by; NULL if anonymous).
    owner TEXT,
    owner_authenticated INTEGER NOT NULL,
    owner_id TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS transfers_by_state ON transfers (state, expires_at);
CREATE TABLE IF NOT EXISTS transfer_files (
    key TEXT NOT NULL REFERENCES transfers (key) ON DELETE CASCADE,
    num INTEGER NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    md5 TEXT,
    sha256 TEXT,
    state TEXT NOT NULL,
    received INTEGER NOT NULL DEFAULT 0,
    -- 1 while a request whose chunk carries Upload-Checksum is appending:
    -- after a crash its unverified bytes are cut off.
    verifying_chunk INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated_at REAL NOT NULL,
    -- The lease of an UPLOADING file: who holds it, until when, and what another
    -- process asks of the holder ('superseded': a newer request takes over).
    claimed_by TEXT,
    stop_request TEXT,
    -- How many times the file was claimed: a process's cached hash state is
    -- good only if no other request claimed the file after its own.
    claims INTEGER NOT NULL DEFAULT 0,
    -- A tus creation's Upload-Metadata header as sent (HEAD answers it); NULL
    -- for the files of a manifest.
    upload_metadata TEXT,
    PRIMARY KEY (key, num)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key TEXT,
    num INTEGER,
    name TEXT,
    owner TEXT,
    owner_id TEXT,
    bytes INTEGER,
    size INTEGER,
    md5 TEXT,
    sha256 TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (time);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
"""

#: Columns added after the first release, for files created before them.
_ADDED_COLUMNS = {
    "claimed_by": "TEXT",
    "stop_request": "TEXT",
    "claims": "INTEGER NOT NULL DEFAULT 0",
    "upload_metadata": "TEXT",
    # When the lease of an UPLOADING file runs out.
    "lease_until": "REAL",
    # 1 from a file.started until the attempt ends (interrupted, failed, completed).
    "in_attempt": "INTEGER NOT NULL DEFAULT 0",
    # 1 once the holder began publishing the verified file: cancelling the transfer lets it finish.
    "publishing": "INTEGER NOT NULL DEFAULT 0",
}


def _migrate(db: sqlite3.Connection) -> None:
    present = {row["name"] for row in db.execute("PRAGMA table_info(transfer_files)")}
    for column, declaration in _ADDED_COLUMNS.items():
        if column not in present:
            db.execute(f"ALTER TABLE transfer_files ADD COLUMN {column} {declaration}")
    columns = {row["name"] for row in db.execute("PRAGMA table_info(transfers)")}
    if "client" not in columns:
        db.execute("ALTER TABLE transfers ADD COLUMN client TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS transfers_by_client ON transfers (client, state)")
    if "owner_id" not in columns:
        db.execute("ALTER TABLE transfers ADD COLUMN owner_id TEXT")
        # Before principals, an unauthenticated owner was an X-Client-DN; a certificate's
        # subject was kept in a form that cannot be compared safely: such a transfer gets a
        # certificate principal with no issuer, which no certificate has, so only
        # administrators manage it (NULL would read as anonymous, usable by anyone with the key).
        db.execute(
            "UPDATE transfers SET owner_id = CASE WHEN owner_authenticated = 0 THEN json_array('asserted', owner)"
            " ELSE json_array('certificate', owner, '') END WHERE owner IS NOT NULL"
        )
    if "idempotency_key" not in columns:
        # A client's name for its manifest request: sending it again finds the same transfer.
        db.execute("ALTER TABLE transfers ADD COLUMN idempotency_key TEXT")
    db.execute(
        "CREATE UNIQUE INDEX IF NOT EXISTS transfers_by_idempotency ON transfers (prefix, owner_id, idempotency_key)"
        " WHERE idempotency_key IS NOT NULL"
    )
    migrate_jobs(db)


def _reserved_bytes(db: sqlite3.Connection) -> int:
    reserved: int = db.execute(
        "SELECT COALESCE(SUM(f.size - f.received), 0) FROM transfer_files f JOIN transfers t USING (key)"
        f" WHERE t.state = ? AND f.state IN {_in(_OPEN_FILE_STATES)}",
        (TransferState.OPEN, *_OPEN_FILE_STATES),
    ).fetchone()[0]
    return reserved


def _in(states: Sequence[str]) -> str:
    return "(" + ", ".join("?" * len(states)) + ")"


T = TypeVar("T")


class SqliteState(SqliteJobs):
    """The state store in one SQLite file (see :mod:`datastore.state.interface` for the contracts),
    with the job store (``jobs.py``) of :class:`~.sqlite_jobs.SqliteJobs`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = Database(path, _SCHEMA + JOBS_SCHEMA, _migrate)
        self.on_appended: Callable[[Sequence[Event]], None] = _ignore

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in one write transaction; then :attr:`on_appended` hears the events it appended."""

        def transaction(db: sqlite3.Connection) -> tuple[T, list[Event]]:
            _appended.events = []
            try:
                return work(db), _appended.events
            finally:
                del _appended.events

        result, appended = await self._db.run(transaction)
        if appended:
            self.on_appended(appended)
        return result

    # -- transfers ------------------------------------------------------------------------------

    async def create(
        self,
        prefix: str,
        owner: Identity,
        files: Sequence[ManifestFile],
        *,
        lifetime: float,
        now: float,
        upload_metadata: str | None = None,
        client: str | None = None,
        quota: ClientQuota | None = None,
        idempotency_key: str | None = None,
        space: int | None = None,
    ) -> Transfer:
        key = new_transfer_key()
        transfer = new_transfer(key, prefix, owner, files, lifetime=lifetime, now=now, upload_metadata=upload_metadata)
        records = transfer.files

        def insert(db: sqlite3.Connection) -> None:
            if quota is not None:
                quota.check(_holdings(db, client), len(records), sum(f.size for f in records))
            if idempotency_key is not None and _idempotent(db, prefix, owner, idempotency_key) is not None:
                raise DuplicateRequest(idempotency_key)
            total = sum(f.size for f in records)
            if space is not None and total > (available := space - _reserved_bytes(db)):
                raise InsufficientStorage(f"{total} bytes declared, {max(0, available)} available")
            db.execute(
                "INSERT INTO transfers (key, prefix, owner, owner_authenticated, owner_id, client, state,"
                " created_at, updated_at, expires_at, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    prefix,
                    owner.dn,
                    int(owner.authenticated),
                    owner.principal,
                    client,
                    transfer.state,
                    now,
                    now,
                    transfer.expires_at,
                    idempotency_key,
                ),
            )
            db.executemany(
                "INSERT INTO transfer_files (key, num, name, size, md5, sha256, state, updated_at, upload_metadata)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(key, f.num, f.name, f.size, f.md5, f.sha256, f.state, now, f.upload_metadata) for f in records],
            )
            _insert_events(
                db,
                [
                    NewEvent(
                        EventType.TRANSFER_CREATED, prefix, key, owner=owner.dn, owner_id=owner.principal, size=total
                    )
                ],
            )

        await self._run(insert)
        return transfer

    async def idempotent(self, prefix: str, owner: Identity, idempotency_key: str) -> Transfer | None:
        return await self._db.read(lambda db: _idempotent(db, prefix, owner, idempotency_key))

    async def holdings(self, client: str | None) -> Holdings:
        return await self._db.read(lambda db: _holdings(db, client))

    async def open_names(self, prefix: str, names: Sequence[str]) -> set[str]:
        def read(db: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(names), 500):
                batch = names[start : start + 500]
                found.update(
                    row[0]
                    for row in db.execute(
                        "SELECT DISTINCT f.name FROM transfer_files f JOIN transfers t ON t.key = f.key"
                        f" WHERE t.prefix = ? AND t.state = ? AND f.state IN {_in(_OPEN_FILE_STATES)}"
                        f" AND f.name IN {_in(batch)}",
                        (prefix, TransferState.OPEN, *_OPEN_FILE_STATES, *batch),
                    )
                )
            return found

        return await self._db.read(read)

    async def get(self, key: str) -> Transfer | None:
        return await self._db.read(lambda db: _load(db, key))

    async def get_file(self, key: str, num: int) -> tuple[Transfer, TransferFile | None] | None:
        def load(db: sqlite3.Connection) -> tuple[Transfer, TransferFile | None] | None:
            row = db.execute("SELECT * FROM transfers WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            file_row = db.execute("SELECT * FROM transfer_files WHERE key = ? AND num = ?", (key, num)).fetchone()
            return _transfer(row, ()), (_file(file_row) if file_row is not None else None)

        return await self._db.read(load)

    # -- leases on files ------------------------------------------------------------------------

    async def claim(self, key: str, num: int, holder: str, *, lease: float, now: float) -> Claim:
        def claim(db: sqlite3.Connection) -> Claim:
            row = _file_row(db, key, num)
            before = _file(row)
            if before.state is FileState.UPLOADING:
                if row["lease_until"] is not None and row["lease_until"] <= now:
                    raise LeaseExpired(_staged(row))
                raise UploadInProgress()
            if before.state is FileState.PUBLISHED:
                raise AlreadyUploaded()
            if before.state is FileState.CANCELLED:
                raise TransferCancelled("this upload was terminated")
            assert before.state in sources(Step.CLAIM)
            db.execute(
                "UPDATE transfer_files SET state = ?, claimed_by = ?, lease_until = ?, stop_request = NULL,"
                " claims = claims + 1, in_attempt = 1, updated_at = ? WHERE key = ? AND num = ?",
                (FileState.UPLOADING, holder, now + lease, now, key, num),
            )
            if not row["in_attempt"]:
                _insert_events(db, events_of(Step.CLAIM, _subject(db, key, row), bytes=before.received))
            return Claim(before, row["claims"] + 1)

        return await self._run(claim)

    async def renew(self, key: str, num: int, holder: str, *, lease: float, now: float) -> ClaimStatus | None:
        def renew(db: sqlite3.Connection) -> ClaimStatus | None:
            db.execute(
                "UPDATE transfer_files SET lease_until = ? WHERE key = ? AND num = ? AND state = ? AND claimed_by = ?",
                (now + lease, key, num, FileState.UPLOADING, holder),
            )
            return _status(db, key, num)

        return await self._run(renew)

    async def status(self, key: str, num: int) -> ClaimStatus | None:
        return await self._db.read(lambda db: _status(db, key, num))

    async def request_stop(self, key: str, num: int, reason: StopReason) -> str | None:
        def ask(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT claimed_by FROM transfer_files WHERE key = ? AND num = ? AND state = ?",
                (key, num, FileState.UPLOADING),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE transfer_files SET stop_request = ? WHERE key = ? AND num = ?", (reason, key, num))
            return str(row["claimed_by"])

        return await self._run(ask)

    async def restore(self, key: str, num: int, holder: str, *, released: bool) -> bool:
        step = Step.RESTORE_RELEASED if released else Step.RESTORE
        return await self._end_lease(key, num, holder, step, {})

    async def pause(self, key: str, num: int, holder: str, *, received: int) -> bool:
        values = {"received": received, "verifying_chunk": 0, "error": None}
        return await self._end_lease(key, num, holder, Step.PAUSE, values)

    async def interrupt(self, key: str, num: int, holder: str, *, received: int, reason: StopReason) -> bool:
        values = {"received": received, "verifying_chunk": 0, "error": None, "in_attempt": 0}
        return await self._end_lease(key, num, holder, Step.INTERRUPT, values, reason=reason, progress=received)

    async def fail(self, key: str, num: int, holder: str, *, reason: StopReason, message: str) -> bool:
        values = {"received": 0, "verifying_chunk": 0, "error": message, "in_attempt": 0}
        return await self._end_lease(key, num, holder, Step.FAIL, values, reason=reason, progress=0)

    async def reap(self, key: str, num: int, holder: str, *, received: int, now: float) -> bool:
        values = {"received": received, "verifying_chunk": 0, "in_attempt": 0}
        return await self._end_lease(
            key, num, holder, Step.REAP, values, reason=StopReason.LEASE_EXPIRED, progress=received, now=now
        )

    async def begin_publish(self, key: str, num: int, holder: str) -> bool:
        def begin(db: sqlite3.Connection) -> bool:
            return bool(
                db.execute(
                    "UPDATE transfer_files SET publishing = 1"
                    " WHERE key = ? AND num = ? AND state = ? AND claimed_by = ?",
                    (key, num, FileState.UPLOADING, holder),
                ).rowcount
            )

        return await self._run(begin)

    def publishing_together(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the catalogues are SQLite files of their own

    async def publish(self, key: str, num: int, holder: str, *, md5: str | None, sha256: str | None) -> bool:
        def publish(db: sqlite3.Connection) -> bool:
            now = time.time()
            changed = db.execute(
                "UPDATE transfer_files SET state = ?, md5 = COALESCE(?, md5), sha256 = COALESCE(?, sha256),"
                " received = size, verifying_chunk = 0,"
                " error = NULL, claimed_by = NULL, lease_until = NULL, stop_request = NULL, in_attempt = 0,"
                " publishing = 0, updated_at = ? WHERE key = ? AND num = ? AND claimed_by = ?"
                f" AND state IN {_in(sources(Step.PUBLISH))}",
                (FileState.PUBLISHED, md5, sha256, now, key, num, holder, *sources(Step.PUBLISH)),
            ).rowcount
            if not changed:
                return False
            left = {
                FileState(row[0])
                for row in db.execute(
                    "SELECT DISTINCT state FROM transfer_files WHERE key = ? AND state != ?", (key, FileState.PUBLISHED)
                )
            }
            after: TransferState | None = None
            if not left:
                after = TransferState.FINISHED
            elif left <= FINAL_FILE_STATES:
                # The last open file closed, but a file was terminated: the transfer is cancelled as
                # that termination would have cancelled it, had it come last.
                after = TransferState.CANCELLED
            if after is not None:
                ended = db.execute(
                    "UPDATE transfers SET state = ? WHERE key = ? AND state = ?", (after, key, TransferState.OPEN)
                ).rowcount
                if not ended:
                    after = None  # cancelled or expired while the file was being published
            db.execute("UPDATE transfers SET updated_at = ? WHERE key = ?", (now, key))
            row = _file_row(db, key, num)
            subject = _subject(db, key, row)
            events = events_of(
                Step.PUBLISH,
                subject,
                transfer_after=after if after is TransferState.FINISHED else None,
                bytes=row["size"],
                md5=md5,
                sha256=sha256,
            )
            if after is TransferState.CANCELLED:
                whole = Subject(subject.prefix, key, subject.owner, subject.owner_id)
                events += events_of(Step.TERMINATE, whole, transfer_after=after, reason=StopReason.TERMINATED)
            _insert_events(db, events)
            return True

        return await self._run(publish)

    async def terminate(self, key: str, num: int) -> TransferFile:
        def terminate(db: sqlite3.Connection) -> TransferFile:
            now = time.time()
            row = _file_row(db, key, num)
            before = _file(row)
            if before.state is FileState.PUBLISHED or row["publishing"]:
                raise AlreadyUploaded()
            if before.state not in sources(Step.TERMINATE):
                return before
            db.execute(
                "UPDATE transfer_files SET state = ?, received = 0, claimed_by = NULL, lease_until = NULL,"
                " stop_request = NULL, in_attempt = 0, updated_at = ? WHERE key = ? AND num = ?",
                (FileState.CANCELLED, now, key, num),
            )
            open_left = db.execute(
                f"SELECT COUNT(*) FROM transfer_files WHERE key = ? AND state IN {_in(_OPEN_FILE_STATES)}",
                (key, *_OPEN_FILE_STATES),
            ).fetchone()[0]
            after: TransferState | None = None
            if open_left == 0:
                # Even if every other file was published: one of its files will never come.
                changed = db.execute(
                    "UPDATE transfers SET state = ?, updated_at = ? WHERE key = ? AND state = ?",
                    (TransferState.CANCELLED, now, key, TransferState.OPEN),
                ).rowcount
                after = TransferState.CANCELLED if changed else None
            else:
                db.execute("UPDATE transfers SET updated_at = ? WHERE key = ?", (now, key))
            _insert_events(
                db,
                events_of(Step.TERMINATE, _subject(db, key, row), transfer_after=after, reason=StopReason.TERMINATED),
            )
            return before

        return await self._run(terminate)

    async def cancel(self, key: str, *, now: float) -> Ended | None:
        return await self._run(lambda db: _end(db, key, Step.CANCEL, TransferState.CANCELLED, now))

    async def expire_due(self, now: float, start_timeout: float | None = None) -> list[Ended]:
        never_started = now - start_timeout if start_timeout is not None else float("-inf")

        def expire(db: sqlite3.Connection) -> list[Ended]:
            keys = [
                row["key"]
                for row in db.execute(
                    "SELECT key FROM transfers t WHERE state = ? AND (expires_at <= ? OR (created_at <= ?"
                    " AND NOT EXISTS (SELECT 1 FROM transfer_files f WHERE f.key = t.key AND f.claims > 0)))",
                    (TransferState.OPEN, now, never_started),
                )
            ]
            ended = (_end(db, key, Step.EXPIRE, TransferState.EXPIRED, now) for key in keys)
            return [transfer for transfer in ended if transfer is not None]

        return await self._run(expire)

    async def begin_chunk(self, key: str, num: int, *, verifying: bool) -> None:
        await self._update_file(key, num, verifying_chunk=int(verifying))

    async def set_received(self, key: str, num: int, received: int) -> None:
        await self._update_file(key, num, received=received, verifying_chunk=0)

    async def claims_of(self, holder: str) -> list[StagedFile]:
        return await self._db.read(
            lambda db: [
                _staged(row)
                for row in db.execute(
                    "SELECT * FROM transfer_files WHERE state = ? AND claimed_by = ?", (FileState.UPLOADING, holder)
                )
            ]
        )

    async def expired_leases(self, now: float) -> list[StagedFile]:
        return await self._db.read(
            lambda db: [
                _staged(row)
                for row in db.execute(
                    "SELECT * FROM transfer_files WHERE state = ? AND lease_until <= ?", (FileState.UPLOADING, now)
                )
            ]
        )

    async def staged_files(self) -> list[StagedFile]:
        return await self._db.read(
            lambda db: [
                _staged(row)
                for row in db.execute(
                    "SELECT f.* FROM transfer_files f JOIN transfers t USING (key)"
                    " WHERE t.state = ? AND f.state IN (?, ?)",
                    (TransferState.OPEN, FileState.RESERVED, FileState.UPLOADING),
                )
            ]
        )

    async def recover(self) -> int:
        return await self._run(
            lambda db: (
                db.execute(
                    "UPDATE transfer_files SET state = ?, claimed_by = NULL, lease_until = NULL, stop_request = NULL,"
                    " publishing = 0 WHERE state = ?",
                    (FileState.RESERVED, FileState.UPLOADING),
                ).rowcount
            )
        )

    async def reserved_bytes(self) -> int:
        return await self._db.read(_reserved_bytes)

    async def purge(self, before: float) -> int:
        return await self._run(
            lambda db: (
                db.execute(
                    "DELETE FROM transfers WHERE state != ? AND updated_at < ?", (TransferState.OPEN, before)
                ).rowcount
            )
        )

    # -- the event log --------------------------------------------------------------------------

    async def append(self, events: Sequence[NewEvent], *, now: float) -> list[Event]:
        return await self._run(lambda db: _insert_events(db, events, stamp=now))

    async def events_after(self, last_id: int, *, limit: int) -> list[Event]:
        return await self._db.read(
            lambda db: [
                _event(row)
                for row in db.execute("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (last_id, limit))
            ]
        )

    async def last_event_id(self) -> int:
        # AUTOINCREMENT keeps the largest id it gave in sqlite_sequence, pruned or not.
        return await self._db.read(
            lambda db: int(
                db.execute(
                    "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),"
                    " COALESCE((SELECT MAX(id) FROM events), 0))"
                ).fetchone()[0]
            )
        )

    async def prune_events(self, before: float) -> int:
        # AUTOINCREMENT: ids of deleted events are never handed out again.
        return await self._run(lambda db: db.execute("DELETE FROM events WHERE time < ?", (before,)).rowcount)

    # -- named leases and cursors ---------------------------------------------------------------

    async def acquire(self, name: str, holder: str, *, lease: float, now: float) -> bool:
        def acquire(db: sqlite3.Connection) -> bool:
            changed = db.execute(
                "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
                " SET holder = excluded.holder, until = excluded.until WHERE leases.holder = excluded.holder"
                " OR leases.until <= ?",
                (name, holder, now + lease, now),
            ).rowcount
            return bool(changed)

        return await self._run(acquire)

    async def release(self, name: str, holder: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder)))

    async def cursor(self, name: str) -> int | None:
        def read(db: sqlite3.Connection) -> int | None:
            row = db.execute("SELECT position FROM cursors WHERE name = ?", (name,)).fetchone()
            return None if row is None else int(row[0])

        return await self._db.read(read)

    async def set_cursor(self, name: str, position: int) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO cursors (name, position) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                (name, position),
            )
        )

    async def listen(self, on_signal: Callable[[Signal], None]) -> bool:
        return False  # the processes of one host look at the file every poll interval

    async def close(self) -> None:
        await self._db.close()

    # -- helpers --------------------------------------------------------------------------------

    async def _end_lease(
        self,
        key: str,
        num: int,
        holder: str,
        step: Step,
        values: Mapping[str, object],
        *,
        reason: StopReason | None = None,
        progress: int | None = None,
        now: float | None = None,
    ) -> bool:
        """Make ``step`` on a file ``holder`` leases, ending the lease; append its events."""
        states = sources(step)
        (after,) = {target(state, step) for state in states}
        columns = "".join(f"{name} = ?, " for name in values)

        def end(db: sqlite3.Connection) -> bool:
            at = time.time() if now is None else now
            row = db.execute("SELECT * FROM transfer_files WHERE key = ? AND num = ?", (key, num)).fetchone()
            changed = db.execute(
                f"UPDATE transfer_files SET {columns}state = ?, claimed_by = NULL, lease_until = NULL,"
                f" stop_request = NULL, publishing = 0, updated_at = ? WHERE key = ? AND num = ? AND claimed_by = ?"
                f" AND state IN {_in(states)}",
                (*values.values(), after, at, key, num, holder, *states),
            ).rowcount
            if not changed:
                return False
            db.execute("UPDATE transfers SET updated_at = ? WHERE key = ?", (at, key))
            _insert_events(db, events_of(step, _subject(db, key, row), bytes=progress, reason=reason))
            return True

        return await self._run(end)

    async def _update_file(self, key: str, num: int, **values: object) -> None:
        columns = ", ".join(f"{name} = ?" for name in values)

        def update(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute(
                f"UPDATE transfer_files SET {columns}, updated_at = ? WHERE key = ? AND num = ?",
                (*values.values(), now, key, num),
            )
            db.execute("UPDATE transfers SET updated_at = ? WHERE key = ?", (now, key))

        await self._run(update)


def _holdings(db: sqlite3.Connection, client: str | None) -> Holdings:
    row = db.execute(
        "SELECT COUNT(DISTINCT t.key), COUNT(f.num), COALESCE(SUM(f.size - f.received), 0) FROM transfers t"
        f" LEFT JOIN transfer_files f ON f.key = t.key AND f.state IN {_in(_OPEN_FILE_STATES)}"
        " WHERE t.client IS ? AND t.state = ?",
        (*_OPEN_FILE_STATES, client, TransferState.OPEN),
    ).fetchone()
    return Holdings(int(row[0]), int(row[1]), int(row[2]))


def _end(db: sqlite3.Connection, key: str, step: Step, state: TransferState, now: float) -> Ended | None:
    """End an OPEN transfer (cancel, expire): it and its open files but one being published; its event."""
    before = _load(db, key)
    if before is None or before.state is not TransferState.OPEN:
        return None
    db.execute("UPDATE transfers SET state = ?, updated_at = ? WHERE key = ?", (state, now, key))
    ending = f"key = ? AND publishing = 0 AND state IN {_in(sources(step))}"
    nums = {row[0] for row in db.execute(f"SELECT num FROM transfer_files WHERE {ending}", (key, *sources(step)))}
    db.execute(
        "UPDATE transfer_files SET state = ?, received = 0, verifying_chunk = 0, claimed_by = NULL,"
        f" lease_until = NULL, stop_request = NULL, in_attempt = 0, updated_at = ? WHERE {ending}",
        (FileState.CANCELLED, now, key, *sources(step)),
    )
    _insert_events(db, end_events(before, step, state))
    return Ended(before, tuple(f for f in before.files if f.num in nums))


def _ignore(_: Sequence[Event]) -> None:
    pass


def _subject(db: sqlite3.Connection, key: str, file_row: sqlite3.Row) -> Subject:
    row = db.execute("SELECT prefix, owner, owner_id FROM transfers WHERE key = ?", (key,)).fetchone()
    return subject_from_rows(key, row, file_row)


def _file_row(db: sqlite3.Connection, key: str, num: int) -> sqlite3.Row:
    row = db.execute("SELECT * FROM transfer_files WHERE key = ? AND num = ?", (key, num)).fetchone()
    if row is None:
        raise LookupError(f"no file {num} in transfer {key[:8]}…")
    return row  # type: ignore[no-any-return]


def _status(db: sqlite3.Connection, key: str, num: int) -> ClaimStatus | None:
    row = db.execute(
        "SELECT state, claimed_by, lease_until, stop_request FROM transfer_files WHERE key = ? AND num = ?", (key, num)
    ).fetchone()
    if row is None:
        return None
    return status_from_row(row)


def _idempotent(db: sqlite3.Connection, prefix: str, owner: Identity, idempotency_key: str) -> Transfer | None:
    row = db.execute(
        "SELECT key FROM transfers WHERE prefix = ? AND owner_id IS ? AND idempotency_key = ?",
        (prefix, owner.principal, idempotency_key),
    ).fetchone()
    return None if row is None else _load(db, row["key"])


def _load(db: sqlite3.Connection, key: str) -> Transfer | None:
    row = db.execute("SELECT * FROM transfers WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    files = db.execute("SELECT * FROM transfer_files WHERE key = ? ORDER BY num", (key,)).fetchall()
    return _transfer(row, tuple(_file(f) for f in files))
