"""Certificates for mutual TLS: a CA, server certificates, client certificates,
revocation and the CRL.

Everything lives in one directory (``certs/`` by default) under fixed names
that scripts can rely on::

    ca.pem, ca.key            the certificate authority (created once, never overwritten)
    server.pem, server.key    the server's certificate, with subjectAltNames
    NAME.pem, NAME.key        a client's certificate and key
    NAME.p12                  the same as a password-protected PKCS#12 bundle, for browsers
    crl.pem                   the certificate revocation list, signed by the CA
    revoked.json              what has been revoked, from which crl.pem is rebuilt

Private keys and bundles are written with mode 0600. Keys are ECDSA P-256.
pyOpenSSL 24 and later defer building certificates and CRLs to
``cryptography``, which is used for that; pyOpenSSL's X509 store checks
every certificate issued here against the CA before it is written.

The module's functions raise :class:`CertificateError` with a one-line
message for every user error (an existing CA, an unknown name).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto

#: Where ``datastore certs`` writes unless told otherwise.
DEFAULT_DIR = Path("certs")

_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RESERVED_NAMES = frozenset({"ca", "server", "crl", "revoked"})


class CertificateError(Exception):
    """A certificate operation cannot be done; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its key, in memory."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def now() -> datetime.datetime:
    """The current time in UTC, to the second (certificate times have no fractions)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


# -- building blocks (pure: no files) ---------------------------------------------------------


def make_name(
    common_name: str, *, organization: str | None = None, unit: str | None = None, country: str | None = None
) -> x509.Name:
    """An X.509 name in the order AccessGrid DNs are written: C, O, OU, CN."""
    attributes = []
    if country:
        attributes.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if unit:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def make_ca(subject: x509.Name, *, not_before: datetime.datetime | None = None, days: int = 3650) -> Issued:
    """A self-signed certificate authority."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or now() - datetime.timedelta(minutes=5)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def issue(
    ca: Issued,
    subject: x509.Name,
    *,
    server_names: Sequence[str] = (),
    client: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    days: int = 365,
) -> Issued:
    """A certificate signed by ``ca``: for a server (with subjectAltNames) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or now() - datetime.timedelta(minutes=5)
    end = not_after or start + datetime.timedelta(days=days)
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in server_names]), critical=False
        )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def make_crl(
    ca: Issued,
    revoked: Sequence[tuple[int, datetime.datetime]],
    *,
    last_update: datetime.datetime | None = None,
    days: int = 30,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``ca`` listing ``(serial, revocation time)`` pairs."""
    start = last_update or now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(start)
        .next_update(start + datetime.timedelta(days=days))
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def agtk_dn(name: x509.Name) -> str:
    """The AccessGrid one-line form of a name: ``/C=US/O=Lab/OU=Unit/CN=Ada``."""
    parts = []
    for rdn in name.rdns:
        for attribute in rdn:
            parts.append(f"/{attribute.rfc4514_attribute_name}={attribute.value!s}")
    return "".join(parts)


