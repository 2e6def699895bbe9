"""Persisted state behind one interface (``interface.py``): transfers, their files, leases, the event
log, transfer jobs; the catalogues of published files behind another (``catalogue.py``); and the
backends of them, chosen by the ``state_url`` setting: SQLite (``sqlite.py`` with ``sqlite_jobs.py``,
``sqlite_catalogue.py``) and PostgreSQL (``postgres.py`` with ``postgres_jobs.py``,
``postgres_catalogue.py``, both on ``postgres_database.py``), which share what is no SQL of theirs
(``records.py``, ``job_records.py``)."""

from __future__ import annotations

from pathlib import Path

from .catalogue import Catalogue
from .interface import StateStore


def open_state(url: str) -> StateStore:
    """The state store ``url`` names: ``sqlite:///PATH`` (the embedded default; as in SQLAlchemy, a
    relative PATH after three slashes, an absolute one after four) or ``postgresql://...`` (a
    database shared by every node, as libpq reads the URL). Opened lazily: the first call creates
    or migrates what is missing."""
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteState

        return SqliteState(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresState

        return PostgresState(url)
    raise ValueError(f"no state backend for {url!r}: use sqlite:///PATH or postgresql://...")


def open_catalogue(url: str, prefix: str, path: Path) -> Catalogue:
    """The catalogue of ``prefix`` in the state ``url`` names. For ``sqlite:///``: the SQLite file
    ``path``, one per prefix and apart from the state store's own file, as stores have always kept
    it (a backend shared by several hosts keeps every prefix's catalogue in its own database, by
    ``prefix``). Opened lazily, as :func:`open_state`."""
    if url.startswith("sqlite:///"):
        from .sqlite_catalogue import SqliteCatalogue

        return SqliteCatalogue(path)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres_catalogue import PostgresCatalogue

        return PostgresCatalogue(url, prefix)
    raise ValueError(f"no catalogue backend for {url!r}: use sqlite:///PATH or postgresql://...")
