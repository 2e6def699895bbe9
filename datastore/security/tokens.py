"""Bearer tokens issued by the store: create, verify on every request, list, revoke.

A token is ``dst_<id>_<secret>``: ``id`` (12 hex digits) names it in lists
and revocations, ``secret`` is 256 bits from ``secrets``. Only the SHA-256
of the whole token is stored (``tokens.sqlite3`` in the state directory);
a token's secret is shown once, when it is created, and never logged. A
fast hash is the right one here: the secret has 256 bits of entropy, so
there is nothing to brute-force, and verifying must be cheap because it
runs on every request (a lookup by id, then a constant-time comparison).

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
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import SettingsError, check_prefix
from ..errors import DatastoreError, QuotaExceeded
from ..protocol.timestamps import iso_time
from ..state.database import Database
from .identity import Grant, Identity, IdentityKind, check_length

#: What a token may be issued for.
ACTIONS = ("read", "upload", "delete", "metrics", "jobs", "admin")

#: A voucher's byte budget stays below this (SQLite's integers, with room to add to it).
MAX_BUDGET = 2**62

#: Default and longest lifetime of a token, in seconds.
DEFAULT_LIFETIME = 30 * 24 * 3600.0
MAX_LIFETIME = 5 * 365 * 24 * 3600.0

_TOKEN = re.compile(r"^dst_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    subject TEXT NOT NULL,
    actions TEXT NOT NULL,
    -- Space-separated prefixes, or NULL for every prefix.
    prefixes TEXT,
    description TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL
);
"""

#: Columns of vouchers and invitations (``vouchers.py``), added to files from before them.
_ADDED_COLUMNS = {
    # The file names a voucher covers (JSON list), NULL for any.
    "names": "TEXT",
    # Bytes a voucher lets its holder move in all (NULL: no limit), and those moved or reserved.
    "budget": "INTEGER",
    "used": "INTEGER NOT NULL DEFAULT 0",
    # An invitation: PENDING until answered (the token works for nothing meanwhile), then ACCEPTED
    # (an active voucher) or DECLINED; NULL for a token issued directly.
    "invitation": "TEXT",
    # Who asked (as the asking store says), for the people answering.
    "requester": "TEXT",
    # Until when an invitation waits for its answer.
    "answer_by": "REAL",
    "answered_by": "TEXT",
    "answered_at": "REAL",
}


