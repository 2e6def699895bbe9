"""The metrics page, ``GET /_api/v1/metrics``: what it counts, that Prometheus reads it, who may read it.

Counts are checked exactly against scripted runs of a real ``datastore serve`` (a fresh process, so
that nothing else counted before): uploads and downloads of known sizes, a Range, a 404, refused
connections; and with ``--workers 2``, that whichever worker answers reports the sum of both, and
that a dead worker's gauges leave the page while its counters stay. Every page is checked by
Debian's ``promtool check metrics``; a machine without it fails these tests (``make test`` unpacks it
from Debian's prometheus package), it never skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from datastore import metrics
from datastore.config import SettingsError, load_settings
from datastore.http.context import CONTEXT
from datastore.http.metrics_page import METRICS_PATH, _from_loopback
from datastore.security.policy import Policy

from .conftest import MakeStore
from .harness import json_manifest, spawn_serve

TUS = {"Tus-Resumable": "1.0.0"}

#: One series: (sample name, its labels).
Series = tuple[str, frozenset[tuple[str, str]]]


@pytest.fixture(autouse=True)
def no_inherited_multiprocess_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stores started here count as they would for an operator who set nothing."""
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)


def parse(page: str) -> dict[Series, float]:
    """Every sample of a page, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


def value(page: dict[Series, float], name: str, **labels: str) -> float:
    return page[(name, frozenset(labels.items()))]


def promtool() -> str:
    """Debian's promtool: on PATH, or unpacked into the venv by ``make promtool``."""
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if found is None:
        raise AssertionError("promtool is missing: run 'make promtool' (it unpacks Debian's) or install prometheus")
    return found


async def assert_promtool_accepts(page: str) -> None:
    process = await asyncio.create_subprocess_exec(
        promtool(),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        output, _ = await process.communicate(page.encode())
    assert process.returncode == 0, output.decode()
    assert output.decode().strip() == ""


# -- the lifecycle's metrics ----------------------------------------------------------------------------


async def test_the_lifecycle_metrics_count_bounded_labels_and_promtool_accepts_them() -> None:
    metrics.upload_ended("completed")
    metrics.upload_ended("failed", "checksum_mismatch")
    metrics.upload_ended("interrupted", "a message a client wrote: /etc/passwd")  # never a label
    metrics.event_emitted("upload.completed")
    metrics.event_subscriber_dropped()
    metrics.set_hook_backlog(0, 5)
    metrics.hook_delivery(0, "delivered")
    metrics.hook_delivery(1, "dropped")
    with pytest.raises(ValueError, match="is none of"):
        metrics.upload_ended("exploded")
    with pytest.raises(ValueError, match="by its number"):
        metrics.set_hook_backlog("https://user:secret@hooks.example/x", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is none of"):
        metrics.hook_delivery(0, "maybe")

    text = metrics.render(metrics.StoreGauges(0, 0, 1, 2)).decode()

    page = parse(text)
    assert value(page, "datastore_uploads_total", outcome="completed", reason="none") >= 1
    assert value(page, "datastore_uploads_total", outcome="failed", reason="checksum_mismatch") >= 1
    assert value(page, "datastore_uploads_total", outcome="interrupted", reason="other") >= 1
    assert value(page, "datastore_events_total", type="upload.completed") >= 1
    assert value(page, "datastore_event_subscribers_dropped_total") >= 1
    assert value(page, "datastore_hook_backlog_events", hook="0") == 5
    assert value(page, "datastore_hook_deliveries_total", hook="1", outcome="dropped") >= 1
    assert "secret" not in text and "passwd" not in text
    assert "_created" not in text
    await assert_promtool_accepts(text)


# -- who may read it ----------------------------------------------------------------------------------


async def issue(store: Any, subject: str, *actions: str) -> dict[str, str]:
    issued = await store.client.app[CONTEXT].tokens.create(subject, actions)
    return {"Authorization": f"Bearer {issued.token}"}


async def test_only_administrators_and_metrics_tokens_read_the_page_by_default(make_store: MakeStore) -> None:
    store = await make_store(policy=Policy(), trust_client_dn=True)
    admin, scraper = await issue(store, "root", "admin"), await issue(store, "prometheus", "metrics")
    reader = await issue(store, "ada", "read", "upload")

    async def status(headers: dict[str, str]) -> int:
        async with store.client.get(METRICS_PATH, headers=headers) as response:
            await response.read()
            return response.status

    assert await status({}) == 401
    assert await status({"X-Client-DN": "/O=Lab/CN=Ada"}) == 403
    assert await status(reader) == 403
    assert await status({"Authorization": "Bearer dst_000000000000_" + "x" * 43}) == 401
    assert await status(admin) == 200
    assert await status(scraper) == 200
    # A metrics token allows nothing else.
    async with store.client.get("/files/", headers={**scraper, "Accept": "application/json"}) as response:
        assert response.status == 403


@pytest.mark.parametrize("access", ["loopback", "anyone"])
async def test_the_setting_opens_the_page_to_anonymous_clients(make_store: MakeStore, access: str) -> None:
    store = await make_store(policy=Policy(), trust_client_dn=False, metrics_access=access)

    async with store.client.get(METRICS_PATH) as response:
        assert response.status == 200
        assert "datastore_disk_free_bytes" in await response.text()


@pytest.mark.parametrize(
    ("proxies", "forwarded", "status"),
    [
        pytest.param(("127.0.0.1",), "203.0.113.9", 401, id="a-trusted-balancer-forwards-a-remote-client"),
        pytest.param(("127.0.0.0/8",), "198.51.100.1, 127.0.0.1", 200, id="the-entry-the-balancer-wrote-counts"),
        pytest.param(("127.0.0.1",), None, 200, id="the-balancer-itself"),
        pytest.param(("10.0.0.0/8",), "203.0.113.9", 200, id="an-untrusted-peer-is-not-believed"),
        pytest.param((), "203.0.113.9", 200, id="no-balancer-trusted"),
    ],
)
async def test_behind_a_trusted_balancer_loopback_means_the_client_it_saw(
    make_store: MakeStore, proxies: tuple[str, ...], forwarded: str | None, status: int
) -> None:
    store = await make_store(policy=Policy(), trust_client_dn=False, metrics_access="loopback", trusted_proxies=proxies)

    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    async with store.client.get(METRICS_PATH, headers=headers) as response:
        assert response.status == status


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("192.0.2.7", False),
        ("2001:db8::1", False),
    ],
)
def test_loopback_means_the_peer_address_not_a_header(peer: str, loopback: bool) -> None:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (peer, 40000) if name == "peername" else default
    request = make_mocked_request("GET", METRICS_PATH, headers={"X-Forwarded-For": "127.0.0.1"}, transport=transport)

    assert _from_loopback(request) is loopback


