"""Bearer tokens issued by the store: create, verify on every request, list, revoke; and the vouchers
and invitations built on them. This module owns every rule about them (the token format, hashing,
validation, how a record is built and read back, states, expiry and purging, budgets); where the
records are kept is a backend's business, and a backend only runs SQL (:class:`TokenBackend`):
``tokens_sqlite.py`` (the file ``tokens.sqlite3`` in a node's state directory, the default) and
``tokens_postgres.py`` (a table in the PostgreSQL state database every node shares), chosen from the
state setting by :func:`open_token_store`.

A token is ``dst_<id>_<secret>``: ``id`` (12 hex digits) names it in lists
and revocations, ``secret`` is 256 bits from ``secrets``. Only the SHA-256
of the whole token is stored; a token's secret is shown once, when it is
created, and never logged. A fast hash is the right one here: the secret
has 256 bits of entropy, so there is nothing to brute-force, and verifying
must be cheap because it runs on every request (a lookup by id, then a
constant-time comparison).

Each token is issued for one identity (its *subject*, a name the operator
chooses: ``ada``, or a DN for AccessGrid venues), with *actions*
(``read``: list and download; ``upload``; ``delete``; ``metrics``: read the
metrics page, for a scraper; ``jobs``: submit and manage one's transfer jobs; ``admin``: everything, including managing
tokens) on *prefixes* (all, or a list), and an expiry.
Revoked and expired tokens are refused at once (401); revoked ones are
purged from the list a while after they expire.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..config import Settings, SettingsError, check_prefix
from ..errors import DatastoreError, QuotaExceeded
from ..protocol.timestamps import iso_time
from .identity import Grant, Identity, IdentityKind, check_length

#: What a token may be issued for.
ACTIONS = ("read", "upload", "delete", "metrics", "jobs", "admin")

#: A voucher's byte budget stays below this (the backends' 64-bit integers, with room to add to it).
MAX_BUDGET = 2**62

#: Default and longest lifetime of a token, in seconds.
DEFAULT_LIFETIME = 30 * 24 * 3600.0
MAX_LIFETIME = 5 * 365 * 24 * 3600.0

_TOKEN = re.compile(r"^dst_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")

#: A token's row as a backend keeps it: column name -> value (the columns of :data:`COLUMNS`).
Row = Mapping[str, Any]

#: Every column of a token's row. ``actions`` and ``prefixes`` are space-separated (``prefixes``
#: NULL for every prefix), ``names`` a JSON list (NULL: any name); the rest as in :class:`TokenRecord`,
#: and ``hash`` the SHA-256 of the token.
COLUMNS = (
    "id",
    "hash",
    "subject",
    "actions",
    "prefixes",
    "description",
    "created_at",
    "expires_at",
    "revoked_at",
    "names",
    "budget",
    "used",
    "invitation",
    "requester",
    "answer_by",
    "answered_by",
    "answered_at",
)


class TokenBackend(Protocol):
    """Where the rows of tokens are kept: SQL and connections, no rule of their own. Each method is
    one transaction; the callbacks it is given (pure Python, no I/O) run inside it, and what they
    raise rolls it back and reaches the caller."""

    async def insert(self, row: Row, admit: Callable[[Sequence[Row]], None] | None = None) -> None:
        """Add ``row``. With ``admit``: first call it with every row of the same ``description``,
        which no other transaction adds to meanwhile (it raises to refuse the row)."""

    async def get(self, token_id: str) -> Row | None:
        """The row of ``token_id``, if there is one."""

    async def rows(self, *, invitations: bool) -> Sequence[Row]:
        """Every row (with ``invitations``: those whose ``invitation`` is set), in no order."""

    async def count(self) -> int:
        """How many rows there are."""

    async def change(self, token_id: str, change: Callable[[Row], Row | None]) -> RowChange | None:
        """Hold the row of ``token_id`` (no other transaction changes it until this one ends), call
        ``change`` with it and set the columns it returns: what that made of the row
        (:func:`change_row`), or None if there is no such row."""

    async def delete(self, doomed: Callable[[Row], bool]) -> int:
        """Delete the rows ``doomed`` says to (those it was not asked about stay); how many."""

    async def close(self) -> None:
        """Close the connections; a later call opens them again."""


@dataclass(frozen=True, slots=True)
class RowChange:
    """What a change made of a row: the row after it, and the columns it sets (none: it changed nothing)."""

    after: Row
    sets: Row


def change_row(row: Row | None, change: Callable[[Row], Row | None]) -> RowChange | None:
    """What ``change`` (which returns the columns to set, or None) makes of ``row``; None if there is no
    row. ValueError if it would set a column not of :data:`COLUMNS`."""
    if row is None:
        return None
    sets = change(row) or {}
    checked_columns(sets)
    return RowChange({**row, **sets}, sets)


def open_token_store(settings: Settings) -> TokenStore:
    """The token store of the state the settings name: beside a SQLite state, the file
    ``tokens.sqlite3`` of the state directory (each node its own, as always); with a
    ``postgresql://`` state, a table in that database, shared by every node. Opened lazily."""
    url = settings.effective_state_url
    if url.startswith("sqlite:///"):
        from .tokens_sqlite import SqliteTokens

        return TokenStore(SqliteTokens(settings.effective_state_dir / "tokens.sqlite3"))
    if url.startswith(("postgresql://", "postgres://")):
        from .tokens_postgres import PostgresTokens

        return TokenStore(PostgresTokens(url))
    raise ValueError(f"no token store for {url!r}: use sqlite:///PATH or postgresql://...")


