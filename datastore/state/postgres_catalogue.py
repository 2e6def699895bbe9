"""The catalogue on PostgreSQL: every prefix's published files and pending names in two tables, by
``prefix``, shared by every node (see :mod:`datastore.state.catalogue` for the contracts).

A prefix's changes (reserve, release, publish, delete) take turns on an advisory lock of the
prefix held for their transaction, as the SQLite catalogue's writes take turns on its file: of two
nodes reserving names that fold alike at once, exactly one gets them, and the other is told which
conflict (never an error from a constraint). Reads take no lock. Names are compared and listed code
point by code point (``COLLATE "C"`` on UTF-8), whatever the database's collation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from ..protocol.names import fold_name
from .catalogue import Conflict, NameTaken, Reservation, StoredFile, TakePolicy
from .postgres_database import Connection, HeldWrite, Migration, PostgresDatabase, fetch_all, fetch_one

MIGRATIONS = (
    Migration(
        1,
        (
            """
            CREATE TABLE catalogue_files (
                prefix TEXT NOT NULL,
                name TEXT NOT NULL COLLATE "C",
                fold TEXT NOT NULL COLLATE "C",
                size BIGINT NOT NULL,
                md5 TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                owner TEXT,
                owner_authenticated BOOLEAN NOT NULL DEFAULT FALSE,
                uploaded_at DOUBLE PRECISION NOT NULL,
                -- The uploader's principal (Identity.principal; NULL: anonymous, nobody owns it),
                -- and whether the file came over TLS.
                owner_id TEXT,
                tls BOOLEAN NOT NULL DEFAULT FALSE,
                PRIMARY KEY (prefix, name),
                UNIQUE (prefix, fold)
            )
            """,
            """
            CREATE TABLE catalogue_pending (
                prefix TEXT NOT NULL,
                name TEXT NOT NULL COLLATE "C",
                fold TEXT NOT NULL COLLATE "C",
                size BIGINT NOT NULL,
                reserved_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (prefix, name),
                UNIQUE (prefix, fold)
            )
            """,
        ),
    ),
    # A digest is NULL until known: computed after publishing when the upload did not declare it.
    Migration(
        2,
        (
            "ALTER TABLE catalogue_files ALTER COLUMN md5 DROP NOT NULL",
            "ALTER TABLE catalogue_files ALTER COLUMN sha256 DROP NOT NULL",
            "CREATE INDEX catalogue_undigested ON catalogue_files (prefix, uploaded_at)"
            " WHERE md5 IS NULL OR sha256 IS NULL",
        ),
    ),
)


class PostgresCatalogue:
    """The catalogue of one prefix in a PostgreSQL database shared by every node."""

    def __init__(self, url: str, prefix: str) -> None:
        self.prefix = prefix
        self._db = PostgresDatabase(url, "catalogue", MIGRATIONS, max_size=4)
        #: The advisory lock of this prefix's changes, taken for their transaction.
        self._lock = f"datastore catalogue: {prefix}"

    async def check(self, files: Sequence[Reservation], *, may_take: TakePolicy) -> list[Conflict]:
        return await self._db.read(lambda db: self._conflicts(db, files, may_take))

    async def reserve(self, files: Sequence[Reservation], *, may_take: TakePolicy, now: float) -> list[Conflict]:
        async def reserve(db: Connection) -> list[Conflict]:
            conflicts = await self._conflicts(db, files, may_take)
            if not conflicts:
                # One statement for every name, however many: the columns go as arrays.
                await db.execute(
                    "INSERT INTO catalogue_pending (prefix, name, fold, size, reserved_at)"
                    " SELECT %s, name, fold, size, %s FROM unnest(%s::text[], %s::text[], %s::bigint[])"
                    " AS asked (name, fold, size)",
                    (
                        self.prefix,
                        now,
                        [f.name for f in files],
                        [fold_name(f.name) for f in files],
                        [f.size for f in files],
                    ),
                )
            return conflicts

        return await self._db.run(reserve, lock=self._lock)

    async def is_reserved(self, name: str) -> bool:
        async def read(db: Connection) -> bool:
            place = (self.prefix, name)
            return (
                await fetch_one(db, "SELECT 1 FROM catalogue_pending WHERE prefix = %s AND name = %s", place)
                is not None
            )

        return await self._db.read(read)

    async def release(self, name: str) -> None:
        async def release(db: Connection) -> None:
            await db.execute("DELETE FROM catalogue_pending WHERE prefix = %s AND name = %s", (self.prefix, name))

        await self._db.run(release, lock=self._lock)

    async def reserved_before(self, before: float) -> list[str]:
        async def read(db: Connection) -> list[str]:
            rows = await fetch_all(
                db,
                'SELECT name FROM catalogue_pending WHERE prefix = %s AND reserved_at < %s ORDER BY name COLLATE "C"',
                (self.prefix, before),
            )
            return [str(row["name"]) for row in rows]

        return await self._db.read(read)

    async def publish(self, record: StoredFile) -> None:
        # One round trip: the name's reservation goes and the file takes its row (replacing an
        # earlier file of that name). A published name folding alike breaks the fold's uniqueness.
        # Inside the state's publish of the same database (``PostgresState.publishing_together``) the
        # write is held back and commits with it instead.
        write = HeldWrite(
            [
                ("DELETE FROM catalogue_pending WHERE prefix = %s AND name = %s", (self.prefix, record.name)),
                (
                    "INSERT INTO catalogue_files (prefix, name, fold, size, md5, sha256, owner,"
                    " owner_authenticated, uploaded_at, owner_id, tls)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (prefix, name) DO UPDATE"
                    " SET fold = EXCLUDED.fold, size = EXCLUDED.size, md5 = EXCLUDED.md5, sha256 = EXCLUDED.sha256,"
                    " owner = EXCLUDED.owner, owner_authenticated = EXCLUDED.owner_authenticated,"
                    " uploaded_at = EXCLUDED.uploaded_at, owner_id = EXCLUDED.owner_id, tls = EXCLUDED.tls",
                    (self.prefix, *record.columns()),
                ),
            ],
            self._lock,
            lambda error: self._name_taken(error, record.name),
        )
        await self._db.prepare()
        if self._db.hold(write):
            return
        try:
            await self._db.run_together(write.statements, lock=write.lock)
        except psycopg.Error as error:
            instead = await self._name_taken(error, record.name)
            if instead is None:
                raise
            raise instead from None

    async def _name_taken(self, error: psycopg.Error, name: str) -> NameTaken | None:
        """The refusal a publish of ``name`` that raised ``error`` meets: NameTaken if a published
        name folds as it does; None if the error is another."""
        if not isinstance(error, psycopg.errors.UniqueViolation):
            return None
        other = await self._db.read(
            lambda db: fetch_one(
                db,
                "SELECT name FROM catalogue_files WHERE prefix = %s AND fold = %s AND name <> %s",
                (self.prefix, fold_name(name), name),
            )
        )
        if other is None:
            return None
        return NameTaken(f"{other['name']!r} is published, and folds as {name!r} does")

    async def describe(self, name: str) -> StoredFile | None:
        async def read(db: Connection) -> StoredFile | None:
            row = await fetch_one(
                db, "SELECT * FROM catalogue_files WHERE prefix = %s AND name = %s", (self.prefix, name)
            )
            return _stored(row) if row is not None else None

        return await self._db.read(read)

    async def listing(self) -> list[StoredFile]:
        async def read(db: Connection) -> list[StoredFile]:
            rows = await fetch_all(db, "SELECT * FROM catalogue_files WHERE prefix = %s ORDER BY name", (self.prefix,))
            return [_stored(row) for row in rows]

        return await self._db.read(read)

    async def add_digests(self, name: str, *, uploaded_at: float, md5: str, sha256: str) -> StoredFile | None:
        (rows,) = await self._db.run_together(
            [
                (
                    "UPDATE catalogue_files SET md5 = COALESCE(md5, %s), sha256 = COALESCE(sha256, %s)"
                    " WHERE prefix = %s AND name = %s AND uploaded_at = %s AND (md5 IS NULL OR sha256 IS NULL)"
                    " RETURNING *",
                    (md5, sha256, self.prefix, name, uploaded_at),
                )
            ]
        )
        return _stored(rows[0]) if rows else None

    async def undigested(self, *, before: float, limit: int) -> list[StoredFile]:
        async def read(db: Connection) -> list[StoredFile]:
            rows = await fetch_all(
                db,
                "SELECT * FROM catalogue_files WHERE prefix = %s AND (md5 IS NULL OR sha256 IS NULL)"
                " AND uploaded_at < %s ORDER BY uploaded_at LIMIT %s",
                (self.prefix, before, limit),
            )
            return [_stored(row) for row in rows]

        return await self._db.read(read)

    async def delete(self, name: str, *, expected: StoredFile | None = None) -> bool:
        async def delete(db: Connection) -> bool:
            place = (self.prefix, name)
            if expected is not None:
                row = await fetch_one(db, "SELECT * FROM catalogue_files WHERE prefix = %s AND name = %s", place)
                if row is None or _stored(row) != expected:
                    return False
            removed = await db.execute("DELETE FROM catalogue_files WHERE prefix = %s AND name = %s", place)
            return removed.rowcount > 0

        return await self._db.run(delete, lock=self._lock)

    async def close(self) -> None:
        await self._db.close()

    async def _conflicts(self, db: Connection, files: Sequence[Reservation], may_take: TakePolicy) -> list[Conflict]:
        folds = [fold_name(file.name) for file in files]
        # What holds any of the folds asked, in two statements whatever the manifest's length.
        where = (self.prefix, list(set(folds)))
        pending = {
            row["fold"]: str(row["name"])
            for row in await fetch_all(
                db, "SELECT name, fold FROM catalogue_pending WHERE prefix = %s AND fold = ANY(%s)", where
            )
        }
        published = {
            row["fold"]: _stored(row)
            for row in await fetch_all(db, "SELECT * FROM catalogue_files WHERE prefix = %s AND fold = ANY(%s)", where)
        }
        conflicts = []
        asked: dict[str, str] = {}
        for file, fold in zip(files, folds, strict=True):
            earlier = asked.get(fold)
            if earlier is not None:
                conflicts.append(Conflict(file.name, pending=earlier))
                continue
            asked[fold] = file.name
            if fold in pending:
                conflicts.append(Conflict(file.name, pending=pending[fold]))
                continue
            stored = published.get(fold)
            if not may_take(file.name, stored):
                conflicts.append(Conflict(file.name, published=stored))
        return conflicts


def _stored(row: dict[str, Any]) -> StoredFile:
    return StoredFile(
        name=row["name"],
        size=row["size"],
        md5=row["md5"],
        sha256=row["sha256"],
        owner=row["owner"],
        uploaded_at=row["uploaded_at"],
        owner_authenticated=row["owner_authenticated"],
        owner_id=row["owner_id"],
        tls=row["tls"],
    )
