"""What the two backends of the transfers (``sqlite.py``, ``postgres.py``) share besides their
contracts (``interface.py``): the transfer keys, the records a manifest makes, how rows of
``transfers``, ``transfer_files`` and ``events`` (the same columns in both databases) read back as
records, and the events a transfer's end appends. Pure Python: the SQL, and what differs between
the databases, stays in each backend.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..lifecycle.states import (
    FINAL_FILE_STATES,
    Event,
    EventType,
    FileState,
    NewEvent,
    Step,
    StopReason,
    Subject,
    TransferState,
    events_of,
)
from ..protocol.manifest import ManifestFile
from ..security.identity import Identity
from .interface import ClaimStatus, StagedFile, Transfer, TransferFile


class Row(Protocol):
    """A row as either database's driver gives it, its columns by name (``sqlite3.Row``, psycopg's ``DictRow``)."""

    def keys(self) -> Iterable[str]: ...

    def __getitem__(self, key: str, /) -> Any: ...


#: The columns of an event as a NewEvent holds them, in the order the ``events`` table stores them.
EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(NewEvent))
#: The states of a file still open: neither published nor cancelled.
OPEN_FILE_STATES = tuple(state for state in FileState if state not in FINAL_FILE_STATES)


def new_transfer_key() -> str:
    """An unguessable transfer key: 160 random bits as 40 hex digits."""
    return secrets.token_hex(20)


def new_transfer(
    key: str,
    prefix: str,
    owner: Identity,
    files: Sequence[ManifestFile],
    *,
    lifetime: float,
    now: float,
    upload_metadata: str | None,
) -> Transfer:
    """The OPEN transfer :meth:`~.interface.TransferStore.create` stores, every file RESERVED."""
    records = tuple(
        TransferFile(
            num,
            f.name,
            f.size,
            f.md5,
            f.sha256,
            FileState.RESERVED,
            updated_at=now,
            upload_metadata=upload_metadata,
        )
        for num, f in enumerate(files)
    )
    return Transfer(key, prefix, owner, TransferState.OPEN, now, now, now + lifetime, records)


def transfer_from_row(row: Row, files: tuple[TransferFile, ...]) -> Transfer:
    """A transfer as its ``transfers`` row holds it, with ``files``."""
    return Transfer(
        key=row["key"],
        prefix=row["prefix"],
        owner=Identity.from_principal(row["owner_id"], row["owner"]),
        state=TransferState(row["state"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        files=files,
    )


def file_from_row(row: Row) -> TransferFile:
    """A file as its ``transfer_files`` row holds it."""
    return TransferFile(
        num=row["num"],
        name=row["name"],
        size=row["size"],
        md5=row["md5"],
        sha256=row["sha256"],
        state=FileState(row["state"]),
        received=row["received"],
        error=row["error"],
        updated_at=row["updated_at"],
        upload_metadata=row["upload_metadata"],
    )


def staged_from_row(row: Row) -> StagedFile:
    """What a ``transfer_files`` row says of the file's staged bytes."""
    return StagedFile(row["key"], row["num"], row["received"], bool(row["verifying_chunk"]), row["claimed_by"])


def status_from_row(row: Row) -> ClaimStatus:
    """Who holds a file, as its ``transfer_files`` row (or those columns of it) says."""
    return ClaimStatus(FileState(row["state"]), row["claimed_by"], row["lease_until"], row["stop_request"])


def subject_from_rows(key: str, transfer_row: Row, file_row: Row) -> Subject:
    """The subject of a file's events: its transfer's (``prefix``, ``owner``, ``owner_id``) and its own columns."""
    return Subject(
        transfer_row["prefix"],
        key,
        transfer_row["owner"],
        transfer_row["owner_id"],
        file_row["num"],
        file_row["name"],
        file_row["size"],
    )


def event_from_row(row: Row) -> Event:
    """An event as the log's row holds it."""
    values = {name: row[name] for name in EVENT_FIELDS}
    return Event(**{**values, "type": EventType(row["type"])}, id=row["id"], time=row["time"])


def end_events(before: Transfer, step: Step, state: TransferState) -> list[NewEvent]:
    """The events of an OPEN transfer ``before`` that ``step`` (cancel, expire) ends in ``state``."""
    subject = Subject(before.prefix, before.key, before.owner.dn, before.owner.principal)
    reason = StopReason.CANCELLED if step is Step.CANCEL else StopReason.EXPIRED
    return events_of(step, subject, transfer_after=state, reason=reason)
