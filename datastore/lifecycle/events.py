"""The event bus: reads the persisted event log in order and hands each event to whoever listens.

Every event a process commits (its own, and with ``--workers`` or several nodes those of the
others) is read back from the log (``EventLog.events_after``) by one tailing task per process, in
id order, which is commit order; so each listener sees the events of one transfer in the order they
happened, and each once. This process's changes reach the bus at once (``wake``: handed on as
committed when nothing came between, else read back) and other processes' are looked for every
``poll_interval``.

Listeners:

- **Callbacks** (:meth:`EventBus.subscribe`: applications embedding the server, a handler's
  ``on_event``): each has its own bounded queue and task, so a slow or failing callback never slows
  the tail or an upload; a callback that raises is logged and goes on; one whose queue overflows is
  dropped with a logged warning.
- **Streams** (:meth:`EventBus.stream`: Server-Sent Events): a bounded queue the stream drains; on
  overflow the stream ends, and the client reconnects with ``Last-Event-ID`` to catch up from the
  log (:meth:`EventBus.replay`), losing nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .. import metrics
from ..protocol.timestamps import iso_time
from ..state.interface import EventLog
from .states import Event, EventType

log = logging.getLogger(__name__)

#: A subscriber: called with each event; may be a coroutine function.
Callback = Callable[[Event], Awaitable[None] | None]
#: Which events a listener wants.
Predicate = Callable[[Event], bool]

#: Events read from the log at once.
BATCH = 500
#: Events a callback may fall behind by before it is dropped.
QUEUE_SIZE = 10_000
#: Events a stream may fall behind by before it ends (its client catches up from the log).
STREAM_QUEUE_SIZE = 1000


@dataclass(eq=False, slots=True)
class Listener:
    """One listener's queue; ``overflowed`` once it fell too far behind (it gets nothing more)."""

    wants: Predicate
    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    overflowed: bool = False
    name: str = "listener"
    #: Set when the store stops: the stream ends.
    closed: bool = False

    async def next(self) -> Event | None:
        """The next event, or None once the stream must end (it fell behind, or the store stops)."""
        if self.closed or (self.overflowed and self.queue.empty()):
            return None
        event = await self.queue.get()
        return None if event is _STOP else event

    def offer(self, event: Event) -> bool:
        """Queue ``event`` if wanted; False if the queue was full (the listener is dropped)."""
        if self.overflowed or not self.wants(event):
            return True
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            return False
        return True


