"""Who is making a request, as the handlers and the access policies see it.

An identity has a kind, and is compared by kind, subject and issuer, never
by a display string:

* ``certificate``: a verified TLS client certificate; the subject and the
  issuer are the certificate's names in RFC 4514 form (so a subject
  attribute holding ``/OU=`` or ``,`` can never pass for another subject);
* ``token``: a bearer token this store issued (``datastore tokens``); the
  subject is the name the operator gave the token's holder;
* ``asserted``: an ``X-Client-DN`` header, honoured only when the operator
  trusts it (``--trust-client-dn``, for AccessGrid 2.x clients on a trusted
  network); the subject is the header's value, proved by nothing;
* ``anonymous``: none of these.

Two identities of different kinds are never the same person to the store: a
DN typed into a header does not own what a certificate with that subject
uploaded. :attr:`Identity.principal` is the one string form of that key,
stored as the owner of transfers and files.

:class:`Identity` keeps the ``dn`` attribute of AccessGrid's
``IdentityToken`` so legacy handlers can read ``id_token.dn`` unchanged: for
a certificate it is the subject in AccessGrid's one-line form
(``/C=US/O=Lab/CN=Ada``), shown to people but never compared.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from enum import StrEnum

from ..errors import BadRequest
from .logsafe import printable

#: Header that carries the client's asserted identity on plain HTTP.
DN_HEADER = "X-Client-DN"

#: The longest identity accepted, in UTF-8 bytes: a subject, an issuer or a header value.
MAX_IDENTITY_BYTES = 1024


class IdentityKind(StrEnum):
    """How an identity was established, strongest last."""

    ANONYMOUS = "anonymous"
    ASSERTED = "asserted"
    TOKEN = "token"  # noqa: S105 - the name of a kind, not a secret
    CERTIFICATE = "certificate"


@dataclass(frozen=True, slots=True)
class Grant:
    """What a bearer token allows: actions (``read``, ``upload``, ``delete``, ``metrics``, ``admin``) on prefixes.

    ``prefixes`` is ``None`` for every prefix. ``token_id`` is the token's
    public identifier (never the secret).
    """

    token_id: str
    actions: frozenset[str]
    prefixes: frozenset[str] | None
    expires_at: float
    #: A voucher's further scope: the file names it covers (None: any), and whether its bytes are
    #: counted against a budget (checked where they arrive or leave).
    names: frozenset[str] | None = None
    budget: int | None = None

    def covers_name(self, name: str | None) -> bool:
        """Whether the token reaches the file ``name`` (None: no single file, as a listing)."""
        return self.names is None or (name is not None and name in self.names)

    def covers(self, action: str, prefix: str | None) -> bool:
        """Whether the token was issued for ``action`` on ``prefix`` (``None``: no prefix involved)."""
        if "admin" in self.actions:
            return True
        if action not in self.actions:
            return False
        return prefix is None or self.prefixes is None or prefix in self.prefixes


@dataclass(frozen=True, slots=True)
class Identity:
    """The identity behind a request.

    Equal when kind, subject and issuer are equal. ``dn`` is the
    AccessGrid-style name for display and legacy handlers; ``admin`` says
    whether the operator made this identity an administrator; ``grant``
    limits a token's holder to what the token was issued for; ``serial`` and
    ``fingerprint`` (SHA-256, hex) describe a certificate.
    """

    kind: IdentityKind
    subject: str | None = None
    issuer: str | None = None
    dn: str | None = field(default=None, compare=False)
    admin: bool = field(default=False, compare=False)
    grant: Grant | None = field(default=None, compare=False)
    serial: str | None = field(default=None, compare=False)
    fingerprint: str | None = field(default=None, compare=False)

    @classmethod
    def asserted(cls, subject: str) -> Identity:
        """The identity an ``X-Client-DN`` header asserts."""
        return cls(IdentityKind.ASSERTED, subject, dn=subject)

    @classmethod
    def from_principal(cls, principal: str | None, dn: str | None = None) -> Identity:
        """The identity a stored :attr:`principal` names (without a token's grant or admin rights)."""
        if principal is None:
            return ANONYMOUS
        kind, subject, issuer = _parsed_principal(principal)
        return cls(kind, subject, issuer, dn=dn if dn is not None else subject)

    @property
    def anonymous(self) -> bool:
        """True when the client is nobody the store knows."""
        return self.kind is IdentityKind.ANONYMOUS

    @property
    def authenticated(self) -> bool:
        """True when something the store trusts proved the identity (a certificate or a token)."""
        return self.kind in (IdentityKind.CERTIFICATE, IdentityKind.TOKEN)

    @property
    def principal(self) -> str | None:
        """The stored form of this identity as an owner; ``None`` for anonymous (who owns nothing)."""
        if self.anonymous:
            return None
        return _principal(self.kind, self.subject, self.issuer)

    def owns(self, principal: str | None) -> bool:
        """Whether this identity is the owner recorded as ``principal``."""
        return principal is not None and principal == self.principal

    def may_manage(self, principal: str | None) -> bool:
        """Whether this identity may delete, overwrite, query or cancel what ``principal`` owns."""
        return self.admin or self.owns(principal)

    def __str__(self) -> str:
        """A one-line, printable form for logs: control characters escaped."""
        if self.anonymous:
            return "anonymous"
        return f"{self.kind.value}:{printable(self.dn or self.subject or '')}"


ANONYMOUS = Identity(IdentityKind.ANONYMOUS)


def principal_name(principal: str | None) -> str | None:
    """The subject inside a stored principal, for showing an owner to a person."""
    if principal is None:
        return None
    try:
        parts = json.loads(principal)
    except ValueError:
        return principal  # a catalogue written before principals: the DN itself
    return str(parts[1]) if isinstance(parts, list) and len(parts) > 1 else principal


def identity_from_header(value: str | None) -> Identity:
    """The asserted identity of an ``X-Client-DN`` header value.

    AccessGrid 2.x clients sent a DN, an XML blob, or the literal ``None``
    (GSI clients); the last, like an absent or empty header, means
    anonymous. A value longer than :data:`MAX_IDENTITY_BYTES` is refused
    (400): each transfer stores its owner.
    """
    if value is None:
        return ANONYMOUS
    # Header bytes that are not UTF-8 arrive as surrogates; keep them visible but storable.
    value = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").strip()
    if value in ("", "None"):
        return ANONYMOUS
    check_length(value, DN_HEADER)
    return Identity.asserted(value)


def check_length(value: str, what: str) -> str:
    """``value``, if it fits in :data:`MAX_IDENTITY_BYTES`; else 400 naming ``what``."""
    if len(value.encode("utf-8", "surrogatepass")) > MAX_IDENTITY_BYTES:
        raise BadRequest(f"{what} is longer than {MAX_IDENTITY_BYTES} bytes")
    return value


# The principals of the identities met lately, both ways (an identity is asked for its principal at
# every record it owns, and a stored one read back at every record loaded).


@functools.lru_cache(maxsize=4096)
def _principal(kind: IdentityKind, subject: str | None, issuer: str | None) -> str:
    parts = [kind.value, subject] + ([issuer] if issuer is not None else [])
    return json.dumps(parts, ensure_ascii=False, separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def _parsed_principal(principal: str) -> tuple[IdentityKind, str | None, str | None]:
    kind, subject, *issuer = json.loads(principal)
    return IdentityKind(kind), subject, issuer[0] if issuer else None
