"""The contract suite of the token store: every method of ``TokenStore`` (``datastore/security/tokens.py``)
called directly (no HTTP), on every backend: tokens (create, verify, lookup, list, revoke, expiry,
purge), invitations (invite, answer, the asker's limit), vouchers (extend, reserve, release); what
one store object does, another on the same storage sees at once (as another worker or node would);
and concurrent reservations from two store objects never spend more than a voucher's budget. Then
what only the choice of a backend has: :func:`open_token_store` takes the state setting, and a token
issued by ``datastore tokens --state postgresql://...`` works on a ``datastore serve`` of that database.

Each test that takes ``open_stores`` runs once per entry of :data:`BACKENDS`, on fresh storage (a
SQLite file in the test's directory; a database of its own in the session's PostgreSQL cluster).
Nothing sleeps: expiry is checked with an explicit ``now`` or a lifetime already over.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import aiohttp
import psycopg
import pytest

from datastore.config import Settings, load_settings
from datastore.errors import QuotaExceeded
from datastore.security.tokens import (
    MAX_BUDGET,
    IssuedToken,
    TokenBackend,
    TokenError,
    TokenStore,
    open_token_store,
)
from datastore.security.tokens_postgres import MIGRATIONS, PostgresTokens
from datastore.security.tokens_sqlite import SqliteTokens
from datastore.state.postgres_database import SchemaTooNew

from .harness import datastore, spawn_serve
from .postgres_server import shared_cluster

# -- backends ----------------------------------------------------------------------------------

#: Opens one more store object on a backend's storage (as one more worker process or node would).
Opener = Callable[[], TokenStore]
#: Given the test's temporary directory: fresh storage for tokens, and how to open a backend on it.
Backend = Callable[[Path], AbstractAsyncContextManager[Callable[[], TokenBackend]]]


@asynccontextmanager
async def sqlite_backend(directory: Path) -> AsyncIterator[Callable[[], TokenBackend]]:
    """One SQLite file in the test's directory; each store object opens its own connection to it."""
    yield partial(SqliteTokens, directory / "state" / "tokens.sqlite3")


@asynccontextmanager
async def postgres_backend(directory: Path) -> AsyncIterator[Callable[[], TokenBackend]]:
    """A database of its own in the session's PostgreSQL cluster; each store object opens its own pool."""
    with shared_cluster().database() as url:
        yield partial(PostgresTokens, url)


#: Every backend the suite certifies, by name (the test ids' parameter).
BACKENDS: dict[str, Backend] = {"sqlite": sqlite_backend, "postgres": postgres_backend}


@pytest.fixture(params=sorted(BACKENDS))
async def open_stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens store objects on one fresh storage of the backend under test; closes them all (before
    the storage goes) after the test."""
    async with AsyncExitStack() as cleanup:
        backend = await cleanup.enter_async_context(BACKENDS[request.param](tmp_path))

        def open_one() -> TokenStore:
            store = TokenStore(backend())
            cleanup.push_async_callback(store.close)
            return store

        yield open_one


@pytest.fixture
def store(open_stores: Opener) -> TokenStore:
    """A fresh, empty token store of the backend under test."""
    return open_stores()


async def invite(
    store: TokenStore,
    *,
    client: str = "192.0.2.1",
    limit: int = 10,
    size: int = 100,
    wait: float = 3600.0,
    now: float | None = None,
) -> IssuedToken:
    """An invitation to push two files of ``size`` bytes in all to ``files``, asked by ``client``."""
    return await store.invite(
        prefix="files",
        action="upload",
        names=["a.bin", "b.bin"],
        size=size,
        requester="store B",
        wait=wait,
        client=client,
        limit=limit,
        now=now,
    )


async def voucher(store: TokenStore, budget: int) -> str:
    """An accepted invitation's id: a voucher of ``budget`` bytes."""
    issued = await invite(store, size=budget)
    assert await store.answer(issued.record.id, accept=True, by="ada") is not None
    return issued.record.id


# -- tokens ------------------------------------------------------------------------------------


async def test_a_created_token_verifies_and_a_wrong_or_malformed_one_does_not(store: TokenStore) -> None:
    issued = await store.create("ada", ["read", "upload"], prefixes=["files"], lifetime=3600, description="laptop")
    record = issued.record
    assert (record.subject, record.actions, record.prefixes) == (
        "ada",
        frozenset({"read", "upload"}),
        frozenset({"files"}),
    )
    assert issued.token.startswith(f"dst_{record.id}_")
    assert await store.verify(issued.token) == record
    assert await store.lookup(issued.token) == record
    assert await store.get(record.id) == record
    forged = issued.token[:-1] + ("A" if issued.token[-1] != "A" else "B")
    for wrong in (forged, "dst_nothing", "", issued.token + "x", f"dst_{'0' * 12}_{issued.token[-43:]}"):
        assert await store.verify(wrong) is None
        assert await store.lookup(wrong) is None
    identity = record.identity()
    assert (identity.subject, identity.admin, identity.grant and identity.grant.token_id) == ("ada", False, record.id)