def verify_with_pyopenssl(ca: x509.Certificate, certificate: x509.Certificate) -> None:
    """Check that ``certificate`` chains to ``ca`` and is within its validity, with pyOpenSSL."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(ca))
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(certificate))
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as exc:
        raise CertificateError(f"the new certificate does not verify against the CA: {exc}") from None


# -- the certs/ directory --------------------------------------------------------------------


class CertificateDirectory:
    """The files of one CA: what ``datastore certs`` reads and writes."""

    def __init__(self, directory: Path = DEFAULT_DIR) -> None:
        self.directory = Path(directory)

    def path(self, name: str, suffix: str) -> Path:
        """``DIR/NAME.suffix``."""
        return self.directory / f"{name}.{suffix}"

    def init(self, *, organization: str = "datastore", common_name: str | None = None, days: int = 3650) -> Path:
        """Create the CA; refuse if one exists. Returns the path of ca.pem."""
        certificate, key = self.path("ca", "pem"), self.path("ca", "key")
        if certificate.exists() or key.exists():
            raise CertificateError(f"a CA already exists in {self.directory} (ca.pem/ca.key); not overwriting it")
        ca = make_ca(make_name(common_name or f"{organization} CA", organization=organization), days=days)
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_private(key, _key_pem(ca.key))
        _write_public(certificate, ca.certificate.public_bytes(serialization.Encoding.PEM))
        self.write_crl()
        return certificate

    def load_ca(self) -> Issued:
        """The CA certificate and key."""
        try:
            certificate = x509.load_pem_x509_certificate(self.path("ca", "pem").read_bytes())
            key = serialization.load_pem_private_key(self.path("ca", "key").read_bytes(), password=None)
        except FileNotFoundError:
            raise CertificateError(f"no CA in {self.directory}: run 'datastore certs init' first") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError("ca.key is not an ECDSA key written by datastore")
        return Issued(certificate, key)

    def issue_server(self, hostnames: Sequence[str], *, days: int = 397) -> Path:
        """server.pem/server.key for ``hostnames`` (DNS names or IP addresses)."""
        if not hostnames:
            raise CertificateError("name at least one host name or address for the server certificate")
        ca = self.load_ca()
        issued = issue(ca, make_name(hostnames[0], organization=_organization(ca)), server_names=hostnames, days=days)
        verify_with_pyopenssl(ca.certificate, issued.certificate)
        _write_private(self.path("server", "key"), _key_pem(issued.key))
        _write_public(self.path("server", "pem"), issued.certificate.public_bytes(serialization.Encoding.PEM))
        return self.path("server", "pem")

    def issue_client(
        self,
        name: str,
        *,
        organization: str | None = None,
        unit: str | None = None,
        country: str | None = None,
        password: str | None = None,
        days: int = 365,
    ) -> tuple[Path, str]:
        """NAME.pem/.key/.p12 for a client; returns the certificate path and the bundle's password."""
        check_client_name(name)
        if self.path(name, "pem").exists():
            raise CertificateError(f"{name}.pem already exists in {self.directory}; revoke it or choose another name")
        ca = self.load_ca()
        subject = make_name(name, organization=organization or _organization(ca), unit=unit, country=country)
        issued = issue(ca, subject, client=True, days=days)
        verify_with_pyopenssl(ca.certificate, issued.certificate)
        password = password if password is not None else secrets.token_urlsafe(12)
        bundle = pkcs12.serialize_key_and_certificates(
            name.encode(),
            issued.key,
            issued.certificate,
            [ca.certificate],
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(50_000)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(password.encode()),
        )
        _write_private(self.path(name, "key"), _key_pem(issued.key))
        _write_private(self.path(name, "p12"), bundle)
        _write_public(self.path(name, "pem"), issued.certificate.public_bytes(serialization.Encoding.PEM))
        return self.path(name, "pem"), password

    def revoke(self, name: str) -> int:
        """Add NAME's certificate to the revoked list and rewrite crl.pem; returns its serial."""
        check_client_name(name)
        try:
            certificate = x509.load_pem_x509_certificate(self.path(name, "pem").read_bytes())
        except FileNotFoundError:
            raise CertificateError(f"no certificate {name}.pem in {self.directory}") from None
        revoked = self._revoked()
        serial = certificate.serial_number
        if all(entry["serial"] != str(serial) for entry in revoked):
            revoked.append({"name": name, "serial": str(serial), "revoked_at": now().isoformat()})
            _write_public(self.path("revoked", "json"), json.dumps(revoked, indent=2).encode() + b"\n")
        self.write_crl()
        return serial

    def write_crl(self, *, days: int = 30) -> Path:
        """Rebuild crl.pem from revoked.json.

        Each new CRL is dated at least one second after the previous one (the
        call waits out the second if needed), so a server that adds it to its
        store without a restart prefers it.
        """
        ca = self.load_ca()
        revoked = [
            (int(entry["serial"]), datetime.datetime.fromisoformat(entry["revoked_at"])) for entry in self._revoked()
        ]
        last_update = now()
        previous = self.path("crl", "pem")
        if previous.exists():
            earlier = x509.load_pem_x509_crl(previous.read_bytes()).last_update_utc
            # Strictly later than the previous CRL, but never in the future (OpenSSL
            # would take a CRL from the future as not yet valid): wait out the second.
            while last_update <= earlier:
                time.sleep(min(1.0, (earlier - last_update).total_seconds() + 0.05))
                last_update = now()
        crl = make_crl(ca, revoked, last_update=last_update, days=days)
        _write_public(previous, crl.public_bytes(serialization.Encoding.PEM))
        return previous

    def _revoked(self) -> list[dict[str, str]]:
        try:
            entries: list[dict[str, str]] = json.loads(self.path("revoked", "json").read_text())
        except FileNotFoundError:
            return []
        return entries


def check_client_name(name: str) -> str:
    """A client name is also a file name: letters, digits, ``.``, ``_``, ``-``."""
    if not _CLIENT_NAME.match(name) or name in _RESERVED_NAMES:
        raise CertificateError(
            f"invalid client name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - (not ca, server, crl or revoked)"
        )
    return name


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Digital signatures; for a CA also certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _organization(ca: Issued) -> str | None:
    values = ca.certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(values[0].value) if values else None


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret: mode 0600 from the first byte, replacing atomically."""
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write_public(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        partial.write_bytes(data)
        partial.chmod(0o644)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
