"""The event log's table in the SQLite backend: how an event is inserted in the transaction that makes
its transition, read back, and handed to ``SqliteState.on_appended`` once that transaction committed
(shared by the transfers' and the jobs' methods, ``sqlite.py`` and ``sqlite_jobs.py``)."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Sequence

from ..lifecycle.states import Event, EventType, NewEvent

#: Per database thread, while a write transaction runs: the events it appended (``events``).
appended = threading.local()

#: The columns of an event as a NewEvent holds them, in the order the table stores them.
_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(NewEvent))
_INSERT_EVENT = f"INSERT INTO events (time, {', '.join(_EVENT_FIELDS)}) VALUES (?{', ?' * len(_EVENT_FIELDS)})"


def insert_events(db: sqlite3.Connection, events: Sequence[NewEvent], stamp: float | None = None) -> list[Event]:
    """Append ``events``, stamped ``stamp`` (an append's) or, for a transition's, the clock now."""
    now = time.time() if stamp is None else stamp
    stored: list[Event] = appended.events
    for e in events:
        values = {name: getattr(e, name) for name in _EVENT_FIELDS}
        cursor = db.execute(_INSERT_EVENT, (now, *values.values()))
        assert cursor.lastrowid is not None
        stored.append(Event(**values, id=cursor.lastrowid, time=now))
    return stored


def event_from_row(row: sqlite3.Row) -> Event:
    """An event as the log's row holds it."""
    values = {name: row[name] for name in _EVENT_FIELDS}
    return Event(**{**values, "type": EventType(row["type"])}, id=row["id"], time=row["time"])