@pytest.mark.parametrize(
    ("subject", "actions", "prefixes", "lifetime", "message"),
    [
        pytest.param(" ", ["read"], None, 60.0, "non-empty", id="blank-subject"),
        pytest.param("ada", ["fly"], None, 60.0, "unknown action 'fly'", id="unknown-action"),
        pytest.param("ada", [], None, 60.0, "at least one action", id="no-action"),
        pytest.param("ada", ["read"], ["../x"], 60.0, "prefix", id="bad-prefix"),
        pytest.param("ada", ["admin"], ["files"], 60.0, "every prefix", id="admin-on-a-prefix"),
        pytest.param("ada", ["read"], None, 0.0, "lifetime", id="no-lifetime"),
    ],
)
async def test_a_token_asked_badly_is_refused_and_not_stored(
    store: TokenStore, subject: str, actions: list[str], prefixes: list[str] | None, lifetime: float, message: str
) -> None:
    with pytest.raises(TokenError, match=message):
        await store.create(subject, actions, prefixes=prefixes, lifetime=lifetime)
    assert await store.count() == 0


async def test_list_is_newest_first_and_another_store_object_sees_it(open_stores: Opener) -> None:
    one, two = open_stores(), open_stores()
    first = await one.create("ada", ["read"])
    second = await two.create("bob", ["upload"], prefixes=["a", "b"])
    for store in (one, two):
        assert [r.id for r in await store.list()] == [second.record.id, first.record.id]
        assert await store.count() == 2
        assert await store.verify(first.token) == first.record
    assert await one.get(second.record.id) == second.record
    assert await one.get("000000000000") is None


async def test_a_revoked_token_is_refused_everywhere_at_once(open_stores: Opener) -> None:
    one, two = open_stores(), open_stores()
    issued = await one.create("ada", ["read"])
    assert await two.verify(issued.token) is not None
    revoked = await two.revoke(issued.record.id)
    assert revoked is not None and revoked.revoked_at is not None
    assert revoked.state(time.time()) == "revoked"
    assert await one.verify(issued.token) is None
    # Still recorded (the asker of an invitation follows it), and revoking again keeps the first time.
    assert await one.lookup(issued.token) == revoked
    again = await one.revoke(issued.record.id)
    assert again is not None and again.revoked_at == revoked.revoked_at
    assert await one.revoke("000000000000") is None


async def test_a_token_expires_at_its_lifetime(store: TokenStore) -> None:
    issued = await store.create("ada", ["read"], lifetime=60)
    expires = issued.record.expires_at
    assert await store.verify(issued.token, now=expires - 1) is not None
    assert await store.verify(issued.token, now=expires) is None
    assert issued.record.state(expires) == "expired"
    assert (await store.list())[0].state(expires) == "expired"


async def test_purge_forgets_tokens_expired_or_revoked_before_the_cutoff(open_stores: Opener) -> None:
    store = open_stores()
    short = await store.create("short", ["read"], lifetime=10)
    long = await store.create("long", ["read"], lifetime=10_000)
    revoked = await store.create("revoked", ["read"], lifetime=10_000)
    await store.revoke(revoked.record.id)
    assert await store.purge(short.record.created_at - 1) == 0
    assert await store.purge(short.record.expires_at + 1) == 2
    assert [r.id for r in await open_stores().list()] == [long.record.id]
    assert await store.verify(short.token) is None
    assert await store.purge(long.record.expires_at + 1) == 1
    assert await store.count() == 0


# -- invitations -------------------------------------------------------------------------------


async def test_an_invitation_works_only_once_accepted(open_stores: Opener) -> None:
    one, two = open_stores(), open_stores()
    issued = await invite(one, size=100)
    pending = issued.record
    assert (pending.invitation, pending.state(time.time())) == ("PENDING", "pending")
    assert (pending.budget, pending.used, pending.requester) == (100, 0, "store B")
    assert (pending.names, pending.prefixes, pending.actions) == (
        frozenset({"a.bin", "b.bin"}),
        frozenset({"files"}),
        frozenset({"upload"}),
    )
    assert await two.verify(issued.token) is None
    assert await two.lookup(issued.token) == pending
    assert [r.id for r in await two.invitations()] == [pending.id]

    accepted = await two.answer(pending.id, accept=True, by="ada", lifetime=600)
    assert accepted is not None
    assert (accepted.invitation, accepted.answered_by, accepted.budget) == ("ACCEPTED", "ada", 100)
    assert accepted.expires_at == pytest.approx(time.time() + 600, abs=60)
    assert await one.verify(issued.token) == accepted
    # Answered once: a second answer, either way, changes nothing.
    assert await one.answer(pending.id, accept=False, by="bob") is None
    assert await one.get(pending.id) == accepted


