"""The store's metrics (datastore/metrics.py) and the page that shows them.

Every page is checked by Debian's ``promtool check metrics``; a machine without it fails these
tests (``make test`` unpacks it from Debian's prometheus package), it never skips them.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from datastore import metrics
from datastore.config import SettingsError, load_settings
from datastore.http.context import CONTEXT
from datastore.http.metrics_page import METRICS_PATH, _from_loopback
from datastore.security.policy import Policy

from .conftest import MakeStore

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
