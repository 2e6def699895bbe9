"""What every request handler of a running store shares: settings, the lifecycle (and through it
the state store and the prefix mounts), the token store and the event bus; and the identity of
each request.

:func:`identify` establishes who a request is from once per request (a
certificate checked against the CRL, a token checked against the token
store, a trusted header, or nobody) and :meth:`Mount.authorize` decides
what that identity may do on the prefix.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..config import Settings
from ..errors import DatastoreError
from ..handlers.mounts import Mount
from ..jobs.runner import JobRunner
from ..lifecycle.events import EventBus
from ..lifecycle.machine import Lifecycle
from ..security.identity import Identity
from ..security.tokens import TokenStore
from ..state.interface import StateStore
from .bodies import MemoryBudget
from .hooks import Hook


@dataclass(slots=True)
class StoreContext:
    """State shared by the request handlers of one application."""

    settings: Settings
    #: Every state change of a transfer goes through it; its state store answers the reads.
    lifecycle: Lifecycle
    tokens: TokenStore
    #: Who a request is from (``TransferServer.identify``); call :func:`identify` instead.
    authenticate: Callable[[web.Request], Awaitable[Identity]]
    #: The events this application announces, for its SSE streams.
    events: EventBus
    #: The webhooks it delivers events to.
    hooks: list[Hook] = field(default_factory=list)
    #: This process's transfer-job runner (None while the app is not running).
    jobs: JobRunner | None = None
    #: This worker's number (0 to N-1), reported by the health endpoint.
    worker_index: int = 0
    #: Manifests parsed at once in threads (ConfigParser holds the GIL: more would starve the loop).
    parses: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    #: Bytes of manifests read or waiting to be parsed (``max_manifest_memory``); set from the settings.
    manifest_memory: MemoryBudget = field(default_factory=lambda: MemoryBudget(0))

    @property
    def state(self) -> StateStore:
        """The state store (for reads: every change goes through the lifecycle)."""
        return self.lifecycle.state

    @property
    def mounts(self) -> dict[str, Mount]:
        """The registered prefixes."""
        return self.lifecycle.mounts

    def mount(self, prefix: str) -> Mount:
        """The mount of ``prefix``; PathNotFound (404) if there is none."""
        return self.lifecycle.mount(prefix)


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


def client_address(request: web.Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address the request comes from: the peer's, or, when the peer is a load balancer the
    operator trusts (``trusted_proxies``), the address it saw (the last ``X-Forwarded-For`` entry,
    which that balancer wrote; whatever a client wrote before it is not believed). An IPv4-mapped
    IPv6 address is its IPv4 address; None if there is no usable address."""
    peer = _address(request.remote)
    context = request.app.get(CONTEXT)
    proxies = context.settings.proxy_networks if context is not None else ()
    if peer is None or not proxies or not any(peer in network for network in proxies):
        return peer
    forwarded = request.headers.getall("X-Forwarded-For", [])
    seen = _address(forwarded[-1].rsplit(",", 1)[-1].strip()) if forwarded else None
    return seen if seen is not None else peer


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_key(request: web.Request, identity: Identity) -> str:
    """Whose share of the store a request uses: a proved identity (certificate, token), else the network
    the request comes from (:func:`client_address`): its IPv4 address, or its IPv6 /64 (one host's usual
    allocation). An asserted DN is not a share of its own: a client could write a new one for every
    request."""
    if identity.authenticated and identity.principal is not None:
        return identity.principal
    address = client_address(request)
    if address is None:
        return f"address:{request.remote or 'unknown'}"
    if isinstance(address, ipaddress.IPv6Address):
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


def reason_phrase(message: str) -> str:
    """``message`` as a status line's reason phrase: one printable ASCII line of at most 200 characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in message)[:200]


def render_error(request: web.Request, exc: DatastoreError) -> web.Response:
    """The one place a DatastoreError becomes a response.

    The reason phrase carries the message (as AccessGrid's ``send_error``
    did), cleaned to one printable ASCII line; the body repeats it as text,
    or as JSON for clients that sent or asked for JSON.
    """
    message = exc.message
    reason = reason_phrase(message)
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
