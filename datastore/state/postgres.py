"""The PostgreSQL backend of the state store (``interface.py``): transfers, their files, the event
log, leases and cursors in one database shared by every node (the jobs: ``postgres_jobs.py``).

Each method is one transaction (``postgres_database.py``). Every write transaction first takes one
advisory lock of the database for its duration, so writers take turns as SQLite's ``BEGIN
IMMEDIATE`` makes them (across nodes and processes alike), and the event ids, handed out under that
lock, grow in commit order: a follower reading the log "after id N" never sees an id become
visible after a higher one. Reads take no lock. Every state change is an UPDATE guarded by the
states the transition table lets it leave (``lifecycle.states.sources``) and, for an upload's
steps, by the lease's holder; the events of the step are inserted in the same transaction.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from psycopg.rows import DictRow

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
from .postgres_database import (
    Connection,
    Migration,
    PostgresDatabase,
    Statement,
    Transaction,
    fetch_all,
    fetch_one,
)
from .postgres_events import (
    EVENTS_SCHEMA,
    appended,
    appended_events,
    events_statement,
    last_event_id,
    send_with_events,
)
from .postgres_events import insert_events as _insert_events
from .postgres_jobs import MIGRATIONS as JOB_MIGRATIONS
from .postgres_jobs import PostgresJobs
from .postgres_signals import STATE_SIGNALS, Listener, process_name
from .records import OPEN_FILE_STATES as _OPEN_FILE_STATES
from .records import end_events, new_transfer, new_transfer_key, status_from_row, subject_from_rows
from .records import event_from_row as _event
from .records import file_from_row as _file
from .records import staged_from_row as _staged
from .records import transfer_from_row as _transfer

MIGRATIONS = (
    Migration(
        1,
        (
            """
            CREATE TABLE transfers (
                key TEXT PRIMARY KEY,
                prefix TEXT NOT NULL,
                -- The owner once per transfer: its name for display, and its principal
                -- (kind, subject, issuer: what ownership is compared by; NULL if anonymous).
                owner TEXT,
                owner_authenticated BOOLEAN NOT NULL,
                owner_id TEXT,
                -- The client (address) whose quota the transfer counts against.
                client TEXT,
                state TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                -- A client's name for its manifest request: sending it again finds the same transfer.
                idempotency_key TEXT
            )
            """,
            "CREATE INDEX transfers_by_state ON transfers (state, expires_at)",
            "CREATE INDEX transfers_by_client ON transfers (client, state)",
            "CREATE INDEX transfers_by_updated ON transfers (updated_at)",
            "CREATE UNIQUE INDEX transfers_by_idempotency ON transfers (prefix, owner_id, idempotency_key)"
            " WHERE idempotency_key IS NOT NULL",
            """
            CREATE TABLE transfer_files (
                key TEXT NOT NULL REFERENCES transfers (key) ON DELETE CASCADE,
                num BIGINT NOT NULL,
                name TEXT NOT NULL,
                size BIGINT NOT NULL,
                md5 TEXT,
                sha256 TEXT,
                state TEXT NOT NULL,
                received BIGINT NOT NULL DEFAULT 0,
                -- TRUE while a request whose chunk carries Upload-Checksum is appending:
                -- after a crash its unverified bytes are cut off.
                verifying_chunk BOOLEAN NOT NULL DEFAULT FALSE,
                error TEXT,
                updated_at DOUBLE PRECISION NOT NULL,
                -- The lease of an UPLOADING file: who holds it, until when, and what another
                -- process asks of the holder ('superseded': a newer request takes over).
                claimed_by TEXT,
                lease_until DOUBLE PRECISION,
                stop_request TEXT,
                -- How many times the file was claimed: a process's cached hash state is
                -- good only if no other request claimed the file after its own.
                claims BIGINT NOT NULL DEFAULT 0,
                -- A tus creation's Upload-Metadata header as sent (HEAD answers it); NULL
                -- for the files of a manifest.
                upload_metadata TEXT,
                -- TRUE from a file.started until the attempt ends (interrupted, failed, completed).
                in_attempt BOOLEAN NOT NULL DEFAULT FALSE,
                -- TRUE once the holder began publishing the verified file: cancelling the transfer lets it finish.
                publishing BOOLEAN NOT NULL DEFAULT FALSE,
                PRIMARY KEY (key, num)
            )
            """,
            "CREATE INDEX transfer_files_by_state ON transfer_files (state, lease_until)",
            "CREATE INDEX transfer_files_by_holder ON transfer_files (claimed_by)",
            *EVENTS_SCHEMA,
            """
            CREATE TABLE leases (
                name TEXT PRIMARY KEY,
                holder TEXT NOT NULL,
                until DOUBLE PRECISION NOT NULL
            )
            """,
            """
            CREATE TABLE cursors (
                name TEXT PRIMARY KEY,
                position BIGINT NOT NULL
            )
            """,
        ),
    ),
    # Cross-node signals (``postgres_signals.py``).
    Migration(2, STATE_SIGNALS),
)

#: How many files' reads a store remembers for the claims that follow them.
_READ_FILES_KEPT = 1024

#: The advisory lock every write transaction of the state store takes, for its duration: writers take turns.
_WRITE_LOCK = "datastore: state"

T = TypeVar("T")


def _in(states: Sequence[object]) -> str:
    return "(" + ", ".join(["%s"] * len(states)) + ")"


class PostgresState(PostgresJobs):
    """The state store in a PostgreSQL database (see :mod:`datastore.state.interface` for the
    contracts), with the job store (``jobs.py``) of :class:`~.postgres_jobs.PostgresJobs`."""

    def __init__(self, url: str, *, max_size: int = 8) -> None:
        self.url = url
        self.process_name = process_name()
        self._db = PostgresDatabase(
            url,
            "state",
            MIGRATIONS,
            max_size=max_size,
            also={"jobs": JOB_MIGRATIONS},
            application_name=self.process_name,
        )
        self.on_appended: Callable[[Sequence[Event]], None] = _ignore
        self._listener: Listener | None = None
        #: What this process last read of a file (``get_file``): its events' subject, which never
        #: changes, and its staged bytes then, on which a claim that follows acts in one round trip
        #: (``_claim_as_read``). At most :data:`_READ_FILES_KEPT`, the oldest forgotten first.
        self._read_files: OrderedDict[tuple[str, int], tuple[Subject, int]] = OrderedDict()

    @contextlib.contextmanager
    def _appending(self) -> Iterator[None]:
        """Collect the events the write transaction inside appends; once it committed,
        :attr:`on_appended` hears them."""
        events: list[Event] = []
        token = appended.set(events)
        try:
            yield
        finally:
            appended.reset(token)
        if events:
            self.on_appended(events)

    async def _run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """``work`` in one write transaction, its turn taken; then :attr:`on_appended` hears the
        events it appended."""
        with self._appending():
            return await self._db.run(work, lock=_WRITE_LOCK)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Transaction]:
        """A write transaction sent in batches (:meth:`PostgresDatabase.transaction`), its turn
        taken; then :attr:`on_appended` hears the events it appended."""
        with self._appending():
            async with self._db.transaction(lock=_WRITE_LOCK) as transaction:
                yield transaction

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

        async def insert(db: Connection) -> None:
            if quota is not None:
                quota.check(await _holdings(db, client), len(records), sum(f.size for f in records))
            if idempotency_key is not None and await _idempotent(db, prefix, owner, idempotency_key) is not None:
                raise DuplicateRequest(idempotency_key)
            total = sum(f.size for f in records)
            if space is not None and total > (available := space - await _reserved_bytes(db)):
                raise InsufficientStorage(f"{total} bytes declared, {max(0, available)} available")
            await db.execute(
                "INSERT INTO transfers (key, prefix, owner, owner_authenticated, owner_id, client, state,"
                " created_at, updated_at, expires_at, idempotency_key)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    key,
                    prefix,
                    owner.dn,
                    owner.authenticated,
                    owner.principal,
                    client,
                    transfer.state,
                    now,
                    now,
                    transfer.expires_at,
                    idempotency_key,
                ),
            )
            # One statement for every file, however many: the columns go as arrays.
            await db.execute(
                "INSERT INTO transfer_files (key, num, name, size, md5, sha256, state, updated_at, upload_metadata)"
                " SELECT %s, num, name, size, md5, sha256, %s, %s, %s"
                " FROM unnest(%s::bigint[], %s::text[], %s::bigint[], %s::text[], %s::text[])"
                " AS manifest (num, name, size, md5, sha256)",
                (
                    key,
                    FileState.RESERVED,
                    now,
                    upload_metadata,
                    [f.num for f in records],
                    [f.name for f in records],
                    [f.size for f in records],
                    [f.md5 for f in records],
                    [f.sha256 for f in records],
                ),
            )
            await _insert_events(
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
        async def read(db: Connection) -> set[str]:
            rows = await fetch_all(
                db,
                "SELECT DISTINCT f.name FROM transfer_files f JOIN transfers t ON t.key = f.key"
                f" WHERE t.prefix = %s AND t.state = %s AND f.state IN {_in(_OPEN_FILE_STATES)} AND f.name = ANY(%s)",
                (prefix, TransferState.OPEN, *_OPEN_FILE_STATES, list(names)),
            )
            return {str(row["name"]) for row in rows}

        return await self._db.read(read)

    async def get(self, key: str) -> Transfer | None:
        return await self._db.read(lambda db: _load(db, key))

    async def get_file(self, key: str, num: int) -> tuple[Transfer, TransferFile | None] | None:
        transfers, files = await self._db.read_together(
            [
                ("SELECT * FROM transfers WHERE key = %s", (key,)),
                ("SELECT * FROM transfer_files WHERE key = %s AND num = %s", (key, num)),
            ]
        )
        if not transfers:
            return None
        if files:
            self._read_files[(key, num)] = (subject_from_rows(key, transfers[0], files[0]), files[0]["received"])
            if len(self._read_files) > _READ_FILES_KEPT:
                self._read_files.popitem(last=False)
        return _transfer(transfers[0], ()), (_file(files[0]) if files else None)

    # -- leases on files ------------------------------------------------------------------------

    async def claim(self, key: str, num: int, holder: str, *, lease: float, now: float) -> Claim:
        read = self._read_files.pop((key, num), None)
        if read is not None:
            claimed = await self._claim_as_read(key, num, holder, lease=lease, now=now, read=read)
            if claimed is not None:
                return claimed
        # Two round trips: the file's row with the BEGIN, the change with the COMMIT.
        async with self._transaction() as transaction:
            (rows,) = await transaction.send([(_FILE_AND_SUBJECT, (key, num))])
            row = _found(rows, key, num)
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
            update: Statement = (
                "UPDATE transfer_files SET state = %s, claimed_by = %s, lease_until = %s, stop_request = NULL,"
                " claims = claims + 1, in_attempt = TRUE, updated_at = %s WHERE key = %s AND num = %s",
                (FileState.UPLOADING, holder, now + lease, now, key, num),
            )
            started = [] if row["in_attempt"] else events_of(Step.CLAIM, _subject(key, row), bytes=before.received)
            await send_with_events(transaction, [update], started)
            return Claim(before, row["claims"] + 1)

    async def _claim_as_read(
        self, key: str, num: int, holder: str, *, lease: float, now: float, read: tuple[Subject, int]
    ) -> Claim | None:
        """The claim in one round trip, for a file this process read (``read``: its subject and its
        staged bytes then): the change and its event are sent with the BEGIN and the COMMIT, each
        guarded by what the event says (the file claimable, with the bytes read; the event only if
        no attempt is on). None if that no longer holds: then nothing changed."""
        subject, received = read
        claimable = sources(Step.CLAIM)
        holds = f"key = %s AND num = %s AND state IN {_in(claimable)} AND received = %s"
        params = (key, num, *claimable, received)
        started = events_of(Step.CLAIM, subject, bytes=received)
        stamp = time.time()
        async with self._transaction() as transaction:
            rows, announced, claimed = await transaction.send(
                [
                    (_FILE_AND_SUBJECT, (key, num)),
                    # The event first: the change below starts the attempt.
                    events_statement(
                        started,
                        stamp,
                        only_if=(f"EXISTS (SELECT 1 FROM transfer_files WHERE {holds} AND NOT in_attempt)", params),
                    ),
                    (
                        "UPDATE transfer_files SET state = %s, claimed_by = %s, lease_until = %s, stop_request = NULL,"
                        f" claims = claims + 1, in_attempt = TRUE, updated_at = %s WHERE {holds} RETURNING claims",
                        (FileState.UPLOADING, holder, now + lease, now, *params),
                    ),
                ],
                commit=True,
            )
            if not claimed:
                return None
            if announced:
                appended_events(started, announced, stamp)  # heard once the block is left
            return Claim(_file(_found(rows, key, num)), claimed[0]["claims"])

    async def renew(self, key: str, num: int, holder: str, *, lease: float, now: float) -> ClaimStatus | None:
        async def renew(db: Connection) -> ClaimStatus | None:
            await db.execute(
                "UPDATE transfer_files SET lease_until = %s"
                " WHERE key = %s AND num = %s AND state = %s AND claimed_by = %s",
                (now + lease, key, num, FileState.UPLOADING, holder),
            )
            return await _status(db, key, num)

        return await self._run(renew)

    async def status(self, key: str, num: int) -> ClaimStatus | None:
        return await self._db.read(lambda db: _status(db, key, num))

    async def request_stop(self, key: str, num: int, reason: StopReason) -> str | None:
        async def ask(db: Connection) -> str | None:
            row = await fetch_one(
                db,
                "SELECT claimed_by FROM transfer_files WHERE key = %s AND num = %s AND state = %s",
                (key, num, FileState.UPLOADING),
            )
            if row is None:
                return None
            await db.execute(
                "UPDATE transfer_files SET stop_request = %s WHERE key = %s AND num = %s", (reason, key, num)
            )
            return str(row["claimed_by"])

        return await self._run(ask)

    async def restore(self, key: str, num: int, holder: str, *, released: bool) -> bool:
        step = Step.RESTORE_RELEASED if released else Step.RESTORE
        return await self._end_lease(key, num, holder, step, {})

    async def pause(self, key: str, num: int, holder: str, *, received: int) -> bool:
        values = {"received": received, "verifying_chunk": False, "error": None}
        return await self._end_lease(key, num, holder, Step.PAUSE, values)

    async def interrupt(self, key: str, num: int, holder: str, *, received: int, reason: StopReason) -> bool:
        values = {"received": received, "verifying_chunk": False, "error": None, "in_attempt": False}
        return await self._end_lease(key, num, holder, Step.INTERRUPT, values, reason=reason, progress=received)

    async def fail(self, key: str, num: int, holder: str, *, reason: StopReason, message: str) -> bool:
        values = {"received": 0, "verifying_chunk": False, "error": message, "in_attempt": False}
        return await self._end_lease(key, num, holder, Step.FAIL, values, reason=reason, progress=0)

    async def reap(self, key: str, num: int, holder: str, *, received: int, now: float) -> bool:
        values = {"received": received, "verifying_chunk": False, "in_attempt": False}
        return await self._end_lease(
            key, num, holder, Step.REAP, values, reason=StopReason.LEASE_EXPIRED, progress=received, now=now
        )

    async def begin_publish(self, key: str, num: int, holder: str) -> bool:
        # Its commit does not wait for the disk: the mark matters only while this process goes on to
        # publish, which it cannot do if PostgreSQL restarts meanwhile (its connections are gone), and
        # the publish's own commit, which waits, makes the mark durable with it (the log is flushed
        # in order). A lost mark is one that no one needed.
        (_, changed) = await self._db.run_together(
            [
                ("SET LOCAL synchronous_commit = off", ()),
                (
                    "UPDATE transfer_files SET publishing = TRUE"
                    " WHERE key = %s AND num = %s AND state = %s AND claimed_by = %s RETURNING num",
                    (key, num, FileState.UPLOADING, holder),
                ),
            ],
            lock=_WRITE_LOCK,
        )
        return bool(changed)

    def publishing_together(self) -> contextlib.AbstractContextManager[None]:
        return self._db.holding_writes()

    async def publish(self, key: str, num: int, holder: str, *, md5: str | None, sha256: str | None) -> bool:
        # Two round trips: the file's change and a look at its transfer with the BEGIN (the write
        # lock is held, so nothing changes between this look and what follows), the transfer's
        # change, the events and the writes held for it (the catalogue's) with the COMMIT.
        held = self._db.take_held()
        async with self._transaction() as transaction:
            now = time.time()
            published, transfers = await transaction.send(
                [
                    (
                        "UPDATE transfer_files SET state = %s, md5 = COALESCE(%s, md5), sha256 = COALESCE(%s, sha256),"
                        " received = size,"
                        " verifying_chunk = FALSE, error = NULL, claimed_by = NULL, lease_until = NULL,"
                        " stop_request = NULL, in_attempt = FALSE, publishing = FALSE, updated_at = %s"
                        f" WHERE key = %s AND num = %s AND claimed_by = %s AND state IN {_in(sources(Step.PUBLISH))}"
                        " RETURNING *",
                        (FileState.PUBLISHED, md5, sha256, now, key, num, holder, *sources(Step.PUBLISH)),
                    ),
                    (
                        "SELECT prefix, owner, owner_id, state, ARRAY(SELECT DISTINCT state FROM transfer_files"
                        " WHERE key = %s AND state != %s) AS left_states FROM transfers WHERE key = %s",
                        (key, FileState.PUBLISHED, key),
                    ),
                ]
            )
            if not published:
                return False
            row, transfer = published[0], transfers[0]
            left = {FileState(state) for state in transfer["left_states"]}
            after: TransferState | None = None
            if not left:
                after = TransferState.FINISHED
            elif left <= FINAL_FILE_STATES:
                # The last open file closed, but a file was terminated: the transfer is cancelled as
                # that termination would have cancelled it, had it come last.
                after = TransferState.CANCELLED
            if transfer["state"] != TransferState.OPEN:
                after = None  # cancelled or expired while the file was being published
            subject = subject_from_rows(key, transfer, row)
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
            ended: Statement = (
                "UPDATE transfers SET state = %s, updated_at = %s WHERE key = %s",
                (after or transfer["state"], now, key),
            )
            await send_with_events(transaction, [ended], events, held=held)
            return True

    async def terminate(self, key: str, num: int) -> TransferFile:
        async def terminate(db: Connection) -> TransferFile:
            now = time.time()
            row = await _file_row(db, key, num)
            before = _file(row)
            if before.state is FileState.PUBLISHED or row["publishing"]:
                raise AlreadyUploaded()
            if before.state not in sources(Step.TERMINATE):
                return before
            await db.execute(
                "UPDATE transfer_files SET state = %s, received = 0, claimed_by = NULL, lease_until = NULL,"
                " stop_request = NULL, in_attempt = FALSE, updated_at = %s WHERE key = %s AND num = %s",
                (FileState.CANCELLED, now, key, num),
            )
            left = await fetch_one(
                db,
                f"SELECT COUNT(*) AS n FROM transfer_files WHERE key = %s AND state IN {_in(_OPEN_FILE_STATES)}",
                (key, *_OPEN_FILE_STATES),
            )
            assert left is not None
            after: TransferState | None = None
            if left["n"] == 0:
                # Even if every other file was published: one of its files will never come.
                changed = await db.execute(
                    "UPDATE transfers SET state = %s, updated_at = %s WHERE key = %s AND state = %s",
                    (TransferState.CANCELLED, now, key, TransferState.OPEN),
                )
                after = TransferState.CANCELLED if changed.rowcount else None
            else:
                await db.execute("UPDATE transfers SET updated_at = %s WHERE key = %s", (now, key))
            await _insert_events(
                db,
                events_of(Step.TERMINATE, _subject(key, row), transfer_after=after, reason=StopReason.TERMINATED),
            )
            return before

        return await self._run(terminate)

    async def cancel(self, key: str, *, now: float) -> Ended | None:
        return await self._run(lambda db: _end(db, key, Step.CANCEL, TransferState.CANCELLED, now))

    async def expire_due(self, now: float, start_timeout: float | None = None) -> list[Ended]:
        never_started = now - start_timeout if start_timeout is not None else float("-inf")

        async def expire(db: Connection) -> list[Ended]:
            rows = await fetch_all(
                db,
                "SELECT key FROM transfers t WHERE state = %s AND (expires_at <= %s OR (created_at <= %s"
                " AND NOT EXISTS (SELECT 1 FROM transfer_files f WHERE f.key = t.key AND f.claims > 0)))",
                (TransferState.OPEN, now, never_started),
            )
            ended = [await _end(db, row["key"], Step.EXPIRE, TransferState.EXPIRED, now) for row in rows]
            return [transfer for transfer in ended if transfer is not None]

        return await self._run(expire)

    async def begin_chunk(self, key: str, num: int, *, verifying: bool) -> None:
        await self._update_file(key, num, verifying_chunk=verifying)

    async def set_received(self, key: str, num: int, received: int) -> None:
        await self._update_file(key, num, received=received, verifying_chunk=False)

    async def claims_of(self, holder: str) -> list[StagedFile]:
        async def read(db: Connection) -> list[StagedFile]:
            rows = await fetch_all(
                db,
                "SELECT * FROM transfer_files WHERE state = %s AND claimed_by = %s",
                (FileState.UPLOADING, holder),
            )
            return [_staged(row) for row in rows]

        return await self._db.read(read)

    async def expired_leases(self, now: float) -> list[StagedFile]:
        async def read(db: Connection) -> list[StagedFile]:
            rows = await fetch_all(
                db, "SELECT * FROM transfer_files WHERE state = %s AND lease_until <= %s", (FileState.UPLOADING, now)
            )
            return [_staged(row) for row in rows]

        return await self._db.read(read)

    async def staged_files(self) -> list[StagedFile]:
        async def read(db: Connection) -> list[StagedFile]:
            rows = await fetch_all(
                db,
                "SELECT f.* FROM transfer_files f JOIN transfers t USING (key)"
                " WHERE t.state = %s AND f.state IN (%s, %s)",
                (TransferState.OPEN, FileState.RESERVED, FileState.UPLOADING),
            )
            return [_staged(row) for row in rows]

        return await self._db.read(read)

    async def recover(self) -> int:
        async def recover(db: Connection) -> int:
            changed = await db.execute(
                "UPDATE transfer_files SET state = %s, claimed_by = NULL, lease_until = NULL, stop_request = NULL,"
                " publishing = FALSE WHERE state = %s",
                (FileState.RESERVED, FileState.UPLOADING),
            )
            return changed.rowcount

        return await self._run(recover)

    async def reserved_bytes(self) -> int:
        return await self._db.read(_reserved_bytes)

    async def purge(self, before: float) -> int:
        async def purge(db: Connection) -> int:
            removed = await db.execute(
                "DELETE FROM transfers WHERE state != %s AND updated_at < %s", (TransferState.OPEN, before)
            )
            return removed.rowcount

        return await self._run(purge)

    # -- the event log --------------------------------------------------------------------------

    async def append(self, events: Sequence[NewEvent], *, now: float) -> list[Event]:
        return await self._run(lambda db: _insert_events(db, events, stamp=now))

    async def events_after(self, last_id: int, *, limit: int) -> list[Event]:
        async def read(db: Connection) -> list[Event]:
            rows = await fetch_all(db, "SELECT * FROM events WHERE id > %s ORDER BY id LIMIT %s", (last_id, limit))
            return [_event(row) for row in rows]

        return await self._db.read(read)

    async def last_event_id(self) -> int:
        return await self._db.read(last_event_id)

    async def prune_events(self, before: float) -> int:
        # The counter keeps the largest id: ids of deleted events are never handed out again.
        async def prune(db: Connection) -> int:
            return (await db.execute("DELETE FROM events WHERE time < %s", (before,))).rowcount

        return await self._run(prune)

    # -- named leases and cursors ---------------------------------------------------------------

    async def acquire(self, name: str, holder: str, *, lease: float, now: float) -> bool:
        async def acquire(db: Connection) -> bool:
            changed = await db.execute(
                "INSERT INTO leases (name, holder, until) VALUES (%s, %s, %s) ON CONFLICT (name) DO UPDATE"
                " SET holder = EXCLUDED.holder, until = EXCLUDED.until WHERE leases.holder = EXCLUDED.holder"
                " OR leases.until <= %s",
                (name, holder, now + lease, now),
            )
            return changed.rowcount > 0

        return await self._run(acquire)

    async def release(self, name: str, holder: str) -> None:
        async def release(db: Connection) -> None:
            await db.execute("DELETE FROM leases WHERE name = %s AND holder = %s", (name, holder))

        await self._run(release)

    async def cursor(self, name: str) -> int | None:
        async def read(db: Connection) -> int | None:
            row = await fetch_one(db, "SELECT position FROM cursors WHERE name = %s", (name,))
            return None if row is None else int(row["position"])

        return await self._db.read(read)

    async def set_cursor(self, name: str, position: int) -> None:
        async def store(db: Connection) -> None:
            await db.execute(
                "INSERT INTO cursors (name, position) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position",
                (name, position),
            )

        await self._run(store)

    async def listen(self, on_signal: Callable[[Signal], None]) -> bool:
        await self._db.read(last_event_id)  # the schema (and its triggers) exists before anyone listens
        listener = Listener(self.url, on_signal, own=self.process_name)
        await listener.start()
        await self.close_listener()
        self._listener = listener
        return True

    async def close_listener(self) -> None:
        """Stop listening (if this object listens)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()

    async def close(self) -> None:
        await self.close_listener()
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
        columns = "".join(f"{name} = %s, " for name in values)

        async def end(db: Connection) -> bool:
            at = time.time() if now is None else now
            row = await fetch_one(db, _FILE_AND_SUBJECT, (key, num))
            changed = await db.execute(
                f"UPDATE transfer_files SET {columns}state = %s, claimed_by = NULL, lease_until = NULL,"
                " stop_request = NULL, publishing = FALSE, updated_at = %s WHERE key = %s AND num = %s"
                f" AND claimed_by = %s AND state IN {_in(states)}",
                (*values.values(), after, at, key, num, holder, *states),
            )
            if not changed.rowcount or row is None:
                return False
            await db.execute("UPDATE transfers SET updated_at = %s WHERE key = %s", (at, key))
            await _insert_events(db, events_of(step, _subject(key, row), bytes=progress, reason=reason))
            return True

        return await self._run(end)

    async def _update_file(self, key: str, num: int, **values: object) -> None:
        columns = ", ".join(f"{name} = %s" for name in values)

        async def update(db: Connection) -> None:
            now = time.time()
            await db.execute(
                f"UPDATE transfer_files SET {columns}, updated_at = %s WHERE key = %s AND num = %s",
                (*values.values(), now, key, num),
            )
            await db.execute("UPDATE transfers SET updated_at = %s WHERE key = %s", (now, key))

        await self._run(update)


