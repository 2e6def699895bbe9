"""The SQLite backend of the catalogue (``catalogue.py``): one file per prefix, kept outside the
prefix's folder, shared by the processes of ``serve --workers N``.

Table ``files`` holds the published records, ``pending`` the reserved names; each keeps its names'
folded form (``fold``) UNIQUE, so two names that fold alike cannot both be in one table. Each method
is one transaction on the database thread (``database.py``); the ones that write are ``BEGIN
IMMEDIATE``, so a check and the write it decides are never interleaved with another process's.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from ..protocol.names import fold_name
from .catalogue import Conflict, NameTaken, Reservation, StoredFile, TakePolicy
from .database import Database

_FILES = """
CREATE TABLE IF NOT EXISTS files (
    name TEXT PRIMARY KEY,
    fold TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    -- NULL until known: computed after publishing when the upload did not declare it.
    md5 TEXT,
    sha256 TEXT,
    owner TEXT,
    owner_authenticated INTEGER NOT NULL DEFAULT 0,
    uploaded_at REAL NOT NULL,
    -- The uploader's principal (Identity.principal; NULL: anonymous, nobody owns it),
    -- and whether the file came over TLS.
    owner_id TEXT,
    tls INTEGER NOT NULL DEFAULT 0
)
"""
#: Where the files whose digests are still to be computed are found.
_UNDIGESTED_INDEX = (
    "CREATE INDEX IF NOT EXISTS files_undigested ON files (uploaded_at) WHERE md5 IS NULL OR sha256 IS NULL"
)
_PENDING = """
CREATE TABLE IF NOT EXISTS pending (
    name TEXT PRIMARY KEY,
    fold TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    -- Not written since owners are kept once per transfer (in the transfer registry).
    owner TEXT,
    reserved_at REAL NOT NULL
)
"""
_SCHEMA = f"{_FILES};\n{_UNDIGESTED_INDEX};\n{_PENDING};\n"


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a catalogue of an earlier version up to date."""
    _add_principals(db)
    _allow_unknown_digests(db)


def _allow_unknown_digests(db: sqlite3.Connection) -> None:
    """Catalogues from before digests computed after publishing required both: the table is rebuilt
    without that constraint (SQLite cannot drop one in place)."""
    required = {row["name"] for row in db.execute("PRAGMA table_info(files)") if row["notnull"]}
    if "md5" not in required:
        return
    columns = "name, fold, size, md5, sha256, owner, owner_authenticated, uploaded_at, owner_id, tls"
    db.execute("ALTER TABLE files RENAME TO files_before_digests")
    db.execute(_FILES)
    db.execute(f"INSERT INTO files ({columns}) SELECT {columns} FROM files_before_digests")
    db.execute("DROP TABLE files_before_digests")  # and its index
    db.execute(_UNDIGESTED_INDEX)


def _add_principals(db: sqlite3.Connection) -> None:
    """Catalogues from before principals: an unauthenticated owner was an X-Client-DN; a certificate's
    subject was kept in a form that cannot be compared safely, so its files are left to administrators."""
    columns = {row["name"] for row in db.execute("PRAGMA table_info(files)")}
    if "owner_id" in columns:
        return
    if "owner_authenticated" not in columns:
        # The first catalogues, from before TLS: every owner was an X-Client-DN.
        db.execute("ALTER TABLE files ADD COLUMN owner_authenticated INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE files ADD COLUMN owner_id TEXT")
    db.execute("ALTER TABLE files ADD COLUMN tls INTEGER NOT NULL DEFAULT 0")
    # As in the transfer registry: a certificate's old subject form matches no certificate, so its files
    # are the administrators' to delete or replace.
    db.execute(
        "UPDATE files SET owner_id = CASE WHEN owner_authenticated = 0 THEN json_array('asserted', owner)"
        " ELSE json_array('certificate', owner, '') END WHERE owner IS NOT NULL"
    )
    db.execute("UPDATE files SET tls = owner_authenticated")