def checked_columns(values: Row) -> list[str]:
    """The columns ``values`` sets, in its order (for a backend's SQL); ValueError for one not of :data:`COLUMNS`."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise ValueError(f"no token column {sorted(unknown)[0]!r}")
    return list(values)


class TokenError(ValueError):
    """A token cannot be issued as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A token as stored (never its secret)."""

    id: str
    subject: str
    actions: frozenset[str]
    prefixes: frozenset[str] | None
    description: str
    created_at: float
    expires_at: float
    revoked_at: float | None
    #: A voucher's scope beyond actions and prefixes: the names it covers (None: any) and the bytes
    #: it lets its holder move (None: no limit), of which ``used`` are moved or reserved.
    names: frozenset[str] | None = None
    budget: int | None = None
    used: int = 0
    #: An invitation's answer: PENDING, ACCEPTED or DECLINED (None: a token issued directly).
    invitation: str | None = None
    requester: str | None = None
    answer_by: float | None = None
    answered_by: str | None = None
    answered_at: float | None = None

    def state(self, now: float) -> str:
        """``active``, ``expired`` or ``revoked``; an invitation's ``pending`` or ``declined`` (whose
        token works for nothing)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.invitation == "DECLINED":
            return "declined"
        if self.invitation == "PENDING":
            return "expired" if self.answer_by is not None and now >= self.answer_by else "pending"
        return "expired" if now >= self.expires_at else "active"

    @property
    def left(self) -> int | None:
        """Bytes of the budget not yet moved or reserved (None: no limit)."""
        return None if self.budget is None else max(0, self.budget - self.used)

    def identity(self) -> Identity:
        """The identity a request presenting this token has."""
        grant = Grant(self.id, self.actions, self.prefixes, self.expires_at, names=self.names, budget=self.budget)
        return Identity(IdentityKind.TOKEN, self.subject, dn=self.subject, admin="admin" in self.actions, grant=grant)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A new token: its record and, this once, the secret to hand to its holder."""

    record: TokenRecord
    token: str


class TokenStore:
    """Tokens, vouchers and invitations, on a backend (:func:`open_token_store`): a SQLite file (a
    path may be given for it) or a database several nodes share. Safe to share between worker
    processes and nodes: every change is one transaction of the backend's, on a row it holds."""

    def __init__(self, backend: TokenBackend | Path) -> None:
        if isinstance(backend, Path):
            from .tokens_sqlite import SqliteTokens

            backend = SqliteTokens(backend)
        self._backend: TokenBackend = backend

    async def create(
        self,
        subject: str,
        actions: Iterable[str],
        *,
        prefixes: Iterable[str] | None = None,
        lifetime: float = DEFAULT_LIFETIME,
        description: str = "",
    ) -> IssuedToken:
        """Issue a token for ``subject``; TokenError for a bad subject, action, prefix or lifetime."""
        record = _new_record(subject, actions, prefixes, lifetime, description)
        token = _new_token(record.id)
        await self._backend.insert(_row(record, token))
        return IssuedToken(record, token)

    async def verify(self, token: str, now: float | None = None) -> TokenRecord | None:
        """The record of a valid (known, unexpired, unrevoked; an invitation's: accepted) ``token``, else ``None``."""
        record = await self.lookup(token)
        if record is None:
            return None
        return record if record.state(time.time() if now is None else now) == "active" else None

    # -- vouchers and invitations ---------------------------------------------------------------

    async def invite(
        self,
        *,
        prefix: str,
        action: str,
        names: Iterable[str],
        size: int,
        requester: str,
        wait: float,
        client: str,
        limit: int,
        now: float | None = None,
    ) -> IssuedToken:
        """An invitation: a voucher for ``action`` (``upload``: a push; ``read``: a pull) of ``names``
        on ``prefix``, ``size`` bytes in all, that works once someone answering for the prefix
        accepts it, within ``wait`` seconds. Its secret goes to the asker, who follows the answer
        with it (:meth:`lookup`). TokenError if ``client`` (who asks) already has ``limit`` pending."""
        now = time.time() if now is None else now
        if action not in ("upload", "read"):
            raise TokenError("an invitation is for upload (push) or read (pull)")
        covered = frozenset(names)
        if not covered or size < 0:
            raise TokenError("an invitation names its files and their size")
        if not requester.isprintable() or not 0 < len(requester) <= 200:
            raise TokenError("say who asks in at most 200 printable characters")
        token_id = secrets.token_hex(6)
        token = _new_token(token_id)
        record = TokenRecord(
            token_id,
            f"voucher-{token_id}",
            frozenset({action}),
            frozenset({prefix}),
            client,
            now,
            now + wait,
            None,
            names=covered,
            budget=size,
            invitation="PENDING",
            requester=requester,
            answer_by=now + wait,
        )

        def admit(rows: Sequence[Row]) -> None:
            # Those waiting for an answer, of every row the asking client's address describes.
            pending = sum(1 for row in rows if _record(row).state(now) == "pending")
            if pending >= limit:
                raise QuotaExceeded(f"you have {pending} invitations waiting for an answer; the limit is {limit}")

        await self._backend.insert(_row(record, token), admit)
        stored = await self.get(token_id)
        assert stored is not None
        return IssuedToken(stored, token)

    async def answer(
        self, token_id: str, *, accept: bool, by: str, budget: int | None = None, lifetime: float = DEFAULT_LIFETIME
    ) -> TokenRecord | None:
        """Accept (the voucher works from now for ``lifetime`` seconds, for ``budget`` bytes, default the
        size asked) or decline a pending invitation; the record after it, or None if it was not
        pending (answered, revoked or past its wait)."""
        if not 0 < lifetime <= MAX_LIFETIME:
            raise TokenError(f"the lifetime must be between 1 second and {MAX_LIFETIME / 86400:g} days")
        if budget is not None and not 0 <= budget < MAX_BUDGET:
            raise TokenError(f"the budget is a number of bytes below {MAX_BUDGET}")
        now = time.time()
        state, expires = ("ACCEPTED", now + lifetime) if accept else ("DECLINED", now)
        answered: dict[str, Any] = {"invitation": state, "answered_by": by, "answered_at": now, "expires_at": expires}
        if accept and budget is not None:
            answered["budget"] = budget

        def answer(row: Row) -> Row | None:
            return answered if _record(row).state(now) == "pending" else None

        return await self._changed(token_id, answer)

    async def extend(self, token_id: str, more: int) -> TokenRecord | None:
        """Add ``more`` bytes to an active voucher's budget; the record after it, or None."""
        if not 0 < more < MAX_BUDGET:
            raise TokenError(f"extend by a positive number of bytes below {MAX_BUDGET}")
        now = time.time()

        def extend(row: Row) -> Row | None:
            record = _record(row)
            if record.budget is None:
                return None
            if record.budget + more >= MAX_BUDGET:
                raise TokenError(f"the budget would reach {MAX_BUDGET} bytes")
            return {"budget": record.budget + more} if record.state(now) == "active" else None

        return await self._changed(token_id, extend)

    async def reserve(self, token_id: str, wanted: int) -> int:
        """Take up to ``wanted`` bytes of a voucher's budget for a request about to move them; how many
        it got (0: the budget is used up). :meth:`release` gives back what the request did not move.
        The voucher's row is held meanwhile: requests on any node never take more than the budget."""
        granted = 0

        def reserve(row: Row) -> Row | None:
            nonlocal granted
            budget, used = row["budget"], row["used"]
            granted = wanted if budget is None else max(0, min(wanted, budget - used))
            return {"used": used + granted} if granted else None

        await self._backend.change(token_id, reserve)
        return granted

    async def release(self, token_id: str, unused: int) -> None:
        """Give back ``unused`` reserved bytes."""
        if unused > 0:
            await self._backend.change(token_id, lambda row: {"used": max(0, row["used"] - unused)})

    async def lookup(self, token: str) -> TokenRecord | None:
        """The record of ``token`` whatever its state (an invitation's asker follows the answer with
        it), or None if it is not one this store issued."""
        match = _TOKEN.match(token)
        if match is None:
            return None
        row = await self._backend.get(match["id"])
        if row is None or not hmac.compare_digest(row["hash"], _hash(token)):
            return None
        return _record(row)

    async def invitations(self) -> list[TokenRecord]:
        """Every invitation still recorded, newest first."""
        return _newest_first(await self._backend.rows(invitations=True))

    async def list(self) -> list[TokenRecord]:
        """Every token, newest first."""
        return _newest_first(await self._backend.rows(invitations=False))

    async def get(self, token_id: str) -> TokenRecord | None:
        """The token ``token_id``, if there is one."""
        row = await self._backend.get(token_id)
        return _record(row) if row is not None else None

    async def revoke(self, token_id: str) -> TokenRecord | None:
        """Revoke ``token_id`` (at once, for every worker and node); the record as revoked, or None if unknown."""
        now = time.time()

        def revoke(row: Row) -> Row | None:
            return {"revoked_at": now} if row["revoked_at"] is None else None

        changed = await self._backend.change(token_id, revoke)
        return None if changed is None else _record(changed.after)

    async def count(self) -> int:
        """How many tokens were ever issued and are still recorded."""
        return await self._backend.count()

    async def purge(self, before: float) -> int:
        """Forget tokens that expired or were revoked before ``before``."""

        def ended(row: Row) -> bool:
            revoked = row["revoked_at"]
            return bool(row["expires_at"] < before or (revoked is not None and revoked < before))

        return await self._backend.delete(ended)

    async def close(self) -> None:
        """Close the backend's connections."""
        await self._backend.close()

    async def _changed(self, token_id: str, change: Callable[[Row], Row | None]) -> TokenRecord | None:
        """The record after ``change``, or None if it changed nothing (or there is no such token)."""
        changed = await self._backend.change(token_id, change)
        return _record(changed.after) if changed is not None and changed.sets else None