async def test_a_declined_invitation_never_works_and_an_answer_may_set_the_budget(store: TokenStore) -> None:
    declined = await invite(store)
    after = await store.answer(declined.record.id, accept=False, by="ada", budget=5)
    assert after is not None and (after.state(time.time()), after.budget) == ("declined", 100)
    assert await store.verify(declined.token) is None
    smaller = await invite(store)
    after = await store.answer(smaller.record.id, accept=True, by="ada", budget=40)
    assert after is not None and (after.budget, after.left) == (40, 40)
    with pytest.raises(TokenError, match="budget"):
        await store.answer((await invite(store)).record.id, accept=True, by="ada", budget=MAX_BUDGET)
    assert await store.answer("000000000000", accept=True, by="ada") is None


async def test_an_invitation_past_its_wait_or_revoked_cannot_be_answered(store: TokenStore) -> None:
    late = await invite(store, wait=10.0, now=time.time() - 100)
    assert late.record.state(time.time()) == "expired"
    assert await store.answer(late.record.id, accept=True, by="ada") is None
    revoked = await invite(store)
    await store.revoke(revoked.record.id)
    assert await store.answer(revoked.record.id, accept=True, by="ada") is None
    assert {r.id for r in await store.invitations()} == {late.record.id, revoked.record.id}


async def test_an_invitation_is_refused_a_client_with_its_limit_pending(open_stores: Opener) -> None:
    one, two = open_stores(), open_stores()
    first = await invite(one, limit=2)
    await invite(two, limit=2)
    with pytest.raises(QuotaExceeded, match="2 invitations waiting"):
        await invite(one, limit=2)
    # Another client has its own limit; an answered, revoked or lapsed invitation no longer counts.
    await invite(one, limit=2, client="192.0.2.2")
    await invite(one, limit=2, client="192.0.2.3", wait=1.0, now=time.time() - 10)
    await invite(one, limit=2, client="192.0.2.3")
    await two.answer(first.record.id, accept=False, by="ada")
    await invite(two, limit=2)
    assert len(await one.invitations()) == 6


async def test_concurrent_invitations_from_two_store_objects_keep_to_the_limit(open_stores: Opener) -> None:
    stores = [open_stores(), open_stores()]
    asked = [invite(stores[n % 2], limit=3) for n in range(8)]
    outcomes = await asyncio.gather(*asked, return_exceptions=True)
    assert sum(1 for outcome in outcomes if isinstance(outcome, QuotaExceeded)) == 5, outcomes
    assert [outcome for outcome in outcomes if isinstance(outcome, BaseException)] == [
        outcome for outcome in outcomes if isinstance(outcome, QuotaExceeded)
    ]
    assert len(await stores[0].invitations()) == 3


# -- vouchers ----------------------------------------------------------------------------------


async def test_extend_adds_to_an_active_vouchers_budget_only(store: TokenStore) -> None:
    token_id = await voucher(store, 100)
    extended = await store.extend(token_id, 50)
    assert extended is not None and extended.budget == 150
    with pytest.raises(TokenError, match="would reach"):
        await store.extend(token_id, MAX_BUDGET - 150)
    with pytest.raises(TokenError, match="positive"):
        await store.extend(token_id, 0)
    pending = await invite(store)
    assert await store.extend(pending.record.id, 10) is None
    plain = await store.create("ada", ["read"])
    assert await store.extend(plain.record.id, 10) is None
    await store.revoke(token_id)
    assert await store.extend(token_id, 10) is None
    assert (await store.get(token_id)).budget == 150  # type: ignore[union-attr]


async def test_reserve_takes_what_is_left_and_release_gives_it_back(open_stores: Opener) -> None:
    one, two = open_stores(), open_stores()
    token_id = await voucher(one, 100)
    assert await one.reserve(token_id, 60) == 60
    assert await two.reserve(token_id, 60) == 40
    assert await one.reserve(token_id, 1) == 0
    await two.release(token_id, 30)
    record = await one.get(token_id)
    assert record is not None and (record.used, record.left) == (70, 30)
    assert await one.reserve(token_id, 50) == 30
    await one.release(token_id, 1000)  # never below nothing used
    assert (await two.get(token_id)).used == 0  # type: ignore[union-attr]
    await one.release(token_id, 0)
    assert await one.reserve("000000000000", 10) == 0
    # A token of no budget grants whatever is asked, and counts it.
    plain = await one.create("ada", ["upload"])
    assert await one.reserve(plain.record.id, 10**12) == 10**12
    assert (await two.get(plain.record.id)).used == 10**12  # type: ignore[union-attr]


