"""HTTPSTransferServer: client certificates over real TLS handshakes on 127.0.0.1.

Every test mints its certificates at run time with ``datastore.security.certs`` in
tmp_path and starts the server in-process (``HTTPSTransferServer.start``) or
as ``python -m datastore serve``. ``/files/`` is served by a RecordingHandler,
so a client refused at the handshake is proven never to reach a handler (and
the access log proves no HTTP request was read at all); ``/shelf/`` is a
DirectoryHandler, which can delete.

A refused client does not always learn it at the same moment: with TLS 1.2
the handshake itself fails; with TLS 1.3 the client finishes its half of the
handshake and sees the server hang up on its first request. Either way the
request fails with a connection error, never an HTTP status.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from datastore.config import SettingsError
from datastore.handlers.directory import DirectoryHandler
from datastore.http.server import HTTPSTransferServer
from datastore.security.certs import CertificateDirectory, Issued, issue, make_ca, make_crl, make_name, now
from datastore.security.identity import IdentityKind
from datastore.security.tls import CrlReloader, server_context

from .fakes import RecordingHandler
from .harness import (
    OPEN_POLICY,
    OPEN_STORE_ENV,
    ini_manifest,
    json_manifest,
    make_settings,
    parse_legacy_reply,
    until,
)
from .waiting import WallClock

PREFIX = "files"  # a RecordingHandler
SHELF = "shelf"  # a DirectoryHandler (it can delete)
ORG, UNIT, COUNTRY = "Lab", "Physics", "NZ"
#: Issuer and subjects as identities compare them (RFC 4514), and Ada's as legacy handlers read it.
CA_SUBJECT = "CN=Lab CA,O=Lab"
ADA_SUBJECT = "CN=ada,OU=Physics,O=Lab,C=NZ"
ADA_DN = "/C=NZ/O=Lab/OU=Physics/CN=ada"
BOB_DN = "/C=NZ/O=Lab/OU=Physics/CN=bob"
DAY = datetime.timedelta(days=1)
CURL = "/usr/bin/curl"

TLS_VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
]
VERSION_NAMES = {
    ssl.TLSVersion.TLSv1: "TLSv1",
    ssl.TLSVersion.TLSv1_1: "TLSv1.1",
    ssl.TLSVersion.TLSv1_2: "TLSv1.2",
    ssl.TLSVersion.TLSv1_3: "TLSv1.3",
}


# -- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCert:
    """A certificate and its key on disk, as a client presents them."""

    cert: Path
    key: Path
    certificate: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def _load(cert: Path, key: Path) -> ClientCert:
    return ClientCert(cert, key, x509.load_pem_x509_certificate(cert.read_bytes()))


class Pki:
    """A CA in a certs/ directory as ``datastore certs`` keeps it, a server
    certificate for localhost and 127.0.0.1, and ways to mint odd client
    certificates beside it.

    The CA's current CRL (revoking nothing) is dated an hour ago, as if the
    CA had been set up earlier, so a revocation made by a test is dated now.
    (A CRL written within a second of the previous one is dated in the future
    by CertificateDirectory; test_back_to_back_revocations_take_effect_at_the_next_reload
    covers that case on purpose.)
    """

    def __init__(self, base: Path) -> None:
        self.certs = CertificateDirectory(base / "certs")
        self.minted = base / "minted"
        self.minted.mkdir(parents=True)
        self.certs.init(organization=ORG, common_name=f"{ORG} CA")
        self.ca = self.certs.load_ca()
        earlier = make_crl(self.ca, [], last_update=now() - datetime.timedelta(hours=1))
        self.crl.write_bytes(earlier.public_bytes(serialization.Encoding.PEM))
        self.certs.issue_server(["localhost", "127.0.0.1"])

    @property
    def ca_pem(self) -> Path:
        return self.certs.path("ca", "pem")

    @property
    def crl(self) -> Path:
        return self.certs.path("crl", "pem")

    @property
    def server(self) -> ClientCert:
        return _load(self.certs.path("server", "pem"), self.certs.path("server", "key"))

    def client(self, name: str) -> ClientCert:
        """NAME.pem/NAME.key from the certs/ directory (``datastore certs client NAME``)."""
        cert, _password = self.certs.issue_client(name, organization=ORG, unit=UNIT, country=COUNTRY, password="p")
        return _load(cert, self.certs.path(name, "key"))

    def mint(
        self,
        name: str,
        *,
        ca: Issued | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        subject: x509.Name | None = None,
    ) -> ClientCert:
        """A client certificate with the same kind of subject (or ``subject``), signed by ``ca`` (default: this CA)."""
        subject = subject or make_name(name, organization=ORG, unit=UNIT, country=COUNTRY)
        issued = issue(ca or self.ca, subject, client=True, not_before=not_before, not_after=not_after)
        cert, key = self.minted / f"{name}.pem", self.minted / f"{name}.key"
        cert.write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(
            issued.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return _load(cert, key)

    def context(self, client: ClientCert | None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """A client context that trusts this CA (hostname checked) and presents ``client``."""
        context = ssl.create_default_context(cafile=self.ca_pem)
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        if version is not None:
            context.minimum_version = context.maximum_version = version
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def ada(pki: Pki) -> ClientCert:
    return pki.client("ada")


@pytest.fixture
def bob(pki: Pki) -> ClientCert:
    return pki.client("bob")


# -- the store ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class TlsStore:
    """A running HTTPSTransferServer and what the tests look at."""

    server: HTTPSTransferServer
    handler: RecordingHandler
    shelf: DirectoryHandler
    pki: Pki
    root: Path

    @property
    def url(self) -> str:
        return self.server.urls[0]

    @property
    def plain_url(self) -> str:
        return self.server.urls[1]

    async def request(
        self,
        client: ClientCert | None,
        method: str,
        path: str,
        *,
        version: ssl.TLSVersion | None = None,
        **kwargs: Any,
    ) -> Reply:
        """One request on a new TLS connection (a full handshake each time)."""
        connector = aiohttp.TCPConnector(ssl=self.pki.context(client, version), force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(method, self.url + path, **kwargs) as response,
        ):
            return Reply(response.status, response.reason or "", await response.read())

    async def plain(self, method: str, path: str, **kwargs: Any) -> Reply:
        """One request to the plain-HTTP listener."""
        async with aiohttp.ClientSession() as session, session.request(method, self.plain_url + path, **kwargs) as r:
            return Reply(r.status, r.reason or "", await r.read())

    async def register(
        self,
        client: ClientCert,
        files: list[tuple[str, bytes]],
        *,
        prefix: str = PREFIX,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        reply = await self.request(client, "POST", f"/{prefix}/manifest", json=json_manifest(files), headers=headers)
        assert reply.status == 201, reply
        key: str = reply.json()["transfer_key"]
        return key

    async def put(
        self,
        client: ClientCert,
        key: str,
        data: bytes,
        *,
        prefix: str = PREFIX,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        return await self.request(client, "PUT", f"/{prefix}/{key}/0", data=data, headers=headers)

    async def upload(self, client: ClientCert, name: str, data: bytes, *, prefix: str = PREFIX) -> None:
        key = await self.register(client, [(name, data)], prefix=prefix)
        reply = await self.put(client, key, data, prefix=prefix)
        assert reply.status == 200, reply

    def published(self, prefix: str, name: str) -> bool:
        return (self.root / prefix / name).exists()


def build_store(pki: Pki, base: Path, plain: bool, settings: Mapping[str, Any]) -> TlsStore:
    """Everything a TLS store needs before it starts (blocking: run it in a thread)."""
    root, state = base / "root", base / "state"
    context = server_context(pki.certs.path("server", "pem"), pki.certs.path("server", "key"), [pki.ca_pem], pki.crl)
    server = HTTPSTransferServer(
        make_settings(root, state, host="127.0.0.1", **settings),
        context,
        plain_port=0 if plain else None,
        crl=CrlReloader(context, pki.crl),
    )
    handler = RecordingHandler(root / PREFIX, state / "catalogue" / f"{PREFIX}.sqlite3")
    shelf = DirectoryHandler(root / SHELF, catalogue=state / "catalogue" / f"{SHELF}.sqlite3")
    server.register_prefix(PREFIX, handler)
    server.register_prefix(SHELF, shelf)
    return TlsStore(server, handler, shelf, pki, root)


class StartStore(Protocol):
    def __call__(self, *, plain: bool = False, **settings: Any) -> Awaitable[TlsStore]: ...


@pytest.fixture
async def start_store(pki: Pki, tmp_path: Path) -> AsyncIterator[StartStore]:
    """Start HTTPSTransferServers on 127.0.0.1 (``plain=True`` adds a plain listener); stopped at teardown."""
    running: list[TlsStore] = []

    async def start(*, plain: bool = False, **settings: Any) -> TlsStore:
        store = await asyncio.to_thread(build_store, pki, tmp_path / f"store-{len(running)}", plain, settings)
        await store.server.start()
        running.append(store)
        return store

    yield start
    for store in running:
        await store.server.stop()


@pytest.fixture
async def store(start_store: StartStore) -> TlsStore:
    return await start_store()


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The access-log lines written so far (one per HTTP request the server read)."""
    caplog.set_level(logging.INFO, logger="datastore.access")
    return lambda: [record.getMessage() for record in caplog.records if record.name == "datastore.access"]