def token_json(record: TokenRecord, now: float) -> dict[str, object]:
    """A token as the admin API and ``datastore tokens --json`` show it (never its secret)."""
    voucher = {}
    if record.names is not None or record.budget is not None or record.invitation is not None:
        voucher = {
            "names": None if record.names is None else sorted(record.names),
            "budget": record.budget,
            "used": record.used,
        }
    return {
        **voucher,
        "id": record.id,
        "subject": record.subject,
        "actions": sorted(record.actions),
        "prefixes": None if record.prefixes is None else sorted(record.prefixes),
        "description": record.description,
        "created_at": iso_time(record.created_at),
        "expires_at": iso_time(record.expires_at),
        "revoked_at": None if record.revoked_at is None else iso_time(record.revoked_at),
        "state": record.state(now),
    }


async def bootstrap_admin_token(store: TokenStore, path: Path) -> bool:
    """On a store's first start (no token issued yet), issue an administrator token into ``path``.

    The file is created with mode 0600 and holds the token alone; the token
    is never printed. Returns whether a token was issued.
    """
    if await store.count():
        return False
    issued = await store.create("admin", ["admin"], lifetime=MAX_LIFETIME, description="issued at the first start")
    await asyncio.to_thread(_write_secret, path, issued.token + "\n")
    return True


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)


