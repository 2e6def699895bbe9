"""A real HAProxy in front of store nodes, as an operator would put one: HTTP mode, round robin on
every request with no stickiness, health checks on ``/_api/v1/health`` that take a dead node out
within a second, and long timeouts for event streams and slow uploads.

:func:`start_haproxy` writes the configuration into a test's folder and runs Debian's ``haproxy`` in
the foreground on a loopback port the kernel picked; :meth:`Balancer.stop` ends it by its PID.
Nothing waits by sleeping: the balancer is ready when it accepts a connection (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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


def configuration(port: int, nodes: Sequence[tuple[str, int]]) -> str:
    """HAProxy's configuration: ``port`` on loopback, round robin over ``nodes`` (host, port)."""
    servers = "\n".join(
        f"    server node{i} {host}:{node_port} check inter 300ms fall 1 rise 1"
        for i, (host, node_port) in enumerate(nodes)
    )
    return f"""global
    maxconn 2000

defaults
    mode http
    option httplog
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout tunnel 1h
    # A request the node dropped as it died is not sent again (it may have been a PATCH).
    retries 0

frontend store
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance roundrobin
    option httpchk GET /_api/v1/health
{servers}
"""


async def start_haproxy(
    folder: Path, nodes: Sequence[tuple[str, int]], *, port: int | None = None, timeout: float = 20.0
) -> Balancer:
    """HAProxy on loopback ``port`` (default a free one) in front of ``nodes``, ready to take connections."""
    port = port or free_port()
    config = folder / "haproxy.cfg"
    config.write_text(configuration(port, nodes))
    process = await asyncio.create_subprocess_exec(
        haproxy_binary(), "-db", "-f", str(config), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
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


def free_port() -> int:
    """A loopback port nobody listens on now (for a balancer whose URL the nodes must know first)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
