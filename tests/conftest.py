"""Fixtures: a real store on loopback, and a guard against blocking the loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

from datastore.handlers.directory import DirectoryHandler
from datastore.http.server import HTTPTransferServer

from .harness import Store, make_settings
from .postgres_server import stop_shared


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the PostgreSQL cluster the session started, if it started one."""
    stop_shared()


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any test in which datastore makes a blocking call on the event loop's thread."""
    with blockbuster_ctx("datastore") as guard:
        # The one deliberate exception: a remembered download is checked with one lstat on the loop.
        guard.functions["os.stat"].can_block_in("datastore/handlers/directory.py", "_lstat")
        yield guard


class MakeStore(Protocol):
    def __call__(
        self,
        handler: Any = None,
        *,
        prefix: str = "files",
        root: Path | None = None,
        state_dir: Path | None = None,
        **settings: Any,
    ) -> Awaitable[Store]: ...


@pytest.fixture
def make_store(aiohttp_client: Callable[..., Awaitable[Any]], tmp_path: Path) -> MakeStore:
    """Start a store on loopback. With no handler, a DirectoryHandler on ROOT/PREFIX.

    ``root`` and ``state_dir`` default to folders under tmp_path, so two
    calls with the same folders model a restart of the same store.
    """

    async def start(
        handler: Any = None,
        *,
        prefix: str = "files",
        root: Path | None = None,
        state_dir: Path | None = None,
        **settings: Any,
    ) -> Store:
        root = root or tmp_path / "root"
        state_dir = state_dir or tmp_path / "state"
        server = HTTPTransferServer(make_settings(root, state_dir, **settings))
        if handler is None:
            handler = DirectoryHandler(root / prefix, catalogue=state_dir / "catalogue" / f"{prefix}.sqlite3")
        server.register_prefix(prefix, handler)
        client = await aiohttp_client(server.create_app())
        return Store(client=client, server=server, root=root, state_dir=state_dir, handler=handler, prefix=prefix)

    return start
