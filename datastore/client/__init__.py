"""The client side: an async and a blocking Python client (``client.py``) and the CLI commands built on
them (``commands.py``)."""

from .client import (
    FINAL_JOB_STATES,
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
    "FINAL_JOB_STATES",
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
