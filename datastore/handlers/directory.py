"""DirectoryHandler: a prefix backed by one flat folder and a SQLite catalogue.

The folder holds only published files. The catalogue (name, size, MD5,
SHA-256, owner, upload time, and the names reserved by pending uploads) is a
SQLite file kept outside the folder, so it can never be downloaded or
overwritten through the store. A name is taken while it is pending or
published; two names that differ only by case collide (the folder may be
copied to a case-insensitive filesystem). ``overwrite=True`` lets a new
upload replace a published file of exactly the same name.

Only files the catalogue lists as published are ever served: a pending
upload, a file dropped into the folder by hand, or a half-written file is not.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from ..db import Database
from ..errors import FileNotFound, InvalidName, NotAuthorized
from ..identity import Identity
from ..names import contained_path, fold_name
from .interface import FileInfo, StoredFile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    name TEXT PRIMARY KEY,
    fold TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    md5 TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    owner TEXT,
    owner_authenticated INTEGER NOT NULL DEFAULT 0,
    uploaded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    name TEXT PRIMARY KEY,
    fold TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    owner TEXT,
    reserved_at REAL NOT NULL
);
"""


class DirectoryHandler:
    """Serve and accept files in ``directory``; record them in ``catalogue``.

    ``catalogue`` defaults to ``<parent>/.datastore/catalogue/<folder>.sqlite3``
    beside the folder, never inside it. Implements :class:`TransferHandler`
    and the listing, describe, delete, batch-reservation and close capabilities.
    """

    def __init__(self, directory: Path, *, catalogue: Path | None = None, overwrite: bool = False) -> None:
        self.directory = Path(directory)
        if catalogue is None:
            catalogue = self.directory.parent / ".datastore" / "catalogue" / f"{self.directory.name}.sqlite3"
        self.overwrite = overwrite
        self._db = Database(Path(catalogue), _SCHEMA)

    async def can_upload(self, identity: Identity, file: FileInfo) -> bool:
        return not await self._refused(identity, [file], reserve=False)

    async def add_pending_upload(self, identity: Identity, file: FileInfo) -> None:
        row = (file.name, fold_name(file.name), file.size, identity.dn, time.time())
        try:
            await self._db.run(
                lambda db: db.execute(
                    "INSERT INTO pending (name, fold, size, owner, reserved_at) VALUES (?, ?, ?, ?, ?)", row
                )
            )
        except sqlite3.IntegrityError:
            # Another worker process reserved the name since can_upload said yes.
            raise NotAuthorized(f"{file.name} is reserved by another transfer") from None

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
        # A file put into the folder by other means is not clobbered either.
        on_disk = set() if self.overwrite else await asyncio.to_thread(self._on_disk, [f.name for f in files])
        now = time.time()

        def check(db: sqlite3.Connection) -> list[str]:
            refused = []
            for file in files:
                fold = fold_name(file.name)
                if file.name in on_disk or db.execute("SELECT 1 FROM pending WHERE fold = ?", (fold,)).fetchone():
                    refused.append(file.name)
                    continue
                row = db.execute("SELECT name FROM files WHERE fold = ?", (fold,)).fetchone()
                if row is not None and not (self.overwrite and row["name"] == file.name):
                    refused.append(file.name)
            if reserve and not refused:
                db.executemany(
                    "INSERT INTO pending (name, fold, size, owner, reserved_at) VALUES (?, ?, ?, ?, ?)",
                    [(f.name, fold_name(f.name), f.size, identity.dn, now) for f in files],
                )
            return refused

        return await self._db.run(check)

    async def get_upload_filename(self, identity: Identity, file: FileInfo) -> Path | None:
        reserved = await self._db.read(
            lambda db: db.execute("SELECT 1 FROM pending WHERE name = ?", (file.name,)).fetchone()
        )
        if reserved is None:
            return None
        return await asyncio.to_thread(self._path_for_writing, file.name)

    async def complete_upload(self, identity: Identity, file: FileInfo) -> None:
        if file.md5 is None or file.sha256 is None:
            raise ValueError("complete_upload needs the computed digests")
        row = (
            file.name,
            fold_name(file.name),
            file.size,
            file.md5,
            file.sha256,
            identity.dn,
            int(identity.authenticated),
            time.time(),
        )

        def record(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM pending WHERE name = ?", (file.name,))
            db.execute("DELETE FROM files WHERE name = ?", (file.name,))
            db.execute(
                "INSERT INTO files (name, fold, size, md5, sha256, owner, owner_authenticated, uploaded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

        await self._db.run(record)

    async def cancel_upload(self, identity: Identity, file: FileInfo) -> None:
        await self._db.run(lambda db: db.execute("DELETE FROM pending WHERE name = ?", (file.name,)))

    async def get_download_filename(self, identity: Identity, name: str) -> Path:
        if await self.describe_file(identity, name) is None:
            raise FileNotFound()
        try:
            return await asyncio.to_thread(contained_path, self.directory, name)
        except InvalidName:
            raise FileNotFound() from None

    async def describe_file(self, identity: Identity, name: str) -> StoredFile | None:
        row = await self._db.read(lambda db: db.execute("SELECT * FROM files WHERE name = ?", (name,)).fetchone())
        return _stored(row) if row is not None else None

    async def list_files(self, identity: Identity) -> Sequence[StoredFile]:
        rows = await self._db.read(lambda db: db.execute("SELECT * FROM files ORDER BY name").fetchall())
        return [_stored(row) for row in rows]

    async def delete_file(self, identity: Identity, name: str) -> None:
        stored = await self.describe_file(identity, name)
        if stored is None:
            raise FileNotFound()
        # An identity asserted over plain HTTP never matches one a certificate proved.
        if (stored.owner, stored.owner_authenticated) != (identity.dn, identity.authenticated):
            raise NotAuthorized("only the owner may delete a file")
        path = await asyncio.to_thread(contained_path, self.directory, name)
        await self._db.run(lambda db: db.execute("DELETE FROM files WHERE name = ?", (name,)))
        await asyncio.to_thread(_unlink_if_present, path)

    async def close(self) -> None:
        await self._db.close()

    def _on_disk(self, names: list[str]) -> set[str]:
        """Which of ``names`` (already validated flat names) exist in the folder."""
        try:
            present = set(os.listdir(self.directory))
        except FileNotFoundError:
            return set()
        return {name for name in names if name in present}

    def _path_for_writing(self, name: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        return contained_path(self.directory, name)


def _stored(row: sqlite3.Row) -> StoredFile:
    return StoredFile(
        name=row["name"],
        size=row["size"],
        md5=row["md5"],
        sha256=row["sha256"],
        owner=row["owner"],
        uploaded_at=row["uploaded_at"],
        owner_authenticated=bool(row["owner_authenticated"]),
    )


def _unlink_if_present(path: Path) -> None:
    path.unlink(missing_ok=True)
