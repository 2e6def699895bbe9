"""``GET /_api/v1/health``: whether this node can serve, for a load balancer's health check and for people.

The answer names the node, the worker and the state's kind, and checks the two things a node needs
besides itself: its state store (one read, timed: the round trip, a wait for a free connection of the
pool included) and the storage mount (a file made and removed in the staging directory; the root's
free bytes; the staging directory on the same filesystem as the root and each prefix's folder, so
that publishing is one rename). A state store out of reach or a mount that takes no file answers
503, and a balancer takes the node out; so does, on a state other nodes share (PostgreSQL), staging
on another filesystem than the files (an upload another node resumes would not find its bytes).
A full disk does not: downloads still work and uploads are refused with 507; ``space_low`` says it.

Every check is bounded (:data:`CHECK_TIMEOUT`): a database that does not answer, or a hard NFS mount
whose server is gone, fails the check instead of hanging it. A look at the storage runs in a thread
(it may block), a thread of its own: a look never queues behind requests' work in the loop's shared
threads (manifests being parsed, files being hashed), which would make a busy node look dead. One
stuck there is never started again: later checks wait on it, and fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from aiohttp import web

from ..config import Settings
from .context import CONTEXT

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds each check (the state store's read, the look at the storage) may take before it fails.
CHECK_TIMEOUT = 2.0

#: A look (at the storage, the state store) younger than this is answered again rather than repeated
#: (a balancer of several frontends, or anyone, may ask many times a second; a storage look writes).
STORAGE_REUSE = 0.5
#: While a new look runs, a finished one younger than this (seconds since it began) answers: a
#: failure shows within about this much more.
STORAGE_STALE = 3.0


@dataclass(frozen=True, slots=True)
class StorageHealth:
    """What a look at the storage found."""

    writable: bool
    free_bytes: int | None
    space_low: bool
    staging_same_filesystem: bool | None
    error: str | None

    def as_json(self) -> dict[str, Any]:
        """The ``storage`` member of the answer."""
        return {
            "writable": self.writable,
            "free_bytes": self.free_bytes,
            "space_low": self.space_low,
            "staging_same_filesystem": self.staging_same_filesystem,
            "error": self.error,
        }


class Recent(Generic[T]):
    """One check's answers: one look shared by concurrent calls; a finished look younger than
    STORAGE_REUSE answers again (a balancer of several frontends, or anyone, may ask many times a
    second); while a new look runs, a finished one younger than STORAGE_STALE answers (a look made
    slow by a busy machine does not make the health check slow); else the look is waited for, at
    most CHECK_TIMEOUT (then ``timed_out()`` answers). A look stuck past it is never started again:
    later calls wait on it, and fail."""

    def __init__(self) -> None:
        self._look: asyncio.Future[T] | None = None
        self._looked_at = 0.0
        #: The last finished look's answer, and when that look began.
        self._last: tuple[float, T] | None = None

    async def get(self, start: Callable[[], Awaitable[T]], timed_out: Callable[[], T]) -> T:
        look = self._look
        if look is None or (look.done() and time.monotonic() - self._looked_at > STORAGE_REUSE):
            if look is not None and look.done() and not look.cancelled() and look.exception() is None:
                self._last = (self._looked_at, look.result())
            self._looked_at = time.monotonic()
            look = self._look = asyncio.ensure_future(start())
        if not look.done() and self._last is not None and time.monotonic() - self._last[0] < STORAGE_STALE:
            return self._last[1]
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                return await asyncio.shield(look)
        except TimeoutError:
            return timed_out()


class HealthChecks:
    """The checks of one running application: the storage look it shares among concurrent requests,
    and what each check said last (a change is logged, not every failing answer)."""

    def __init__(self, settings: Settings, staging_dir: Path) -> None:
        self.settings = settings
        self.staging_dir = staging_dir
        self._storage: Recent[StorageHealth] = Recent()
        #: The storage looks' own thread (see the module's docstring).
        self._looking = ThreadPoolExecutor(1, thread_name_prefix="health")
        self._database: Recent[tuple[float | None, str | None]] = Recent()
        self._failing: dict[str, str] = {}

    async def storage(self, prefixes: list[str]) -> StorageHealth:
        """The storage as a look at it finds it (:class:`Recent`: shared, reused, never slow twice)."""
        found = await self._storage.get(
            lambda: asyncio.get_running_loop().run_in_executor(self._looking, self._look_at_storage, prefixes),
            lambda: StorageHealth(False, None, False, None, f"no answer from the storage in {CHECK_TIMEOUT:g} s"),
        )
        self._note("storage", found.error if not found.writable else None)
        return found

    def _look_at_storage(self, prefixes: list[str]) -> StorageHealth:
        root = self.settings.root
        try:
            with contextlib.suppress(FileExistsError):
                self.staging_dir.mkdir()  # as an upload makes it; never its parents (a mount gone stays gone)
            probe = self.staging_dir / f".health.{self.settings.effective_node_id}.{os.getpid()}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            probe.unlink(missing_ok=True)
            staging_device = self.staging_dir.stat().st_dev
            folders = [root, *(folder for folder in (root / prefix for prefix in prefixes) if folder.is_dir())]
            same = all(folder.stat().st_dev == staging_device for folder in folders)
            writable = all(os.access(folder, os.W_OK) for folder in folders)
            free = shutil.disk_usage(root).free
        except OSError as exc:
            return StorageHealth(False, None, False, None, exc.strerror or type(exc).__name__)
        error = None if writable else "a folder of the root is not writable"
        return StorageHealth(writable, free, free < self.settings.min_free_bytes, same, error)

    async def database(self, read: Callable[[], Awaitable[object]]) -> tuple[float | None, str | None]:
        """The round trip of ``read()`` in milliseconds, or None and why it failed (:class:`Recent`)."""
        round_trip, error = await self._database.get(
            lambda: self._time(read), lambda: (None, f"no answer in {CHECK_TIMEOUT:g} s")
        )
        self._note("state store", error)
        return round_trip, error

    @staticmethod
    async def _time(read: Callable[[], Awaitable[object]]) -> tuple[float | None, str | None]:
        started = time.monotonic()
        try:
            await read()
        except Exception as exc:  # whatever the driver raises: the node cannot use its state
            log.debug("the state store failed its health check", exc_info=True)
            return None, f"unreachable ({type(exc).__name__})"
        return round((time.monotonic() - started) * 1000, 3), None

    def _note(self, what: str, error: str | None) -> None:
        """Log a check that starts or stops failing."""
        before = self._failing.pop(what, None)
        if error is not None:
            self._failing[what] = error
            if before is None:
                log.warning("health: the %s fails: %s", what, error)
        elif before is not None:
            log.warning("health: the %s is back", what)


#: The checks of the application (made with it: ``create_app``).
HEALTH = web.AppKey("datastore.health", HealthChecks)


async def handle_health(request: web.Request) -> web.Response:
    """``GET /_api/v1/health``: 200 if this node can serve, else 503 (see the module's docstring);
    ``node`` is the answering node's name, ``worker`` its worker's number, ``state`` the state store's
    kind (never its URL), ``event_streams`` how many event streams the worker is serving, ``database``
    and ``storage`` what their checks found."""
    ctx = request.app[CONTEXT]
    checks = request.app[HEALTH]
    prefixes = sorted(ctx.mounts)
    (round_trip, db_error), storage = await asyncio.gather(
        checks.database(ctx.state.last_event_id), checks.storage(prefixes)
    )
    shared = ctx.settings.state_kind == "postgresql"
    healthy = db_error is None and storage.writable and (storage.staging_same_filesystem or not shared)
    return web.json_response(
        {
            "status": "ok" if healthy else "failing",
            "prefixes": prefixes,
            "node": ctx.settings.effective_node_id,
            "worker": ctx.worker_index,
            "state": ctx.settings.state_kind,
            "event_streams": ctx.events.streams,
            "database": {"reachable": db_error is None, "round_trip_ms": round_trip, "error": db_error},
            "storage": storage.as_json(),
        },
        status=200 if healthy else 503,
        headers={"Cache-Control": "no-store"},
    )
