"""``datastore serve --workers N``: several processes serving the same port(s) and the same state.

The supervisor (the process the user started) recovers the state once,
holds each port (a bound, not listening, ``SO_REUSEPORT`` socket, which
also turns port 0 into a real one), and starts N worker processes. Each
worker builds the server from the same settings and listens on the same
ports with ``SO_REUSEPORT``, so the kernel spreads connections over them.

The workers share the transfer registry and the catalogues (SQLite in WAL
mode, every change in one ``BEGIN IMMEDIATE`` transaction), so any request
of a transfer may land on any worker: a claim names the worker holding it,
a hash state cached by one worker is used only if no other claimed the
file since (else the staged bytes are re-hashed), and a request that must
stop an upload running on another worker (a newer PATCH superseding a
hanging one, a cancellation, an expiry) does so through the registry, which
the running upload watches.

When a worker dies, the supervisor ends its claims (keeping the bytes its
uploads really staged, as a restart would) and starts another in its
place, after a pause that grows while workers keep dying. SIGTERM or SIGINT
stops every worker (each lets its running requests end) and then itself;
SIGHUP is passed on (the TLS server reloads its CRL).

Metrics: the workers count into files of their own in ``STATE_DIR/metrics``
(``prometheus_client``'s multiprocess mode, which the supervisor turns on for
them, emptying the directory first), so that the metrics page sums every
worker whichever answers; a dead worker's gauges leave the sums (its counters
stay). Workers are spawned, never forked: each imports ``prometheus_client``
afresh, in the environment that names the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from .. import metrics
from ..config import Settings
from ..lifecycle.machine import Lifecycle, holder_id
from ..security.logsafe import log_to_stderr
from ..state import open_state
from .connections import bind_socket
from .server import make_server

log = logging.getLogger(__name__)

#: How long workers get to start, and to stop after SIGTERM, before the supervisor gives up on them.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
#: Pause before a dead worker is replaced: doubled while workers keep dying young, up to the maximum.
RESTART_PAUSE = 0.5
RESTART_PAUSE_MAX = 30.0
#: A worker that ran this long before it died was not dying young.
HEALTHY_AFTER = 30.0


def run_workers(settings: Settings, log_level: int, on_ready: Callable[[list[str]], None]) -> int:
    """Supervise ``settings.workers`` worker processes until SIGTERM or SIGINT; returns the exit status.

    Raises OSError when a port cannot be taken.
    """
    asyncio.run(_recover(settings))
    holders, settings = _hold_ports(settings)
    previous = os.environ.get(metrics.MULTIPROC_ENV)
    try:
        metrics.use_multiprocess_dir(settings.effective_state_dir / "metrics")
        return _Supervisor(settings, log_level).run(on_ready)
    finally:
        for holder in holders:
            holder.close()
        if previous is None:
            os.environ.pop(metrics.MULTIPROC_ENV, None)
        else:
            os.environ[metrics.MULTIPROC_ENV] = previous


async def _recover(settings: Settings) -> None:
    settings.root.mkdir(parents=True, exist_ok=True)
    async with _lifecycle(settings) as lifecycle:
        await lifecycle.recover()


@contextlib.asynccontextmanager
async def _lifecycle(settings: Settings) -> AsyncIterator[Lifecycle]:
    """The shared state's lifecycle, opened for one piece of the supervisor's work."""
    state = open_state(settings.effective_state_url)
    try:
        holder = holder_id(settings.effective_node_id, os.getpid())
        yield Lifecycle(settings, state, {}, settings.effective_state_dir / "staging", holder=holder)
    finally:
        await state.close()


def _hold_ports(settings: Settings) -> tuple[list[socket.socket], Settings]:
    """Bind every port the settings name (port 0: a free one); the settings with the real ports."""
    holders: list[socket.socket] = []
    try:
        port = _hold(settings.host, settings.port, holders)
        tls_port = _hold(settings.host, settings.tls_port, holders) if settings.tls_port is not None else None
    except BaseException:
        for holder in holders:
            holder.close()
        raise
    return holders, dataclasses.replace(settings, port=port, tls_port=tls_port)


def _hold(host: str, port: int, holders: list[socket.socket]) -> int:
    holder = bind_socket(host, port, reuse_port=True)
    holders.append(holder)
    return int(holder.getsockname()[1])


class _Supervisor:
    def __init__(self, settings: Settings, log_level: int) -> None:
        self.settings = settings
        self.log_level = log_level
        self.context = multiprocessing.get_context("spawn")
        self.ready: Any = self.context.Queue()
        self.workers: dict[int, BaseProcess] = {}
        self.started_at: dict[int, float] = {}
        self.pause = RESTART_PAUSE
        self.stopping = False
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_write, False)
        self.hangups = 0

    def run(self, on_ready: Callable[[list[str]], None]) -> int:
        previous = {
            signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            for index in range(self.settings.workers):
                self._start(index)
            urls = self._await_ready()
            if urls is None:
                return 1
            on_ready(urls)
            self._supervise()
            return 0
        finally:
            self._stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(self.wake_read)
            os.close(self.wake_write)
            self.ready.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.hangups += 1
        else:
            self.stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_write, b"\0")

    def _start(self, index: int) -> None:
        process = self.context.Process(
            target=worker_main,
            args=(self.settings, index, self.log_level, self.ready),
            name=f"datastore-worker-{index}",
            daemon=False,
        )
        process.start()
        self.workers[index] = process
        self.started_at[index] = time.monotonic()

    def _await_ready(self) -> list[str] | None:
        """Wait until every worker listens; None if one died first or a signal came."""
        waiting = set(self.workers)
        urls: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT
        while waiting and not self.stopping:
            try:
                index, worker_urls = self.ready.get(timeout=0.1)
            except queue.Empty:
                dead = [i for i in waiting if not self.workers[i].is_alive()]
                if dead:
                    log.error("worker %d exited while starting (status %s)", dead[0], self.workers[dead[0]].exitcode)
                    return None
                if time.monotonic() > deadline:
                    log.error("workers did not start within %g s", START_TIMEOUT)
                    return None
                continue
            waiting.discard(index)
            urls = worker_urls
        return None if self.stopping else urls

    def _supervise(self) -> None:
        hangups_sent = 0
        while not self.stopping:
            sentinels = {process.sentinel: index for index, process in self.workers.items()}
            wait([*sentinels, self.wake_read])
            with contextlib.suppress(BlockingIOError):
                os.set_blocking(self.wake_read, False)
                os.read(self.wake_read, 64)
            self._drain_ready()
            if self.stopping:
                return
            if self.hangups != hangups_sent:
                hangups_sent = self.hangups
                for process in self.workers.values():
                    if process.pid is not None and process.is_alive():
                        os.kill(process.pid, signal.SIGHUP)
            for index, process in list(self.workers.items()):
                if not process.is_alive():
                    self._replace(index, process)

    def _replace(self, index: int, process: BaseProcess) -> None:
        lived = time.monotonic() - self.started_at[index]
        log.warning("worker %d (pid %s) exited with status %s; starting another", index, process.pid, process.exitcode)
        process.join()
        if process.pid is not None:
            metrics.worker_died(process.pid)
        try:
            assert process.pid is not None
            released = asyncio.run(self._release(holder_id(self.settings.effective_node_id, process.pid)))
        except Exception:
            log.exception("releasing the uploads of worker %d failed", index)
        else:
            if released:
                log.info("%d upload(s) of worker %d can resume from their staged bytes", released, index)
        if lived >= HEALTHY_AFTER:
            self.pause = RESTART_PAUSE
        deadline = time.monotonic() + self.pause
        self.pause = min(self.pause * 2, RESTART_PAUSE_MAX)
        while not self.stopping and time.monotonic() < deadline:
            wait([self.wake_read], timeout=deadline - time.monotonic())
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_read, 64)
        if not self.stopping:
            self._start(index)

    async def _release(self, holder: str) -> int:
        """A worker died: its leases end now (they would run out by themselves, but later)."""
        async with _lifecycle(self.settings) as lifecycle:
            return await lifecycle.recover_holder(holder)

    def _drain_ready(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.ready.get_nowait()

    def _stop_all(self) -> None:
        for process in self.workers.values():
            if process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in self.workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker %s did not stop within %g s; killing it", process.name, STOP_TIMEOUT)
                process.kill()
                process.join()


def worker_main(settings: Settings, index: int, log_level: int, ready: Any) -> None:
    """The body of worker ``index``: serve until SIGTERM, reporting its URLs on ``ready`` once listening."""

    log_to_stderr(log_level, f"worker-{index}")
    # Ctrl-C reaches the whole process group; the supervisor decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = make_server(settings)
    server.worker_index = index
    server.shared_state = True
    server.run(on_ready=lambda urls: ready.put((index, urls)), signals=(signal.SIGTERM,))