async def assert_refused(store: TlsStore, context: ssl.SSLContext, access_log: Callable[[], list[str]]) -> None:
    """A manifest sent with ``context`` fails as a connection error, and no request reaches the store."""
    calls, requests = list(store.handler.calls), access_log()
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ClientConnectionError) as caught:
            manifest = json_manifest([("refused.txt", b"refused")])
            async with session.post(f"{store.url}/{PREFIX}/manifest", json=manifest) as response:
                await response.read()
    # The client trusted the server: it is the server that refused the client.
    assert not isinstance(caught.value, aiohttp.ClientConnectorCertificateError)
    assert store.handler.calls == calls
    assert access_log() == requests


async def until_refused(store: TlsStore, client: ClientCert, timeout: float = 10.0) -> None:
    """Wait until a new connection presenting ``client`` is refused, failing after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await store.request(client, "GET", f"/{PREFIX}/")
                except aiohttp.ClientConnectionError:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"still served {timeout} s after the CRL file changed") from None


# -- a valid client ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", TLS_VERSIONS)
async def test_valid_client_uploads_and_downloads(store: TlsStore, ada: ClientCert, version: ssl.TLSVersion) -> None:
    negotiated = await asyncio.to_thread(handshake, store.server.port, store.pki.context(ada, version))
    assert negotiated == VERSION_NAMES[version]
    content = b"measured data\n" * 1000
    manifest = json_manifest([("a.dat", content)])
    reply = await store.request(ada, "POST", f"/{PREFIX}/manifest", json=manifest, version=version)
    assert reply.status == 201
    key = reply.json()["transfer_key"]
    upload = await store.request(ada, "PUT", f"/{PREFIX}/{key}/0", data=content, version=version)
    assert upload.status == 200
    download = await store.request(ada, "GET", f"/{PREFIX}/a.dat", version=version)
    assert (download.status, download.body) == (200, content)


async def test_handler_sees_the_certificate_identity_on_every_callback(store: TlsStore, ada: ClientCert) -> None:
    await store.upload(ada, "a.dat", b"data")
    assert (await store.request(ada, "GET", f"/{PREFIX}/a.dat")).status == 200

    assert store.handler.methods() == [
        "can_upload",
        "add_pending_upload",
        "get_upload_filename",
        "complete_upload",
        "get_download_filename",
    ]
    seen = {
        (
            identity.kind,
            identity.subject,
            identity.dn,
            identity.issuer,
            identity.fingerprint,
            int(identity.serial or "", 16),
        )
        for identity in store.handler.identities
    }
    expected = (
        IdentityKind.CERTIFICATE,
        ADA_SUBJECT,
        ADA_DN,
        CA_SUBJECT,
        ada.fingerprint,
        ada.certificate.serial_number,
    )
    assert seen == {expected}


async def test_catalogue_records_the_certificate_dn_as_owner(store: TlsStore, ada: ClientCert) -> None:
    await store.upload(ada, "a.dat", b"data")
    stored = await store.handler.describe_file(store.handler.identities[0], "a.dat")
    assert stored is not None
    assert (stored.owner, stored.owner_authenticated) == (ADA_DN, True)


# -- refused at the handshake ------------------------------------------------------------------


def no_certificate(pki: Pki) -> ClientCert | None:
    return None


def from_another_ca(pki: Pki) -> ClientCert | None:
    return pki.mint("ada", ca=make_ca(make_name("Other CA", organization="Other")))


def from_an_impostor_ca_with_the_same_name(pki: Pki) -> ClientCert | None:
    return pki.mint("ada", ca=make_ca(make_name(f"{ORG} CA", organization=ORG)))


def expired(pki: Pki) -> ClientCert | None:
    return pki.mint("ada", not_before=now() - 30 * DAY, not_after=now() - DAY)


def not_yet_valid(pki: Pki) -> ClientCert | None:
    return pki.mint("ada", not_before=now() + DAY, not_after=now() + 30 * DAY)


def server_certificate(pki: Pki) -> ClientCert | None:
    """The CA's server certificate (serverAuth only) presented as a client's."""
    return pki.server


REFUSED = [
    pytest.param(no_certificate, id="no-certificate"),
    pytest.param(from_another_ca, id="another-ca"),
    pytest.param(from_an_impostor_ca_with_the_same_name, id="impostor-ca-with-the-same-name"),
    pytest.param(expired, id="expired"),
    pytest.param(not_yet_valid, id="not-yet-valid"),
    pytest.param(server_certificate, id="server-certificate-without-client-auth"),
]


@pytest.mark.parametrize("version", TLS_VERSIONS)
@pytest.mark.parametrize("make_client", REFUSED)
async def test_client_is_refused_at_the_handshake(
    store: TlsStore,
    access_log: Callable[[], list[str]],
    make_client: Callable[[Pki], ClientCert | None],
    version: ssl.TLSVersion,
) -> None:
    client = await asyncio.to_thread(make_client, store.pki)
    await assert_refused(store, store.pki.context(client, version), access_log)


def legacy_context(version: ssl.TLSVersion, *, server: bool = False) -> ssl.SSLContext:
    """A context whose newest protocol is ``version`` (TLS 1.0 or 1.1), with every cipher allowed."""
    with warnings.catch_warnings():
        # TLS 1.0 and 1.1 are deprecated; speaking them is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def handshake(port: int, context: ssl.SSLContext) -> str | None:
    """Complete a TLS handshake with 127.0.0.1:port (blocking); the protocol negotiated."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version()


