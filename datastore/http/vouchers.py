"""Vouchers and invitations: the API under ``/_api/v1/invitations``, and spending a voucher's byte
budget as bytes arrive or leave.

A store that wants to copy files into (or out of) this one without a credential for it asks for an
invitation (``POST /_api/v1/invitations``: the prefix, push or pull, the names, their size, who asks).
The answer is a voucher-to-be: a bearer token of this store's kind (``security/tokens.py``), scoped to
that prefix, direction and names, with a byte budget, that works for nothing until someone who may
upload to the prefix (or an administrator) accepts it. The asker follows the answer with the token
itself (``GET /_api/v1/invitations/{id}``); accepted, the same token is its voucher; declined or
unanswered within ``invitation_max_wait``, it never works. Answerers list, accept (with a budget and
a lifetime), decline, extend (more bytes) and revoke.

A voucher is checked where any token is (its actions, prefix and names, at the manifest and at each
request), and its budget as bytes arrive: each upload request reserves what it may send, appends at
most that, and gives back what it did not use; when nothing is left the request ends with 403
``voucher_exhausted`` (the bytes that arrived are kept) until the issuer extends the voucher.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from ..errors import (
    BadRequest,
    Conflict,
    NotAuthorized,
    NotFound,
    Unauthorized,
    VoucherExhausted,
)
from ..protocol.names import validate_name
from ..protocol.timestamps import iso_time
from ..security.identity import Identity
from ..security.policy import Action
from ..security.tokens import DEFAULT_LIFETIME, TokenError, TokenRecord
from .bodies import read_json_object
from .context import CONTEXT, StoreContext, client_key, identify

#: Largest invitation request (names and all).
MAX_INVITATION_REQUEST = 4 << 20
#: Most names one invitation may cover.
MAX_INVITATION_NAMES = 10_000
_EXHAUSTED = "the voucher's byte budget is used up: its issuer may extend it"

Limit = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]


# -- spending a budget ------------------------------------------------------------------------


@asynccontextmanager
async def spending(ctx: StoreContext, identity: Identity, wanted: int, *, whole: bool) -> AsyncIterator[Limit]:
    """Reserve up to ``wanted`` bytes of ``identity``'s voucher budget for one request; yields what
    limits the request's chunks to them (VoucherExhausted beyond, after the bytes that fit). A
    ``whole`` upload needs all ``wanted`` at once, and gets them back if it fails. No voucher with a
    budget: nothing is counted."""
    grant = identity.grant
    if grant is None or grant.budget is None:
        yield _unlimited
        return
    granted = await ctx.tokens.reserve(grant.token_id, wanted)
    moved = 0

    async def within(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        nonlocal moved
        async for chunk in chunks:
            room = granted - moved
            if len(chunk) > room:
                if room:
                    moved += room
                    yield chunk[:room]
                raise VoucherExhausted(_EXHAUSTED)
            moved += len(chunk)
            yield chunk

    ok = False
    try:
        if (whole and granted < wanted) or (wanted > 0 and granted == 0):
            raise VoucherExhausted(_EXHAUSTED)
        yield within
        ok = True
    finally:
        await ctx.tokens.release(grant.token_id, granted - (moved if ok or not whole else 0))


async def charge(ctx: StoreContext, identity: Identity, size: int) -> None:
    """Count a download of ``size`` bytes against ``identity``'s voucher budget, or VoucherExhausted."""
    grant = identity.grant
    if grant is None or grant.budget is None:
        return
    granted = await ctx.tokens.reserve(grant.token_id, size)
    if granted < size:
        await ctx.tokens.release(grant.token_id, granted)
        raise VoucherExhausted(_EXHAUSTED)


