"""Who is making a request, as the handlers see it.

On plain HTTP the identity is whatever the client puts in ``X-Client-DN``:
an opaque string, asserted and never verified, so it is marked
unauthenticated. AccessGrid 2.x clients sent a DN, an XML blob, or the
literal ``None`` (GSI clients); the last, like an absent header, means
anonymous. On the TLS server the identity comes from the verified client
certificate and is authenticated.

:class:`Identity` keeps the ``dn`` attribute of AccessGrid's
``IdentityToken`` so legacy handlers can read ``id_token.dn`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Header that carries the client's asserted identity on plain HTTP.
DN_HEADER = "X-Client-DN"


@dataclass(frozen=True, slots=True)
class Identity:
    """The identity behind a request.

    ``dn`` is ``None`` for an anonymous client. ``authenticated`` is true only
    when a transport proved the identity (a verified client certificate);
    then ``issuer``, ``serial`` and ``fingerprint`` (SHA-256 of the
    certificate, hex) describe the certificate. Two identities are equal
    when their DN and authentication agree, so a renewed certificate with
    the same subject is the same identity.
    """

    dn: str | None
    authenticated: bool = False
    issuer: str | None = field(default=None, compare=False)
    serial: str | None = field(default=None, compare=False)
    fingerprint: str | None = field(default=None, compare=False)

    @property
    def anonymous(self) -> bool:
        """True when the client gave no identity at all."""
        return self.dn is None

    def __str__(self) -> str:
        return self.dn if self.dn is not None else "anonymous"


ANONYMOUS = Identity(dn=None)


def identity_from_header(value: str | None) -> Identity:
    """The unauthenticated identity asserted by an ``X-Client-DN`` header value."""
    if value is None:
        return ANONYMOUS
    # Header bytes that are not UTF-8 arrive as surrogates; keep them visible
    # but storable.
    value = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").strip()
    if value in ("", "None"):
        return ANONYMOUS
    return Identity(dn=value, authenticated=False)
