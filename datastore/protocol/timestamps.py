"""How the store writes times: ISO 8601 in UTC with milliseconds, in every JSON answer and listing."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_time(timestamp: float) -> str:
    """``2026-11-23T21:53:34.000Z`` for a POSIX timestamp."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
