"""Server-Sent Events: the store's events, live, to browsers, curl and ``datastore watch``.

``GET /_api/v1/events`` streams the events of every prefix the client may list (or of one, with
``?prefix=``); ``GET /_api/v1/transfers/{key}/events`` those of one transfer, to its owner (or an
administrator). Each event is one SSE message: ``id`` (the log's id), ``event`` (its type) and
``data`` (its JSON form, ``lifecycle.events.event_document``). A client that reconnects with
``Last-Event-ID`` (or asks ``?after=ID``) first gets, from the persisted log, every event it may see
that came after that id, then the live ones: none missed, none twice, across restarts and workers
(the log is shared). Comments (``: ping``) every PING_INTERVAL seconds keep proxies from closing an
idle stream.

What a stream shows: names and sizes to whoever may list the prefix (in-progress uploads too);
the transfer key only to its owner and administrators (others get ``transfer``, a handle that does
not give the key away); the owner only to those the prefix's policy shows owners to. A prefix that
keeps TLS uploads off plain HTTP (``tls_only``) streams the events of those uploads only over TLS.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..errors import BadRequest, DatastoreError, IdentityMismatch, NotAuthorized, TransferNotFound, Unauthorized
from ..handlers.mounts import Mount
from ..lifecycle.events import Listener, Predicate, event_document
from ..lifecycle.states import Event
from ..security.identity import Identity, IdentityKind
from ..security.policy import Action
from .context import CONTEXT, identify

log = logging.getLogger(__name__)

#: How an event is shown to one stream's client.
_Render = Callable[[Event], dict[str, object]]

#: Seconds between the comments that keep an idle stream open through proxies.
PING_INTERVAL = 15.0
#: Seconds a client may take to accept one event before its stream is cut.
SEND_TIMEOUT = 60.0


async def handle_events(request: web.Request) -> web.StreamResponse:
    """``GET /_api/v1/events[?prefix=P]``: the events of the prefixes the client may list."""
    ctx = request.app[CONTEXT]
    identity = await identify(request)
    wanted = request.query.get("prefix")
    if wanted is not None:
        mount = ctx.mount(wanted)
        await mount.authorize(identity, Action.LIST)
        mounts = [mount]
    else:
        mounts = [m for m in list(ctx.mounts.values()) if await _may_list(m, identity)]
        if not mounts and ctx.mounts:
            if identity.anonymous:
                raise Unauthorized("sign in to follow the store's events")
            raise NotAuthorized("you may list none of the store's prefixes")
    visible = {m.prefix: m for m in mounts}
    secure = request.secure

    def wants(event: Event) -> bool:
        mount = visible.get(event.prefix)
        return mount is not None and (secure or not (mount.policy.tls_only and _over_tls(event.owner_id)))

    def render(event: Event) -> dict[str, object]:
        mount = visible[event.prefix]
        return event_document(
            event,
            key_visible=identity.may_manage(event.owner_id),
            owner_visible=mount.policy.shows_owner(identity, event.owner_id),
        )

    return await stream_events(request, wants, render)


async def handle_transfer_events(request: web.Request) -> web.StreamResponse:
    """``GET /_api/v1/transfers/{key}/events``: one transfer's events, to its owner (or an administrator)."""
    ctx = request.app[CONTEXT]
    identity = await identify(request)
    key = request.match_info["key"]
    transfer = await ctx.state.get(key)
    if transfer is None:
        raise TransferNotFound()
    if not transfer.manageable_by(identity):
        raise IdentityMismatch()

    def wants(event: Event) -> bool:
        return event.key == key

    def render(event: Event) -> dict[str, object]:
        return event_document(event, key_visible=True, owner_visible=True)

    return await stream_events(request, wants, render)


async def stream_events(request: web.Request, wants: Predicate, render: _Render) -> web.StreamResponse:
    """Replay what the client missed, then follow live, until it leaves or the store stops."""
    bus = request.app[CONTEXT].events
    after = _last_event_id(request)
    with bus.stream(wants, name=f"sse:{request.remote}") as live:
        # Registered first, so nothing committed from here on is missed; replayed up to here.
        until = bus.position
        response = EventSourceResponse(
            ping_interval=PING_INTERVAL, send_timeout=SEND_TIMEOUT, headers={"Cache-Control": "no-store"}
        )
        await response.prepare(request)
        sent = after if after is not None else until
        try:
            if after is not None:
                async for missed in bus.replay(after, until, wants):
                    await _send(response, missed, render)
                    sent = missed.id
            # The pings notice a client that left (within PING_INTERVAL): then the stream ends,
            # even if no event comes to fail on.
            gone = asyncio.ensure_future(response.wait())
            try:
                while (event := await _next_or_gone(live, gone)) is not None:
                    if event.id > sent:
                        await _send(response, event, render)
                        sent = event.id
            finally:
                gone.cancel()
        except (ConnectionResetError, TimeoutError):
            return response
        finally:
            response.stop_streaming()
        if live.overflowed:
            log.info("an event stream fell behind and was ended at id %d; its client catches up on reconnecting", sent)
        return response


async def _next_or_gone(live: Listener, gone: asyncio.Future[None]) -> Event | None:
    """The stream's next event, or None once it must end (the client left, or the stream ended)."""
    getting: asyncio.Future[Event | None] = asyncio.ensure_future(live.next())
    waited: set[asyncio.Future[Any]] = {getting, gone}
    done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
    if getting not in done:
        getting.cancel()
        return None
    return getting.result()


async def _send(response: EventSourceResponse, event: Event, render: _Render) -> None:
    await response.send(json.dumps(render(event), separators=(",", ":")), id=str(event.id), event=str(event.type))


def _last_event_id(request: web.Request) -> int | None:
    """The id after which the client wants events: ``Last-Event-ID``, else ``?after=``; 400 if malformed."""
    text = request.headers.get("Last-Event-ID") or request.query.get("after")
    if text is None or text == "":
        return None
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise BadRequest("Last-Event-ID must be an event id (a non-negative integer)")
    return int(text)


async def _may_list(mount: Mount, identity: Identity) -> bool:
    try:
        await mount.authorize(identity, Action.LIST)
    except DatastoreError:
        return False
    return True


def _over_tls(owner_id: str | None) -> bool:
    """Whether the uploads of ``owner_id`` came over TLS (a client certificate's are; nothing else is)."""
    return owner_id is not None and Identity.from_principal(owner_id, None).kind is IdentityKind.CERTIFICATE
