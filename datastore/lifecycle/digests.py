"""Digests known after publishing: computing, recording and announcing the digests of published
files that their uploads did not compute.

An upload computes inline only the digests its verification needs (those its client declared) when
its prefix's handler can add digests later (:class:`~datastore.handlers.interface.CanAddDigests`).
The :class:`Digester` of each process computes the others once the file is published, one file at
a time in threads of the lowest priority (``storage/published.py``), records them in the catalogue
(only if the file is still the publication it read) and announces them with a ``file.digested``
event. Until then a download omits the unknown digest from ``Repr-Digest`` and a listing says
``"digests": "pending"``: nothing is ever served with a digest that was not computed from its bytes.

What it is handed are the files this process published. What a process never got to (it stopped,
crashed or died between publishing and digesting) is found by a scan of the catalogues: at start-up
for every file published before, then every :data:`SCAN_INTERVAL` for those published more than
:data:`GRACE` ago (left by a process that died). Where processes share the state (``--workers``,
nodes), one at a time scans (a lease in the state), so that they do not all read the same files;
a process that died holding it delays the others' scans until the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..handlers.interface import CanAddDigests
from ..storage.published import digest_file, digest_pool
from .states import EventType, NewEvent

if TYPE_CHECKING:
    from .machine import Lifecycle

log = logging.getLogger(__name__)

#: Seconds between two scans of the catalogues for files no process digested.
SCAN_INTERVAL = 60.0
#: A file published less than this many seconds ago is its publisher's to digest, not a scan's.
GRACE = 60.0
#: Files one scan takes from a catalogue (a full batch is followed by another scan at once).
SCAN_BATCH = 100
#: Files waiting at most in one process; more are left to a later scan.
QUEUE_LIMIT = 10_000
#: The lease whose holder scans.
SCAN_LEASE = "digest-scan"


@dataclass(frozen=True, slots=True)
class Undigested:
    """A published file whose digests are to be completed; ``key`` and ``num`` name the upload that
    published it, when known (its transfer's followers then see the event too)."""

    prefix: str
    name: str
    key: str | None = None
    num: int | None = None


class Digester:
    """Completes the digests of the published files of one process's mounts (see the module)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self._queue: deque[Undigested] = deque()
        self._queued: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._started = time.time()
        self._pool = digest_pool(lifecycle.settings.digest_threads)
        #: Files digested by this process.
        self.digested = 0

    def submit(self, file: Undigested) -> None:
        """Digest ``file`` soon (its upload just published it)."""
        place = (file.prefix, file.name)
        if place in self._queued or len(self._queue) >= QUEUE_LIMIT:
            return
        self._queued.add(place)
        self._queue.append(file)
        self._wake.set()

    async def run(self) -> None:
        """Digest what is submitted and what the scans find, until cancelled."""
        # The first scan that runs takes everything published before this process started.
        before: float | None = self._started
        try:
            while True:
                try:
                    scanned, full = await self._scan(before if before is not None else time.time() - GRACE)
                except Exception:  # the state or a catalogue failed: the next scan tries again
                    log.exception("could not look for files whose digests are still to be computed")
                    scanned, full = False, False
                if scanned and not full:
                    before = None  # the start-up's look is done: from now on, what dead processes left
                deadline, at_scan = time.monotonic() + SCAN_INTERVAL, self.digested
                while True:
                    while self._queue:
                        file = self._queue.popleft()
                        self._queued.discard((file.prefix, file.name))
                        try:
                            await self.complete(file)
                        except Exception:
                            log.exception("could not digest /%s/%s; a later scan tries again", file.prefix, file.name)
                    if full and self.digested > at_scan:
                        # A full batch that made progress: the next one at once. (One that did not
                        # holds files whose bytes are not what their records say: they wait.)
                        break
                    self._wake.clear()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), left)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self.lifecycle.shared:
                with contextlib.suppress(Exception):
                    await self.lifecycle.state.release(SCAN_LEASE, self.lifecycle.holder)

    async def _scan(self, before: float) -> tuple[bool, bool]:
        """Queue the files published before ``before`` that lack a digest, unless another process
        sharing the state holds the scan's lease: whether it did, and whether a catalogue had more
        than one batch's worth."""
        state = self.lifecycle.state
        if self.lifecycle.shared and not await state.acquire(
            SCAN_LEASE, self.lifecycle.holder, lease=2 * SCAN_INTERVAL, now=time.time()
        ):
            return False, False
        full = False
        for mount in list(self.lifecycle.mounts.values()):
            if mount.digests is None:
                continue
            found = await mount.digests.undigested(before=before, limit=SCAN_BATCH)
            full = full or len(found) >= SCAN_BATCH
            for stored in found:
                self.submit(Undigested(mount.prefix, stored.name))
        return True, full

    async def complete(self, file: Undigested) -> bool:
        """Compute and record the digests ``file`` lacks, and announce them: whether it did."""
        mount = self.lifecycle.mounts.get(file.prefix)
        handler: CanAddDigests | None = mount.digests if mount is not None else None
        found = await handler.published(file.name) if handler is not None else None
        if handler is None or found is None:
            return False
        path, stored = found
        if stored.md5 is not None and stored.sha256 is not None:
            return False
        loop = asyncio.get_running_loop()
        computed = await loop.run_in_executor(
            self._pool,
            lambda: digest_file(path, stored.size, md5=stored.md5 is None, sha256=stored.sha256 is None),
        )
        if computed is None:
            return False  # replaced or changed meanwhile: its new publication brings its own work
        md5, sha256 = stored.md5 or computed[0], stored.sha256 or computed[1]
        assert md5 is not None and sha256 is not None
        added = await handler.add_digests(file.name, uploaded_at=stored.uploaded_at, md5=md5, sha256=sha256)
        if added is None:
            return False
        self.digested += 1
        event = NewEvent(
            EventType.FILE_DIGESTED,
            file.prefix,
            key=file.key,
            num=file.num,
            name=added.name,
            owner=added.owner,
            owner_id=added.owner_id,
            bytes=added.size,
            size=added.size,
            md5=added.md5,
            sha256=added.sha256,
        )
        await self.lifecycle.state.append([event], now=time.time())
        return True