class SqliteCatalogue:
    """The catalogue in one SQLite file (see :mod:`datastore.state.catalogue` for the contracts)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = Database(path, _SCHEMA, _migrate)

    async def check(self, files: Sequence[Reservation], *, may_take: TakePolicy) -> list[Conflict]:
        return await self._db.read(lambda db: _conflicts(db, files, may_take))

    async def reserve(self, files: Sequence[Reservation], *, may_take: TakePolicy, now: float) -> list[Conflict]:
        def reserve(db: sqlite3.Connection) -> list[Conflict]:
            conflicts = _conflicts(db, files, may_take)
            if not conflicts:
                db.executemany(
                    "INSERT INTO pending (name, fold, size, reserved_at) VALUES (?, ?, ?, ?)",
                    [(f.name, fold_name(f.name), f.size, now) for f in files],
                )
            return conflicts

        return await self._db.run(reserve)

    async def is_reserved(self, name: str) -> bool:
        row = await self._db.read(lambda db: db.execute("SELECT 1 FROM pending WHERE name = ?", (name,)).fetchone())
        return row is not None

    async def release(self, name: str) -> None:
        await self._db.run(lambda db: db.execute("DELETE FROM pending WHERE name = ?", (name,)))

    async def reserved_before(self, before: float) -> list[str]:
        rows = await self._db.read(
            lambda db: db.execute("SELECT name FROM pending WHERE reserved_at < ? ORDER BY name", (before,)).fetchall()
        )
        return [str(row["name"]) for row in rows]

    async def publish(self, record: StoredFile) -> None:
        row = record.columns()

        def publish(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM pending WHERE name = ?", (record.name,))
            db.execute("DELETE FROM files WHERE name = ?", (record.name,))
            other = db.execute("SELECT name FROM files WHERE fold = ?", (row[1],)).fetchone()
            if other is not None:
                raise NameTaken(f"{other['name']!r} is published, and folds as {record.name!r} does")
            db.execute(
                "INSERT INTO files (name, fold, size, md5, sha256, owner, owner_authenticated, uploaded_at,"
                " owner_id, tls) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

        await self._db.run(publish)

    async def describe(self, name: str) -> StoredFile | None:
        row = await self._db.read(lambda db: db.execute("SELECT * FROM files WHERE name = ?", (name,)).fetchone())
        return _stored(row) if row is not None else None

    async def listing(self) -> list[StoredFile]:
        rows = await self._db.read(lambda db: db.execute("SELECT * FROM files ORDER BY name").fetchall())
        return [_stored(row) for row in rows]

    async def add_digests(self, name: str, *, uploaded_at: float, md5: str, sha256: str) -> StoredFile | None:
        def add(db: sqlite3.Connection) -> StoredFile | None:
            row = db.execute(
                "UPDATE files SET md5 = COALESCE(md5, ?), sha256 = COALESCE(sha256, ?)"
                " WHERE name = ? AND uploaded_at = ? AND (md5 IS NULL OR sha256 IS NULL) RETURNING *",
                (md5, sha256, name, uploaded_at),
            ).fetchone()
            return _stored(row) if row is not None else None

        return await self._db.run(add)

    async def undigested(self, *, before: float, limit: int) -> list[StoredFile]:
        rows = await self._db.read(
            lambda db: db.execute(
                "SELECT * FROM files WHERE (md5 IS NULL OR sha256 IS NULL) AND uploaded_at < ?"
                " ORDER BY uploaded_at LIMIT ?",
                (before, limit),
            ).fetchall()
        )
        return [_stored(row) for row in rows]

    async def delete(self, name: str, *, expected: StoredFile | None = None) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            if expected is not None:
                row = db.execute("SELECT * FROM files WHERE name = ?", (name,)).fetchone()
                if row is None or _stored(row) != expected:
                    return False
            return db.execute("DELETE FROM files WHERE name = ?", (name,)).rowcount > 0

        return await self._db.run(delete)

    async def close(self) -> None:
        await self._db.close()


def _conflicts(db: sqlite3.Connection, files: Sequence[Reservation], may_take: TakePolicy) -> list[Conflict]:
    conflicts = []
    asked: dict[str, str] = {}
    for file in files:
        fold = fold_name(file.name)
        earlier = asked.get(fold)
        if earlier is not None:
            conflicts.append(Conflict(file.name, pending=earlier))
            continue
        asked[fold] = file.name
        pending = db.execute("SELECT name FROM pending WHERE fold = ?", (fold,)).fetchone()
        if pending is not None:
            conflicts.append(Conflict(file.name, pending=pending["name"]))
            continue
        row = db.execute("SELECT * FROM files WHERE fold = ?", (fold,)).fetchone()
        published = _stored(row) if row is not None else None
        if not may_take(file.name, published):
            conflicts.append(Conflict(file.name, published=published))
    return conflicts


def _stored(row: sqlite3.Row) -> StoredFile:
    return StoredFile(
        name=row["name"],
        size=row["size"],
        md5=row["md5"],
        sha256=row["sha256"],
        owner=row["owner"],
        uploaded_at=row["uploaded_at"],
        owner_authenticated=bool(row["owner_authenticated"]),
        owner_id=row["owner_id"],
        tls=bool(row["tls"]),
    )
