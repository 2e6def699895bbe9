"""The store's metrics: every ``datastore_*`` series, defined here once, the small functions that
count them, and the page that shows them in the Prometheus text format.

This module owns the metric definitions (names with their units, help texts, labels and the values
each label may take) and the rendering of the page. It imports nothing of aiohttp, so that every
layer can count through it: the HTTP layer (bodies, downloads, connections, request latency), and the
upload lifecycle and event hooks through :func:`upload_ended`, :func:`event_emitted`,
:func:`event_subscriber_dropped`, :func:`set_hook_backlog` and :func:`hook_delivery`. The page's
handler, and who may read it, is :mod:`datastore.http.metrics_page`.

**Processes.** ``prometheus_client`` decides when it is first imported whether values live in the
process's memory or in files that several processes share (its multiprocess mode: when
``PROMETHEUS_MULTIPROC_DIR`` names a directory). ``datastore serve --workers N`` names a directory of
its own for its workers (:func:`use_multiprocess_dir`, before they start; they are spawned, not
forked, so each imports ``prometheus_client`` afresh), each worker writes its own files, and the page
sums them whichever worker answers; when a worker dies, :func:`worker_died` drops its gauges (its
counters stay in the sums). Anywhere else (one process, an application embedding the store) the
values live in memory and nothing global changes: the metrics are in :data:`REGISTRY`, not in
``prometheus_client``'s default registry (an application that wants them on its own page may
register :data:`REGISTRY` there).

**Labels** take only values from sets fixed in code (route patterns, methods, outcomes, hook
numbers), never text a client chose: every new label value is a new series kept for as long as the
process lives, so a label a client could vary at will would let it grow the page and the memory
without end.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

#: The variable that puts ``prometheus_client`` in multiprocess mode, naming the directory of its files.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: What the page is served as: the Prometheus text format 0.0.4, which every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The store's own metrics (in one process; in multiprocess mode the page reads the workers' files).
REGISTRY = CollectorRegistry(auto_describe=True)

# -- bytes, downloads, connections, requests ---------------------------------------------------------

UPLOAD_RECEIVED = Counter(
    "datastore_upload_received_bytes_total",
    "Bytes of upload bodies received from clients: raw POST, PUT and tus PATCH bodies, and the fields of "
    "upload forms (not their multipart framing).",
    registry=REGISTRY,
)
DOWNLOAD_SENT = Counter(
    "datastore_download_sent_bytes_total",
    "Bytes of files sent in answers to downloads (GET), whole or ranges; an interrupted download counts "
    "what was handed to the connection.",
    registry=REGISTRY,
)

#: What became of a download (a GET of /{prefix}/{name}).
DOWNLOAD_OUTCOMES = (
    "ok",  # 200, the whole file
    "partial",  # 206, a Range
    "not_modified",  # 304
    "not_found",  # 404
    "refused",  # 401, 403
    "bad_request",  # 400, a name that cannot be
    "precondition_failed",  # 412
    "range_not_satisfiable",  # 416
    "interrupted",  # the connection failed while the answer was sent
    "error",  # anything else
)
DOWNLOADS = Counter(
    "datastore_downloads_total",
    "Downloads (GET of a file), by outcome: ok, partial (a Range), not_modified, not_found, refused, "
    "bad_request, precondition_failed, range_not_satisfiable, interrupted, error.",
    ["outcome"],
    registry=REGISTRY,
)

CONNECTIONS_ACTIVE = Gauge(
    "datastore_connections_active",
    "Connections open now (admitted, TLS handshakes under way included), summed over worker processes.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
#: Why a connection was refused: the setting whose limit it met.
REFUSAL_REASONS = ("max_connections", "max_connections_per_client")
CONNECTIONS_REFUSED = Counter(
    "datastore_connections_refused_total",
    "Connections refused (503, then closed) by reason: the limit they met, max_connections (of a worker) "
    "or max_connections_per_client.",
    ["reason"],
    registry=REGISTRY,
)

#: Methods counted under their own name; any other is "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Uploads and downloads of large files take minutes: the buckets reach ten.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
REQUEST_DURATION = Histogram(
    "datastore_http_request_duration_seconds",
    "Seconds from the start of a request until its answer's status line and headers were sent (an upload's "
    "includes receiving its body; a download's body is sent after), by route pattern, method and status class.",
    ["route", "method", "status_class"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)

UPLOADS_ACTIVE = Gauge(
    "datastore_uploads_active",
    "Uploads running now (requests writing a file), summed over worker processes.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)

# -- the upload lifecycle and events (counted by the lifecycle layer) -----------------------------------

#: How an upload ended.
UPLOAD_OUTCOMES = ("completed", "failed", "interrupted", "cancelled")
UPLOADS = Counter(
    "datastore_uploads_total",
    "Uploads that ended, by outcome (completed, failed, interrupted, cancelled) and reason (an error code).",
    ["outcome", "reason"],
    registry=REGISTRY,
)
EVENTS = Counter(
    "datastore_events_total",
    "Events emitted, by type.",
    ["type"],
    registry=REGISTRY,
)
SUBSCRIBERS_DROPPED = Counter(
    "datastore_event_subscribers_dropped_total",
    "Event subscribers dropped because they fell too far behind.",
    registry=REGISTRY,
)
HOOK_BACKLOG = Gauge(
    "datastore_hook_backlog_events",
    "Events waiting to be delivered to a webhook, by hook (its number in the configuration), summed over "
    "worker processes.",
    ["hook"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
#: What became of one attempt to deliver an event to a webhook.
HOOK_OUTCOMES = ("delivered", "failed", "dropped")
HOOK_DELIVERIES = Counter(
    "datastore_hook_deliveries_total",
    "Attempts to deliver events to webhooks, by hook (its number in the configuration) and outcome: "
    "delivered, failed (to be tried again), dropped (given up).",
    ["hook", "outcome"],
    registry=REGISTRY,
)

# Every outcome and reason from the start, at 0 (a series that appears only when it first counts
# reads as no change to rate() and increase()); the children of the labels counted on every request
# are kept, as a lookup costs less than labels().
_DOWNLOADS = {outcome: DOWNLOADS.labels(outcome=outcome) for outcome in DOWNLOAD_OUTCOMES}
_REFUSALS = {reason: CONNECTIONS_REFUSED.labels(reason=reason) for reason in REFUSAL_REASONS}
_DURATIONS: dict[tuple[str, str, str], Histogram] = {}


# -- counting ---------------------------------------------------------------------------------------


def count_received(size: int) -> None:
    """``size`` bytes of an upload's body arrived."""
    UPLOAD_RECEIVED.inc(size)


