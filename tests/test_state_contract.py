"""The contract suite of the state store: every method of ``TransferStore``, ``EventLog``,
``LeaseStore`` and ``CursorStore`` (``datastore/state/interface.py``), called directly (no HTTP)
and held to the contract its docstring writes, on every backend; and the transition table those
contracts follow (``datastore/lifecycle/states.py``).

A backend is whatever passes this module. Each test that takes the ``state`` fixture runs once per
entry of :data:`BACKENDS`, on fresh storage; a test that plays two worker processes takes
``open_store`` and opens a second store object on the same storage.

**Adding a backend** (PostgreSQL, say): write an async context manager that takes the test's
temporary directory, prepares empty storage of its own (a database or schema named for the test),
yields an *opener* -- a callable that opens a new store object on that storage each time it is
called, as another worker process would -- and removes the storage after the test. Add it to
:data:`BACKENDS` under its name; every test then runs against it too (``-k postgres`` runs it
alone). The suite closes every store it opened.

Deterministic, and nothing sleeps: time is given. Every ``now`` is counted from :data:`T0`, an
arbitrary instant; leases, lifetimes, start timeouts and event retention are moved past by passing
a later ``now``. What a store stamps by itself (the times of a transition's events, ``updated_at``
after the steps that take no ``now``) is not assumed to be a ``now`` the test passed: a test reads
such a stamp back from the store. Concurrency is real (the contenders run at once, in threads or in
two store objects), and the tests assert only what any interleaving must give: one winner.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from datastore.errors import AlreadyUploaded, QuotaExceeded, TransferCancelled, UploadInProgress
from datastore.lifecycle.states import (
    FILE_TRANSITIONS,
    FINAL_FILE_STATES,
    TRANSFER_TRANSITIONS,
    Event,
    EventType,
    FileState,
    NewEvent,
    Step,
    StopReason,
    Subject,
    TransferState,
    events_of,
    sources,
    target,
)
from datastore.protocol.manifest import ManifestFile
from datastore.security.identity import ANONYMOUS, Identity, IdentityKind
from datastore.state import open_state
from datastore.state.interface import (
    Claim,
    ClaimStatus,
    ClientQuota,
    Ended,
    Holdings,
    LeaseExpired,
    StagedFile,
    StateStore,
    Transfer,
    TransferFile,
)
from datastore.state.postgres import PostgresState
from datastore.state.sqlite import SqliteState

from .postgres_server import shared_cluster

# -- backends ----------------------------------------------------------------------------------

#: Opens one more store object on a backend's storage (as one more worker process would).
Opener = Callable[[], StateStore]
#: Given the test's temporary directory: fresh storage for one test, as an opener.
Backend = Callable[[Path], AbstractAsyncContextManager[Opener]]


@asynccontextmanager
async def sqlite_backend(directory: Path) -> AsyncIterator[Opener]:
    """One SQLite file in the test's directory; each store object opens its own connection to it."""
    path = directory / "state.sqlite3"
    yield lambda: SqliteState(path)


@asynccontextmanager
async def postgres_backend(directory: Path) -> AsyncIterator[Opener]:
    """A database of its own in the session's PostgreSQL cluster; each store object opens its own pool."""
    with shared_cluster().database() as url:
        yield lambda: PostgresState(url)


#: Every backend the suite certifies, by name (the test ids' parameter).
BACKENDS: dict[str, Backend] = {
    "sqlite": sqlite_backend,
    "postgres": postgres_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens store objects on one fresh storage of the backend under test; closes them all after."""
    opened: list[StateStore] = []
    async with BACKENDS[request.param](tmp_path) as opener:

        def open_one() -> StateStore:
            store = opener()
            opened.append(store)
            return store

        try:
            yield open_one
        finally:
            for store in opened:
                await store.close()


@pytest.fixture
def state(open_store: Opener) -> StateStore:
    """A fresh, empty state store of the backend under test."""
    return open_store()


# -- what the tests store ----------------------------------------------------------------------

#: An arbitrary instant: every ``now`` is counted from it.
T0 = 1_000_000.0
LEASE = 30.0
LIFETIME = 3600.0
PREFIX = "files"
HOLDER = "worker-1"
OTHER = "worker-2"
ADA = Identity.asserted("/O=Lab/CN=Ada")
#: Compared by kind, subject and issuer; shown by its dn.
BOB = Identity(IdentityKind.CERTIFICATE, "CN=Bob", "CN=Lab CA", dn="/O=Lab/CN=Bob")
A_BIN = ManifestFile("a.bin", 10, md5=hashlib.md5(b"a" * 10).hexdigest())
B_BIN = ManifestFile("b.bin", 20, sha256=hashlib.sha256(b"b" * 20).hexdigest())
C_BIN = ManifestFile("c.bin", 5)
FILES = (A_BIN, B_BIN)
#: The digests a holder computed of a file it publishes.
MD5 = hashlib.md5(b"published").hexdigest()
SHA256 = hashlib.sha256(b"published").hexdigest()
KEY = re.compile(r"[0-9a-f]{40}")
#: More than any test logs.
ALL = 10_000


async def new_transfer(
    state: StateStore,
    files: Sequence[ManifestFile] = FILES,
    *,
    owner: Identity = ADA,
    now: float = T0,
    **options: Any,
) -> Transfer:
    return await state.create(PREFIX, owner, files, lifetime=options.pop("lifetime", LIFETIME), now=now, **options)


async def file_of(state: StateStore, key: str, num: int) -> TransferFile:
    found = await state.get_file(key, num)
    assert found is not None and found[1] is not None
    return found[1]


async def transfer_of(state: StateStore, key: str) -> Transfer:
    transfer = await state.get(key)
    assert transfer is not None
    return transfer


_NEW_EVENT_FIELDS = [field.name for field in dataclasses.fields(NewEvent)]


def bare(event: Event) -> NewEvent:
    """``event`` without what the log gave it (id, time), to compare with what a step should append."""
    return NewEvent(**{name: getattr(event, name) for name in _NEW_EVENT_FIELDS})


async def logged_since(state: StateStore, mark: int) -> list[Event]:
    events = await state.events_after(mark, limit=ALL)
    ids = [e.id for e in events]
    assert ids == sorted(set(ids)), "events_after gives ids in ascending order, each once"
    return events


async def since(state: StateStore, mark: int) -> list[NewEvent]:
    """The events appended after event ``mark``, without their ids and times."""
    return [bare(e) for e in await logged_since(state, mark)]


def file_event(kind: EventType, transfer: Transfer, num: int, **fields: Any) -> NewEvent:
    """The event ``kind`` about file ``num`` of ``transfer``: whose it is, its name and size."""
    file = transfer.files[num]
    owner, owner_id = transfer.owner.dn, transfer.owner.principal
    return NewEvent(kind, transfer.prefix, transfer.key, num, file.name, owner, owner_id, size=file.size, **fields)


def transfer_event(kind: EventType, transfer: Transfer, **fields: Any) -> NewEvent:
    """The event ``kind`` about ``transfer`` as a whole."""
    owner, owner_id = transfer.owner.dn, transfer.owner.principal
    return NewEvent(kind, transfer.prefix, transfer.key, owner=owner, owner_id=owner_id, **fields)


async def outcomes(calls: Sequence[Awaitable[Any]]) -> tuple[list[Any], list[BaseException]]:
    """Run ``calls`` at once: (what they returned, what they raised)."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    return [r for r in results if not isinstance(r, BaseException)], [
        r for r in results if isinstance(r, BaseException)
    ]


# -- the transition table ----------------------------------------------------------------------

_S = FileState
OPEN_FILE_STATES = (_S.RESERVED, _S.UPLOADING, _S.RELEASED)


def test_the_file_transitions_are_exactly_those_of_the_lifecycle() -> None:
    assert dict(FILE_TRANSITIONS) == {
        (_S.RESERVED, Step.CLAIM): _S.UPLOADING,
        (_S.RELEASED, Step.CLAIM): _S.UPLOADING,
        (_S.UPLOADING, Step.PAUSE): _S.RESERVED,
        (_S.UPLOADING, Step.INTERRUPT): _S.RESERVED,
        (_S.UPLOADING, Step.REAP): _S.RESERVED,
        (_S.UPLOADING, Step.RESTORE): _S.RESERVED,
        (_S.UPLOADING, Step.RESTORE_RELEASED): _S.RELEASED,
        (_S.UPLOADING, Step.FAIL): _S.RELEASED,
        (_S.UPLOADING, Step.PUBLISH): _S.PUBLISHED,
        **{(s, Step.TERMINATE): _S.CANCELLED for s in OPEN_FILE_STATES},
        **{(s, Step.CANCEL): _S.CANCELLED for s in OPEN_FILE_STATES},
        **{(s, Step.EXPIRE): _S.CANCELLED for s in OPEN_FILE_STATES},
    }


def test_the_transfer_transitions_leave_only_open() -> None:
    assert dict(TRANSFER_TRANSITIONS) == {
        (TransferState.OPEN, Step.PUBLISH): TransferState.FINISHED,
        (TransferState.OPEN, Step.TERMINATE): TransferState.CANCELLED,
        (TransferState.OPEN, Step.CANCEL): TransferState.CANCELLED,
        (TransferState.OPEN, Step.EXPIRE): TransferState.EXPIRED,
    }


def test_published_and_cancelled_files_are_final() -> None:
    assert frozenset({_S.PUBLISHED, _S.CANCELLED}) == FINAL_FILE_STATES


@pytest.mark.parametrize(
    ("step", "states", "after"),
    [
        (Step.CLAIM, (_S.RESERVED, _S.RELEASED), _S.UPLOADING),
        (Step.PAUSE, (_S.UPLOADING,), _S.RESERVED),
        (Step.INTERRUPT, (_S.UPLOADING,), _S.RESERVED),
        (Step.REAP, (_S.UPLOADING,), _S.RESERVED),
        (Step.RESTORE, (_S.UPLOADING,), _S.RESERVED),
        (Step.RESTORE_RELEASED, (_S.UPLOADING,), _S.RELEASED),
        (Step.FAIL, (_S.UPLOADING,), _S.RELEASED),
        (Step.PUBLISH, (_S.UPLOADING,), _S.PUBLISHED),
        (Step.TERMINATE, OPEN_FILE_STATES, _S.CANCELLED),
        (Step.CANCEL, OPEN_FILE_STATES, _S.CANCELLED),
        (Step.EXPIRE, OPEN_FILE_STATES, _S.CANCELLED),
    ],
)
def test_each_step_leaves_its_sources_for_its_target(
    step: Step, states: tuple[FileState, ...], after: FileState
) -> None:
    assert sources(step) == states
    for state in states:
        assert target(state, step) is after


