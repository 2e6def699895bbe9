"""TLS for the store: a server context that requires client certificates,
the identity of a verified peer, and revocation that holds for every request.

The context accepts TLS 1.2 and 1.3 only, with forward-secret AEAD ciphers,
and refuses any client that presents no certificate or one that does not
chain to a configured client CA, is outside its validity period or is
revoked by the loaded CRL — at the handshake, before a byte of HTTP.

A handshake is not the only gate: a TLS 1.2 session can be resumed without
verifying the certificate again, and a connection opened before a
revocation stays open. So every request checks its peer certificate again
(:func:`certificate_identity`): expiry against the clock, revocation against
the CRL as last loaded. Session tickets are off, so TLS 1.3 clients always
make a full handshake. When the CRL is reloaded, connections of newly
revoked certificates are closed (``TransferServer.reload``).

A new CRL is also added to the live context's store; OpenSSL prefers, among
the CRLs of one issuer, the one with the latest ``thisUpdate``, so
revocations take effect for new handshakes at once (``datastore certs``
dates every CRL after the previous one).

Identities are the certificate's subject and issuer in RFC 4514 form,
compared as such, never as the AccessGrid-style one-line DN that legacy
handlers read as ``identity.dn``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..errors import CertificateRefused, NotAuthorized
from .identity import Identity, IdentityKind

log = logging.getLogger(__name__)

# TLS 1.2 suites with forward secrecy and AEAD; TLS 1.3 suites are OpenSSL's defaults.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS"

# Short names of the attributes in AccessGrid's one-line DN form.
_SHORT_NAMES = {
    NameOID.COUNTRY_NAME: "C",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.LOCALITY_NAME: "L",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.COMMON_NAME: "CN",
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.DOMAIN_COMPONENT: "DC",
    NameOID.USER_ID: "UID",
}

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def server_context(certificate: Path, key: Path, client_cas: Sequence[Path], crl: Path | None = None) -> ssl.SSLContext:
    """A server context that requires a client certificate from one of ``client_cas``."""
    if not client_cas:
        raise ValueError("at least one client CA is needed to verify client certificates")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    # No TLS 1.2 tickets; OpenSSL still keeps TLS 1.2 sessions by their ID (the ssl module cannot turn that
    # cache off), so a TLS 1.2 client may resume one: certificate_identity checks every request.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET
    # No TLS 1.3 session tickets either: a resumed session skips the certificate check.
    context.num_tickets = 0
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(certificate, key)
    for ca in client_cas:
        context.load_verify_locations(cafile=ca)
    if crl is not None:
        context.load_verify_locations(cafile=crl)
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """What the store needs of a client certificate, parsed once per certificate."""

    subject: str
    issuer: str
    dn: str
    serial: int
    fingerprint: str
    not_before: float
    not_after: float


@lru_cache(maxsize=4096)
def peer_certificate(der: bytes) -> PeerCertificate:
    """Parse a DER certificate (remembered: a connection presents the same one with every request)."""
    certificate = x509.load_der_x509_certificate(der)
    return PeerCertificate(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        dn=format_dn(certificate.subject),
        serial=certificate.serial_number,
        fingerprint=hashlib.sha256(der).hexdigest(),
        not_before=certificate.not_valid_before_utc.timestamp(),
        not_after=certificate.not_valid_after_utc.timestamp(),
    )


class CrlReloader:
    """Keeps a context's CRL current, and the revoked serials for the per-request check.

    ``reload()`` on demand (SIGHUP), ``check()`` when the file changed.
    """

    def __init__(self, context: ssl.SSLContext, path: Path) -> None:
        self.context = context
        self.path = path
        self._stamp = self._read_stamp()
        #: Per issuer (RFC 4514), the newest CRL loaded: its thisUpdate and the serials it revokes.
        #: As in OpenSSL's store, a CRL replaces an older one of the same issuer.
        self._crls: dict[str, tuple[float, frozenset[int]]] = {}
        try:
            self._crls = _newest_crls(self.path.read_bytes(), {})
        except (OSError, ValueError) as exc:
            log.error("cannot read the CRL %s: %s", self.path, exc)

    def reload(self) -> bool:
        """Add the CRL file's current contents to the context; False (logged) if it cannot be read."""
        try:
            crls = _newest_crls(self.path.read_bytes(), self._crls)
            self.context.load_verify_locations(cafile=self.path)
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.error("cannot reload the CRL %s: %s", self.path, exc)
            return False
        self._crls = crls
        self._stamp = self._read_stamp()
        log.info("reloaded the CRL %s (%d revoked)", self.path, sum(len(s) for _, s in crls.values()))
        return True

    def check(self) -> bool:
        """Reload if the file changed since the last load; True if it did."""
        if self._read_stamp() == self._stamp:
            return False
        return self.reload()

    def is_revoked(self, peer: PeerCertificate) -> bool:
        """Whether the newest CRL of ``peer``'s issuer revokes it."""
        crl = self._crls.get(peer.issuer)
        return crl is not None and peer.serial in crl[1]

    def _read_stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)


