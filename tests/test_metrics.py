"""The store's metrics (datastore/metrics.py) and the page that shows them.

Every page is checked by Debian's ``promtool check metrics``; a machine without it fails these
tests (``make test`` unpacks it from Debian's prometheus package), it never skips them.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from datastore import metrics

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