def test_every_step_is_in_the_table() -> None:
    assert {step for _, step in FILE_TRANSITIONS} == set(Step)


@pytest.mark.parametrize(
    ("state", "step"),
    [(state, step) for state in FileState for step in Step if (state, step) not in FILE_TRANSITIONS],
)
def test_a_step_not_in_the_table_is_refused(state: FileState, step: Step) -> None:
    with pytest.raises(ValueError, match="no transition"):
        target(state, step)
    assert state not in sources(step)


def test_no_step_leaves_a_final_state() -> None:
    for state in FINAL_FILE_STATES:
        for step in Step:
            with pytest.raises(ValueError):
                target(state, step)


SUBJECT = Subject("files", "k" * 40, "/O=Lab/CN=Ada", '["asserted","/O=Lab/CN=Ada"]', 3, "a.bin", 10)
ON_FILE = NewEvent(
    EventType.FILE_STARTED, "files", "k" * 40, 3, "a.bin", "/O=Lab/CN=Ada", '["asserted","/O=Lab/CN=Ada"]', size=10
)
ON_TRANSFER = NewEvent(
    EventType.TRANSFER_FINISHED, "files", "k" * 40, owner="/O=Lab/CN=Ada", owner_id='["asserted","/O=Lab/CN=Ada"]'
)


@pytest.mark.parametrize(
    ("step", "announced"),
    [
        (Step.CLAIM, EventType.FILE_STARTED),
        (Step.PAUSE, None),
        (Step.INTERRUPT, EventType.FILE_INTERRUPTED),
        (Step.REAP, EventType.FILE_INTERRUPTED),
        (Step.RESTORE, None),
        (Step.RESTORE_RELEASED, None),
        (Step.FAIL, EventType.FILE_FAILED),
        (Step.PUBLISH, EventType.FILE_COMPLETED),
        (Step.TERMINATE, EventType.FILE_CANCELLED),
        (Step.CANCEL, None),
        (Step.EXPIRE, None),
    ],
)
def test_events_of_each_step_on_a_file(step: Step, announced: EventType | None) -> None:
    events = events_of(step, SUBJECT, bytes=7, md5=MD5, sha256=SHA256, reason="why")
    if announced is None:
        assert events == []
        return
    digests = {"md5": MD5, "sha256": SHA256} if step is Step.PUBLISH else {}
    assert events == [dataclasses.replace(ON_FILE, type=announced, bytes=7, reason="why", **digests)]


def test_events_of_a_step_without_a_file_announce_only_the_transfer() -> None:
    whole = dataclasses.replace(SUBJECT, num=None, name=None, size=None)
    assert events_of(Step.TERMINATE, whole, bytes=7) == []
    assert events_of(Step.CANCEL, whole, transfer_after=TransferState.CANCELLED, reason="cancelled") == [
        dataclasses.replace(ON_TRANSFER, type=EventType.TRANSFER_CANCELLED, reason="cancelled")
    ]
    assert events_of(Step.EXPIRE, whole, transfer_after=TransferState.EXPIRED, reason="expired") == [
        dataclasses.replace(ON_TRANSFER, type=EventType.TRANSFER_EXPIRED, reason="expired")
    ]


def test_events_of_a_step_that_ends_the_transfer_come_file_first() -> None:
    assert events_of(
        Step.PUBLISH, SUBJECT, transfer_after=TransferState.FINISHED, bytes=10, md5=MD5, sha256=SHA256
    ) == [
        dataclasses.replace(ON_FILE, type=EventType.FILE_COMPLETED, bytes=10, md5=MD5, sha256=SHA256),
        ON_TRANSFER,  # a finished transfer gives no reason
    ]
    assert events_of(Step.TERMINATE, SUBJECT, transfer_after=TransferState.CANCELLED, reason="terminated") == [
        dataclasses.replace(ON_FILE, type=EventType.FILE_CANCELLED, reason="terminated"),
        dataclasses.replace(ON_TRANSFER, type=EventType.TRANSFER_CANCELLED, reason="terminated"),
    ]


def test_events_of_a_transfer_that_stays_open_announce_no_transfer_change() -> None:
    assert events_of(Step.CLAIM, SUBJECT, transfer_after=TransferState.OPEN, bytes=0) == [
        dataclasses.replace(ON_FILE, bytes=0)
    ]


# -- create, holdings, get, get_file -----------------------------------------------------------


async def test_create_opens_a_transfer_under_a_fresh_key_with_every_file_reserved(state: StateStore) -> None:
    transfer = await new_transfer(state, (A_BIN, B_BIN, C_BIN))
    assert KEY.fullmatch(transfer.key)
    assert (transfer.prefix, transfer.owner, transfer.owner.dn, transfer.state) == (
        PREFIX,
        ADA,
        ADA.dn,
        TransferState.OPEN,
    )
    assert (transfer.created_at, transfer.updated_at, transfer.expires_at) == (T0, T0, T0 + LIFETIME)
    assert transfer.files == (
        TransferFile(0, "a.bin", 10, A_BIN.md5, None, FileState.RESERVED, updated_at=T0),
        TransferFile(1, "b.bin", 20, None, B_BIN.sha256, FileState.RESERVED, updated_at=T0),
        TransferFile(2, "c.bin", 5, None, None, FileState.RESERVED, updated_at=T0),
    )
    assert await state.get(transfer.key) == transfer


async def test_open_names_are_those_of_open_transfers_files_neither_published_nor_cancelled(
    state: StateStore,
) -> None:
    kept = await new_transfer(state, (A_BIN, B_BIN))
    cancelled = await new_transfer(state, (C_BIN,))
    await state.cancel(cancelled.key, now=T0)
    names = ["a.bin", "b.bin", "c.bin", "never.bin"]
    assert await state.open_names(PREFIX, names) == {"a.bin", "b.bin"}
    assert await state.open_names("elsewhere", names) == set()
    assert await state.open_names(PREFIX, []) == set()
    await state.cancel(kept.key, now=T0)
    assert await state.open_names(PREFIX, names) == set()


async def test_create_never_hands_out_a_key_twice(state: StateStore) -> None:
    keys = {(await new_transfer(state, (C_BIN,))).key for _ in range(50)}
    assert len(keys) == 50
    assert all(KEY.fullmatch(key) for key in keys)


async def test_create_appends_transfer_created(state: StateStore) -> None:
    transfer = await new_transfer(state, now=T0 + 5)
    (created,) = await logged_since(state, 0)
    assert bare(created) == NewEvent(
        EventType.TRANSFER_CREATED,
        PREFIX,
        transfer.key,
        owner="/O=Lab/CN=Ada",
        owner_id='["asserted","/O=Lab/CN=Ada"]',
        size=30,
    )


async def test_create_keeps_the_owner_as_shown_and_as_compared(state: StateStore) -> None:
    bobs = await new_transfer(state, owner=BOB)
    anonymous = await new_transfer(state, owner=ANONYMOUS)
    stored = await transfer_of(state, bobs.key)
    assert stored.owner == BOB
    assert stored.owner.dn == "/O=Lab/CN=Bob"
    assert (await transfer_of(state, anonymous.key)).owner == ANONYMOUS
    assert await since(state, 0) == [
        NewEvent(
            EventType.TRANSFER_CREATED,
            PREFIX,
            bobs.key,
            owner="/O=Lab/CN=Bob",
            owner_id='["certificate","CN=Bob","CN=Lab CA"]',
            size=30,
        ),
        NewEvent(EventType.TRANSFER_CREATED, PREFIX, anonymous.key, size=30),
    ]


async def test_create_keeps_the_upload_metadata_with_the_file(state: StateStore) -> None:
    transfer = await new_transfer(state, (C_BIN,), upload_metadata="filename YS5iaW4=")
    assert transfer.files[0].upload_metadata == "filename YS5iaW4="
    assert (await file_of(state, transfer.key, 0)).upload_metadata == "filename YS5iaW4="


QUOTA = ClientQuota(transfers=2, names=3, bytes=100)


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ((C_BIN, C_BIN), "names"),
        ((ManifestFile("big", 71),), "bytes"),
    ],
)
async def test_create_over_the_quota_stores_nothing(
    state: StateStore, files: tuple[ManifestFile, ...], limit: str
) -> None:
    await new_transfer(state, client="10.0.0.1", quota=QUOTA)
    held, mark, reserved = await state.holdings("10.0.0.1"), await state.last_event_id(), await state.reserved_bytes()
    assert held == Holdings(1, 2, 30)
    with pytest.raises(QuotaExceeded, match=limit):
        await new_transfer(state, files, client="10.0.0.1", quota=QUOTA)
    assert await state.holdings("10.0.0.1") == held
    assert await state.reserved_bytes() == reserved
    assert await state.last_event_id() == mark


async def test_create_up_to_the_quota_and_no_further(state: StateStore) -> None:
    await new_transfer(state, client="10.0.0.1", quota=QUOTA)
    await new_transfer(state, (ManifestFile("rest", 70),), client="10.0.0.1", quota=QUOTA)
    assert await state.holdings("10.0.0.1") == Holdings(2, 3, 100)
    mark = await state.last_event_id()
    with pytest.raises(QuotaExceeded, match="you hold 2 open transfers"):
        await new_transfer(state, (ManifestFile("empty", 0),), client="10.0.0.1", quota=QUOTA)
    assert await state.last_event_id() == mark
    # Another client, and no client at all, hold their own share.
    await new_transfer(state, client="10.0.0.2", quota=QUOTA)
    await new_transfer(state, quota=QUOTA)
    assert await state.holdings("10.0.0.2") == Holdings(1, 2, 30)
    assert await state.holdings(None) == Holdings(1, 2, 30)
    assert await state.holdings("10.0.0.1") == Holdings(2, 3, 100)


async def test_create_without_a_quota_is_not_limited(state: StateStore) -> None:
    for _ in range(3):
        await new_transfer(state, client="10.0.0.1")
    assert await state.holdings("10.0.0.1") == Holdings(3, 6, 90)


