"""A SQLite database used from the event loop without blocking it.

Each :class:`Database` owns one connection and one worker thread; every
query runs on that thread, so statements are serialised without locks and
the loop only awaits. The database runs in WAL mode with a busy timeout, so
several processes (``serve --workers N``) may share one file: each unit of
work passed to :meth:`Database.run` is one ``BEGIN IMMEDIATE`` transaction,
so a read followed by a write in it cannot interleave with another
process's; :meth:`Database.read` is for work that only reads.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class Database:
    """One SQLite file, its schema, and a thread to run queries on."""

    def __init__(self, path: Path, schema: str, migrate: Callable[[sqlite3.Connection], None] | None = None) -> None:
        """``schema`` creates what is missing; ``migrate`` then brings older files up to date."""
        self.path = path
        self._schema = schema
        self._migrate = migrate
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)`` on the database thread in one write transaction."""
        return await self._submit(work, "BEGIN IMMEDIATE")

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)``, which only reads, in one read transaction."""
        return await self._submit(work, "BEGIN")

    async def _submit(self, work: Callable[[sqlite3.Connection], T], begin: str) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{self.path.stem}")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, work, begin)

    def _run(self, work: Callable[[sqlite3.Connection], T], begin: str) -> T:
        connection = self._connect()
        connection.execute(begin)
        try:
            result = work(connection)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return result

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: _run opens and ends every transaction itself.
            connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            try:
                connection.executescript(f"BEGIN IMMEDIATE;\n{self._schema}")
                if self._migrate is not None:
                    self._migrate(connection)
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                connection.close()
                raise
            connection.execute("COMMIT")
            self._connection = connection
        return self._connection

    async def close(self) -> None:
        """Close the connection and stop the thread; a later ``run`` reopens both."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, self._close)
        executor.shutdown(wait=False)

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
