"""A PostgreSQL database used from the event loop: psycopg 3's async connection pool, each unit of
work that writes one transaction (its advisory lock taken with its ``BEGIN``), each that reads
statement by statement, and the versioned migrations of each component applied at first use.

A component (the catalogue, the state store, its jobs, ...) names its schema's migrations in order;
the versions applied are recorded in ``datastore_schema``. One database object may apply several
components' migrations on its pool (the state store's and its jobs', in that order). Opening
applies the missing ones, all nodes starting at once included (an advisory lock makes them take
turns), and refuses to run against a schema newer than this code knows (:class:`SchemaTooNew`): a
node of an older version must not write into tables it does not understand. Opened lazily, as the SQLite backends are:
the first call connects, and :meth:`PostgresDatabase.close` gives the connections back (a later
call opens them again).

A write of one component may be held back to commit with another's transaction on the same
database (:meth:`PostgresDatabase.holding_writes`): the catalogue's publish of a file commits with
the state's, so that both happen or neither, in one transaction instead of two.

Every database object made in a process registers its components (:func:`registered_components`);
:func:`migrate_schema` applies, or only reports, what they lack without opening a pool (``datastore
migrate``, which makes the stores ``serve`` makes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg import AsyncClientCursor, AsyncConnection, pq, sql
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from . import timing

T = TypeVar("T")

#: A connection whose rows are dicts (column name -> value).
Connection = AsyncConnection[DictRow]
#: A statement and its parameters (``%s`` placeholders).
Statement = tuple[LiteralString, Sequence[Any]]

#: Where the versions of every component's schema are kept (one row per component).
_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS datastore_schema (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
)
"""
#: Taken (for its transaction) by whoever applies migrations, so that nodes take turns.
_MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('datastore: migrations'))"


async def fetch_one(
    db: Connection, query: LiteralString, params: Sequence[Any] | Mapping[str, Any] = ()
) -> DictRow | None:
    """The first row ``query`` answers, or None."""
    return await (await db.execute(query, params)).fetchone()


async def fetch_all(
    db: Connection, query: LiteralString, params: Sequence[Any] | Mapping[str, Any] = ()
) -> list[DictRow]:
    """Every row ``query`` answers."""
    return await (await db.execute(query, params)).fetchall()


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of a component's schema: the statements that bring it to ``version``."""

    version: int
    statements: tuple[LiteralString, ...]


class SchemaTooNew(RuntimeError):
    """The database holds a schema of a later version of datastore than this one."""


@dataclass(frozen=True, slots=True)
class SchemaChange:
    """A component's schema as found (``current``; 0: none yet) and as this code writes it (``target``)."""

    component: str
    current: int
    target: int


@dataclass(frozen=True, slots=True)
class HeldWrite:
    """A write one component left to commit in the next transaction of another on the same database
    (:meth:`PostgresDatabase.hold`): its statements, run after the advisory lock named ``lock``."""

    statements: Sequence[Statement]
    lock: str | None
    #: Given the error the transaction raised (it is rolled back), what to raise instead, or None to
    #: raise it as it is: the write's own refusal, as it would have raised it running alone.
    refusal: Callable[[psycopg.Error], Awaitable[BaseException | None]]


@dataclass(slots=True)
class _Holding:
    """The writes held back (for the database ``url``) inside :meth:`PostgresDatabase.holding_writes`."""

    url: str
    writes: list[HeldWrite] = field(default_factory=list)


_HOLDING: ContextVar[_Holding | None] = ContextVar("datastore_held_writes", default=None)


#: The migrations of every component a PostgresDatabase of this process was made with, by name.
_REGISTERED: dict[str, tuple[Migration, ...]] = {}


def registered_components() -> dict[str, tuple[Migration, ...]]:
    """The components every database object made so far in this process migrates, in the order they were made."""
    return dict(_REGISTERED)