async def test_holdings_count_open_files_and_the_bytes_still_to_come(state: StateStore) -> None:
    assert await state.holdings("c") == Holdings(0, 0, 0)
    first = await new_transfer(state, client="c")
    second = await new_transfer(state, (C_BIN,), client="c")
    assert await state.holdings("c") == Holdings(2, 3, 35)
    await state.set_received(first.key, 0, 4)
    assert await state.holdings("c") == Holdings(2, 3, 31)
    await state.claim(first.key, 1, HOLDER, lease=LEASE, now=T0)
    assert await state.publish(first.key, 1, HOLDER, md5=MD5, sha256=SHA256)
    assert await state.holdings("c") == Holdings(2, 2, 11)
    await state.terminate(first.key, 0)  # the last open file: the transfer is cancelled
    assert await state.holdings("c") == Holdings(1, 1, 5)
    await state.cancel(second.key, now=T0)
    assert await state.holdings("c") == Holdings(0, 0, 0)


async def test_get_of_an_unknown_key_is_none(state: StateStore) -> None:
    await new_transfer(state)
    assert await state.get("0" * 40) is None
    assert await state.get_file("0" * 40, 0) is None


async def test_get_file_gives_the_transfer_without_its_files_and_the_file(state: StateStore) -> None:
    transfer = await new_transfer(state)
    assert await state.get_file(transfer.key, 1) == (dataclasses.replace(transfer, files=()), transfer.files[1])
    assert await state.get_file(transfer.key, 2) == (dataclasses.replace(transfer, files=()), None)
    assert await state.get_file(transfer.key, -1) == (dataclasses.replace(transfer, files=()), None)


# -- claim -------------------------------------------------------------------------------------


async def test_claim_leases_a_reserved_file_and_starts_its_attempt(state: StateStore) -> None:
    transfer = await new_transfer(state)
    mark = await state.last_event_id()
    claim = await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0 + 1)
    assert claim == Claim(transfer.files[0], 1)
    assert (await file_of(state, transfer.key, 0)).state is FileState.UPLOADING
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.UPLOADING, HOLDER, T0 + 1 + LEASE, None)
    (started,) = await logged_since(state, mark)
    assert bare(started) == file_event(EventType.FILE_STARTED, transfer, 0, bytes=0)
    # The other file is untouched.
    assert await state.status(transfer.key, 1) == ClaimStatus(FileState.RESERVED, None, None, None)


async def test_claim_takes_a_released_file_again_and_starts_a_new_attempt(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await state.fail(transfer.key, 0, HOLDER, reason=StopReason.CHECKSUM_MISMATCH, message="bad digest")
    mark = await state.last_event_id()
    claim = await state.claim(transfer.key, 0, OTHER, lease=LEASE, now=T0 + 1)
    assert claim.before.state is FileState.RELEASED
    assert claim.before.error == "bad digest"
    assert claim.number == 2
    assert (await state.status(transfer.key, 0)) == ClaimStatus(FileState.UPLOADING, OTHER, T0 + 1 + LEASE, None)
    assert await since(state, mark) == [file_event(EventType.FILE_STARTED, transfer, 0, bytes=0)]


async def test_claim_after_a_pause_continues_the_attempt_silently(state: StateStore) -> None:
    transfer = await new_transfer(state)
    mark = await state.last_event_id()
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await state.pause(transfer.key, 0, HOLDER, received=4)
    claim = await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0 + 1)
    assert claim.before.state is FileState.RESERVED
    assert claim.before.received == 4
    assert await since(state, mark) == [file_event(EventType.FILE_STARTED, transfer, 0, bytes=0)]


async def test_claim_after_an_interruption_starts_a_new_attempt(state: StateStore) -> None:
    transfer = await new_transfer(state)
    mark = await state.last_event_id()
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await state.interrupt(transfer.key, 0, HOLDER, received=4, reason=StopReason.CONNECTION_LOST)
    claim = await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0 + 1)
    assert claim.before.received == 4
    assert await since(state, mark) == [
        file_event(EventType.FILE_STARTED, transfer, 0, bytes=0),
        file_event(EventType.FILE_INTERRUPTED, transfer, 0, bytes=4, reason="connection_lost"),
        file_event(EventType.FILE_STARTED, transfer, 0, bytes=4),
    ]


async def test_claim_after_a_restore_continues_the_attempt_silently(state: StateStore) -> None:
    transfer = await new_transfer(state)
    mark = await state.last_event_id()
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await state.restore(transfer.key, 0, HOLDER, released=False)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0 + 1)
    assert await since(state, mark) == [file_event(EventType.FILE_STARTED, transfer, 0, bytes=0)]


async def test_claim_numbers_grow_with_every_claim_of_a_file(state: StateStore) -> None:
    transfer = await new_transfer(state)
    numbers = []
    for i, holder in enumerate([HOLDER, OTHER, HOLDER, OTHER]):
        numbers.append((await state.claim(transfer.key, 0, holder, lease=LEASE, now=T0 + i)).number)
        assert await state.pause(transfer.key, 0, holder, received=i)
    assert numbers == [1, 2, 3, 4]
    assert (await state.claim(transfer.key, 1, HOLDER, lease=LEASE, now=T0)).number == 1


@pytest.mark.parametrize("second", [HOLDER, OTHER])
async def test_claim_of_a_file_held_under_a_live_lease_is_refused(state: StateStore, second: str) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    mark = await state.last_event_id()
    with pytest.raises(UploadInProgress):
        await state.claim(transfer.key, 0, second, lease=LEASE, now=T0 + LEASE - 0.001)
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.UPLOADING, HOLDER, T0 + LEASE, None)
    assert await state.last_event_id() == mark


async def test_claim_of_a_published_file_is_refused(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    mark = await state.last_event_id()
    with pytest.raises(AlreadyUploaded):
        await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    assert (await file_of(state, transfer.key, 0)).state is FileState.PUBLISHED
    assert await state.last_event_id() == mark


async def test_claim_of_a_terminated_file_is_refused(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.terminate(transfer.key, 0)
    mark = await state.last_event_id()
    with pytest.raises(TransferCancelled):
        await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    assert (await file_of(state, transfer.key, 0)).state is FileState.CANCELLED
    assert await state.last_event_id() == mark


@pytest.mark.parametrize("ending", ["cancel", "expire"])
async def test_claim_after_the_transfer_ended_is_refused(state: StateStore, ending: str) -> None:
    transfer = await new_transfer(state)
    if ending == "cancel":
        assert await state.cancel(transfer.key, now=T0) is not None
    else:
        assert len(await state.expire_due(T0 + LIFETIME)) == 1
    mark = await state.last_event_id()
    for num in (0, 1):
        with pytest.raises(TransferCancelled):
            await state.claim(transfer.key, num, HOLDER, lease=LEASE, now=T0)
    assert await state.last_event_id() == mark


async def test_claims_each_after_a_read_of_the_file_act_as_claims_do(state: StateStore) -> None:
    # A backend may act on what the read said (PostgreSQL claims in one round trip then): the
    # claims, their numbers, their events and what the store tells its listener are the same.
    transfer = await new_transfer(state)
    heard: list[Event] = []
    state.on_appended = heard.extend
    mark = await state.last_event_id()

    async def claim(now: float) -> Claim:
        await state.get_file(transfer.key, 0)
        return await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=now)

    assert await claim(T0) == Claim(transfer.files[0], 1)
    assert await state.pause(transfer.key, 0, HOLDER, received=4)
    resumed = await claim(T0 + 1)
    assert (resumed.before.state, resumed.before.received, resumed.number) == (FileState.RESERVED, 4, 2)
    assert await state.interrupt(transfer.key, 0, HOLDER, received=6, reason=StopReason.CONNECTION_LOST)
    assert (await claim(T0 + 2)).number == 3
    assert await state.fail(transfer.key, 0, HOLDER, reason=StopReason.CHECKSUM_MISMATCH, message="bad digest")
    again = await claim(T0 + 3)
    assert (again.before.state, again.before.error, again.number) == (FileState.RELEASED, "bad digest", 4)
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.UPLOADING, HOLDER, T0 + 3 + LEASE, None)

    logged = await logged_since(state, mark)
    assert [bare(e) for e in logged] == [
        file_event(EventType.FILE_STARTED, transfer, 0, bytes=0),
        file_event(EventType.FILE_INTERRUPTED, transfer, 0, bytes=6, reason="connection_lost"),
        file_event(EventType.FILE_STARTED, transfer, 0, bytes=6),
        file_event(EventType.FILE_FAILED, transfer, 0, bytes=0, reason="checksum_mismatch"),
        file_event(EventType.FILE_STARTED, transfer, 0, bytes=0),
    ]
    assert heard == logged


async def test_a_claim_after_a_read_overtaken_by_another_store_acts_on_the_file_as_it_is(open_store: Opener) -> None:
    one, two = open_store(), open_store()
    transfer = await new_transfer(one)
    for num in (0, 1):
        await one.get_file(transfer.key, num)
    # File 0 moved on since store one read it: store two staged 7 bytes of it and was interrupted.
    await two.claim(transfer.key, 0, OTHER, lease=LEASE, now=T0)
    assert await two.interrupt(transfer.key, 0, OTHER, received=7, reason=StopReason.CONNECTION_LOST)
    mark = await one.last_event_id()
    claim = await one.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0 + 1)
    assert (claim.before.received, claim.number) == (7, 2)
    assert await since(one, mark) == [file_event(EventType.FILE_STARTED, transfer, 0, bytes=7)]
    # File 1 is held by store two now: refused, and nothing is logged.
    await two.claim(transfer.key, 1, OTHER, lease=LEASE, now=T0)
    mark = await one.last_event_id()
    with pytest.raises(UploadInProgress):
        await one.claim(transfer.key, 1, HOLDER, lease=LEASE, now=T0 + 1)
    assert await one.status(transfer.key, 1) == ClaimStatus(FileState.UPLOADING, OTHER, T0 + LEASE, None)
    assert await one.last_event_id() == mark


