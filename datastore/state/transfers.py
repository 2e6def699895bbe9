"""The transfer registry: keys, per-file upload states, offsets, expiry, persistence.

Rule: every change of a transfer's or a file's state goes through this
module, as SQL guarded by the state it expects, so that two requests (or
two worker processes sharing the database) can never both win.

A transfer is created from an accepted manifest (or a tus creation request)
under a fresh key (160 bits from ``secrets``) bound to the prefix and to
the identity that posted it. Its stored states::

    OPEN --every file PUBLISHED-------> FINISHED
    OPEN --key lifetime passed--------> EXPIRED
    OPEN --DELETE by its owner--------> CANCELLED

Each file of a transfer moves through::

    RESERVED  --claim-->   UPLOADING   (the handler holds a reservation)
    RELEASED  --claim-->   UPLOADING   (the reservation must be taken again)
    UPLOADING --publish--> PUBLISHED   (final)
    UPLOADING --pause-->   RESERVED    (a resumable upload stopped; ``received`` bytes kept)
    UPLOADING --fail-->    RELEASED    (cancel_upload was called; staged bytes dropped)
    any but PUBLISHED --terminate/cancel/expire--> CANCELLED (final)

``received`` counts the bytes staged for a resumable upload; the staging
file holds exactly that many (a restart reconciles them, see
``recover_offsets``). The states a client sees (``PENDING``,
``IN_PROGRESS``, ``FINISHED``, ``FAILED``, ``CANCELLED``, ``EXPIRED``) are
derived from these in :meth:`Transfer.public_state`.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ..errors import AlreadyUploaded, QuotaExceeded, TransferCancelled, UploadInProgress
from ..protocol.manifest import Manifest
from ..security.identity import Identity
from .database import Database

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
    -- The worker process whose request holds the UPLOADING claim, and what
    -- another worker asks of it ('superseded': a newer request takes over).
    claimed_by TEXT,
    stop_request TEXT,
    -- How many times the file was claimed: a worker's cached hash state is
    -- good only if no other request claimed the file after its own.
    claims INTEGER NOT NULL DEFAULT 0,
    -- A tus creation's Upload-Metadata header as sent (HEAD answers it); NULL
    -- for the files of a manifest.
    upload_metadata TEXT,
    PRIMARY KEY (key, num)
);
"""