def parse_actions(text: str) -> frozenset[str]:
    """``"read,upload"`` -> the actions; TokenError naming an unknown one."""
    actions = frozenset(part.strip() for part in text.split(",") if part.strip())
    _check_actions(actions)
    return actions


def _new_record(
    subject: str, actions: Iterable[str], prefixes: Iterable[str] | None, lifetime: float, description: str
) -> TokenRecord:
    subject = subject.strip()
    if not subject or not subject.isprintable():
        raise TokenError("the subject must be a non-empty printable name")
    try:
        check_length(subject, "the subject")
    except DatastoreError as exc:
        raise TokenError(exc.message) from None
    chosen = frozenset(actions)
    _check_actions(chosen)
    allowed: frozenset[str] | None = None
    if prefixes is not None:
        allowed = frozenset(prefixes)
        try:
            for prefix in allowed:
                check_prefix(prefix)
        except SettingsError as exc:
            raise TokenError(str(exc)) from None
        if not allowed:
            raise TokenError("name at least one prefix, or none for every prefix")
        if "admin" in chosen:
            # An administrator manages tokens and everyone's files and transfers: no prefix bounds that.
            raise TokenError("an admin token is for every prefix: leave out the prefixes")
    if not 0 < lifetime <= MAX_LIFETIME:
        raise TokenError(f"the lifetime must be between 1 second and {MAX_LIFETIME / 86400:g} days")
    if len(description) > 200 or not description.isprintable():
        raise TokenError("the description must be at most 200 printable characters")
    now = time.time()
    return TokenRecord(secrets.token_hex(6), subject, chosen, allowed, description, now, now + lifetime, None)


