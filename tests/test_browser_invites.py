"""The page's invitations in a real headless Chromium (Debian's), driven by Playwright.

Invitations are asked for through the API (anyone may ask), or by a job of the store pushing to
itself over HTTP (as in ``test_vouchers``); the page answers them. It has no event stream for
invitations: the test presses Refresh (or tells the page it is shown again), then waits on the
page's DOM (bounded), never on a clock.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest
from playwright.async_api import Browser, Locator, Page, expect

from datastore.jobs import runner
from datastore.security.policy import Policy

from .conftest import MakeStore
from .harness import Store, eventually
from .test_browser import ARTIFACTS, browser
from .test_browser_jobs import signed_in, submit, upload

__all__ = ["browser"]  # the fixture, shared with test_browser

MIB = 1 << 20
SETTINGS: dict[str, Any] = {
    "policy": Policy(),
    "trust_client_dn": False,
    "job_hosts": ("127.0.0.1",),
    "lease_time": 1.5,
}


@pytest.fixture(autouse=True)
def quick_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner asks for answers often (its pace, not a test's timing)."""
    monkeypatch.setattr(runner, "INVITATION_POLL", 0.05)


async def ask(store: Store, names: list[str], size: int, requester: str) -> str:
    """An invitation asked for through the API, without a credential; its id."""
    reply = await store.client.post(
        "/_api/v1/invitations",
        json={"prefix": "files", "direction": "push", "names": names, "size": size, "requester": requester},
    )
    assert reply.status == 201, await reply.text()
    invitation_id: str = (await reply.json())["id"]
    return invitation_id


async def shown(store: Store, auth: dict[str, str], invitation_id: str) -> dict[str, Any]:
    reply = await store.client.get(f"/_api/v1/invitations/{invitation_id}", headers=auth)
    assert reply.status == 200, await reply.text()
    document: dict[str, Any] = await reply.json()
    return document


def pending(page: Page, invitation_id: str) -> Locator:
    return page.locator(f'#invites-pending tbody tr[data-invitation="{invitation_id}"]')


def answered(page: Page, invitation_id: str) -> Locator:
    return page.locator(f'#invites-answered tbody tr[data-invitation="{invitation_id}"]')


async def test_invitations_are_accepted_extended_revoked_and_declined_on_the_page(
    make_store: MakeStore, browser: Browser
) -> None:
    store = await make_store(**SETTINGS)
    page, auth = await signed_in(browser, store, ["read", "upload", "jobs"])
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    await expect(page.get_by_role("heading", name="Invitations")).to_be_visible()
    await expect(page.locator("#invites-pending-empty")).to_have_text("No invitation is waiting for an answer.")
    await page.evaluate("window.notReloaded = true")

    # A pending invitation, its requester's text shown as text.
    requester = "<img src=x onerror=alert(1)> store B"
    names = ["z.bin", "x.bin", "y.bin", "w.bin"]
    first = await ask(store, names, 3 * MIB, requester)
    await page.get_by_role("button", name="Refresh").click()
    row = pending(page, first)
    await expect(row.locator("td.requester .who")).to_have_text(requester)
    assert await row.locator("img").count() == 0
    await expect(row.locator("td.files")).to_contain_text("push into /files/: w.bin, x.bin, y.bin and 1 more")
    assert await row.locator("td.files .names").get_attribute("title") == "w.bin\nx.bin\ny.bin\nz.bin"
    await row.get_by_text("All 4 names").click()
    await expect(row.locator("td.files details li")).to_have_text(["w.bin", "x.bin", "y.bin", "z.bin"])
    await expect(row.locator("td.size")).to_have_text("3.0 MiB")
    await expect(row.get_by_label("Budget")).to_have_value("3")
    await expect(row.get_by_label("Lifetime")).to_have_value("30")

    # Accepted with a budget of 2 MiB for 7 days: the row moves to the answered ones.
    await row.get_by_label("Budget").fill("2")
    await row.get_by_label("Lifetime").fill("7")
    before = time.time()
    await row.get_by_role("button", name="Accept").click()
    row = answered(page, first)
    await expect(row.locator("td.state .name")).to_have_text("ACCEPTED")
    await expect(pending(page, first)).to_have_count(0)
    await expect(row.locator("td.budget")).to_have_text("0 bytes used of 2.0 MiB; 2.0 MiB left")
    await expect(row.locator("td.answered-by .who")).to_have_text("token:ada")
    document = await shown(store, auth, first)
    assert (document["state"], document["budget"], document["answered_by"]) == ("ACCEPTED", 2 * MIB, "token:ada")
    expires = datetime.fromisoformat(document["expires_at"].replace("Z", "+00:00")).timestamp()
    assert before + 7 * 86400 - 5 < expires < time.time() + 7 * 86400 + 5

    # Extended by a MiB, in bytes.
    await row.get_by_label("Add bytes").fill(str(MIB))
    await row.get_by_role("button", name="Extend").click()
    await expect(row.locator("td.budget")).to_have_text("0 bytes used of 3.0 MiB; 3.0 MiB left")
    await expect(page.locator("#invites-message")).to_contain_text(f"Extended invitation {first[:8]}")
    assert (await shown(store, auth, first))["budget"] == 3 * MIB

    # Revoked: no more Extend or Revoke.
    await row.get_by_role("button", name="Revoke").click()
    await expect(row.locator("td.state .name")).to_have_text("REVOKED")
    await expect(row.locator("button:visible")).to_have_count(0)
    assert (await shown(store, auth, first))["state"] == "REVOKED"

    # A second one, found when the page is shown again, declined.
    second = await ask(store, ["only.bin"], 100, "store C")
    await page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
    row = pending(page, second)
    await expect(row.locator("td.files .names")).to_have_text("only.bin")
    await expect(row.locator("td.files details")).to_be_hidden()
    await row.get_by_role("button", name="Decline").click()
    row = answered(page, second)
    await expect(row.locator("td.state .name")).to_have_text("DECLINED")
    await expect(row.locator("td.budget")).to_have_text("100 bytes asked")
    await expect(row.locator("button:visible")).to_have_count(0)
    await expect(page.locator("#invites-pending-empty")).to_be_visible()
    assert (await shown(store, auth, second))["state"] == "DECLINED"

    # Answered elsewhere meanwhile: the store's refusal is shown, and the row read again.
    third = await ask(store, ["late.bin"], 100, "store D")
    await page.get_by_role("button", name="Refresh").click()
    row = pending(page, third)
    await expect(row.get_by_role("button", name="Accept")).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "browser-invites.png"), full_page=True)
    declined = await store.client.post(f"/_api/v1/invitations/{third}/decline", headers=auth)
    assert declined.status == 200
    await row.get_by_role("button", name="Accept").click()
    message = page.locator("#invites-message")
    await expect(message).to_contain_text(f"Accept refused for invitation {third[:8]} from store D:")
    await expect(message).to_contain_text("the invitation is DECLINED: only a pending one can be answered")
    await expect(answered(page, third).locator("td.state .name")).to_have_text("DECLINED")
    assert await page.evaluate("window.notReloaded") is True
    assert not [text for text in console if "Content Security Policy" in text], console


