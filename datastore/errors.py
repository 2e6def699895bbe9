"""Every failure a client can see, as one exception class each.

Each class carries the HTTP status and the reason phrase a client receives.
The reasons of the AccessGrid protocol are kept word for word, because legacy
clients log them; the server renders these exceptions in exactly one place
(the error middleware in ``http/server.py``), as the status line's reason phrase and
a one-line ``text/plain`` body, or as JSON when the client asked for JSON.

The tree::

    DatastoreError                      500  (base; never raised directly)
    ├── BadRequest                      400
    │   ├── ManifestError               400  "ConfigParser error: ..." / field errors
    │   ├── InvalidName                 400
    │   └── IncompleteUpload            400  body ended before the declared size
    ├── Unauthorized                    401  sign in first (no identity where one is needed)
    │   └── InvalidToken                401  a bearer token unknown, expired or revoked
    ├── NotAuthorized                   403  "Not authorized"
    │   ├── IdentityMismatch            403  key used by another identity
    │   ├── CertificateRefused          403  client certificate revoked or expired (connection closed)
    │   ├── VoucherExhausted            403  a voucher's byte budget is used up (until extended)
    │   └── CrossSiteRequest            403  a browser sent a state-changing request for another site
    ├── NotFound                        404
    │   ├── PathNotFound                404  "Path not found" (unknown prefix)
    │   ├── FileNotFound                404  "File not found"
    │   ├── TransferNotFound            404  unknown transfer key
    │   ├── FileNumberNotFound          404  file number outside the manifest
    │   └── UploadFileNotFound          404  "Upload file not found" (handler said no)
    ├── UploadRefused                   405  (legacy status for a refused body)
    │   ├── SizeMismatch                405  "Size in manifest != size in Content-Length"
    │   ├── ChecksumMismatch            405  "Checksum mismatch on upload"
    │   └── NotEnoughSpace              405  "Not enough disk space for upload"
    ├── RequestTimeout                  408  client too slow sending the body
    ├── Conflict                        409
    │   ├── UploadInProgress            409  same file number already uploading
    │   ├── AlreadyUploaded             409  file number already published
    │   └── OffsetMismatch              409  tus Upload-Offset is not the current offset
    ├── TransferExpired                 410  key older than its lifetime
    │   └── TransferCancelled           410  transfer or upload cancelled
    ├── LengthRequired                  411  raw body without Content-Length
    ├── TusVersionUnsupported           412  missing or unknown Tus-Resumable
    ├── PayloadTooLarge                 413  manifest or body over a limit
    ├── UnsupportedMediaType            415
    ├── QuotaExceeded                   429  a client's open transfers would hold more than its share
    │   └── TooManyUploads              429  a client runs as many uploads at once as it may
    ├── ChunkChecksumMismatch           460  tus Upload-Checksum did not match
    ├── ServiceUnavailable              503  too many concurrent uploads
    │   └── TooManyManifests            503  the manifests in memory fill their budget
    └── InsufficientStorage             507  a manifest that does not fit on disk (JSON)
"""

from __future__ import annotations

from typing import ClassVar


class DatastoreError(Exception):
    """Base of every client-visible failure: an HTTP status and a reason phrase."""

    status: ClassVar[int] = 500
    reason: ClassVar[str] = "Internal server error"
    #: Short machine-readable name used in JSON error bodies.
    code: ClassVar[str] = "internal_error"
    #: Extra response headers (e.g. Retry-After).
    headers: ClassVar[dict[str, str]] = {}
    #: Whether the connection is closed after the answer (nothing more may come over it).
    close_connection: ClassVar[bool] = False

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The reason phrase, with the detail appended when there is one."""
        if self.detail:
            return f"{self.reason}: {self.detail}"
        return self.reason


class BadRequest(DatastoreError):
    status = 400
    reason = "Bad request"
    code = "bad_request"


class ManifestError(BadRequest):
    """The manifest could not be parsed or breaks a rule.

    For the INI form the message is ``ConfigParser error: ...`` as the
    AccessGrid server sent it; for JSON it names the offending field.
    """

    reason = "ConfigParser error"
    code = "bad_manifest"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(detail)


class InvalidName(BadRequest):
    reason = "Invalid file name"
    code = "invalid_name"


class IncompleteUpload(BadRequest):
    reason = "Incomplete upload"
    code = "incomplete_upload"


class Unauthorized(DatastoreError):
    status = 401
    reason = "Authentication required"
    code = "unauthorized"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="datastore"'}


class InvalidToken(Unauthorized):
    reason = "Invalid token"
    code = "invalid_token"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="datastore", error="invalid_token"'}


class NotAuthorized(DatastoreError):
    status = 403
    reason = "Not authorized"
    code = "not_authorized"


class VoucherExhausted(NotAuthorized):
    """A voucher's byte budget is used up: the transfer waits until its issuer extends it."""

    reason = "Voucher budget used up"
    code = "voucher_exhausted"
    headers: ClassVar[dict[str, str]] = {
        "WWW-Authenticate": 'Bearer realm="datastore", error="insufficient_scope",'
        ' error_description="voucher_exhausted"'
    }


