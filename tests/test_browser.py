"""The browser page in a real headless Chromium (Debian's), driven by Playwright.

These tests never skip: without Chromium they fail and say how to install it
(``make test`` installs it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect
from playwright.async_api import Error as PlaywrightError

from datastore.http.context import CONTEXT
from datastore.security.policy import Policy

from .conftest import MakeStore
from .harness import Store
from .test_tls import COUNTRY, ORG, UNIT, Pki, TlsStore, build_store
from .test_tls import PREFIX as TLS_PREFIX

CHROMIUM = os.environ.get("DATASTORE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - a one-off check before the browser starts
        pytest.fail(f"Chromium not found at {CHROMIUM}: run 'make test' (it installs Debian's chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            await launched.close()


async def open_page(browser: Browser, store: Store) -> Page:
    context = await browser.new_context(accept_downloads=True)
    page = await context.new_page()
    await page.goto(str(store.client.make_url("/files/")))
    await expect(page.get_by_role("heading", level=1)).to_contain_text("/files/")
    return page


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


async def test_upload_two_files_with_the_picker_then_download_one(
    make_store: MakeStore, browser: Browser, tmp_path: Path
) -> None:
    store = await make_store()
    first = write(tmp_path / "notes.txt", b"minutes of the meeting\n" * 1000)
    second = write(tmp_path / "résumé.bin", os.urandom(3 << 20))
    page = await open_page(browser, store)

    await page.set_input_files("#file-input", [str(first), str(second)])

    await expect(page.get_by_role("status")).to_have_text("2 file(s) uploaded.", timeout=30_000)
    rows = page.locator("#files tbody tr")
    await expect(rows).to_have_count(2)
    await expect(rows.nth(0)).to_contain_text("notes.txt")
    await expect(rows.nth(1)).to_contain_text("résumé.bin")
    await expect(rows.nth(1)).to_contain_text(hashlib.sha256(second.read_bytes()).hexdigest())
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "browser-after-upload.png"), full_page=True)

    async with page.expect_download() as waiting:
        await page.get_by_role("link", name="résumé.bin").click()
    download = await waiting.value
    saved = tmp_path / "downloaded.bin"
    await download.save_as(saved)
    assert saved.read_bytes() == second.read_bytes()
    listing = await (await store.client.get("/files/", headers={"Accept": "application/json"})).json()
    assert sorted(f["name"] for f in listing["files"]) == ["notes.txt", "résumé.bin"]


async def test_a_dropped_connection_resumes_instead_of_restarting(
    make_store: MakeStore, browser: Browser, tmp_path: Path
) -> None:
    store = await make_store()
    content = os.urandom(20 << 20)  # three 8 MiB chunks
    big = write(tmp_path / "big.bin", content)
    page = await open_page(browser, store)
    patches: list[str] = []
    heads: list[str] = []

    async def cut_the_second_patch(route: Route) -> None:
        request = route.request
        if request.method == "HEAD":
            heads.append(request.url)
        if request.method == "PATCH":
            patches.append(request.headers.get("upload-offset", ""))
            if len(patches) == 2:
                await route.abort("connectionreset")
                return
        await route.continue_()

    await page.route("**/files/*/0", cut_the_second_patch)
    await page.set_input_files("#file-input", [str(big)])

    await expect(page.get_by_role("status")).to_have_text("1 file(s) uploaded.", timeout=60_000)
    # The failed chunk was sent again from the server's offset: no byte before it went twice.
    assert patches == ["0", str(8 << 20), str(8 << 20), str(16 << 20)]
    assert len(heads) == 2
    response = await store.client.get("/files/big.bin")
    assert hashlib.sha256(await response.read()).digest() == hashlib.sha256(content).digest()


async def test_a_refused_upload_says_why(make_store: MakeStore, browser: Browser, tmp_path: Path) -> None:
    store = await make_store()
    key = await store.register([("taken.txt", b"first")])
    assert (await store.put(key, 0, b"first"))[0] == 200
    page = await open_page(browser, store)

    await page.set_input_files("#file-input", [str(write(tmp_path / "taken.txt", b"second"))])

    await expect(page.locator(".upload.failed .message")).to_contain_text("Refused by the store")
    await expect(page.get_by_role("status")).to_contain_text("Upload refused")
    assert await (await store.client.get("/files/taken.txt")).read() == b"first"


async def test_the_drop_zone_opens_the_file_picker_from_the_keyboard(make_store: MakeStore, browser: Browser) -> None:
    store = await make_store()
    page = await open_page(browser, store)

    zone = page.get_by_role("button", name="Drop files here or choose files")
    async with page.expect_file_chooser() as waiting:
        await zone.press("Enter")
    chooser = await waiting.value
    assert chooser.is_multiple()
    await expect(page.get_by_label("Token")).to_be_visible()


async def test_signing_in_with_a_token_uploads_lists_and_downloads_as_its_subject(
    make_store: MakeStore, browser: Browser, tmp_path: Path
) -> None:
    store = await make_store(policy=Policy(), trust_client_dn=False)  # the shipped defaults
    token = (await store.client.app[CONTEXT].tokens.create("ada", ["read", "upload"])).token
    page = await open_page(browser, store)
    await expect(page.get_by_role("status")).to_have_text("Sign in to see the files.")

    await page.get_by_label("Token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#whoami")).to_have_text("Signed in as ada.")
    await page.set_input_files("#file-input", [str(write(tmp_path / "ada.txt", b"by Ada"))])

    await expect(page.get_by_role("status")).to_have_text("1 file(s) uploaded.", timeout=30_000)
    row = page.locator("#files tbody tr")
    await expect(row).to_contain_text("ada.txt")
    await expect(row.locator("td.owner")).to_have_text("you")
    # A plain link downloads it: the session cookie authorises navigations too.
    async with page.expect_download() as waiting:
        await page.get_by_role("link", name="ada.txt").click()
    await (await waiting.value).save_as(tmp_path / "saved.txt")
    assert (tmp_path / "saved.txt").read_bytes() == b"by Ada"
    cookies = await page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [("datastore_token", True, "Strict")]

    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("status")).to_have_text("Sign in to see the files.")
    await expect(page.locator("#files tbody tr")).to_have_count(0)


async def test_a_link_with_a_token_fills_in_the_sign_in_and_forgets_the_fragment(
    make_store: MakeStore, browser: Browser
) -> None:
    store = await make_store(policy=Policy(), trust_client_dn=False)
    token = (await store.client.app[CONTEXT].tokens.create("bob", ["read"])).token
    page = await (await browser.new_context()).new_page()
    await page.goto(str(store.client.make_url("/files/")) + f"#token={token}")

    await expect(page.get_by_role("status")).to_have_text("This link carries a token: press Sign in to use it.")
    assert token not in page.url
    # Nobody is signed in by a link alone: that takes the person's own press.
    await expect(page.locator("#whoami")).to_have_text("Not signed in.")
    assert await page.context.cookies() == []
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#whoami")).to_have_text("Signed in as bob.")
    await expect(page.locator("#empty")).to_be_visible()


async def test_the_page_forbids_foreign_scripts_and_framing(make_store: MakeStore) -> None:
    store = await make_store()
    response = await store.client.get("/files/", headers={"Accept": "text/html"})
    assert response.status == 200
    assert response.content_type == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    # A client that asks for JSON gets the listing; one that names no type (wget and curl send */*) the page.
    listing = await store.client.get("/files/", headers={"Accept": "application/json"})
    assert listing.content_type == "application/json"
    assert (await store.client.get("/files/", headers={"Accept": "*/*"})).content_type == "text/html"


async def test_an_empty_file_is_uploaded_and_listed(make_store: MakeStore, browser: Browser, tmp_path: Path) -> None:
    store = await make_store()
    page = await open_page(browser, store)

    await page.set_input_files("#file-input", [str(write(tmp_path / "empty.txt", b""))])

    await expect(page.get_by_role("status")).to_have_text("1 file(s) uploaded.", timeout=30_000)
    await expect(page.locator("#files tbody tr")).to_contain_text("empty.txt")
    response = await store.client.get("/files/empty.txt")
    assert (response.status, await response.read()) == (200, b"")


async def test_without_javascript_the_page_lists_the_files_as_links_that_download(
    make_store: MakeStore, browser: Browser, tmp_path: Path
) -> None:
    store = await make_store()
    files = {"minutes #3.txt": b"read without a script\n", "résumé 100%.bin": os.urandom(100_000)}
    key = await store.register(list(files.items()))
    for num, content in enumerate(files.values()):
        assert (await store.put(key, num, content))[0] == 200
    context = await browser.new_context(java_script_enabled=False, accept_downloads=True)
    page = await context.new_page()

    response = await page.goto(str(store.client.make_url("/files/")))

    assert response is not None and response.status == 200
    await expect(page.get_by_role("heading", level=1)).to_contain_text("/files/")
    await expect(page.locator("#needs-script")).to_have_text(
        "Signing in and uploading need JavaScript; the list of files works without it."
    )
    links = page.locator("#files tbody a")
    await expect(links).to_have_text(list(files))
    for name, content in files.items():
        async with page.expect_download() as waiting:
            await page.get_by_role("link", name=name).click()
        download = await waiting.value
        assert download.suggested_filename == name
        await download.save_as(tmp_path / "saved")
        assert (tmp_path / "saved").read_bytes() == content


async def test_the_script_takes_over_the_server_rendered_list_within_the_pages_policy(
    make_store: MakeStore, browser: Browser
) -> None:
    store = await make_store()
    key = await store.register([("listed.txt", b"listed")])
    assert (await store.put(key, 0, b"listed"))[0] == 200
    context = await browser.new_context()
    page = await context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))

    await page.goto(str(store.client.make_url("/files/")))

    # app.js's own rows: its links carry the download attribute, the server's do not.
    await expect(page.locator("#files tbody a[download]")).to_have_text(["listed.txt"])
    await expect(page.locator("#files tbody tr")).to_have_count(1)
    await expect(page.locator("#whoami")).to_have_text("Not signed in.")
    await expect(page.locator("#needs-script")).to_be_hidden()
    await expect(page.locator("#overall")).to_be_hidden()  # the bar for all files, until several upload
    assert not [text for text in console if "Content Security Policy" in text], console


@pytest.fixture
async def tls_store(tmp_path: Path) -> AsyncIterator[TlsStore]:
    """An HTTPSTransferServer with certificates minted for this test (see test_tls)."""
    pki = await asyncio.to_thread(Pki, tmp_path / "pki")
    store = await asyncio.to_thread(build_store, pki, tmp_path / "tls", False, {})
    await store.server.start()
    try:
        yield store
    finally:
        await store.server.stop()


async def test_the_page_uploads_over_tls_with_a_client_certificate(
    tls_store: TlsStore, browser: Browser, tmp_path: Path
) -> None:
    store = tls_store
    ada = await asyncio.to_thread(store.pki.client, "ada")
    # Chromium does not know the test CA, so the server's certificate is not checked here;
    # the client certificate is what the store checks, and what this test is about.
    context = await browser.new_context(
        ignore_https_errors=True,
        client_certificates=[{"origin": store.url, "certPath": str(ada.cert), "keyPath": str(ada.key)}],
    )
    page = await context.new_page()
    await page.goto(f"{store.url}/{TLS_PREFIX}/")
    await expect(page.get_by_role("heading", level=1)).to_contain_text(f"/{TLS_PREFIX}/")

    await page.set_input_files("#file-input", [str(write(tmp_path / "signed.txt", b"over mutual TLS"))])

    await expect(page.get_by_role("status")).to_have_text("1 file(s) uploaded.", timeout=30_000)
    await expect(page.locator("#whoami")).to_contain_text(f"/C={COUNTRY}/O={ORG}/OU={UNIT}/CN=ada")
    await expect(page.locator("#files tbody tr td.owner")).to_have_text("you")
    assert (store.root / TLS_PREFIX / "signed.txt").read_bytes() == b"over mutual TLS"


async def test_the_page_is_refused_without_a_client_certificate(tls_store: TlsStore, browser: Browser) -> None:
    store = tls_store
    context = await browser.new_context(ignore_https_errors=True)
    page = await context.new_page()
    with pytest.raises(PlaywrightError):
        await page.goto(f"{store.url}/{TLS_PREFIX}/")


async def curl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail-with-body", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, (out, err)
    return out.decode()


async def test_the_page_shows_another_identitys_upload_arriving_and_landing_without_reloading(
    make_store: MakeStore, browser: Browser, tmp_path: Path
) -> None:
    store = await make_store(policy=Policy(), trust_client_dn=False)  # the shipped defaults
    tokens = store.client.app[CONTEXT].tokens
    ada = (await tokens.create("ada", ["read", "upload"])).token
    bob = (await tokens.create("bob", ["upload"])).token
    page = await open_page(browser, store)
    await page.get_by_label("Token").fill(ada)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#whoami")).to_have_text("Signed in as ada.")
    await page.evaluate("window.notReloaded = true")

    data = os.urandom(300_000)
    base = str(store.client.make_url("")).rstrip("/")
    auth = f"Authorization: Bearer {bob}"
    declared = {"name": "bob.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = json.dumps({"files": [declared]})
    reply = await curl("-H", auth, "-H", "Content-Type: application/json", "-d", manifest, f"{base}/files/manifest")
    upload_url = json.loads(reply)["files"][0]["upload_url"]
    tus = ["-H", auth, "-H", "Tus-Resumable: 1.0.0", "-H", "Content-Type: application/offset+octet-stream"]
    (tmp_path / "first").write_bytes(data[:100_000])
    await curl("-X", "PATCH", *tus, "-H", "Upload-Offset: 0", "--data-binary", f"@{tmp_path / 'first'}", upload_url)

    arriving = page.locator("#live li")
    await expect(arriving).to_contain_text("bob.bin")
    await expect(page.locator("#files tbody tr")).to_have_count(0)

    (tmp_path / "rest").write_bytes(data[100_000:])
    await curl("-X", "PATCH", *tus, "-H", "Upload-Offset: 100000", "--data-binary", f"@{tmp_path / 'rest'}", upload_url)
    row = page.locator("#files tbody tr")
    await expect(row).to_contain_text("bob.bin")
    await expect(row.locator("td.owner")).to_have_text("—")  # the default policy shows no one else's name
    await expect(arriving).to_have_count(0)
    await expect(page.locator("#live")).to_be_hidden()
    assert await page.evaluate("window.notReloaded") is True
