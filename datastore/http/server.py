"""TransferServer and HTTPTransferServer: prefixes, routes, lifecycle.

An application creates a server, registers each prefix with a handler and
starts it; or it calls ``create_app()`` and runs the ``aiohttp`` application
itself. The server owns the URL shapes (aiohttp's router), establishes who
each request is from (``TransferServer.identify``: a certificate, a token, a
trusted header, or nobody), refuses state changes a browser sends for
another site, turns every :class:`~datastore.errors.DatastoreError` into a
response in one middleware, ends a connection whose request body was not all read after its
answer with a lingering close (``lingering.py``), times every request for the metrics (by route
pattern, method and status class), names its node in every answer
(``X-Datastore-Node``), and on start-up opens the state store (through the lifecycle) and
token store in the state directory, clears staging left by a crash and
starts the sweeper that expires old keys. What a connection may do before
it carries a request is ``connections.py``'s.

Routes (prefix names match ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``; paths that
start with ``_`` belong to the server)::

    GET     /_api/v1/openapi.json           the OpenAPI 3.1 document of all of this (openapi.py)
    GET     /_api/v1/health                 the node, its state store and storage (health.py; 503 if failing)
    GET     /_api/v1/metrics                the metrics, Prometheus text format (metrics_page.py)
    GET     /_api/v1/identity               who the store takes the client for
    POST    /_api/v1/session                the browser page signs in with a token (a cookie)
    DELETE  /_api/v1/session                and out
    GET     /_api/v1/tokens                 bearer tokens (administrators)
    POST    /_api/v1/tokens                 issue one (administrators)
    GET     /_api/v1/tokens/{id}            show one (administrators)
    DELETE  /_api/v1/tokens/{id}            revoke one (administrators)
    GET     /_api/v1/events                 the events of the prefixes the client may list (SSE)
    GET     /_api/v1/transfers/{key}/events one transfer's events (SSE; owner or administrator)
    GET     /_api/v1/transfers/{key}        a transfer's state (owner or administrator)
    DELETE  /_api/v1/transfers/{key}        cancel it
    GET     /_api/v1/invitations            invitations the client may answer (vouchers.py)
    POST    /_api/v1/invitations            ask for one (anyone): a voucher-to-be
    GET     /_api/v1/invitations/{id}       one (its answerers, or its asker with its token)
    DELETE  /_api/v1/invitations/{id}       revoke it
    POST    /_api/v1/invitations/{id}/{answer} accept, decline or extend it
    GET     /_api/v1/jobs                   the client's transfer jobs (jobs.py)
    POST    /_api/v1/jobs                   submit one
    GET     /_api/v1/jobs/events            the events of the client's jobs (SSE)
    GET     /_api/v1/jobs/{id}              a job's state, files and attempts (owner or administrator)
    PATCH   /_api/v1/jobs/{id}              change its priority
    DELETE  /_api/v1/jobs/{id}              clear it
    GET     /_api/v1/jobs/{id}/events       its events (SSE)
    POST    /_api/v1/jobs/{id}/{step}       commit, pause, resume, stop or retry it
    GET     /_static/{asset}                the browser page's script and style
    POST    /{prefix}/manifest              register a transfer (INI or JSON)
    POST    /{prefix}/{key}/{num}           upload file num (raw body or form)
    PUT     /{prefix}/{key}/{num}           upload file num (raw body)
    HEAD, PATCH, DELETE, OPTIONS
            /{prefix}/{key}/{num}           tus: offset, append, terminate, capabilities
    POST    /{prefix}/                      tus creation of a one-file transfer
    (a tus request with X-HTTP-Method-Override is routed as the method it names)
    GET     /{prefix}/                      the browser page, or the JSON listing
    GET     /{prefix}/{name}                download (HEAD, Range, 304)
    DELETE  /{prefix}/{name}                delete
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web

from .. import metrics
from ..config import PREFIX_PATTERN, Settings, SettingsError, check_prefix
from ..errors import BadRequest, CrossSiteRequest, DatastoreError, FileNotFound, InvalidToken, NotAuthorized
from ..handlers.directory import DirectoryHandler
from ..handlers.interface import TransferHandler
from ..handlers.legacy import LegacyHandler, LegacyHandlerAdapter
from ..handlers.mounts import Mount
from ..jobs.runner import JobRunner
from ..lifecycle.events import Callback, EventBus
from ..lifecycle.machine import Lifecycle, holder_id
from ..lifecycle.states import Event
from ..security.identity import ANONYMOUS, DN_HEADER, Identity, identity_from_header
from ..security.logsafe import redact
from ..security.policy import Policy
from ..security.tls import CrlReloader, administrators, certificate_identity, peer_certificate, server_context
from ..security.tokens import open_token_store
from ..state import open_catalogue, open_state, timing
from ..state.interface import Signal, SignalKind
from .api import (
    SESSION_COOKIE,
    handle_identity,
    handle_session_end,
    handle_session_start,
    handle_token_create,
    handle_token_list,
    handle_token_revoke,
    handle_token_show,
    handle_transfer_cancel,
    handle_transfer_status,
)
from .bodies import MemoryBudget
from .connections import HTTP_LOG, AccessLogger, ConnectionGate, GatedServer, StoreRunner, bind_socket, connection_cap
from .context import CONTEXT, StoreContext, render_error
from .download import handle_delete, handle_download, handle_listing
from .health import HEALTH, HealthChecks, handle_health
from .hooks import Hook
from .jobs import (
    handle_all_job_events,
    handle_job_clear,
    handle_job_events,
    handle_job_list,
    handle_job_priority,
    handle_job_status,
    handle_job_step,
    handle_job_submit,
)
from .lingering import LINGER_TIME, lingering_middleware
from .metrics_page import METRICS_PATH, handle_metrics
from .openapi import OPENAPI_PATH, handle_openapi
from .page import handle_asset
from .sse import handle_events, handle_transfer_events
from .tus import handle_create, handle_head, handle_options, handle_patch, handle_terminate
from .upload import handle_manifest, handle_upload, upload_expect_handler
from .vouchers import (
    handle_answer,
    handle_invitation,
    handle_invitations,
    handle_invite,
    handle_revoke_invitation,
)

log = logging.getLogger(__name__)

_PREFIX = f"{{prefix:{PREFIX_PATTERN}}}"

#: Seconds between looks at the event log for other processes' events (this process's are read at once).
EVENT_POLL = 5.0
EVENT_POLL_SHARED = 0.2

#: aiohttp's per-connection read buffer (its default is 256 KiB): a request body's stream
#: stops reading from the socket beyond twice this. An upload waiting for a buffer of the
#: budget (:class:`staging.BufferBudget`) leaves the rest of its body in the kernel.
READ_BUFSIZE = 64 << 10


@dataclass(frozen=True, slots=True)
class Listener:
    """One socket the store listens on; with an SSL context it speaks TLS."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None

    @property
    def scheme(self) -> str:
        """``https`` for a TLS listener, else ``http``."""
        return "https" if self.ssl_context is not None else "http"


