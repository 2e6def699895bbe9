"""What every request handler of a running store shares: settings, the
transfer registry, the token store, the prefix mounts, the staging directory
and the count of running uploads (also in the metrics); and the identity of
each request.

The prefix registry is a plain mapping from prefix to :class:`Mount`, filled
by ``TransferServer.register_prefix`` before serving; each mount remembers
its access policy and which optional handler capabilities were detected at
registration, so no request ever probes a handler with ``hasattr``.

:func:`identify` establishes who a request is from once per request (a
certificate checked against the CRL, a token checked against the token
store, a trusted header, or nobody) and :meth:`Mount.authorize` decides
what that identity may do on the prefix.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import metrics
from ..config import Settings
from ..errors import DatastoreError, NotAuthorized, PathNotFound, ServiceUnavailable, TooManyUploads
from ..handlers.interface import (
    CanAuthorize,
    CanClose,
    CanDelete,
    CanDescribe,
    CanList,
    CanLocateDownload,
    CanReserveMany,
    TransferHandler,
)
from ..security.identity import Identity
from ..security.policy import Action, Policy
from ..security.tokens import TokenStore
from ..state.transfers import ClientQuota, TransferRegistry
from ..storage.staging import BufferBudget, Digests
from .bodies import MemoryBudget


@dataclass(slots=True)
class Mount:
    """A registered prefix: its handler and the capabilities it offers."""

    prefix: str
    handler: TransferHandler
    policy: Policy
    lister: CanList | None = None
    describer: CanDescribe | None = None
    deleter: CanDelete | None = None
    closer: CanClose | None = None
    reserver: CanReserveMany | None = None
    locator: CanLocateDownload | None = None
    authorizer: CanAuthorize | None = None
    #: Held across can_upload and add_pending_upload so reservations are atomic.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def detect(cls, prefix: str, handler: TransferHandler, policy: Policy) -> Mount:
        """Build a mount, detecting the handler's optional capabilities once."""
        return cls(
            prefix=prefix,
            handler=handler,
            policy=policy,
            lister=handler if isinstance(handler, CanList) else None,
            describer=handler if isinstance(handler, CanDescribe) else None,
            deleter=handler if isinstance(handler, CanDelete) else None,
            closer=handler if isinstance(handler, CanClose) else None,
            reserver=handler if isinstance(handler, CanReserveMany) else None,
            locator=handler if isinstance(handler, CanLocateDownload) else None,
            authorizer=handler if isinstance(handler, CanAuthorize) else None,
        )

    async def authorize(self, identity: Identity, action: Action, name: str | None = None) -> None:
        """Raise 401/403 unless the prefix's policy, and then its handler, let ``identity`` do ``action``."""
        self.policy.check(identity, action, self.prefix)
        if self.authorizer is not None and not await self.authorizer.authorize(identity, action.value, name):
            raise NotAuthorized(f"the store does not let you {action} here")


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
    tokens: TokenStore
    mounts: dict[str, Mount]
    staging_dir: Path
    #: Who a request is from (``TransferServer.identify``); call :func:`identify` instead.
    authenticate: Callable[[web.Request], Awaitable[Identity]]
    #: Shared by every upload: how many buffers of received bytes may wait in memory.
    buffers: BufferBudget
    active_uploads: int = 0
    #: Uploads now running in this process, by client (:func:`client_key`).
    uploads_by_client: Counter[str] = field(default_factory=Counter)
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
    #: Manifests parsed at once in threads (ConfigParser holds the GIL: more would starve the loop).
    parses: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    #: Bytes of manifests read or waiting to be parsed (``max_manifest_memory``); set from the settings.
    manifest_memory: MemoryBudget = field(default_factory=lambda: MemoryBudget(0))

    def staging_path(self, key: str, num: int) -> Path:
        """Where the bytes of file ``num`` of transfer ``key`` are staged."""
        return self.staging_dir / f"{key}.{num}.part"

    def mount(self, prefix: str) -> Mount:
        """The mount of ``prefix``; PathNotFound (404) if there is none."""
        try:
            return self.mounts[prefix]
        except KeyError:
            raise PathNotFound() from None

    @property
    def quota(self) -> ClientQuota:
        """What one client's open transfers may hold at once."""
        settings = self.settings
        return ClientQuota(
            settings.max_transfers_per_client,
            settings.max_reserved_names_per_client,
            settings.max_reserved_bytes_per_client,
        )

    @contextmanager
    def upload_slot(self, size: int, client: str) -> Iterator[None]:
        """Count one running upload of ``size`` bytes for ``client``.

        429 when the client already runs as many as it may; 503 when the
        store runs as many as it may.
        """
        limit = self.settings.max_uploads_per_client
        if self.uploads_by_client[client] >= limit:
            raise TooManyUploads(f"you are running {limit} uploads, as many as one client may at once")
        if self.active_uploads >= self.settings.max_concurrent_uploads:
            raise ServiceUnavailable()
        self.active_uploads += 1
        self.uploads_by_client[client] += 1
        self.bytes_in_flight += size
        metrics.upload_started()
        try:
            yield
        finally:
            metrics.upload_stopped()
            self.active_uploads -= 1
            self.bytes_in_flight -= size
            self.uploads_by_client[client] -= 1
            if not self.uploads_by_client[client]:
                del self.uploads_by_client[client]


CONTEXT = web.AppKey("datastore.context", StoreContext)

#: Where a request keeps its identity once established.
_IDENTITY = web.RequestKey("datastore.identity", Identity)


def base_url(request: web.Request) -> str:
    """The URL the store returns links under: ``public_url`` (behind a reverse proxy, say), else the
    address and port the request arrived on. Never the client's Host header, which anyone may write."""
    public = request.app[CONTEXT].settings.public_url
    if public is not None:
        return public.rstrip("/")
    scheme = "https" if request.secure else "http"
    transport = request.transport
    local = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(local, tuple) or len(local) < 2:
        return f"{scheme}://localhost"
    host = f"[{local[0]}]" if ":" in str(local[0]) else str(local[0])
    return f"{scheme}://{host}:{local[1]}"


def client_key(request: web.Request, identity: Identity) -> str:
    """Whose share of the store a request uses: a proved identity (certificate, token), else the network
    the request comes from: its IPv4 address, or its IPv6 /64 (one host's usual allocation). An
    asserted DN is not a share of its own: a client could write a new one for every request."""
    if identity.authenticated and identity.principal is not None:
        return identity.principal
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return f"address:{request.remote or 'unknown'}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"address:{address.ipv4_mapped}"
        return f"address:{ipaddress.ip_network((address, 64), strict=False)}"
    return f"address:{address}"


async def identify(request: web.Request) -> Identity:
    """Who ``request`` is from, established once per request; 401/403 for a bad token or certificate."""
    identity: Identity | None = request.get(_IDENTITY)
    if identity is None:
        identity = await request.app[CONTEXT].authenticate(request)
        request[_IDENTITY] = identity
    return identity


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
        response = web.Response(
            status=exc.status, reason=reason, text=json.dumps(body), content_type="application/json", headers=headers
        )
    else:
        response = web.Response(status=exc.status, reason=reason, text=message + "\n", headers=headers)
    if exc.close_connection:
        response.force_close()
    return response
