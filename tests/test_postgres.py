"""What only the PostgreSQL backends have: versioned migrations applied once however many nodes start
together (the state store's two components included), a refusal to run against a schema newer than
the code, and a file's catalogue record committed with its publish in the state when both are in
one database (the contract suites cover the rest). On the session's own cluster (``postgres_server.py``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest

from datastore.lifecycle.states import FileState
from datastore.protocol.manifest import ManifestFile
from datastore.security.identity import ANONYMOUS
from datastore.state import open_catalogue
from datastore.state.catalogue import NameTaken, Reservation, StoredFile
from datastore.state.interface import ClaimStatus
from datastore.state.postgres import MIGRATIONS as STATE_MIGRATIONS
from datastore.state.postgres import PostgresState
from datastore.state.postgres_catalogue import MIGRATIONS, PostgresCatalogue
from datastore.state.postgres_database import SchemaTooNew
from datastore.state.postgres_jobs import MIGRATIONS as JOB_MIGRATIONS

from .harness import json_manifest, md5_hex, spawn_serve
from .postgres_server import shared_cluster


@pytest.fixture
def url() -> Iterator[str]:
    with shared_cluster().database() as database:
        yield database


def schema_versions(url: str) -> list[tuple[str, int]]:
    with psycopg.connect(url) as db:
        return [(row[0], row[1]) for row in db.execute("SELECT component, version FROM datastore_schema")]


async def test_nodes_starting_together_apply_each_migration_once(url: str) -> None:
    nodes = [PostgresCatalogue(url, "files") for _ in range(4)]
    try:
        # Each node's first call opens it: all four migrate at once, taking turns.
        await asyncio.gather(*(node.describe("x.txt") for node in nodes))
        assert await nodes[0].reserve([Reservation("a.txt", 1)], may_take=lambda *_: True, now=1.0) == []
        assert await nodes[3].is_reserved("a.txt")
    finally:
        for node in nodes:
            await node.close()
    assert await asyncio.to_thread(schema_versions, url) == [("catalogue", MIGRATIONS[-1].version)]


async def test_a_schema_newer_than_the_code_is_refused_and_left_alone(url: str) -> None:
    first = PostgresCatalogue(url, "files")
    await first.describe("x.txt")
    await first.close()

    def upgrade_elsewhere() -> None:
        with psycopg.connect(url) as db:
            db.execute("UPDATE datastore_schema SET version = version + 1 WHERE component = 'catalogue'")

    await asyncio.to_thread(upgrade_elsewhere)
    older = PostgresCatalogue(url, "files")
    with pytest.raises(SchemaTooNew, match="run a datastore at least as new"):
        await older.describe("x.txt")
    await older.close()
    assert await asyncio.to_thread(schema_versions, url) == [("catalogue", MIGRATIONS[-1].version + 1)]


async def test_the_state_url_chooses_the_postgres_catalogue_per_prefix(url: str, tmp_path: Path) -> None:
    # The SQLite file's path is of no use to PostgreSQL: every prefix is in the one database.
    one, two = open_catalogue(url, "one", tmp_path / "one.sqlite3"), open_catalogue(url, "two", tmp_path / "x")
    try:
        assert await one.reserve([Reservation("same.txt", 1)], may_take=lambda *_: True, now=1.0) == []
        # The other prefix's catalogue shares the database, not the names.
        assert await two.reserve([Reservation("same.txt", 1)], may_take=lambda *_: True, now=1.0) == []
        assert await one.is_reserved("same.txt") and await two.is_reserved("same.txt")
    finally:
        await one.close()
        await two.close()


async def test_the_state_store_migrates_its_transfers_and_its_jobs_as_two_components(url: str) -> None:
    nodes = [PostgresState(url) for _ in range(3)]
    try:
        await asyncio.gather(*(node.last_event_id() for node in nodes))
        assert await nodes[0].acquire("webhook", "node-1", lease=30.0, now=1.0)
        assert not await nodes[2].acquire("webhook", "node-3", lease=30.0, now=2.0)
    finally:
        for node in nodes:
            await node.close()
    assert sorted(await asyncio.to_thread(schema_versions, url)) == [
        ("jobs", JOB_MIGRATIONS[-1].version),
        ("state", STATE_MIGRATIONS[-1].version),
    ]


async def test_a_jobs_schema_newer_than_the_code_is_refused(url: str) -> None:
    first = PostgresState(url)
    await first.last_event_id()
    await first.close()

    def upgrade_elsewhere() -> None:
        with psycopg.connect(url) as db:
            db.execute("UPDATE datastore_schema SET version = version + 1 WHERE component = 'jobs'")

    await asyncio.to_thread(upgrade_elsewhere)
    older = PostgresState(url)
    with pytest.raises(SchemaTooNew, match="the jobs schema"):
        await older.last_event_id()
    await older.close()


@contextlib.asynccontextmanager
async def publishing(url: str, name: str) -> AsyncIterator[tuple[PostgresState, PostgresCatalogue, str]]:
    """A state and a catalogue in one database, and the transfer of ``name``, reserved, claimed by
    "holder" and being published."""
    state, catalogue = PostgresState(url), PostgresCatalogue(url, "files")
    try:
        assert await catalogue.reserve([Reservation(name, 3)], may_take=lambda *_: True, now=1.0) == []
        transfer = await state.create("files", ANONYMOUS, [ManifestFile(name, 3)], lifetime=60.0, now=1.0)
        await state.claim(transfer.key, 0, "holder", lease=30.0, now=2.0)
        assert await state.begin_publish(transfer.key, 0, "holder")
        yield state, catalogue, transfer.key
    finally:
        await state.close()
        await catalogue.close()


def record(name: str) -> StoredFile:
    return StoredFile(name=name, size=3, md5=None, sha256=None, owner=None, uploaded_at=3.0)


async def test_the_catalogue_record_of_a_publish_commits_with_the_state_s(url: str) -> None:
    async with publishing(url, "a.txt") as (state, catalogue, key):
        with state.publishing_together():
            await catalogue.publish(record("a.txt"))
            # Held back: neither a listing nor the transfer says published yet.
            assert await catalogue.describe("a.txt") is None
            assert await catalogue.is_reserved("a.txt")
            assert await state.publish(key, 0, "holder", md5=None, sha256=None)
        assert await catalogue.describe("a.txt") == record("a.txt")
        assert not await catalogue.is_reserved("a.txt")
        found = await state.get_file(key, 0)
        assert found is not None and found[1] is not None and found[1].state is FileState.PUBLISHED


async def test_a_publish_the_state_refuses_leaves_the_catalogue_as_it_was(url: str) -> None:
    async with publishing(url, "a.txt") as (state, catalogue, key):
        with state.publishing_together():
            await catalogue.publish(record("a.txt"))
            # Another holder's publish changes nothing: the record held back goes with it.
            assert not await state.publish(key, 0, "another holder", md5=None, sha256=None)
        assert await catalogue.describe("a.txt") is None
        assert await catalogue.is_reserved("a.txt")
        # The record is dropped, not sent with the next publish.
        assert await state.publish(key, 0, "holder", md5=None, sha256=None)
        assert await catalogue.describe("a.txt") is None


async def test_a_name_taken_while_publishing_together_refuses_both(url: str) -> None:
    async with publishing(url, "README") as (state, catalogue, key):
        await catalogue.publish(record("readme"))  # outside: at once
        with state.publishing_together():
            await catalogue.publish(record("README"))
            with pytest.raises(NameTaken, match="'readme' is published, and folds as 'README' does"):
                await state.publish(key, 0, "holder", md5=None, sha256=None)
        assert [f.name for f in await catalogue.listing()] == ["readme"]
        # Still the holder's, being published (its failure is the lifecycle's to record).
        assert await state.status(key, 0) == ClaimStatus(FileState.UPLOADING, "holder", 32.0, None)


async def test_a_catalogue_in_another_database_writes_at_once(url: str) -> None:
    with shared_cluster().database() as other:
        async with publishing(url, "a.txt") as (state, _, key):
            elsewhere = PostgresCatalogue(other, "files")
            try:
                with state.publishing_together():
                    await elsewhere.publish(record("a.txt"))
                    assert await elsewhere.describe("a.txt") == record("a.txt")
                    assert await state.publish(key, 0, "holder", md5=None, sha256=None)
            finally:
                await elsewhere.close()


async def test_a_store_serving_on_postgresql_keeps_its_files_across_a_restart(url: str, tmp_path: Path) -> None:
    content = b"kept in postgres " * 1000
    args = ("--root", str(tmp_path / "served"), "--state", url, "--node-id", "pg-node")
    process, (match,) = await spawn_serve(*args)
    try:
        async with aiohttp.ClientSession(match["base"]) as session:
            async with session.get("/_api/v1/health") as response:
                assert (await response.json())["state"] == "postgresql"
            async with session.post("/files/manifest", json=json_manifest([("kept.bin", content)])) as response:
                assert response.status == 201, await response.text()
                key = (await response.json())["transfer_key"]
            async with session.put(f"/files/{key}/0", data=content) as response:
                assert response.status == 200, await response.text()
                # Found, claimed, gated, marked, published: the catalogue's record commits with the publish.
                assert 'desc="5 transactions"' in response.headers["Server-Timing"]
    finally:
        await stop(process)
    process, (match,) = await spawn_serve(*args)
    try:
        async with aiohttp.ClientSession(match["base"]) as session:
            async with session.get("/files/", headers={"Accept": "application/json"}) as response:
                listed = {f["name"]: f for f in (await response.json())["files"]}
            assert listed["kept.bin"]["md5"] == md5_hex(content)
            async with session.get("/files/kept.bin") as response:
                assert await response.read() == content
    finally:
        await stop(process)
    # The records are in PostgreSQL, not in a SQLite file beside the folder.
    assert not (tmp_path / "served" / ".datastore" / "transfers.sqlite3").exists()


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        await asyncio.wait_for(process.wait(), 60)
