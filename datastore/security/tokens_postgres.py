"""The PostgreSQL backend of the token store (:class:`~datastore.security.tokens.TokenBackend`): the
table ``tokens`` in the state database every node shares, migrated as the component ``tokens``
(``state/postgres_database.py``). SQL only; every rule is ``tokens.py``'s.

A change holds its row (``SELECT ... FOR UPDATE``) until its transaction ends, so two nodes reserving
bytes of one voucher take turns, and the second sees what the first took. Adding a row that must be
admitted (an invitation, against the asker's limit) first takes an advisory lock of the asker for its
transaction, so that two nodes cannot both admit one over the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from psycopg import sql

from ..state.postgres_database import Connection, Migration, PostgresDatabase, fetch_all, fetch_one
from .tokens import Row, RowChange, change_row, checked_columns

#: The table's columns are those ``tokens.COLUMNS`` describes.
MIGRATIONS = (
    Migration(
        1,
        (
            """
            CREATE TABLE tokens (
                id TEXT PRIMARY KEY,
                hash TEXT NOT NULL,
                subject TEXT NOT NULL,
                actions TEXT NOT NULL,
                prefixes TEXT,
                description TEXT NOT NULL DEFAULT '',
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION,
                names TEXT,
                budget BIGINT,
                used BIGINT NOT NULL DEFAULT 0,
                invitation TEXT,
                requester TEXT,
                answer_by DOUBLE PRECISION,
                answered_by TEXT,
                answered_at DOUBLE PRECISION
            )
            """,
            "CREATE INDEX tokens_description ON tokens (description)",
        ),
    ),
)


class PostgresTokens:
    """Tokens in a PostgreSQL database shared by every node."""

    def __init__(self, url: str) -> None:
        self._db = PostgresDatabase(url, "tokens", MIGRATIONS, max_size=4)

    async def insert(self, row: Row, admit: Callable[[Sequence[Row]], None] | None = None) -> None:
        columns = checked_columns(row)
        statement = sql.SQL("INSERT INTO tokens ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.SQL(", ").join(sql.Placeholder() * len(columns))
        )

        async def insert(db: Connection) -> None:
            if admit is not None:
                admit(await fetch_all(db, "SELECT * FROM tokens WHERE description = %s", (row["description"],)))
            await db.execute(statement, [row[column] for column in columns])

        await self._db.run(insert, lock=None if admit is None else f"datastore tokens: {row['description']}")

    async def get(self, token_id: str) -> Row | None:
        return await self._db.read(lambda db: fetch_one(db, "SELECT * FROM tokens WHERE id = %s", (token_id,)))

    async def rows(self, *, invitations: bool) -> Sequence[Row]:
        async def read(db: Connection) -> Sequence[Row]:
            if invitations:
                return await fetch_all(db, "SELECT * FROM tokens WHERE invitation IS NOT NULL")
            return await fetch_all(db, "SELECT * FROM tokens")

        return await self._db.read(read)

    async def count(self) -> int:
        async def read(db: Connection) -> int:
            row = await fetch_one(db, "SELECT COUNT(*) AS n FROM tokens")
            return 0 if row is None else int(row["n"])

        return await self._db.read(read)

    async def change(self, token_id: str, change: Callable[[Row], Row | None]) -> RowChange | None:
        async def run(db: Connection) -> RowChange | None:
            row = await fetch_one(db, "SELECT * FROM tokens WHERE id = %s FOR UPDATE", (token_id,))
            changed = change_row(row, change)
            if changed is not None and changed.sets:
                assignments = (sql.SQL("{} = %s").format(sql.Identifier(column)) for column in changed.sets)
                statement = sql.SQL("UPDATE tokens SET {} WHERE id = %s").format(sql.SQL(", ").join(assignments))
                await db.execute(statement, [*changed.sets.values(), token_id])
            return changed

        return await self._db.run(run)

    async def delete(self, doomed: Callable[[Row], bool]) -> int:
        async def run(db: Connection) -> int:
            rows = await fetch_all(db, "SELECT * FROM tokens FOR UPDATE")
            ids = [row["id"] for row in rows if doomed(row)]
            if ids:
                await db.execute("DELETE FROM tokens WHERE id = ANY(%s)", (ids,))
            return len(ids)

        return await self._db.run(run)

    async def close(self) -> None:
        await self._db.close()
