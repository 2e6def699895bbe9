"""Prefix handlers: the interface, the default DirectoryHandler and the AccessGrid adapter."""

from .directory import DirectoryHandler
from .interface import (
    CanAddDigests,
    CanAuthorize,
    CanClose,
    CanDelete,
    CanDescribe,
    CanList,
    CanLocateDownload,
    CanObserve,
    CanReserveMany,
    Download,
    FileInfo,
    StoredFile,
    TransferHandler,
)
from .legacy import LegacyHandler, LegacyHandlerAdapter

__all__ = [
    "CanAddDigests",
    "CanAuthorize",
    "CanClose",
    "CanDelete",
    "CanDescribe",
    "CanList",
    "CanLocateDownload",
    "CanObserve",
    "CanReserveMany",
    "DirectoryHandler",
    "Download",
    "FileInfo",
    "LegacyHandler",
    "LegacyHandlerAdapter",
    "StoredFile",
    "TransferHandler",
]
