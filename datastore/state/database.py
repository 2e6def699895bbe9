"""A SQLite database used from the event loop without blocking it.

Each :class:`Database` owns one connection and one worker thread; every
query runs on that thread, so statements are serialised without locks and
the loop only awaits. The thread takes work from a queue and hands each
result straight to the waiting loop's future (a thread pool's futures cost
about twice the CPU per call, and a small transfer job makes a few dozen
calls per file). The database runs in WAL mode with a busy timeout, so
several processes (``serve --workers N``) may share one file: each unit of
work passed to :meth:`Database.run` is one ``BEGIN IMMEDIATE`` transaction,
so a read followed by a write in it cannot interleave with another
process's; :meth:`Database.read` is for work that only reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from . import timing

T = TypeVar("T")

#: Seconds a statement waits for another connection's lock before "database is locked".
_BUSY_TIMEOUT = 30.0


@dataclass(slots=True)
class _Call(Generic[T]):
    """One unit of work for the database thread, and the future its caller awaits."""

    work: Callable[[sqlite3.Connection], T]
    begin: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """On the caller's loop: the call's outcome, unless its caller stopped waiting."""
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _enter_wal(connection: sqlite3.Connection) -> None:
    """Put the file in WAL mode, waiting (up to the busy timeout) for another connection doing the
    same: SQLite answers a journal-mode change that meets another connection's lock with "database
    is locked" at once, without its busy handler, which two processes opening a new file at once
    (``--workers N``'s first start) would otherwise meet."""
    deadline = time.monotonic() + _BUSY_TIMEOUT
    pause = 0.001
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)  # on the database thread, as SQLite's own busy handler sleeps
        pause = min(pause * 2, 0.05)


class Database:
    """One SQLite file, its schema, and a thread to run queries on."""

    def __init__(self, path: Path, schema: str, migrate: Callable[[sqlite3.Connection], None] | None = None) -> None:
        """``schema`` creates what is missing; ``migrate`` then brings older files up to date."""
        self.path = path
        self._schema = schema
        self._migrate = migrate
        #: The thread's queue (each thread has its own: one closing never takes another's work).
        self._queue: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._connection: sqlite3.Connection | None = None

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)`` on the database thread in one write transaction."""
        return await self._submit(work, "BEGIN IMMEDIATE")

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(connection)``, which only reads, in one read transaction."""
        return await self._submit(work, "BEGIN")

    async def _submit(self, work: Callable[[sqlite3.Connection], T], begin: str) -> T:
        if self._thread is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._serve, args=(self._queue,), name=f"sqlite-{self.path.stem}", daemon=True
            )
            self._thread.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        async with timing.transaction():
            self._queue.put(_Call(work, begin, loop, future))
            return await future

    def _serve(self, calls: queue.SimpleQueue[_Call[Any] | None]) -> None:
        """The database thread: each call in turn until :meth:`close` sends None; then the connection closes."""
        while (call := calls.get()) is not None:
            if call.future.cancelled():
                # Its caller stopped waiting before it started: it does not run (as with an executor).
                continue
            result: Any = None
            error: BaseException | None = None
            try:
                result = self._run(call.work, call.begin)
            except BaseException as exc:  # handed to the caller
                error = exc
            with contextlib.suppress(RuntimeError):  # the caller's loop closed meanwhile
                call.loop.call_soon_threadsafe(_settle, call.future, result, error)
        if self._connection is not None:
            self._connection.close()
            self._connection = None

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
            connection = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT, isolation_level=None)
            connection.row_factory = sqlite3.Row
            _enter_wal(connection)
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
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(thread.join)
