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
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any, LiteralString, cast

from psycopg.rows import DictRow

from ..lifecycle.states import Event, NewEvent
from .postgres_database import Connection, HeldWrite, Statement, Transaction, fetch_all, fetch_one
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

#: The columns of ``events`` that hold integers; the others hold text.
_INTEGER_FIELDS = frozenset({"num", "bytes", "size"})

#: An event's columns as the statement below sends them: placeholders cast to their types.
_TYPED = [f"%s::{'bigint' if name in _INTEGER_FIELDS else 'text'}" for name in _EVENT_FIELDS]
_COLUMNS = ", ".join(_EVENT_FIELDS)
#: Up to this many events go as the rows of a VALUES list (the cheapest to plan, and statements
#: sent in a batch are planned each time: see ``postgres_database.Transaction``); more go as one
#: array per column, whose count of parameters stays the same however many events there are.
_VALUES_AT_MOST = 16


def events_statement(events: Sequence[NewEvent], now: float, *, only_if: Statement | None = None) -> Statement:
    """The statement that appends ``events`` stamped ``now``, numbered from the counter's value in
    their order, and moves the counter past them (one round trip); it answers the counter's new value.
    ``only_if``, a condition and its parameters: the events are appended only if it holds when the
    statement runs (else nothing is, and the answer has no row)."""
    count = len(events)
    condition, condition_params = only_if if only_if is not None else ("TRUE", ())
    values = [[_column(name, getattr(e, name)) for name in _EVENT_FIELDS] for e in events]
    params: list[object] = [*condition_params, now]
    if count <= _VALUES_AT_MOST:
        rows = ", ".join(f"({n}, {', '.join(_TYPED)})" for n in range(1, count + 1))
        source = f"(VALUES {rows}) AS e(n, {_COLUMNS})"
        params += [value for row in values for value in row]
    else:
        source = f"unnest({', '.join(typed + '[]' for typed in _TYPED)}) WITH ORDINALITY AS e({_COLUMNS}, n)"
        params += [list(column) for column in zip(*values, strict=True)]
    query = (
        f"WITH ids AS (UPDATE event_ids SET last_id = last_id + {count} WHERE {condition} RETURNING last_id),"
        f" inserted AS (INSERT INTO events (id, time, {_COLUMNS})"
        f" SELECT ids.last_id - {count} + e.n, %s, {', '.join('e.' + name for name in _EVENT_FIELDS)}"
        f" FROM ids, {source}) SELECT last_id FROM ids"
    )
    return query, params


def _column(name: str, value: object) -> object:
    """An event's field as its column holds it (an enum as its value)."""
    if value is None:
        return None
    return int(cast(int, value)) if name in _INTEGER_FIELDS else str(value)


def appended_events(events: Sequence[NewEvent], answer: Sequence[Mapping[str, Any]], now: float) -> list[Event]:
    """Note ``events`` as appended by the transaction (``answer``: what :func:`events_statement`
    answered); the events it appended so far."""
    stored = appended.get()
    first = int(answer[0]["last_id"]) - len(events) + 1
    stored += [
        Event(**{name: getattr(e, name) for name in _EVENT_FIELDS}, id=first + number, time=now)
        for number, e in enumerate(events)
    ]
    return stored


async def send_with_events(
    transaction: Transaction,
    statements: Sequence[Statement],
    events: Sequence[NewEvent],
    *,
    held: Sequence[HeldWrite] = (),
) -> list[list[DictRow]]:
    """Send ``statements``, then append ``events``, and commit, in one round trip (``held`` writes
    first: :meth:`Transaction.send`); what the statements answered."""
    now = time.time()
    tail = [events_statement(events, now)] if events else []
    answers = await transaction.send([*statements, *tail], commit=True, held=held)
    if events:
        appended_events(events, answers[-1], now)
    return answers[: len(statements)]


async def insert_events(db: Connection, events: Sequence[NewEvent], stamp: float | None = None) -> list[Event]:
    """Append ``events``, stamped ``stamp`` (an append's) or, for a transition's, the clock now; the
    events the transaction appended so far."""
    now = time.time() if stamp is None else stamp
    if not events:
        return appended.get()
    query, params = events_statement(events, now)
    return appended_events(events, await fetch_all(db, query, params), now)


async def last_event_id(db: Connection) -> int:
    """The largest id ever handed out (0 if none), whether or not its event was pruned."""
    row = await fetch_one(db, "SELECT last_id FROM event_ids")
    return 0 if row is None else int(row["last_id"])
