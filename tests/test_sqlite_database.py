"""The SQLite database of the embedded default (``datastore/state/database.py``): what several
processes sharing one file (``serve --workers N``) rely on beyond the contract suites."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from datastore.state.database import Database

SCHEMA = "CREATE TABLE IF NOT EXISTS things (name TEXT PRIMARY KEY);"


async def test_opening_a_file_another_connection_has_locked_waits_for_it_instead_of_failing(tmp_path: Path) -> None:
    """Two processes opening a new file at once: the second's switch to WAL meets the first's lock,
    which SQLite answers "database is locked" at once; the database waits for the lock instead."""
    path = tmp_path / "shared.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE things (name TEXT PRIMARY KEY)")
    other.execute("BEGIN IMMEDIATE")  # a writer in the old journal mode: the switch fails at once
    database = Database(path, SCHEMA)
    try:
        inserting = asyncio.ensure_future(
            database.run(lambda db: db.execute("INSERT INTO things VALUES ('a')").rowcount)
        )
        done, _ = await asyncio.wait({inserting}, timeout=0.5)
        assert not done, "the database gave up on a lock another connection holds"
        other.execute("COMMIT")
        async with asyncio.timeout(10):
            assert await inserting == 1
        assert await database.read(lambda db: db.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    finally:
        other.close()
        await database.close()
