"""Several ``datastore serve`` nodes behind a real HAProxy, as the scale-out deployment runs them.

:func:`start_cluster` starts N nodes on loopback that share only one PostgreSQL database (a fresh one
of the session's cluster, ``postgres_server.py``) and one storage root (so one staging folder,
ROOT/.datastore/staging), each with its own ``--node-id``, ``--trusted-proxy 127.0.0.1`` and the
balancer's URL as its public one; then HAProxy (``haproxy_server.py``, rendering ``docs/haproxy.cfg``:
round robin on every request, no stickiness, ``option forwardfor``) in front of them. A node can be
killed with ``kill -9`` by its PID and started again on the same port; at the end every process is
stopped by its PID and the database dropped. Each node's log is ``node-ID.log`` in the folder, and
the balancer's request log ``haproxy.log``.

Which node holds an upload is read where the nodes themselves keep it: the lease
(``transfer_files.claimed_by`` = ``NODE:PID``) in the shared database. Which node answered a request
is in its ``X-Datastore-Node`` header. Nothing waits by sleeping: every wait is for a condition, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psycopg
from psycopg.rows import dict_row

from .haproxy_server import Balancer, free_port, start_haproxy
from .harness import eventually, spawn_serve
from .postgres_server import shared_cluster

#: The header a node names itself in (``datastore/http/server.py``).
NODE_HEADER = "X-Datastore-Node"
#: Seconds a start, a stop or a wait for the cluster may take before the test fails.
WAIT = 60.0


@dataclass
class Node:
    """One ``datastore serve`` process of the cluster, and how to start it again on its port."""

    node_id: str
    port: int
    args: tuple[str, ...]
    env: dict[str, str]
    log: Path
    process: asyncio.subprocess.Process | None = None
    #: The PIDs it ran as, oldest first.
    pids: list[int] = field(default_factory=list)

    @property
    def base(self) -> str:
        """The node's own URL (tests go through the balancer; this is for looking at one node)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def holder(self) -> str:
        """Who the running process is in the leases it holds (``NODE:PID``)."""
        assert self.process is not None
        return f"{self.node_id}:{self.process.pid}"

    async def start(self) -> None:
        """Start the node on its port; returns once it serves."""
        with self.log.open("ab") as log:
            self.process, _ = await spawn_serve(
                *self.args, "--port", str(self.port), env=self.env, stderr=log, timeout=WAIT
            )
        self.pids.append(self.process.pid)

    async def kill(self) -> None:
        """``kill -9`` by its PID: no cleanup of any kind; returns once it is gone."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), WAIT)

    async def stop(self) -> None:
        """SIGTERM by its PID (then SIGKILL if it lingers), and wait for it."""
        if self.process is None or self.process.returncode is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), WAIT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            await self.process.wait()


@dataclass
class Cluster:
    """Running nodes, the balancer in front of them, and what they share."""

    folder: Path
    root: Path
    state_url: str
    nodes: list[Node]
    balancer: Balancer

    @property
    def url(self) -> str:
        """The balancer's URL: the store's, as clients reach it."""
        return self.balancer.url

    @property
    def staging(self) -> Path:
        """The staging folder every node shares."""
        return self.root / ".datastore" / "staging"

    @property
    def served(self) -> Path:
        """The folder of the prefix ``files``."""
        return self.root / "files"

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)

    def node_of(self, holder: str) -> Node:
        """The node whose running process is ``holder`` (``NODE:PID``)."""
        return self.node(holder.split(":", 1)[0])

    def staged_size(self, key: str, num: int = 0) -> int:
        """Bytes staged for file ``num`` of ``key`` (0 if nothing is)."""
        try:
            return (self.staging / f"{key}.{num}.part").stat().st_size
        except FileNotFoundError:
            return 0

    async def query(self, sql: str, params: tuple[object, ...] = ()) -> list[dict[str, object]]:
        """Rows of a read of the shared database (what the nodes recorded)."""
        async with await psycopg.AsyncConnection.connect(self.state_url, row_factory=dict_row) as db:
            cursor = await db.execute(sql, params)  # type: ignore[arg-type]
            return list(await cursor.fetchall())

    async def holder_of(self, key: str, num: int = 0) -> str | None:
        """Who holds the lease of an UPLOADING file (``NODE:PID``), or None."""
        rows = await self.query(
            "SELECT claimed_by FROM transfer_files WHERE key = %s AND num = %s AND state = 'UPLOADING'", (key, num)
        )
        return str(rows[0]["claimed_by"]) if rows and rows[0]["claimed_by"] is not None else None

    async def wait_holder(self, key: str, num: int = 0) -> Node:
        """The node that holds the upload of file ``num`` of ``key``, once one does."""
        found: list[str] = []

        async def held() -> bool:
            holder = await self.holder_of(key, num)
            if holder is not None:
                found.append(holder)
            return holder is not None

        await eventually(held, f"a node holds the upload {key[:8]}…/{num}", WAIT)
        return self.node_of(found[-1])

    async def restart(self, node: Node) -> None:
        """Start a killed (or stopped) node again on the same port; returns once the balancer sends it
        requests again (its health check passed)."""
        await node.start()
        await self.wait_in_rotation(node)

    async def wait_in_rotation(self, node: Node) -> None:
        """Wait until the balancer sends ``node`` requests (its health check passed): one round of the
        round robin through the balancer reaches it."""

        async def answers() -> bool:
            return node.node_id in await self.answering(2 * len(self.nodes))

        await eventually(answers, f"the balancer sends requests to {node.node_id}", WAIT)

    async def answering(self, requests: int) -> list[str]:
        """The nodes that answer ``requests`` health requests sent one after another through the balancer."""
        names = []
        async with aiohttp.ClientSession(self.url) as session:
            for _ in range(requests):
                async with session.get("/_api/v1/health") as response:
                    if response.status == 200:
                        names.append(response.headers[NODE_HEADER])
        return names


@contextlib.asynccontextmanager
async def start_cluster(
    folder: Path, count: int = 3, *, env: Mapping[str, str] | None = None
) -> AsyncIterator[Cluster]:
    """``count`` nodes sharing a new database and ``folder/root``, behind HAProxy; all stopped by PID
    at the end (and the database dropped)."""
    root = folder / "root"
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    with shared_cluster().database() as state_url:
        node_env = {"DATASTORE_PUBLIC_URL": public, **(env or {})}
        nodes = [
            Node(
                f"node-{letter}",
                free_port(),
                (
                    "--root",
                    str(root),
                    "--state",
                    state_url,
                    "--node-id",
                    f"node-{letter}",
                    "--trusted-proxy",
                    "127.0.0.1",
                ),
                node_env,
                folder / f"node-{letter}.log",
            )
            for letter in "abcdefgh"[:count]
        ]
        balancer: Balancer | None = None
        try:
            # One first, so that the schema is migrated once before the others start.
            await nodes[0].start()
            await asyncio.gather(*(node.start() for node in nodes[1:]))
            balancer = await start_haproxy(folder, [("127.0.0.1", node.port) for node in nodes], port=port)
            cluster = Cluster(folder, root, state_url, nodes, balancer)
            for node in nodes:
                await cluster.wait_in_rotation(node)
            yield cluster
        finally:
            if balancer is not None:
                await balancer.stop()
            await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)
