"""The contract between the transfer server and the application behind a prefix.

An application registers a prefix with an object implementing
:class:`TransferHandler`; the server calls it, and only it, to decide what
may be uploaded, where bytes go, and what may be downloaded. The call order
for each file is fixed:

* manifest: ``can_upload`` for every file (all under one lock per prefix);
  if every answer is true, ``add_pending_upload`` for every file. If any
  answer is false nothing is reserved.
* upload: ``get_upload_filename``; the server streams the body to a staging
  file, verifies size and digests and publishes it with ``os.replace``; then
  ``complete_upload`` (before the client hears 200), or ``cancel_upload`` on
  any failure. A file whose upload failed is re-gated with ``can_upload`` and
  ``add_pending_upload`` when the client tries again.
* download: ``get_download_filename`` (or, with the :class:`CanLocateDownload`
  capability, ``locate_download``).

Every callback receives the :class:`~datastore.security.identity.Identity` of the
client (``identity.dn`` as AccessGrid's ``id_token.dn``). Callbacks are
coroutines and must not block the event loop; a handler with blocking work
does it in a thread. Optional capabilities are the small protocols below;
the server detects them once, when the prefix is registered.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..lifecycle.states import Event
from ..security.identity import Identity
from ..state.catalogue import StoredFile as StoredFile  # defined with the catalogue that records it


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A file as the manifest announced it, or, in ``complete_upload``, as verified.

    ``md5`` and ``sha256`` are lower-case hex. In ``can_upload`` and
    ``add_pending_upload`` they are what the client declared (``None`` if it
    declared nothing); in ``complete_upload`` they are the digests the server
    computed over the bytes it published: both, unless the handler can add
    digests later (:class:`CanAddDigests`), when only those the client
    declared are computed before publishing (the others are ``None``).
    """

    name: str
    size: int
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class Download:
    """What a download serves, as :class:`CanLocateDownload` finds it.

    ``stat`` is the file's status as checked for this request; ``stored``
    its catalogue record, if any (for ``Repr-Digest``); ``body`` its whole
    content when the file is small enough to answer from memory, else
    ``None`` (the server sends it from ``path``). A handler may return the
    same object again while the file is unchanged; the server then reuses
    what it derived from it (compared by identity).
    """

    path: Path
    stat: os.stat_result
    stored: StoredFile | None
    body: bytes | None = None


@runtime_checkable
class TransferHandler(Protocol):
    """What every prefix handler implements."""

    async def can_upload(self, identity: Identity, file: FileInfo) -> bool:
        """Whether ``identity`` may upload ``file``. Runs at manifest time.

        Returning false refuses the whole manifest. Must not reserve anything:
        ``add_pending_upload`` follows if and only if every file is accepted.
        """

    async def add_pending_upload(self, identity: Identity, file: FileInfo) -> None:
        """Reserve ``file.name`` for an upload that is about to happen.

        Until ``complete_upload`` or ``cancel_upload`` the name is taken. May
        raise to refuse after all; the server then cancels the files it had
        already reserved for this manifest and answers 500.
        """

    async def get_upload_filename(self, identity: Identity, file: FileInfo) -> Path | None:
        """The final path for ``file``, or ``None`` to refuse the upload (404).

        Called when the upload request arrives, before any byte is read. The
        server writes elsewhere first and moves the verified file here with
        ``os.replace``, so the path must be on the same filesystem as the
        server's state directory or the server falls back to a copy.
        """

    async def complete_upload(self, identity: Identity, file: FileInfo) -> None:
        """The verified file is now at its final path. Record it.

        ``file`` carries the computed digests. Runs before the client is
        answered; if it raises, the server removes the file, calls
        ``cancel_upload`` and answers 500.
        """

    async def cancel_upload(self, identity: Identity, file: FileInfo) -> None:
        """Release the reservation of ``file.name``: the upload failed or ended.

        Nothing was published at the final path. Must not raise for a name
        that is not reserved.
        """

    async def get_download_filename(self, identity: Identity, name: str) -> Path:
        """The path of the published file ``name`` for ``identity`` to download.

        ``name`` is already validated as a flat name. Raise
        :class:`~datastore.errors.FileNotFound` (404) if there is no such
        published file, :class:`~datastore.errors.NotAuthorized` (403) if the
        identity may not read it. Never return a pending or partial file.
        """


