"""One reader of the output streams per gateway process, fanned out to every SSE client.

Why it is built this way:

* **One reader, many followers.** A thousand browsers following one meeting must not mean a
  thousand ``XREAD`` loops on Redis. The hub keeps one *topic* per followed stream and one
  reader thread that blocks in a single ``XREAD`` over every topic's output stream (on a
  Redis Cluster, where one ``XREAD`` cannot span hash slots, one reader per followed
  stream). Each entry it reads is turned into an event once (parsed, citations resolved,
  serialized) and handed to every subscriber's queue on the event loop.
* **No gap, no duplicate.** A topic's ``cursor`` is the last entry id the hub delivered, moved
  only on the event loop. A subscriber registers first and learns the cursor ``C`` at that
  moment: everything up to ``C`` it reads from Redis itself (``XRANGE`` after its
  ``Last-Event-ID``), everything after ``C`` arrives in its queue; it drops ids it already
  sent. So a follower that reconnects with ``Last-Event-ID`` (to this process or, after a
  restart, to a new one) misses nothing.
* **Slow clients cannot hold the hub.** A subscriber's queue is bounded; one that falls
  that far behind is closed (its browser reconnects with ``Last-Event-ID`` and catches up
  from Redis), so one stalled connection never delays the others or grows memory.
* **Sync Redis in a thread.** The reader uses the same client factory as every other process
  (TLS, Sentinel, Cluster, ACL users: ``state_store.connection``), so the gateway follows
  any deployment the workers do.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from monitoring import gateway_metrics as m
from sinkstream.contracts.keys import StreamKeys
from sinkstream.ids import entry_id_key
from state_store.replies import as_text

log = logging.getLogger(__name__)

#: How long one XREAD blocks: the longest a newly followed stream waits to join the read
#: (its subscribers catch up from Redis meanwhile, so nothing is missed).
BLOCK_MS = 1000
READ_COUNT = 500
QUEUE_SIZE = 1024
_WARN_EVERY_S = 30.0


@dataclass(frozen=True)
class Event:
    """One output entry, ready to send: ``data`` is serialized once for every client."""

    id: str
    kind: str
    request: str
    data: str


#: Turns raw output entries of one stream into events (runs in the reader thread).
EventBuilder = Callable[[str, list[tuple[str, dict[str, str]]]], list[Event]]


class Subscriber:
    """One SSE client's queue. ``None`` in the queue means: closed, reconnect."""

    def __init__(self, stream_id: str, cursor: str) -> None:
        self.stream_id = stream_id
        self.cursor = cursor  # the topic's cursor when this subscriber registered
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_SIZE)
        self.closed = False

    def offer(self, event: Event) -> bool:
        """Queue ``event``; False (and closed) when the client is too far behind."""
        if self.closed:
            return False
        try:
            self.queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            self.close()
            return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            while True:  # make room for the end marker
                try:
                    self.queue.put_nowait(None)
                    return
                except asyncio.QueueFull:
                    self.queue.get_nowait()

    async def next(self) -> Event | None:
        return await self.queue.get()


@dataclass
class _Topic:
    cursor: str
    subscribers: set[Subscriber] = field(default_factory=set)


class _Reader:
    """A thread that blocks in one XREAD over its streams' output keys."""

    def __init__(self, hub: Hub, name: str) -> None:
        self.hub = hub
        self.positions: dict[str, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"sse-reader-{name}", daemon=True)
        self.last_ok = time.monotonic()

    def set(self, stream_id: str, position: str | None) -> None:
        with self.lock:
            if position is None:
                self.positions.pop(stream_id, None)
            else:
                self.positions[stream_id] = position

    def _run(self) -> None:
        warned = 0.0
        while not self.stop.is_set():
            with self.lock:
                positions = dict(self.positions)
            if not positions:
                self.stop.wait(0.05)
                self.last_ok = time.monotonic()
                continue
            try:
                self._read_once(positions)
                self.last_ok = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - the reader must outlive any one read
                now = time.monotonic()
                if now - warned > _WARN_EVERY_S:
                    warned = now
                    log.warning("SSE reader: %s: %s; retrying", type(exc).__name__, exc,
                                exc_info=not isinstance(exc, redis.RedisError))
                self.stop.wait(0.5)

    def _read_once(self, positions: dict[str, str]) -> None:
        keys: dict[Any, Any] = {StreamKeys.of(s).output: p for s, p in positions.items()}
        reply: Any = self.hub.client.xread(keys, count=READ_COUNT, block=BLOCK_MS)
        for key, entries in reply or []:
            stream_id = as_text(key).split("{", 1)[1].rsplit("}", 1)[0]
            raw = [(as_text(eid), {as_text(k): as_text(v, "replace") for k, v in f.items()})
                   for eid, f in entries]
            if not raw:
                continue
            events = self.hub.build(stream_id, raw)  # may fail: then read again, from here
            with self.lock:
                if stream_id in self.positions:
                    self.positions[stream_id] = raw[-1][0]
            self.hub.post(stream_id, events)


