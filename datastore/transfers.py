"""The transfer registry: keys, per-file upload states, expiry, persistence.

Rule: every change of a transfer's or a file's state goes through this
module, as one SQL statement guarded by the state it expects, so that two
requests (or two worker processes sharing the database) can never both win.

A transfer is created from an accepted manifest under a fresh key (160 bits
from ``secrets``) bound to the prefix and to the identity that posted it.
Its states::

    OPEN --every file PUBLISHED--> FINISHED
    OPEN --key lifetime passed---> EXPIRED

Each file of a transfer moves through::

    RESERVED  --claim-->   UPLOADING   (handler holds a reservation)
    RELEASED  --claim-->   UPLOADING   (reservation must be taken again)
    UPLOADING --publish--> PUBLISHED   (final)
    UPLOADING --fail-->    RELEASED    (cancel_upload was called)

A second claim of an UPLOADING file is refused (409), as is any claim of a
PUBLISHED one. After a restart no upload is running, so ``recover`` turns
UPLOADING back into RESERVED.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .db import Database
from .errors import AlreadyUploaded, UploadInProgress
from .identity import Identity
from .manifest import Manifest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS transfers (
    key TEXT PRIMARY KEY,
    prefix TEXT NOT NULL,
    owner TEXT,
    owner_authenticated INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS transfers_by_expiry ON transfers (state, expires_at);
CREATE TABLE IF NOT EXISTS transfer_files (
    key TEXT NOT NULL REFERENCES transfers (key) ON DELETE CASCADE,
    num INTEGER NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    md5 TEXT,
    sha256 TEXT,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (key, num)
);
"""


class TransferState(StrEnum):
    """Where a transfer as a whole stands."""

    OPEN = "OPEN"
    FINISHED = "FINISHED"
    EXPIRED = "EXPIRED"


class FileState(StrEnum):
    """Where one file of a transfer stands."""

    RESERVED = "RESERVED"
    UPLOADING = "UPLOADING"
    PUBLISHED = "PUBLISHED"
    RELEASED = "RELEASED"


@dataclass(frozen=True, slots=True)
class TransferFile:
    """One file of a transfer; digests are the declared ones until published."""

    num: int
    name: str
    size: int
    md5: str | None
    sha256: str | None
    state: FileState


@dataclass(frozen=True, slots=True)
class Transfer:
    """A transfer key and everything bound to it."""

    key: str
    prefix: str
    owner: Identity
    state: TransferState
    created_at: float
    expires_at: float
    files: tuple[TransferFile, ...]

    def expired(self, now: float) -> bool:
        """True once the key's lifetime has passed (or the sweeper expired it)."""
        return self.state is TransferState.EXPIRED or (self.state is TransferState.OPEN and now >= self.expires_at)


def new_transfer_key() -> str:
    """An unguessable transfer key: 160 random bits as 40 hex digits."""
    return secrets.token_hex(20)


