"""Cross-node signals of the PostgreSQL backend: what a transaction changed is announced with
``NOTIFY`` at its commit, and every process hears it on one ``LISTEN``ing connection of its own.

The announcements are made by triggers (created by the state store's and the job store's
migrations), so that no write path can forget one: appending events, a file's upload lease ending,
changing hands or being asked to stop, a job changing state, and a job's file being queued. They
travel on one channel, ``datastore``, as short texts: the ``SignalKind``, the ``application_name``
of the connection that made the change (which names the process: a process does not hear its own,
it knows what it did) and the subject (``f ORIGIN KEY NUM``, ``j ORIGIN JOB``). PostgreSQL delivers
them only once the transaction committed, folds repeats within a transaction, and never delivers
them to a connection that was not listening then: so the listener says MISSED when it
(re)connects, and its owner looks at everything once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Callable
from typing import LiteralString

from psycopg import AsyncConnection

from .interface import Signal, SignalKind

log = logging.getLogger(__name__)

#: The channel every signal travels on.
CHANNEL = "datastore"

#: Longest wait between attempts to listen again after the connection was lost, in seconds.
MAX_BACKOFF = 5.0

#: The origin of a signal: the changing connection's ``application_name`` (spaces, which separate a
#: signal's parts, replaced).
_ORIGIN = "replace(current_setting('application_name'), ' ', '_')"

#: The state store's triggers: appended events, and a file's upload lease ending, changing hands or
#: asked to stop.
STATE_SIGNALS: tuple[LiteralString, ...] = (
    f"""
    CREATE FUNCTION datastore_signal_events() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{CHANNEL}', 'e ' || {_ORIGIN});
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER events_signal AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION datastore_signal_events()
    """,
    f"""
    CREATE FUNCTION datastore_signal_file() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{CHANNEL}', 'f ' || {_ORIGIN} || ' ' || NEW.key || ' ' || NEW.num);
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER transfer_files_signal AFTER UPDATE ON transfer_files
    FOR EACH ROW WHEN (
        OLD.state = 'UPLOADING' AND (
            NEW.state IS DISTINCT FROM OLD.state
            OR NEW.claimed_by IS DISTINCT FROM OLD.claimed_by
            OR NEW.stop_request IS DISTINCT FROM OLD.stop_request
        )
    )
    EXECUTE FUNCTION datastore_signal_file()
    """,
)

#: The job store's triggers: a job changed state, a file was queued (or queued again).
JOB_SIGNALS: tuple[LiteralString, ...] = (
    f"""
    CREATE FUNCTION datastore_signal_job() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{CHANNEL}', 'j ' || {_ORIGIN} || ' ' || NEW.id);
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER jobs_signal AFTER UPDATE ON jobs
    FOR EACH ROW WHEN (NEW.state IS DISTINCT FROM OLD.state)
    EXECUTE FUNCTION datastore_signal_job()
    """,
    f"""
    CREATE FUNCTION datastore_signal_queued() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('{CHANNEL}', 'q ' || {_ORIGIN});
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER job_files_queued_signal AFTER INSERT OR UPDATE ON job_files
    FOR EACH ROW WHEN (NEW.state = 'QUEUED')
    EXECUTE FUNCTION datastore_signal_queued()
    """,
)


def parse(payload: str, own: str) -> Signal | None:
    """The signal a notification's payload names; None for one this process ``own`` made (its
    ``application_name``), or one this code does not know (a newer node's)."""
    kind, origin, *rest = payload.split(" ")
    if origin == own:
        return None
    try:
        signal_kind = SignalKind(kind)
    except ValueError:
        return None
    if signal_kind is SignalKind.FILE:
        return Signal(signal_kind, rest[0], int(rest[1])) if len(rest) == 2 and rest[1].isdigit() else None
    if signal_kind is SignalKind.JOB:
        return Signal(signal_kind, rest[0]) if len(rest) == 1 else None
    return Signal(signal_kind)


def process_name() -> str:
    """A name for this process's connections (``application_name``) that no other process has."""
    return f"datastore-{os.getpid()}-{secrets.token_hex(6)}"


class Listener:
    """One process's listening connection: hands each signal to ``on_signal`` until closed, and
    connects again (saying MISSED) whenever the connection is lost."""

    def __init__(self, url: str, on_signal: Callable[[Signal], None], *, own: str) -> None:
        self.url = url
        self.on_signal = on_signal
        #: The ``application_name`` of the connections whose signals are this process's own.
        self.own = own
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen from now on: the first connection is made before this returns (and its failure raised)."""
        connection = await self._connect()
        self._task = asyncio.create_task(self._run(connection), name="datastore-signals")

    async def close(self) -> None:
        """Stop listening."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _connect(self) -> AsyncConnection[tuple[object, ...]]:
        # Keepalives: a connection whose peer vanished (its host gone) is noticed within a minute.
        connection = await AsyncConnection.connect(
            self.url, autocommit=True, keepalives=1, keepalives_idle=20, keepalives_interval=5, keepalives_count=4
        )
        try:
            await connection.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            await connection.close()
            raise
        self.on_signal(Signal(SignalKind.MISSED))
        return connection

    async def _run(self, connection: AsyncConnection[tuple[object, ...]]) -> None:
        backoff = 0.1
        while True:
            try:
                async with connection:
                    async for notification in connection.notifies():
                        backoff = 0.1
                        signal = parse(notification.payload, self.own)
                        if signal is not None:
                            self.on_signal(signal)
            except Exception as exc:
                log.warning("listening to the state's signals failed (%s); listening again", type(exc).__name__)
            while True:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                try:
                    connection = await self._connect()
                    break
                except Exception as exc:
                    log.warning("listening to the state's signals failed (%s); trying again", type(exc).__name__)