@pytest.fixture(
    params=[
        pytest.param(ssl.TLSVersion.TLSv1, id="tls1.0"),
        pytest.param(ssl.TLSVersion.TLSv1_1, id="tls1.1"),
    ]
)
async def legacy_client(request: pytest.FixtureRequest, pki: Pki, ada: ClientCert) -> ssl.SSLContext:
    """Ada's context, limited to TLS 1.0 or 1.1 — proven able to handshake with a server that allows it,
    so the store refusing it cannot be the client failing to start."""
    version: ssl.TLSVersion = request.param
    client = legacy_context(version)
    client.load_verify_locations(pki.ca_pem)
    client.load_cert_chain(ada.cert, ada.key)
    permissive = legacy_context(version, server=True)
    permissive.load_cert_chain(pki.server.cert, pki.server.key)
    permissive.load_verify_locations(pki.ca_pem)
    permissive.verify_mode = ssl.CERT_REQUIRED

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    control = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=permissive)
    async with control:
        negotiated = await asyncio.to_thread(handshake, control.sockets[0].getsockname()[1], client)
    assert negotiated == VERSION_NAMES[version]
    return client


async def test_client_speaking_only_tls_1_0_or_1_1_is_refused_at_the_handshake(
    store: TlsStore, legacy_client: ssl.SSLContext
) -> None:
    with pytest.raises(OSError) as caught:
        await asyncio.to_thread(handshake, store.server.port, legacy_client)
    # The server hung up on the hello (asyncio sends no alert) or, where it can, said protocol_version.
    error = caught.value
    assert isinstance(error, ConnectionResetError) or getattr(error, "reason", None) in (
        "UNEXPECTED_EOF_WHILE_READING",
        "TLSV1_ALERT_PROTOCOL_VERSION",
    ), repr(error)
    assert store.handler.calls == []


# -- revocation without a restart --------------------------------------------------------------


async def test_revoked_certificate_is_refused_once_the_crl_is_reloaded(
    store: TlsStore, ada: ClientCert, access_log: Callable[[], list[str]]
) -> None:
    assert (await store.request(ada, "GET", f"/{PREFIX}/")).status == 200
    await asyncio.to_thread(store.pki.certs.revoke, "ada")
    await store.server.reload()
    await assert_refused(store, store.pki.context(ada), access_log)


async def test_other_clients_are_still_served_after_a_revocation(
    store: TlsStore, ada: ClientCert, bob: ClientCert
) -> None:
    await asyncio.to_thread(store.pki.certs.revoke, "ada")
    await store.server.reload()
    assert (await store.request(bob, "GET", f"/{PREFIX}/")).status == 200


async def test_changed_crl_file_is_picked_up_by_the_periodic_check(
    start_store: StartStore, ada: ClientCert, access_log: Callable[[], list[str]]
) -> None:
    store = await start_store(crl_check_interval=0.05)
    assert (await store.request(ada, "GET", f"/{PREFIX}/")).status == 200
    await asyncio.to_thread(store.pki.certs.revoke, "ada")
    await until_refused(store, ada)
    await assert_refused(store, store.pki.context(ada), access_log)


async def test_back_to_back_revocations_take_effect_at_the_next_reload(
    store: TlsStore, ada: ClientCert, bob: ClientCert, access_log: Callable[[], list[str]]
) -> None:
    """An operator revokes two clients in a row (within one second), then reloads once."""

    def revoke_both() -> None:
        store.pki.certs.revoke("ada")
        store.pki.certs.revoke("bob")

    await asyncio.to_thread(revoke_both)
    await store.server.reload()
    await assert_refused(store, store.pki.context(ada), access_log)
    await assert_refused(store, store.pki.context(bob), access_log)


