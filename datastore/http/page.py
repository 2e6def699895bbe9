"""The browser page of a prefix, rendered on the server, and its assets (``/_static/``).

``GET /{prefix}/`` answers this page (see :func:`wants_page`) with the files
the client may list rendered as plain ``<a href="NAME">NAME</a>`` links in
``web/index.html``, so that the page works without JavaScript and mirroring
tools (``wget -r``, rclone's http remote) can walk a prefix; ``app.js`` then
replaces the list with its own and keeps it current. Which files and which
owners a client sees is the listing's decision (``download.py``): this
module decides only HTML or JSON, and renders, escaping every value it puts
in the page.
"""

from __future__ import annotations

import html
import pathlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from string import Template
from typing import TypedDict
from urllib.parse import quote

from aiohttp import web

from ..errors import DatastoreError, FileNotFound, Unauthorized
from .context import prefers_json, reason_phrase

#: The browser page and its assets, shipped in the package.
WEB_DIR = pathlib.Path(__file__).parent / "web"

#: The page runs only its own script and style sheet and talks only to its own origin.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:;"
        " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    # One URL answers the page or JSON: a cache must not hand one to a client that asked for the other.
    "Vary": "Accept",
}

#: The page's assets: the only files under /_static/.
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}


class Listed(TypedDict):
    """One file of a listing, as the JSON listing sends it and the page shows it."""

    name: str
    size: int
    md5: str | None
    sha256: str | None
    #: "complete", or "pending" while a digest is still being computed after publishing (``None`` above).
    digests: str
    owner: str | None
    owner_authenticated: bool | None
    yours: bool
    uploaded_at: float
    url: str


def wants_page(request: web.Request) -> bool:
    """Whether ``GET /{prefix}/`` answers the page rather than the JSON listing.

    JSON when ``Accept`` names ``application/json`` (the Python client, the
    CLI and app.js send exactly that; errors follow the same rule). The page
    when it names ``text/html`` (browsers), when it names only wildcards
    (``*/*``: wget, curl), or when there is none (rclone). JSON for any other
    ``Accept``, as before there was a page. Quality values are not weighed.
    """
    if prefers_json(request):
        return False
    ranges = {item.split(";", 1)[0].strip().lower() for item in request.headers.get("Accept", "").split(",")}
    ranges.discard("")
    return not ranges or "text/html" in ranges or ranges <= {"*/*", "text/*"}


def _load_template() -> Template:
    template = Template((WEB_DIR / "index.html").read_text(encoding="utf-8"))
    # A stray "$" in the page, or a placeholder renamed on one side only, fails at import, not at a request.
    if not template.is_valid() or set(template.get_identifiers()) != {"title", "prefix", "status", "rows", "empty"}:
        raise RuntimeError("web/index.html: its placeholders are not those page.py fills in")
    return template


_TEMPLATE = _load_template()


def render_page(prefix: str, files: Sequence[Listed] | None, message: str = "") -> str:
    """The page for ``/prefix/``: ``files`` as rows of links (``None``: no list at all) and a status line."""
    shown = f"/{prefix}/"
    return _TEMPLATE.substitute(
        title=html.escape(f"datastore {shown}"),
        prefix=html.escape(shown),
        status=html.escape(message),
        rows="\n".join(_row(entry) for entry in files or ()),
        # "No files yet." only for a list that is there and empty.
        empty="" if files is not None and not files else " hidden",
    )


def _row(entry: Listed) -> str:
    """One file: a relative, percent-encoded link, then the cells app.js's rows have too."""
    name = entry["name"]
    owner = "you" if entry["yours"] else entry["owner"] or "—"
    return (
        f'<tr><td class="name"><a href="{html.escape(quote(name, safe=""))}">{html.escape(name)}</a></td>'
        f'<td class="size">{human_size(entry["size"])}</td>'
        f'<td class="owner">{html.escape(owner)}</td>'
        f'<td class="time">{_time(entry["uploaded_at"])}</td>'
        f'<td class="digest">{html.escape(entry["sha256"] or "pending")}</td></tr>'
    )


def human_size(size: int) -> str:
    """``size`` as app.js shows it: ``512 bytes``, ``1.5 MiB``."""
    value, unit = float(size), 0
    units = ("bytes", "KiB", "MiB", "GiB", "TiB")
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{size} bytes" if unit == 0 else f"{value:.1f} {units[unit]}"


def _time(timestamp: float) -> str:
    """A ``<time>`` in UTC (app.js shows the reader's local time instead)."""
    try:
        when = datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        return "—"
    return f'<time datetime="{when:%Y-%m-%dT%H:%M:%SZ}">{when:%Y-%m-%d %H:%M UTC}</time>'


def page_response(prefix: str, files: Sequence[Listed]) -> web.Response:
    """The page with the files listed (200)."""
    return _html(render_page(prefix, files))


def refused_page(prefix: str, error: DatastoreError) -> web.Response:
    """The page without a list, with the status, reason and headers the JSON listing's ``error`` gets.

    A browser still gets the page (and its sign-in); wget and rclone see the
    status and stop.
    """
    if isinstance(error, Unauthorized):
        message = "Sign in to see the files."
    else:
        message = f"Could not list the files: {error.message}"
    return _html(render_page(prefix, None, message), error.status, reason_phrase(error.message), error.headers)


def _html(
    text: str, status: int = 200, reason: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        reason=reason,
        content_type="text/html",
        charset="utf-8",
        headers={**PAGE_HEADERS, **(headers or {})},
    )


async def handle_asset(request: web.Request) -> web.StreamResponse:
    """``GET /_static/{asset}``: the page's script and style sheet."""
    asset = request.match_info["asset"]
    if asset not in ASSETS:
        raise FileNotFound()
    return web.FileResponse(
        WEB_DIR / asset,
        headers={"Content-Type": f"{ASSETS[asset]}; charset=utf-8", "X-Content-Type-Options": "nosniff"},
    )