#: Columns added after the first release, for files created before them.
_ADDED_COLUMNS = {
    "claimed_by": "TEXT",
    "stop_request": "TEXT",
    "claims": "INTEGER NOT NULL DEFAULT 0",
    "upload_metadata": "TEXT",
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


class TransferState(StrEnum):
    """Where a transfer as a whole stands, as stored."""

    OPEN = "OPEN"
    FINISHED = "FINISHED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


class FileState(StrEnum):
    """Where one file of a transfer stands, as stored."""

    RESERVED = "RESERVED"
    UPLOADING = "UPLOADING"
    PUBLISHED = "PUBLISHED"
    RELEASED = "RELEASED"
    CANCELLED = "CANCELLED"


_FINAL_FILE_STATES = (FileState.PUBLISHED, FileState.CANCELLED)


@dataclass(frozen=True, slots=True)
class TransferFile:
    """One file of a transfer; digests are the declared ones until published."""

    num: int
    name: str
    size: int
    md5: str | None
    sha256: str | None
    state: FileState
    received: int = 0
    error: str | None = None
    updated_at: float = 0.0
    #: The Upload-Metadata of the tus creation request, as sent; None for a manifest's files.
    upload_metadata: str | None = None

    def public_state(self, transfer_state: TransferState) -> str:
        """The state a client sees for this file."""
        if self.state is FileState.PUBLISHED:
            return "FINISHED"
        if transfer_state is TransferState.EXPIRED:
            return "EXPIRED"
        if self.state is FileState.CANCELLED or transfer_state is TransferState.CANCELLED:
            return "CANCELLED"
        if self.state is FileState.RELEASED:
            return "FAILED"
        if self.state is FileState.UPLOADING or self.received > 0:
            return "IN_PROGRESS"
        return "PENDING"


@dataclass(frozen=True, slots=True)
class Transfer:
    """A transfer key and everything bound to it."""

    key: str
    prefix: str
    owner: Identity
    state: TransferState
    created_at: float
    updated_at: float
    expires_at: float
    files: tuple[TransferFile, ...]

    def usable_by(self, identity: Identity) -> bool:
        """Whether ``identity`` may upload under this key: the identity that registered it
        (an anonymous transfer, by anonymous clients that hold the key)."""
        return self.owner == identity

    def manageable_by(self, identity: Identity) -> bool:
        """Whether ``identity`` may see or cancel this transfer: as :meth:`usable_by`, or an administrator."""
        return identity.admin or self.usable_by(identity)

    def expired(self, now: float) -> bool:
        """True once the key's lifetime has passed (or the sweeper expired it)."""
        return self.state is TransferState.EXPIRED or (self.state is TransferState.OPEN and now >= self.expires_at)

    def public_state(self) -> str:
        """``PENDING``, ``IN_PROGRESS``, ``FINISHED``, ``FAILED``, ``CANCELLED`` or ``EXPIRED``.

        ``FAILED`` means the last attempt at some file failed and nothing is
        uploading; the key stays valid and the file may be sent again.
        """
        if self.state is not TransferState.OPEN:
            return self.state.value
        states = {f.public_state(self.state) for f in self.files}
        if "IN_PROGRESS" in states:
            return "IN_PROGRESS"
        if "FAILED" in states:
            return "FAILED"
        if states <= {"PENDING"}:
            return "PENDING"
        return "IN_PROGRESS"


@dataclass(frozen=True, slots=True)
class ClientQuota:
    """What one client's open transfers may hold at once: transfers, reserved names, bytes still to come."""

    transfers: int
    names: int
    bytes: int

    def check(self, held: tuple[int, int, int], names: int, size: int) -> None:
        """QuotaExceeded (429, naming the limit) unless ``held`` plus one transfer of ``names`` files and
        ``size`` bytes fits."""
        transfers, reserved_names, reserved_bytes = held
        if transfers + 1 > self.transfers:
            raise QuotaExceeded(f"you hold {transfers} open transfers; the limit is {self.transfers}")
        if reserved_names + names > self.names:
            raise QuotaExceeded(
                f"your open transfers reserve {reserved_names} names and this one {names}; the limit is {self.names}"
            )
        if reserved_bytes + size > self.bytes:
            raise QuotaExceeded(
                f"your open transfers may still write {reserved_bytes} bytes and this one {size}; "
                f"the limit is {self.bytes}"
            )


def _holdings(db: sqlite3.Connection, client: str | None) -> tuple[int, int, int]:
    """(open transfers, names they reserve, bytes they may still write) of ``client``."""
    row = db.execute(
        "SELECT COUNT(DISTINCT t.key), COUNT(f.num), COALESCE(SUM(f.size - f.received), 0) FROM transfers t"
        " LEFT JOIN transfer_files f ON f.key = t.key AND f.state NOT IN (?, ?)"
        " WHERE t.client IS ? AND t.state = ?",
        (FileState.PUBLISHED, FileState.CANCELLED, client, TransferState.OPEN),
    ).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def new_transfer_key() -> str:
    """An unguessable transfer key: 160 random bits as 40 hex digits."""
    return secrets.token_hex(20)


class TransferRegistry:
    """Transfers persisted in SQLite under the state directory."""

    def __init__(self, path: Path) -> None:
        self._db = Database(path, _SCHEMA, _migrate)

    async def create(
        self,
        prefix: str,
        owner: Identity,
        manifest: Manifest,
        lifetime: float,
        upload_metadata: str | None = None,
        *,
        client: str | None = None,
        quota: ClientQuota | None = None,
    ) -> Transfer:
        """Register an accepted manifest under a new key; every file RESERVED.

        ``upload_metadata`` is the Upload-Metadata header of a tus creation (a
        one-file manifest), kept as sent. ``client`` is whose quota the
        transfer counts against; with a ``quota``, QuotaExceeded (429) if the
        client's open transfers would then hold more than it allows (checked
        in the same transaction as the insertion).
        """
        key = new_transfer_key()
        now = time.time()
        files = tuple(
            TransferFile(
                num,
                f.name,
                f.size,
                f.md5,
                f.sha256,
                FileState.RESERVED,
                updated_at=now,
                upload_metadata=upload_metadata,
            )
            for num, f in enumerate(manifest.files)
        )
        transfer = Transfer(key, prefix, owner, TransferState.OPEN, now, now, now + lifetime, files)

        def insert(db: sqlite3.Connection) -> None:
            if quota is not None:
                quota.check(_holdings(db, client), len(files), manifest.total_size)
            db.execute(
                "INSERT INTO transfers (key, prefix, owner, owner_authenticated, owner_id, client, state,"
                " created_at, updated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                ),
            )
            db.executemany(
                "INSERT INTO transfer_files (key, num, name, size, md5, sha256, state, updated_at, upload_metadata)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(key, f.num, f.name, f.size, f.md5, f.sha256, f.state, now, f.upload_metadata) for f in files],
            )

        await self._db.run(insert)
        return transfer

    async def check_quota(self, client: str | None, quota: ClientQuota, names: int, size: int) -> None:
        """QuotaExceeded (429) unless ``client`` may open one more transfer of ``names`` files and ``size`` bytes."""
        held = await self._db.read(lambda db: _holdings(db, client))
        quota.check(held, names, size)

    async def lookup(self, key: str) -> Transfer | None:
        """The transfer registered under ``key``, or ``None``."""
        return await self._db.read(lambda db: _load(db, key))

    async def lookup_file(self, key: str, num: int) -> tuple[Transfer, TransferFile | None] | None:
        """The transfer under ``key`` (without its file list) and its file ``num``."""

        def load(db: sqlite3.Connection) -> tuple[Transfer, TransferFile | None] | None:
            row = db.execute("SELECT * FROM transfers WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            file_row = db.execute("SELECT * FROM transfer_files WHERE key = ? AND num = ?", (key, num)).fetchone()
            return _transfer(row, ()), (_file(file_row) if file_row is not None else None)

        return await self._db.read(load)

    async def claim(self, key: str, num: int, worker: str) -> tuple[TransferFile, int]:
        """Mark file ``num`` UPLOADING for ``worker``; return it as it was (RESERVED or
        RELEASED) and the number of this claim.

        Raises UploadInProgress or AlreadyUploaded (409), or TransferCancelled
        (410) for a terminated file.
        """

        def claim(db: sqlite3.Connection) -> tuple[TransferFile, int]:
            row = db.execute("SELECT * FROM transfer_files WHERE key = ? AND num = ?", (key, num)).fetchone()
            before = _file(row)
            if before.state is FileState.UPLOADING:
                raise UploadInProgress()
            if before.state is FileState.PUBLISHED:
                raise AlreadyUploaded()
            if before.state is FileState.CANCELLED:
                raise TransferCancelled("this upload was terminated")
            db.execute(
                "UPDATE transfer_files SET state = ?, claimed_by = ?, stop_request = NULL, claims = claims + 1,"
                " updated_at = ? WHERE key = ? AND num = ?",
                (FileState.UPLOADING, worker, time.time(), key, num),
            )
            return before, row["claims"] + 1

        return await self._db.run(claim)

    async def restore(self, key: str, num: int, state: FileState, worker: str) -> None:
        """Undo ``worker``'s claim that was never used: the file goes back to ``state``."""
        await self._update_claimed(key, num, worker, state=state)

    async def claim_status(self, key: str, num: int) -> tuple[FileState, str | None, str | None] | None:
        """(state, claimed_by, stop_request) of a file, or None if it is gone."""

        def status(db: sqlite3.Connection) -> tuple[FileState, str | None, str | None] | None:
            row = db.execute(
                "SELECT state, claimed_by, stop_request FROM transfer_files WHERE key = ? AND num = ?", (key, num)
            ).fetchone()
            return None if row is None else (FileState(row["state"]), row["claimed_by"], row["stop_request"])

        return await self._db.read(status)

    async def request_stop(self, key: str, num: int, reason: str) -> str | None:
        """Ask the worker holding the claim on a file to stop (``reason``); returns that worker, if any."""

        def ask(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT claimed_by FROM transfer_files WHERE key = ? AND num = ? AND state = ?",
                (key, num, FileState.UPLOADING),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE transfer_files SET stop_request = ? WHERE key = ? AND num = ?", (reason, key, num))
            return str(row["claimed_by"])

        return await self._db.run(ask)

    async def claims_of(self, worker: str) -> list[tuple[str, int, int, bool]]:
        """``(key, num, received, verifying_chunk)`` of each file ``worker`` holds a claim on.

        For a worker that died: :func:`datastore.storage.staging.reconcile_files`
        checks them against the disk before :meth:`release_worker` ends them.
        """
        return await self._db.read(
            lambda db: [
                (row["key"], row["num"], row["received"], bool(row["verifying_chunk"]))
                for row in db.execute(
                    "SELECT key, num, received, verifying_chunk FROM transfer_files WHERE state = ? AND claimed_by = ?",
                    (FileState.UPLOADING, worker),
                )
            ]
        )

    async def release_worker(self, worker: str, offsets: Mapping[tuple[str, int], int]) -> int:
        """A worker process died: its claims end (UPLOADING -> RESERVED), each file with the
        ``offsets`` bytes really staged as received. Returns how many claims ended."""

        def release(db: sqlite3.Connection) -> int:
            now = time.time()
            ended = 0
            for (key, num), received in offsets.items():
                changed = db.execute(
                    "UPDATE transfer_files SET state = ?, received = ?, verifying_chunk = 0, claimed_by = NULL,"
                    " stop_request = NULL, updated_at = ? WHERE key = ? AND num = ? AND state = ? AND claimed_by = ?",
                    (FileState.RESERVED, received, now, key, num, FileState.UPLOADING, worker),
                ).rowcount
                if changed:
                    db.execute("UPDATE transfers SET updated_at = ? WHERE key = ?", (now, key))
                ended += changed
            return ended

        return await self._db.run(release)

    async def begin_chunk(self, key: str, num: int, *, verifying: bool) -> None:
        """A resumable request starts appending; remember whether its chunk is checksummed."""
        await self._update_file(key, num, verifying_chunk=int(verifying))

    async def pause(self, key: str, num: int, received: int, worker: str) -> None:
        """``worker``'s resumable upload stopped with ``received`` bytes staged; it may go on later.

        Nothing changes if the file is no longer claimed by ``worker`` (another
        worker terminated or cancelled it meanwhile).
        """
        await self._update_claimed(
            key, num, worker, state=FileState.RESERVED, received=received, verifying_chunk=0, error=None
        )

    async def release(self, key: str, num: int, error: str, worker: str) -> None:
        """``worker``'s upload failed and its reservation was cancelled; staged bytes are gone."""
        await self._update_claimed(
            key, num, worker, state=FileState.RELEASED, received=0, verifying_chunk=0, error=error
        )

    async def publish(self, key: str, num: int, md5: str, sha256: str) -> None:
        """File ``num`` is published; the transfer is FINISHED when all are."""

        def publish(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute(
                "UPDATE transfer_files SET state = ?, md5 = ?, sha256 = ?, received = size, verifying_chunk = 0,"
                " error = NULL, claimed_by = NULL, stop_request = NULL, updated_at = ? WHERE key = ? AND num = ?",
                (FileState.PUBLISHED, md5, sha256, now, key, num),
            )
            db.execute(
                "UPDATE transfers SET updated_at = ?,"
                " state = CASE WHEN state = ? AND NOT EXISTS"
                " (SELECT 1 FROM transfer_files WHERE key = ? AND state != ?) THEN ? ELSE state END"
                " WHERE key = ?",
                (now, TransferState.OPEN, key, FileState.PUBLISHED, TransferState.FINISHED, key),
            )

        await self._db.run(publish)

    async def terminate_file(self, key: str, num: int) -> TransferFile:
        """tus termination of one file: CANCELLED; returns the file as it was.

        A transfer none of whose files can still be uploaded becomes
        CANCELLED (or FINISHED if every other file was published).
        """

        def terminate(db: sqlite3.Connection) -> TransferFile:
            now = time.time()
            before = _file(db.execute("SELECT * FROM transfer_files WHERE key = ? AND num = ?", (key, num)).fetchone())
            if before.state is FileState.PUBLISHED:
                raise AlreadyUploaded()
            db.execute(
                "UPDATE transfer_files SET state = ?, received = 0, updated_at = ? WHERE key = ? AND num = ?",
                (FileState.CANCELLED, now, key, num),
            )
            open_left = db.execute(
                "SELECT COUNT(*) FROM transfer_files WHERE key = ? AND state NOT IN (?, ?)",
                (key, FileState.PUBLISHED, FileState.CANCELLED),
            ).fetchone()[0]
            if open_left == 0:
                db.execute(
                    "UPDATE transfers SET state = ?, updated_at = ? WHERE key = ? AND state = ?",
                    (TransferState.CANCELLED, now, key, TransferState.OPEN),
                )
            return before

        return await self._db.run(terminate)

    async def cancel(self, key: str) -> Transfer | None:
        """Mark an OPEN transfer CANCELLED; return it as it was, or None if it was not OPEN."""
        return await self._end(key, TransferState.CANCELLED, time.time())

    async def expire_due(self, now: float, start_timeout: float | None = None) -> list[Transfer]:
        """Mark EXPIRED every OPEN transfer past its lifetime, or (with ``start_timeout``) that
        no upload ever began within that many seconds; return them as they were."""
        never_started = now - start_timeout if start_timeout is not None else float("-inf")
        keys = await self._db.run(
            lambda db: [
                row["key"]
                for row in db.execute(
                    "SELECT key FROM transfers t WHERE state = ? AND (expires_at <= ? OR (created_at <= ?"
                    " AND NOT EXISTS (SELECT 1 FROM transfer_files f WHERE f.key = t.key AND f.claims > 0)))",
                    (TransferState.OPEN, now, never_started),
                )
            ]
        )
        expired = []
        for key in keys:
            transfer = await self._end(key, TransferState.EXPIRED, now)
            if transfer is not None:
                expired.append(transfer)
        return expired

    async def purge(self, before: float) -> int:
        """Forget finished, cancelled and expired transfers last changed before ``before``."""
        return await self._db.run(
            lambda db: (
                db.execute(
                    "DELETE FROM transfers WHERE state != ? AND updated_at < ?", (TransferState.OPEN, before)
                ).rowcount
            )
        )

    async def reserved_bytes(self) -> int:
        """Bytes that open transfers may still write (declared sizes less what is staged)."""
        return await self._db.read(
            lambda db: db.execute(
                "SELECT COALESCE(SUM(f.size - f.received), 0) FROM transfer_files f JOIN transfers t USING (key)"
                " WHERE t.state = ? AND f.state NOT IN (?, ?)",
                (TransferState.OPEN, FileState.PUBLISHED, FileState.CANCELLED),
            ).fetchone()[0]
        )

    async def resumable_files(self) -> list[tuple[str, int, int, bool]]:
        """``(key, num, received, verifying_chunk)`` of every file of an OPEN transfer that may hold staged bytes."""
        return await self._db.read(
            lambda db: [
                (row["key"], row["num"], row["received"], bool(row["verifying_chunk"]))
                for row in db.execute(
                    "SELECT f.key, f.num, f.received, f.verifying_chunk FROM transfer_files f"
                    " JOIN transfers t USING (key) WHERE t.state = ? AND f.state IN (?, ?)",
                    (TransferState.OPEN, FileState.RESERVED, FileState.UPLOADING),
                )
            ]
        )

    async def recover(self) -> int:
        """After a restart: no upload is running any more. Returns how many were."""
        return await self._db.run(
            lambda db: (
                db.execute(
                    "UPDATE transfer_files SET state = ?, claimed_by = NULL, stop_request = NULL WHERE state = ?",
                    (FileState.RESERVED, FileState.UPLOADING),
                ).rowcount
            )
        )

    async def set_received(self, key: str, num: int, received: int) -> None:
        """Record the bytes really staged for a file (after a restart)."""
        await self._update_file(key, num, received=received, verifying_chunk=0)

    async def close(self) -> None:
        """Close the database."""
        await self._db.close()

    async def _end(self, key: str, state: TransferState, now: float) -> Transfer | None:
        def end(db: sqlite3.Connection) -> Transfer | None:
            before = _load(db, key)
            if before is None or before.state is not TransferState.OPEN:
                return None
            db.execute("UPDATE transfers SET state = ?, updated_at = ? WHERE key = ?", (state, now, key))
            db.execute(
                "UPDATE transfer_files SET state = ?, received = 0, verifying_chunk = 0, updated_at = ?"
                " WHERE key = ? AND state != ?",
                (FileState.CANCELLED, now, key, FileState.PUBLISHED),
            )
            return before

        return await self._db.run(end)

    async def _update_claimed(self, key: str, num: int, worker: str, **values: object) -> None:
        """Update a file that is UPLOADING under ``worker``'s claim, ending the claim; else nothing."""
        columns = ", ".join(f"{name} = ?" for name in values)

        def update(db: sqlite3.Connection) -> None:
            now = time.time()
            changed = db.execute(
                f"UPDATE transfer_files SET {columns}, claimed_by = NULL, stop_request = NULL, updated_at = ?"  # noqa: S608
                " WHERE key = ? AND num = ? AND state = ? AND claimed_by = ?",
                (*values.values(), now, key, num, FileState.UPLOADING, worker),
            ).rowcount
            if changed:
                db.execute("UPDATE transfers SET updated_at = ? WHERE key = ?", (now, key))

        await self._db.run(update)

    async def _update_file(self, key: str, num: int, **values: object) -> None:
        columns = ", ".join(f"{name} = ?" for name in values)

        def update(db: sqlite3.Connection) -> None:
            db.execute(
                f"UPDATE transfer_files SET {columns}, updated_at = ? WHERE key = ? AND num = ?",  # noqa: S608
                (*values.values(), time.time(), key, num),
            )
            db.execute("UPDATE transfers SET updated_at = ? WHERE key = ?", (time.time(), key))

        await self._db.run(update)


def _load(db: sqlite3.Connection, key: str) -> Transfer | None:
    row = db.execute("SELECT * FROM transfers WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    files = db.execute("SELECT * FROM transfer_files WHERE key = ? ORDER BY num", (key,)).fetchall()
    return _transfer(row, tuple(_file(f) for f in files))


def _transfer(row: sqlite3.Row, files: tuple[TransferFile, ...]) -> Transfer:
    owner = Identity.from_principal(row["owner_id"], row["owner"])
    return Transfer(
        key=row["key"],
        prefix=row["prefix"],
        owner=owner,
        state=TransferState(row["state"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        files=files,
    )


def _file(row: sqlite3.Row) -> TransferFile:
    return TransferFile(
        num=row["num"],
        name=row["name"],
        size=row["size"],
        md5=row["md5"],
        sha256=row["sha256"],
        state=FileState(row["state"]),
        received=row["received"],
        error=row["error"],
        updated_at=row["updated_at"],
        upload_metadata=row["upload_metadata"],
    )
