"""TransferServer and HTTPTransferServer: prefixes, routes, lifecycle.

An application creates a server, registers each prefix with a handler and
starts it; or it calls ``create_app()`` and runs the ``aiohttp`` application
itself. The server owns the URL shapes (aiohttp's router), turns every
:class:`~datastore.errors.DatastoreError` into a response in one middleware,
and on start-up opens the transfer registry in the state directory, clears
staging left by a crash and starts the sweeper that expires old keys.

Routes (prefix names match ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``; paths that
start with ``_`` belong to the server)::

    GET    /_api/v1/health
    POST   /{prefix}/manifest            register a transfer (INI or JSON)
    POST   /{prefix}/{key}/{num}         upload file num (raw body or form)
    PUT    /{prefix}/{key}/{num}         upload file num (raw body)
    GET    /{prefix}/                    JSON listing
    GET    /{prefix}/{name}              download (HEAD, Range, 304)
    DELETE /{prefix}/{name}              delete
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from .config import Settings, SettingsError, check_prefix
from .context import CONTEXT, Mount, StoreContext, render_error
from .download import handle_delete, handle_download, handle_listing
from .errors import DatastoreError, FileNotFound
from .handlers.interface import FileInfo, TransferHandler
from .handlers.legacy import LegacyHandler, LegacyHandlerAdapter
from .identity import DN_HEADER, Identity, identity_from_header
from .transfers import FileState, TransferRegistry
from .upload import handle_manifest, handle_upload, upload_expect_handler

log = logging.getLogger(__name__)

_PREFIX = "{prefix:[A-Za-z0-9][A-Za-z0-9._-]{0,127}}"

#: One line per request: client, request line, status, bytes, seconds.
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf'


class TransferServer(abc.ABC):
    """The file store: prefixes mapped to handlers, served over HTTP.

    Subclasses decide the transport and where identities come from
    (:class:`HTTPTransferServer`: the ``X-Client-DN`` header).
    """

    scheme = "http"

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self._mounts: dict[str, Mount] = {}
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._port: int | None = None

    # -- prefixes -----------------------------------------------------------

    def register_prefix(self, prefix: str, handler: TransferHandler | LegacyHandler) -> None:
        """Serve ``prefix`` through ``handler``.

        ``handler`` implements :class:`TransferHandler` or AccessGrid's
        CamelCase interface (wrapped in :class:`LegacyHandlerAdapter`). Its
        optional capabilities are detected here, once.
        """
        try:
            check_prefix(prefix)
        except SettingsError as exc:
            raise ValueError(str(exc)) from None
        if prefix in self._mounts:
            raise ValueError(f"prefix {prefix!r} is already registered")
        if isinstance(handler, TransferHandler):
            modern: TransferHandler = handler
        elif isinstance(handler, LegacyHandler):
            modern = LegacyHandlerAdapter(handler)
        else:
            raise TypeError(f"{type(handler).__name__} implements neither TransferHandler nor the AccessGrid interface")
        self._mounts[prefix] = Mount.detect(prefix, modern)

    def unregister_prefix(self, prefix: str) -> None:
        """Stop serving ``prefix``; running requests finish."""
        self._mounts.pop(prefix, None)

    def lookup_prefix(self, prefix: str) -> TransferHandler | None:
        """The handler registered for ``prefix``, if any."""
        mount = self._mounts.get(prefix)
        return mount.handler if mount is not None else None

    # -- identity -----------------------------------------------------------

    @abc.abstractmethod
    def identify(self, request: web.Request) -> Identity:
        """The identity behind ``request``; each transport defines where it comes from."""

    # -- the application ----------------------------------------------------

    def create_app(self) -> web.Application:
        """A fresh aiohttp application serving the registered prefixes.

        Its start-up opens the state directory; its clean-up closes the
        registry and every handler that can be closed.
        """
        app = web.Application(middlewares=[error_middleware])
        app.cleanup_ctx.append(self._lifecycle)
        app.router.add_get("/_api/v1/health", handle_health)
        app.router.add_post(f"/{_PREFIX}/manifest", handle_manifest)
        upload_path = f"/{_PREFIX}/{{key}}/{{num}}"
        app.router.add_post(upload_path, handle_upload, expect_handler=upload_expect_handler)
        app.router.add_put(upload_path, handle_upload, expect_handler=upload_expect_handler)
        app.router.add_get(f"/{_PREFIX}/", handle_listing)
        app.router.add_get(f"/{_PREFIX}", handle_add_slash)
        # Names may hold braces, which aiohttp's default segment pattern excludes.
        app.router.add_get(f"/{_PREFIX}/{{name:[^/]+}}", handle_download)
        app.router.add_delete(f"/{_PREFIX}/{{name:[^/]+}}", handle_delete)
        return app

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        state_dir = self.settings.effective_state_dir
        staging_dir = state_dir / "staging"
        await asyncio.to_thread(_prepare_state_dir, self.settings.root, staging_dir)
        registry = TransferRegistry(state_dir / "transfers.sqlite3")
        recovered = await registry.recover()
        if recovered:
            log.info("%d upload(s) were interrupted by a restart and may be sent again", recovered)
        ctx = StoreContext(
            settings=self.settings,
            registry=registry,
            mounts=self._mounts,
            staging_dir=staging_dir,
            identify=self.identify,
        )
        app[CONTEXT] = ctx
        sweeper = asyncio.create_task(_sweep(ctx), name="datastore-sweeper")
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await registry.close()
            for mount in list(self._mounts.values()):
                if mount.closer is not None:
                    await mount.closer.close()

    # -- running ------------------------------------------------------------

    def ssl_context(self) -> Any:
        """The TLS context for the listener; ``None`` for plain HTTP."""
        return None

    async def start(self) -> None:
        """Listen on the configured host and port (port 0 picks a free one)."""
        if self._runner is not None:
            raise RuntimeError("the server is already running")
        runner = web.AppRunner(
            self.create_app(),
            access_log=logging.getLogger("datastore.access"),
            access_log_format=ACCESS_LOG_FORMAT,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, self.settings.port, ssl_context=self.ssl_context())
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._site = runner, site
        self._port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening, let running requests end, close the state."""
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve until SIGINT or SIGTERM (blocking)."""
        asyncio.run(self._serve_until_signalled(on_ready))

    async def _serve_until_signalled(self, on_ready: Callable[[str], None] | None) -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await self.start()
        try:
            if on_ready is not None:
                on_ready(self.url)
            await stopping.wait()
        finally:
            await self.stop()

    @property
    def port(self) -> int:
        """The port listened on (the real one once started)."""
        return self._port if self._port is not None else self.settings.port

    @property
    def url(self) -> str:
        """The base URL clients use."""
        host = self.settings.host
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    def get_upload_descriptor(self, prefix: str) -> str:
        """The URL a client posts its manifest under (AccessGrid's upload descriptor)."""
        return f"{self.url}/{prefix}"

    def get_download_descriptor(self, prefix: str, name: str) -> str:
        """The download URL of ``name`` under ``prefix``."""
        return f"{self.url}/{prefix}/{quote(name, safe='')}"


class HTTPTransferServer(TransferServer):
    """Plain HTTP; the identity is the unauthenticated ``X-Client-DN`` header."""

    def identify(self, request: web.Request) -> Identity:
        return identity_from_header(request.headers.get(DN_HEADER))


# -- request handlers that belong to no other module --------------------------


async def handle_health(request: web.Request) -> web.Response:
    """``GET /_api/v1/health``: 200 once the state is open."""
    ctx = request.app[CONTEXT]
    return web.json_response({"status": "ok", "prefixes": sorted(ctx.mounts)})


async def handle_add_slash(request: web.Request) -> web.Response:
    """``GET /{prefix}`` -> ``/{prefix}/``."""
    request.app[CONTEXT].mount(request.match_info["prefix"])
    raise web.HTTPMovedPermanently(location=f"/{request.match_info['prefix']}/")


# -- errors -------------------------------------------------------------------


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Render every DatastoreError, and anything unexpected as a 500."""
    try:
        return await handler(request)
    except DatastoreError as exc:
        return render_error(request, exc)
    except web.HTTPNotFound:
        # A path of none of our shapes: AccessGrid answered these "File not found".
        return render_error(request, FileNotFound())
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return render_error(request, DatastoreError())


# -- state --------------------------------------------------------------------


def _prepare_state_dir(root: Path, staging_dir: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if staging_dir.exists():
        # Nothing is uploading in a process that is only starting.
        shutil.rmtree(staging_dir)
    staging_dir.mkdir(parents=True)


async def _sweep(ctx: StoreContext) -> None:
    """Expire transfer keys past their lifetime and release their reservations."""
    interval = max(0.05, min(60.0, ctx.settings.key_lifetime / 4))
    while True:
        await asyncio.sleep(interval)
        try:
            await expire_transfers(ctx)
        except Exception:
            log.exception("sweeping expired transfers failed")


async def expire_transfers(ctx: StoreContext, now: float | None = None) -> int:
    """Expire every transfer past its lifetime now; return how many."""
    expired = await ctx.registry.expire_due(time.time() if now is None else now)
    for transfer in expired:
        mount = ctx.mounts.get(transfer.prefix)
        log.info("transfer %s… for /%s expired", transfer.key[:8], transfer.prefix)
        if mount is None:
            continue
        for file in transfer.files:
            if file.state is FileState.RESERVED:
                info = FileInfo(file.name, file.size, file.md5, file.sha256)
                try:
                    await mount.handler.cancel_upload(transfer.owner, info)
                except Exception:
                    log.exception("cancel_upload failed while expiring a transfer")
    return len(expired)