async def test_a_job_pushing_to_its_own_store_waits_for_the_pages_accept_then_finishes(
    make_store: MakeStore, browser: Browser
) -> None:
    store = await make_store(**SETTINGS)
    page, auth = await signed_in(browser, store, ["read", "upload", "jobs"])
    data = bytes(range(250)) * 4  # 1000 bytes
    await upload(store, "a.bin", data, auth)
    destination = f"{str(store.client.make_url('/')).rstrip('/')}/files/pushed.bin"
    job_id = await submit(store, auth, files=[{"source": "local:/files/a.bin", "destination": destination}])
    jobs_row = page.locator(f'#jobs tbody tr[data-job="{job_id}"]')
    await expect(jobs_row.locator("td.state .name")).to_have_text("AWAITING_ACCEPTANCE")

    # The job asks its store for an invitation (in the background); once it has, Refresh shows it.
    job: dict[str, Any] = {}

    async def asked() -> bool:
        nonlocal job
        job = await (await store.client.get(f"/_api/v1/jobs/{job_id}", headers=auth)).json()
        return bool(job["invitation"] and "id" in job["invitation"])

    await eventually(asked, "the job asked for its invitation", timeout=10.0)
    assert job["state"] == "AWAITING_ACCEPTANCE"
    invitation_id: str = job["invitation"]["id"]
    await page.get_by_role("button", name="Refresh").click()
    row = pending(page, invitation_id)
    await expect(row.locator("td.files .names")).to_have_text("pushed.bin")
    await expect(row.locator("td.size")).to_have_text(f"{len(data)} bytes")

    # Accepted as asked (the budget field left at the size asked): the job runs and finishes.
    await row.get_by_role("button", name="Accept").click()
    await expect(answered(page, invitation_id).locator("td.state .name")).to_have_text("ACCEPTED")
    assert (await shown(store, auth, invitation_id))["budget"] == len(data)
    await expect(jobs_row.locator("td.state .name")).to_have_text("FINISHED", timeout=15_000)
    copied = await store.client.get("/files/pushed.bin", headers=auth)
    assert copied.status == 200 and await copied.read() == data
    # The voucher's budget is spent, as the page shows once it reads the list again.
    await page.get_by_role("button", name="Refresh").click()
    await expect(answered(page, invitation_id).locator("td.budget")).to_have_text(
        f"{len(data)} bytes used of {len(data)} bytes; 0 bytes left"
    )


async def test_no_invitations_without_signing_in(make_store: MakeStore, browser: Browser) -> None:
    store = await make_store(**SETTINGS)
    await ask(store, ["x.bin"], 100, "store B")
    page, _ = await signed_in(browser, store, ["read", "upload", "jobs"])
    await expect(page.locator("#invites-pending tbody tr")).to_have_count(1)
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.locator("#whoami")).to_have_text("Not signed in.")
    await expect(page.locator("#invites-section")).to_be_hidden()
    await expect(page.locator("#invites-pending tbody tr")).to_have_count(0)
