"""What ``datastore migrate`` does: bring the schema of every store a configured state holds up to
what this code writes, or only say what is missing. The stores are those ``serve`` opens: the state
store with its jobs, the catalogue of each prefix, and the token store of the state directory.

PostgreSQL keeps a version per component (``postgres_database.py``): the stores are made (not opened)
as ``serve`` makes them, which registers their components, and their versions are compared and
raised in one transaction; a schema newer than the code is refused (:class:`SchemaTooNew`) and
nothing is applied. SQLite files carry no version: each store creates what is missing and adds what
an older file lacks whenever it opens, idempotently. Here a SQLite file is behind if opening it
changes its schema (SQLite's schema cookie, ``PRAGMA schema_version``); the check opens a copy made
with SQLite's backup API, never the file itself with its store. A SQLite file cannot be told to be
too new.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..config import Settings
from ..security.tokens import TokenStore, open_token_store
from . import open_catalogue, open_state
from .postgres_database import SchemaTooNew, migrate_schema, registered_components
from .sqlite import SqliteState
from .sqlite_catalogue import SqliteCatalogue

__all__ = ["SchemaStep", "SchemaTooNew", "migrate"]


@dataclass(frozen=True, slots=True)
class SchemaStep:
    """One component's schema as found and as this code writes it: versions for PostgreSQL
    (``"0"``: none yet), ``absent``, ``older`` or ``current`` for a SQLite file."""

    component: str
    found: str
    target: str

    @property
    def pending(self) -> bool:
        """Whether the schema is behind this code's."""
        return self.found != self.target

    def __str__(self) -> str:
        return f"{self.component} {self.found} -> {self.target}"


class _Closable(Protocol):
    async def close(self) -> None: ...


async def migrate(settings: Settings, *, apply: bool) -> list[SchemaStep]:
    """Every component of the state ``settings`` configure, as found; with ``apply`` brought up to date
    first. Raises SchemaTooNew (PostgreSQL; nothing applied), ``psycopg.Error`` or ``OSError``."""
    steps: list[SchemaStep] = []
    url = settings.effective_state_url
    state_dir = settings.effective_state_dir
    if settings.state_kind == "postgresql":
        return await _postgres(settings, apply=apply)
    steps.append(await _sqlite("state", Path(url.removeprefix("sqlite:///")), _open_state, apply=apply))
    for prefix in settings.prefixes:
        path = state_dir / "catalogue" / f"{prefix}.sqlite3"
        steps.append(await _sqlite(f"catalogue {prefix}", path, _open_catalogue, apply=apply))
    steps.append(await _sqlite("tokens", state_dir / "tokens.sqlite3", _open_tokens, apply=apply))
    return steps


async def _postgres(settings: Settings, *, apply: bool) -> list[SchemaStep]:
    url = settings.effective_state_url
    # Made as serve makes them, never opened: making them registers their components.
    stores: list[_Closable] = [open_state(url), open_token_store(settings)]
    stores.extend(open_catalogue(url, prefix, Path(prefix)) for prefix in settings.prefixes)
    for store in stores:
        await store.close()
    changes = await migrate_schema(url, registered_components(), apply=apply)
    return [SchemaStep(c.component, str(c.current), str(c.target)) for c in changes]


async def _open_state(path: Path) -> _Closable:
    state = SqliteState(path)
    await state.last_event_id()
    return state


async def _open_catalogue(path: Path) -> _Closable:
    catalogue = SqliteCatalogue(path)
    await catalogue.is_reserved("")
    return catalogue


async def _open_tokens(path: Path) -> _Closable:
    tokens = TokenStore(path)
    await tokens.count()
    return tokens


async def _sqlite(
    component: str, path: Path, open_store: Callable[[Path], Awaitable[_Closable]], *, apply: bool
) -> SchemaStep:
    """A SQLite file's schema: ``absent``, ``older`` (opening changes it) or ``current``; with ``apply``
    opened (created if absent) by its store."""
    name = f"{component} (SQLite)"
    if not await asyncio.to_thread(path.exists):
        if apply:
            await (await open_store(path)).close()
        return SchemaStep(name, "absent", "current")
    if apply:
        before = await asyncio.to_thread(_schema_cookie, path)
        await (await open_store(path)).close()
        after = await asyncio.to_thread(_schema_cookie, path)
    else:
        with tempfile.TemporaryDirectory(prefix="datastore-migrate-") as folder:
            copy = Path(folder) / path.name
            await asyncio.to_thread(_backup, path, copy)
            before = await asyncio.to_thread(_schema_cookie, copy)
            await (await open_store(copy)).close()
            after = await asyncio.to_thread(_schema_cookie, copy)
    return SchemaStep(name, "current" if before == after else "older", "current")


def _schema_cookie(path: Path) -> int:
    """SQLite's count of the file's schema changes."""
    with sqlite3.connect(path) as db:
        cookie: int = db.execute("PRAGMA schema_version").fetchone()[0]
    db.close()
    return cookie


def _backup(source: Path, copy: Path) -> None:
    """A consistent copy of ``source`` (its write-ahead log included), even while a store writes it."""
    with sqlite3.connect(source) as db, sqlite3.connect(copy) as target:
        db.backup(target)
    db.close()
    target.close()
