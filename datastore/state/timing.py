"""What the state costs a request: the seconds it spent waiting for the state's transactions (both
backends, catalogues included), tallied per request in a context variable. The HTTP layer opens a
tally around each request and reports it in the ``Server-Timing`` header (``db;dur=MS``), which
browsers' developer tools show and the benchmarks read."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(slots=True)
class Tally:
    """Seconds spent in the state's transactions, and how many there were."""

    seconds: float = 0.0
    transactions: int = 0


_TALLY: ContextVar[Tally | None] = ContextVar("datastore_state_tally", default=None)


@contextmanager
def tallying() -> Iterator[Tally]:
    """Tally the transactions awaited inside (and in tasks started inside)."""
    tally = Tally()
    token = _TALLY.set(tally)
    try:
        yield tally
    finally:
        _TALLY.reset(token)


@asynccontextmanager
async def transaction() -> AsyncIterator[None]:
    """Count one transaction, awaited inside, in the current tally (if one is open)."""
    tally = _TALLY.get()
    if tally is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        tally.seconds += time.perf_counter() - started
        tally.transactions += 1