def _unlimited(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    return chunks


# -- the invitations API ----------------------------------------------------------------------


async def handle_invite(request: web.Request) -> web.Response:
    """``POST /_api/v1/invitations``: ask this store for a voucher (no credential needed)."""
    ctx = request.app[CONTEXT]
    identity = await identify(request)
    document = await read_json_object(request, MAX_INVITATION_REQUEST, ctx.settings, what="the invitation")
    unknown = sorted(set(document) - {"prefix", "direction", "names", "size", "requester", "wait"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    prefix = document.get("prefix")
    if not isinstance(prefix, str):
        raise BadRequest("prefix must be the prefix's name")
    ctx.mount(prefix)
    direction = document.get("direction", "push")
    if direction not in ("push", "pull"):
        raise BadRequest("direction must be push (into this store) or pull (out of it)")
    names = document.get("names")
    if not isinstance(names, list) or not 0 < len(names) <= MAX_INVITATION_NAMES:
        raise BadRequest(f"names must list 1 to {MAX_INVITATION_NAMES} file names")
    checked = {validate_name(name) for name in names}
    size = document.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 2**62:
        raise BadRequest("size must be the bytes to move, in all")
    requester = document.get("requester", "")
    if not isinstance(requester, str):
        raise BadRequest("requester must say who asks")
    wait = document.get("wait", ctx.settings.invitation_max_wait)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 < wait <= ctx.settings.invitation_max_wait:
        raise BadRequest(f"wait must be seconds up to {ctx.settings.invitation_max_wait:g}")
    try:
        issued = await ctx.tokens.invite(
            prefix=prefix,
            action="upload" if direction == "push" else "read",
            names=checked,
            size=size,
            requester=requester or str(identity),
            wait=float(wait),
            client=client_key(request, identity),
            limit=ctx.settings.max_invitations_per_client,
        )
    except TokenError as exc:
        raise BadRequest(str(exc)) from None
    answer = {**invitation_json(issued.record, time.time()), "token": issued.token}
    return web.json_response(answer, status=201, headers={"Cache-Control": "no-store", "Location": answer["url"]})


async def handle_invitations(request: web.Request) -> web.Response:
    """``GET /_api/v1/invitations``: those the client may answer, newest first."""
    ctx = request.app[CONTEXT]
    identity = await _answerer(request)
    now = time.time()
    shown = [invitation_json(r, now) for r in await ctx.tokens.invitations() if _may_answer(ctx, identity, r)]
    return web.json_response({"invitations": shown}, headers={"Cache-Control": "no-store"})


async def handle_invitation(request: web.Request) -> web.Response:
    """``GET /_api/v1/invitations/{id}``: to those who may answer it, and to its asker (who presents the
    invitation's token, pending or not)."""
    ctx = request.app[CONTEXT]
    token = _bearer(request)
    if token is not None:
        record = await ctx.tokens.lookup(token)
        if record is not None and record.id == request.match_info["id"] and record.invitation is not None:
            return web.json_response(invitation_json(record, time.time()), headers={"Cache-Control": "no-store"})
    record = await _answerable(request, await _answerer(request))
    return web.json_response(invitation_json(record, time.time()), headers={"Cache-Control": "no-store"})


async def handle_answer(request: web.Request) -> web.Response:
    """``POST /_api/v1/invitations/{id}/{accept|decline|extend}``."""
    ctx = request.app[CONTEXT]
    identity = await _answerer(request)
    record = await _answerable(request, identity)
    verb = request.match_info["answer"]
    document = await read_json_object(request, 4096, ctx.settings)
    try:
        if verb in ("accept", "decline"):
            budget = document.get("budget")
            lifetime = document.get("lifetime", DEFAULT_LIFETIME)
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
                raise BadRequest("budget must be a number of bytes")
            if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
                raise BadRequest("lifetime must be a number of seconds")
            try:
                seconds = float(lifetime)
            except OverflowError:  # an integer beyond any float: past the longest lifetime too
                raise BadRequest("lifetime is too long") from None
            after = await ctx.tokens.answer(
                record.id, accept=verb == "accept", by=str(identity), budget=budget, lifetime=seconds
            )
            if after is None:
                shown = invitation_json(record, time.time())["state"]
                raise Conflict(f"the invitation is {shown}: only a pending one can be answered")
        elif verb == "extend":
            more = document.get("bytes")
            if isinstance(more, bool) or not isinstance(more, int):
                raise BadRequest('send {"bytes": N}')
            after = await ctx.tokens.extend(record.id, more)
            if after is None:
                shown = invitation_json(record, time.time())["state"]
                raise Conflict(f"the voucher is {shown}: only an accepted one with a budget grows")
        else:
            raise NotFound(f"no such answer {verb!r}: accept, decline or extend")
    except TokenError as exc:
        raise BadRequest(str(exc)) from None
    return web.json_response(invitation_json(after, time.time()), headers={"Cache-Control": "no-store"})


async def handle_revoke_invitation(request: web.Request) -> web.Response:
    """``DELETE /_api/v1/invitations/{id}``: the voucher (or the invitation) stops working at once."""
    ctx = request.app[CONTEXT]
    record = await _answerable(request, await _answerer(request))
    revoked = await ctx.tokens.revoke(record.id)
    assert revoked is not None
    return web.json_response(invitation_json(revoked, time.time()), headers={"Cache-Control": "no-store"})


def invitation_json(record: TokenRecord, now: float) -> dict[str, Any]:
    """An invitation as its asker and its answerers see it (never its token)."""
    state = record.state(now)
    return {
        "id": record.id,
        "url": f"/_api/v1/invitations/{record.id}",
        "state": {"active": "ACCEPTED"}.get(state, state.upper()),
        "prefix": next(iter(record.prefixes or []), None),
        "direction": "push" if "upload" in record.actions else "pull",
        "names": sorted(record.names or []),
        "budget": record.budget,
        "used": record.used,
        "left": record.left,
        "requester": record.requester,
        "created_at": iso_time(record.created_at),
        "answer_by": None if record.answer_by is None else iso_time(record.answer_by),
        "answered_by": record.answered_by,
        "answered_at": None if record.answered_at is None else iso_time(record.answered_at),
        "expires_at": iso_time(record.expires_at),
    }


async def _answerer(request: web.Request) -> Identity:
    identity = await identify(request)
    if identity.anonymous:
        raise Unauthorized("sign in to answer invitations")
    grant = identity.grant
    if grant is not None and (grant.names is not None or grant.budget is not None):
        raise NotAuthorized("a voucher answers no invitation")
    return identity


async def _answerable(request: web.Request, identity: Identity) -> TokenRecord:
    ctx = request.app[CONTEXT]
    record = await ctx.tokens.get(request.match_info["id"])
    if record is None or record.invitation is None:
        raise NotFound("no such invitation")
    if not _may_answer(ctx, identity, record):
        raise NotAuthorized("only those who may upload to the prefix (or administrators) answer its invitations")
    return record


def _may_answer(ctx: StoreContext, identity: Identity, record: TokenRecord) -> bool:
    """Administrators, and whoever may upload to the invitation's prefix, answer it."""
    if identity.admin:
        return True
    prefix = next(iter(record.prefixes or []), None)
    mount = ctx.mounts.get(prefix) if prefix is not None else None
    return mount is not None and mount.policy.allows(identity, Action.UPLOAD, mount.prefix)


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
