"""Which driver serves each end of a copy, and whether a job may reach it at all.

A job names its ends by URL: ``local:/PREFIX/NAME`` (this store), ``http(s)://...`` (any server as a
source; another datastore as a destination) or ``rclone:REMOTE:PATH`` (a remote of the operator's
rclone configuration). :func:`check_url` is what the API applies at submission (so that a client
hears at once that a host is not allowed); :class:`Ends` builds the drivers for a runner, with the
job's credentials and the store's TLS settings.

A store that fetches URLs for its clients must not become their way into the network it sits in:
http(s) ends must be on a host the operator listed (``job_hosts``; ``*`` for any), rclone remotes
must be named in the operator's configuration (never a connection string, never the local disk).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from ..config import Settings
from ..lifecycle.machine import Lifecycle
from ..state.jobs import Job
from .drivers.datastore import DatastoreDestination
from .drivers.http import HttpSource
from .drivers.interface import Destination, DriverError, Source
from .drivers.local import SCHEME as LOCAL
from .drivers.local import LocalDestination, LocalSource, parse_local
from .drivers.rclone import RcloneDestination, RcloneSource
from .states import FailureReason

RCLONE = "rclone:"


def check_url(url: str, settings: Settings, *, destination: bool) -> tuple[str, str] | None:
    """DriverError (BAD_REQUEST, FORBIDDEN) unless ``url`` names an end this store may use; for one
    of this store's files, its (prefix, name)."""
    if url.startswith(LOCAL):
        return parse_local(url)
    if url.startswith(RCLONE):
        if settings.job_rclone_config is None:
            raise DriverError(FailureReason.FORBIDDEN, "this store has no rclone remotes (job_rclone_config)")
        if url[len(RCLONE) :].startswith(":") or url.count(":") < 2:
            raise DriverError(FailureReason.BAD_REQUEST, f"{url!r} is not rclone:REMOTE:PATH")
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise DriverError(FailureReason.BAD_REQUEST, "an invalid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DriverError(
            FailureReason.BAD_REQUEST, "an end is local:/PREFIX/NAME, http(s)://HOST/... or rclone:REMOTE:PATH"
        )
    if parts.username is not None or parts.password is not None:
        raise DriverError(
            FailureReason.BAD_REQUEST, "put credentials in source_token or destination_token, not in the URL"
        )
    if destination and (parts.query or parts.path.count("/") != 2 or parts.path.endswith("/")):
        raise DriverError(FailureReason.BAD_REQUEST, "a datastore destination is http(s)://HOST/PREFIX/NAME")
    if not host_allowed(parts.hostname, port or (443 if parts.scheme == "https" else 80), settings.job_hosts):
        raise DriverError(
            FailureReason.FORBIDDEN, f"jobs may not reach {parts.hostname}: the operator lists it in job_hosts"
        )
    return None


def host_allowed(host: str, port: int, allowed: tuple[str, ...]) -> bool:
    """Whether ``host:port`` is in ``allowed`` (``HOST``, ``HOST:PORT`` or ``*``)."""
    host = host.lower()
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*" or entry == host or entry == f"{host}:{port}" or entry == f"[{host}]:{port}":
            return True
    return False


def is_secure(url: str) -> bool:
    """Whether bytes sent to ``url`` stay protected (this store, or TLS)."""
    return url.startswith((LOCAL, "https://"))


class Ends:
    """Builds the drivers of a job's files for one runner (one HTTP session for all of them)."""

    def __init__(self, lifecycle: Lifecycle, settings: Settings) -> None:
        self.lifecycle = lifecycle
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The runner's HTTP session: the store's client certificate and CAs for https peers."""
        if self._session is None:
            guard = aiohttp.TraceConfig()
            guard.on_request_start.append(self._check_request)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl_context(), limit=64),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.job_stall_timeout),
                auto_decompress=False,
                trace_configs=[guard],
            )
        return self._session

    def _allowed(self, url: URL) -> bool:
        """Whether a job may send a request to ``url`` (its host is in ``job_hosts``)."""
        if url.scheme not in ("http", "https") or not url.host:
            return False
        return host_allowed(url.host, url.port or (443 if url.scheme == "https" else 80), self.settings.job_hosts)

    async def _check_request(
        self, _: aiohttp.ClientSession, __: object, params: aiohttp.TraceRequestStartParams
    ) -> None:
        """Every request a job makes (a redirect's too) goes only to a host the operator allows."""
        url = params.url
        if not self._allowed(url):
            raise DriverError(FailureReason.FORBIDDEN, f"jobs may not reach {url.host}: it is not in job_hosts")

    def _ssl_context(self) -> ssl.SSLContext:
        settings = self.settings
        context = ssl.create_default_context()
        for ca in settings.job_tls_ca:
            context.load_verify_locations(cafile=str(ca))
        if settings.job_tls_cert is not None and settings.job_tls_key is not None:
            context.load_cert_chain(str(settings.job_tls_cert), str(settings.job_tls_key))
        return context

    def _chunk_size(self, job: Job) -> int:
        return job.spec.chunk_size or self.settings.chunk_size

    def source(self, job: Job, url: str, destination: str) -> Source:
        """The driver reading ``url`` for ``job`` (whose file goes to ``destination``)."""
        check_url(url, self.settings, destination=False)
        if url.startswith(LOCAL):
            return LocalSource(
                self.lifecycle, url, job.owner, chunk_size=self._chunk_size(job), secure=is_secure(destination)
            )
        if url.startswith(RCLONE):
            assert self.settings.job_rclone_config is not None
            return RcloneSource(url, config=self.settings.job_rclone_config, chunk_size=self._chunk_size(job))
        return HttpSource(url, self.session, headers=_bearer(job.spec.source_token), chunk_size=self._chunk_size(job))

    def destination(self, job: Job, url: str) -> Destination:
        """The driver writing ``url`` for ``job``."""
        check_url(url, self.settings, destination=True)
        if url.startswith(LOCAL):
            return LocalDestination(self.lifecycle, url, job.owner, client=job.owner.principal or "jobs")
        if url.startswith(RCLONE):
            assert self.settings.job_rclone_config is not None
            return RcloneDestination(url, config=self.settings.job_rclone_config, chunk_size=self._chunk_size(job))
        return DatastoreDestination(
            url, self.session, headers=_bearer(job.spec.destination_token), chunk_size=self._chunk_size(job)
        )

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def _bearer(token: str | None) -> Mapping[str, str] | None:
    return None if token is None else {"Authorization": f"Bearer {token}"}
