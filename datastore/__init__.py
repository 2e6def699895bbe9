"""datastore: an HTTP file store in the line of the AccessGrid TransferServer.

Register a prefix with a handler, start the server, and clients upload
through a manifest and a transfer key and download by name::

    server = HTTPTransferServer(Settings(root=Path("data")))
    server.register_prefix("files", DirectoryHandler(Path("data/files")))
    server.run()
"""

from .config import Settings, load_settings
from .errors import DatastoreError, FileNotFound, NotAuthorized
from .handlers import (
    CanAddDigests,
    CanAuthorize,
    CanDelete,
    CanDescribe,
    CanList,
    CanObserve,
    DirectoryHandler,
    FileInfo,
    LegacyHandlerAdapter,
    StoredFile,
    TransferHandler,
)
from .http.server import HTTPTransferServer, TransferServer
from .lifecycle.states import Event, EventType
from .security.identity import Identity, IdentityKind
from .security.policy import Action, Audience, Policy

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Audience",
    "CanAddDigests",
    "CanAuthorize",
    "CanDelete",
    "CanDescribe",
    "CanList",
    "CanObserve",
    "DatastoreError",
    "DirectoryHandler",
    "Event",
    "EventType",
    "FileInfo",
    "FileNotFound",
    "HTTPTransferServer",
    "Identity",
    "IdentityKind",
    "LegacyHandlerAdapter",
    "NotAuthorized",
    "Policy",
    "Settings",
    "StoredFile",
    "TransferHandler",
    "TransferServer",
    "__version__",
    "load_settings",
]