async def test_concurrent_reservations_from_two_store_objects_never_overspend(open_stores: Opener) -> None:
    stores = [open_stores(), open_stores()]
    token_id = await voucher(stores[0], 1000)
    granted = await asyncio.gather(*(stores[n % 2].reserve(token_id, 30) for n in range(60)))
    assert sum(granted) == 1000
    assert sorted(set(granted)) == [0, 10, 30]
    record = await stores[1].get(token_id)
    assert record is not None and (record.used, record.left) == (1000, 0)
    # Releases and reservations interleaved from both: what is granted is what was given back.
    await asyncio.gather(*(stores[n % 2].release(token_id, 25) for n in range(8)))
    again = await asyncio.gather(*(stores[n % 2].reserve(token_id, 7) for n in range(40)))
    assert sum(again) == 200
    assert (await stores[0].get(token_id)).used == 1000  # type: ignore[union-attr]


# -- choosing the backend ----------------------------------------------------------------------


@pytest.fixture
def url() -> Iterator[str]:
    with shared_cluster().database() as database:
        yield database


def settings_of(tmp_path: Path, state_url: str | None = None) -> Settings:
    return load_settings({"root": tmp_path / "data", "state_url": state_url})


def components(url: str) -> dict[str, int]:
    with psycopg.connect(url) as db:
        return {row[0]: row[1] for row in db.execute("SELECT component, version FROM datastore_schema")}


async def test_the_sqlite_state_keeps_tokens_in_the_state_directorys_file(tmp_path: Path) -> None:
    store = open_token_store(settings_of(tmp_path))
    try:
        await store.create("ada", ["read"])
    finally:
        await store.close()
    assert (tmp_path / "data" / ".datastore" / "tokens.sqlite3").is_file()


async def test_a_postgresql_state_keeps_tokens_in_the_database_shared_by_every_node(url: str, tmp_path: Path) -> None:
    node_a, node_b = (
        open_token_store(settings_of(tmp_path / "a", url)),
        open_token_store(settings_of(tmp_path / "b", url)),
    )
    try:
        issued = await node_a.create("ada", ["read"])
        assert await node_b.verify(issued.token) == issued.record
    finally:
        await node_a.close()
        await node_b.close()
    assert not await asyncio.to_thread(sqlite_files, tmp_path)
    assert (await asyncio.to_thread(components, url))["tokens"] == MIGRATIONS[-1].version


async def test_a_tokens_schema_newer_than_the_code_is_refused(url: str) -> None:
    first = TokenStore(PostgresTokens(url))
    await first.count()
    await first.close()

    def upgrade_elsewhere() -> None:
        with psycopg.connect(url) as db:
            db.execute("UPDATE datastore_schema SET version = version + 1 WHERE component = 'tokens'")

    await asyncio.to_thread(upgrade_elsewhere)
    older = TokenStore(PostgresTokens(url))
    with pytest.raises(SchemaTooNew, match="the tokens schema"):
        await older.count()
    await older.close()


def sqlite_files(directory: Path) -> list[Path]:
    return list(directory.rglob("*.sqlite3"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_token_the_cli_issues_on_postgresql_works_on_a_node_serving_that_database(
    url: str, tmp_path: Path
) -> None:
    # The node and the command have state directories of their own: only the database is shared.
    process, (match,) = await spawn_serve("--root", str(tmp_path / "node"), "--state", url, open_store=False)
    tokens = ("tokens", "--root", str(tmp_path / "elsewhere"), "--state", url)
    try:
        created = await datastore(*tokens, "create", "ada", "--actions", "read,upload", "--prefix", "files")
        assert created.returncode == 0, created
        token = created.stdout.strip()
        listed = await datastore(*tokens, "ls", "--json")
        assert listed.returncode == 0, listed
        by_subject = {t["subject"]: t for t in json.loads(listed.stdout)}
        # The node's first start issued the cluster's administrator token into the same table.
        assert set(by_subject) == {"admin", "ada"}
        async with aiohttp.ClientSession(match["base"]) as http:
            async with http.get("/_api/v1/identity", headers=bearer(token)) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["subject"] == "ada"
            async with http.get("/files/", headers={**bearer(token), "Accept": "application/json"}) as response:
                assert response.status == 200, await response.text()
            revoked = await datastore(*tokens, "revoke", by_subject["ada"]["id"])
            assert revoked.returncode == 0, revoked
            async with http.get("/files/", headers={**bearer(token), "Accept": "application/json"}) as response:
                assert response.status == 401
    finally:
        process.terminate()
        await process.wait()
    assert not await asyncio.to_thread(sqlite_files, tmp_path)
