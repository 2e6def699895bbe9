"""Prefix handlers: the interface, the default DirectoryHandler and the AccessGrid adapter."""

from .directory import DirectoryHandler
from .interface import (
    CanClose,
    CanDelete,
    CanDescribe,
    CanList,
    CanReserveMany,
    FileInfo,
    StoredFile,
    TransferHandler,
)
from .legacy import LegacyHandler, LegacyHandlerAdapter

__all__ = [
    "CanClose",
    "CanDelete",
    "CanDescribe",
    "CanList",
    "CanReserveMany",
    "DirectoryHandler",
    "FileInfo",
    "LegacyHandler",
    "LegacyHandlerAdapter",
    "StoredFile",
    "TransferHandler",
]
