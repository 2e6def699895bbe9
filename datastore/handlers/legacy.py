"""Adapter for AccessGrid-style handler objects with CamelCase methods.

AGTk's ``DataStore`` implemented ``CanUploadFile``, ``AddPendingUpload``,
``GetUploadFilename``, ``CompleteUpload``, ``CancelPendingUpload`` and
``GetDownloadFilename`` as blocking methods taking an identity token and a
``file_info`` dict of strings (``name``, ``size``, ``checksum``). The adapter
runs them in worker threads, passes the :class:`Identity` as the token (it
has ``.dn``), and maps the exceptions those handlers raised by class name
(``FileNotFound`` -> 404, ``NotAuthorized`` -> 403).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import FileNotFound, NotAuthorized
from ..security.identity import Identity
from .interface import FileInfo


@runtime_checkable
class LegacyHandler(Protocol):
    """The callback interface of AccessGrid's ``TransferServer`` handlers."""

    def CanUploadFile(self, id_token: Any, file_info: dict[str, str]) -> Any: ...  # noqa: N802

    def AddPendingUpload(self, id_token: Any, filename: str) -> Any: ...  # noqa: N802

    def GetUploadFilename(self, id_token: Any, file_info: dict[str, str]) -> Any: ...  # noqa: N802

    def CompleteUpload(self, id_token: Any, file_info: dict[str, str]) -> Any: ...  # noqa: N802

    def CancelPendingUpload(self, filename: str) -> Any: ...  # noqa: N802

    def GetDownloadFilename(self, id_token: Any, url_path: str) -> Any: ...  # noqa: N802


class LegacyHandlerAdapter:
    """A :class:`TransferHandler` that forwards to a :class:`LegacyHandler`."""

    def __init__(self, legacy: LegacyHandler) -> None:
        self.legacy = legacy

    async def can_upload(self, identity: Identity, file: FileInfo) -> bool:
        return bool(await asyncio.to_thread(self.legacy.CanUploadFile, identity, _file_info(file)))

    async def add_pending_upload(self, identity: Identity, file: FileInfo) -> None:
        await asyncio.to_thread(self.legacy.AddPendingUpload, identity, file.name)

    async def get_upload_filename(self, identity: Identity, file: FileInfo) -> Path | None:
        path = await asyncio.to_thread(self.legacy.GetUploadFilename, identity, _file_info(file))
        return Path(path) if path else None

    async def complete_upload(self, identity: Identity, file: FileInfo) -> None:
        await asyncio.to_thread(self.legacy.CompleteUpload, identity, _file_info(file))

    async def cancel_upload(self, identity: Identity, file: FileInfo) -> None:
        await asyncio.to_thread(self.legacy.CancelPendingUpload, file.name)

    async def get_download_filename(self, identity: Identity, name: str) -> Path:
        try:
            path = await asyncio.to_thread(self.legacy.GetDownloadFilename, identity, name)
        except Exception as exc:
            kind = type(exc).__name__
            if kind == "FileNotFound":
                raise FileNotFound() from exc
            if kind == "NotAuthorized":
                raise NotAuthorized() from exc
            raise
        if not path:
            raise FileNotFound()
        return Path(path)


def _file_info(file: FileInfo) -> dict[str, str]:
    """The dict of strings an AccessGrid handler expects."""
    return {"name": file.name, "size": str(file.size), "checksum": file.md5 or ""}
