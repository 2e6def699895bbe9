"""Access policies: who may list, read, upload to and delete from a prefix.

Pure: no aiohttp, no disk. A :class:`Policy` names an audience for each
action of a prefix:

* ``anyone``: every client, anonymous ones included;
* ``users``: any identity the store knows (a certificate, a token, or an
  ``X-Client-DN`` header the operator chose to trust);
* ``admins``: administrators only;
* for ``delete`` also ``owner``: the file's owner (or an administrator).

The default is safe: nothing for anonymous clients, everything for known
users, deletion only by the owner. On top of the audience, a token's holder
may do only what the token was issued for (:class:`~.identity.Grant`).
Owner-only rules that no policy loosens (deleting or overwriting another's
file, reading or cancelling another's transfer) are
:meth:`Identity.may_manage <datastore.security.identity.Identity.may_manage>`.

``show_owners`` says whether a listing names each file's owner to everyone
allowed to list (by default an owner is shown only to that owner and to
administrators), and ``tls_only`` whether a file uploaded over TLS is served
over TLS only when a plain listener runs beside it (default: yes).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum

from ..errors import NotAuthorized, Unauthorized
from .identity import Identity


class Action(StrEnum):
    """What a request does to a prefix."""

    LIST = "list"
    READ = "read"
    UPLOAD = "upload"
    DELETE = "delete"

    @property
    def scope(self) -> str:
        """The token action that covers it (listing is reading)."""
        return "read" if self is Action.LIST else self.value


class Audience(StrEnum):
    """Who an action is open to."""

    ANYONE = "anyone"
    USERS = "users"
    OWNER = "owner"
    ADMINS = "admins"


class PolicyError(ValueError):
    """A policy setting that cannot be used; the message names it."""


@dataclass(frozen=True, slots=True)
class Policy:
    """The access policy of one prefix (see the module docstring)."""

    list: Audience = Audience.USERS
    read: Audience = Audience.USERS
    upload: Audience = Audience.USERS
    delete: Audience = Audience.OWNER
    show_owners: bool = False
    tls_only: bool = True

    def __post_init__(self) -> None:
        for action in (Action.LIST, Action.READ, Action.UPLOAD):
            if self.audience(action) is Audience.OWNER:
                raise PolicyError(f"{action}: 'owner' applies to delete only; use anyone, users or admins")
        if self.delete not in (Audience.OWNER, Audience.ADMINS):
            raise PolicyError("delete: use owner (the owner or an administrator) or admins")

    def __str__(self) -> str:
        """``list=users read=users upload=users delete=owner show_owners=false tls_only=true``."""
        return " ".join(
            f"{item.name}={str(value).lower() if isinstance(value, bool) else value}"
            for item in fields(self)
            for value in (getattr(self, item.name),)
        )

    def audience(self, action: Action) -> Audience:
        """Who ``action`` is open to."""
        value: Audience = getattr(self, action.value)
        return value

    def check(self, identity: Identity, action: Action, prefix: str) -> None:
        """Raise Unauthorized (401: an anonymous client) or NotAuthorized (403), saying why,
        unless ``identity`` may do ``action`` on ``prefix``.

        For ``delete`` with audience ``owner`` this admits any identity
        that may delete at all; whether it owns the file is the caller's
        check.
        """
        grant = identity.grant
        if grant is not None and not grant.covers(action.scope, prefix):
            raise NotAuthorized(f"the token does not allow {action.scope} on /{prefix}/")
        if identity.admin:
            return
        audience = self.audience(action)
        if audience is Audience.ANYONE:
            return
        if audience is Audience.ADMINS:
            raise NotAuthorized(f"only administrators may {action} on /{prefix}/")
        if identity.anonymous:
            raise Unauthorized(f"sign in to {action} on /{prefix}/ (a token or a client certificate)")

    def allows(self, identity: Identity, action: Action, prefix: str) -> bool:
        """Whether :meth:`check` would pass."""
        try:
            self.check(identity, action, prefix)
        except (NotAuthorized, Unauthorized):
            return False
        return True

    def shows_owner(self, identity: Identity, owner: str | None) -> bool:
        """Whether a listing names ``owner`` (a stored principal) to ``identity``."""
        return self.show_owners or identity.may_manage(owner)