def test_metrics_access_is_a_setting_from_file_environment_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "store.toml"
    config.write_text('metrics_access = "loopback"\n')
    assert load_settings().metrics_access == "admins"
    assert load_settings(config_file=config).metrics_access == "loopback"
    assert load_settings(environ={"DATASTORE_METRICS_ACCESS": "anyone"}, config_file=config).metrics_access == "anyone"
    assert (
        load_settings({"metrics_access": "admins"}, {"DATASTORE_METRICS_ACCESS": "anyone"}).metrics_access == "admins"
    )
    with pytest.raises(SettingsError, match="metrics_access must be one of admins, loopback, anyone"):
        load_settings(environ={"DATASTORE_METRICS_ACCESS": "everyone"})


# -- one process: a scripted run, counted exactly ------------------------------------------------------


def durations(page: dict[Series, float]) -> dict[tuple[str, str, str], float]:
    """The count of every latency histogram series: (route, method, status class) -> requests."""
    return {
        (labels["route"], labels["method"], labels["status_class"]): count
        for (name, frozen), count in page.items()
        if name == "datastore_http_request_duration_seconds_count"
        for labels in [dict(frozen)]
    }


class Served:
    """A running ``datastore serve`` and its administrator token."""

    def __init__(self, process: asyncio.subprocess.Process, base: str, state: Path) -> None:
        self.process, self.base, self.state = process, base, state
        self.admin = {"Authorization": f"Bearer {(state / 'admin.token').read_text().strip()}"}

    async def page(self, session: aiohttp.ClientSession | None = None) -> str:
        """The metrics page, on ``session``'s connection or a new one."""
        async with contextlib.AsyncExitStack() as stack:
            if session is None:
                session = await stack.enter_async_context(aiohttp.ClientSession(self.base))
            async with session.get(METRICS_PATH, headers=self.admin) as response:
                assert response.status == 200, await response.text()
                assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                return await response.text()


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> AsyncIterator[Served]:
    state = tmp_path / "state"
    process, (match,) = await spawn_serve(
        "--root",
        str(tmp_path / "root"),
        "--state-dir",
        str(state),
        *args,
        env={"DATASTORE_FSYNC": "false", **(env or {})},
    )
    try:
        yield Served(process, match["base"], state)
    finally:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 60)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Ask ``check`` again until it holds (another process's state), failing after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # noqa: ASYNC110 - another process's state, asked over HTTP
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def test_a_scripted_run_is_counted_exactly_and_promtool_accepts_the_page(tmp_path: Path) -> None:
    files = {
        "small.bin": os.urandom(1000),  # PUT, answered from memory when downloaded
        "large.bin": os.urandom(200_000),  # PUT with Expect: 100-continue, downloaded whole and by a Range
        "form.bin": os.urandom(70_000),  # a browser's form
        "resumed.bin": os.urandom(50_000),  # tus: 20,000 bytes sent so far
        "waiting.bin": os.urandom(30_000),  # nothing sent yet
    }
    async with serve(tmp_path) as served, aiohttp.ClientSession(served.base) as session:
        fresh = parse(await served.page(session))
        assert value(fresh, "datastore_upload_received_bytes_total") == 0
        assert durations(fresh) == {}

        async with session.post("/files/manifest", json=json_manifest(list(files.items()))) as response:
            assert response.status == 201
            key = (await response.json())["transfer_key"]
        async with session.put(f"/files/{key}/0", data=files["small.bin"]) as response:
            assert response.status == 200
        async with session.put(f"/files/{key}/1", data=files["large.bin"], expect100=True) as response:
            assert response.status == 200
        form = aiohttp.FormData()
        form.add_field("file", files["form.bin"], filename="form.bin", content_type="application/octet-stream")
        async with session.post(f"/files/{key}/2", data=form) as response:
            assert response.status == 200
        patch = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        async with session.patch(f"/files/{key}/3", data=files["resumed.bin"][:20_000], headers=patch) as response:
            assert response.status == 204
        async with session.put(f"/files/{key}/4", data=os.urandom(30_000)) as response:
            assert response.status == 405  # not the bytes the manifest declares

        async with session.get("/files/small.bin") as response:
            assert await response.read() == files["small.bin"]
        async with session.get("/files/large.bin") as response:
            assert await response.read() == files["large.bin"]
            etag = response.headers["ETag"]
        async with session.get("/files/large.bin", headers={"Range": "bytes=100-1099"}) as response:
            assert response.status == 206
            assert await response.read() == files["large.bin"][100:1100]
        async with session.get("/files/large.bin", headers={"If-None-Match": etag}) as response:
            assert response.status == 304
        async with session.head("/files/large.bin") as response:  # not a download
            assert response.status == 200
        async with session.get("/files/missing.bin") as response:
            assert response.status == 404
        async with session.get("/files/.hidden") as response:
            assert response.status == 400

        text = await served.page(session)

    page = parse(text)
    assert value(page, "datastore_upload_received_bytes_total") == 1000 + 200_000 + 70_000 + 20_000 + 30_000
    uploads = {
        (dict(labels)["outcome"], dict(labels)["reason"]): count
        for (name, labels), count in page.items()
        if name == "datastore_uploads_total" and count
    }
    assert uploads == {("completed", "none"): 3, ("failed", "checksum_mismatch"): 1}
    events = {
        dict(labels)["type"]: count
        for (name, labels), count in page.items()
        if name == "datastore_events_total" and count and dict(labels)["type"] != "file.progress"
    }
    assert events == {"transfer.created": 1, "file.started": 5, "file.completed": 3, "file.failed": 1}
    assert value(page, "datastore_download_sent_bytes_total") == 1000 + 200_000 + 1000
    downloads = {
        dict(labels)["outcome"]: count for (name, labels), count in page.items() if name == "datastore_downloads_total"
    }
    assert downloads == {
        "ok": 2,
        "partial": 1,
        "not_modified": 1,
        "not_found": 1,
        "bad_request": 1,
        "refused": 0,
        "precondition_failed": 0,
        "range_not_satisfiable": 0,
        "interrupted": 0,
        "error": 0,
    }
    assert durations(page) == {
        ("/_api/v1/metrics", "GET", "2xx"): 1,  # the first look; a page never counts itself
        ("/{prefix}/manifest", "POST", "2xx"): 1,
        ("/{prefix}/{key}/{num}", "PUT", "2xx"): 2,
        ("/{prefix}/{key}/{num}", "PUT", "4xx"): 1,
        ("/{prefix}/{key}/{num}", "POST", "2xx"): 1,
        ("/{prefix}/{key}/{num}", "PATCH", "2xx"): 1,
        ("/{prefix}/{name}", "GET", "2xx"): 3,
        ("/{prefix}/{name}", "GET", "3xx"): 1,
        ("/{prefix}/{name}", "GET", "4xx"): 2,
        ("/{prefix}/{name}", "HEAD", "2xx"): 1,
    }
    bucket = "datastore_http_request_duration_seconds_bucket"
    labels = {"route": "/{prefix}/{name}", "method": "GET", "status_class": "2xx"}
    assert value(page, bucket, **labels, le="+Inf") == 3
    # What the store holds now: the tus file's staged bytes, and what the open transfer may still write.
    assert value(page, "datastore_staged_bytes") == 20_000
    assert value(page, "datastore_reserved_bytes") == (50_000 - 20_000) + 30_000
    assert 0 < value(page, "datastore_disk_free_bytes") <= value(page, "datastore_disk_size_bytes")
    assert value(page, "datastore_uploads_active") == 0
    assert value(page, "datastore_connections_active") >= 1
    await assert_promtool_accepts(text)


async def test_connections_are_counted_open_and_refused(tmp_path: Path) -> None:
    async with serve(tmp_path, env={"DATASTORE_MAX_CONNECTIONS_PER_CLIENT": "3"}) as served:
        host, port = served.base.removeprefix("http://").split(":")
        held = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
        try:
            # A fourth connection from the same address meets the limit: 503, before any request.
            reader, writer = await asyncio.open_connection(host, int(port))
            assert (await reader.readline()).startswith(b"HTTP/1.1 503")
            writer.close()

            # The page, asked on one of the three (the refused one was never counted as open).
            reader, writer = held[0]
            token = served.admin["Authorization"]
            writer.write(f"GET {METRICS_PATH} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\n\r\n".encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            length = int(next(line for line in head.split("\r\n") if line.lower().startswith("content-length:"))[15:])
            text = (await reader.readexactly(length)).decode()
        finally:
            for _, held_writer in held:
                held_writer.close()

    page = parse(text)
    assert value(page, "datastore_connections_active") == 3
    assert value(page, "datastore_connections_refused_total", reason="max_connections_per_client") == 1
    assert value(page, "datastore_connections_refused_total", reason="max_connections") == 0


async def test_an_interrupted_download_counts_what_was_sent_before_it_broke(tmp_path: Path) -> None:
    content = os.urandom(64 << 20)
    async with serve(tmp_path) as served:
        async with aiohttp.ClientSession(served.base) as session:
            async with session.post(
                "/files/manifest", json={"files": [{"name": "big.bin", "size": len(content)}]}
            ) as r:
                key = (await r.json())["transfer_key"]
            async with session.put(f"/files/{key}/0", data=io.BytesIO(content)) as response:
                assert response.status == 200

        host, port = served.base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /files/big.bin HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        received = len(await reader.readexactly(1 << 20))
        writer.transport.abort()  # a reset, as a client that gives up

        async def interrupted() -> bool:
            return value(parse(await served.page()), "datastore_downloads_total", outcome="interrupted") == 1

        await eventually(interrupted, "the download is counted as interrupted")
        page = parse(await served.page())
    sent = value(page, "datastore_download_sent_bytes_total")
    # At least what the client read, less than the file: what went into the connection before it broke.
    assert received <= sent < len(content)
    assert value(page, "datastore_downloads_total", outcome="ok") == 0


# -- several workers --------------------------------------------------------------------------------


async def health_on_a_new_connection(base: str) -> int:
    """Which worker answers a new connection."""
    async with (
        aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get("/_api/v1/health") as response,
    ):
        worker: int = (await response.json())["worker"]
        return worker


async def session_on(base: str, worker: int, asked: list[int]) -> aiohttp.ClientSession:
    """A session whose one connection reaches ``worker``; every health request made is appended to ``asked``."""
    for _ in range(64):
        session = aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=1))
        async with session.get("/_api/v1/health") as response:
            answered = (await response.json())["worker"]
        asked.append(answered)
        if answered == worker:
            return session
        await session.close()
    raise AssertionError(f"no connection reached worker {worker} in 64 attempts")


