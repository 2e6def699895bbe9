"""``GET /_api/v1/health`` as a load balancer uses it: 200 with the node, its state store's round trip
and the storage's state while the node can serve; 503 while its PostgreSQL is out of reach (and 200
again once it is back), while its storage takes no file, or with staging on another filesystem than
the files on a shared state; never 503 for a full disk. Every answer is as the OpenAPI document's
``Health`` schema says. On the session's own PostgreSQL cluster (``postgres_server.py``)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import psycopg
import pytest

# Imported here, not first by a store starting on the event loop (an import reads files: blockbuster).
import datastore.state.postgres  # noqa: F401

from .conftest import MakeStore
from .harness import Store, eventually
from .postgres_server import shared_cluster


@pytest.fixture
def url() -> Iterator[str]:
    with shared_cluster().database() as database:
        yield database


async def health(store: Store) -> tuple[int, dict[str, Any]]:
    """The health answer's status and body, the body checked against the OpenAPI document."""
    response = await store.client.get("/_api/v1/health")
    body = await response.json()
    document = await (await store.client.get("/_api/v1/openapi.json")).json()
    jsonschema.validate(body, document["components"]["schemas"]["Health"])
    assert response.headers["Cache-Control"] == "no-store"
    return response.status, body


async def test_a_node_on_postgresql_reports_its_database_and_storage(
    make_store: MakeStore, url: str, tmp_path: Path
) -> None:
    store = await make_store(state_url=url, node_id="node-a", root=tmp_path / "mnt", state_dir=tmp_path / "mnt" / ".ds")
    status, body = await health(store)
    assert status == 200, body
    assert (body["status"], body["node"], body["state"]) == ("ok", "node-a", "postgresql")
    assert body["database"]["reachable"] is True and body["database"]["error"] is None
    assert 0 <= body["database"]["round_trip_ms"] < 2000
    storage = body["storage"]
    assert (storage["writable"], storage["staging_same_filesystem"], storage["space_low"]) == (True, True, False)
    assert storage["free_bytes"] > 0
    # The look at the storage leaves nothing behind in staging.
    assert list((tmp_path / "mnt" / ".ds" / "staging").iterdir()) == []


async def test_a_node_whose_postgresql_is_out_of_reach_is_503_until_it_is_back(make_store: MakeStore, url: str) -> None:
    store = await make_store(state_url=url)
    assert (await health(store))[0] == 200
    database = url.rsplit("/", 1)[1]
    admin = shared_cluster().url("postgres")

    def cut(allow: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allow).lower()}')
            if not allow:
                db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
                    " AND pid <> pg_backend_pid()",
                    (database,),
                )

    await asyncio.to_thread(cut, False)
    answers: list[tuple[int, dict[str, Any]]] = []

    async def failing() -> bool:
        answers.append(await health(store))
        return answers[-1][0] == 503

    try:
        # Within the reuse of a recent check (health.STORAGE_STALE), the balancer hears of it.
        await eventually(failing, "the node reports its database out of reach", timeout=10.0)
        body = answers[-1][1]
        assert body["status"] == "failing"
        assert body["database"]["reachable"] is False and body["database"]["round_trip_ms"] is None
        assert body["database"]["error"]
        # The storage is fine: only the database fails.
        assert body["storage"]["writable"] is True
    finally:
        await asyncio.to_thread(cut, True)

    async def healthy() -> bool:
        return (await health(store))[0] == 200

    # The pool reconnects by itself (with its own backoff): the node comes back without a restart.
    await eventually(healthy, "the node reports its database reachable again", timeout=60.0)


async def test_a_node_whose_storage_is_gone_is_503_until_it_is_back(make_store: MakeStore, tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    store = await make_store(root=mount, state_dir=mount / ".datastore")
    assert (await health(store))[0] == 200
    # The shared filesystem is no longer mounted: its mount point is an empty folder.
    for entry in list(mount.iterdir()):
        shutil.rmtree(entry)

    async def status_is(wanted: int) -> bool:
        return (await health(store))[0] == wanted

    await eventually(lambda: status_is(503), "the node reports its storage failing", timeout=10.0)
    _, body = await health(store)
    assert body["storage"]["writable"] is False and body["storage"]["error"]
    assert body["database"]["reachable"] is True
    (mount / ".datastore").mkdir()
    await eventually(lambda: status_is(200), "the node reports its storage back", timeout=10.0)


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than the tests' temporary folder: POSIX shared memory (tmpfs on Linux)."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        assert Path(folder).stat().st_dev != tmp_path.stat().st_dev
        yield Path(folder)


@pytest.mark.parametrize("shared", [False, True], ids=["sqlite-reported", "postgresql-503"])
async def test_staging_on_another_filesystem_is_reported_and_fails_a_shared_state(
    make_store: MakeStore, url: str, tmp_path: Path, elsewhere: Path, shared: bool
) -> None:
    settings: dict[str, Any] = {"state_url": url} if shared else {}
    store = await make_store(root=tmp_path / "files", state_dir=elsewhere, **settings)
    status, body = await health(store)
    assert body["storage"]["staging_same_filesystem"] is False
    assert body["storage"]["writable"] is True
    assert status == (503 if shared else 200), body


async def test_a_full_disk_is_reported_but_keeps_the_node_in(make_store: MakeStore) -> None:
    store = await make_store(min_free_bytes=1 << 60)
    status, body = await health(store)
    assert status == 200, body
    assert body["storage"]["space_low"] is True