def _migrate(db: sqlite3.Connection) -> None:
    present = {row["name"] for row in db.execute("PRAGMA table_info(tokens)")}
    for column, declaration in _ADDED_COLUMNS.items():
        if column not in present:
            db.execute(f"ALTER TABLE tokens ADD COLUMN {column} {declaration}")


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
    """Tokens persisted in SQLite; safe to share between worker processes."""

    def __init__(self, path: Path) -> None:
        self._db = Database(path, _SCHEMA, _migrate)

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
        token = f"dst_{record.id}_{secrets.token_urlsafe(32)}"
        row = (
            record.id,
            _hash(token),
            record.subject,
            " ".join(sorted(record.actions)),
            None if record.prefixes is None else " ".join(sorted(record.prefixes)),
            record.description,
            record.created_at,
            record.expires_at,
        )
        await self._db.run(
            lambda db: db.execute(
                "INSERT INTO tokens (id, hash, subject, actions, prefixes, description, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        )
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
        token = f"dst_{token_id}_{secrets.token_urlsafe(32)}"
        row = (
            token_id,
            _hash(token),
            f"voucher-{token_id}",
            action,
            prefix,
            client,
            now,
            now + wait,
            json.dumps(sorted(covered)),
            size,
            "PENDING",
            requester,
            now + wait,
        )

        def insert(db: sqlite3.Connection) -> None:
            pending = db.execute(
                "SELECT COUNT(*) FROM tokens WHERE invitation = 'PENDING' AND description = ? AND answer_by > ?"
                " AND revoked_at IS NULL",
                (client, now),
            ).fetchone()[0]
            if pending >= limit:
                raise QuotaExceeded(f"you have {pending} invitations waiting for an answer; the limit is {limit}")
            db.execute(
                "INSERT INTO tokens (id, hash, subject, actions, prefixes, description, created_at, expires_at,"
                " names, budget, invitation, requester, answer_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

        await self._db.run(insert)
        record = await self.get(token_id)
        assert record is not None
        return IssuedToken(record, token)

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
        if not accept:
            budget = None
        now = time.time()

        state, expires = ("ACCEPTED", now + lifetime) if accept else ("DECLINED", now)

        def answer(db: sqlite3.Connection) -> TokenRecord | None:
            changed = db.execute(
                "UPDATE tokens SET invitation = ?, answered_by = ?, answered_at = ?, expires_at = ?,"
                " budget = COALESCE(?, budget) WHERE id = ? AND invitation = 'PENDING' AND revoked_at IS NULL"
                " AND answer_by > ?",
                (state, by, now, expires, budget, token_id, now),
            ).rowcount
            row = db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
            return _record(row) if changed and row is not None else None

        return await self._db.run(answer)

    async def extend(self, token_id: str, more: int) -> TokenRecord | None:
        """Add ``more`` bytes to an active voucher's budget; the record after it, or None."""
        if not 0 < more < MAX_BUDGET:
            raise TokenError(f"extend by a positive number of bytes below {MAX_BUDGET}")
        now = time.time()

        def extend(db: sqlite3.Connection) -> TokenRecord | None:
            row = db.execute("SELECT budget FROM tokens WHERE id = ?", (token_id,)).fetchone()
            if row is not None and row["budget"] is not None and row["budget"] + more >= MAX_BUDGET:
                raise TokenError(f"the budget would reach {MAX_BUDGET} bytes")
            changed = db.execute(
                "UPDATE tokens SET budget = budget + ? WHERE id = ? AND budget IS NOT NULL AND revoked_at IS NULL"
                " AND expires_at > ? AND COALESCE(invitation, 'ACCEPTED') = 'ACCEPTED'",
                (more, token_id, now),
            ).rowcount
            row = db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
            return _record(row) if changed and row is not None else None

        return await self._db.run(extend)

    async def reserve(self, token_id: str, wanted: int) -> int:
        """Take up to ``wanted`` bytes of a voucher's budget for a request about to move them; how many
        it got (0: the budget is used up). :meth:`release` gives back what the request did not move."""

        def reserve(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT budget, used FROM tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                return 0
            granted = wanted if row["budget"] is None else max(0, min(wanted, row["budget"] - row["used"]))
            db.execute("UPDATE tokens SET used = used + ? WHERE id = ?", (granted, token_id))
            return int(granted)

        return await self._db.run(reserve)

    async def release(self, token_id: str, unused: int) -> None:
        """Give back ``unused`` reserved bytes."""
        if unused > 0:
            await self._db.run(
                lambda db: db.execute("UPDATE tokens SET used = MAX(0, used - ?) WHERE id = ?", (unused, token_id))
            )

    async def lookup(self, token: str) -> TokenRecord | None:
        """The record of ``token`` whatever its state (an invitation's asker follows the answer with
        it), or None if it is not one this store issued."""
        match = _TOKEN.match(token)
        if match is None:
            return None
        row = await self._db.read(lambda db: db.execute("SELECT * FROM tokens WHERE id = ?", (match["id"],)).fetchone())
        if row is None or not hmac.compare_digest(row["hash"], _hash(token)):
            return None
        return _record(row)

    async def invitations(self) -> list[TokenRecord]:
        """Every invitation still recorded, newest first."""
        rows = await self._db.read(
            lambda db: db.execute(
                "SELECT * FROM tokens WHERE invitation IS NOT NULL ORDER BY created_at DESC"
            ).fetchall()
        )
        return [_record(row) for row in rows]

    async def list(self) -> list[TokenRecord]:
        """Every token, newest first."""
        rows = await self._db.read(lambda db: db.execute("SELECT * FROM tokens ORDER BY created_at DESC").fetchall())
        return [_record(row) for row in rows]

    async def get(self, token_id: str) -> TokenRecord | None:
        """The token ``token_id``, if there is one."""
        row = await self._db.read(lambda db: db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone())
        return _record(row) if row is not None else None

    async def revoke(self, token_id: str) -> TokenRecord | None:
        """Revoke ``token_id`` (at once, for every worker); the record as revoked, or None if unknown."""

        def revoke(db: sqlite3.Connection) -> TokenRecord | None:
            db.execute("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), token_id))
            row = db.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
            return _record(row) if row is not None else None

        return await self._db.run(revoke)

    async def count(self) -> int:
        """How many tokens were ever issued and are still recorded."""
        return int(await self._db.read(lambda db: db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0]))

    async def purge(self, before: float) -> int:
        """Forget tokens that expired or were revoked before ``before``."""
        return await self._db.run(
            lambda db: (
                db.execute(
                    "DELETE FROM tokens WHERE expires_at < ? OR (revoked_at IS NOT NULL AND revoked_at < ?)",
                    (before, before),
                ).rowcount
            )
        )

    async def close(self) -> None:
        """Close the database."""
        await self._db.close()


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


def _record(row: sqlite3.Row) -> TokenRecord:
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
