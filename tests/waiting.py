"""Time in tests without waiting on it.

Where a lifetime is the behaviour under test (a transfer key's, a finished
transfer's record), the test moves the store's wall clock past it rather than
sleeping: :class:`WallClock`. A short real lifetime makes a test race the
store (the lifetime may run out before the test has set the upload up on a
busy machine); a long one would make it slow.
"""

from __future__ import annotations

import time

import pytest


class WallClock:
    """``time.time()`` as everything in this process reads it, moved on by :meth:`advance`.

    The store reads the wall clock only through ``time.time()`` for key
    expiry, the sweeper and record retention; the event loop's timers run on
    ``time.monotonic()``, which is left alone.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._offset = 0.0
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + self._offset)

    def advance(self, seconds: float) -> None:
        """Every later ``time.time()`` reads ``seconds`` later than it would have."""
        self._offset += seconds
