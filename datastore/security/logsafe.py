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

import logging
import re
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


#: The layout of ``datastore serve``'s log lines; ``source`` is put before the logger's name (a worker's number).
LOG_FORMAT = "%(asctime)s %(levelname)s {source}%(name)s: %(message)s"


def log_to_stderr(level: int, source: str = "") -> None:
    """Send every record at ``level`` and above to standard error, redacted (``datastore serve``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter(LOG_FORMAT.format(source=f"{source} " if source else "")))
    logging.basicConfig(level=level, handlers=[handler])
    # The lines show none of the thread's or process's names, which every record would look up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