class EventBus:
    """The events of one store, as this process reads them from the log."""

    def __init__(self, *, queue_size: int = QUEUE_SIZE) -> None:
        self._listeners: set[Listener] = set()
        self._streams: set[Listener] = set()
        self._callbacks: dict[Listener, Callback] = {}
        self._tasks: dict[Listener, asyncio.Task[None]] = {}
        self._queue_size = queue_size
        self._log: EventLog | None = None
        self._wakeup: asyncio.Event | None = None
        self._tail: asyncio.Task[None] | None = None
        #: The id of the last event handed to listeners.
        self.position = 0
        #: How many listeners were dropped for falling behind.
        self.dropped = 0

    # -- running -------------------------------------------------------------------------------

    async def start(self, events: EventLog, *, poll_interval: float) -> None:
        """Begin tailing ``events`` from its newest event (what happened before is replayed on request)."""
        self._log = events
        self._wakeup = asyncio.Event()
        self.position = await events.last_event_id()
        self._tail = asyncio.create_task(self._run(poll_interval), name="datastore-events")
        for listener in self._callbacks:
            self._start_callback(listener)

    async def stop(self) -> None:
        """Stop tailing and every callback's task; events still queued for callbacks are delivered first."""
        if self._tail is not None:
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tail
            self._tail = None
        tasks = list(self._tasks.values())
        for listener in self._tasks:
            with contextlib.suppress(asyncio.QueueFull):
                listener.queue.put_nowait(_STOP)
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for task in tasks:
            task.cancel()
        self._tasks.clear()
        self._log = None

    def wake(self, committed: Sequence[Event] = ()) -> None:
        """This process committed events: read them now. Events that directly follow the last one
        read (``committed``, in id order: nothing of another transaction or process between) are
        handed on as they are, without reading the log back."""
        following = committed and self._log is not None and committed[0].id == self.position + 1
        if following and all(b.id == a.id + 1 for a, b in itertools.pairwise(committed)):
            for event in committed:
                self._dispatch(event)
            self.position = committed[-1].id
            return
        if self._wakeup is not None:
            self._wakeup.set()

    async def _run(self, poll_interval: float) -> None:
        assert self._wakeup is not None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._read()
            except Exception:
                log.exception("reading the event log failed")

    async def _read(self) -> None:
        assert self._log is not None
        while True:
            batch = await self._log.events_after(self.position, limit=BATCH)
            for event in batch:
                if event.id <= self.position:
                    continue  # handed on by wake meanwhile
                self._dispatch(event)
                self.position = event.id
            if len(batch) < BATCH:
                return

    def _dispatch(self, event: Event) -> None:
        for listener in list(self._listeners):
            if not listener.offer(event):
                self.dropped += 1
                metrics.event_subscriber_dropped()
                self._listeners.discard(listener)
                log.warning(
                    "the event listener %s fell %d events behind and was dropped", listener.name, listener.queue.maxsize
                )

    # -- callbacks -----------------------------------------------------------------------------

    def subscribe(
        self,
        callback: Callback,
        wants: Predicate | None = None,
        *,
        name: str | None = None,
        queue_size: int | None = None,
    ) -> Callable[[], None]:
        """Call ``callback`` with every event ``wants`` (default: all), in order; returns the unsubscriber.

        May be called before the bus starts. The callback runs in its own task: a slow one delays
        only itself (until it falls QUEUE_SIZE events behind and is dropped), one that raises is
        logged and called again with the next event.
        """
        size = queue_size if queue_size is not None else self._queue_size
        listener = Listener(wants or _everything, asyncio.Queue(size), name=name or _name_of(callback))
        self._callbacks[listener] = callback
        self._listeners.add(listener)
        if self._log is not None:
            self._start_callback(listener)

        def unsubscribe() -> None:
            self._listeners.discard(listener)
            self._callbacks.pop(listener, None)
            task = self._tasks.pop(listener, None)
            if task is not None:
                task.cancel()

        return unsubscribe

    def _start_callback(self, listener: Listener) -> None:
        if listener not in self._tasks:
            self._tasks[listener] = asyncio.create_task(
                self._call(listener), name=f"datastore-subscriber-{listener.name}"
            )

    async def _call(self, listener: Listener) -> None:
        callback = self._callbacks[listener]
        while True:
            event = await listener.queue.get()
            if event is _STOP:
                return
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("the event subscriber %s failed on event %d", listener.name, event.id)

    # -- streams -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stream(self, wants: Predicate, *, name: str = "stream") -> Iterator[Listener]:
        """A queue of the events ``wants`` from now on (ids above :attr:`position` as it is now)."""
        listener = Listener(wants, asyncio.Queue(STREAM_QUEUE_SIZE), name=name)
        self._listeners.add(listener)
        self._streams.add(listener)
        try:
            yield listener
        finally:
            self._listeners.discard(listener)
            self._streams.discard(listener)

    @property
    def streams(self) -> int:
        """How many streams are open."""
        return len(self._streams)

    def close_streams(self) -> None:
        """End every stream (the store stops): each gets None from :meth:`Listener.next`."""
        for listener in self._streams:
            listener.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                listener.queue.put_nowait(_STOP)

    async def replay(self, after: int, until: int, wants: Predicate) -> AsyncIterator[Event]:
        """The logged events with ids above ``after`` and up to ``until`` that ``wants``, in order."""
        if self._log is None:
            return
        position = after
        while position < until:
            batch = await self._log.events_after(position, limit=BATCH)
            if not batch:
                return
            for event in batch:
                if event.id > until:
                    return
                position = event.id
                if wants(event):
                    yield event


#: Put in a callback's queue to end its task after what was queued before.
_STOP = Event(type=EventType.FILE_PROGRESS, prefix="", id=-1)


def _everything(_: Event) -> bool:
    return True


def _name_of(callback: Callback) -> str:
    return getattr(callback, "__qualname__", None) or type(callback).__name__


def transfer_handle(key: str) -> str:
    """A stable name for a transfer that does not give its key away (the key is a capability): the
    first 16 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def event_document(event: Event, *, key_visible: bool, owner_visible: bool) -> dict[str, object]:
    """The JSON form of ``event`` that listeners receive (SSE data, webhook bodies, ``datastore watch``).

    ``transfer`` names the transfer for everyone who may see the event; ``transfer_key`` and
    ``owner`` are only filled in for those ``key_visible`` and ``owner_visible`` say may see them.
    A transfer job's event has its own form (:func:`job_event_document`).
    """
    if is_job_event(event):
        return job_event_document(event, owner_visible=owner_visible)
    return {
        "id": event.id,
        "type": str(event.type),
        "time": iso_time(event.time),
        "prefix": event.prefix,
        "transfer": transfer_handle(event.key) if event.key is not None else None,
        "transfer_key": event.key if key_visible else None,
        "file": event.num,
        "name": event.name,
        "owner": event.owner if owner_visible else None,
        "bytes": event.bytes,
        "size": event.size,
        "md5": event.md5,
        "sha256": event.sha256,
        "reason": event.reason,
    }


def is_job_event(event: Event) -> bool:
    """Whether ``event`` is a transfer job's (``job.*``) rather than a transfer's."""
    return event.type.startswith("job.")


def job_event_document(event: Event, *, owner_visible: bool = True) -> dict[str, object]:
    """The JSON form of a transfer job's event: the job's id, the file's index and destination (as
    ``public_url`` shows it), bytes, digests and the reason of a failure."""
    return {
        "id": event.id,
        "type": str(event.type),
        "time": iso_time(event.time),
        "job": event.key,
        "file": event.num,
        "destination": event.name,
        "owner": event.owner if owner_visible else None,
        "bytes": event.bytes,
        "size": event.size,
        "md5": event.md5,
        "sha256": event.sha256,
        "reason": event.reason,
    }