def _newest_crls(
    data: bytes, known: dict[str, tuple[float, frozenset[int]]]
) -> dict[str, tuple[float, frozenset[int]]]:
    """``known`` updated with the PEM CRLs in ``data`` that are at least as new; ValueError if one is unreadable."""
    crls = dict(known)
    for block in _PEM_CRL.findall(data):
        crl = x509.load_pem_x509_crl(block)
        issuer = crl.issuer.rfc4514_string()
        updated = crl.last_update_utc.timestamp()
        if issuer not in crls or updated >= crls[issuer][0]:
            crls[issuer] = (updated, frozenset(entry.serial_number for entry in crl))
    return crls


def certificate_identity(
    ssl_object: Any,
    *,
    crl: CrlReloader | None = None,
    admins: Collection[tuple[str, str]] = (),
    now: float | None = None,
) -> Identity:
    """The authenticated identity of the verified peer of ``ssl_object``, checked for this request.

    Raises CertificateRefused (403, and the connection is closed) if the
    certificate has expired, is not yet valid, or the CRL revokes it;
    NotAuthorized if the peer presented no certificate (which a context from
    :func:`server_context` never lets through). ``admins`` are the (subject,
    issuer) pairs made administrators (:func:`administrators`).
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise NotAuthorized("no client certificate")
    peer = peer_certificate(der)
    now = time.time() if now is None else now
    if now >= peer.not_after:
        raise CertificateRefused("the client certificate has expired")
    if now < peer.not_before:
        raise CertificateRefused("the client certificate is not valid yet")
    if crl is not None and crl.is_revoked(peer):
        raise CertificateRefused("the client certificate has been revoked")
    return Identity(
        IdentityKind.CERTIFICATE,
        peer.subject,
        peer.issuer,
        dn=peer.dn,
        admin=(peer.subject, peer.issuer) in admins,
        serial=f"{peer.serial:X}",
        fingerprint=peer.fingerprint,
    )


def administrators(context: ssl.SSLContext, subjects: Iterable[str], issuer: str | None) -> frozenset[tuple[str, str]]:
    """The (subject, issuer) pairs of the administrators' certificates.

    ``issuer`` defaults to the subject of the context's one client CA: with
    several, a subject alone would let any of them mint an administrator, so
    ValueError asks for the issuer.
    """
    names = [normalise_subject(subject) for subject in subjects]
    if not names:
        return frozenset()
    if issuer is None:
        authorities = {x509.load_der_x509_certificate(der).subject for der in context.get_ca_certs(binary_form=True)}
        if len(authorities) != 1:
            raise ValueError(
                "with several client CAs, name the issuer of the administrators' certificates (admin_issuer)"
            )
        issuer = next(iter(authorities)).rfc4514_string()
    return frozenset((name, normalise_subject(issuer)) for name in names)


def normalise_subject(text: str) -> str:
    """An RFC 4514 subject as the store writes it (ValueError if it is not one)."""
    return x509.Name.from_rfc4514_string(text).rfc4514_string()


def format_dn(name: x509.Name) -> str:
    """AccessGrid's one-line form, ``/C=US/O=Lab/CN=Ada``, for display and legacy handlers.

    A ``/`` or ``\\`` inside a value is escaped with a backslash, so the
    form is never ambiguous; it is still never used to compare identities.
    """
    parts = []
    for rdn in name.rdns:
        for attribute in rdn:
            label = _SHORT_NAMES.get(attribute.oid, attribute.oid.dotted_string)
            value = attribute.value if isinstance(attribute.value, str) else attribute.value.hex()
            parts.append(f"/{label}={value.replace(chr(92), chr(92) * 2).replace('/', chr(92) + '/')}")
    return "".join(parts)