async def test_claim_under_a_lease_that_ran_out_says_what_its_holder_staged(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    await state.set_received(transfer.key, 0, 6)
    await state.begin_chunk(transfer.key, 0, verifying=True)
    mark = await state.last_event_id()
    with pytest.raises(LeaseExpired) as expired:
        await state.claim(transfer.key, 0, OTHER, lease=LEASE, now=T0 + LEASE)
    assert expired.value.staged == StagedFile(transfer.key, 0, 6, True, HOLDER)
    # Nothing changed: the caller reconciles the bytes and reaps first.
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.UPLOADING, HOLDER, T0 + LEASE, None)
    assert await state.last_event_id() == mark
    assert await state.reap(transfer.key, 0, HOLDER, received=5, now=T0 + LEASE + 1)
    claim = await state.claim(transfer.key, 0, OTHER, lease=LEASE, now=T0 + LEASE + 2)
    assert claim.before.received == 5
    assert claim.number == 2
    assert await since(state, mark) == [
        file_event(EventType.FILE_INTERRUPTED, transfer, 0, bytes=5, reason="lease_expired"),
        file_event(EventType.FILE_STARTED, transfer, 0, bytes=5),
    ]


# -- renew, status, request_stop ---------------------------------------------------------------


async def test_renew_extends_the_holders_lease(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    mark = await state.last_event_id()
    status = await state.renew(transfer.key, 0, HOLDER, lease=LEASE, now=T0 + 20)
    assert status == ClaimStatus(FileState.UPLOADING, HOLDER, T0 + 20 + LEASE, None)
    assert await state.status(transfer.key, 0) == status
    with pytest.raises(UploadInProgress):  # the lease it had would have run out by now
        await state.claim(transfer.key, 0, OTHER, lease=LEASE, now=T0 + LEASE + 1)
    assert await state.last_event_id() == mark


async def test_renew_by_another_holder_changes_nothing_and_says_whose_the_lease_is(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    status = await state.renew(transfer.key, 0, OTHER, lease=LEASE, now=T0 + 20)
    assert status == ClaimStatus(FileState.UPLOADING, HOLDER, T0 + LEASE, None)
    assert await state.status(transfer.key, 0) == status


async def test_renew_of_a_lease_that_ended_changes_nothing(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await state.pause(transfer.key, 0, HOLDER, received=3)
    assert await state.renew(transfer.key, 0, HOLDER, lease=LEASE, now=T0 + 1) == ClaimStatus(
        FileState.RESERVED, None, None, None
    )
    await state.cancel(transfer.key, now=T0 + 2)
    assert await state.renew(transfer.key, 0, HOLDER, lease=LEASE, now=T0 + 3) == ClaimStatus(
        FileState.CANCELLED, None, None, None
    )


async def test_renew_and_status_of_a_file_that_is_gone_are_none(state: StateStore) -> None:
    transfer = await new_transfer(state)
    assert await state.renew(transfer.key, 2, HOLDER, lease=LEASE, now=T0) is None
    assert await state.status(transfer.key, 2) is None
    assert await state.status("0" * 40, 0) is None
    await state.cancel(transfer.key, now=T0)
    assert await state.purge(T0 + 1) == 1
    assert await state.status(transfer.key, 0) is None
    assert await state.renew(transfer.key, 0, HOLDER, lease=LEASE, now=T0) is None


async def test_status_of_each_state(state: StateStore) -> None:
    transfer = await new_transfer(state, (A_BIN, B_BIN, C_BIN))
    await state.claim(transfer.key, 1, HOLDER, lease=LEASE, now=T0)
    await state.claim(transfer.key, 2, HOLDER, lease=LEASE, now=T0)
    assert await state.publish(transfer.key, 2, HOLDER, md5=MD5, sha256=SHA256)
    assert [await state.status(transfer.key, num) for num in range(3)] == [
        ClaimStatus(FileState.RESERVED, None, None, None),
        ClaimStatus(FileState.UPLOADING, HOLDER, T0 + LEASE, None),
        ClaimStatus(FileState.PUBLISHED, None, None, None),
    ]


async def test_request_stop_asks_the_holder_and_says_who_it_is(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    mark = await state.last_event_id()
    assert await state.request_stop(transfer.key, 0, StopReason.SUPERSEDED) == HOLDER
    status = await state.status(transfer.key, 0)
    assert status == ClaimStatus(FileState.UPLOADING, HOLDER, T0 + LEASE, "superseded")
    assert status.stop_request == StopReason.SUPERSEDED
    # A renewal still reports the request; the next claim starts without it.
    renewed = await state.renew(transfer.key, 0, HOLDER, lease=LEASE, now=T0 + 1)
    assert renewed is not None and renewed.stop_request == StopReason.SUPERSEDED
    assert await state.pause(transfer.key, 0, HOLDER, received=2)
    await state.claim(transfer.key, 0, OTHER, lease=LEASE, now=T0 + 2)
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.UPLOADING, OTHER, T0 + 2 + LEASE, None)
    assert await since(state, mark) == []


async def test_request_stop_of_a_file_nobody_holds_is_none(state: StateStore) -> None:
    transfer = await new_transfer(state)
    assert await state.request_stop(transfer.key, 0, StopReason.SUPERSEDED) is None
    assert await state.request_stop(transfer.key, 5, StopReason.SUPERSEDED) is None
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.RESERVED, None, None, None)


# -- the steps that end a lease ----------------------------------------------------------------


async def claimed(state: StateStore, *, received: int = 0) -> Transfer:
    """A transfer of FILES whose file 0 HOLDER claimed at T0 and staged ``received`` bytes of."""
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    if received:
        await state.set_received(transfer.key, 0, received)
    return transfer


async def test_pause_keeps_the_bytes_silently(state: StateStore) -> None:
    transfer = await claimed(state)
    await state.begin_chunk(transfer.key, 0, verifying=True)
    mark = await state.last_event_id()
    assert await state.pause(transfer.key, 0, HOLDER, received=7)
    file = await file_of(state, transfer.key, 0)
    assert (file.state, file.received, file.error) == (FileState.RESERVED, 7, None)
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.RESERVED, None, None, None)
    assert StagedFile(transfer.key, 0, 7, False) in await state.staged_files()
    assert await since(state, mark) == []


async def test_interrupt_keeps_the_bytes_and_says_why(state: StateStore) -> None:
    transfer = await claimed(state)
    await state.begin_chunk(transfer.key, 0, verifying=True)
    mark = await state.last_event_id()
    assert await state.interrupt(transfer.key, 0, HOLDER, received=7, reason=StopReason.TOO_SLOW)
    file = await file_of(state, transfer.key, 0)
    assert (file.state, file.received, file.error) == (FileState.RESERVED, 7, None)
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.RESERVED, None, None, None)
    assert StagedFile(transfer.key, 0, 7, False) in await state.staged_files()
    assert await since(state, mark) == [
        file_event(EventType.FILE_INTERRUPTED, transfer, 0, bytes=7, reason="too_slow"),
    ]


async def test_fail_releases_the_file_drops_its_bytes_and_keeps_the_message(state: StateStore) -> None:
    transfer = await claimed(state, received=6)
    mark = await state.last_event_id()
    assert await state.fail(
        transfer.key, 0, HOLDER, reason=StopReason.CHECKSUM_MISMATCH, message="Checksum mismatch on upload"
    )
    file = await file_of(state, transfer.key, 0)
    assert (file.state, file.received, file.error) == (FileState.RELEASED, 0, "Checksum mismatch on upload")
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.RELEASED, None, None, None)
    assert await since(state, mark) == [
        file_event(EventType.FILE_FAILED, transfer, 0, bytes=0, reason="checksum_mismatch"),
    ]


@pytest.mark.parametrize(("released", "after"), [(False, FileState.RESERVED), (True, FileState.RELEASED)])
async def test_restore_gives_an_unused_claim_back_silently(state: StateStore, released: bool, after: FileState) -> None:
    transfer = await claimed(state, received=3)
    mark = await state.last_event_id()
    assert await state.restore(transfer.key, 0, HOLDER, released=released)
    file = await file_of(state, transfer.key, 0)
    assert (file.state, file.received) == (after, 3)
    assert await state.status(transfer.key, 0) == ClaimStatus(after, None, None, None)
    assert await since(state, mark) == []


async def test_reap_ends_a_dead_holders_claim_keeping_the_reconciled_bytes(state: StateStore) -> None:
    transfer = await claimed(state, received=9)
    await state.begin_chunk(transfer.key, 0, verifying=True)
    mark = await state.last_event_id()
    assert await state.reap(transfer.key, 0, HOLDER, received=4, now=T0 + LEASE)
    file = await file_of(state, transfer.key, 0)
    assert (file.state, file.received) == (FileState.RESERVED, 4)
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.RESERVED, None, None, None)
    assert StagedFile(transfer.key, 0, 4, False) in await state.staged_files()
    assert await since(state, mark) == [
        file_event(EventType.FILE_INTERRUPTED, transfer, 0, bytes=4, reason="lease_expired")
    ]


async def test_reap_of_a_live_lease_by_its_known_dead_holder(state: StateStore) -> None:
    # A process known dead (its pid gone) is reaped before its lease runs out.
    transfer = await claimed(state)
    assert await state.reap(transfer.key, 0, HOLDER, received=0, now=T0 + 1)
    assert (await file_of(state, transfer.key, 0)).state is FileState.RESERVED


#: Each step that needs the lease, as (store, key, holder) -> whether it happened; on file 0.
LEASED_STEPS: dict[str, Callable[[StateStore, str, str], Awaitable[bool]]] = {
    "pause": lambda s, key, holder: s.pause(key, 0, holder, received=7),
    "interrupt": lambda s, key, holder: s.interrupt(key, 0, holder, received=7, reason=StopReason.CONNECTION_LOST),
    "fail": lambda s, key, holder: s.fail(key, 0, holder, reason=StopReason.SIZE_MISMATCH, message="no"),
    "restore": lambda s, key, holder: s.restore(key, 0, holder, released=False),
    "restore_released": lambda s, key, holder: s.restore(key, 0, holder, released=True),
    "reap": lambda s, key, holder: s.reap(key, 0, holder, received=7, now=T0 + LEASE),
    "begin_publish": lambda s, key, holder: s.begin_publish(key, 0, holder),
    "publish": lambda s, key, holder: s.publish(key, 0, holder, md5=MD5, sha256=SHA256),
}


async def snapshot(state: StateStore, key: str) -> tuple[Any, ...]:
    """Everything a step on ``key`` could change."""
    return (
        await state.get(key),
        [await state.status(key, num) for num in (0, 1)],
        await state.staged_files(),
        await state.last_event_id(),
        await state.reserved_bytes(),
    )