@runtime_checkable
class CanReserveMany(Protocol):
    """Capability: decide and reserve a whole manifest in one step.

    Used instead of ``can_upload`` and ``add_pending_upload`` per file, for
    manifests of thousands of files. Same contract: all or nothing.
    """

    async def reserve_many(self, identity: Identity, files: Sequence[FileInfo]) -> list[str]:
        """Reserve every file and return ``[]``, or reserve none and return the refused names."""


@runtime_checkable
class CanReclaimReservations(Protocol):
    """Capability: list the names reserved before a time, and release one, so that the store frees the
    names a process reserved for a manifest and then died before recording its transfer."""

    async def reserved_before(self, before: float) -> list[str]:
        """The names reserved at a time before ``before``."""

    async def release_reservation(self, name: str) -> None:
        """Release the reservation of ``name`` (none: nothing happens)."""


@runtime_checkable
class CanList(Protocol):
    """Capability: the prefix offers a listing at ``GET /{prefix}/``."""

    async def list_files(self, identity: Identity) -> Sequence[StoredFile]:
        """The published files ``identity`` may see, in display order."""


@runtime_checkable
class CanDescribe(Protocol):
    """Capability: the handler knows the size and digests of a published file.

    Used for the ``Repr-Digest`` header of downloads.
    """

    async def describe_file(self, identity: Identity, name: str) -> StoredFile | None:
        """The catalogue record of ``name``, or ``None`` if there is none."""


@runtime_checkable
class CanAddDigests(Protocol):
    """Capability: the handler records the digests of a published file that were computed after it
    was published.

    With it, an upload verifies inline only the digests its client declared (or its size, if none),
    and the store computes the others once the file is published, off the request's path
    (``lifecycle/digests.py``), and hands them to :meth:`add_digests`. Until then a download omits
    them from ``Repr-Digest`` and a listing says they are pending.
    """

    async def published(self, name: str) -> tuple[Path, StoredFile] | None:
        """Where the published file ``name`` is, and its record; ``None`` if none is published."""

    async def add_digests(self, name: str, *, uploaded_at: float, md5: str, sha256: str) -> StoredFile | None:
        """Record the digests ``name`` lacks if it is still the file published at ``uploaded_at``: the
        record as it then is, or ``None`` if nothing was added (:meth:`Catalogue.add_digests
        <datastore.state.catalogue.Catalogue.add_digests>`)."""

    async def undigested(self, *, before: float, limit: int) -> Sequence[StoredFile]:
        """Up to ``limit`` published records that lack a digest, published before ``before``, oldest first."""


@runtime_checkable
class CanLocateDownload(Protocol):
    """Capability: find a download's path, status and record in one step.

    Used instead of ``get_download_filename`` (and ``describe_file``) for
    every ``GET``/``HEAD`` of a file; same contract: FileNotFound (404) for
    no published regular file, NotAuthorized (403) for an identity that may
    not read it, never a pending or partial file.
    """

    async def locate_download(self, identity: Identity, name: str) -> Download:
        """The published file ``name`` for ``identity`` to download."""


@runtime_checkable
class CanDelete(Protocol):
    """Capability: ``DELETE /{prefix}/{name}`` removes a published file."""

    async def delete_file(self, identity: Identity, name: str) -> None:
        """Remove ``name``. Raise FileNotFound (404) or NotAuthorized (403)."""


@runtime_checkable
class CanAuthorize(Protocol):
    """Capability: the handler decides, beyond the prefix's policy, what an identity may do.

    Asked after the policy allowed the request, for ``action`` ``list``,
    ``read``, ``upload`` or ``delete`` (``name`` is the file, or ``None``
    for a listing or a whole manifest); false refuses it (403).
    """

    async def authorize(self, identity: Identity, action: str, name: str | None) -> bool:
        """Whether ``identity`` may do ``action`` (on ``name``)."""


@runtime_checkable
class CanObserve(Protocol):
    """Capability: the handler follows its prefix's events (a file landed, an upload failed...).

    Called after each committed change of the prefix, in order, once each, in a task of its own:
    a slow or failing ``on_event`` never slows an upload (it is logged; one that falls far behind
    is dropped with a warning). ``event`` is a :class:`datastore.lifecycle.states.Event`.
    """

    async def on_event(self, event: Event) -> None:
        """React to ``event``."""


@runtime_checkable
class CanClose(Protocol):
    """Capability: the handler holds resources to release when the server stops."""

    async def close(self) -> None:
        """Release files, connections and threads."""
