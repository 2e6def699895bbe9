"""What only the PostgreSQL backends have: versioned migrations applied once however many nodes start
together (the state store's two components included), and a refusal to run against a schema newer
than the code (the contract suites cover the rest). On the session's own cluster (``postgres_server.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest

from datastore.state import open_catalogue
from datastore.state.catalogue import Reservation
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
