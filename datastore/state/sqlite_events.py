"""The event log's table in the SQLite backend: how an event is inserted in the transaction that makes
its transition and handed to ``SqliteState.on_appended`` once that transaction committed (shared by
the transfers' and the jobs' methods, ``sqlite.py`` and ``sqlite_jobs.py``); how it reads back is
shared with PostgreSQL (``records.py``)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence

from ..lifecycle.states import Event, NewEvent
from .records import EVENT_FIELDS as _EVENT_FIELDS

#: Per database thread, while a write transaction runs: the events it appended (``events``).
appended = threading.local()

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
