"""The contract suite of the catalogue: every method of ``Catalogue``
(``datastore/state/catalogue.py``), called directly (no HTTP) and held to the contract its docstring
writes, on every backend; and the migration of the SQLite catalogue files earlier versions wrote.

A backend is whatever passes this module. Each test that takes the ``catalogue`` fixture runs once
per entry of :data:`BACKENDS`, on fresh storage; a test that plays two worker processes takes
``open_catalogues`` and opens a second catalogue object on the same storage.

**Adding a backend** (PostgreSQL, say): write an async context manager that takes the test's
temporary directory, prepares empty storage of its own for one prefix's catalogue, yields an
*opener* -- a callable that opens a new catalogue object on that storage each time it is called, as
another worker process would -- and removes the storage after the test. Add it to :data:`BACKENDS`
under its name; every test then runs against it too (``-k postgres`` runs it alone). The suite
closes every catalogue it opened.

Nothing sleeps: the catalogue reads no clock. Concurrency is real (the contenders run at once, in
one object or in two), and the tests assert only what any interleaving must give: one winner. A
policy may be asked more than once about a name (a backend may retry a transaction), so the tests
assert what it was asked, not how often.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from datastore.security.identity import Identity, IdentityKind
from datastore.state import open_catalogue
from datastore.state.catalogue import Catalogue, Conflict, NameTaken, Reservation, StoredFile
from datastore.state.postgres_catalogue import PostgresCatalogue
from datastore.state.sqlite_catalogue import SqliteCatalogue

from .postgres_server import shared_cluster

# -- backends ----------------------------------------------------------------------------------

#: Opens one more catalogue object on a backend's storage (as one more worker process would).
Opener = Callable[[], Catalogue]
#: Given the test's temporary directory: fresh storage for one prefix's catalogue, as an opener.
Backend = Callable[[Path], AbstractAsyncContextManager[Opener]]


@asynccontextmanager
async def sqlite_backend(directory: Path) -> AsyncIterator[Opener]:
    """One SQLite file in the test's directory; each catalogue object opens its own connection to it."""
    path = directory / "catalogue" / "files.sqlite3"
    yield lambda: SqliteCatalogue(path)


@asynccontextmanager
async def postgres_backend(directory: Path) -> AsyncIterator[Opener]:
    """A database of its own in the session's PostgreSQL cluster; each catalogue object opens its own pool."""
    with shared_cluster().database() as url:
        yield lambda: PostgresCatalogue(url, "files")


