"""What may reach a log: secrets cut short, control characters escaped.

A transfer key is a capability (whoever holds it may upload under it) and a
bearer token is an identity, so neither is ever written whole to a log: a
key keeps its first 8 hex digits (enough to find it in the state), a token
its public id. Text a client chose (a DN, a certificate subject, a name) is
escaped, so that it cannot forge log lines or drive a terminal.

:func:`redact` is applied to the access log's request lines, to the paths
and messages of failures, and by :class:`RedactingFormatter` (``datastore
serve`` installs it) to every formatted record, tracebacks included.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time

#: A transfer key (40 hex digits, also inside a staging file's name) or a token's secret part.
_SECRET = re.compile(r"(?<![0-9a-f])([0-9a-f]{8})[0-9a-f]{32}(?![0-9a-f])|(dst_[0-9a-f]{12}_)[A-Za-z0-9_-]{43}")


def redact(text: str) -> str:
    """``text`` with every transfer key and token cut short (``9f1c2e3a…``, ``dst_<id>_…``)."""
    return _SECRET.sub(lambda match: (match[1] or match[2]) + "…", text)


def printable(text: str) -> str:
    """``text`` with every control or non-printable character escaped (``\\x1b``, ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class RedactingFormatter(logging.Formatter):
    """A formatter whose output (message, arguments, traceback) never holds a whole key or token."""

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        #: The second last formatted and its text: every access line of a second shares it.
        self._stamp: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        """As logging's default (``2026-01-02 03:04:05,678``), the second's text made once."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (second, time.strftime(self.default_time_format, self.converter(record.created)))
        return f"{stamp[1]},{int(record.msecs):03d}"


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes lines in batches: those below WARNING at most :data:`FLUSH_DELAY`
    after the first of them waits, or as soon as :data:`BATCH_BYTES` wait; a WARNING or worse at
    once, with everything before it. A busy store logs thousands of access lines a second, and one
    write to standard error per line cost more than the line."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[str] = []
        self._size = 0
        self._timer: threading.Timer | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (Handler.handle).
        try:
            text = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(text)
        self._size += len(text)
        if record.levelno >= logging.WARNING or self._size >= BATCH_BYTES:
            self._write()
        elif self._timer is None:
            self._timer = threading.Timer(FLUSH_DELAY, self.flush)
            self._timer.daemon = True
            self._timer.start()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._write()

    def _write(self) -> None:
        if not self._pending:
            return
        text, self._pending, self._size = "".join(self._pending), [], 0
        # A closed or broken standard error loses the lines; it must not break the store.
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        self.flush()
        super().close()


#: Longest a line below WARNING waits to be written (seconds), and most bytes that wait.
FLUSH_DELAY = 0.2
BATCH_BYTES = 64 << 10


#: The layout of ``datastore serve``'s log lines; ``source`` is put before the logger's name (a worker's number).
LOG_FORMAT = "%(asctime)s %(levelname)s {source}%(name)s: %(message)s"


def log_to_stderr(level: int, source: str = "") -> None:
    """Send every record at ``level`` and above to standard error, redacted (``datastore serve``)."""
    handler = BatchingStreamHandler()
    handler.setFormatter(RedactingFormatter(LOG_FORMAT.format(source=f"{source} " if source else "")))
    logging.basicConfig(level=level, handlers=[handler])
    # The lines show none of the thread's or process's names, which every record would look up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