async def _reserved_bytes(db: Connection) -> int:
    row = await fetch_one(
        db,
        "SELECT COALESCE(SUM(f.size - f.received), 0) AS reserved FROM transfer_files f JOIN transfers t USING (key)"
        f" WHERE t.state = %s AND f.state IN {_in(_OPEN_FILE_STATES)}",
        (TransferState.OPEN, *_OPEN_FILE_STATES),
    )
    assert row is not None
    return int(row["reserved"])


async def _holdings(db: Connection, client: str | None) -> Holdings:
    row = await fetch_one(
        db,
        "SELECT COUNT(DISTINCT t.key) AS transfers, COUNT(f.num) AS files,"
        " COALESCE(SUM(f.size - f.received), 0) AS bytes FROM transfers t"
        f" LEFT JOIN transfer_files f ON f.key = t.key AND f.state IN {_in(_OPEN_FILE_STATES)}"
        " WHERE t.client IS NOT DISTINCT FROM %s AND t.state = %s",
        (*_OPEN_FILE_STATES, client, TransferState.OPEN),
    )
    assert row is not None
    return Holdings(int(row["transfers"]), int(row["files"]), int(row["bytes"]))


async def _end(db: Connection, key: str, step: Step, state: TransferState, now: float) -> Ended | None:
    """End an OPEN transfer (cancel, expire): it and its open files but one being published; its event."""
    before = await _load(db, key)
    if before is None or before.state is not TransferState.OPEN:
        return None
    await db.execute("UPDATE transfers SET state = %s, updated_at = %s WHERE key = %s", (state, now, key))
    ending = f"key = %s AND publishing = FALSE AND state IN {_in(sources(step))}"
    nums = {
        row["num"]
        for row in await fetch_all(db, f"SELECT num FROM transfer_files WHERE {ending}", (key, *sources(step)))
    }
    await db.execute(
        "UPDATE transfer_files SET state = %s, received = 0, verifying_chunk = FALSE, claimed_by = NULL,"
        f" lease_until = NULL, stop_request = NULL, in_attempt = FALSE, updated_at = %s WHERE {ending}",
        (FileState.CANCELLED, now, key, *sources(step)),
    )
    await _insert_events(db, end_events(before, step, state))
    return Ended(before, tuple(f for f in before.files if f.num in nums))