def worker_pids(state: Path) -> set[int]:
    """The workers now alive, by their live gauges' files in the metrics directory."""
    return {int(path.stem.rsplit("_", 1)[1]) for path in (state / "metrics").glob("gauge_livesum_*.db")}


HEALTH = {"route": "/_api/v1/health", "method": "GET", "status_class": "2xx"}
PUT = {"route": "/{prefix}/{key}/{num}", "method": "PUT", "status_class": "2xx"}
SCRAPE = {"route": METRICS_PATH, "method": "GET", "status_class": "2xx"}


async def test_with_two_workers_every_worker_reports_the_sum_of_both(tmp_path: Path) -> None:
    async with serve(tmp_path, "--workers", "2") as served:
        # Many new connections: the kernel spreads them over both workers.
        asked = [await health_on_a_new_connection(served.base) for _ in range(40)]
        while set(asked) != {0, 1} and len(asked) < 400:
            asked.append(await health_on_a_new_connection(served.base))
        assert set(asked) == {0, 1}, asked
        # Uploads on new connections too: each worker counts the bytes it received.
        sizes = [10_000 + 1000 * index for index in range(8)]
        names = [(f"spread-{index}.bin", os.urandom(size)) for index, size in enumerate(sizes)]
        async with (
            aiohttp.ClientSession(served.base) as session,
            session.post("/files/manifest", json=json_manifest(names)) as response,
        ):
            key = (await response.json())["transfer_key"]
        for num, (_, content) in enumerate(names):
            async with (
                aiohttp.ClientSession(served.base, connector=aiohttp.TCPConnector(force_close=True)) as session,
                session.put(f"/files/{key}/{num}", data=content) as response,
            ):
                assert response.status == 200

        sessions = [await session_on(served.base, 0, asked), await session_on(served.base, 1, asked)]
        try:
            texts = [await served.page(session) for session in sessions]
        finally:
            for session in sessions:
                await session.close()

    pages = [parse(text) for text in texts]
    for page in pages:
        assert value(page, "datastore_http_request_duration_seconds_count", **HEALTH) == len(asked)
        assert value(page, "datastore_upload_received_bytes_total") == sum(sizes)
        assert value(page, "datastore_http_request_duration_seconds_count", **PUT) == len(sizes)
    # The second page, from the other worker, counts the first.
    assert ("datastore_http_request_duration_seconds_count", frozenset(SCRAPE.items())) not in pages[0]
    assert value(pages[1], "datastore_http_request_duration_seconds_count", **SCRAPE) == 1
    for text in texts:
        await assert_promtool_accepts(text)


