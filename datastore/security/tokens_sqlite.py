"""The SQLite backend of the token store (:class:`~datastore.security.tokens.TokenBackend`): the table
``tokens`` of the file ``tokens.sqlite3`` in a node's state directory, and the migration of files
written before vouchers and invitations. SQL only; every rule is ``tokens.py``'s.

Each unit of work is one ``BEGIN IMMEDIATE`` transaction (``state/database.py``), so a row read and
then changed in it cannot change meanwhile in another worker process sharing the file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..state.database import Database
from .tokens import Row, RowChange, change_row, checked_columns

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    subject TEXT NOT NULL,
    actions TEXT NOT NULL,
    -- Space-separated prefixes, or NULL for every prefix.
    prefixes TEXT,
    description TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL
);
"""

#: Columns of vouchers and invitations, added to files from before them.
_ADDED_COLUMNS = {
    # The file names a voucher covers (JSON list), NULL for any.
    "names": "TEXT",
    # Bytes a voucher lets its holder move in all (NULL: no limit), and those moved or reserved.
    "budget": "INTEGER",
    "used": "INTEGER NOT NULL DEFAULT 0",
    # An invitation: PENDING until answered (the token works for nothing meanwhile), then ACCEPTED
    # (an active voucher) or DECLINED; NULL for a token issued directly.
    "invitation": "TEXT",
    # Who asked (as the asking store says), for the people answering.
    "requester": "TEXT",
    # Until when an invitation waits for its answer.
    "answer_by": "REAL",
    "answered_by": "TEXT",
    "answered_at": "REAL",
}


def _migrate(db: sqlite3.Connection) -> None:
    present = {row["name"] for row in db.execute("PRAGMA table_info(tokens)")}
    for column, declaration in _ADDED_COLUMNS.items():
        if column not in present:
            db.execute(f"ALTER TABLE tokens ADD COLUMN {column} {declaration}")


class SqliteTokens:
    """Tokens in one SQLite file; safe to share between worker processes."""

    def __init__(self, path: Path) -> None:
        self._db = Database(path, _SCHEMA, _migrate)

    async def insert(self, row: Row, admit: Callable[[Sequence[Row]], None] | None = None) -> None:
        columns = checked_columns(row)
        statement = f"INSERT INTO tokens ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"  # noqa: S608 - known columns

        def insert(db: sqlite3.Connection) -> None:
            if admit is not None:
                admit(_dicts(db.execute("SELECT * FROM tokens WHERE description = ?", (row["description"],))))
            db.execute(statement, [row[column] for column in columns])

        await self._db.run(insert)

    async def get(self, token_id: str) -> Row | None:
        return await self._db.read(lambda db: _get(db, token_id))

    async def rows(self, *, invitations: bool) -> Sequence[Row]:
        where = " WHERE invitation IS NOT NULL" if invitations else ""
        return await self._db.read(lambda db: _dicts(db.execute(f"SELECT * FROM tokens{where}")))  # noqa: S608

    async def count(self) -> int:
        return int(await self._db.read(lambda db: db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0]))

    async def change(self, token_id: str, change: Callable[[Row], Row | None]) -> RowChange | None:
        def run(db: sqlite3.Connection) -> RowChange | None:
            changed = change_row(_get(db, token_id), change)
            if changed is not None and changed.sets:
                assignments = ", ".join(f"{column} = ?" for column in changed.sets)
                db.execute(
                    f"UPDATE tokens SET {assignments} WHERE id = ?",  # noqa: S608 - known columns
                    [*changed.sets.values(), token_id],
                )
            return changed

        return await self._db.run(run)

    async def delete(self, doomed: Callable[[Row], bool]) -> int:
        def run(db: sqlite3.Connection) -> int:
            ids = [(row["id"],) for row in _dicts(db.execute("SELECT * FROM tokens")) if doomed(row)]
            db.executemany("DELETE FROM tokens WHERE id = ?", ids)
            return len(ids)

        return await self._db.run(run)

    async def close(self) -> None:
        await self._db.close()


def _get(db: sqlite3.Connection, token_id: str) -> dict[str, Any] | None:
    found = _dicts(db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)))
    return found[0] if found else None


def _dicts(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    return [{key: row[key] for key in row.keys()} for row in cursor]  # noqa: SIM118 - a Row is no mapping
