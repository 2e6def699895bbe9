"""The client side: an async and a blocking Python client (``client.py``) and the CLI commands built on
them (``commands.py``)."""

from .client import (
    Cancelled,
    ClientError,
    DataStoreClient,
    DigestMismatch,
    DownloadResult,
    RequestFailed,
    RetriesExhausted,
    SyncDataStoreClient,
    UploadRefused,
    UploadResult,
    client_ssl_context,
)

__all__ = [
    "Cancelled",
    "ClientError",
    "DataStoreClient",
    "DigestMismatch",
    "DownloadResult",
    "RequestFailed",
    "RetriesExhausted",
    "SyncDataStoreClient",
    "UploadRefused",
    "UploadResult",
    "client_ssl_context",
]
