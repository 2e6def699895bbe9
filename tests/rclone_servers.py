"""A real ``rclone serve webdav`` for tests of the rclone driver, and the rclone configuration that
names it (with the remotes the driver must refuse beside it).

The server listens on a port the kernel picks (``--addr 127.0.0.1:0``); its address is read from
the line it logs once it listens, so no test waits by sleeping. :meth:`WebDav.stop` ends it by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

#: The line ``rclone serve webdav`` logs once it listens.
STARTED = re.compile(rb"WebDav Server started on (http://127\.0\.0\.1:\d+/)")

#: The password in the configuration's ``davpw`` remote, which no message may show.
PASSWORD = "s3cret-in-the-config"


def rclone_binary() -> str:
    """Debian's rclone; the test fails (never skips) without it."""
    found = shutil.which("rclone")
    if found is None:
        pytest.fail("rclone not found: run 'make test' (it installs Debian's rclone) or 'apt-get install rclone'")
    return found


@dataclass
class WebDav:
    """A running ``rclone serve webdav ROOT`` and a configuration file naming it ``dav``."""

    process: asyncio.subprocess.Process
    root: Path
    url: str
    config: Path
    _drain: asyncio.Task[None]

    async def stop(self) -> None:
        """End the server (by its PID) and wait for it."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            await self.process.wait()
        self._drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drain


async def start_webdav(folder: Path, timeout: float = 20.0) -> WebDav:
    """``rclone serve webdav`` of ``folder/root`` on loopback, and ``folder/rclone.conf``: ``dav`` (it),
    ``davpw`` (it, with a password in the URL), ``disk`` (type local) and ``wrapped`` (an alias)."""
    root = folder / "root"
    root.mkdir(parents=True, exist_ok=True)
    empty = folder / "serve.conf"
    empty.write_text("")
    process = await asyncio.create_subprocess_exec(
        rclone_binary(),
        "serve",
        "webdav",
        str(root),
        "--addr",
        "127.0.0.1:0",
        # The tests change the folder behind the server's back: it must not answer from a cache.
        "--dir-cache-time",
        "0s",
        "--config",
        str(empty),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    stderr = process.stderr
    log = b""
    try:
        async with asyncio.timeout(timeout):
            while not (found := STARTED.search(log)):
                line = await stderr.readline()
                if not line:
                    raise AssertionError(f"rclone serve webdav ended: {log.decode(errors='replace')}")
                log += line
    except BaseException:
        process.kill()
        await process.wait()
        raise
    url = found[1].decode()

    async def drain() -> None:
        while await stderr.read(1 << 16):
            pass

    config = folder / "rclone.conf"
    config.write_text(
        f"[dav]\ntype = webdav\nurl = {url}\nvendor = other\n\n"
        f"[davpw]\ntype = webdav\nurl = {url.replace('http://', f'http://user:{PASSWORD}@')}\nvendor = other\n\n"
        "[disk]\ntype = local\n\n"
        f"[wrapped]\ntype = alias\nremote = {folder}\n"
    )
    return WebDav(process, root, url, config, asyncio.create_task(drain()))