@pytest.mark.parametrize("step", sorted(LEASED_STEPS))
@pytest.mark.parametrize("situation", ["held by another", "paused", "failed", "published", "terminated", "cancelled"])
async def test_a_step_by_who_does_not_hold_the_lease_changes_nothing(
    state: StateStore, step: str, situation: str
) -> None:
    transfer = await claimed(state, received=3)
    caller = HOLDER
    if situation == "held by another":
        caller = OTHER
    elif situation == "paused":
        assert await state.pause(transfer.key, 0, HOLDER, received=3)
    elif situation == "failed":
        assert await state.fail(transfer.key, 0, HOLDER, reason=StopReason.TOO_LARGE, message="no")
    elif situation == "published":
        assert await state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    elif situation == "terminated":
        await state.terminate(transfer.key, 0)
    else:
        assert await state.cancel(transfer.key, now=T0) is not None
    before = await snapshot(state, transfer.key)
    assert await LEASED_STEPS[step](state, transfer.key, caller) is False
    assert await snapshot(state, transfer.key) == before


@pytest.mark.parametrize("step", sorted(LEASED_STEPS))
async def test_a_step_on_a_file_that_is_gone_is_refused(state: StateStore, step: str) -> None:
    transfer = await new_transfer(state)
    mark = await state.last_event_id()
    assert await LEASED_STEPS[step](state, "0" * 40, HOLDER) is False
    assert await state.last_event_id() == mark
    assert await state.get(transfer.key) == transfer


# -- begin_publish, publish --------------------------------------------------------------------


async def test_publish_records_the_digests_and_announces_the_file_complete(state: StateStore) -> None:
    transfer = await claimed(state, received=10)
    mark = await state.last_event_id()
    assert await state.begin_publish(transfer.key, 0, HOLDER)
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.UPLOADING, HOLDER, T0 + LEASE, None)
    assert await since(state, mark) == []
    assert await state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    file = await file_of(state, transfer.key, 0)
    assert (file.state, file.md5, file.sha256, file.received, file.error) == (
        FileState.PUBLISHED,
        MD5,
        SHA256,
        10,
        None,
    )
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.PUBLISHED, None, None, None)
    assert (await transfer_of(state, transfer.key)).state is TransferState.OPEN
    assert await since(state, mark) == [
        file_event(EventType.FILE_COMPLETED, transfer, 0, bytes=10, md5=MD5, sha256=SHA256),
    ]


async def test_publish_without_begin_publish(state: StateStore) -> None:
    transfer = await claimed(state)
    assert await state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    assert (await file_of(state, transfer.key, 0)).state is FileState.PUBLISHED


async def test_the_last_publish_finishes_the_transfer(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    await state.claim(transfer.key, 1, OTHER, lease=LEASE, now=T0)
    mark = await state.last_event_id()
    assert await state.publish(transfer.key, 1, OTHER, md5=MD5, sha256=SHA256)
    assert (await transfer_of(state, transfer.key)).state is TransferState.OPEN
    assert await state.begin_publish(transfer.key, 0, HOLDER)
    assert await state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    finished = await transfer_of(state, transfer.key)
    assert finished.state is TransferState.FINISHED
    assert [f.state for f in finished.files] == [FileState.PUBLISHED] * 2
    assert await since(state, mark) == [
        file_event(EventType.FILE_COMPLETED, transfer, 1, bytes=20, md5=MD5, sha256=SHA256),
        file_event(EventType.FILE_COMPLETED, transfer, 0, bytes=10, md5=MD5, sha256=SHA256),
        transfer_event(EventType.TRANSFER_FINISHED, transfer),
    ]
    assert await state.cancel(transfer.key, now=T0) is None
    assert await state.expire_due(T0 + 2 * LIFETIME, start_timeout=1) == []


async def test_cancel_after_begin_publish_lets_the_publish_finish(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    await state.claim(transfer.key, 1, OTHER, lease=LEASE, now=T0)
    assert await state.begin_publish(transfer.key, 0, HOLDER)
    before = await transfer_of(state, transfer.key)
    mark = await state.last_event_id()
    ended = await state.cancel(transfer.key, now=T0 + 1)
    assert ended == Ended(before, (before.files[1],))
    assert (await transfer_of(state, transfer.key)).state is TransferState.CANCELLED
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.UPLOADING, HOLDER, T0 + LEASE, None)
    assert await state.status(transfer.key, 1) == ClaimStatus(FileState.CANCELLED, None, None, None)
    with pytest.raises(AlreadyUploaded):
        await state.terminate(transfer.key, 0)
    assert await state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    after = await transfer_of(state, transfer.key)
    assert after.state is TransferState.CANCELLED
    assert [f.state for f in after.files] == [FileState.PUBLISHED, FileState.CANCELLED]
    assert await since(state, mark) == [
        transfer_event(EventType.TRANSFER_CANCELLED, transfer, reason="cancelled"),
        file_event(EventType.FILE_COMPLETED, transfer, 0, bytes=10, md5=MD5, sha256=SHA256),
    ]


async def test_expiry_after_begin_publish_lets_the_publish_finish(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LIFETIME * 2, now=T0)
    assert await state.begin_publish(transfer.key, 0, HOLDER)
    before = await transfer_of(state, transfer.key)
    mark = await state.last_event_id()
    assert await state.expire_due(T0 + LIFETIME) == [Ended(before, (before.files[1],))]
    assert await state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    after = await transfer_of(state, transfer.key)
    assert after.state is TransferState.EXPIRED
    assert [f.state for f in after.files] == [FileState.PUBLISHED, FileState.CANCELLED]
    assert await since(state, mark) == [
        transfer_event(EventType.TRANSFER_EXPIRED, transfer, reason="expired"),
        file_event(EventType.FILE_COMPLETED, transfer, 0, bytes=10, md5=MD5, sha256=SHA256),
    ]


async def test_cancel_before_begin_publish_ends_the_file(state: StateStore) -> None:
    transfer = await claimed(state, received=10)
    before = await transfer_of(state, transfer.key)
    ended = await state.cancel(transfer.key, now=T0 + 1)
    assert ended == Ended(before, before.files)
    mark = await state.last_event_id()
    assert await state.begin_publish(transfer.key, 0, HOLDER) is False
    assert await state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256) is False
    assert (await file_of(state, transfer.key, 0)).state is FileState.CANCELLED
    assert await state.last_event_id() == mark


# -- terminate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("situation", ["reserved", "uploading", "released"])
async def test_terminate_ends_one_file_for_good(state: StateStore, situation: str) -> None:
    transfer = await new_transfer(state)
    if situation != "reserved":
        await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
        await state.set_received(transfer.key, 0, 4)
    if situation == "released":
        assert await state.fail(transfer.key, 0, HOLDER, reason=StopReason.DISK_FULL, message="full")
    before = await file_of(state, transfer.key, 0)
    mark = await state.last_event_id()
    assert await state.terminate(transfer.key, 0) == before
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.CANCELLED, None, None, None)
    assert (await transfer_of(state, transfer.key)).state is TransferState.OPEN
    assert await since(state, mark) == [file_event(EventType.FILE_CANCELLED, transfer, 0, reason="terminated")]


