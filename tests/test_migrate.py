"""``datastore migrate``, run as an operator runs it (a process), on the session's own PostgreSQL cluster
(``postgres_server.py``) and on SQLite files: a fresh database gets every component's schema, a current
one is left alone, ``--check`` reports without applying (status 1 when something is pending), a schema
newer than the code is refused in one line with status 2 (by ``serve`` too), and nodes started after
``migrate`` serve and apply nothing more."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import aiohttp
import psycopg
import pytest

from datastore.security.tokens_postgres import MIGRATIONS as TOKEN_MIGRATIONS
from datastore.state.postgres import MIGRATIONS as STATE_MIGRATIONS
from datastore.state.postgres_catalogue import MIGRATIONS as CATALOGUE_MIGRATIONS
from datastore.state.postgres_jobs import MIGRATIONS as JOB_MIGRATIONS

from .harness import Ran, assert_one_line_failure, json_manifest, md5_hex, spawn_serve
from .postgres_server import shared_cluster

STATE, JOBS, CATALOGUE = STATE_MIGRATIONS[-1].version, JOB_MIGRATIONS[-1].version, CATALOGUE_MIGRATIONS[-1].version
TOKENS = TOKEN_MIGRATIONS[-1].version


@pytest.fixture
def url() -> Iterator[str]:
    with shared_cluster().database() as database:
        yield database


async def migrate(*args: str, env: Mapping[str, str] | None = None) -> Ran:
    """``python -m datastore migrate ARGS`` to its end, with ``env`` added to the environment."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "datastore",
        "migrate",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Ran(("migrate", *args), process.returncode, stdout.decode(), stderr.decode())