class IdentityMismatch(NotAuthorized):
    reason = "Transfer key belongs to another identity"
    code = "identity_mismatch"


class CrossSiteRequest(NotAuthorized):
    reason = "Cross-site request refused"
    code = "cross_site"


class CertificateRefused(NotAuthorized):
    reason = "Client certificate refused"
    code = "certificate_refused"
    close_connection = True


class NotFound(DatastoreError):
    status = 404
    reason = "Not found"
    code = "not_found"


class PathNotFound(NotFound):
    reason = "Path not found"
    code = "unknown_prefix"


class FileNotFound(NotFound):
    reason = "File not found"
    code = "file_not_found"


class TransferNotFound(NotFound):
    reason = "Transfer key not found"
    code = "unknown_transfer"


class FileNumberNotFound(NotFound):
    reason = "File number not in manifest"
    code = "unknown_file_number"


class UploadFileNotFound(NotFound):
    reason = "Upload file not found"
    code = "upload_refused_by_handler"


class UploadRefused(DatastoreError):
    status = 405
    reason = "Upload refused"
    code = "upload_refused"


class SizeMismatch(UploadRefused):
    reason = "Size in manifest != size in Content-Length"
    code = "size_mismatch"


class ChecksumMismatch(UploadRefused):
    reason = "Checksum mismatch on upload"
    code = "checksum_mismatch"


class NotEnoughSpace(UploadRefused):
    reason = "Not enough disk space for upload"
    code = "insufficient_storage"


class RequestTimeout(DatastoreError):
    status = 408
    reason = "Request body timeout"
    code = "request_timeout"


class Conflict(DatastoreError):
    status = 409
    reason = "Conflict"
    code = "conflict"


class UploadInProgress(Conflict):
    reason = "Upload of this file already in progress"
    code = "upload_in_progress"


class AlreadyUploaded(Conflict):
    reason = "File already uploaded"
    code = "already_uploaded"


class OffsetMismatch(Conflict):
    reason = "Upload-Offset does not match the current offset"
    code = "offset_mismatch"


class TransferExpired(DatastoreError):
    status = 410
    reason = "Transfer key expired"
    code = "transfer_expired"


class TransferCancelled(TransferExpired):
    reason = "Transfer cancelled"
    code = "transfer_cancelled"


class LengthRequired(DatastoreError):
    status = 411
    reason = "Content-Length required"
    code = "length_required"


class TusVersionUnsupported(DatastoreError):
    status = 412
    reason = "Tus-Resumable 1.0.0 required"
    code = "tus_version"
    headers: ClassVar[dict[str, str]] = {"Tus-Version": "1.0.0"}


class PayloadTooLarge(DatastoreError):
    status = 413
    reason = "Request too large"
    code = "too_large"


class UnsupportedMediaType(DatastoreError):
    status = 415
    reason = "Unsupported media type"
    code = "unsupported_media_type"


class QuotaExceeded(DatastoreError):
    status = 429
    reason = "Quota exceeded"
    code = "quota_exceeded"


class TooManyUploads(QuotaExceeded):
    reason = "Too many uploads at once"
    code = "too_many_uploads"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class ChunkChecksumMismatch(DatastoreError):
    status = 460
    reason = "Checksum Mismatch"
    code = "chunk_checksum_mismatch"


class ServiceUnavailable(DatastoreError):
    status = 503
    reason = "Too many concurrent uploads"
    code = "busy"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class TooManyManifests(ServiceUnavailable):
    reason = "Too many manifests at once"
    code = "busy"


class InsufficientStorage(DatastoreError):
    status = 507
    reason = "Not enough disk space for upload"
    code = "insufficient_storage"