async def test_terminating_the_last_open_file_cancels_the_transfer(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.terminate(transfer.key, 1)
    mark = await state.last_event_id()
    await state.terminate(transfer.key, 0)
    assert (await transfer_of(state, transfer.key)).state is TransferState.CANCELLED
    assert await since(state, mark) == [
        file_event(EventType.FILE_CANCELLED, transfer, 0, reason="terminated"),
        transfer_event(EventType.TRANSFER_CANCELLED, transfer, reason="terminated"),
    ]


async def test_terminating_the_last_open_file_cancels_a_transfer_with_published_files(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    mark = await state.last_event_id()
    await state.terminate(transfer.key, 1)
    assert (await transfer_of(state, transfer.key)).state is TransferState.CANCELLED
    assert await since(state, mark) == [
        file_event(EventType.FILE_CANCELLED, transfer, 1, reason="terminated"),
        transfer_event(EventType.TRANSFER_CANCELLED, transfer, reason="terminated"),
    ]


@pytest.mark.parametrize("terminated", ["before the claim", "during the upload", "during the publishing"])
async def test_publishing_the_last_open_file_after_a_termination_cancels_the_transfer(
    state: StateStore, terminated: str
) -> None:
    # A transfer with a terminated file can never finish. Whichever of its other files closes last
    # ends it as the termination would have, had it come last (see the test above).
    transfer = await new_transfer(state)
    mark = await state.last_event_id()
    if terminated == "before the claim":
        await state.terminate(transfer.key, 1)
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    if terminated == "during the upload":
        await state.terminate(transfer.key, 1)
    assert await state.begin_publish(transfer.key, 0, HOLDER)
    if terminated == "during the publishing":
        await state.terminate(transfer.key, 1)
    assert (await transfer_of(state, transfer.key)).state is TransferState.OPEN
    assert await state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    after = await transfer_of(state, transfer.key)
    assert after.state is TransferState.CANCELLED
    assert [f.state for f in after.files] == [FileState.PUBLISHED, FileState.CANCELLED]
    events = [e for e in await since(state, mark) if e.type is not EventType.FILE_STARTED]
    assert events == [
        file_event(EventType.FILE_CANCELLED, transfer, 1, reason="terminated"),
        file_event(EventType.FILE_COMPLETED, transfer, 0, bytes=10, md5=MD5, sha256=SHA256),
        transfer_event(EventType.TRANSFER_CANCELLED, transfer, reason="terminated"),
    ]
    assert await state.expire_due(T0 + 2 * LIFETIME) == []


async def test_a_failed_publishing_leaves_the_transfer_open_after_a_termination(state: StateStore) -> None:
    transfer = await claimed(state)
    assert await state.begin_publish(transfer.key, 0, HOLDER)
    await state.terminate(transfer.key, 1)
    assert await state.fail(transfer.key, 0, HOLDER, reason=StopReason.DISK_FULL, message="full")
    # The file may be sent again: the transfer ends when it closes.
    assert (await transfer_of(state, transfer.key)).state is TransferState.OPEN
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0 + 1)


@pytest.mark.parametrize("publishing", ["published", "being published"])
async def test_terminating_a_published_file_is_refused(state: StateStore, publishing: str) -> None:
    transfer = await claimed(state)
    if publishing == "published":
        assert await state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    else:
        assert await state.begin_publish(transfer.key, 0, HOLDER)
    before = await snapshot(state, transfer.key)
    with pytest.raises(AlreadyUploaded):
        await state.terminate(transfer.key, 0)
    assert await snapshot(state, transfer.key) == before


async def test_terminating_a_terminated_file_changes_nothing(state: StateStore) -> None:
    transfer = await new_transfer(state)
    await state.terminate(transfer.key, 0)
    before = await snapshot(state, transfer.key)
    assert (await state.terminate(transfer.key, 0)).state is FileState.CANCELLED
    assert await snapshot(state, transfer.key) == before


# -- cancel, expire_due, purge -----------------------------------------------------------------


async def test_cancel_ends_the_transfer_and_its_open_files(state: StateStore) -> None:
    transfer = await new_transfer(state, (A_BIN, B_BIN, C_BIN, ManifestFile("d.bin", 8)))
    await state.claim(transfer.key, 1, HOLDER, lease=LEASE, now=T0)
    await state.set_received(transfer.key, 1, 5)
    await state.claim(transfer.key, 2, HOLDER, lease=LEASE, now=T0)
    assert await state.fail(transfer.key, 2, HOLDER, reason=StopReason.TOO_LARGE, message="no")
    await state.claim(transfer.key, 3, HOLDER, lease=LEASE, now=T0)
    assert await state.publish(transfer.key, 3, HOLDER, md5=MD5, sha256=SHA256)
    before = await transfer_of(state, transfer.key)
    assert [f.state for f in before.files] == [_S.RESERVED, _S.UPLOADING, _S.RELEASED, _S.PUBLISHED]
    mark = await state.last_event_id()
    ended = await state.cancel(transfer.key, now=T0 + 7)
    assert ended == Ended(before, before.files[:3])
    after = await transfer_of(state, transfer.key)
    assert (after.state, after.updated_at) == (TransferState.CANCELLED, T0 + 7)
    assert [f.state for f in after.files] == [_S.CANCELLED] * 3 + [_S.PUBLISHED]
    assert await state.status(transfer.key, 1) == ClaimStatus(FileState.CANCELLED, None, None, None)
    assert await state.claims_of(HOLDER) == []
    assert await since(state, mark) == [transfer_event(EventType.TRANSFER_CANCELLED, transfer, reason="cancelled")]


async def test_cancel_of_a_transfer_that_is_not_open_is_none(state: StateStore) -> None:
    transfer = await new_transfer(state)
    assert await state.cancel(transfer.key, now=T0) is not None
    expired = await new_transfer(state)
    assert len(await state.expire_due(T0 + LIFETIME)) == 1
    mark = await state.last_event_id()
    assert await state.cancel(transfer.key, now=T0 + 1) is None
    assert await state.cancel("0" * 40, now=T0 + 1) is None
    assert await state.cancel(expired.key, now=T0 + LIFETIME) is None
    assert (await transfer_of(state, expired.key)).state is TransferState.EXPIRED
    assert (await transfer_of(state, transfer.key)).updated_at == T0
    assert await state.last_event_id() == mark


async def test_expire_due_ends_the_transfers_past_their_lifetime(state: StateStore) -> None:
    early = await new_transfer(state, now=T0)
    late = await new_transfer(state, now=T0 + 10)
    short = await new_transfer(state, now=T0, lifetime=5)
    await state.claim(early.key, 0, HOLDER, lease=LIFETIME * 2, now=T0)
    assert await state.expire_due(T0 + 4) == []
    mark = await state.last_event_id()
    assert await state.expire_due(T0 + 5) == [Ended(short, short.files)]
    before = await transfer_of(state, early.key)
    assert await state.expire_due(T0 + LIFETIME + 9) == [Ended(before, before.files)]
    assert await state.expire_due(T0 + LIFETIME + 9) == []
    assert await state.expire_due(T0 + LIFETIME + 10) == [Ended(late, late.files)]
    for transfer in (early, late, short):
        after = await transfer_of(state, transfer.key)
        assert after.state is TransferState.EXPIRED
        assert [f.state for f in after.files] == [FileState.CANCELLED] * 2
    assert await state.claims_of(HOLDER) == []
    assert await since(state, mark) == [
        transfer_event(EventType.TRANSFER_EXPIRED, t, reason="expired") for t in (short, early, late)
    ]


async def test_expire_due_ends_the_transfers_never_claimed_within_the_start_timeout(state: StateStore) -> None:
    idle = await new_transfer(state, now=T0)
    paused = await new_transfer(state, now=T0)
    younger = await new_transfer(state, now=T0 + 30)
    await state.claim(paused.key, 1, HOLDER, lease=LEASE, now=T0 + 1)
    assert await state.pause(paused.key, 1, HOLDER, received=0)
    assert await state.expire_due(T0 + 59, start_timeout=60) == []
    assert await state.expire_due(T0 + 60) == []  # no start timeout given
    mark = await state.last_event_id()
    assert await state.expire_due(T0 + 60, start_timeout=60) == [Ended(idle, idle.files)]
    assert await state.expire_due(T0 + 90, start_timeout=60) == [Ended(younger, younger.files)]
    # A claimed file started the transfer: only its lifetime ends it.
    assert await state.expire_due(T0 + LIFETIME - 1, start_timeout=60) == []
    assert (await transfer_of(state, paused.key)).state is TransferState.OPEN
    assert await since(state, mark) == [
        transfer_event(EventType.TRANSFER_EXPIRED, idle, reason="expired"),
        transfer_event(EventType.TRANSFER_EXPIRED, younger, reason="expired"),
    ]


async def test_expire_due_leaves_ended_transfers_alone(state: StateStore) -> None:
    finished = await new_transfer(state, (C_BIN,))
    await state.claim(finished.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await state.publish(finished.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    cancelled = await new_transfer(state)
    await state.cancel(cancelled.key, now=T0)
    mark = await state.last_event_id()
    assert await state.expire_due(T0 + 2 * LIFETIME, start_timeout=1) == []
    assert (await transfer_of(state, finished.key)).state is TransferState.FINISHED
    assert (await transfer_of(state, cancelled.key)).state is TransferState.CANCELLED
    assert await state.last_event_id() == mark


async def test_purge_forgets_only_ended_transfers_older_than_the_cutoff(state: StateStore) -> None:
    still_open = await new_transfer(state)
    cancelled = await new_transfer(state)
    await state.cancel(cancelled.key, now=T0 + 10)
    expired = await new_transfer(state, lifetime=100)
    assert len(await state.expire_due(T0 + 100)) == 1
    finished = await new_transfer(state, (C_BIN,))
    await state.claim(finished.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await state.publish(finished.key, 0, HOLDER, md5=MD5, sha256=SHA256)
    finished_at = (await transfer_of(state, finished.key)).updated_at  # publish stamps the wall clock
    logged = await state.events_after(0, limit=ALL)

    assert await state.purge(T0 + 10) == 0  # changed at the cutoff is not before it
    assert await state.purge(T0 + 11) == 1
    assert await state.get(cancelled.key) is None
    assert await state.get_file(cancelled.key, 0) is None
    assert await state.purge(T0 + 101) == 1
    assert await state.get(expired.key) is None
    assert await state.purge(finished_at) == 0
    assert await state.purge(finished_at + 1) == 1
    assert await state.get(finished.key) is None
    assert await state.purge(finished_at + 10 * LIFETIME) == 0
    assert await state.get(still_open.key) == still_open
    # Purging forgets records, not the log.
    assert await state.events_after(0, limit=ALL) == logged


# -- what the store holds ----------------------------------------------------------------------


async def test_reserved_bytes_are_what_open_transfers_may_still_write(state: StateStore) -> None:
    assert await state.reserved_bytes() == 0
    first = await new_transfer(state)
    second = await new_transfer(state, (C_BIN,))
    assert await state.reserved_bytes() == 35
    await state.claim(first.key, 0, HOLDER, lease=LEASE, now=T0)
    await state.set_received(first.key, 0, 4)
    assert await state.reserved_bytes() == 31
    assert await state.pause(first.key, 0, HOLDER, received=6)
    assert await state.reserved_bytes() == 29
    await state.claim(first.key, 1, HOLDER, lease=LEASE, now=T0)
    assert await state.publish(first.key, 1, HOLDER, md5=MD5, sha256=SHA256)
    assert await state.reserved_bytes() == 9
    await state.claim(first.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await state.fail(first.key, 0, HOLDER, reason=StopReason.TOO_LARGE, message="no")
    assert await state.reserved_bytes() == 15  # a released file may be sent again, whole
    await state.terminate(second.key, 0)
    assert await state.reserved_bytes() == 10
    assert len(await state.expire_due(T0 + LIFETIME)) == 1
    assert await state.reserved_bytes() == 0


async def test_staged_files_are_the_reserved_and_uploading_files_of_open_transfers(state: StateStore) -> None:
    assert await state.staged_files() == []
    transfer = await new_transfer(state, (A_BIN, B_BIN, C_BIN, ManifestFile("d.bin", 8), ManifestFile("e.bin", 8)))
    key = transfer.key
    await state.set_received(key, 0, 3)
    await state.claim(key, 1, HOLDER, lease=LEASE, now=T0)
    await state.set_received(key, 1, 7)
    await state.begin_chunk(key, 1, verifying=True)
    await state.claim(key, 2, HOLDER, lease=LEASE, now=T0)
    assert await state.fail(key, 2, HOLDER, reason=StopReason.TOO_LARGE, message="no")
    await state.claim(key, 3, HOLDER, lease=LEASE, now=T0)
    assert await state.publish(key, 3, HOLDER, md5=MD5, sha256=SHA256)
    await state.terminate(key, 4)
    ended = await new_transfer(state)
    await state.cancel(ended.key, now=T0)
    assert sorted(await state.staged_files(), key=lambda f: f.num) == [
        StagedFile(key, 0, 3, False, None),
        StagedFile(key, 1, 7, True, HOLDER),
    ]


async def test_begin_chunk_and_set_received_are_what_a_restart_reconciles(state: StateStore) -> None:
    transfer = await claimed(state)
    mark = await state.last_event_id()
    await state.begin_chunk(transfer.key, 0, verifying=True)
    assert StagedFile(transfer.key, 0, 0, True, HOLDER) in await state.staged_files()
    await state.begin_chunk(transfer.key, 0, verifying=False)
    assert StagedFile(transfer.key, 0, 0, False, HOLDER) in await state.staged_files()
    await state.begin_chunk(transfer.key, 0, verifying=True)
    await state.set_received(transfer.key, 0, 8)
    assert StagedFile(transfer.key, 0, 8, False, HOLDER) in await state.staged_files()
    assert (await file_of(state, transfer.key, 0)).received == 8
    # Neither is a step: the lease stays, and nothing is announced.
    assert await state.status(transfer.key, 0) == ClaimStatus(FileState.UPLOADING, HOLDER, T0 + LEASE, None)
    assert await state.last_event_id() == mark


async def test_claims_of_are_the_files_a_holder_leases(state: StateStore) -> None:
    first = await new_transfer(state)
    second = await new_transfer(state)
    await state.claim(first.key, 0, HOLDER, lease=LEASE, now=T0)
    await state.claim(first.key, 1, OTHER, lease=LEASE, now=T0)
    await state.claim(second.key, 1, HOLDER, lease=LEASE, now=T0)
    await state.set_received(second.key, 1, 2)
    await state.claim(second.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await state.pause(second.key, 0, HOLDER, received=1)
    assert sorted(await state.claims_of(HOLDER), key=lambda f: f.key != first.key) == [
        StagedFile(first.key, 0, 0, False, HOLDER),
        StagedFile(second.key, 1, 2, False, HOLDER),
    ]
    assert await state.claims_of(OTHER) == [StagedFile(first.key, 1, 0, False, OTHER)]
    assert await state.claims_of("nobody") == []


async def test_expired_leases_are_the_uploading_files_whose_lease_ran_out(state: StateStore) -> None:
    transfer = await new_transfer(state, (A_BIN, B_BIN, C_BIN))
    await state.claim(transfer.key, 0, HOLDER, lease=10, now=T0)
    await state.claim(transfer.key, 1, OTHER, lease=20, now=T0)
    await state.claim(transfer.key, 2, HOLDER, lease=5, now=T0)
    assert await state.pause(transfer.key, 2, HOLDER, received=0)
    assert await state.expired_leases(T0 + 9.999) == []
    assert await state.expired_leases(T0 + 10) == [StagedFile(transfer.key, 0, 0, False, HOLDER)]
    await state.renew(transfer.key, 0, HOLDER, lease=30, now=T0 + 10)
    assert await state.expired_leases(T0 + 20) == [StagedFile(transfer.key, 1, 0, False, OTHER)]
    assert len(await state.expired_leases(T0 + 40)) == 2


async def test_a_lease_runs_out_at_its_end_for_claim_and_expired_leases_alike(state: StateStore) -> None:
    transfer = await claimed(state)
    assert await state.expired_leases(T0 + LEASE - 0.001) == []
    with pytest.raises(UploadInProgress):
        await state.claim(transfer.key, 0, OTHER, lease=LEASE, now=T0 + LEASE - 0.001)
    assert len(await state.expired_leases(T0 + LEASE)) == 1
    with pytest.raises(LeaseExpired):
        await state.claim(transfer.key, 0, OTHER, lease=LEASE, now=T0 + LEASE)


async def test_recover_ends_every_lease_silently_keeping_the_staged_bytes(state: StateStore) -> None:
    first = await new_transfer(state)
    second = await new_transfer(state)
    await state.claim(first.key, 0, HOLDER, lease=LEASE, now=T0)
    await state.set_received(first.key, 0, 4)
    await state.begin_chunk(first.key, 0, verifying=True)
    await state.claim(first.key, 1, OTHER, lease=LEASE, now=T0)
    await state.claim(second.key, 0, OTHER, lease=LEASE, now=T0)
    await state.request_stop(second.key, 0, StopReason.SUPERSEDED)
    await state.claim(second.key, 1, OTHER, lease=LEASE, now=T0)
    assert await state.publish(second.key, 1, OTHER, md5=MD5, sha256=SHA256)
    mark = await state.last_event_id()
    assert await state.recover() == 3
    for key, num in [(first.key, 0), (first.key, 1), (second.key, 0)]:
        assert await state.status(key, num) == ClaimStatus(FileState.RESERVED, None, None, None)
    assert (await file_of(state, second.key, 1)).state is FileState.PUBLISHED
    # The chunk that was being verified is still marked so: the restart cuts its bytes off.
    assert StagedFile(first.key, 0, 4, True, None) in await state.staged_files()
    assert await state.claims_of(HOLDER) == await state.claims_of(OTHER) == []
    assert await state.recover() == 0
    assert await state.last_event_id() == mark
    # No attempt was announced as ended, so the next claim continues it.
    await state.claim(first.key, 0, HOLDER, lease=LEASE, now=T0 + 1)
    assert await state.last_event_id() == mark


async def test_recover_ends_a_publishing_that_never_finished(state: StateStore) -> None:
    # The process that began publishing died with it: nobody is publishing the file any more, and
    # it ends with its transfer like any other open file.
    cancelled = await claimed(state)
    assert await state.begin_publish(cancelled.key, 0, HOLDER)
    terminated = await claimed(state)
    assert await state.begin_publish(terminated.key, 0, HOLDER)
    assert await state.recover() == 2
    before = await transfer_of(state, cancelled.key)
    assert await state.cancel(cancelled.key, now=T0) == Ended(before, before.files)
    assert [f.state for f in (await transfer_of(state, cancelled.key)).files] == [FileState.CANCELLED] * 2
    assert (await state.terminate(terminated.key, 0)).state is FileState.RESERVED
    assert (await file_of(state, terminated.key, 0)).state is FileState.CANCELLED


# -- the event log -----------------------------------------------------------------------------

PROGRESS = NewEvent(EventType.FILE_PROGRESS, PREFIX, "k" * 40, 0, "a.bin", "/O=Lab/CN=Ada", "x", bytes=3, size=10)
DELETED = NewEvent(EventType.FILE_DELETED, PREFIX, name="a.bin", owner="/O=Lab/CN=Ada", owner_id="x", size=10)


async def test_append_logs_events_that_are_no_transition(state: StateStore) -> None:
    assert await state.last_event_id() == 0
    assert await state.events_after(0, limit=10) == []
    appended = await state.append([PROGRESS, DELETED], now=T0 + 3)
    assert [bare(e) for e in appended] == [PROGRESS, DELETED]
    assert [e.time for e in appended] == [T0 + 3, T0 + 3]
    assert 0 < appended[0].id < appended[1].id
    assert await state.events_after(0, limit=10) == appended
    assert await state.last_event_id() == appended[1].id
    assert await state.append([], now=T0) == []
    assert await state.last_event_id() == appended[1].id


@pytest.mark.parametrize("count", [1, 2, 16, 17, 300])
async def test_append_of_many_events_numbers_them_in_order(state: StateStore, count: int) -> None:
    # However many one append holds, each is logged whole, numbered in order with no gap.
    events = [dataclasses.replace(PROGRESS, bytes=i, reason=None if i % 2 else "r") for i in range(count)]
    appended = await state.append(events, now=T0)
    assert [bare(e) for e in appended] == events
    assert [e.id for e in appended] == list(range(appended[0].id, appended[0].id + count))
    assert await state.events_after(0, limit=ALL) == appended
    assert await state.last_event_id() == appended[-1].id


async def test_events_after_pages_oldest_first(state: StateStore) -> None:
    appended = []
    for i in range(5):
        appended += await state.append([dataclasses.replace(PROGRESS, bytes=i)], now=T0 + i)
    assert await state.events_after(0, limit=2) == appended[:2]
    assert await state.events_after(appended[1].id, limit=2) == appended[2:4]
    assert await state.events_after(appended[3].id, limit=2) == appended[4:]
    assert await state.events_after(appended[4].id, limit=2) == []
    assert await state.events_after(appended[0].id, limit=ALL) == appended[1:]


async def test_event_ids_grow_in_commit_order(state: StateStore) -> None:
    transfer = await new_transfer(state)
    logged = [*await state.events_after(0, limit=ALL)]
    await state.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    logged += await state.events_after(logged[-1].id, limit=ALL)
    logged += await state.append([PROGRESS], now=T0)
    assert await state.interrupt(transfer.key, 0, HOLDER, received=3, reason=StopReason.CONNECTION_LOST)
    logged += await state.events_after(logged[-1].id, limit=ALL)
    logged += await state.append([DELETED], now=T0 - 100)  # an earlier time does not make an earlier id
    await state.terminate(transfer.key, 1)
    await state.terminate(transfer.key, 0)
    logged += await state.events_after(logged[-1].id, limit=ALL)
    assert [e.type for e in logged] == [
        EventType.TRANSFER_CREATED,
        EventType.FILE_STARTED,
        EventType.FILE_PROGRESS,
        EventType.FILE_INTERRUPTED,
        EventType.FILE_DELETED,
        EventType.FILE_CANCELLED,
        EventType.FILE_CANCELLED,
        EventType.TRANSFER_CANCELLED,
    ]
    ids = [e.id for e in logged]
    assert ids == sorted(set(ids))
    assert await state.events_after(0, limit=ALL) == logged


async def test_prune_events_forgets_older_events_and_never_reuses_ids(state: StateStore) -> None:
    old = await state.append([PROGRESS, PROGRESS], now=T0)
    kept = await state.append([DELETED], now=T0 + 10)
    assert await state.prune_events(T0) == 0
    assert await state.prune_events(T0 + 10) == 2
    assert await state.events_after(0, limit=ALL) == kept
    assert await state.last_event_id() == kept[0].id
    (newer,) = await state.append([PROGRESS], now=T0 + 20)
    assert newer.id > kept[0].id > old[1].id
    assert await state.events_after(0, limit=ALL) == [*kept, newer]
    assert await state.prune_events(T0 + 30) == 2
    assert await state.events_after(0, limit=ALL) == []
    # Pruning does not lower the log's position: what comes next comes after it.
    assert await state.last_event_id() == newer.id
    (next_one,) = await state.append([DELETED], now=T0 + 40)
    assert next_one.id > newer.id
    assert await state.events_after(newer.id, limit=ALL) == [next_one]
    assert await state.last_event_id() == next_one.id


# -- named leases and cursors ------------------------------------------------------------------


async def test_acquire_a_free_lease_and_not_a_held_one(state: StateStore) -> None:
    assert await state.acquire("hook:a", HOLDER, lease=10, now=T0)
    assert not await state.acquire("hook:a", OTHER, lease=10, now=T0 + 9.999)
    assert await state.acquire("hook:b", OTHER, lease=10, now=T0)  # another name is another lease


async def test_acquire_a_lease_that_ran_out(state: StateStore) -> None:
    assert await state.acquire("hook:a", HOLDER, lease=10, now=T0)
    assert await state.acquire("hook:a", OTHER, lease=10, now=T0 + 10)
    assert not await state.acquire("hook:a", HOLDER, lease=10, now=T0 + 11)


async def test_acquire_renews_the_holders_own_lease(state: StateStore) -> None:
    assert await state.acquire("hook:a", HOLDER, lease=10, now=T0)
    assert await state.acquire("hook:a", HOLDER, lease=10, now=T0 + 8)
    assert not await state.acquire("hook:a", OTHER, lease=10, now=T0 + 17)
    assert await state.acquire("hook:a", OTHER, lease=10, now=T0 + 18)


async def test_release_frees_a_lease_only_by_its_holder(state: StateStore) -> None:
    assert await state.acquire("hook:a", HOLDER, lease=10, now=T0)
    await state.release("hook:a", OTHER)
    assert not await state.acquire("hook:a", OTHER, lease=10, now=T0 + 1)
    await state.release("hook:a", HOLDER)
    assert await state.acquire("hook:a", OTHER, lease=10, now=T0 + 1)
    await state.release("hook:never", HOLDER)


async def test_cursors(state: StateStore) -> None:
    assert await state.cursor("hook:a") is None
    await state.set_cursor("hook:a", 5)
    assert await state.cursor("hook:a") == 5
    await state.set_cursor("hook:a", 3)
    assert await state.cursor("hook:a") == 3
    await state.set_cursor("hook:b", 0)
    assert (await state.cursor("hook:a"), await state.cursor("hook:b"), await state.cursor("hook:c")) == (3, 0, None)


# -- several processes, and concurrency --------------------------------------------------------


async def test_two_store_objects_on_one_storage_see_each_others_changes(open_store: Opener) -> None:
    one, two = open_store(), open_store()
    transfer = await new_transfer(one)
    assert await two.get(transfer.key) == transfer
    await two.claim(transfer.key, 0, OTHER, lease=LEASE, now=T0)
    assert await one.status(transfer.key, 0) == ClaimStatus(FileState.UPLOADING, OTHER, T0 + LEASE, None)
    with pytest.raises(UploadInProgress):
        await one.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0)
    assert await one.request_stop(transfer.key, 0, StopReason.SUPERSEDED) == OTHER
    assert (await two.status(transfer.key, 0)) == ClaimStatus(FileState.UPLOADING, OTHER, T0 + LEASE, "superseded")
    ended = await one.cancel(transfer.key, now=T0 + 1)
    assert ended is not None
    # The holder learns it lost the file, and its steps no longer apply.
    assert await two.renew(transfer.key, 0, OTHER, lease=LEASE, now=T0 + 2) == ClaimStatus(
        FileState.CANCELLED, None, None, None
    )
    assert await two.pause(transfer.key, 0, OTHER, received=3) is False
    assert await two.events_after(0, limit=ALL) == await one.events_after(0, limit=ALL)
    assert [e.type for e in await two.events_after(0, limit=ALL)] == [
        EventType.TRANSFER_CREATED,
        EventType.FILE_STARTED,
        EventType.TRANSFER_CANCELLED,
    ]
    # Leases and cursors are shared too.
    assert await one.acquire("hook:a", HOLDER, lease=10, now=T0)
    assert not await two.acquire("hook:a", OTHER, lease=10, now=T0)
    await two.set_cursor("hook:a", 7)
    assert await one.cursor("hook:a") == 7


async def test_two_store_objects_claiming_one_file_at_once_one_wins(open_store: Opener) -> None:
    one, two = open_store(), open_store()
    transfer = await new_transfer(one)
    await two.get(transfer.key)
    for num in (0, 1):
        won, lost = await outcomes(
            [
                one.claim(transfer.key, num, HOLDER, lease=LEASE, now=T0),
                two.claim(transfer.key, num, OTHER, lease=LEASE, now=T0),
            ]
        )
        assert len(won) == 1 and isinstance(won[0], Claim) and won[0].number == 1
        assert len(lost) == 1 and isinstance(lost[0], UploadInProgress)
    started = [e for e in await one.events_after(0, limit=ALL) if e.type is EventType.FILE_STARTED]
    assert sorted(e.num for e in started if e.num is not None) == [0, 1]


async def test_two_store_objects_ending_one_transfer_at_once_one_wins(open_store: Opener) -> None:
    one, two = open_store(), open_store()
    transfer = await new_transfer(one)
    await two.get(transfer.key)
    mark = await one.last_event_id()
    cancelled, expired = await asyncio.gather(one.cancel(transfer.key, now=T0 + 1), two.expire_due(T0 + LIFETIME))
    assert (cancelled is not None) + len(expired) == 1
    ending = TransferState.CANCELLED if cancelled is not None else TransferState.EXPIRED
    assert (await two.get(transfer.key) or transfer).state is ending
    (event,) = await logged_since(one, mark)
    assert event.type is (
        EventType.TRANSFER_CANCELLED if ending is TransferState.CANCELLED else EventType.TRANSFER_EXPIRED
    )


async def test_two_store_objects_creating_under_one_quota_at_once(open_store: Opener) -> None:
    one, two = open_store(), open_store()
    await one.holdings("c")
    await two.holdings("c")
    quota = ClientQuota(transfers=1, names=10, bytes=1000)
    created, refused = await outcomes(
        [new_transfer(one, client="c", quota=quota), new_transfer(two, client="c", quota=quota)]
    )
    assert len(created) == 1 and len(refused) == 1 and isinstance(refused[0], QuotaExceeded)
    assert await two.holdings("c") == Holdings(1, 2, 30)
    assert len(await one.events_after(0, limit=ALL)) == 1


async def test_event_ids_grow_in_commit_order_across_store_objects(open_store: Opener) -> None:
    one, two = open_store(), open_store()
    logged: list[Event] = []
    for i in range(6):
        store = (one, two)[i % 2]
        logged += await store.append([dataclasses.replace(PROGRESS, bytes=i)], now=T0)
    assert [e.id for e in logged] == sorted({e.id for e in logged})
    assert await one.events_after(0, limit=ALL) == await two.events_after(0, limit=ALL) == logged


async def test_a_reader_tailing_the_log_while_others_write_misses_no_event(open_store: Opener) -> None:
    # Ids grow in commit order, so a reader's position is never passed by an event committed later
    # (ids handed out at insertion, rather than at commit, would let one slip in behind it).
    writers, reader = [open_store() for _ in range(3)], open_store()
    transfer = await new_transfer(writers[0])
    for store in (*writers, reader):
        await store.last_event_id()

    async def write(store: StateStore, n: int) -> None:
        for i in range(n):
            await store.append([dataclasses.replace(PROGRESS, key=transfer.key, bytes=i)], now=T0)

    async def steps(store: StateStore) -> None:
        for i in range(10):
            await store.claim(transfer.key, 0, HOLDER, lease=LEASE, now=T0 + i)
            await store.interrupt(transfer.key, 0, HOLDER, received=i, reason=StopReason.CONNECTION_LOST)

    writing = asyncio.gather(write(writers[0], 40), write(writers[1], 40), steps(writers[2]))
    seen: list[Event] = []
    while True:
        finished = writing.done()
        batch = await reader.events_after(seen[-1].id if seen else 0, limit=7)
        seen += batch
        if not batch and finished:
            break
    await writing
    assert seen == await reader.events_after(0, limit=ALL)
    assert len(seen) == 1 + 40 + 40 + 2 * 10


async def test_many_claims_of_one_file_at_once_one_wins(state: StateStore) -> None:
    transfer = await new_transfer(state)
    mark = await state.last_event_id()
    won, lost = await outcomes([state.claim(transfer.key, 0, f"worker-{i}", lease=LEASE, now=T0) for i in range(20)])
    assert len(won) == 1
    assert len(lost) == 19 and all(isinstance(e, UploadInProgress) for e in lost)
    status = await state.status(transfer.key, 0)
    assert status is not None and status.holder is not None
    assert await since(state, mark) == [file_event(EventType.FILE_STARTED, transfer, 0, bytes=0)]


async def test_many_steps_ending_one_lease_at_once_one_applies(state: StateStore) -> None:
    transfer = await claimed(state)
    mark = await state.last_event_id()
    done, failed = await outcomes(
        [
            state.pause(transfer.key, 0, HOLDER, received=1),
            state.interrupt(transfer.key, 0, HOLDER, received=2, reason=StopReason.CONNECTION_LOST),
            state.fail(transfer.key, 0, HOLDER, reason=StopReason.TOO_LARGE, message="no"),
            state.reap(transfer.key, 0, HOLDER, received=3, now=T0 + LEASE),
            state.publish(transfer.key, 0, HOLDER, md5=MD5, sha256=SHA256),
        ]
    )
    assert failed == []
    assert sorted(done) == [False, False, False, False, True]
    assert len(await since(state, mark)) <= 1


async def test_many_creations_under_one_quota_at_once(state: StateStore) -> None:
    quota = ClientQuota(transfers=3, names=100, bytes=10_000)
    created, refused = await outcomes([new_transfer(state, client="c", quota=quota) for _ in range(10)])
    assert len(created) == 3
    assert len(refused) == 7 and all(isinstance(e, QuotaExceeded) for e in refused)
    assert await state.holdings("c") == Holdings(3, 6, 90)


# -- choosing a backend ------------------------------------------------------------------------


async def test_open_state_opens_the_sqlite_file_its_url_names(tmp_path: Path) -> None:
    path = (tmp_path / "state.sqlite3").absolute()
    direct = SqliteState(path)
    by_url = open_state(f"sqlite:///{path}")
    try:
        transfer = await new_transfer(direct)
        assert await by_url.get(transfer.key) == transfer
    finally:
        await direct.close()
        await by_url.close()


async def test_open_state_opens_the_postgres_database_its_url_names() -> None:
    with shared_cluster().database() as url:
        direct, by_url = PostgresState(url), open_state(url)
        try:
            assert isinstance(by_url, PostgresState)
            transfer = await new_transfer(direct)
            assert await by_url.get(transfer.key) == transfer
        finally:
            await direct.close()
            await by_url.close()


def test_open_state_refuses_a_url_of_no_backend() -> None:
    with pytest.raises(ValueError, match="no state backend"):
        open_state("mysql://localhost/datastore")
