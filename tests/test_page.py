"""The page of a prefix rendered on the server: escaping, which clients get it, and the listing's rules.

Rendering is tested on its own with names no store of ours would accept
(``<script>``, quotes, ``?``: a handler of someone else's may list them);
the rest against a real store on loopback, beside the JSON listing it must
agree with.
"""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import pytest
from aiohttp.test_utils import make_mocked_request

from datastore.http.context import CONTEXT
from datastore.http.page import PAGE_HEADERS, Listed, human_size, render_page, wants_page
from datastore.security.policy import Policy

from .conftest import MakeStore
from .fakes import LegacyDataStore
from .harness import Store, json_manifest

ADA = "/O=Lab/CN=Ada"
BOB = "/O=Lab/CN=Bob"


def listed(name: str, **fields: Any) -> Listed:
    entry: Listed = {
        "name": name,
        "size": 1,
        "md5": "0" * 32,
        "sha256": "0" * 64,
        "owner": None,
        "owner_authenticated": None,
        "yours": False,
        "uploaded_at": 1_700_000_000.0,
        "url": "unused",
    }
    entry.update(fields)  # type: ignore[typeddict-item]
    return entry


class Parsed(HTMLParser):
    """What a browser would make of the page: its links, scripts, styles and the text of #status."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []
        self.cells: dict[str, list[str]] = {}
        self.scripts: list[dict[str, str | None]] = []
        self.inline_styles = 0
        self.status = ""
        self.empty_hidden: bool | None = None
        self._href: str | None = None
        self._cell: str | None = None
        self._in_status = False
        self._text: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "a":
            self._href, self._text = attributes.get("href") or "", []
        elif tag == "td":
            self._cell, self._text = attributes.get("class") or "", []
        elif tag == "script":
            self.scripts.append(attributes)
        elif tag == "style" or "style" in attributes:
            self.inline_styles += 1
        elif attributes.get("id") == "status":
            self._in_status = True
        elif attributes.get("id") == "empty":
            self.empty_hidden = "hidden" in attributes

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text)))
            self._href = None
        elif tag == "td" and self._cell is not None:
            self.cells.setdefault(self._cell, []).append("".join(self._text))
            self._cell = None
        elif tag == "p":
            self._in_status = False

    def handle_data(self, data: str) -> None:
        self._text.append(data)
        if self._in_status:
            self.status += data


HOSTILE = [
    "<script>alert(1)</script>",
    'say "hi".txt',
    "it's.txt",
    "a&amp;b.txt",
    "q?x=1#top",
    "100%25.txt",
    "javascript:alert(1)",
    "//evil.example/x",
    "-rf",
    "résumé 日本語.txt",
]


def test_hostile_names_are_text_in_the_page_and_links_to_themselves() -> None:
    page = render_page("files", [listed(name) for name in HOSTILE])

    parsed = Parsed(page)
    # Only the page's own script, by its source: no name became markup.
    assert parsed.scripts == [{"src": "/_static/app.js", "defer": None}]
    assert parsed.inline_styles == 0
    assert [text for _href, text in parsed.links] == HOSTILE
    for (href, _text), name in zip(parsed.links, HOSTILE, strict=True):
        # Relative, under the prefix's folder, naming exactly the file (no query, no fragment, no host).
        url = urlsplit(urljoin("http://store.example/files/", href))
        assert (url.netloc, url.query, url.fragment) == ("store.example", "", "")
        assert unquote(url.path) == f"/files/{name}"
    assert "<script>alert" not in page


def test_every_shown_value_is_escaped() -> None:
    entry = listed("a.txt", owner='<img src=x onerror="1">', sha256="<b>", size=1536)

    parsed = Parsed(render_page("<prefix>", [entry], message="<i>note</i>"))

    assert parsed.cells["owner"] == ['<img src=x onerror="1">']
    assert parsed.cells["digest"] == ["<b>"]
    assert parsed.cells["size"] == ["1.5 KiB"]
    assert parsed.cells["time"] == ["2023-11-14 22:13 UTC"]
    assert parsed.status == "<i>note</i>"


def test_the_owner_cell_says_you_for_your_own_files() -> None:
    parsed = Parsed(render_page("files", [listed("a", owner=ADA, yours=True), listed("b", owner=ADA), listed("c")]))

    assert parsed.cells["owner"] == ["you", ADA, "—"]


def test_an_empty_list_says_so_and_no_list_says_nothing() -> None:
    assert Parsed(render_page("files", [])).empty_hidden is False
    assert Parsed(render_page("files", [listed("a")])).empty_hidden is True
    assert Parsed(render_page("files", None, "Sign in to see the files.")).empty_hidden is True


@pytest.mark.parametrize(
    ("size", "shown"),
    [(0, "0 bytes"), (1023, "1023 bytes"), (1024, "1.0 KiB"), (3 << 20, "3.0 MiB"), (5 << 40, "5.0 TiB")],
)
def test_sizes_read_as_app_js_shows_them(size: int, shown: str) -> None:
    assert human_size(size) == shown


@pytest.mark.parametrize(
    ("accept", "page"),
    [
        pytest.param(None, True, id="none-rclone"),
        pytest.param("*/*", True, id="wget-curl-aiohttp"),
        pytest.param(
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
            True,
            id="chromium",
        ),
        pytest.param("text/html", True, id="html"),
        pytest.param("text/*", True, id="any-text"),
        pytest.param("application/json", False, id="json-client-cli-app-js"),
        pytest.param("text/html, application/json", False, id="json-named"),
        pytest.param("text/plain", False, id="another-type"),
        pytest.param("application/xml", False, id="xml"),
    ],
)
def test_who_gets_the_page_and_who_gets_json(accept: str | None, page: bool) -> None:
    headers = {"Accept": accept} if accept is not None else {}
    assert wants_page(make_mocked_request("GET", "/files/", headers=headers)) is page


# -- against a store --------------------------------------------------------------------------------


async def publish(store: Store, name: str, data: bytes, headers: dict[str, str]) -> None:
    manifest = await store.client.post("/files/manifest", json=json_manifest([(name, data)]), headers=headers)
    assert manifest.status == 201, await manifest.text()
    put = await store.client.put(f"/files/{(await manifest.json())['transfer_key']}/0", data=data, headers=headers)
    assert put.status == 200, await put.text()


async def both(store: Store, headers: dict[str, str]) -> tuple[Any, Any, Parsed]:
    """The JSON listing's (status, body) and the page's (status, parsed page), for the same client."""
    as_json = await store.client.get("/files/", headers={**headers, "Accept": "application/json"})
    as_page = await store.client.get("/files/", headers={**headers, "Accept": "*/*"})
    assert as_page.content_type == "text/html"
    for header, value in PAGE_HEADERS.items():
        assert as_page.headers[header] == value
    return (as_json.status, await as_json.json()), as_page.status, Parsed(await as_page.text())


async def test_the_page_lists_what_the_json_listing_lists_with_the_same_owners(make_store: MakeStore) -> None:
    store = await make_store()  # anyone lists; owners shown to themselves and administrators
    await publish(store, "ada's notes.txt", b"by Ada\n", {"X-Client-DN": ADA})
    await publish(store, "anon.txt", b"by nobody\n", {})

    for who, owners in ((ADA, ["you", "—"]), (BOB, ["—", "—"]), (None, ["—", "—"])):
        headers = {"X-Client-DN": who} if who else {}
        (status, listing), page_status, page = await both(store, headers)
        assert (status, page_status) == (200, 200)
        names = [entry["name"] for entry in listing["files"]]
        assert [text for _href, text in page.links] == names == ["ada's notes.txt", "anon.txt"]
        assert page.cells["owner"] == owners


async def test_a_client_that_may_not_list_gets_the_page_with_the_json_status_and_no_name(
    make_store: MakeStore,
) -> None:
    store = await make_store(policy=Policy(), trust_client_dn=False)  # the shipped defaults
    tokens = store.client.app[CONTEXT].tokens
    writer = (await tokens.create("ada", ["upload", "read"])).token
    elsewhere = (await tokens.create("bob", ["read"], prefixes=["other"])).token
    await publish(store, "minutes.txt", b"minutes\n", {"Authorization": f"Bearer {writer}"})

    cases = {
        "anonymous": ({}, 401, "Sign in to see the files."),
        "a bad token": ({"Authorization": "Bearer dst_nope_nope"}, 401, "Sign in to see the files."),
        "a token for another prefix": (
            {"Authorization": f"Bearer {elsewhere}"},
            403,
            "Could not list the files: Not authorized: the token does not allow read on /files/",
        ),
    }
    for what, (headers, status, message) in cases.items():
        (json_status, body), page_status, page = await both(store, headers)
        assert (json_status, page_status) == (status, status), what
        assert page.status == message, what
        assert page.links == [], what
        assert body["error"] in ("unauthorized", "invalid_token", "not_authorized"), what
    (status, listing), page_status, page = await both(store, {"Authorization": f"Bearer {writer}"})
    assert [text for _href, text in page.links] == [entry["name"] for entry in listing["files"]] == ["minutes.txt"]


async def test_a_prefix_without_a_listing_gets_the_page_without_a_list(make_store: MakeStore, tmp_path: Any) -> None:
    store = await make_store(LegacyDataStore(tmp_path / "root" / "files"))

    (json_status, body), page_status, page = await both(store, {})

    assert (json_status, page_status) == (404, 404)
    assert body["message"] == "Not found: this prefix offers no listing"
    assert page.status == "Could not list the files: Not found: this prefix offers no listing"
    assert page.links == []


async def test_an_unknown_prefix_is_not_a_page(make_store: MakeStore) -> None:
    store = await make_store()

    response = await store.client.get("/nowhere/", headers={"Accept": "text/html"})

    assert (response.status, response.content_type) == (404, "text/plain")