#: Every backend the suite certifies, by name (the test ids' parameter).
BACKENDS: dict[str, Backend] = {
    "sqlite": sqlite_backend,
    "postgres": postgres_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
async def open_catalogues(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens catalogue objects on one fresh storage of the backend under test; closes them all after."""
    opened: list[Catalogue] = []
    async with BACKENDS[request.param](tmp_path) as opener:

        def open_one() -> Catalogue:
            catalogue = opener()
            opened.append(catalogue)
            return catalogue

        try:
            yield open_one
        finally:
            for catalogue in opened:
                await catalogue.close()


@pytest.fixture
def catalogue(open_catalogues: Opener) -> Catalogue:
    """A fresh, empty catalogue of the backend under test."""
    return open_catalogues()


# -- what the tests store ----------------------------------------------------------------------

#: An arbitrary instant: every ``now`` and ``uploaded_at`` is counted from it.
T0 = 1_000_000.0
ADA = Identity.asserted("/O=Lab/CN=Ada")
BOB = Identity(IdentityKind.CERTIFICATE, "CN=Bob", "CN=Lab CA", dn="/O=Lab/CN=Bob")
A, B, C = Reservation("a.txt", 10), Reservation("b.txt", 20), Reservation("c.txt", 30)
#: Pairs of names that fold alike (case, a letter whose case folding is two letters, decomposed
#: and composed accents).
FOLDING_ALIKE = [
    pytest.param("A.txt", "a.txt", id="case"),
    pytest.param("STRASSE.txt", "straße.txt", id="sharp-s"),
    pytest.param("ΣΊΣΥΦΟΣ.txt", "σίσυφος.txt", id="greek"),
    pytest.param("cafe\u0301.txt", "caf\u00e9.txt", id="accents"),
]


def record(name: str, content: bytes = b"published", *, owner: Identity = ADA, at: float = T0) -> StoredFile:
    """The record of ``content`` published under ``name`` by ``owner`` at ``at``."""
    return StoredFile(
        name=name,
        size=len(content),
        md5=hashlib.md5(content).hexdigest(),
        sha256=hashlib.sha256(content).hexdigest(),
        owner=owner.dn,
        uploaded_at=at,
        owner_authenticated=owner.authenticated,
        owner_id=owner.principal,
        tls=owner.kind is IdentityKind.CERTIFICATE,
    )


def anything(name: str, published: StoredFile | None) -> bool:
    """A policy that lets every name be taken (only pending reservations conflict)."""
    return True


def only_new(name: str, published: StoredFile | None) -> bool:
    """A policy that replaces no published file (a store without overwrite)."""
    return published is None


def same_name(name: str, published: StoredFile | None) -> bool:
    """A policy that replaces a published file of exactly the same name (a store with overwrite)."""
    return published is None or published.name == name


class Asked:
    """A policy that records what it is asked, and answers as ``answer`` does."""

    def __init__(self, answer: Callable[[str, StoredFile | None], bool] = anything) -> None:
        self.answer = answer
        self.asked: set[tuple[str, StoredFile | None]] = set()

    def __call__(self, name: str, published: StoredFile | None) -> bool:
        self.asked.add((name, published))
        return self.answer(name, published)


async def reserve(
    catalogue: Catalogue, *files: Reservation, may_take: Callable[[str, StoredFile | None], bool] = anything
) -> list[Conflict]:
    return await catalogue.reserve(files, may_take=may_take, now=T0)


async def reserved(catalogue: Catalogue, names: Sequence[str]) -> set[str]:
    """Which of ``names`` are reserved."""
    return {name for name in names if await catalogue.is_reserved(name)}


# -- a fresh catalogue -------------------------------------------------------------------------


async def test_a_fresh_catalogue_holds_nothing(catalogue: Catalogue) -> None:
    assert await catalogue.listing() == []
    assert await catalogue.describe("a.txt") is None
    assert not await catalogue.is_reserved("a.txt")
    assert await catalogue.check([A, B], may_take=only_new) == []


# -- reserve, check, is_reserved, release ------------------------------------------------------


async def test_reserve_takes_every_name_and_publishes_none(catalogue: Catalogue) -> None:
    assert await reserve(catalogue, A, B) == []
    assert await reserved(catalogue, ["a.txt", "b.txt", "c.txt"]) == {"a.txt", "b.txt"}
    # A reserved name has no record yet.
    assert await catalogue.describe("a.txt") is None
    assert await catalogue.listing() == []


async def test_reserve_of_nothing_reserves_nothing(catalogue: Catalogue) -> None:
    assert await reserve(catalogue) == []
    assert await catalogue.check([], may_take=only_new) == []


async def test_a_reserved_name_is_not_reserved_again_whatever_the_policy_says(catalogue: Catalogue) -> None:
    await reserve(catalogue, A)
    policy = Asked()

    assert await reserve(catalogue, A, may_take=policy) == [Conflict("a.txt", pending="a.txt")]
    assert await catalogue.check([A], may_take=policy) == [Conflict("a.txt", pending="a.txt")]
    # A pending name conflicts before any policy is asked about it.
    assert policy.asked == set()


@pytest.mark.parametrize(("first", "second"), FOLDING_ALIKE)
async def test_names_that_fold_alike_are_one_name_to_reserve(catalogue: Catalogue, first: str, second: str) -> None:
    assert await reserve(catalogue, Reservation(first, 1)) == []

    assert await reserve(catalogue, Reservation(second, 1)) == [Conflict(second, pending=first)]
    # Everything else addresses a name exactly: only the name asked for is reserved.
    assert await reserved(catalogue, [first, second]) == {first}


@pytest.mark.parametrize(("first", "second"), [*FOLDING_ALIKE, pytest.param("a.txt", "a.txt", id="same")])
async def test_names_of_one_request_that_fold_alike_conflict_with_the_first(
    catalogue: Catalogue, first: str, second: str
) -> None:
    conflicts = await reserve(catalogue, Reservation(first, 1), B, Reservation(second, 2))

    assert conflicts == [Conflict(second, pending=first)]
    assert await reserved(catalogue, [first, second, "b.txt"]) == set()


async def test_reservation_is_all_or_nothing(catalogue: Catalogue) -> None:
    await reserve(catalogue, B)
    refuse_c = Asked(lambda name, published: name != "c.txt")

    conflicts = await reserve(catalogue, A, B, C, Reservation("d.txt", 4), may_take=refuse_c)

    # Every conflict is reported, in the order of the request; nothing of the request is reserved.
    assert conflicts == [Conflict("b.txt", pending="b.txt"), Conflict("c.txt")]
    assert await reserved(catalogue, ["a.txt", "b.txt", "c.txt", "d.txt"]) == {"b.txt"}
    # The names without a published record were judged with None.
    assert {("a.txt", None), ("c.txt", None), ("d.txt", None)} <= refuse_c.asked


async def test_check_finds_what_reserve_would_and_reserves_nothing(catalogue: Catalogue) -> None:
    await catalogue.publish(record("published.txt"))
    await reserve(catalogue, B)
    files = [A, B, Reservation("published.txt", 1), Reservation("PUBLISHED.TXT", 1)]

    checked = await catalogue.check(files, may_take=only_new)

    assert checked == [
        Conflict("b.txt", pending="b.txt"),
        Conflict("published.txt", published=record("published.txt")),
        Conflict("PUBLISHED.TXT", pending="published.txt"),
    ]
    assert await reserved(catalogue, ["a.txt", "published.txt"]) == set()
    assert await reserve(catalogue, *files, may_take=only_new) == checked
    assert await catalogue.check([A], may_take=only_new) == []


async def test_an_exception_from_the_policy_propagates_and_reserves_nothing(catalogue: Catalogue) -> None:
    class Refused(Exception):
        pass

    def failing(name: str, published: StoredFile | None) -> bool:
        if name == "b.txt":
            raise Refused(name)
        return True

    with pytest.raises(Refused):
        await reserve(catalogue, A, B, C, may_take=failing)

    assert await reserved(catalogue, ["a.txt", "b.txt", "c.txt"]) == set()
    assert await reserve(catalogue, A, B, C) == []


async def test_release_frees_exactly_the_name(catalogue: Catalogue) -> None:
    await reserve(catalogue, Reservation("A.txt", 1), B)

    await catalogue.release("a.txt")  # another name (it only folds alike): nothing happens
    await catalogue.release("never-reserved.txt")
    assert await reserved(catalogue, ["A.txt", "b.txt"]) == {"A.txt", "b.txt"}

    await catalogue.release("A.txt")
    await catalogue.release("A.txt")  # released twice: nothing happens
    assert await reserved(catalogue, ["A.txt", "b.txt"]) == {"b.txt"}
    assert await reserve(catalogue, A) == []


async def test_reserved_before_names_the_reservations_older_than_a_time(catalogue: Catalogue) -> None:
    assert await catalogue.reserve([A], may_take=lambda *_: True, now=10.0) == []
    assert await catalogue.reserve([B], may_take=lambda *_: True, now=20.0) == []
    await catalogue.publish(record("c.txt"))
    assert await catalogue.reserved_before(10.0) == []
    assert await catalogue.reserved_before(15.0) == ["a.txt"]
    assert await catalogue.reserved_before(25.0) == ["a.txt", "b.txt"]
    await catalogue.release("a.txt")
    assert await catalogue.reserved_before(25.0) == ["b.txt"]


async def test_release_leaves_the_published_record(catalogue: Catalogue) -> None:
    await catalogue.publish(record("a.txt"))
    await reserve(catalogue, A, may_take=same_name)

    await catalogue.release("a.txt")

    assert not await catalogue.is_reserved("a.txt")
    assert await catalogue.describe("a.txt") == record("a.txt")


# -- reserving a published name ----------------------------------------------------------------


async def test_a_published_name_is_reserved_only_if_the_policy_lets_it_be_replaced(catalogue: Catalogue) -> None:
    published = record("a.txt")
    await catalogue.publish(published)
    policy = Asked(only_new)

    # Without overwrite: refused, and the conflict names the record.
    assert await reserve(catalogue, A, may_take=policy) == [Conflict("a.txt", published=published)]
    assert policy.asked == {("a.txt", published)}
    assert not await catalogue.is_reserved("a.txt")

    # With overwrite: reserved, and the record stays published until the new one replaces it.
    assert await reserve(catalogue, A, may_take=same_name) == []
    assert await catalogue.is_reserved("a.txt")
    assert await catalogue.describe("a.txt") == published
    assert await catalogue.listing() == [published]


@pytest.mark.parametrize(("first", "second"), FOLDING_ALIKE)
async def test_the_policy_is_shown_the_record_of_a_name_that_folds_alike(
    catalogue: Catalogue, first: str, second: str
) -> None:
    published = record(first)
    await catalogue.publish(published)
    policy = Asked(same_name)

    assert await reserve(catalogue, Reservation(second, 1), may_take=policy) == [Conflict(second, published=published)]
    assert policy.asked == {(second, published)}


async def test_the_policy_decides_on_the_whole_record(catalogue: Catalogue) -> None:
    await catalogue.publish(record("ada.txt", owner=ADA))
    await catalogue.publish(record("bob.txt", owner=BOB))

    def owners_replace_theirs(name: str, published: StoredFile | None) -> bool:
        return published is None or ADA.may_manage(published.owner_id)

    conflicts = await reserve(
        catalogue, Reservation("ada.txt", 1), Reservation("bob.txt", 1), may_take=owners_replace_theirs
    )

    assert conflicts == [Conflict("bob.txt", published=record("bob.txt", owner=BOB))]
    assert await reserve(catalogue, Reservation("ada.txt", 1), may_take=owners_replace_theirs) == []


# -- publish -----------------------------------------------------------------------------------


async def test_publish_replaces_the_pending_reservation(catalogue: Catalogue) -> None:
    await reserve(catalogue, A, B)

    await catalogue.publish(record("a.txt"))

    assert await catalogue.describe("a.txt") == record("a.txt")
    assert await catalogue.listing() == [record("a.txt")]
    assert await reserved(catalogue, ["a.txt", "b.txt"]) == {"b.txt"}
    # The name is taken now as a published one.
    assert await reserve(catalogue, A, may_take=only_new) == [Conflict("a.txt", published=record("a.txt"))]


async def test_publish_replaces_an_older_record(catalogue: Catalogue) -> None:
    older, newer = record("a.txt", b"old", owner=ADA, at=T0), record("a.txt", b"new content", owner=BOB, at=T0 + 5)
    await catalogue.publish(older)
    await reserve(catalogue, A, may_take=same_name)

    await catalogue.publish(newer)

    assert await catalogue.describe("a.txt") == newer
    assert await catalogue.listing() == [newer]
    assert not await catalogue.is_reserved("a.txt")


async def test_publish_needs_no_reservation(catalogue: Catalogue) -> None:
    await catalogue.publish(record("a.txt"))

    assert await catalogue.describe("a.txt") == record("a.txt")


@pytest.mark.parametrize(("first", "second"), FOLDING_ALIKE)
async def test_publish_under_a_name_folding_as_a_published_one_changes_nothing(
    catalogue: Catalogue, first: str, second: str
) -> None:
    await catalogue.publish(record(first))
    # A policy may let the name be reserved; it still cannot be published beside the other.
    await reserve(catalogue, Reservation(second, 1))

    with pytest.raises(NameTaken):
        await catalogue.publish(record(second))

    assert await catalogue.listing() == [record(first)]
    assert await catalogue.is_reserved(second)


async def test_a_record_keeps_every_field(catalogue: Catalogue) -> None:
    records = [
        record("ada.txt", owner=ADA, at=T0 + 0.123456),
        record("bob.txt", owner=BOB),
        StoredFile("anonymous.bin", 0, hashlib.md5().hexdigest(), hashlib.sha256().hexdigest(), None, T0 + 1),
        dataclasses.replace(record("Zoë → 日本.txt"), size=1 << 45, owner="/O=Lab/CN=Zoë", owner_authenticated=True),
    ]
    for published in records:
        await catalogue.publish(published)

    for published in records:
        assert await catalogue.describe(published.name) == published
    assert set(await catalogue.listing()) == set(records)


# -- describe, listing -------------------------------------------------------------------------


async def test_describe_addresses_exactly_the_name(catalogue: Catalogue) -> None:
    await catalogue.publish(record("A.txt"))

    assert await catalogue.describe("A.txt") == record("A.txt")
    assert await catalogue.describe("a.txt") is None


async def test_listing_is_in_code_point_order_of_the_names(catalogue: Catalogue) -> None:
    # Not folded, not by locale: digits, then upper case, then lower case, then the rest.
    names = ["b.txt", "Bravo.txt", "a.txt", "10.txt", "9.txt", "é.txt", "z.txt", "Zulu.txt", "日本.txt", "_.txt"]
    names += ["~.txt", "Éclair.txt"]
    for i, name in enumerate(names):
        await catalogue.publish(record(name, at=T0 - i))

    listed = await catalogue.listing()

    assert [r.name for r in listed] == sorted(names)
    assert [r.name for r in listed] == [
        *("10.txt", "9.txt", "Bravo.txt", "Zulu.txt", "_.txt", "a.txt", "b.txt", "z.txt", "~.txt"),
        *("Éclair.txt", "é.txt", "日本.txt"),
    ]
    assert listed == [record(name, at=T0 - names.index(name)) for name in sorted(names)]


async def test_listing_leaves_out_pending_names(catalogue: Catalogue) -> None:
    await catalogue.publish(record("b.txt"))
    await reserve(catalogue, A, C)

    assert await catalogue.listing() == [record("b.txt")]


# -- digests known after publishing --------------------------------------------------------------


def undigested(stored: StoredFile, *, md5: bool = True, sha256: bool = True) -> StoredFile:
    """``stored`` as published before its digests (those named) were known."""
    return dataclasses.replace(stored, md5=None if md5 else stored.md5, sha256=None if sha256 else stored.sha256)


@pytest.mark.parametrize(("md5", "sha256"), [(True, True), (True, False), (False, True)], ids=["both", "md5", "sha256"])
async def test_add_digests_fills_in_only_what_the_record_lacks(catalogue: Catalogue, md5: bool, sha256: bool) -> None:
    whole = record("a.txt", b"content")
    await catalogue.publish(undigested(whole, md5=md5, sha256=sha256))
    assert await catalogue.describe("a.txt") == undigested(whole, md5=md5, sha256=sha256)

    # A digest the record holds is kept, whatever the call brings.
    filled = await catalogue.add_digests(
        "a.txt",
        uploaded_at=T0,
        md5=whole.md5 if md5 else "0" * 32,
        sha256=whole.sha256 if sha256 else "0" * 64,
    )

    assert filled == whole
    assert await catalogue.describe("a.txt") == whole
    assert await catalogue.listing() == [whole]
    # Once both are known there is nothing to fill in.
    assert await catalogue.add_digests("a.txt", uploaded_at=T0, md5="0" * 32, sha256="0" * 64) is None
    assert await catalogue.describe("a.txt") == whole


async def test_add_digests_leaves_a_record_published_since_alone(catalogue: Catalogue) -> None:
    older = record("a.txt", b"old", at=T0)
    newer = undigested(record("a.txt", b"new content", at=T0 + 5))
    await catalogue.publish(undigested(older))
    await catalogue.publish(newer)

    # The digests of the old bytes arrive late: the new record is not theirs.
    assert await catalogue.add_digests("a.txt", uploaded_at=T0, md5=str(older.md5), sha256=str(older.sha256)) is None
    assert await catalogue.describe("a.txt") == newer
    assert await catalogue.add_digests("gone.txt", uploaded_at=T0, md5="0" * 32, sha256="0" * 64) is None


async def test_undigested_lists_the_records_lacking_a_digest_oldest_first(catalogue: Catalogue) -> None:
    late = undigested(record("late.txt", at=T0 + 3), md5=False)
    early = undigested(record("early.txt", at=T0 + 1), sha256=False)
    await catalogue.publish(late)
    await catalogue.publish(record("whole.txt", at=T0))
    await catalogue.publish(early)
    await catalogue.publish(undigested(record("recent.txt", at=T0 + 10)))

    assert await catalogue.undigested(before=T0 + 5, limit=10) == [early, late]
    assert await catalogue.undigested(before=T0 + 5, limit=1) == [early]
    await catalogue.add_digests("early.txt", uploaded_at=T0 + 1, md5="0" * 32, sha256="0" * 64)
    assert await catalogue.undigested(before=T0 + 5, limit=10) == [late]
    assert await catalogue.undigested(before=T0, limit=10) == []


# -- delete ------------------------------------------------------------------------------------


async def test_delete_removes_the_record(catalogue: Catalogue) -> None:
    await catalogue.publish(record("a.txt"))
    await catalogue.publish(record("b.txt"))

    assert await catalogue.delete("a.txt") is True

    assert await catalogue.describe("a.txt") is None
    assert await catalogue.listing() == [record("b.txt")]
    assert await catalogue.delete("a.txt") is False
    # The name is free again.
    assert await reserve(catalogue, A, may_take=only_new) == []


async def test_delete_addresses_exactly_the_name_and_no_reservation(catalogue: Catalogue) -> None:
    await catalogue.publish(record("A.txt"))
    await reserve(catalogue, B)

    assert await catalogue.delete("a.txt") is False
    assert await catalogue.delete("b.txt") is False

    assert await catalogue.listing() == [record("A.txt")]
    assert await catalogue.is_reserved("b.txt")


async def test_delete_of_an_expected_record_removes_only_that_record(catalogue: Catalogue) -> None:
    judged, newer = record("a.txt", b"old", owner=ADA), record("a.txt", b"new", owner=BOB, at=T0 + 1)
    await catalogue.publish(judged)
    await catalogue.publish(newer)  # published after the deleter read ``judged``

    assert await catalogue.delete("a.txt", expected=judged) is False
    assert await catalogue.describe("a.txt") == newer

    assert await catalogue.delete("a.txt", expected=newer) is True
    assert await catalogue.describe("a.txt") is None
    assert await catalogue.delete("a.txt", expected=newer) is False


# -- close -------------------------------------------------------------------------------------


async def test_a_closed_catalogue_reopens_on_the_next_call(catalogue: Catalogue) -> None:
    await catalogue.publish(record("a.txt"))
    await reserve(catalogue, B)

    await catalogue.close()
    await catalogue.close()  # closing twice is harmless

    assert await catalogue.describe("a.txt") == record("a.txt")
    assert await catalogue.is_reserved("b.txt")


# -- several processes, and concurrency --------------------------------------------------------


async def test_two_catalogue_objects_on_one_storage_see_each_others_changes(open_catalogues: Opener) -> None:
    one, two = open_catalogues(), open_catalogues()

    await reserve(one, A)
    assert await two.is_reserved("a.txt")
    assert await reserve(two, Reservation("A.TXT", 1)) == [Conflict("A.TXT", pending="a.txt")]
    await two.publish(record("a.txt"))
    assert await one.describe("a.txt") == record("a.txt")
    assert not await one.is_reserved("a.txt")
    assert await one.delete("a.txt", expected=record("a.txt"))
    assert await two.listing() == []


@pytest.mark.parametrize(("first", "second"), [pytest.param("a.txt", "a.txt", id="same"), *FOLDING_ALIKE])
async def test_two_catalogue_objects_reserving_one_name_at_once_one_wins(
    open_catalogues: Opener, first: str, second: str
) -> None:
    one, two = open_catalogues(), open_catalogues()
    # Both are connected before they contend.
    await one.is_reserved(first)
    await two.is_reserved(second)

    results = await asyncio.gather(reserve(one, Reservation(first, 1)), reserve(two, Reservation(second, 1)))

    won = [i for i, conflicts in enumerate(results) if conflicts == []]
    assert len(won) == 1
    winner, loser = (first, second) if won == [0] else (second, first)
    assert results[1 - won[0]] == [Conflict(loser, pending=winner)]
    assert await reserved(one, [first, second]) == {winner}


async def test_two_catalogue_objects_reserving_overlapping_manifests_at_once_one_wins(open_catalogues: Opener) -> None:
    one, two = open_catalogues(), open_catalogues()
    await one.listing()
    await two.listing()
    ones = [Reservation(f"one-{i}.txt", i) for i in range(50)] + [Reservation("shared.txt", 1)]
    twos = [Reservation("SHARED.txt", 1)] + [Reservation(f"two-{i}.txt", i) for i in range(50)]

    results = await asyncio.gather(reserve(one, *ones), reserve(two, *twos))

    assert sorted(len(conflicts) for conflicts in results) == [0, 1]
    winner = ones if results[0] == [] else twos
    everything = [f.name for f in ones + twos]
    assert await reserved(two, everything) == {f.name for f in winner}


async def test_concurrent_reservations_in_one_object_one_wins(catalogue: Catalogue) -> None:
    contenders = [Reservation(f"own-{i}.txt", i) for i in range(20)]

    results = await asyncio.gather(
        *(
            reserve(catalogue, own, Reservation("shared.txt" if i % 2 else "SHARED.TXT", 1))
            for i, own in enumerate(contenders)
        )
    )

    won = [i for i, conflicts in enumerate(results) if conflicts == []]
    assert len(won) == 1
    # The losers reserved nothing, not even their own names.
    names = [c.name for c in contenders] + ["shared.txt", "SHARED.TXT"]
    winner = contenders[won[0]].name
    assert await reserved(catalogue, names) == {winner, "shared.txt" if won[0] % 2 else "SHARED.TXT"}


async def test_concurrent_publishing_of_one_name_leaves_one_record(catalogue: Catalogue) -> None:
    versions = [record("a.txt", str(i).encode(), at=T0 + i) for i in range(10)]

    await asyncio.gather(*(catalogue.publish(v) for v in versions))

    listed = await catalogue.listing()
    assert len(listed) == 1 and listed[0] in versions


# -- opening a prefix's catalogue by the state URL ----------------------------------------------


async def test_a_sqlite_state_url_opens_the_catalogue_file_of_the_prefix(tmp_path: Path) -> None:
    state, path = tmp_path / "state" / "transfers.sqlite3", tmp_path / "state" / "catalogue" / "files.sqlite3"
    catalogue = open_catalogue(f"sqlite:///{state}", "files", path)
    try:
        await catalogue.publish(record("a.txt"))
    finally:
        await catalogue.close()

    # The prefix's own file, where a store has always kept it; the state store's file is not touched.
    assert await listing_of(path) == [record("a.txt")]
    assert not await asyncio.to_thread(state.exists)


def test_a_state_url_of_no_backend_opens_no_catalogue(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no catalogue backend"):
        open_catalogue("mysql://db/datastore", "files", tmp_path / "files.sqlite3")


# -- the SQLite files earlier versions wrote ---------------------------------------------------

#: The catalogue before principals (owners as the DN, no owner_id, no tls).
BEFORE_PRINCIPALS = """
CREATE TABLE files (
    name TEXT PRIMARY KEY,
    fold TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    md5 TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    owner TEXT,
    owner_authenticated INTEGER NOT NULL DEFAULT 0,
    uploaded_at REAL NOT NULL
);
CREATE TABLE pending (
    name TEXT PRIMARY KEY,
    fold TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    owner TEXT,
    reserved_at REAL NOT NULL
);
"""


#: The first catalogue, from before TLS (every owner an X-Client-DN, no owner_authenticated).
BEFORE_TLS = BEFORE_PRINCIPALS.replace("    owner_authenticated INTEGER NOT NULL DEFAULT 0,\n", "")


def write_old_catalogue(path: Path, schema: str, rows: Sequence[tuple[object, ...]]) -> None:
    """A catalogue file of ``schema`` holding published ``rows`` (name, owner, owner_authenticated) and
    the pending name ``pending.txt``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.executescript(schema)
        columns = "name, fold, size, md5, sha256, owner, uploaded_at" + (
            ", owner_authenticated" if "owner_authenticated" in schema else ""
        )
        for name, owner, authenticated in rows:
            content = str(name).encode()
            values = [name, str(name).lower(), len(content), hashlib.md5(content).hexdigest()]
            values += [hashlib.sha256(content).hexdigest(), owner, T0]
            values += [authenticated] if "owner_authenticated" in schema else []
            db.execute(f"INSERT INTO files ({columns}) VALUES ({', '.join('?' * len(values))})", values)
        db.execute(
            "INSERT INTO pending (name, fold, size, reserved_at) VALUES ('pending.txt', 'pending.txt', 1, ?)", (T0,)
        )
    db.close()


async def test_a_catalogue_from_before_principals_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "catalogue" / "files.sqlite3"
    zoe = Identity.asserted("/O=Lab/CN=Zoë")
    rows = [
        ("asserted.txt", zoe.dn, 0),
        ("certificate.txt", "/O=Lab/CN=Bob", 1),
        ("anonymous.txt", None, 0),
    ]
    await asyncio.to_thread(write_old_catalogue, path, BEFORE_PRINCIPALS, rows)

    catalogue = SqliteCatalogue(path)
    try:
        asserted, certificate, anonymous = [await catalogue.describe(name) for name, _, _ in rows]
        assert await catalogue.is_reserved("pending.txt")
        # The new columns are usable: a file is published, and another is reserved, beside the old ones.
        await catalogue.publish(record("new.txt", owner=BOB))
        assert await reserve(catalogue, A, may_take=only_new) == []
    finally:
        await catalogue.close()

    # An X-Client-DN owner is that asserted identity, and still manages the file.
    assert asserted is not None and asserted.owner == zoe.dn and zoe.may_manage(asserted.owner_id)
    assert not asserted.tls and not asserted.owner_authenticated
    # A certificate's subject was kept in a form no certificate has now: nobody but an administrator
    # manages the file (and it came over TLS).
    assert certificate is not None and certificate.tls and certificate.owner_id is not None
    assert Identity.from_principal(certificate.owner_id).issuer == ""
    assert not any(who.may_manage(certificate.owner_id) for who in (BOB, ADA, Identity.asserted("/O=Lab/CN=Bob")))
    # An anonymous upload belongs to nobody.
    assert anonymous is not None and anonymous.owner_id is None and anonymous.owner is None
    # Opened again, the file is already migrated: the records are as they were.
    assert await listing_of(path) == sorted(
        [asserted, certificate, anonymous, record("new.txt", owner=BOB)], key=lambda r: r.name
    )


async def test_a_catalogue_from_before_late_digests_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "catalogue" / "files.sqlite3"
    catalogue = SqliteCatalogue(path)
    try:
        await catalogue.publish(record("old.txt", owner=BOB))
    finally:
        await catalogue.close()
    # The table as it was: both digests required.
    with sqlite3.connect(path) as db:
        table = db.execute("SELECT sql FROM sqlite_master WHERE name = 'files'").fetchone()[0]
        db.execute("DROP INDEX files_undigested")
        db.execute("ALTER TABLE files RENAME TO files_now")
        db.execute(table.replace("md5 TEXT,", "md5 TEXT NOT NULL,").replace("sha256 TEXT,", "sha256 TEXT NOT NULL,"))
        db.execute("INSERT INTO files SELECT * FROM files_now")
        db.execute("DROP TABLE files_now")
    db.close()

    catalogue = SqliteCatalogue(path)
    try:
        new = undigested(record("new.txt"))
        await catalogue.publish(new)
        assert await catalogue.listing() == [new, record("old.txt", owner=BOB)]
        assert await catalogue.undigested(before=T0 + 1, limit=10) == [new]
    finally:
        await catalogue.close()


async def listing_of(path: Path) -> list[StoredFile]:
    """The listing of the SQLite catalogue at ``path``, read by a catalogue object of its own."""
    catalogue = SqliteCatalogue(path)
    try:
        return await catalogue.listing()
    finally:
        await catalogue.close()


async def test_a_catalogue_from_before_tls_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "catalogue" / "files.sqlite3"
    zoe = Identity.asserted("/O=Lab/CN=Zoë")
    rows = [("asserted.txt", zoe.dn, None), ("anonymous.txt", None, None)]
    await asyncio.to_thread(write_old_catalogue, path, BEFORE_TLS, rows)

    catalogue = SqliteCatalogue(path)
    try:
        asserted, anonymous = [await catalogue.describe(name) for name, _, _ in rows]
        assert await catalogue.is_reserved("pending.txt")
        await catalogue.publish(record("new.txt", owner=BOB))
    finally:
        await catalogue.close()

    # Every owner was an X-Client-DN: that asserted identity, which still manages its file.
    assert asserted is not None and asserted.owner == zoe.dn and zoe.may_manage(asserted.owner_id)
    assert not asserted.tls and not asserted.owner_authenticated
    assert anonymous is not None and anonymous.owner_id is None
    assert await listing_of(path) == [anonymous, asserted, record("new.txt", owner=BOB)]
