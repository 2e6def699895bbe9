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

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

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


#: What an operator may set in a policy table, with the type of each.
POLICY_KEYS = {item.name: item.type for item in fields(Policy)}


def policy_from(values: Mapping[str, Any], base: Policy | None = None, *, where: str = "policy") -> Policy:
    """``base`` (default: the safe default) with ``values`` applied; PolicyError naming a bad key or value."""
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in POLICY_KEYS:
            raise PolicyError(f"{where}: unknown key {key!r} (use {', '.join(POLICY_KEYS)})")
        if name in ("show_owners", "tls_only"):
            changes[name] = _boolean(value, f"{where}.{key}")
        else:
            try:
                changes[name] = Audience(str(value).strip().lower())
            except ValueError:
                raise PolicyError(
                    f"{where}.{key}: {value!r} is not one of {', '.join(a.value for a in Audience)}"
                ) from None
    try:
        return replace(base if base is not None else Policy(), **changes)
    except PolicyError as exc:
        raise PolicyError(f"{where}: {exc}") from None


def parse_rules(text: str, base: Policy | None = None) -> Policy:
    """``"read=anyone,list=anyone"`` (flags and environment variables) applied to ``base``."""
    values: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise PolicyError(f"policy rule {part.strip()!r}: write ACTION=AUDIENCE, e.g. read=anyone")
        values[key.strip()] = value.strip()
    return policy_from(values, base)


def _boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise PolicyError(f"{where}: {value!r} is not true or false")