class PostgresDatabase:
    """One PostgreSQL database (a URL) for one component (and any others ``also`` names, migrated
    after it, in their order), through a pool of connections."""

    def __init__(
        self,
        url: str,
        component: str,
        migrations: Sequence[Migration],
        *,
        max_size: int = 8,
        also: Mapping[str, Sequence[Migration]] | None = None,
        application_name: str = "datastore",
    ) -> None:
        self.url = url
        #: What the connections call themselves (``pg_stat_activity``; cross-node signals name their origin by it).
        self.application_name = application_name
        self.component = component
        self._components = {
            name: tuple(sorted(steps, key=lambda m: m.version))
            for name, steps in {component: migrations, **(also or {})}.items()
        }
        _REGISTERED.update(self._components)
        self._max_size = max_size
        self._pool: AsyncConnectionPool[Connection] | None = None
        #: Held while the pool opens: concurrent first calls open one pool, not one each.
        self._opening = asyncio.Lock()

    @property
    def version(self) -> int:
        """The schema version of :attr:`component` this code writes."""
        return _latest(self._components[self.component])

    @contextlib.contextmanager
    def holding_writes(self) -> Iterator[None]:
        """Inside (in this task and those it starts), a write another component offers with
        :meth:`hold` on this same database waits for :meth:`take_held`, whose caller sends it with its
        own transaction; what no one takes by the end is dropped, never run alone."""
        token = _HOLDING.set(_Holding(self.url))
        try:
            yield
        finally:
            _HOLDING.reset(token)

    def hold(self, write: HeldWrite) -> bool:
        """Leave ``write`` to the transaction that will take it, if a :meth:`holding_writes` of this
        database is open here: True; False if none is (then the caller runs the write itself)."""
        holding = _HOLDING.get()
        if holding is None or holding.url != self.url:
            return False
        holding.writes.append(write)
        return True

    def take_held(self) -> list[HeldWrite]:
        """The writes held for this database so far (none outside :meth:`holding_writes`), now the
        caller's to send (:meth:`Transaction.send`'s ``held``)."""
        holding = _HOLDING.get()
        if holding is None or holding.url != self.url:
            return []
        taken, holding.writes = holding.writes, []
        return taken

    async def run(self, work: Callable[[Connection], Awaitable[T]], *, lock: str | None = None) -> T:
        """Run ``work(connection)`` in one transaction (committed if it returns, rolled back if it
        raises), first taking the advisory lock named ``lock`` (for the transaction) if given.

        The ``BEGIN`` and the lock go in one round trip: on loopback a round trip is most of a
        statement's cost, and every write of the state store takes a lock."""
        begin: sql.SQL | sql.Composed = sql.SQL("BEGIN")
        if lock is not None:
            begin = sql.SQL("BEGIN; SELECT pg_advisory_xact_lock(hashtext({}))").format(lock)
        async with timing.transaction():
            pool = await self._open()
            async with pool.connection() as connection:
                await connection.execute(begin)
                try:
                    result = await work(connection)
                except BaseException:
                    await _roll_back(connection)
                    raise
                await connection.execute("COMMIT")
                return result

    @contextlib.asynccontextmanager
    async def transaction(self, *, lock: str | None = None) -> AsyncIterator[Transaction]:
        """A write transaction whose statements go in batches (:meth:`Transaction.send`): its
        ``BEGIN`` (and the advisory lock named ``lock``) go with the first batch, its ``COMMIT`` with
        the last. Committed on leaving if no batch did (rolled back if the block raises)."""
        begin: list[Statement] = [("BEGIN", ())]
        if lock is not None:
            begin.append(("SELECT pg_advisory_xact_lock(hashtext(%s))", (lock,)))
        async with timing.transaction():
            pool = await self._open()
            async with pool.connection() as connection:
                transaction = Transaction(connection, begin)
                try:
                    yield transaction
                    if not transaction.committed:
                        await transaction.send([], commit=True)
                except BaseException:
                    await _roll_back(connection)
                    raise

    async def run_together(self, statements: Sequence[Statement], *, lock: str | None = None) -> list[list[DictRow]]:
        """Run ``statements`` in one transaction sent in one round trip (``BEGIN``, the advisory lock
        named ``lock`` if given, each statement, ``COMMIT``): for a transaction none of whose
        statements needs another's answer. The rows each answered, in their order."""
        async with self.transaction(lock=lock) as transaction:
            return await transaction.send(statements, commit=True)

    async def read_together(self, statements: Sequence[Statement]) -> list[list[DictRow]]:
        """The rows each of ``statements`` (which only read) answers, all sent in one round trip; they
        run as one implicit transaction, each seeing the database as of its own start."""
        async with timing.transaction():
            pool = await self._open()
            async with pool.connection() as connection:
                return await _send(connection, statements, skipped=0, answered=len(statements))

    async def read(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``work(connection)``, which only reads, statement by statement (autocommit).

        Each statement sees the database as of its start, as it would in a transaction at
        PostgreSQL's default isolation (read committed): a transaction would add two round trips and
        no consistency."""
        async with timing.transaction():
            pool = await self._open()
            async with pool.connection() as connection:
                return await work(connection)

    async def prepare(self) -> None:
        """Connect, and bring the schema up to date, now if not yet (a held write runs on another
        component's connection, which applies only that component's migrations)."""
        await self._open()

    async def _open(self) -> AsyncConnectionPool[Connection]:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            return await self._open_pool()

    async def _open_pool(self) -> AsyncConnectionPool[Connection]:
        if self._pool is None:
            pool = AsyncConnectionPool(
                self.url,
                connection_class=AsyncConnection[DictRow],
                kwargs={"row_factory": dict_row, "autocommit": True, "application_name": self.application_name},
                min_size=1,
                max_size=self._max_size,
                open=False,
                name=f"datastore-{self.component}",
            )
            await pool.open(wait=True)
            try:
                async with pool.connection() as connection, connection.transaction():
                    await self._migrate(connection)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
        return self._pool

    async def _migrate(self, connection: Connection) -> None:
        await connection.execute(_MIGRATION_LOCK)
        await connection.execute(_SCHEMA_TABLE)
        for component, migrations in self._components.items():
            await _migrate_component(connection, component, migrations)

    async def close(self) -> None:
        """Close the pool's connections; a later call opens them again."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


class Transaction:
    """A write transaction of :meth:`PostgresDatabase.transaction`, its statements sent in batches.

    A batch is one round trip however many statements it holds: its parameters are bound into the
    text on this side (psycopg's client-side binding, quoted as the server's own quoting would),
    which is what lets several statements go as one query, the server's binding taking one at a time.
    On loopback a round trip costs more than most statements, so a transaction sends what needs no
    answer together with what follows it: its reads with its ``BEGIN``, its writes with its ``COMMIT``."""

    def __init__(self, connection: Connection, begin: list[Statement]) -> None:
        self._connection = connection
        #: What goes before the next batch's statements (the BEGIN and the lock, once).
        self._first = begin
        self.committed = False

    async def send(
        self, statements: Sequence[Statement], *, commit: bool = False, held: Sequence[HeldWrite] = ()
    ) -> list[list[DictRow]]:
        """Send ``statements`` (and ``COMMIT`` after them if ``commit``): the rows each answered (none
        for one without ``RETURNING``), in their order. Raises what the first failing one raised, or
        what a ``held`` write (sent before ``statements``, each after its lock) raises instead.

        Locks are taken in one order everywhere, the sender's before a held write's: a component
        whose writes are held never takes the sender's lock while holding its own."""
        if self.committed:
            raise RuntimeError("the transaction was committed")
        first, self._first = self._first, []
        joined: list[Statement] = []
        for write in held:
            if write.lock is not None:
                joined.append(("SELECT pg_advisory_xact_lock(hashtext(%s))", (write.lock,)))
            joined.extend(write.statements)
        batch = [*first, *joined, *statements, *([("COMMIT", ())] if commit else [])]
        try:
            answers = await _send(self._connection, batch, skipped=len(first) + len(joined), answered=len(statements))
        except psycopg.Error as error:
            await _roll_back(self._connection)
            for write in held:
                instead = await write.refusal(error)
                if instead is not None:
                    raise instead from None
            raise
        self.committed = commit
        return answers


async def _send(
    connection: Connection, statements: Sequence[Statement], *, skipped: int, answered: int
) -> list[list[DictRow]]:
    """Send ``statements`` as one query: the rows of the ``answered`` ones after the first ``skipped``."""
    script = "; ".join(query for query, _ in statements)
    values = [value for _, params in statements for value in params]
    cursor = AsyncClientCursor(connection, row_factory=dict_row)
    await cursor.execute(script, values)
    answers: list[list[DictRow]] = []
    for number in range(skipped + answered):
        if number >= skipped:
            answers.append(await cursor.fetchall() if cursor.description is not None else [])
        cursor.nextset()
    return answers


async def _roll_back(connection: Connection) -> None:
    """End the transaction ``work`` raised in, if the connection is still in one; a connection that
    cannot say (broken, or cut mid-statement) is left to the pool, which discards it."""
    if connection.pgconn.transaction_status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR):
        with contextlib.suppress(psycopg.Error):
            await connection.execute("ROLLBACK")