def count_download(outcome: str, sent: int) -> None:
    """A download ended with ``outcome`` (one of :data:`DOWNLOAD_OUTCOMES`) after sending ``sent`` bytes of the file."""
    counter = _DOWNLOADS.get(outcome)
    if counter is None:
        raise ValueError(f"{outcome!r} is none of {', '.join(DOWNLOAD_OUTCOMES)}")
    counter.inc()
    if sent:
        DOWNLOAD_SENT.inc(sent)


def connection_opened() -> None:
    """A connection was admitted."""
    CONNECTIONS_ACTIVE.inc()


def connection_closed() -> None:
    """An admitted connection closed."""
    CONNECTIONS_ACTIVE.dec()


def connection_refused(reason: str) -> None:
    """A connection was refused by the limit ``reason`` (one of :data:`REFUSAL_REASONS`)."""
    counter = _REFUSALS.get(reason)
    if counter is None:
        raise ValueError(f"{reason!r} is none of {', '.join(REFUSAL_REASONS)}")
    counter.inc()


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """A request of ``route`` (the router's pattern, such as ``/{prefix}/{name}``: never the path, which
    the client chose) was answered with ``status`` after ``seconds``."""
    key = (route, method if method in METHODS else "other", _STATUS_CLASSES.get(status // 100, "other"))
    child = _DURATIONS.get(key)
    if child is None:
        child = _DURATIONS[key] = REQUEST_DURATION.labels(route=key[0], method=key[1], status_class=key[2])
    child.observe(seconds)


_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def upload_started() -> None:
    """An upload began writing a file (in this process)."""
    UPLOADS_ACTIVE.inc()


def upload_stopped() -> None:
    """An upload that :func:`upload_started` stopped, whatever its end."""
    UPLOADS_ACTIVE.dec()


def upload_ended(outcome: str, reason: str = "none") -> None:
    """An upload ended: ``outcome`` is one of :data:`UPLOAD_OUTCOMES`; ``reason`` says why it failed,
    was interrupted or cancelled, as an error code (:attr:`datastore.errors.DatastoreError.code`, such
    as ``checksum_mismatch``), ``none`` for a completed one. A reason that is not such a code (lower
    case letters, digits, ``_`` and ``.``) counts as ``other``: never pass a message."""
    UPLOADS.labels(outcome=_one_of(outcome, UPLOAD_OUTCOMES), reason=_code(reason)).inc()


def event_emitted(event_type: str) -> None:
    """An event of ``event_type`` (a name fixed in code, such as ``upload.completed``) was emitted."""
    EVENTS.labels(type=_code(event_type)).inc()


def event_subscriber_dropped() -> None:
    """A subscriber to events was dropped (it fell too far behind)."""
    SUBSCRIBERS_DROPPED.inc()


def set_hook_backlog(hook: int, events: int) -> None:
    """``events`` events are waiting, in this process, to be delivered to webhook number ``hook`` (its
    position in the configuration: never its URL, which may carry credentials)."""
    HOOK_BACKLOG.labels(hook=_hook(hook)).set(events)


def hook_delivery(hook: int, outcome: str, count: int = 1) -> None:
    """``count`` attempts to deliver an event to webhook number ``hook`` ended with ``outcome`` (one of
    :data:`HOOK_OUTCOMES`; ``dropped``: events skipped unsent)."""
    HOOK_DELIVERIES.labels(hook=_hook(hook), outcome=_one_of(outcome, HOOK_OUTCOMES)).inc(count)


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is none of {', '.join(allowed)}")
    return value


_CODE = re.compile(r"[a-z][a-z0-9_.]{0,63}")


def _code(value: str) -> str:
    return value if _CODE.fullmatch(value) else "other"


def _hook(hook: int) -> str:
    if isinstance(hook, bool) or not isinstance(hook, int) or not 0 <= hook < 1000:
        raise ValueError(f"a webhook is labelled by its number in the configuration, not {hook!r}")
    return str(hook)


# -- processes ----------------------------------------------------------------------------------------


def multiprocess_dir() -> str | None:
    """The directory of the worker processes' metric files, if this process counts into one."""
    if values.ValueClass is values.MutexValue:
        return None
    return os.environ.get(MULTIPROC_ENV)


def use_multiprocess_dir(path: Path) -> None:
    """Make ``path`` an empty directory for the metric files of the processes started from now on, and
    name it in the environment they inherit.

    For a supervisor (``serve --workers N``), before it starts the workers: its own values stay in its
    memory (``prometheus_client`` chose when it was imported). Files of an earlier run are removed.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)


def worker_died(pid: int) -> None:
    """Worker process ``pid`` ended: its gauges (connections, uploads running) leave the page; its
    counters and histograms stay in the sums."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        with contextlib.suppress(OSError):  # a file gone already is as good as removed
            mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


# -- the page -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreGauges:
    """What the page reports of the store's state, measured when it is asked for (shared by every worker,
    so measured by the one that answers rather than counted by each)."""

    #: Bytes in the staging directory: uploads received but not yet published.
    staged_bytes: int
    #: Bytes that open transfers may still write (declared sizes less what is staged).
    reserved_bytes: int
    #: Free and total bytes of the disk that holds the staging directory (and so the files).
    disk_free_bytes: int
    disk_size_bytes: int


def render(gauges: StoreGauges) -> bytes:
    """The page: the store's metrics (of every worker, in multiprocess mode) and ``gauges``.

    Reads the workers' files in multiprocess mode: call it off the event loop.
    """
    registry = CollectorRegistry(auto_describe=False)
    directory = multiprocess_dir()
    if directory is not None:
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry.register(_WithoutCreated(REGISTRY))
    registry.register(_Gauges(gauges))
    return generate_latest(registry)


class _WithoutCreated(Collector):
    """``collector``'s metrics without their ``_created`` samples, so that the page of one process reads
    as the page of several (the multiprocess collector has none) and carries no series it does not need."""

    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def collect(self) -> Iterable[Metric]:
        for metric in self._collector.collect():
            kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            kept.samples = [sample for sample in metric.samples if not sample.name.endswith("_created")]
            yield kept


class _Gauges(Collector):
    def __init__(self, gauges: StoreGauges) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        gauges = self._gauges
        yield GaugeMetricFamily(
            "datastore_staged_bytes",
            "Bytes in the staging directory: uploads received and not yet published.",
            value=gauges.staged_bytes,
        )
        yield GaugeMetricFamily(
            "datastore_reserved_bytes",
            "Bytes that open transfers may still write (their files' declared sizes less what is staged).",
            value=gauges.reserved_bytes,
        )
        yield GaugeMetricFamily(
            "datastore_disk_free_bytes",
            "Free bytes on the disk that holds the staging directory and the files.",
            value=gauges.disk_free_bytes,
        )
        yield GaugeMetricFamily(
            "datastore_disk_size_bytes",
            "Size in bytes of the disk that holds the staging directory and the files.",
            value=gauges.disk_size_bytes,
        )