async def test_a_dead_workers_gauges_leave_the_page_and_its_counters_stay(tmp_path: Path) -> None:
    async with serve(tmp_path, "--workers", "2") as served:
        asked: list[int] = []
        sessions = [await session_on(served.base, 0, asked), await session_on(served.base, 1, asked)]
        try:

            async def two_open() -> bool:
                # The two sessions' connections; those of the probes that missed close meanwhile.
                return value(parse(await served.page(sessions[0])), "datastore_connections_active") == 2

            await eventually(two_open, "only the two sessions' connections are open")
            pids = worker_pids(served.state)
            assert len(pids) == 2
            victim = pids.pop()
            os.kill(victim, signal.SIGKILL)
        finally:
            for session in sessions:
                await session.close()

        async def replaced() -> bool:
            alive = worker_pids(served.state)
            return victim not in alive and len(alive) == 2

        await eventually(replaced, "the supervisor replaced the dead worker")

        async def only_mine_open() -> bool:
            return value(parse(await served.page()), "datastore_connections_active") == 1

        # Without the dead worker's gauges, the one connection open is the page's own.
        await eventually(only_mine_open, "the dead worker's connections left the page")
        page = parse(await served.page())
    # Its counters stay: every health request either worker answered.
    assert value(page, "datastore_http_request_duration_seconds_count", **HEALTH) == len(asked)


async def test_each_answer_says_how_long_it_waited_for_the_state(make_store: MakeStore) -> None:
    store = await make_store()
    key = await store.register([("a.txt", b"abc")])
    response = await store.client.put(f"/files/{key}/0", data=b"abc")
    assert response.status == 200, await response.text()
    # The upload's claim, verification and publication are transactions of the state, timed.
    match = re.fullmatch(r'db;dur=(\d+\.\d\d);desc="(\d+) transactions"', response.headers["Server-Timing"])
    assert match is not None, response.headers["Server-Timing"]
    assert float(match[1]) > 0 and int(match[2]) >= 2
    # A request that asks the state nothing says so.
    response = await store.client.get("/_static/app.js")
    assert response.headers["Server-Timing"] == 'db;dur=0.00;desc="0 transactions"'