def _latest(migrations: Sequence[Migration]) -> int:
    return migrations[-1].version if migrations else 0


def _too_new(component: str, current: int, version: int) -> SchemaTooNew:
    return SchemaTooNew(
        f"the {component} schema in this database is version {current}; this datastore knows up to"
        f" {version}: run a datastore at least as new as the one that upgraded it"
    )


async def _migrate_component(connection: Connection, component: str, migrations: Sequence[Migration]) -> None:
    """Apply ``component``'s migrations newer than the version recorded (the migration lock held)."""
    version = _latest(migrations)
    row = await fetch_one(connection, "SELECT version FROM datastore_schema WHERE component = %s", (component,))
    current = 0 if row is None else int(row["version"])
    if current > version:
        raise _too_new(component, current, version)
    for migration in migrations:
        if migration.version > current:
            for statement in migration.statements:
                await connection.execute(statement)
    if current < version:
        await connection.execute(
            "INSERT INTO datastore_schema (component, version) VALUES (%s, %s)"
            " ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
            (component, version),
        )


async def migrate_schema(url: str, components: Mapping[str, Sequence[Migration]], *, apply: bool) -> list[SchemaChange]:
    """Each of ``components``' schema in the database ``url`` as found and as this code writes it; with
    ``apply``, bring the older ones up to date first (in one transaction, the migration lock held, as a
    starting node does). Raises :class:`SchemaTooNew` (applying nothing) if any is newer than the code."""
    ordered = {name: tuple(sorted(steps, key=lambda m: m.version)) for name, steps in components.items()}
    connecting = AsyncConnection.connect(url, autocommit=True, row_factory=dict_row)
    async with await connecting as connection, connection.transaction():
        if apply:
            await connection.execute(_MIGRATION_LOCK)
            await connection.execute(_SCHEMA_TABLE)
        found = await fetch_one(connection, "SELECT to_regclass('datastore_schema') IS NOT NULL AS present")
        rows = []
        if found is not None and found["present"]:
            rows = await fetch_all(connection, "SELECT component, version FROM datastore_schema")
        versions = {str(row["component"]): int(row["version"]) for row in rows}
        changes = [SchemaChange(name, versions.get(name, 0), _latest(steps)) for name, steps in ordered.items()]
        for change in changes:
            if change.current > change.target:
                raise _too_new(change.component, change.current, change.target)
        if apply:
            for name, steps in ordered.items():
                await _migrate_component(connection, name, steps)
    return changes
