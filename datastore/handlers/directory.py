"""DirectoryHandler: a prefix backed by one flat folder and a catalogue.

The folder holds only published files. The catalogue (name, size, MD5,
SHA-256, owner, upload time, and the names reserved by pending uploads) is a
:class:`~datastore.state.catalogue.Catalogue`: by default a SQLite file kept
outside the folder, so it can never be downloaded or overwritten through the
store. A name is taken while it is pending or published; two names that
differ only by case collide (the folder may be copied to a case-insensitive
filesystem). ``overwrite=True`` lets a new upload replace a published file of
exactly the same name. The catalogue reserves names atomically; which
published file, or file on disk, an upload may replace is decided here, and
handed to it as a policy.

Only files the catalogue lists as published are ever served: a pending
upload, a file dropped into the folder by hand, or a half-written file is not.

Downloads (``locate_download``) remember, per name, the catalogue record, the
resolved path, the file's identity (inode, device, size, mtime, ctime) and,
for small files, the bytes. Every request checks the file with one
``lstat``: a file replaced (a new inode), changed, or deleted on disk is
looked up again, never served from memory. A file is remembered only once its
ctime is ``settle_ns`` old, so that any later change to it moves the ctime;
a record is trusted for ``catalogue_ttl`` seconds (another process sharing the
catalogue may delete a name), and this process forgets a name as soon as it
publishes or deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import FileNotFound, InvalidName, NotAuthorized
from ..protocol.names import contained_path
from ..security.identity import Identity, IdentityKind
from ..state.catalogue import Catalogue, Reservation, StoredFile
from ..state.sqlite_catalogue import SqliteCatalogue
from .interface import Download, FileInfo

#: Files up to this size are read into memory and answered from there.
MEMORY_LIMIT = 64 * 1024


class DirectoryHandler:
    """Serve and accept files in ``directory``; record them in ``catalogue``.

    ``catalogue`` is a :class:`~datastore.state.catalogue.Catalogue`, used
    as given, or the path of a SQLite catalogue file, by default
    ``<parent>/.datastore/catalogue/<folder>.sqlite3`` beside the folder,
    never inside it. Either way :meth:`close` closes it. Implements
    :class:`TransferHandler` and the listing, describe, delete,
    batch-reservation and close capabilities.
    """

    def __init__(self, directory: Path, *, catalogue: Path | Catalogue | None = None, overwrite: bool = False) -> None:
        self.directory = Path(directory)
        if catalogue is None:
            catalogue = self.directory.parent / ".datastore" / "catalogue" / f"{self.directory.name}.sqlite3"
        self.overwrite = overwrite
        #: The published records and the reserved names.
        self.catalogue: Catalogue = (
            SqliteCatalogue(Path(catalogue)) if isinstance(catalogue, str | os.PathLike) else catalogue
        )
        #: Seconds a remembered catalogue record is trusted before it is read again.
        self.catalogue_ttl = 1.0
        #: A file is remembered only when its ctime is at least this old (ns).
        self.settle_ns = 1_000_000_000
        #: At most this many names, and this many bytes of small files, are remembered.
        self.max_remembered = 4096
        self.max_remembered_bytes = 32 << 20
        self._remembered: OrderedDict[str, _Remembered] = OrderedDict()
        self._remembered_bytes = 0
        #: The lookup now running for a name, shared by the requests that arrive meanwhile.
        self._lookups: dict[str, asyncio.Future[Download]] = {}
        cls = type(self)
        #: A subclass that decides downloads itself is asked on every download.
        self._own_download_policy = (
            cls.get_download_filename is DirectoryHandler.get_download_filename
            and cls.describe_file is DirectoryHandler.describe_file
        )

    async def can_upload(self, identity: Identity, file: FileInfo) -> bool:
        return not await self._refused(identity, [file], reserve=False)

    async def add_pending_upload(self, identity: Identity, file: FileInfo) -> None:
        # can_upload said yes: only a reservation made since (by another worker process) refuses now.
        if await self.catalogue.reserve([Reservation(file.name, file.size)], may_take=_anything, now=time.time()):
            raise NotAuthorized(f"{file.name} is reserved by another transfer")

    async def reserve_many(self, identity: Identity, files: Sequence[FileInfo]) -> list[str]:
        """Reserve every file in one transaction, or none: the names refused, or [] when all are reserved.

        A subclass that decides per file (overriding ``can_upload`` or
        ``add_pending_upload``, as an application adds its own policy) is
        asked per file, so its policy is never bypassed.
        """
        cls = type(self)
        if cls.can_upload is not DirectoryHandler.can_upload or (
            cls.add_pending_upload is not DirectoryHandler.add_pending_upload
        ):
            refused = [f.name for f in files if not await self.can_upload(identity, f)]
            if refused:
                return refused
            reserved: list[FileInfo] = []
            try:
                for file in files:
                    await self.add_pending_upload(identity, file)
                    reserved.append(file)
            except BaseException:
                for file in reserved:
                    await self.cancel_upload(identity, file)
                raise
            return []
        return await self._refused(identity, files, reserve=True)

    async def _refused(self, identity: Identity, files: Sequence[FileInfo], *, reserve: bool) -> list[str]:
        """The names of ``files`` that may not be uploaded; with ``reserve``, reserve all if there are none."""
        # A file put into the folder by other means belongs to nobody: only an administrator replaces it.
        on_disk = await asyncio.to_thread(self._on_disk, [f.name for f in files])
        overwrite = self.overwrite

        def may_take(name: str, published: StoredFile | None) -> bool:
            if published is None:
                return name not in on_disk or (overwrite and identity.admin)
            # Only its owner (or an administrator) may replace a file.
            return overwrite and published.name == name and identity.may_manage(published.owner_id)

        wanted = [Reservation(f.name, f.size) for f in files]
        if reserve:
            conflicts = await self.catalogue.reserve(wanted, may_take=may_take, now=time.time())
        else:
            conflicts = await self.catalogue.check(wanted, may_take=may_take)
        return [conflict.name for conflict in conflicts]

    async def get_upload_filename(self, identity: Identity, file: FileInfo) -> Path | None:
        if not await self.catalogue.is_reserved(file.name):
            return None
        return await asyncio.to_thread(self._path_for_writing, file.name)

    async def complete_upload(self, identity: Identity, file: FileInfo) -> None:
        record = StoredFile(
            name=file.name,
            size=file.size,
            md5=file.md5,
            sha256=file.sha256,
            owner=identity.dn,
            uploaded_at=time.time(),
            owner_authenticated=identity.authenticated,
            owner_id=identity.principal,
            tls=identity.kind is IdentityKind.CERTIFICATE,
        )
        await self.catalogue.publish(record)
        self._forget(file.name)

    async def cancel_upload(self, identity: Identity, file: FileInfo) -> None:
        await self.catalogue.release(file.name)

    async def reserved_before(self, before: float) -> list[str]:
        return await self.catalogue.reserved_before(before)

    async def release_reservation(self, name: str) -> None:
        await self.catalogue.release(name)

    async def get_download_filename(self, identity: Identity, name: str) -> Path:
        if await self.describe_file(identity, name) is None:
            raise FileNotFound()
        try:
            return await asyncio.to_thread(contained_path, self.directory, name)
        except InvalidName:
            raise FileNotFound() from None

    async def locate_download(self, identity: Identity, name: str) -> Download:
        """The path, status, record and (if small) bytes of ``name``: usually without leaving the loop."""
        if not self._own_download_policy:
            path = await self.get_download_filename(identity, name)
            stored = await self.describe_file(identity, name)
            st, body = await asyncio.to_thread(_open_regular, path, follow_symlinks=True)
            return Download(path, st, stored, body)
        remembered = self._remembered.get(name)
        if remembered is not None:
            if time.monotonic() - remembered.checked < self.catalogue_ttl:
                on_disk = _lstat(remembered.download.path)
                if on_disk is not None and _identity(on_disk) == remembered.identity:
                    self._remembered.move_to_end(name)
                    return remembered.download
            self._forget(name)
        # Requests for a name that is not remembered share one lookup. One that
        # joins a lookup begun before it arrived checks the file it found is
        # still the one on disk, and otherwise looks for itself.
        lookup = self._lookups.get(name)
        if lookup is None:
            lookup = asyncio.create_task(self._look_up(name), name=f"datastore-lookup-{name}")
            self._lookups[name] = lookup
            lookup.add_done_callback(lambda done: self._lookup_done(name, done))
            return await asyncio.shield(lookup)
        with contextlib.suppress(FileNotFound):
            download = await asyncio.shield(lookup)
            on_disk = _lstat(download.path)
            if on_disk is not None and _identity(on_disk) == _identity(download.stat):
                return download
        return await self._look_up(name)

    async def _look_up(self, name: str) -> Download:
        """Read the record and the file; remember them if this is still the lookup of ``name`` and the file settled."""
        stored = await self.catalogue.describe(name)
        if stored is None:
            raise FileNotFound()
        path, st, body = await asyncio.to_thread(self._open_published, name)
        download = Download(path, st, stored, body)
        # A lookup that publishing or deleting the name made obsolete (``_forget``) is not remembered.
        settled = time.time_ns() - st.st_ctime_ns >= self.settle_ns
        if settled and self._lookups.get(name) is asyncio.current_task():
            self._remember(name, download)
        return download

    def _lookup_done(self, name: str, lookup: asyncio.Future[Download]) -> None:
        if self._lookups.get(name) is lookup:
            del self._lookups[name]
        if not lookup.cancelled():
            lookup.exception()  # retrieved: every request that waited for it has it

    def _open_published(self, name: str) -> tuple[Path, os.stat_result, bytes | None]:
        try:
            path = contained_path(self.directory, name)
        except InvalidName:
            raise FileNotFound() from None
        return (path, *_open_regular(path))

    def _remember(self, name: str, download: Download) -> None:
        remembered = _Remembered(download, _identity(download.stat), time.monotonic())
        if remembered.size > self.max_remembered_bytes:
            return
        self._drop(name)
        self._remembered[name] = remembered
        self._remembered_bytes += remembered.size
        while len(self._remembered) > self.max_remembered or self._remembered_bytes > self.max_remembered_bytes:
            _, oldest = self._remembered.popitem(last=False)
            self._remembered_bytes -= oldest.size

    def _forget(self, name: str) -> None:
        """Drop what is remembered of ``name``; a lookup already running is neither shared nor remembered."""
        self._lookups.pop(name, None)
        self._drop(name)

    def _drop(self, name: str) -> None:
        remembered = self._remembered.pop(name, None)
        if remembered is not None:
            self._remembered_bytes -= remembered.size

    async def describe_file(self, identity: Identity, name: str) -> StoredFile | None:
        return await self.catalogue.describe(name)

    async def published(self, name: str) -> tuple[Path, StoredFile] | None:
        stored = await self.catalogue.describe(name)
        if stored is None:
            return None
        try:
            return await asyncio.to_thread(contained_path, self.directory, name), stored
        except InvalidName:
            return None

    async def add_digests(self, name: str, *, uploaded_at: float, md5: str, sha256: str) -> StoredFile | None:
        added = await self.catalogue.add_digests(name, uploaded_at=uploaded_at, md5=md5, sha256=sha256)
        if added is not None:
            self._forget(name)  # a remembered download would go on omitting them
        return added

    async def undigested(self, *, before: float, limit: int) -> Sequence[StoredFile]:
        return await self.catalogue.undigested(before=before, limit=limit)

    async def list_files(self, identity: Identity) -> Sequence[StoredFile]:
        return await self.catalogue.listing()

    async def delete_file(self, identity: Identity, name: str) -> None:
        while True:
            stored = await self.describe_file(identity, name)
            if stored is None:
                raise FileNotFound()
            # Identities are compared by kind, subject and issuer: a DN asserted over plain HTTP
            # never matches one a certificate proved, and an anonymous upload belongs to nobody.
            if not identity.may_manage(stored.owner_id):
                raise NotAuthorized("only the owner (or an administrator) may delete a file")
            path = await asyncio.to_thread(contained_path, self.directory, name)
            # Removed only if it is still the record just judged: one published meanwhile is judged again.
            if await self.catalogue.delete(name, expected=stored):
                break
        self._forget(name)
        await asyncio.to_thread(_unlink_if_present, path)

    async def close(self) -> None:
        self._lookups.clear()
        self._remembered.clear()
        self._remembered_bytes = 0
        await self.catalogue.close()

    def _on_disk(self, names: list[str]) -> set[str]:
        """Which of ``names`` (already validated flat names) exist in the folder: one lookup per name
        (listing the folder instead cost a job copying into it time in the square of its files)."""
        return {name for name in names if os.path.lexists(self.directory / name)}

    def _path_for_writing(self, name: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        return contained_path(self.directory, name)


@dataclass(slots=True)
class _Remembered:
    """A download as last found, its file's identity, and when its record was read (monotonic seconds)."""

    download: Download
    identity: tuple[int, int, int, int, int]
    checked: float

    @property
    def size(self) -> int:
        return len(self.download.body) if self.download.body is not None else 0


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file is replaced, written, truncated or touched."""
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _lstat(path: Path) -> os.stat_result | None:
    """The status of ``path`` itself (a symlink is not followed), or None if it is gone.

    Runs on the event loop for remembered downloads: one metadata lookup of
    a file just served, answered from the kernel's inode cache.
    """
    try:
        return os.stat(path, follow_symlinks=False)
    except OSError:
        return None


def _open_regular(path: Path, *, follow_symlinks: bool = False) -> tuple[os.stat_result, bytes | None]:
    """The status of the regular file ``path`` and, when small, its bytes (in a worker thread)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError:
        raise FileNotFound() from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFound()
        if st.st_size > MEMORY_LIMIT:
            return st, None
        chunks = []
        left = st.st_size + 1  # one byte more tells a file that grew
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        body = b"".join(chunks)
        if len(body) != st.st_size or _identity(os.fstat(fd)) != _identity(st):
            return st, None  # changing as we read: sent from disk instead
        return st, body
    finally:
        os.close(fd)


def _anything(name: str, published: StoredFile | None) -> bool:
    """The policy of a reservation that ``can_upload`` already allowed."""
    return True


def _unlink_if_present(path: Path) -> None:
    path.unlink(missing_ok=True)
