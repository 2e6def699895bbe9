"""Persisted state behind one interface (``interface.py``): transfers, their files, leases, the event
log; and the backends of it (``sqlite.py``), chosen by the ``state_url`` setting."""

from __future__ import annotations

from pathlib import Path

from .interface import StateStore


def open_state(url: str) -> StateStore:
    """The state store ``url`` names: ``sqlite:///PATH`` (the embedded default; as in SQLAlchemy, a
    relative PATH after three slashes, an absolute one after four). Opened lazily: the first call
    creates or migrates what is missing."""
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteState

        return SqliteState(Path(url.removeprefix("sqlite:///")))
    raise ValueError(f"no state backend for {url!r}: use sqlite:///PATH")
