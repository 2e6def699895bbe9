"""Reading Server-Sent Events: the ``text/event-stream`` format as the WHATWG HTML standard defines
it (section 9.2, "Server-sent events": lines, fields, dispatch on a blank line), for the client's
``events()`` and ``datastore watch``.

The format is a few lines of parsing; no library for it fits the aiohttp client this package uses
(``aiohttp-sse`` is the server half, which the store uses), so it is here, kept to the standard:
``data`` lines joined by newlines, ``id`` remembered across messages (and ignored if it holds NUL),
comments and unknown fields skipped, a message without data not dispatched.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One dispatched message: its type (``message`` if none was given), data, and the last event id."""

    event: str
    data: str
    id: str | None

    def json(self) -> Any:
        """The data parsed as JSON."""
        return json.loads(self.data)


async def read_events(lines: AsyncIterable[bytes]) -> AsyncIterator[ServerEvent]:
    """The messages of a stream, given its lines (each ending in LF, CRLF or CR, as the stream split them)."""
    data: list[str] = []
    event = ""
    last_id: str | None = None
    async for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield ServerEvent(event or "message", "\n".join(data), last_id)
            data, event = [], ""
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            last_id = value
