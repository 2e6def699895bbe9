"""The control plane under ``/_api/v1/``: who am I, tokens, and the lifecycle of transfers (health: ``health.py``).

``GET /_api/v1/identity`` tells a client who the store takes it for (kind,
subject, whether it is an administrator, what its token allows).
``/_api/v1/tokens`` is the administrators' API for bearer tokens: ``GET``
lists them (never their secrets), ``POST`` issues one (the secret is in the
answer, once), ``GET``/``DELETE /_api/v1/tokens/{id}`` shows or revokes one.

``GET /_api/v1/transfers/{key}`` reports a transfer's state (``PENDING``,
``IN_PROGRESS``, ``FINISHED``, ``FAILED``, ``CANCELLED``, ``EXPIRED``) with
each file's name, size, bytes received and state; ``DELETE`` cancels it:
running uploads stop, staged bytes go, reservations are released, and the
key accepts nothing more. Only the identity that created a transfer (or an
administrator) may see or cancel it; an anonymous transfer, whoever holds its
key.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from aiohttp import web

from ..errors import (
    BadRequest,
    Conflict,
    IdentityMismatch,
    NotAuthorized,
    NotFound,
    TransferExpired,
    TransferNotFound,
    Unauthorized,
)
from ..lifecycle.states import TransferState
from ..protocol.timestamps import iso_time
from ..security.logsafe import printable
from ..security.tokens import DEFAULT_LIFETIME, TokenError, token_json
from ..state.interface import Transfer
from .bodies import read_json_object
from .context import CONTEXT, StoreContext, identify

log = logging.getLogger(__name__)


async def handle_identity(request: web.Request) -> web.Response:
    """``GET /_api/v1/identity``: who the store takes the client for."""
    identity = await identify(request)
    grant = identity.grant
    return web.json_response(
        {
            "kind": identity.kind.value,
            "subject": identity.subject,
            "issuer": identity.issuer,
            "dn": identity.dn,
            "admin": identity.admin,
            "token": None
            if grant is None
            else {
                "id": grant.token_id,
                "actions": sorted(grant.actions),
                "prefixes": None if grant.prefixes is None else sorted(grant.prefixes),
                "expires_at": iso_time(grant.expires_at),
            },
        },
        headers={"Cache-Control": "no-store"},
    )


#: The cookie that carries the browser page's token, so that links (downloads) are authorised too.
SESSION_COOKIE = "datastore_token"


async def handle_session_start(request: web.Request) -> web.Response:
    """``POST /_api/v1/session`` with ``Authorization: Bearer TOKEN``: the browser page signs in.

    The token goes into an HttpOnly, SameSite=Strict session cookie (Secure
    on TLS), gone when the browser closes; a revoked or expired token stops
    working in it as anywhere. The answer is the identity, as
    ``GET /_api/v1/identity``.
    """
    identity = await identify(request)
    authorization = request.headers.get("Authorization", "")
    if identity.grant is None or not authorization.lower().startswith("bearer "):
        raise Unauthorized("sign in with Authorization: Bearer TOKEN")
    response = await handle_identity(request)
    response.set_cookie(
        SESSION_COOKIE,
        authorization.split(" ", 1)[1].strip(),
        httponly=True,
        samesite="Strict",
        secure=request.secure,
        path="/",
    )
    return response


async def handle_session_end(request: web.Request) -> web.Response:
    """``DELETE /_api/v1/session``: the browser page signs out (the token itself stays valid)."""
    response = web.Response(status=204)
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


#: The largest body the token API reads.
MAX_TOKEN_REQUEST = 16 << 10


async def handle_token_list(request: web.Request) -> web.Response:
    """``GET /_api/v1/tokens[?all=true]``: active tokens (all with ``all``), newest first."""
    ctx = await _admin_context(request)
    every = request.query.get("all", "").lower() in ("1", "true", "yes")
    now = time.time()
    records = [r for r in await ctx.tokens.list() if every or r.state(now) == "active"]
    return web.json_response({"tokens": [token_json(r, now) for r in records]}, headers={"Cache-Control": "no-store"})


async def handle_token_create(request: web.Request) -> web.Response:
    """``POST /_api/v1/tokens`` ``{"subject", "actions", "prefixes"?, "expires_in"?, "description"?}``."""
    ctx = await _admin_context(request)
    document = await read_json_object(request, MAX_TOKEN_REQUEST, ctx.settings, what="the token request")
    unknown = sorted(set(document) - {"subject", "actions", "prefixes", "expires_in", "description"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    subject, actions = document.get("subject"), document.get("actions", ["read", "upload"])
    prefixes, lifetime = document.get("prefixes"), document.get("expires_in", DEFAULT_LIFETIME)
    description = document.get("description", "")
    if not isinstance(subject, str):
        raise BadRequest("subject must be a string")
    if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
        raise BadRequest("actions must be a list of strings")
    if prefixes is not None and (not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes)):
        raise BadRequest("prefixes must be a list of strings, or null for every prefix")
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
        raise BadRequest("expires_in must be a number of seconds")
    if not isinstance(description, str):
        raise BadRequest("description must be a string")
    try:
        seconds = float(lifetime)
    except OverflowError:  # an integer beyond any float: beyond any lifetime, refused below
        seconds = math.inf
    try:
        issued = await ctx.tokens.create(subject, actions, prefixes=prefixes, lifetime=seconds, description=description)
    except TokenError as exc:
        raise BadRequest(str(exc)) from None
    log.info(
        "token %s issued for %s by %s", issued.record.id, printable(issued.record.subject), await identify(request)
    )
    answer = {**token_json(issued.record, time.time()), "token": issued.token}
    return web.json_response(answer, status=201, headers={"Cache-Control": "no-store"})


async def handle_token_show(request: web.Request) -> web.Response:
    """``GET /_api/v1/tokens/{id}``."""
    ctx = await _admin_context(request)
    record = await ctx.tokens.get(request.match_info["id"])
    if record is None:
        raise NotFound("no such token")
    return web.json_response(token_json(record, time.time()), headers={"Cache-Control": "no-store"})


async def handle_token_revoke(request: web.Request) -> web.Response:
    """``DELETE /_api/v1/tokens/{id}``: revoked at once; answers the revoked record."""
    ctx = await _admin_context(request)
    record = await ctx.tokens.revoke(request.match_info["id"])
    if record is None:
        raise NotFound("no such token")
    log.info("token %s revoked by %s", record.id, await identify(request))
    return web.json_response(token_json(record, time.time()), headers={"Cache-Control": "no-store"})


async def _admin_context(request: web.Request) -> StoreContext:
    identity = await identify(request)
    if identity.anonymous:
        raise Unauthorized("sign in as an administrator")
    if not identity.admin:
        raise NotAuthorized("only administrators may manage tokens")
    return request.app[CONTEXT]


async def handle_transfer_status(request: web.Request) -> web.Response:
    """``GET /_api/v1/transfers/{key}``."""
    ctx = request.app[CONTEXT]
    transfer = await _owned_transfer(ctx, request)
    return web.json_response(transfer_status(transfer), headers={"Cache-Control": "no-store"})


async def handle_transfer_cancel(request: web.Request) -> web.Response:
    """``DELETE /_api/v1/transfers/{key}``: cancel; answers the final status."""
    ctx = request.app[CONTEXT]
    transfer = await _owned_transfer(ctx, request)
    if transfer.state is TransferState.FINISHED:
        raise Conflict("the transfer has finished; delete its files instead")
    if transfer.state is TransferState.EXPIRED:
        raise TransferExpired()
    if transfer.state is TransferState.OPEN:
        await ctx.lifecycle.cancel(transfer.key)
    after = await ctx.state.get(transfer.key)
    assert after is not None
    return web.json_response(transfer_status(after))


def transfer_status(transfer: Transfer) -> dict[str, Any]:
    """The JSON a client sees for ``transfer``."""
    return {
        "transfer_key": transfer.key,
        "prefix": transfer.prefix,
        "state": transfer.public_state(),
        "owner": transfer.owner.dn,
        "created_at": iso_time(transfer.created_at),
        "updated_at": iso_time(transfer.updated_at),
        "expires_at": iso_time(transfer.expires_at),
        "files": [
            {
                "num": f.num,
                "name": f.name,
                "size": f.size,
                "received": f.size if f.public_state(transfer.state) == "FINISHED" else f.received,
                "state": f.public_state(transfer.state),
                "md5": f.md5,
                "sha256": f.sha256,
                "error": f.error,
            }
            for f in transfer.files
        ],
    }


async def _owned_transfer(ctx: StoreContext, request: web.Request) -> Transfer:
    """The transfer the URL names, if the client owns it (or is an administrator)."""
    identity = await identify(request)
    key = request.match_info["key"]
    transfer = await ctx.state.get(key)
    if transfer is None:
        raise TransferNotFound()
    if not transfer.manageable_by(identity):
        raise IdentityMismatch()
    if transfer.state is TransferState.OPEN and transfer.expired(time.time()):
        # Its lifetime passed since the last sweep: expire it now, as the sweeper will.
        await ctx.lifecycle.expire()
        transfer = await ctx.state.get(key)
        if transfer is None:
            raise TransferNotFound()
    return transfer