class TransferServer(abc.ABC):
    """The file store: prefixes mapped to handlers, served on one or more listeners.

    Subclasses decide the listeners (:class:`HTTPTransferServer`: plain
    HTTP; :class:`HTTPSTransferServer`: TLS with client certificates, and
    optionally a plain listener beside it). On a TLS connection the identity
    is the verified certificate; on a plain one a bearer token the store
    issued, or (only with ``trust_client_dn``) the asserted ``X-Client-DN``
    header; else the client is anonymous.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self._mounts: dict[str, Mount] = {}
        self._runner: web.AppRunner | None = None
        self._bound: list[Listener] = []
        #: Set by ``serve --workers N`` (datastore.http.workers) in each worker process:
        #: its number, and that other processes share the port and the state.
        self.worker_index = 0
        self.shared_state = False
        #: The contexts of the applications now running (one, unless an embedder runs several).
        self._contexts: list[StoreContext] = []
        #: The events of the store, for subscribers (:meth:`subscribe`) and the SSE streams.
        self.events = EventBus()
        #: How to unsubscribe each prefix's handler that follows its events (``on_event``).
        self._observers: dict[str, Callable[[], None]] = {}

    @abc.abstractmethod
    def listeners(self) -> list[Listener]:
        """Where to listen, the first being the main one (its URL is ``url``)."""

    # -- prefixes -----------------------------------------------------------

    def register_prefix(
        self, prefix: str, handler: TransferHandler | LegacyHandler, *, policy: Policy | None = None
    ) -> None:
        """Serve ``prefix`` through ``handler`` under ``policy``.

        ``handler`` implements :class:`TransferHandler` or AccessGrid's
        CamelCase interface (wrapped in :class:`LegacyHandlerAdapter`). Its
        optional capabilities are detected here, once. ``policy`` defaults to
        the settings' policy for the prefix (``[policy.PREFIX]``, else
        ``[policy]``).
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
        mount = Mount.detect(prefix, modern, policy if policy is not None else self.settings.policy_for(prefix))
        self._mounts[prefix] = mount
        if mount.observer is not None:
            self._observers[prefix] = self.subscribe(mount.observer.on_event, prefix)

    def unregister_prefix(self, prefix: str) -> None:
        """Stop serving ``prefix``; running requests finish."""
        self._mounts.pop(prefix, None)
        unsubscribe = self._observers.pop(prefix, None)
        if unsubscribe is not None:
            unsubscribe()

    def subscribe(self, callback: Callback, prefix: str | None = None) -> Callable[[], None]:
        """Call ``callback(event)`` after every committed change of the store (or of ``prefix``), in
        order, once each; returns a function that unsubscribes.

        ``callback`` may be a plain or a coroutine function. It runs in a task of its own: a slow
        one never slows an upload (it is dropped, with a logged warning, once it falls far behind),
        and one that raises is logged and called again with the next event.
        """

        def wants(event: Event) -> bool:
            return prefix is None or event.prefix == prefix

        return self.events.subscribe(callback, wants)

    def lookup_prefix(self, prefix: str) -> TransferHandler | None:
        """The handler registered for ``prefix``, if any."""
        mount = self._mounts.get(prefix)
        return mount.handler if mount is not None else None

    # -- identity -----------------------------------------------------------

    async def identify(self, request: web.Request) -> Identity:
        """The identity behind ``request``, checked anew for every request.

        On TLS, the verified client certificate (revocation and expiry
        checked again; ``Authorization`` and ``X-Client-DN`` ignored). On
        plain HTTP, a bearer token (401 if it is unknown, expired or
        revoked) from ``Authorization`` or the browser page's session cookie,
        else ``X-Client-DN`` if the operator trusts it (never from a browser:
        a page of any site that a DNS name rebinds to this store could send
        one), else anonymous.
        ``request.secure`` is fixed when the request arrives, so a TLS
        request never falls back to the others.
        """
        if request.secure:
            transport = request.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
            if ssl_object is None:
                raise NotAuthorized("the TLS connection is gone")
            return self.certificate_identity(ssl_object)
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise InvalidToken("send Authorization: Bearer TOKEN")
            return await _token_identity(request, token.strip())
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            return await _token_identity(request, session)
        if self.settings.trust_client_dn and not from_a_browser(request):
            return identity_from_header(request.headers.get(DN_HEADER))
        return ANONYMOUS

    def certificate_identity(self, ssl_object: object) -> Identity:
        """The identity of a TLS peer (only the TLS server has any)."""
        raise NotAuthorized("this server speaks no TLS")

    async def reload(self) -> None:  # noqa: B027 - a hook; plain HTTP has nothing to reload
        """Re-read what can change without a restart (SIGHUP). Nothing, for plain HTTP."""

    @property
    def shares_state(self) -> bool:
        """Whether other processes may use the state at once: workers of this node, or (a PostgreSQL
        state) other nodes."""
        return self.shared_state or self.settings.state_kind == "postgresql"

    # -- the application ----------------------------------------------------

    def create_app(self) -> web.Application:
        """A fresh aiohttp application serving the registered prefixes.

        Its start-up opens the state directory; its clean-up closes the
        registry and every handler that can be closed.
        """
        app = web.Application(
            middlewares=[
                lingering_middleware,
                metrics_middleware,
                error_middleware,
                cross_site_middleware,
                method_override_middleware,
            ],
            # Whoever runs the app (our runner, a test server, an embedding application) logs requests
            # through AccessLogger, which never writes a transfer key whole, and lingers after an answer
            # that no middleware saw as lingering.py does after the others.
            handler_args={
                "read_bufsize": READ_BUFSIZE,
                "lingering_time": LINGER_TIME,
                "access_log_class": AccessLogger,
                "access_log": logging.getLogger("datastore.access"),
                "logger": HTTP_LOG,
            },
        )
        app[HEALTH] = HealthChecks(self.settings, self.settings.effective_state_dir / "staging")
        app.cleanup_ctx.append(self._lifecycle)
        # Event streams never end by themselves: they end when the store stops taking requests.
        app.on_shutdown.append(self._end_streams)
        app.on_response_prepare.append(_observe_request)
        app.on_response_prepare.append(_node_header(self.settings.effective_node_id))
        app.router.add_get(OPENAPI_PATH, handle_openapi)
        app.router.add_get("/_api/v1/health", handle_health)
        app.router.add_get(METRICS_PATH, handle_metrics)
        app.router.add_get("/_api/v1/identity", handle_identity)
        app.router.add_post("/_api/v1/session", handle_session_start)
        app.router.add_delete("/_api/v1/session", handle_session_end)
        app.router.add_get("/_api/v1/tokens", handle_token_list)
        app.router.add_post("/_api/v1/tokens", handle_token_create)
        app.router.add_get("/_api/v1/tokens/{id}", handle_token_show)
        app.router.add_delete("/_api/v1/tokens/{id}", handle_token_revoke)
        app.router.add_get("/_static/{asset}", handle_asset)
        app.router.add_get("/_api/v1/events", handle_events)
        app.router.add_get("/_api/v1/transfers/{key}/events", handle_transfer_events)
        app.router.add_get("/_api/v1/transfers/{key}", handle_transfer_status)
        app.router.add_delete("/_api/v1/transfers/{key}", handle_transfer_cancel)
        app.router.add_get("/_api/v1/invitations", handle_invitations)
        app.router.add_post("/_api/v1/invitations", handle_invite)
        app.router.add_get("/_api/v1/invitations/{id}", handle_invitation)
        app.router.add_delete("/_api/v1/invitations/{id}", handle_revoke_invitation)
        app.router.add_post("/_api/v1/invitations/{id}/{answer}", handle_answer)
        app.router.add_get("/_api/v1/jobs", handle_job_list)
        app.router.add_post("/_api/v1/jobs", handle_job_submit)
        app.router.add_get("/_api/v1/jobs/events", handle_all_job_events)
        app.router.add_get("/_api/v1/jobs/{id}", handle_job_status)
        app.router.add_patch("/_api/v1/jobs/{id}", handle_job_priority)
        app.router.add_delete("/_api/v1/jobs/{id}", handle_job_clear)
        app.router.add_get("/_api/v1/jobs/{id}/events", handle_job_events)
        app.router.add_post("/_api/v1/jobs/{id}/{step}", handle_job_step)
        # Downloads first: aiohttp tries the /{prefix}... patterns in this order, and
        # no other one takes GET, HEAD or DELETE of a /{prefix}/{name} path.
        # Names may hold braces, which aiohttp's default segment pattern excludes.
        app.router.add_get(f"/{_PREFIX}/{{name:[^/]+}}", handle_download)
        app.router.add_delete(f"/{_PREFIX}/{{name:[^/]+}}", handle_delete)
        app.router.add_post(f"/{_PREFIX}/manifest", handle_manifest)
        upload_path = f"/{_PREFIX}/{{key}}/{{num}}"
        app.router.add_post(upload_path, handle_upload, expect_handler=_timed(_upload_expect_handler))
        app.router.add_put(upload_path, handle_upload, expect_handler=_timed(upload_expect_handler))
        app.router.add_route("HEAD", upload_path, handle_head)
        app.router.add_patch(upload_path, handle_patch)
        app.router.add_delete(upload_path, handle_terminate)
        app.router.add_route("OPTIONS", upload_path, handle_options)
        app.router.add_post(f"/{_PREFIX}/", handle_create)
        app.router.add_route("OPTIONS", f"/{_PREFIX}/", handle_options)
        app.router.add_get(f"/{_PREFIX}/", handle_listing)
        app.router.add_get(f"/{_PREFIX}", handle_add_slash)
        return app

    def _heard(self, ctx: StoreContext, signal: Signal) -> None:
        """Another process changed the state: the event bus, the uploads and the job runner look."""
        if signal.kind in (SignalKind.EVENTS, SignalKind.MISSED):
            self.events.wake()
        ctx.lifecycle.heard(signal)
        if ctx.jobs is not None:
            ctx.jobs.heard(signal)

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        state_dir = self.settings.effective_state_dir
        await asyncio.to_thread(self.settings.root.mkdir, parents=True, exist_ok=True)
        # Made here, not by the recovery (which a shared state skips) nor by the SQLite files.
        await asyncio.to_thread((state_dir / "staging").mkdir, parents=True, exist_ok=True)
        state = open_state(self.settings.effective_state_url)
        tokens = open_token_store(self.settings)
        lifecycle = Lifecycle(
            self.settings,
            state,
            self._mounts,
            state_dir / "staging",
            holder=holder_id(self.settings.effective_node_id, os.getpid()),
            shared=self.shares_state,
            on_change=self.events.wake,
        )
        if not self.shares_state:
            # With several workers, the supervisor recovered before starting them; on a state other
            # nodes share, a dead process's leases run out and whoever sweeps first reaps them.
            await lifecycle.recover()
        ctx = StoreContext(
            settings=self.settings,
            lifecycle=lifecycle,
            tokens=tokens,
            authenticate=self.identify,
            events=self.events,
            hooks=[
                Hook(url, index, self.settings, state, lifecycle.holder)
                for index, url in enumerate(self.settings.hook_urls)
            ],
            worker_index=self.worker_index,
            manifest_memory=MemoryBudget(self.settings.max_manifest_memory),
        )
        app[CONTEXT] = ctx
        self._contexts.append(ctx)
        ctx.jobs = JobRunner(lifecycle, self.settings)
        # What other processes change reaches this one as signals where the state has them
        # (PostgreSQL); else, with others sharing the state, it is looked for every EVENT_POLL_SHARED.
        lifecycle.signalled = await state.listen(functools.partial(self._heard, ctx))
        polling = self.shares_state and not lifecycle.signalled
        await self.events.start(state, poll_interval=EVENT_POLL_SHARED if polling else EVENT_POLL)
        tasks = [
            asyncio.create_task(_sweep(lifecycle), name="datastore-sweeper"),
            asyncio.create_task(ctx.jobs.run(), name="datastore-jobs"),
            asyncio.create_task(lifecycle.digester.run(), name="datastore-digests"),
        ]
        tasks.extend(asyncio.create_task(hook.run(self.events), name=hook.label) for hook in ctx.hooks)
        tasks.extend(asyncio.create_task(job, name="datastore-periodic") for job in self.periodic_jobs())
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.events.stop()
            self._contexts.remove(ctx)
            await state.close()
            await tokens.close()
            for mount in list(self._mounts.values()):
                if mount.closer is not None:
                    await mount.closer.close()

    async def _end_streams(self, app: web.Application) -> None:
        self.events.close_streams()

    def periodic_jobs(self) -> list[Coroutine[None, None, None]]:
        """Coroutines to run while the app is up (besides the expiry sweeper)."""
        return []

    # -- running ------------------------------------------------------------

    async def start(self) -> None:
        """Listen on every listener (port 0 picks a free one)."""
        if self._runner is not None:
            raise RuntimeError("the server is already running")
        runner = StoreRunner(
            self.create_app(),
            ConnectionGate(connection_cap(self.settings), self.settings.max_connections_per_client),
            self.settings.tls_handshake_timeout,
            keepalive_timeout=self.settings.idle_timeout,
        )
        await runner.setup()
        gated = runner.server
        assert isinstance(gated, GatedServer)
        bound = []
        try:
            for listener in self.listeners():
                # Every listener accepts plain TCP, so that the gate counts a connection from its first
                # moment; a TLS listener's handshake follows admission (GatedServer.tls).
                sock = bind_socket(listener.host, listener.port, reuse_port=self.shared_state)
                port = int(sock.getsockname()[1])
                if listener.ssl_context is not None:
                    gated.tls[port] = listener.ssl_context
                await web.SockSite(runner, sock).start()
                bound.append(Listener(listener.host, port, listener.ssl_context))
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._bound = runner, bound

    async def stop(self) -> None:
        """Stop listening, let running requests end, close the state."""
        runner, self._runner, self._bound = self._runner, None, []
        if runner is not None:
            await runner.cleanup()

    def run(
        self,
        on_ready: Callable[[list[str]], None] | None = None,
        signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
    ) -> None:
        """Serve until one of ``signals`` (blocking); SIGHUP calls ``reload``."""
        asyncio.run(self._serve_until_signalled(on_ready, signals))

    async def _serve_until_signalled(
        self, on_ready: Callable[[list[str]], None] | None, signals: tuple[signal.Signals, ...]
    ) -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in signals:
            loop.add_signal_handler(signum, stopping.set)
        reloads: set[asyncio.Task[None]] = set()

        def reload_in_background() -> None:
            task = asyncio.create_task(self.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload_in_background)
        await self.start()
        try:
            if on_ready is not None:
                on_ready(self.urls)
            await stopping.wait()
        finally:
            await self.stop()

    @property
    def urls(self) -> list[str]:
        """The base URL of every listener (the real ports once started)."""
        return [_base_url(listener) for listener in (self._bound or self.listeners())]

    @property
    def url(self) -> str:
        """The base URL of the main listener."""
        return self.urls[0]

    @property
    def port(self) -> int:
        """The port of the main listener (the real one once started)."""
        return (self._bound or self.listeners())[0].port

    def get_upload_descriptor(self, prefix: str) -> str:
        """The URL a client posts its manifest under (AccessGrid's upload descriptor)."""
        return f"{self.url}/{prefix}"

    def get_download_descriptor(self, prefix: str, name: str) -> str:
        """The download URL of ``name`` under ``prefix``."""
        return f"{self.url}/{prefix}/{quote(name, safe='')}"