def _check_actions(actions: frozenset[str]) -> None:
    if not actions:
        raise TokenError(f"name at least one action of {', '.join(ACTIONS)}")
    unknown = sorted(actions - set(ACTIONS))
    if unknown:
        raise TokenError(f"unknown action {unknown[0]!r}: use {', '.join(ACTIONS)}")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _new_token(token_id: str) -> str:
    return f"dst_{token_id}_{secrets.token_urlsafe(32)}"


def _row(record: TokenRecord, token: str) -> dict[str, Any]:
    """The row of a new token (every column of :data:`COLUMNS`)."""
    return {
        "id": record.id,
        "hash": _hash(token),
        "subject": record.subject,
        "actions": " ".join(sorted(record.actions)),
        "prefixes": None if record.prefixes is None else " ".join(sorted(record.prefixes)),
        "description": record.description,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "revoked_at": record.revoked_at,
        "names": None if record.names is None else json.dumps(sorted(record.names)),
        "budget": record.budget,
        "used": record.used,
        "invitation": record.invitation,
        "requester": record.requester,
        "answer_by": record.answer_by,
        "answered_by": record.answered_by,
        "answered_at": record.answered_at,
    }


def _newest_first(rows: Iterable[Row]) -> list[TokenRecord]:
    return sorted((_record(row) for row in rows), key=lambda record: record.created_at, reverse=True)


def _record(row: Row) -> TokenRecord:
    return TokenRecord(
        names=None if row["names"] is None else frozenset(json.loads(row["names"])),
        budget=row["budget"],
        used=row["used"],
        invitation=row["invitation"],
        requester=row["requester"],
        answer_by=row["answer_by"],
        answered_by=row["answered_by"],
        answered_at=row["answered_at"],
        id=row["id"],
        subject=row["subject"],
        actions=frozenset(row["actions"].split()),
        prefixes=None if row["prefixes"] is None else frozenset(row["prefixes"].split()),
        description=row["description"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )
