"""Test doubles that are real handlers: they record what the server asks of them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from datastore.handlers.directory import DirectoryHandler
from datastore.handlers.interface import FileInfo, StoredFile
from datastore.security.identity import Identity


class RecordingHandler:
    """A DirectoryHandler that appends ``(method, name)`` to ``calls`` and the
    identity of each call to ``identities``; ``refuse`` lists names whose
    ``can_upload`` answers false."""

    def __init__(self, directory: Path, catalogue: Path, *, refuse: Sequence[str] = ()) -> None:
        self.inner = DirectoryHandler(directory, catalogue=catalogue)
        self.calls: list[tuple[str, str]] = []
        self.identities: list[Identity] = []
        self.refuse = set(refuse)
        self.completed: list[FileInfo] = []

    def _record(self, method: str, identity: Identity, name: str) -> None:
        self.calls.append((method, name))
        self.identities.append(identity)

    async def can_upload(self, identity: Identity, file: FileInfo) -> bool:
        self._record("can_upload", identity, file.name)
        if file.name in self.refuse:
            return False
        return await self.inner.can_upload(identity, file)

    async def add_pending_upload(self, identity: Identity, file: FileInfo) -> None:
        self._record("add_pending_upload", identity, file.name)
        await self.inner.add_pending_upload(identity, file)

    async def get_upload_filename(self, identity: Identity, file: FileInfo) -> Path | None:
        self._record("get_upload_filename", identity, file.name)
        return await self.inner.get_upload_filename(identity, file)

    async def complete_upload(self, identity: Identity, file: FileInfo) -> None:
        self._record("complete_upload", identity, file.name)
        self.completed.append(file)
        await self.inner.complete_upload(identity, file)

    async def cancel_upload(self, identity: Identity, file: FileInfo) -> None:
        self._record("cancel_upload", identity, file.name)
        await self.inner.cancel_upload(identity, file)

    async def get_download_filename(self, identity: Identity, name: str) -> Path:
        self._record("get_download_filename", identity, name)
        return await self.inner.get_download_filename(identity, name)

    async def describe_file(self, identity: Identity, name: str) -> StoredFile | None:
        return await self.inner.describe_file(identity, name)

    async def list_files(self, identity: Identity) -> Sequence[StoredFile]:
        return await self.inner.list_files(identity)

    async def close(self) -> None:
        await self.inner.close()

    def methods(self) -> list[str]:
        """Just the method names, in call order."""
        return [method for method, _ in self.calls]


class LegacyDataStore:
    """An AccessGrid 2.x style handler: blocking CamelCase methods, dict file_info.

    Behaves as AGTk's ``DataStore`` did (a pending description per name,
    ``FileNotFound`` for unknown downloads), and records every call.
    """

    class FileNotFound(Exception):
        pass

    class NotAuthorized(Exception):
        pass

    def __init__(self, directory: Path, *, forbidden: Sequence[str] = ()) -> None:
        self.directory = directory
        self.pending: set[str] = set()
        self.present: dict[str, dict[str, str]] = {}
        self.forbidden = set(forbidden)
        self.calls: list[tuple[str, object]] = []

    def CanUploadFile(self, id_token: Identity, file_info: dict[str, str]) -> int:
        self.calls.append(("CanUploadFile", dict(file_info)))
        name = file_info["name"]
        return 0 if name in self.pending or name in self.present else 1

    def AddPendingUpload(self, id_token: Identity, filename: str) -> None:
        self.calls.append(("AddPendingUpload", filename))
        self.pending.add(filename)

    def GetUploadFilename(self, id_token: Identity, file_info: dict[str, str]) -> str | None:
        self.calls.append(("GetUploadFilename", dict(file_info)))
        if file_info["name"] not in self.pending:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        return str(self.directory / file_info["name"])

    def CompleteUpload(self, id_token: Identity, file_info: dict[str, str]) -> None:
        self.calls.append(("CompleteUpload", dict(file_info)))
        self.pending.discard(file_info["name"])
        self.present[file_info["name"]] = dict(file_info, owner=str(id_token.dn))

    def CancelPendingUpload(self, filename: str) -> None:
        self.calls.append(("CancelPendingUpload", filename))
        self.pending.discard(filename)

    def GetDownloadFilename(self, id_token: Identity, url_path: str) -> str:
        self.calls.append(("GetDownloadFilename", url_path))
        if url_path in self.forbidden:
            raise LegacyDataStore.NotAuthorized(url_path)
        if url_path not in self.present:
            raise LegacyDataStore.FileNotFound(url_path)
        return str(self.directory / url_path)


class SlowCallbacks(RecordingHandler):
    """A RecordingHandler whose can_upload waits on an event (to test atomic reservations)."""

    def __init__(self, directory: Path, catalogue: Path) -> None:
        super().__init__(directory, catalogue)
        self.gate = asyncio.Event()

    async def can_upload(self, identity: Identity, file: FileInfo) -> bool:
        await self.gate.wait()
        return await super().can_upload(identity, file)