class HTTPTransferServer(TransferServer):
    """Plain HTTP on the configured host and port; identities from ``X-Client-DN``."""

    def listeners(self) -> list[Listener]:
        return [Listener(self.settings.host, self.settings.port)]


class HTTPSTransferServer(TransferServer):
    """TLS that requires client certificates; the identity is the verified subject DN.

    ``ssl_context`` should come from :func:`datastore.security.tls.server_context`.
    The TLS listener uses ``port`` (default: the settings' port);
    ``plain_port`` adds a plain-HTTP listener beside it, in the same process
    and on the same state, as the AccessGrid venue server ran both. A
    ``crl`` reloader is checked every ``crl_check_interval`` seconds and on
    SIGHUP.
    """

    def __init__(
        self,
        settings: Settings | None,
        ssl_context: ssl.SSLContext,
        *,
        port: int | None = None,
        plain_port: int | None = None,
        crl: CrlReloader | None = None,
    ) -> None:
        super().__init__(settings)
        if ssl_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("the TLS server requires client certificates: use verify_mode CERT_REQUIRED")
        self.ssl_context = ssl_context
        self.tls_port = port if port is not None else self.settings.port
        self.plain_port = plain_port
        self.crl = crl
        #: The (subject, issuer) pairs of administrators' certificates; ValueError if they cannot be told.
        self._admins = administrators(ssl_context, self.settings.admin_subjects, self.settings.admin_issuer)

    def listeners(self) -> list[Listener]:
        listeners = [Listener(self.settings.host, self.tls_port, self.ssl_context)]
        if self.plain_port is not None:
            listeners.append(Listener(self.settings.host, self.plain_port))
        return listeners

    def certificate_identity(self, ssl_object: object) -> Identity:
        return certificate_identity(ssl_object, crl=self.crl, admins=self._admins)

    async def reload(self) -> None:
        """Reload the CRL (SIGHUP), and close the connections of certificates it revokes."""
        if self.crl is not None and await asyncio.to_thread(self.crl.reload):
            self._close_revoked()

    async def _end_streams(self, app: web.Application) -> None:
        self.events.close_streams()

    def periodic_jobs(self) -> list[Coroutine[None, None, None]]:
        if self.crl is None:
            return []
        return [self._watch_crl(self.crl, self.settings.crl_check_interval)]

    async def _watch_crl(self, crl: CrlReloader, interval: float) -> None:
        """Reload the CRL whenever its file changes."""
        while True:
            await asyncio.sleep(interval)
            if await asyncio.to_thread(crl.check):
                self._close_revoked()

    def _close_revoked(self) -> None:
        """Cut every connection of a certificate the CRL now revokes, whatever it is doing (an upload,
        a download, waiting for its next request).

        This needs the connections, which the store's own runner keeps (``start``, ``run``); under
        another runner the per-request check still refuses the next request of such a connection.
        """
        assert self.crl is not None
        server = self._runner.server if self._runner is not None else None
        for handler in list(server.clients) if isinstance(server, GatedServer) else []:
            transport = handler.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if transport is not None and der and self.crl.is_revoked(peer_certificate(der)):
                log.info("closing a connection of a revoked certificate")
                transport.abort()