def _ignore(_: Sequence[Event]) -> None:
    pass


#: A file's row with its transfer's columns that its events' subject needs.
_FILE_AND_SUBJECT = (
    "SELECT f.*, t.prefix, t.owner, t.owner_id FROM transfer_files f JOIN transfers t USING (key)"
    " WHERE f.key = %s AND f.num = %s"
)


def _subject(key: str, row: Mapping[str, Any]) -> Subject:
    """The subject of the events of the file in ``row`` (read with :data:`_FILE_AND_SUBJECT`)."""
    return subject_from_rows(key, row, row)


def _found(rows: Sequence[DictRow], key: str, num: int) -> DictRow:
    """The row of :data:`_FILE_AND_SUBJECT`'s answer; LookupError if there is none."""
    if not rows:
        raise LookupError(f"no file {num} in transfer {key[:8]}…")
    return rows[0]


async def _file_row(db: Connection, key: str, num: int) -> DictRow:
    """The file's row and its subject's columns; LookupError if the transfer has no such file."""
    row = await fetch_one(db, _FILE_AND_SUBJECT, (key, num))
    if row is None:
        raise LookupError(f"no file {num} in transfer {key[:8]}…")
    return row


async def _status(db: Connection, key: str, num: int) -> ClaimStatus | None:
    row = await fetch_one(
        db,
        "SELECT state, claimed_by, lease_until, stop_request FROM transfer_files WHERE key = %s AND num = %s",
        (key, num),
    )
    if row is None:
        return None
    return status_from_row(row)


async def _idempotent(db: Connection, prefix: str, owner: Identity, idempotency_key: str) -> Transfer | None:
    row = await fetch_one(
        db,
        "SELECT key FROM transfers WHERE prefix = %s AND owner_id IS NOT DISTINCT FROM %s AND idempotency_key = %s",
        (prefix, owner.principal, idempotency_key),
    )
    return None if row is None else await _load(db, row["key"])


async def _load(db: Connection, key: str) -> Transfer | None:
    row = await fetch_one(db, "SELECT * FROM transfers WHERE key = %s", (key,))
    if row is None:
        return None
    files = await fetch_all(db, "SELECT * FROM transfer_files WHERE key = %s ORDER BY num", (key,))
    return _transfer(row, tuple(_file(f) for f in files))
