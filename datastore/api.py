"""The control plane under ``/_api/v1/``: health, and the lifecycle of transfers.

``GET /_api/v1/transfers/{key}`` reports a transfer's state (``PENDING``,
``IN_PROGRESS``, ``FINISHED``, ``FAILED``, ``CANCELLED``, ``EXPIRED``) with
each file's name, size, bytes received and state; ``DELETE`` cancels it:
running uploads stop, staged bytes go, reservations are released, and the
key accepts nothing more. Only the identity that created a transfer may see
or cancel it.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .context import CONTEXT, StoreContext
from .errors import Conflict, IdentityMismatch, TransferExpired, TransferNotFound
from .transfers import Transfer, TransferState
from .upload import cancel_transfer, expire_transfers, iso_time


async def handle_health(request: web.Request) -> web.Response:
    """``GET /_api/v1/health``: 200 once the state is open; ``worker`` is the answering worker's number."""
    ctx = request.app[CONTEXT]
    return web.json_response({"status": "ok", "prefixes": sorted(ctx.mounts), "worker": ctx.worker_index})


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
        await cancel_transfer(ctx, transfer.key)
    after = await ctx.registry.lookup(transfer.key)
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
    identity = ctx.identify(request)
    key = request.match_info["key"]
    transfer = await ctx.registry.lookup(key)
    if transfer is None:
        raise TransferNotFound()
    if transfer.owner != identity:
        raise IdentityMismatch()
    if transfer.state is TransferState.OPEN and transfer.expired(time.time()):
        # Its lifetime passed since the last sweep: expire it now, as the sweeper will.
        await expire_transfers(ctx)
        transfer = await ctx.registry.lookup(key)
        if transfer is None:
            raise TransferNotFound()
    return transfer