def schema_rows(url: str) -> list[tuple[str, int]]:
    with psycopg.connect(url) as db:
        present = db.execute("SELECT to_regclass('datastore_schema') IS NOT NULL").fetchone()
        if present is None or not present[0]:
            return []
        return sorted((row[0], row[1]) for row in db.execute("SELECT component, version FROM datastore_schema"))


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as db:
        return {row[0] for row in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


EVERY_COMPONENT = sorted([("catalogue", CATALOGUE), ("jobs", JOBS), ("state", STATE), ("tokens", TOKENS)])


# -- PostgreSQL --------------------------------------------------------------------------------------


async def test_a_fresh_postgres_database_gets_every_component_and_says_so(url: str, tmp_path: Path) -> None:
    ran = await migrate("--root", str(tmp_path), env={"DATASTORE_STATE_URL": url})
    assert ran.returncode == 0, ran
    assert ran.stdout.splitlines() == [
        f"applied: state 0 -> {STATE}",
        f"applied: jobs 0 -> {JOBS}",
        f"applied: tokens 0 -> {TOKENS}",
        f"applied: catalogue 0 -> {CATALOGUE}",
    ]
    assert await asyncio.to_thread(schema_rows, url) == EVERY_COMPONENT
    assert {"transfers", "jobs", "catalogue_files", "tokens"} <= await asyncio.to_thread(tables, url)


async def test_a_current_postgres_database_is_left_alone(url: str, tmp_path: Path) -> None:
    assert (await migrate("--root", str(tmp_path), "--state", url)).returncode == 0
    ran = await migrate("--root", str(tmp_path), "--state", url)
    assert ran.returncode == 0, ran
    assert ran.stdout.splitlines() == [
        f"the schema is current: state {STATE}, jobs {JOBS}, tokens {TOKENS}, catalogue {CATALOGUE}"
    ]


async def test_check_reports_pending_migrations_with_status_1_and_applies_none(url: str, tmp_path: Path) -> None:
    ran = await migrate("--root", str(tmp_path), "--state", url, "--check")
    assert ran.returncode == 1, ran
    assert ran.stdout.splitlines() == [
        f"pending: state 0 -> {STATE}",
        f"pending: jobs 0 -> {JOBS}",
        f"pending: tokens 0 -> {TOKENS}",
        f"pending: catalogue 0 -> {CATALOGUE}",
    ]
    assert await asyncio.to_thread(tables, url) == set()
    assert not (tmp_path / ".datastore").exists()


async def test_check_of_a_current_postgres_database_is_status_0(url: str, tmp_path: Path) -> None:
    config = tmp_path / "datastore.toml"
    config.write_text(f'root = "{tmp_path / "data"}"\nstate_url = "{url}"\n')
    assert (await migrate("--config", str(config))).returncode == 0
    ran = await migrate("--config", str(config), "--check")
    assert ran.returncode == 0, ran
    assert ran.stdout.startswith("the schema is current: ")


@pytest.mark.parametrize("component", ["state", "jobs", "catalogue"])
async def test_a_newer_schema_is_refused_in_one_line_with_status_2(url: str, tmp_path: Path, component: str) -> None:
    assert (await migrate("--root", str(tmp_path), "--state", url)).returncode == 0

    def upgrade_elsewhere() -> None:
        with psycopg.connect(url) as db:
            db.execute("UPDATE datastore_schema SET version = version + 100 WHERE component = %s", (component,))

    await asyncio.to_thread(upgrade_elsewhere)
    before = await asyncio.to_thread(schema_rows, url)
    for check in ((), ("--check",)):
        ran = await migrate("--root", str(tmp_path), "--state", url, *check)
        assert_one_line_failure(
            ran,
            2,
            f"datastore migrate: the {component} schema in this database is version"
            f" {dict(before)[component]}; this datastore knows up to {dict(before)[component] - 100}: run a"
            " datastore at least as new as the one that upgraded it",
        )
    assert await asyncio.to_thread(schema_rows, url) == before


async def test_serve_refuses_a_newer_schema_in_one_line_with_status_2(url: str, tmp_path: Path) -> None:
    assert (await migrate("--root", str(tmp_path), "--state", url)).returncode == 0

    def upgrade_elsewhere() -> None:
        with psycopg.connect(url) as db:
            db.execute("UPDATE datastore_schema SET version = version + 1 WHERE component = 'state'")

    await asyncio.to_thread(upgrade_elsewhere)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "datastore", "serve", "--port", "0", "--root", str(tmp_path), "--state", url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode == 2, (stdout, stderr)
    (line,) = stderr.decode().splitlines()
    assert line.startswith(f"datastore: the state schema in this database is version {STATE + 1}; "), line


async def test_an_unreachable_database_is_one_line_with_status_2(tmp_path: Path) -> None:
    cluster = shared_cluster()
    missing = cluster.url("no_such_database")
    ran = await migrate("--root", str(tmp_path), "--state", missing)
    assert_one_line_failure(ran, 2, re.compile(r"datastore migrate: the state database cannot be used: .+"))


async def test_nodes_started_after_migrate_serve_and_apply_nothing_more(url: str, tmp_path: Path) -> None:
    root = tmp_path / "shared"
    assert (await migrate("--root", str(root), "--state", url)).returncode == 0
    migrated = await asyncio.to_thread(schema_rows, url)
    content = b"migrated first " * 500
    nodes = []
    try:
        for name in ("node-a", "node-b"):
            process, (match,) = await spawn_serve("--root", str(root), "--state", url, "--node-id", name)
            nodes.append((process, match))
        (_, a), (_, b) = nodes
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{a['url']}manifest", json=json_manifest([("m.bin", content)])) as response:
                assert response.status == 201, await response.text()
                key = (await response.json())["transfer_key"]
            async with session.put(f"{b['url']}{key}/0", data=content) as response:
                assert response.status == 200, await response.text()
            async with session.get(f"{a['url']}m.bin") as response:
                assert md5_hex(await response.read()) == md5_hex(content)
        # Two nodes started, opened every store, and found nothing to migrate.
        assert await asyncio.to_thread(schema_rows, url) == migrated
        assert (await migrate("--root", str(root), "--state", url, "--check")).returncode == 0
    finally:
        for process, _ in nodes:
            process.terminate()
        for process, _ in nodes:
            await asyncio.wait_for(process.wait(), 60)


# -- SQLite ------------------------------------------------------------------------------------------


async def test_sqlite_files_are_created_then_current(tmp_path: Path) -> None:
    root = tmp_path / "data"
    check = await migrate("--root", str(root), "--prefix", "files", "--prefix", "more", "--check")
    assert check.returncode == 1, check
    assert not (root / ".datastore").exists()
    ran = await migrate("--root", str(root), "--prefix", "files", "--prefix", "more")
    assert ran.returncode == 0, ran
    assert ran.stdout.splitlines() == [
        "applied: state (SQLite) absent -> current",
        "applied: catalogue files (SQLite) absent -> current",
        "applied: catalogue more (SQLite) absent -> current",
        "applied: tokens (SQLite) absent -> current",
    ]
    state_dir = root / ".datastore"
    assert {p.name for p in state_dir.glob("**/*.sqlite3")} == {
        "transfers.sqlite3",
        "files.sqlite3",
        "more.sqlite3",
        "tokens.sqlite3",
    }
    again = await migrate("--root", str(root), "--prefix", "files", "--prefix", "more", "--check")
    assert again.returncode == 0, again
    assert again.stdout.splitlines() == [
        "the schema is current: state (SQLite) current, catalogue files (SQLite) current,"
        " catalogue more (SQLite) current, tokens (SQLite) current"
    ]


async def test_an_older_sqlite_file_is_reported_by_check_untouched_then_migrated(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    assert (await migrate("--root", str(tmp_path), "--state-dir", str(state_dir))).returncode == 0
    path = state_dir / "transfers.sqlite3"

    def make_older() -> int:
        # A file from before idempotency keys.
        with sqlite3.connect(path) as db:
            db.execute("DROP INDEX transfers_by_idempotency")
            db.execute("ALTER TABLE transfers DROP COLUMN idempotency_key")
            cookie: int = db.execute("PRAGMA schema_version").fetchone()[0]
        db.close()
        return cookie

    def columns() -> set[str]:
        with sqlite3.connect(path) as db:
            names = {row[1] for row in db.execute("PRAGMA table_info(transfers)")}
        db.close()
        return names

    await asyncio.to_thread(make_older)
    check = await migrate("--root", str(tmp_path), "--state-dir", str(state_dir), "--check")
    assert check.returncode == 1, check
    assert check.stdout.splitlines() == ["pending: state (SQLite) older -> current"]
    assert "idempotency_key" not in await asyncio.to_thread(columns)
    ran = await migrate("--root", str(tmp_path), "--state-dir", str(state_dir))
    assert ran.stdout.splitlines() == ["applied: state (SQLite) older -> current"]
    assert "idempotency_key" in await asyncio.to_thread(columns)
    assert (await migrate("--root", str(tmp_path), "--state-dir", str(state_dir), "--check")).returncode == 0


async def test_bad_settings_are_one_line_with_status_2(tmp_path: Path) -> None:
    ran = await migrate("--root", str(tmp_path), "--state", "mysql://db/x")
    assert_one_line_failure(
        ran, 2, "datastore migrate: state_url must be sqlite:///PATH or postgresql://..., not 'mysql://db/x'"
    )