async def _token_identity(request: web.Request, token: str) -> Identity:
    record = await request.app[CONTEXT].tokens.verify(token)
    if record is None:
        raise InvalidToken("the token is unknown, expired or revoked")
    return record.identity()


def _base_url(listener: Listener) -> str:
    host = f"[{listener.host}]" if ":" in listener.host else listener.host
    return f"{listener.scheme}://{host}:{listener.port}"


# -- request handlers that belong to no other module --------------------------


async def handle_add_slash(request: web.Request) -> web.Response:
    """``GET /{prefix}`` -> ``/{prefix}/``."""
    request.app[CONTEXT].mount(request.match_info["prefix"])
    raise web.HTTPMovedPermanently(location=f"/{request.match_info['prefix']}/")


# -- tus's X-HTTP-Method-Override --------------------------------------------

#: What a tus request may name in X-HTTP-Method-Override: the methods tus 1.0.0 uses.
OVERRIDE_METHODS = ("POST", "HEAD", "PATCH", "DELETE", "OPTIONS")


async def _rerouted(request: web.Request) -> web.Request | None:
    """A tus request naming another method in X-HTTP-Method-Override, as a request of
    that method routed again by the app's router; None for any other request.

    aiohttp routes a request by its own method before any middleware runs,
    hence the clone (as aiohttp's ``normalize_path_middleware`` does it).
    """
    value = request.headers.get("X-HTTP-Method-Override")
    if value is None or "Tus-Resumable" not in request.headers:
        return None
    method = value.strip().upper()
    if method == request.method:
        return None
    if method not in OVERRIDE_METHODS:
        raise BadRequest(f"X-HTTP-Method-Override {value!r} is not one of {', '.join(OVERRIDE_METHODS)}")
    clone = request.clone(method=method)
    match_info = await request.app.router.resolve(clone)
    match_info.add_app(request.app)
    match_info.freeze()
    clone._match_info = match_info
    return clone