async def test_unreadable_crl_on_reload_keeps_the_revocations_in_force(
    store: TlsStore, ada: ClientCert, access_log: Callable[[], list[str]]
) -> None:
    await asyncio.to_thread(store.pki.certs.revoke, "ada")
    await store.server.reload()
    await asyncio.to_thread(store.pki.crl.write_text, "not a CRL\n")
    await store.server.reload()
    await assert_refused(store, store.pki.context(ada), access_log)


# -- X-Client-DN and transfer keys on the TLS server -------------------------------------------


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param(BOB_DN, id="another-dn"),
        pytest.param("None", id="anonymous"),
        pytest.param("", id="empty"),
    ],
)
async def test_forged_client_dn_header_changes_nothing(store: TlsStore, ada: ClientCert, forged: str) -> None:
    headers = {"X-Client-DN": forged}
    key = await store.register(ada, [("a.dat", b"data")], headers=headers)
    assert (await store.put(ada, key, b"data", headers=headers)).status == 200
    assert (await store.request(ada, "GET", f"/{PREFIX}/a.dat", headers=headers)).status == 200

    assert {(identity.dn, identity.authenticated) for identity in store.handler.identities} == {(ADA_DN, True)}
    listing = (await store.request(ada, "GET", f"/{PREFIX}/", headers={**headers, "Accept": "application/json"})).json()
    assert [(f["owner"], f["owner_authenticated"]) for f in listing["files"]] == [(ADA_DN, True)]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="own-certificate"),
        pytest.param({"X-Client-DN": ADA_DN}, id="claiming-the-owner-dn-in-the-header"),
    ],
)
async def test_second_identity_cannot_upload_to_the_first_ones_transfer(
    store: TlsStore, ada: ClientCert, bob: ClientCert, headers: dict[str, str]
) -> None:
    key = await store.register(ada, [("a.dat", b"data")])
    calls = len(store.handler.calls)

    reply = await store.put(bob, key, b"data", headers=headers)

    assert reply.status == 403
    assert store.handler.calls[calls:] == []
    assert not store.published(PREFIX, "a.dat")


async def test_owner_can_still_upload_after_another_identity_was_refused(
    store: TlsStore, ada: ClientCert, bob: ClientCert
) -> None:
    key = await store.register(ada, [("a.dat", b"data")])
    assert (await store.put(bob, key, b"data")).status == 403
    assert (await store.put(ada, key, b"data")).status == 200
    assert store.published(PREFIX, "a.dat")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="own-certificate"),
        pytest.param({"X-Client-DN": ADA_DN}, id="claiming-the-owner-dn-in-the-header"),
    ],
)
async def test_another_identity_cannot_delete_the_owners_file(
    store: TlsStore, ada: ClientCert, bob: ClientCert, headers: dict[str, str]
) -> None:
    await store.upload(ada, "a.dat", b"data", prefix=SHELF)
    reply = await store.request(bob, "DELETE", f"/{SHELF}/a.dat", headers=headers)
    assert reply.status == 403
    assert store.published(SHELF, "a.dat")


async def test_owner_can_delete_own_file(store: TlsStore, ada: ClientCert) -> None:
    await store.upload(ada, "a.dat", b"data", prefix=SHELF)
    assert (await store.request(ada, "DELETE", f"/{SHELF}/a.dat")).status == 204
    assert not store.published(SHELF, "a.dat")


# -- TLS and plain HTTP in one process ---------------------------------------------------------


async def test_file_uploaded_over_tls_is_neither_listed_nor_served_over_plain_http(
    start_store: StartStore, ada: ClientCert
) -> None:
    store = await start_store(plain=True)
    assert (store.url.split(":")[0], store.plain_url.split(":")[0]) == ("https", "http")
    await store.upload(ada, "a.dat", b"data")
    assert (await store.plain("GET", f"/{PREFIX}/", headers={"Accept": "application/json"})).json()["files"] == []
    refused = await store.plain("GET", f"/{PREFIX}/a.dat")
    assert (refused.status, refused.body) == (
        403,
        b"Not authorized: this file was uploaded over TLS and is served over TLS only\n",
    )
    listing = (await store.request(ada, "GET", f"/{PREFIX}/", headers={"Accept": "application/json"})).json()
    assert [(f["name"], f["owner"], f["yours"]) for f in listing["files"]] == [("a.dat", ADA_DN, True)]


async def test_a_prefix_may_serve_tls_uploads_over_plain_http_too(start_store: StartStore, ada: ClientCert) -> None:
    store = await start_store(plain=True, policy=replace(OPEN_POLICY, tls_only=False, show_owners=True))
    await store.upload(ada, "a.dat", b"data")
    listing = (await store.plain("GET", f"/{PREFIX}/", headers={"Accept": "application/json"})).json()
    assert [(f["name"], f["owner"], f["owner_authenticated"]) for f in listing["files"]] == [("a.dat", ADA_DN, True)]
    served = await store.plain("GET", f"/{PREFIX}/a.dat")
    assert (served.status, served.body) == (200, b"data")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-Client-DN": ADA_DN}, id="owner-dn"),
        pytest.param({"X-Client-DN": ADA_DN, "X-Forwarded-Proto": "https"}, id="owner-dn-and-x-forwarded-proto"),
        pytest.param({"X-Client-DN": ADA_DN, "Forwarded": "proto=https"}, id="owner-dn-and-forwarded"),
    ],
)
async def test_key_registered_over_tls_is_refused_over_plain_http(
    start_store: StartStore, ada: ClientCert, headers: dict[str, str]
) -> None:
    store = await start_store(plain=True)
    key = await store.register(ada, [("a.dat", b"data")])
    reply = await store.plain("PUT", f"/{PREFIX}/{key}/0", data=b"data", headers=headers)
    assert reply.status == 403
    assert not store.published(PREFIX, "a.dat")


async def test_file_uploaded_over_tls_cannot_be_deleted_over_plain_http_with_the_owner_dn(
    start_store: StartStore, ada: ClientCert
) -> None:
    store = await start_store(plain=True)
    await store.upload(ada, "a.dat", b"data", prefix=SHELF)
    reply = await store.plain("DELETE", f"/{SHELF}/a.dat", headers={"X-Client-DN": ADA_DN})
    assert reply.status == 403
    assert store.published(SHELF, "a.dat")


# -- datastore serve --tls, certs and curl, as an operator runs them ---------------------------

URL_LINE = re.compile(r"serving \S+ at (?P<url>(?P<scheme>https?)://127\.0\.0\.1:\d+)/files/")


