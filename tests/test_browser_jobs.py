"""The page's transfer jobs in a real headless Chromium (Debian's), driven by Playwright.

A job copies a file within the store (``local:`` ends), slowly (its ``bandwidth``), so that the
page shows it running; the test waits on the page's DOM (bounded), never on a clock.
"""

from __future__ import annotations

import os
from typing import Any

from playwright.async_api import Browser, Locator, Page, expect

from datastore.http.context import CONTEXT
from datastore.security.policy import Policy

from .conftest import MakeStore
from .harness import Store, json_manifest
from .test_browser import ARTIFACTS, browser, open_page

__all__ = ["browser"]  # the fixture, shared with test_browser

#: Leases short enough that a stop reaches the running copy at once (as in test_jobs_api).
JOB_SETTINGS: dict[str, Any] = {"lease_time": 1.5, "job_stall_timeout": 30.0}
SIZE = 1 << 20
#: Bytes a second: the copy takes some 8 s, long enough to stop and resume it.
BANDWIDTH = 128 << 10


async def signed_in(browser: Browser, store: Store, actions: list[str]) -> tuple[Page, dict[str, str]]:
    """The page, signed in with a token for ``ada`` allowed ``actions``; and that token's header."""
    token = (await store.client.app[CONTEXT].tokens.create("ada", actions)).token
    page = await open_page(browser, store)
    await expect(page.locator("#jobs-section")).to_be_hidden()  # not signed in: no jobs
    await page.get_by_label("Token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#whoami")).to_have_text("Signed in as ada.")
    await expect(page.get_by_role("heading", name="Transfer jobs")).to_be_visible()
    return page, {"Authorization": f"Bearer {token}"}


async def upload(store: Store, name: str, data: bytes, headers: dict[str, str]) -> None:
    reply = await store.client.post("/files/manifest", json=json_manifest([(name, data)]), headers=headers)
    assert reply.status == 201, await reply.text()
    key = (await reply.json())["transfer_key"]
    put = await store.client.put(f"/files/{key}/0", data=data, headers=headers)
    assert put.status == 200, await put.text()


async def submit(store: Store, headers: dict[str, str], **job: Any) -> str:
    reply = await store.client.post("/_api/v1/jobs", json=job, headers=headers)
    assert reply.status == 201, await reply.text()
    job_id: str = (await reply.json())["id"]
    return job_id


async def progress_beyond(page: Page, job_id: str, least: float) -> float:
    """Wait until the job's bar shows more than ``least`` bytes; what it shows then."""
    bar = f'#jobs tbody tr[data-job="{job_id}"] progress'
    handle = await page.wait_for_function(
        "([bar, least]) => { const p = document.querySelector(bar); return p && p.value > least && p.value; }",
        arg=[bar, least],
        timeout=10_000,
    )
    value: float = await handle.json_value()
    return value


def button(row: Locator, name: str) -> Locator:
    return row.get_by_role("button", name=name)


async def test_a_job_runs_stops_resumes_and_finishes_on_the_page_without_reloading(
    make_store: MakeStore, browser: Browser
) -> None:
    store = await make_store(policy=Policy(), trust_client_dn=False, **JOB_SETTINGS)
    page, auth = await signed_in(browser, store, ["read", "upload", "jobs"])
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    await expect(page.locator("#jobs-empty")).to_have_text("No transfer jobs yet.")
    await page.evaluate("window.notReloaded = true")
    data = os.urandom(SIZE)
    await upload(store, "source.bin", data, auth)

    job_id = await submit(
        store,
        auth,
        files=[{"source": "local:/files/source.bin", "destination": "local:/files/copy.bin"}],
        bandwidth=BANDWIDTH,
        chunk_size=16 << 10,
    )

    row = page.locator(f'#jobs tbody tr[data-job="{job_id}"]')
    state = row.locator("td.state .name")
    await expect(row.locator("td.job")).to_have_text(job_id[:8])
    await expect(state).to_have_text("ACTIVE", timeout=10_000)
    first = await progress_beyond(page, job_id, 0)
    await progress_beyond(page, job_id, first)
    await expect(row.locator("td.rate")).to_contain_text("/s")
    await expect(button(row, "Pause")).to_be_visible()
    await expect(button(row, "Resume")).to_be_hidden()
    await expect(button(row, "Clear")).to_be_hidden()
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "browser-jobs-active.png"), full_page=True)

    await button(row, "Stop").click()
    await expect(state).to_have_text("USER_STOPPED")
    await expect(button(row, "Stop")).to_be_hidden()
    await expect(button(row, "Clear")).to_be_visible()
    # The running copy stops when its runner next hears from the store (a third of a lease).
    await expect(row.locator("td.state .files")).to_have_text("files: 1 USER_STOPPED", timeout=10_000)
    held = await progress_beyond(page, job_id, -1)
    assert held < SIZE
    await button(row, "Resume").click()
    await expect(state).to_have_text("ACTIVE", timeout=10_000)
    await progress_beyond(page, job_id, held)

    await expect(state).to_have_text("FINISHED", timeout=20_000)
    await expect(row.locator("td.progress")).to_contain_text("100 % (1.0 MiB of 1.0 MiB)")
    assert await row.locator("progress").evaluate("bar => bar.value === bar.max") is True
    await expect(row.locator("td.error")).to_have_text("")
    await expect(row.locator("button:visible")).to_have_text(["Clear"])
    assert await page.evaluate("window.notReloaded") is True
    assert not [text for text in console if "Content Security Policy" in text], console
    copied = await store.client.get("/files/copy.bin", headers=auth)
    assert await copied.read() == data

    # A job cleared leaves the page.
    await expect(button(row, "Clear")).to_be_enabled()
    await button(row, "Clear").click()
    await expect(row).to_have_count(0)
    await expect(page.locator("#jobs-empty")).to_be_visible()


