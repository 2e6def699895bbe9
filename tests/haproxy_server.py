"""A real HAProxy in front of store nodes, as an operator would put one: HTTP mode, round robin on
every request with no stickiness, health checks on ``/_api/v1/health`` that take a dead node out
within a second, and long timeouts for event streams and slow uploads: the configuration of
``docs/haproxy.cfg``, which this module renders, so that the deployment guide's file is the tested one.

:func:`start_haproxy` writes the configuration into a test's folder and runs Debian's ``haproxy`` in
the foreground on a loopback port the kernel picked; :meth:`Balancer.stop` ends it by its PID.
Nothing waits by sleeping: the balancer is ready when it accepts a connection (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest


def haproxy_binary() -> str:
    """Debian's haproxy; the test fails (never skips) without it."""
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if found is None:
        pytest.fail("haproxy not found: run 'make test' (it installs Debian's haproxy), or apt-get install haproxy")
    return found


@dataclass
class Balancer:
    """A running HAProxy: its URL and process."""

    url: str
    process: asyncio.subprocess.Process
    config: Path

    async def stop(self) -> None:
        """End it by its PID and wait for it."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            await self.process.wait()


#: The configuration the deployment guide gives operators (``docs/haproxy.cfg``): the tests run that
#: very file, its placeholders filled in.
TEMPLATE = Path(__file__).resolve().parent.parent / "docs" / "haproxy.cfg"


def configuration(port: int, nodes: Sequence[tuple[str, int]]) -> str:
    """HAProxy's configuration: ``docs/haproxy.cfg`` listening on loopback ``port``, round robin over
    ``nodes`` (host, port), named ``node0``, ``node1``..."""
    servers = "\n".join(f"    server node{i} {host}:{node_port} check" for i, (host, node_port) in enumerate(nodes))
    text = TEMPLATE.read_text()
    for placeholder in ("{bind}", "{servers}"):
        if text.count(placeholder) != 1:
            pytest.fail(f"{TEMPLATE} must hold its placeholder {placeholder} once")
    return text.replace("{bind}", f"127.0.0.1:{port}").replace("{servers}", servers)


async def start_haproxy(
    folder: Path, nodes: Sequence[tuple[str, int]], *, port: int | None = None, timeout: float = 20.0
) -> Balancer:
    """HAProxy on loopback ``port`` (default a free one) in front of ``nodes``, ready to take connections."""
    port = port or free_port()
    config = folder / "haproxy.cfg"
    config.write_text(configuration(port, nodes))
    # Its request log (one line per request: which node served it) goes to haproxy.log beside it.
    with (folder / "haproxy.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            haproxy_binary(), "-db", "-f", str(config), stdout=log, stderr=asyncio.subprocess.STDOUT
        )
    balancer = Balancer(f"http://127.0.0.1:{port}", process, config)
    try:
        async with asyncio.timeout(timeout):
            while True:
                if process.returncode is not None:
                    pytest.fail(f"haproxy exited ({process.returncode}); its configuration: {config}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.02)  # not listening yet: look again (bounded by the timeout)
                    continue
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return balancer
    except BaseException:
        await balancer.stop()
        raise


#: Ports free_port handed out in this process: never handed out twice (a node may not have bound it yet).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now (for a balancer whose URL the nodes must know first).

    Taken below the kernel's range of ephemeral ports: a port from that range (what binding port 0
    gives) may become the source port of any outgoing connection (to PostgreSQL, a balancer's health
    check) before the node that was meant to listen on it binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    chooser = random.Random()
    for _ in range(1000):
        port = chooser.randrange(10_000, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise AssertionError(f"no free loopback port between 10000 and {low}")