class TransferRegistry:
    """Transfers persisted in SQLite under the state directory."""

    def __init__(self, path: Path) -> None:
        self._db = Database(path, _SCHEMA)

    async def create(self, prefix: str, owner: Identity, manifest: Manifest, lifetime: float) -> Transfer:
        """Register an accepted manifest under a new key; every file RESERVED."""
        key = new_transfer_key()
        now = time.time()
        files = tuple(
            TransferFile(num, f.name, f.size, f.md5, f.sha256, FileState.RESERVED)
            for num, f in enumerate(manifest.files)
        )
        transfer = Transfer(key, prefix, owner, TransferState.OPEN, now, now + lifetime, files)

        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO transfers (key, prefix, owner, owner_authenticated, state,"
                " created_at, updated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, prefix, owner.dn, int(owner.authenticated), transfer.state, now, now, transfer.expires_at),
            )
            db.executemany(
                "INSERT INTO transfer_files (key, num, name, size, md5, sha256, state, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(key, f.num, f.name, f.size, f.md5, f.sha256, f.state, now) for f in files],
            )

        await self._db.run(insert)
        return transfer

    async def lookup(self, key: str) -> Transfer | None:
        """The transfer registered under ``key``, or ``None``."""
        return await self._db.run(lambda db: _load(db, key))

    async def lookup_file(self, key: str, num: int) -> tuple[Transfer, TransferFile | None] | None:
        """The transfer under ``key`` (without its file list) and its file ``num``."""

        def load(db: sqlite3.Connection) -> tuple[Transfer, TransferFile | None] | None:
            row = db.execute("SELECT * FROM transfers WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            file_row = db.execute("SELECT * FROM transfer_files WHERE key = ? AND num = ?", (key, num)).fetchone()
            return _transfer(row, ()), (_file(file_row) if file_row is not None else None)

        return await self._db.run(load)

    async def claim(self, key: str, num: int) -> FileState:
        """Mark file ``num`` UPLOADING; return the state it had (RESERVED or RELEASED).

        Raises UploadInProgress or AlreadyUploaded (409) when it cannot be claimed.
        """

        def claim(db: sqlite3.Connection) -> FileState:
            row = db.execute("SELECT state FROM transfer_files WHERE key = ? AND num = ?", (key, num)).fetchone()
            state = FileState(row["state"])
            if state is FileState.UPLOADING:
                raise UploadInProgress()
            if state is FileState.PUBLISHED:
                raise AlreadyUploaded()
            db.execute(
                "UPDATE transfer_files SET state = ?, updated_at = ? WHERE key = ? AND num = ? AND state = ?",
                (FileState.UPLOADING, time.time(), key, num, state),
            )
            return state

        return await self._db.run(claim)

    async def release(self, key: str, num: int) -> None:
        """A claimed upload failed and its reservation was cancelled."""
        await self._set_file_state(key, num, FileState.RELEASED)

    async def unclaim(self, key: str, num: int, previous: FileState) -> None:
        """A claimed upload ended without touching the reservation."""
        await self._set_file_state(key, num, previous)

    async def publish(self, key: str, num: int, md5: str, sha256: str) -> None:
        """File ``num`` is published; the transfer is FINISHED when all are."""

        def publish(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute(
                "UPDATE transfer_files SET state = ?, md5 = ?, sha256 = ?, updated_at = ? WHERE key = ? AND num = ?",
                (FileState.PUBLISHED, md5, sha256, now, key, num),
            )
            db.execute(
                "UPDATE transfers SET updated_at = ?,"
                " state = CASE WHEN NOT EXISTS (SELECT 1 FROM transfer_files WHERE key = ? AND state != ?)"
                " THEN ? ELSE state END WHERE key = ?",
                (now, key, FileState.PUBLISHED, TransferState.FINISHED, key),
            )

        await self._db.run(publish)

    async def expire_due(self, now: float) -> list[Transfer]:
        """Mark every OPEN transfer past its lifetime EXPIRED and return them.

        The caller releases the reservations of their RESERVED files.
        """

        def expire(db: sqlite3.Connection) -> list[Transfer]:
            keys = [
                row["key"]
                for row in db.execute(
                    "SELECT key FROM transfers WHERE state = ? AND expires_at <= ?", (TransferState.OPEN, now)
                )
            ]
            expired = []
            for key in keys:
                db.execute(
                    "UPDATE transfers SET state = ?, updated_at = ? WHERE key = ?", (TransferState.EXPIRED, now, key)
                )
                transfer = _load(db, key)
                if transfer is not None:
                    expired.append(transfer)
                db.execute(
                    "UPDATE transfer_files SET state = ?, updated_at = ? WHERE key = ? AND state = ?",
                    (FileState.RELEASED, now, key, FileState.RESERVED),
                )
            return expired

        return await self._db.run(expire)

    async def recover(self) -> int:
        """After a restart: uploads that were running are not; return how many."""
        return await self._db.run(
            lambda db: (
                db.execute(
                    "UPDATE transfer_files SET state = ? WHERE state = ?", (FileState.RESERVED, FileState.UPLOADING)
                ).rowcount
            )
        )

    async def close(self) -> None:
        """Close the database."""
        await self._db.close()

    async def _set_file_state(self, key: str, num: int, state: FileState) -> None:
        await self._db.run(
            lambda db: db.execute(
                "UPDATE transfer_files SET state = ?, updated_at = ? WHERE key = ? AND num = ?",
                (state, time.time(), key, num),
            )
        )


def _load(db: sqlite3.Connection, key: str) -> Transfer | None:
    row = db.execute("SELECT * FROM transfers WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    files = db.execute("SELECT * FROM transfer_files WHERE key = ? ORDER BY num", (key,)).fetchall()
    return _transfer(row, tuple(_file(f) for f in files))


def _transfer(row: sqlite3.Row, files: tuple[TransferFile, ...]) -> Transfer:
    owner = Identity(dn=row["owner"], authenticated=bool(row["owner_authenticated"]))
    return Transfer(
        key=row["key"],
        prefix=row["prefix"],
        owner=owner,
        state=TransferState(row["state"]),
        created_at=row["created_at"],
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
    )
