"""The event log's table in the PostgreSQL backend: its DDL, how an event is inserted in the
transaction that makes its transition and handed to ``PostgresState.on_appended`` once that
transaction committed (shared by the transfers' and the jobs' methods, ``postgres.py`` and
``postgres_jobs.py``); how it reads back is shared with SQLite (``records.py``).

Ids are handed out from a one-row counter (``event_ids``) updated in the inserting transaction, as
SQLite's AUTOINCREMENT keeps ``sqlite_sequence``: a rolled-back insertion gives its ids back, a
pruned event's id is never handed out again, and the counter is the largest id ever logged. Every
write transaction of the state store holds its lock (``postgres.py``), so ids grow in commit order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextvars import ContextVar
from typing import LiteralString

from ..lifecycle.states import Event, NewEvent
from .postgres_database import Connection, fetch_one
from .records import EVENT_FIELDS as _EVENT_FIELDS

#: The statements that create the log (part of the state store's first migration).
EVENTS_SCHEMA: tuple[LiteralString, ...] = (
    """
    CREATE TABLE events (
        id BIGINT PRIMARY KEY,
        time DOUBLE PRECISION NOT NULL,
        type TEXT NOT NULL,
        prefix TEXT NOT NULL,
        key TEXT,
        num BIGINT,
        name TEXT,
        owner TEXT,
        owner_id TEXT,
        bytes BIGINT,
        size BIGINT,
        md5 TEXT,
        sha256 TEXT,
        reason TEXT
    )
    """,
    "CREATE INDEX events_by_time ON events (time)",
    # The largest id handed out (one row).
    "CREATE TABLE event_ids (last_id BIGINT NOT NULL)",
    "INSERT INTO event_ids (last_id) VALUES (0)",
)

#: While a write transaction runs (in its task): the events it appended.
appended: ContextVar[list[Event]] = ContextVar("appended")

_INSERT_EVENT = (
    f"INSERT INTO events (id, time, {', '.join(_EVENT_FIELDS)}) VALUES (%s, %s{', %s' * len(_EVENT_FIELDS)})"
)


async def insert_events(db: Connection, events: Sequence[NewEvent], stamp: float | None = None) -> list[Event]:
    """Append ``events``, stamped ``stamp`` (an append's) or, for a transition's, the clock now; the
    events the transaction appended so far."""
    now = time.time() if stamp is None else stamp
    stored = appended.get()
    if not events:
        return stored
    row = await fetch_one(db, "UPDATE event_ids SET last_id = last_id + %s RETURNING last_id", (len(events),))
    assert row is not None
    first = int(row["last_id"]) - len(events) + 1
    new = []
    for number, e in enumerate(events):
        values = {name: getattr(e, name) for name in _EVENT_FIELDS}
        new.append(Event(**values, id=first + number, time=now))
    async with db.cursor() as cursor:
        await cursor.executemany(
            _INSERT_EVENT,
            [(e.id, now, *(getattr(e, name) for name in _EVENT_FIELDS)) for e in new],
        )
    stored += new
    return stored


async def last_event_id(db: Connection) -> int:
    """The largest id ever handed out (0 if none), whether or not its event was pruned."""
    row = await fetch_one(db, "SELECT last_id FROM event_ids")
    return 0 if row is None else int(row["last_id"])
