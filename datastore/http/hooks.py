"""Webhooks: every event POSTed as JSON to each ``--hook-url``, in order, at least once.

For applications in other languages. Each hook has a cursor in the state store (the id of the last
event its receiver accepted with a 2xx), so its backlog is the event log itself: persisted, and
bounded by ``hook_backlog`` (beyond it the oldest events are skipped, with a warning) and by
``event_retention``. A delivery that fails (no answer within ``hook_timeout``, a connection error,
any status but 2xx) is retried with a growing pause, the same event until it is accepted; the
receiver drops duplicates by the event id, which every delivery carries (the body's ``id`` and the
``X-Datastore-Event-Id`` header). Deliveries run in their own task, never in an upload's: a dead
hook holds back only its own cursor.

With several processes sharing the state, one delivers each hook at a time: the one holding the
hook's named lease, renewed while it works; if it dies another takes over from the cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time

import aiohttp

from .. import metrics
from ..config import Settings
from ..lifecycle.events import EventBus, event_document
from ..lifecycle.states import Event
from ..state.interface import StateStore

log = logging.getLogger(__name__)

#: Events read from the log for one round of deliveries.
BATCH = 100
#: The first pause after a failed delivery, and the longest.
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
#: Seconds a process's hold on delivering a hook lasts unless renewed.
LEASE = 30.0


class Hook:
    """The deliveries to one receiver."""

    def __init__(self, url: str, index: int, settings: Settings, state: StateStore, holder: str) -> None:
        self.url = url
        self.index = index
        #: How logs and metrics name the hook: its place on the command line (the URL may hold a secret).
        self.label = f"hook {index}"
        self.name = "hook:" + hashlib.sha256(url.encode()).hexdigest()[:24]
        self.settings = settings
        self.state = state
        self.holder = holder
        self._wake = asyncio.Event()

    def wake(self, _: Event | None = None) -> None:
        """New events: look now."""
        self._wake.set()

    async def run(self, bus: EventBus) -> None:
        """Deliver until cancelled."""
        unsubscribe = bus.subscribe(self.wake, name=self.label)
        timeout = aiohttp.ClientTimeout(total=self.settings.hook_timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                while True:
                    try:
                        delivered = await self._round(session)
                    except Exception:
                        log.exception("%s: reading the events to deliver failed", self.label)
                        delivered = False
                    if not delivered:
                        await self._pause(LEASE / 3)
        finally:
            unsubscribe()
            with contextlib.suppress(Exception):
                await asyncio.shield(self.state.release(self.name, self.holder))

    async def _round(self, session: aiohttp.ClientSession) -> bool:
        """Deliver what is due, if this process holds the hook; whether it delivered anything."""
        self._wake.clear()
        if not await self._hold():
            metrics.set_hook_backlog(self.index, 0)  # another process delivers it, and counts its backlog
            return False
        cursor = await self.state.cursor(self.name)
        newest = await self.state.last_event_id()
        if cursor is None:
            # A new hook hears of what happens from now on.
            cursor = newest
            await self.state.set_cursor(self.name, cursor)
        if newest - cursor > self.settings.hook_backlog:
            skipped = newest - cursor - self.settings.hook_backlog
            metrics.hook_delivery(self.index, "dropped", skipped)
            log.warning("%s fell %d events behind; the oldest %d are skipped", self.label, newest - cursor, skipped)
            cursor = newest - self.settings.hook_backlog
            await self.state.set_cursor(self.name, cursor)
        metrics.set_hook_backlog(self.index, newest - cursor)
        events = await self.state.events_after(cursor, limit=BATCH)
        for event in events:
            if not await self._deliver(session, event):
                return True
            await self.state.set_cursor(self.name, event.id)
            metrics.set_hook_backlog(self.index, max(0, newest - event.id))
        return bool(events)

    async def _deliver(self, session: aiohttp.ClientSession, event: Event) -> bool:
        """POST ``event`` until the receiver accepts it; False if this process lost the hook meanwhile."""
        body = json.dumps(event_document(event, key_visible=True, owner_visible=True), separators=(",", ":"))
        headers = {
            "Content-Type": "application/json",
            "X-Datastore-Event-Id": str(event.id),
            "X-Datastore-Event-Type": str(event.type),
        }
        pause = RETRY_FIRST
        attempt = 1
        while True:
            try:
                async with session.post(self.url, data=body, headers=headers, allow_redirects=False) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        metrics.hook_delivery(self.index, "delivered")
                        return True
                    failure = f"answered {response.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failure = type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
            metrics.hook_delivery(self.index, "failed")
            log.warning(
                "%s: delivering event %d failed (attempt %d: %s); again in %.1f s",
                self.label,
                event.id,
                attempt,
                failure,
                pause,
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)
            attempt += 1
            if not await self._hold():
                return False

    async def _hold(self) -> bool:
        return await self.state.acquire(self.name, self.holder, lease=LEASE, now=time.time())

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
