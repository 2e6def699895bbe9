"""What every request handler of a running store shares: settings, the
transfer registry, the prefix mounts, the staging directory and the count of
running uploads.

The prefix registry is a plain mapping from prefix to :class:`Mount`, filled
by ``TransferServer.register_prefix`` before serving; each mount remembers
which optional handler capabilities were detected at registration, so no
request ever probes a handler with ``hasattr``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .config import Settings
from .errors import DatastoreError, PathNotFound, ServiceUnavailable
from .handlers.interface import (
    CanClose,
    CanDelete,
    CanDescribe,
    CanList,
    CanLocateDownload,
    CanReserveMany,
    TransferHandler,
)
from .identity import Identity
from .staging import BufferBudget, Digests
from .transfers import TransferRegistry


@dataclass(slots=True)
class Mount:
    """A registered prefix: its handler and the capabilities it offers."""

    prefix: str
    handler: TransferHandler
    lister: CanList | None = None
    describer: CanDescribe | None = None
    deleter: CanDelete | None = None
    closer: CanClose | None = None
    reserver: CanReserveMany | None = None
    locator: CanLocateDownload | None = None
    #: Held across can_upload and add_pending_upload so reservations are atomic.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def detect(cls, prefix: str, handler: TransferHandler) -> Mount:
        """Build a mount, detecting the handler's optional capabilities once."""
        return cls(
            prefix=prefix,
            handler=handler,
            lister=handler if isinstance(handler, CanList) else None,
            describer=handler if isinstance(handler, CanDescribe) else None,
            deleter=handler if isinstance(handler, CanDelete) else None,
            closer=handler if isinstance(handler, CanClose) else None,
            reserver=handler if isinstance(handler, CanReserveMany) else None,
            locator=handler if isinstance(handler, CanLocateDownload) else None,
        )


@dataclass(slots=True)
class RunningUpload:
    """An upload request now writing a file of a transfer, in this process."""

    task: asyncio.Task[Any]
    resumable: bool
    #: Set by whoever cancels the task: "terminated" (cleanup is theirs),
    #: "ended" (another worker ended the claim and released the file; only
    #: the staging file is left to remove) or "superseded" (a newer request of
    #: the same client takes over; keep the bytes).
    stop_reason: str | None = None
    #: Set once the file's last byte has arrived, or verification and publishing
    #: began: from then on the upload is waited for, never cancelled.
    finishing: bool = False

    async def stop(self, reason: str) -> None:
        """Stop the request (or, once it is finishing, let it finish) and wait for it."""
        if self.task.done():
            return
        if not self.finishing:
            self.stop_reason = reason
            self.task.cancel()
        await asyncio.wait([self.task])


@dataclass(slots=True)
class StoreContext:
    """State shared by the request handlers of one application."""

    settings: Settings
    registry: TransferRegistry
    mounts: dict[str, Mount]
    staging_dir: Path
    identify: Callable[[web.Request], Identity]
    #: Shared by every upload: how many buffers of received bytes may wait in memory.
    buffers: BufferBudget
    active_uploads: int = 0
    #: Declared bytes of the uploads now running, counted against free space.
    bytes_in_flight: int = 0
    #: Hash state of resumable uploads, by (key, num), with the number of the
    #: claim it was built under; rebuilt from the staged bytes when missing
    #: (after a restart) or stale (another worker appended since).
    digests: dict[tuple[str, int], tuple[int, Digests]] = field(default_factory=dict)
    running: dict[tuple[str, int], RunningUpload] = field(default_factory=dict)
    #: This process's name in the registry's claims.
    worker: str = field(default_factory=lambda: str(os.getpid()))
    #: Whether other worker processes share the state (``serve --workers N``):
    #: then running uploads watch their claims, so that another worker can
    #: stop them, and a superseding request asks the claim's worker to stop.
    shared: bool = False
    #: This worker's number (0 to N-1), reported by the health endpoint.
    worker_index: int = 0

    def staging_path(self, key: str, num: int) -> Path:
        """Where the bytes of file ``num`` of transfer ``key`` are staged."""
        return self.staging_dir / f"{key}.{num}.part"

    def mount(self, prefix: str) -> Mount:
        """The mount of ``prefix``; PathNotFound (404) if there is none."""
        try:
            return self.mounts[prefix]
        except KeyError:
            raise PathNotFound() from None

    @contextmanager
    def upload_slot(self, size: int) -> Iterator[None]:
        """Count one running upload of ``size`` bytes; 503 when all slots are taken."""
        if self.active_uploads >= self.settings.max_concurrent_uploads:
            raise ServiceUnavailable()
        self.active_uploads += 1
        self.bytes_in_flight += size
        try:
            yield
        finally:
            self.active_uploads -= 1
            self.bytes_in_flight -= size


CONTEXT = web.AppKey("datastore.context", StoreContext)


def prefers_json(request: web.Request) -> bool:
    """Whether the client asked for JSON (an ``Accept`` naming application/json)."""
    return "application/json" in request.headers.get("Accept", "")


def render_error(request: web.Request, exc: DatastoreError) -> web.Response:
    """The one place a DatastoreError becomes a response.

    The reason phrase carries the message (as AccessGrid's ``send_error``
    did), cleaned to one printable ASCII line; the body repeats it as text,
    or as JSON for clients that sent or asked for JSON.
    """
    message = exc.message
    reason = "".join(c if " " <= c <= "~" else "?" for c in message)[:200]
    headers = dict(exc.headers)
    if prefers_json(request) or request.content_type == "application/json":
        body: dict[str, Any] = {"error": exc.code, "message": message}
        bad_field = getattr(exc, "field", None)
        if bad_field is not None:
            body["field"] = bad_field
        return web.Response(
            status=exc.status, reason=reason, text=json.dumps(body), content_type="application/json", headers=headers
        )
    return web.Response(status=exc.status, reason=reason, text=message + "\n", headers=headers)