class Hub:
    """Topics, subscribers and the reader threads of one gateway process."""

    def __init__(self, client: redis.Redis, build: EventBuilder, *, cluster: bool = False) -> None:
        self.client = client
        self.build = build
        self.cluster = cluster
        self.topics: dict[str, _Topic] = {}
        self.readers: dict[str, _Reader] = {}
        self._creating: dict[str, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def stop(self) -> None:
        for reader in self.readers.values():
            reader.stop.set()
        for topic in self.topics.values():
            for sub in topic.subscribers:
                sub.close()
        self.topics.clear()

    def healthy(self, max_age_s: float = 10.0) -> bool:
        """Every reader thread alive and through a read (or idle) recently."""
        now = time.monotonic()
        return all(r.thread.is_alive() and now - r.last_ok < max_age_s
                   for r in self.readers.values())

    @property
    def subscribers(self) -> int:
        return sum(len(t.subscribers) for t in self.topics.values())

    # --- subscribing -------------------------------------------------------------------
    async def subscribe(self, stream_id: str) -> Subscriber:
        """Register a subscriber on ``stream_id``'s topic (created on first use)."""
        while stream_id not in self.topics:
            pending = self._creating.get(stream_id)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            assert self._loop is not None, "Hub.start() was not called"
            future: asyncio.Future[None] = self._loop.create_future()
            self._creating[stream_id] = future
            try:
                cursor = await asyncio.to_thread(self._last_id, stream_id)
                self.topics[stream_id] = _Topic(cursor)
                self._reader_for(stream_id).set(stream_id, cursor)
            finally:
                del self._creating[stream_id]
                future.set_result(None)
        topic = self.topics[stream_id]
        sub = Subscriber(stream_id, topic.cursor)
        topic.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.closed = True
        topic = self.topics.get(sub.stream_id)
        if topic is None:
            return
        topic.subscribers.discard(sub)
        if not topic.subscribers:
            del self.topics[sub.stream_id]
            self._reader_for(sub.stream_id).set(sub.stream_id, None)

    def _last_id(self, stream_id: str) -> str:
        last: Any = self.client.xrevrange(StreamKeys.of(stream_id).output, count=1)
        return as_text(last[0][0]) if last else "0-0"

    def _reader_for(self, stream_id: str) -> _Reader:
        name = stream_id if self.cluster else "all"
        reader = self.readers.get(name)
        if reader is None or not reader.thread.is_alive():
            reader = _Reader(self, name)
            self.readers[name] = reader
            reader.thread.start()
        return reader

    # --- delivering (reader thread -> event loop) ----------------------------------------
    def post(self, stream_id: str, events: list[Event]) -> None:
        if self._loop is not None and events:
            self._loop.call_soon_threadsafe(self._deliver, stream_id, events)

    def _deliver(self, stream_id: str, events: list[Event]) -> None:
        topic = self.topics.get(stream_id)
        if topic is None:
            return
        for event in events:
            if entry_id_key(event.id) <= entry_id_key(topic.cursor):
                continue  # read again after a topic was re-created: subscribers have it
            topic.cursor = event.id
            for sub in list(topic.subscribers):
                if not sub.offer(event):
                    topic.subscribers.discard(sub)
                    m.SSE_DROPPED.inc()
