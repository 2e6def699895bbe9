"""TLS for the store: a server context that requires client certificates,
the identity of a verified peer, and CRL reloading without a restart.

The context accepts TLS 1.2 and 1.3 only, with forward-secret AEAD ciphers,
and refuses any client that presents no certificate or one that does not
chain to a configured client CA, is outside its validity period or is
revoked by the loaded CRL — all at the handshake, before a byte of HTTP.

A new CRL is added to the live context's store; OpenSSL prefers, among the
CRLs of one issuer, the one with the latest ``thisUpdate``, so revocations
take effect for new connections at once (``datastore certs`` dates every
CRL after the previous one).
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import NotAuthorized
from .identity import Identity

log = logging.getLogger(__name__)

# TLS 1.2 suites with forward secrecy and AEAD; TLS 1.3 suites are OpenSSL's defaults.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS"

# Short names of the attributes in AccessGrid's one-line DN form.
_SHORT_NAMES = {
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "commonName": "CN",
    "emailAddress": "emailAddress",
    "domainComponent": "DC",
    "userId": "UID",
}


def server_context(certificate: Path, key: Path, client_cas: Sequence[Path], crl: Path | None = None) -> ssl.SSLContext:
    """A server context that requires a client certificate from one of ``client_cas``."""
    if not client_cas:
        raise ValueError("at least one client CA is needed to verify client certificates")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(certificate, key)
    for ca in client_cas:
        context.load_verify_locations(cafile=ca)
    if crl is not None:
        context.load_verify_locations(cafile=crl)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


class CrlReloader:
    """Keeps a context's CRL current: ``reload()`` on demand, ``check()`` when the file changed."""

    def __init__(self, context: ssl.SSLContext, path: Path) -> None:
        self.context = context
        self.path = path
        self._stamp = self._read_stamp()

    def reload(self) -> bool:
        """Add the CRL file's current contents to the context; False (logged) if it cannot be read."""
        try:
            self.context.load_verify_locations(cafile=self.path)
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot reload the CRL %s: %s", self.path, exc)
            return False
        self._stamp = self._read_stamp()
        log.info("reloaded the CRL %s", self.path)
        return True

    def check(self) -> bool:
        """Reload if the file changed since the last load; True if it did."""
        if self._read_stamp() == self._stamp:
            return False
        return self.reload()

    def _read_stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)


def identity_from_ssl(ssl_object: Any) -> Identity:
    """The authenticated identity of the verified peer of ``ssl_object``.

    Raises NotAuthorized if the peer presented no certificate (which a
    context from :func:`server_context` never lets through).
    """
    peer = ssl_object.getpeercert()
    der = ssl_object.getpeercert(binary_form=True)
    if not peer or not der:
        raise NotAuthorized("no client certificate")
    return Identity(
        dn=format_dn(peer.get("subject", ())),
        authenticated=True,
        issuer=format_dn(peer.get("issuer", ())),
        serial=str(peer.get("serialNumber", "")),
        fingerprint=hashlib.sha256(der).hexdigest(),
    )


def format_dn(name: Sequence[Sequence[tuple[str, str]]]) -> str:
    """``/C=US/O=Lab/CN=Ada`` from the tuple-of-RDNs form ``getpeercert()`` returns."""
    parts = []
    for rdn in name:
        for attribute, value in rdn:
            parts.append(f"/{_SHORT_NAMES.get(attribute, attribute)}={value}")
    return "".join(parts)