def datastore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "datastore", *args], capture_output=True, text=True, timeout=60, check=False
    )


@dataclass
class Served:
    """A ``datastore serve`` process, its URLs by scheme, and its stderr read as it comes."""

    process: asyncio.subprocess.Process
    urls: dict[str, str] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    logged: asyncio.Condition = field(default_factory=asyncio.Condition)
    reader: asyncio.Task[None] | None = None

    async def read_log(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            async with self.logged:
                self.log.append(line.decode())
                self.logged.notify_all()

    async def wait_for_log(self, text: str, after: int) -> None:
        """Wait until a line containing ``text`` is logged after the first ``after`` lines."""
        try:
            async with asyncio.timeout(10), self.logged:
                await self.logged.wait_for(lambda: any(text in line for line in self.log[after:]))
        except TimeoutError:
            raise AssertionError(f"no {text!r} in the server's log within 10 s: {self.log[after:]}") from None

    async def stop(self) -> str:
        """SIGTERM, wait, and return everything it logged."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await self.process.wait()
            if self.reader is not None:
                await self.reader
        return "".join(self.log)


class Serve(Protocol):
    def __call__(self, *args: str, listeners: int = 1) -> Awaitable[Served]: ...


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Run ``python -m datastore serve --port 0 --root ROOT ARGS`` until it printed ``listeners`` URLs."""
    started: list[Served] = []

    async def start(*args: str, listeners: int = 1) -> Served:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "datastore",
            "serve",
            "--port",
            "0",
            "--root",
            str(tmp_path / "data"),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **OPEN_STORE_ENV},
        )
        served = Served(process)
        started.append(served)
        served.reader = asyncio.create_task(served.read_log())
        assert process.stdout is not None
        async with asyncio.timeout(30):
            while len(served.urls) < listeners:
                line = (await process.stdout.readline()).decode()
                assert line, f"the server exited before printing its URLs: {''.join(served.log)}"
                if match := URL_LINE.search(line):
                    served.urls[match["scheme"]] = match["url"]
        return served

    yield start
    for served in started:
        await served.stop()


