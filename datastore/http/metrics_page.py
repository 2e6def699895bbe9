"""``GET /_api/v1/metrics``: the store's metrics in the Prometheus text format, and who may read them.

The page tells how busy the store is, how much it holds and how much disk is left: operational data,
for administrators and for scrapers given a token issued for ``metrics`` (``datastore tokens create
prometheus --actions metrics``), which allows nothing else. The ``metrics_access`` setting opens it
further: ``loopback`` to anyone connecting from the loopback address (a Prometheus on the same host;
behind a reverse proxy on the same host, that is everyone), ``anyone`` to every client.

The metrics themselves are :mod:`datastore.metrics`'s; this handler measures what the page reports
of the store's state when it is asked (staged and reserved bytes, the disk), off the event loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from aiohttp import web

from .. import metrics
from ..errors import NotAuthorized, Unauthorized
from .context import CONTEXT, client_address, identify

#: Where the page is served.
METRICS_PATH = "/_api/v1/metrics"


async def handle_metrics(request: web.Request) -> web.Response:
    """``GET /_api/v1/metrics``."""
    ctx = request.app[CONTEXT]
    await _authorize(request, ctx.settings.metrics_access)
    reserved = await ctx.state.reserved_bytes()
    page = await asyncio.to_thread(_page, ctx.lifecycle.staging_dir, reserved)
    return web.Response(body=page, headers={"Content-Type": metrics.CONTENT_TYPE, "Cache-Control": "no-store"})


async def _authorize(request: web.Request, access: str) -> None:
    """Return if the client may read the page; else 401 (anonymous) or 403."""
    if access == "anyone" or (access == "loopback" and _from_loopback(request)):
        return
    identity = await identify(request)
    if identity.admin or (identity.grant is not None and identity.grant.covers("metrics", None)):
        return
    if identity.anonymous:
        raise Unauthorized("sign in as an administrator, or with a token issued for metrics")
    raise NotAuthorized("only administrators, and tokens issued for metrics, may read the metrics")


def _from_loopback(request: web.Request) -> bool:
    address = client_address(request)
    return address is not None and address.is_loopback


def _page(staging_dir: Path, reserved: int) -> bytes:
    """The page, with the staging directory and the disk measured now (in a thread: it reads the disk)."""
    usage = shutil.disk_usage(staging_dir if staging_dir.exists() else staging_dir.parent)
    gauges = metrics.StoreGauges(
        staged_bytes=_staged_bytes(staging_dir),
        reserved_bytes=reserved,
        disk_free_bytes=usage.free,
        disk_size_bytes=usage.total,
    )
    return metrics.render(gauges)


def _staged_bytes(staging_dir: Path) -> int:
    """The bytes of the files in the staging directory (one stat each; a file gone meanwhile counts 0)."""
    total = 0
    try:
        with os.scandir(staging_dir) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return 0
    return total
