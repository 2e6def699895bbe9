"""The catalogue: the one interface through which a prefix's published files, and the names pending
uploads reserve, are persisted, as a ``typing.Protocol`` with written contracts and typed records.

It owns which names are taken and what was published under them; the bytes are the folder's, and
the rules (who may replace what, whether a file dropped into the folder by hand may be replaced)
are the handler's: :class:`~datastore.handlers.directory.DirectoryHandler` hands them to
:meth:`Catalogue.reserve` as a :data:`TakePolicy`, which the store applies inside its transaction.

A backend (SQLite, one file per prefix: ``sqlite_catalogue.py``; PostgreSQL, later) is whatever
passes the contract suite (``tests/test_catalogue_contract.py``). The contracts every method keeps:

- **Atomic.** Each method is one transaction: it happens whole or not at all, and two callers (in
  one process, in several processes or on several hosts) never both win a conflict.
- **Folded names collide.** Two names that :func:`~datastore.protocol.names.fold_name` folds alike
  are one name to the catalogue: at most one of them is reserved, and at most one published, at a
  time (the folder may be copied to a case-insensitive filesystem). Everything else addresses a
  name exactly.
- **Taken while pending or published.** A name an upload reserved is nobody else's until it is
  published or released, whatever the policy says; a published name is taken again only if the
  caller's policy lets it be replaced.
- **Time is given.** The store reads no clock: a reservation takes ``now``, a record carries its
  ``uploaded_at``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..protocol.names import fold_name


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A published file as a catalogue records it.

    ``owner_id`` is the uploader as :attr:`Identity.principal
    <datastore.security.identity.Identity.principal>` stores it (``None``
    if anonymous: then nobody owns the file, and only an administrator may
    delete it); ``owner`` is the uploader's name for display (``identity.dn``)
    and ``owner_authenticated`` whether a certificate or a token proved it.
    ``tls`` says the file came over TLS (a prefix's policy may then keep it
    off plain HTTP). A digest is ``None`` until it is known: an upload
    verifies inline only the digests its client declared, and the others are
    computed after it was published (:meth:`Catalogue.add_digests`).
    """

    name: str
    size: int
    md5: str | None
    sha256: str | None
    owner: str | None
    uploaded_at: float
    owner_authenticated: bool = False
    owner_id: str | None = None
    tls: bool = False

    def columns(self) -> tuple[object, ...]:
        """The record as both backends' rows hold it, in this order: name, fold (``fold_name``),
        size, md5, sha256, owner, owner_authenticated, uploaded_at, owner_id, tls."""
        return (
            self.name,
            fold_name(self.name),
            self.size,
            self.md5,
            self.sha256,
            self.owner,
            self.owner_authenticated,
            self.uploaded_at,
            self.owner_id,
            self.tls,
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    """A name an upload is about to write, and the size it declared."""

    name: str
    size: int


@dataclass(frozen=True, slots=True)
class Conflict:
    """A name that was not reserved, and what holds it.

    ``pending`` is the name, folding as this one does, that a pending upload reserved, or that
    comes earlier in the same request: such a name is never given, whatever the policy says.
    ``published`` is the record published under a name that folds as this one does, which the
    policy refused to let the upload replace. Both ``None``: the policy refused a name the
    catalogue holds nothing under (a file the folder has and the catalogue does not know, say).
    """

    name: str
    pending: str | None = None
    published: StoredFile | None = None


#: The caller's rule for a name no upload has reserved: may ``name`` be reserved, given the record
#: published under a name that folds as it does (``None`` if there is none)? Called inside the
#: store's transaction (on SQLite, on the database's thread), possibly more than once for a name
#: (a backend may retry a transaction): a pure function of its arguments, quick, never blocking.
TakePolicy = Callable[[str, StoredFile | None], bool]


class NameTaken(Exception):
    """:meth:`Catalogue.publish` found another name, folding as the record's does, published."""


class Catalogue(Protocol):
    """A prefix's published files and the names reserved for uploads to it."""

    async def check(self, files: Sequence[Reservation], *, may_take: TakePolicy) -> list[Conflict]:
        """The conflicts :meth:`reserve` would find now, in the order of ``files``; reserves nothing."""
        ...

    async def reserve(self, files: Sequence[Reservation], *, may_take: TakePolicy, now: float) -> list[Conflict]:
        """Reserve every name of ``files`` and return ``[]``, or reserve none and return the conflicts.

        A name conflicts if a pending reservation, or an earlier name of ``files``, folds as it does
        (``may_take`` is not asked), or if ``may_take(name, published)`` is false, ``published``
        being the record whose name folds as it does, or ``None``. One transaction: of two callers
        reserving a name (or two that fold alike) at once, exactly one gets it. An exception from
        ``may_take`` propagates, and nothing is reserved.
        """
        ...

    async def is_reserved(self, name: str) -> bool:
        """Whether exactly ``name`` is reserved by a pending upload."""
        ...

    async def release(self, name: str) -> None:
        """Release the reservation of exactly ``name``; nothing happens if there is none."""
        ...

    async def reserved_before(self, before: float) -> list[str]:
        """The names reserved (pending) at a time before ``before``, in name order."""
        ...

    async def publish(self, record: StoredFile) -> None:
        """Record ``record`` as published, in one transaction: the reservation of ``record.name``
        (if any) is released and the record of ``record.name`` (if any) replaced.

        A reservation is not required. Raises :class:`NameTaken`, and changes nothing, if a record
        under another name that folds as ``record.name`` does is published.
        """
        ...

    async def describe(self, name: str) -> StoredFile | None:
        """The record of exactly ``name``, or ``None``; a pending name has none."""
        ...

    async def add_digests(self, name: str, *, uploaded_at: float, md5: str, sha256: str) -> StoredFile | None:
        """Fill in the digests the record of ``name`` lacks (``None`` in it), if it is still the one
        published at ``uploaded_at``; a digest the record has is kept. The record as it then is, if
        this call filled one in; ``None`` if it filled in nothing (no such record, another
        publication replaced it, or it had both digests already)."""
        ...

    async def undigested(self, *, before: float, limit: int) -> list[StoredFile]:
        """Up to ``limit`` records that lack a digest and were published before ``before``, oldest first."""
        ...

    async def listing(self) -> list[StoredFile]:
        """Every published record, ordered by name code point by code point (as Python sorts ``str``)."""
        ...

    async def delete(self, name: str, *, expected: StoredFile | None = None) -> bool:
        """Remove the record of exactly ``name``; with ``expected``, only while the record is still
        equal to it (so a record published meanwhile is not removed on another's say). True if a
        record was removed."""
        ...

    async def close(self) -> None:
        """Release the backend's connections; a later call reopens them."""
        ...