@web.middleware
async def method_override_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """tus: the server MUST take X-HTTP-Method-Override as the request's method."""
    rerouted = await _rerouted(request)
    if rerouted is None:
        return await handler(request)
    return await rerouted.match_info.handler(rerouted)


async def _upload_expect_handler(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` on a POST to an upload URL, answered by the route of the method it overrides to."""
    try:
        rerouted = await _rerouted(request)
    except DatastoreError as exc:
        return render_error(request, exc)
    if rerouted is None:
        return await upload_expect_handler(request)
    return await rerouted.match_info.expect_handler(rerouted)


# -- metrics ------------------------------------------------------------------

#: When the store began a request: read (once) when its answer is prepared.
_STARTED = web.RequestKey("datastore.started", float)


@web.middleware
async def metrics_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Start the clock of a request (the outermost middleware); :func:`_observe_request` reads it.

    A handler's answer is sent after it returns, and a FileResponse settles its status (206, 304,
    416) only then; so the duration is taken when the answer's status line and headers are sent,
    whoever sends them (aiohttp, for an HTTPException too). An answer not yet sent says how long
    the request waited for the state's transactions (``Server-Timing: db``, ``state/timing.py``).
    """
    if _STARTED not in request:
        request[_STARTED] = time.monotonic()
    with timing.tallying() as tally:
        response = await handler(request)
    if not response.prepared:
        milliseconds, count = tally.seconds * 1000, tally.transactions
        response.headers["Server-Timing"] = f'db;dur={milliseconds:.2f};desc="{count} transactions"'
    return response


def _timed(
    expect: Callable[[web.Request], Awaitable[web.StreamResponse | None]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
    """An ``Expect: 100-continue`` handler that starts the request's clock: it runs before the middlewares,
    and may answer in their place."""

    async def timed(request: web.Request) -> web.StreamResponse | None:
        request[_STARTED] = time.monotonic()
        return await expect(request)

    return timed


async def _observe_request(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the request's duration, by route pattern (never the path), method and status."""
    started = request.pop(_STARTED, None)
    if started is None:
        return
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics.observe_request(route, request.method, response.status, time.monotonic() - started)


#: The header every answer carries naming the node that gave it (its ``node_id``).
NODE_HEADER = "X-Datastore-Node"


def _node_header(node: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """``on_response_prepare``: every answer names its node (as the health answer does), so that behind a
    balancer a client, an operator or a test can tell which node answered a request."""

    async def name_node(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[NODE_HEADER] = node

    return name_node


# -- errors -------------------------------------------------------------------


def from_a_browser(request: web.Request) -> bool:
    """Whether a browser sent ``request`` (it says where a request comes from; AccessGrid clients never do)."""
    return "Sec-Fetch-Site" in request.headers or "Origin" in request.headers


#: Methods that change the store: a browser must not send them on behalf of another site.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@web.middleware
async def cross_site_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse (403) a state-changing request a browser sends from another site or origin.

    A page elsewhere can make a browser POST a form (an INI manifest as
    text/plain, a multipart upload) with the browser's client certificate or
    session cookie. Browsers say where a request comes from (``Sec-Fetch-Site``,
    else ``Origin``); programs, curl and AccessGrid clients send neither, and
    pass.
    """
    if request.method in UNSAFE_METHODS:
        site = request.headers.get("Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        if site is not None and site not in ("same-origin", "none"):
            raise CrossSiteRequest(f"Sec-Fetch-Site: {site}")
        if site is None and origin is not None and origin != f"{request.scheme}://{request.host}":
            raise CrossSiteRequest(f"Origin: {origin[:100]}")
    return await handler(request)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Render every DatastoreError, and anything unexpected as a 500."""
    try:
        return await handler(request)
    except DatastoreError as exc:
        response = render_error(request, exc)
        if "Tus-Resumable" in request.headers:
            response.headers["Tus-Resumable"] = "1.0.0"
        return response
    except web.HTTPNotFound:
        # A path of none of our shapes: AccessGrid answered these "File not found".
        return render_error(request, FileNotFound())
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, redact(request.path))
        return render_error(request, DatastoreError())


async def _sweep(lifecycle: Lifecycle) -> None:
    """Every ``sweep_interval``: expire keys past their lifetime, reap files whose lease ran out,
    forget old records and events."""
    while True:
        await asyncio.sleep(lifecycle.settings.sweep_interval)
        try:
            await lifecycle.sweep()
        except Exception:
            log.exception("sweeping expired transfers failed")


def make_server(settings: Settings) -> TransferServer:
    """The server the settings describe, with a DirectoryHandler for every prefix.

    Raises SettingsError when the TLS files cannot be loaded.
    """
    server: TransferServer
    if settings.uses_tls:
        assert settings.tls_cert is not None and settings.tls_key is not None
        try:
            context = server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.tls_crl)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise SettingsError(f"cannot load the TLS files: {exc}") from None
        crl = CrlReloader(context, settings.tls_crl) if settings.tls_crl is not None else None
        try:
            if settings.tls:
                server = HTTPSTransferServer(settings, context, crl=crl)
            else:
                server = HTTPSTransferServer(
                    settings, context, port=settings.tls_port, plain_port=settings.port, crl=crl
                )
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    else:
        server = HTTPTransferServer(settings)
    catalogues = settings.effective_state_dir / "catalogue"
    for prefix in settings.prefixes:
        catalogue = open_catalogue(settings.effective_state_url, prefix, catalogues / f"{prefix}.sqlite3")
        handler = DirectoryHandler(settings.root / prefix, catalogue=catalogue, overwrite=settings.overwrite)
        server.register_prefix(prefix, handler)
    return server