@pytest.fixture
def cli_certs(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1, and clients ada and bob, made with ``datastore certs``."""
    directory = tmp_path / "certs"
    for args in (["init", "--org", ORG], ["server", "127.0.0.1", "localhost"], ["client", "ada"], ["client", "bob"]):
        result = datastore("certs", "--dir", str(directory), *args)
        assert result.returncode == 0, result.stderr
    return directory


def tls_args(certs: Path) -> list[str]:
    return [
        "--cert",
        str(certs / "server.pem"),
        "--key",
        str(certs / "server.key"),
        "--client-ca",
        str(certs / "ca.pem"),
        "--crl",
        str(certs / "crl.pem"),
    ]


async def curl(certs: Path, name: str, *args: str) -> tuple[int, str, str]:
    """Run curl as NAME (``--cert NAME.pem --key NAME.key``); return (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        CURL,
        "--silent",
        "--show-error",
        "--fail",
        "--max-time",
        "20",
        "--cacert",
        str(certs / "ca.pem"),
        "--cert",
        str(certs / f"{name}.pem"),
        "--key",
        str(certs / f"{name}.key"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_curl_uploads_then_is_refused_after_revoke_and_sighup(
    serve: Serve, cli_certs: Path, tmp_path: Path
) -> None:
    served = await serve("--tls", *tls_args(cli_certs))
    files = f"{served.urls['https']}/files"
    content = b"uploaded by curl\n" * 100
    upload, manifest = tmp_path / "a.dat", tmp_path / "manifest.ini"
    upload.write_bytes(content)
    manifest.write_bytes(ini_manifest([("a.dat", content)]))

    status, out, err = await curl(cli_certs, "ada", "--data-binary", f"@{manifest}", f"{files}/manifest")
    assert status == 0, err
    key = parse_legacy_reply(out)["transfer_key"][0]
    status, out, err = await curl(cli_certs, "ada", "-T", str(upload), f"{files}/{key}/0")
    assert (status, out) == (0, "File transfer OK\n"), err
    assert (tmp_path / "data" / "files" / "a.dat").read_bytes() == content

    revoked = await asyncio.to_thread(datastore, "certs", "--dir", str(cli_certs), "revoke", "ada")
    assert revoked.returncode == 0, revoked.stderr
    logged = len(served.log)
    served.process.send_signal(signal.SIGHUP)
    await served.wait_for_log("reloaded the CRL", after=logged)

    status, _out, err = await curl(cli_certs, "ada", f"{files}/a.dat?by=revoked-ada")
    # The connection failed (35: TLS handshake, 52: nothing received, 56: receive failure); an
    # HTTP refusal would be 22.
    assert status in (35, 52, 56), (status, err)
    status, out, err = await curl(cli_certs, "bob", f"{files}/a.dat")
    assert (status, out.encode()) == (0, content), err
    log = await served.stop()
    assert "GET /files/a.dat HTTP" in log  # bob's request, in the access log
    assert "revoked-ada" not in log


async def test_serve_tls_port_adds_a_tls_listener_beside_plain_http(serve: Serve, cli_certs: Path) -> None:
    served = await serve("--tls-port", "0", *tls_args(cli_certs), listeners=2)
    assert served.urls.keys() == {"http", "https"}
    status, out, err = await curl(cli_certs, "ada", "-H", "Accept: application/json", f"{served.urls['https']}/files/")
    assert status == 0, err
    assert json.loads(out)["files"] == []
    async with aiohttp.ClientSession() as session, session.get(f"{served.urls['http']}/files/") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        pytest.param("--cert", [], "TLS needs a certificate, its key and a client CA", id="no-cert"),
        pytest.param("--key", [], "TLS needs a certificate, its key and a client CA", id="no-key"),
        pytest.param("--client-ca", [], "TLS needs a certificate, its key and a client CA", id="no-client-ca"),
        pytest.param(None, ["--tls-port", "0"], "not both", id="tls-and-tls-port"),
        pytest.param(None, ["--crl", os.devnull], "cannot load the TLS files", id="crl-is-not-a-crl"),
    ],
)
def test_serve_tls_with_bad_tls_settings_exits_2_with_one_line(
    cli_certs: Path, drop: str | None, extra: list[str], message: str
) -> None:
    args = tls_args(cli_certs)
    if drop is not None:
        index = args.index(drop)
        del args[index : index + 2]
    result = datastore("serve", "--port", "0", "--tls", *args, *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


# -- promises kept for every request: revocation, expiry, resumption, identities ---------------------------------

#: Upper bound on anything these tests wait for.
WAIT = 20.0


class KeptConnection:
    """One TLS connection kept open across HTTP/1.1 requests (blocking: use it from a thread)."""

    def __init__(self, port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        try:
            self.tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
        except BaseException:
            raw.close()
            raise

    def request(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, Connection header, body) of one request without a body on this connection."""
        self.tls.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n".encode())
        response = http.client.HTTPResponse(self.tls)
        response.begin()
        return response.status, response.getheader("Connection", ""), response.read()

    def closed_by_the_server(self) -> bool:
        try:
            return self.tls.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.tls.close()

    def close_cleanly(self) -> None:
        """Send close_notify and wait for the server's, as a well-behaved client does, then close.

        A TLS 1.2 server keeps the session of a connection closed so (one closed without it is dropped
        from its cache when the server lets go of the connection, at a moment no test controls)."""
        try:
            self.tls.unwrap()
        finally:
            self.tls.close()


#: What OpenSSL says of a revoked certificate, in the line the server logs for a failed handshake.
REVOKED = "certificate revoked"


def hung_up(error: BaseException) -> bool:
    """Whether ``error`` is how a client learns that the server refused it at the handshake.

    asyncio sends no alert after a failed handshake; it closes the connection. The client reads that as
    an unexpected EOF (in its handshake, TLS 1.2: SSLEOFError; at its first read, TLS 1.3, whose client
    finishes its half of the handshake first: RemoteDisconnected, a ConnectionResetError), or as a reset
    where the server left bytes of the client's unread (ConnectionResetError; BrokenPipeError as it
    writes). A server that does send the alert names it. Anything else (a timeout, the client distrusting
    the server, an HTTP answer) is no refusal.
    """
    if isinstance(error, ConnectionResetError | BrokenPipeError | ssl.SSLEOFError):
        return True
    return isinstance(error, ssl.SSLError) and error.reason == "SSLV3_ALERT_CERTIFICATE_REVOKED"


def refused_request(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> str:
    """Connect (offering ``session``) and send a request that must be refused (blocking); where the client
    learnt of it: ``"handshake"`` or ``"request"``. AssertionError if it was answered or failed otherwise."""
    try:
        connection = KeptConnection(port, context, session)
    except Exception as error:
        assert hung_up(error), repr(error)
        return "handshake"
    try:
        answer = connection.request("GET", f"/{PREFIX}/")
    except Exception as error:
        assert hung_up(error), repr(error)
        return "request"
    finally:
        connection.close()
    raise AssertionError(f"answered {answer[0]}: {answer[2]!r}")


async def until_logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Wait until a datastore log line holds ``text`` (the server logs on its loop, after the client saw the end)."""
    await until(
        lambda: any(text in r.getMessage() for r in caplog.records if r.name.startswith("datastore")),
        f"the server logged {text!r}",
        timeout=WAIT,
    )


async def keep(store: TlsStore, client: ClientCert, version: ssl.TLSVersion | None = None) -> KeptConnection:
    return await asyncio.to_thread(KeptConnection, store.server.port, store.pki.context(client, version))


async def revoke(store: TlsStore, name: str) -> None:
    await asyncio.to_thread(store.pki.certs.revoke, name)
    await store.server.reload()


async def test_an_idle_connection_of_a_certificate_revoked_since_is_closed_at_the_reload(
    store: TlsStore, ada: ClientCert, bob: ClientCert
) -> None:
    connection, others = await keep(store, ada), await keep(store, bob)
    try:
        assert (await asyncio.to_thread(connection.request, "GET", f"/{PREFIX}/"))[0] == 200
        assert (await asyncio.to_thread(others.request, "GET", f"/{PREFIX}/"))[0] == 200

        await revoke(store, "ada")

        assert await asyncio.to_thread(connection.closed_by_the_server)
        with pytest.raises((ConnectionError, ssl.SSLError, http.client.HTTPException)):
            await asyncio.to_thread(connection.request, "GET", f"/{PREFIX}/")
        # Bob's connection, of a certificate still valid, goes on.
        assert (await asyncio.to_thread(others.request, "GET", f"/{PREFIX}/"))[0] == 200
    finally:
        connection.close()
        others.close()


async def test_an_upload_under_way_is_cut_when_the_crl_revokes_its_certificate(
    store: TlsStore, ada: ClientCert
) -> None:
    size = 64 << 20
    key = await store.register(ada, [("big.bin", b"\0" * size)], prefix=SHELF)
    staging = store.root.parent / "state" / "staging"
    connection = await keep(store, ada)

    def start_upload() -> None:
        head = f"PUT /{SHELF}/{key}/0 HTTP/1.1\r\nHost: localhost\r\nContent-Length: {size}\r\n\r\n"
        connection.tls.sendall(head.encode() + b"\0" * (4 << 20))

    def send_the_rest() -> BaseException | None:
        try:
            for _ in range(60):
                connection.tls.sendall(b"\0" * (1 << 20))
            response = http.client.HTTPResponse(connection.tls)
            response.begin()
        except (ConnectionError, ssl.SSLError, http.client.HTTPException) as error:
            return error
        return None

    try:
        await asyncio.to_thread(start_upload)
        await until(lambda: staged_size(staging) > 0, "bytes of the upload were staged", timeout=WAIT)
        await revoke(store, "ada")
        assert await asyncio.to_thread(send_the_rest) is not None
    finally:
        connection.close()
    await until(lambda: staged_size(staging) == 0, "the staging file was removed", timeout=WAIT)
    assert not store.published(SHELF, "big.bin")


def staged_size(staging: Path) -> int:
    return sum(entry.stat().st_size for entry in staging.iterdir()) if staging.exists() else 0


async def test_tls13_sessions_are_never_resumed_so_a_revoked_certificate_meets_a_full_handshake(
    store: TlsStore, ada: ClientCert, caplog: pytest.LogCaptureFixture, access_log: Callable[[], list[str]]
) -> None:
    caplog.set_level(logging.DEBUG, logger="datastore.http.connections")
    context = store.pki.context(ada, ssl.TLSVersion.TLSv1_3)
    first = await asyncio.to_thread(KeptConnection, store.server.port, context)
    assert (await asyncio.to_thread(first.request, "GET", f"/{PREFIX}/"))[0] == 200
    session = first.tls.session
    await asyncio.to_thread(first.close_cleanly)
    # The store sends no session ticket, the only way TLS 1.3 resumes: there is nothing to resume.
    assert session is not None and not session.has_ticket
    again = await asyncio.to_thread(KeptConnection, store.server.port, context, session)
    try:
        assert not again.tls.session_reused
    finally:
        await asyncio.to_thread(again.close_cleanly)

    await revoke(store, "ada")
    calls, requests = list(store.handler.calls), access_log()

    # The client finishes its half of the handshake; the server's check of its certificate fails, and the
    # client learns it at its first read.
    assert await asyncio.to_thread(refused_request, store.server.port, context, session) == "request"
    await until_logged(caplog, REVOKED)
    assert (store.handler.calls, access_log()) == (calls, requests)


@pytest.mark.parametrize(
    "tickets",
    [
        # The store's own context: no tickets, but a TLS 1.2 server keeps the sessions it made by their ID
        # (Python's ssl module offers no way to turn that cache off).
        pytest.param(False, id="session-id"),
        # An application may hand the server a context of its own, with session tickets on.
        pytest.param(True, id="ticket"),
    ],
)
async def test_a_resumed_tls12_session_of_a_revoked_certificate_is_refused_by_the_per_request_check(
    pki: Pki, ada: ClientCert, tmp_path: Path, caplog: pytest.LogCaptureFixture, tickets: bool
) -> None:
    caplog.set_level(logging.DEBUG, logger="datastore.http.connections")
    context = await asyncio.to_thread(
        server_context, pki.certs.path("server", "pem"), pki.certs.path("server", "key"), [pki.ca_pem], pki.crl
    )
    if tickets:
        context.options &= ~ssl.OP_NO_TICKET
        context.num_tickets = 2
    root = tmp_path / "own-context"
    crl = await asyncio.to_thread(CrlReloader, context, pki.crl)
    server = HTTPSTransferServer(make_settings(root, tmp_path / "state"), context, crl=crl)
    server.register_prefix(PREFIX, DirectoryHandler(root / PREFIX, catalogue=tmp_path / "state" / "catalogue.sqlite3"))
    await server.start()
    try:
        client = pki.context(ada, ssl.TLSVersion.TLSv1_2)
        first = await asyncio.to_thread(KeptConnection, server.port, client)
        assert (await asyncio.to_thread(first.request, "GET", f"/{PREFIX}/"))[0] == 200
        session = first.tls.session
        await asyncio.to_thread(first.close_cleanly)
        await asyncio.to_thread(pki.certs.revoke, "ada")
        await server.reload()

        resumed = await asyncio.to_thread(KeptConnection, server.port, client, session)
        try:
            # The abbreviated handshake skipped the CRL; the request's own check does not.
            assert resumed.tls.session_reused
            status, closing, body = await asyncio.to_thread(resumed.request, "GET", f"/{PREFIX}/")
            assert (status, closing) == (403, "close")
            assert body == b"Client certificate refused: the client certificate has been revoked\n"
        finally:
            resumed.close()
        # Without the session, the revoked certificate meets a full handshake, and the CRL there.
        assert await asyncio.to_thread(refused_request, server.port, client) == "handshake"
        await until_logged(caplog, REVOKED)
    finally:
        await server.stop()


async def test_a_certificate_that_expires_while_its_connection_is_open_is_refused_from_then_on(
    store: TlsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Valid for a day by the real clock, which the handshake reads; then the store's clock (the one the
    # per-request check reads) moves past its end, so the test never races a short lifetime.
    expires = now() + DAY
    brief = await asyncio.to_thread(store.pki.mint, "brief", not_after=expires)
    connection = await keep(store, brief)
    try:
        assert (await asyncio.to_thread(connection.request, "GET", f"/{PREFIX}/"))[0] == 200
        WallClock(monkeypatch).advance(DAY.total_seconds() + 60)
        assert time.time() > expires.timestamp()

        status, _, body = await asyncio.to_thread(connection.request, "GET", f"/{PREFIX}/")

        assert (status, body) == (403, b"Client certificate refused: the client certificate has expired\n")
    finally:
        connection.close()


def subject(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


async def test_subjects_that_differ_only_in_escaping_are_two_identities(store: TlsStore) -> None:
    # Written the AccessGrid way, both are /O=Lab/CN=ada/OU=Physics.
    one = subject((NameOID.ORGANIZATION_NAME, ORG), (NameOID.COMMON_NAME, "ada/OU=Physics"))
    two = subject(
        (NameOID.ORGANIZATION_NAME, ORG), (NameOID.COMMON_NAME, "ada"), (NameOID.ORGANIZATIONAL_UNIT_NAME, UNIT)
    )
    mallory = await asyncio.to_thread(store.pki.mint, "mallory", subject=one)
    ada = await asyncio.to_thread(store.pki.mint, "ada-plain", subject=two)
    await store.upload(ada, "a.dat", b"Ada's", prefix=SHELF)

    assert (await store.request(mallory, "DELETE", f"/{SHELF}/a.dat")).status == 403
    listing = (await store.request(mallory, "GET", f"/{SHELF}/", headers={"Accept": "application/json"})).json()
    assert [(f["owner"], f["yours"]) for f in listing["files"]] == [(None, False)]
    seen = [(await store.request(c, "GET", "/_api/v1/identity")).json() for c in (mallory, ada)]
    assert [(w["subject"], w["dn"]) for w in seen] == [
        ("CN=ada/OU=Physics,O=Lab", "/O=Lab/CN=ada\\/OU=Physics"),
        ("OU=Physics,CN=ada,O=Lab", "/O=Lab/CN=ada/OU=Physics"),
    ]
    assert (await store.request(ada, "DELETE", f"/{SHELF}/a.dat")).status == 204


async def twin_from_another_ca(pki: Pki, client: ClientCert, tmp_path: Path) -> tuple[ClientCert, ssl.SSLContext]:
    """A certificate with ``client``'s subject from a second CA, and a server context that trusts both CAs."""
    other_ca = await asyncio.to_thread(make_ca, make_name("Partner CA", organization="Partner"))
    other_ca_pem = tmp_path / "partner-ca.pem"
    other_ca_pem.write_bytes(other_ca.certificate.public_bytes(serialization.Encoding.PEM))
    twin = await asyncio.to_thread(pki.mint, "twin", ca=other_ca, subject=client.certificate.subject)
    context = await asyncio.to_thread(
        server_context, pki.certs.path("server", "pem"), pki.certs.path("server", "key"), [pki.ca_pem, other_ca_pem]
    )
    return twin, context


async def test_the_same_subject_from_another_trusted_ca_is_another_identity(
    pki: Pki, ada: ClientCert, tmp_path: Path
) -> None:
    twin, context = await twin_from_another_ca(pki, ada, tmp_path)
    root, state = tmp_path / "two-cas", tmp_path / "state"
    server = HTTPSTransferServer(make_settings(root, state), context)
    handler = RecordingHandler(root / PREFIX, state / "catalogue" / f"{PREFIX}.sqlite3")
    shelf = DirectoryHandler(root / SHELF, catalogue=state / "catalogue" / f"{SHELF}.sqlite3")
    server.register_prefix(PREFIX, handler)
    server.register_prefix(SHELF, shelf)
    store = TlsStore(server, handler, shelf, pki, root)
    await server.start()
    try:
        await store.upload(ada, "a.dat", b"Ada's", prefix=SHELF)
        assert (await store.request(twin, "DELETE", f"/{SHELF}/a.dat")).status == 403
        assert store.published(SHELF, "a.dat")
        assert (await store.request(ada, "DELETE", f"/{SHELF}/a.dat")).status == 204
    finally:
        await server.stop()


async def test_an_administrator_named_by_subject_may_delete_anothers_file(
    start_store: StartStore, ada: ClientCert, pki: Pki
) -> None:
    store = await start_store(admin_subjects=(f"CN=root,OU={UNIT},O={ORG},C={COUNTRY}",))
    root = await asyncio.to_thread(pki.client, "root")
    await store.upload(ada, "a.dat", b"Ada's", prefix=SHELF)

    assert (await store.request(root, "GET", "/_api/v1/identity")).json()["admin"] is True
    assert (await store.request(root, "DELETE", f"/{SHELF}/a.dat")).status == 204


async def test_control_characters_of_a_subject_never_reach_the_log_raw(
    store: TlsStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="datastore")
    eve = await asyncio.to_thread(
        store.pki.mint, "eve", subject=subject((NameOID.COMMON_NAME, "eve\x1b[2J\nINFO forged line"))
    )
    await store.upload(eve, "e.dat", b"Eve's", prefix=SHELF)
    messages = [record.getMessage() for record in caplog.records if record.name.startswith("datastore")]
    assert any("eve\\x1b[2J\\nINFO forged line" in message for message in messages), messages
    assert not any("\x1b" in message or "\n" in message for message in messages)


async def test_an_administrators_subject_from_another_trusted_ca_is_no_administrator(
    pki: Pki, ada: ClientCert, tmp_path: Path
) -> None:
    twin, context = await twin_from_another_ca(pki, ada, tmp_path)
    root, state = tmp_path / "two-cas", tmp_path / "state"
    # With two client CAs a subject alone would let either mint an administrator: the issuer must be named.
    with pytest.raises(ValueError, match="name the issuer of the administrators' certificates"):
        HTTPSTransferServer(make_settings(root, state, admin_subjects=(ADA_SUBJECT,)), context)
    settings = make_settings(root, state, admin_subjects=(ADA_SUBJECT,), admin_issuer=CA_SUBJECT)
    server = HTTPSTransferServer(settings, context)
    shelf = DirectoryHandler(root / SHELF, catalogue=state / "shelf.sqlite3")
    server.register_prefix(SHELF, shelf)
    store = TlsStore(server, RecordingHandler(root / PREFIX, state / "files.sqlite3"), shelf, pki, root)
    await server.start()
    try:
        assert (await store.request(ada, "GET", "/_api/v1/identity")).json()["admin"] is True
        assert (await store.request(twin, "GET", "/_api/v1/identity")).json()["admin"] is False
    finally:
        await server.stop()


@pytest.mark.parametrize("subject", ["/O=Lab/CN=ada", "cn=ada, o=Lab;bad"])
def test_an_administrator_subject_that_is_no_rfc_4514_name_is_refused_at_start(subject: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="is no RFC 4514 name"):
        make_settings(tmp_path / "root", tmp_path / "state", admin_subjects=(subject,))


async def test_silent_connections_to_the_tls_port_count_against_the_cap_during_their_handshake(
    start_store: StartStore, ada: ClientCert, caplog: pytest.LogCaptureFixture
) -> None:
    # A handshake time far beyond anything the test waits for: the silent ones are still counted when the
    # ninth arrives, however slow the machine.
    store = await start_store(max_connections=8, tls_handshake_timeout=10 * WAIT)
    silent = [await asyncio.open_connection("127.0.0.1", store.server.port) for _ in range(8)]
    try:
        # The ninth, a real client, finds the store full: closed before its handshake.
        assert await asyncio.to_thread(refused_request, store.server.port, store.pki.context(ada)) == "handshake"
        await until_logged(caplog, "refused 1 connection(s): the store holds 8 connections, as many as it may")
    finally:
        for _, writer in silent:
            writer.close()


async def test_silent_connections_to_the_tls_port_are_dropped_when_their_handshake_times_out(
    start_store: StartStore, ada: ClientCert
) -> None:
    store = await start_store(max_connections=8, tls_handshake_timeout=1.0)
    silent = [await asyncio.open_connection("127.0.0.1", store.server.port) for _ in range(8)]
    try:
        for reader, _ in silent:
            async with asyncio.timeout(WAIT):
                assert await reader.read() == b""
        # Dropped, they give their places back (while held, a ninth is refused: the test above).
        assert (await store.request(ada, "GET", f"/{PREFIX}/")).status == 200
    finally:
        for _, writer in silent:
            writer.close()