async def test_a_job_whose_source_is_missing_shows_failed_with_its_reason_and_offers_retry(
    make_store: MakeStore, browser: Browser
) -> None:
    store = await make_store(policy=Policy(), trust_client_dn=False, **JOB_SETTINGS)
    page, auth = await signed_in(browser, store, ["read", "upload", "jobs"])

    job_id = await submit(
        store, auth, files=[{"source": "local:/files/missing.bin", "destination": "local:/files/copy.bin"}]
    )

    row = page.locator(f'#jobs tbody tr[data-job="{job_id}"]')
    state = row.locator("td.state .name")
    await expect(state).to_have_text("FAILED", timeout=10_000)
    await expect(row.locator("td.error")).to_contain_text("not_found")
    await expect(button(row, "Retry")).to_be_visible()
    await expect(button(row, "Pause")).to_be_hidden()
    await expect(button(row, "Stop")).to_be_hidden()

    # Once the source is there, Retry copies it.
    await upload(store, "missing.bin", b"here at last", auth)
    await button(row, "Retry").click()
    await expect(state).to_have_text("FINISHED", timeout=10_000)
    await expect(row.locator("td.error")).to_have_text("")
    await expect(row.locator("td.progress")).to_contain_text("100 %")


async def test_a_refused_step_shows_the_stores_message(make_store: MakeStore, browser: Browser) -> None:
    store = await make_store(policy=Policy(), trust_client_dn=False, **JOB_SETTINGS)
    token = (await store.client.app[CONTEXT].tokens.create("ada", ["read", "upload", "jobs"])).token
    auth = {"Authorization": f"Bearer {token}"}
    await upload(store, "source.bin", os.urandom(SIZE), auth)
    job_id = await submit(
        store,
        auth,
        files=[{"source": "local:/files/source.bin", "destination": "local:/files/copy.bin"}],
        bandwidth=1024,
    )
    page = await open_page(browser, store)
    # Without its event stream the page does not learn that the job is stopped elsewhere.
    await page.route("**/_api/v1/jobs/events", lambda route: route.abort())
    await page.get_by_label("Token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    row = page.locator(f'#jobs tbody tr[data-job="{job_id}"]')
    state = row.locator("td.state .name")
    await expect(button(row, "Stop")).to_be_visible()
    await expect(row.locator("td.progress")).to_contain_text("of 1.0 MiB")  # the job's document is in

    stopped = await store.client.post(f"/_api/v1/jobs/{job_id}/stop", headers=auth)
    assert stopped.status == 200
    await button(row, "Stop").click()

    message = page.locator("#jobs-message")
    await expect(message).to_contain_text(f"Stop refused for job {job_id[:8]}:")
    await expect(message).to_contain_text("the job is USER_STOPPED: stop applies to a job that is QUEUED")
    await expect(state).to_have_text("USER_STOPPED")  # and the row is read again
    await expect(button(row, "Resume")).to_be_visible()


async def test_a_token_without_jobs_shows_no_jobs(make_store: MakeStore, browser: Browser) -> None:
    store = await make_store(policy=Policy(), trust_client_dn=False)
    token = (await store.client.app[CONTEXT].tokens.create("bob", ["read"])).token
    page = await open_page(browser, store)
    await page.get_by_label("Token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#whoami")).to_have_text("Signed in as bob.")
    await expect(page.locator("#empty")).to_be_visible()
    await expect(page.locator("#jobs-section")).to_be_hidden()
