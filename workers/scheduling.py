"""Which streams need a task, and making sure each has exactly one.

A stream with unread input gets one pending task at a time: the ``scheduled`` key is set NX
before a task is enqueued and cleared when the task finds nothing more to do. A task that still
has input re-enqueues itself at the back of the queue, so a busy stream takes turns with the
others (fairness) instead of draining itself first. The flag expires after
``schedule_ttl_seconds`` and running tasks refresh it, so a task lost with a killed worker is
re-scheduled by the dispatcher once the flag lapses; leases and fencing make any duplicate
harmless.

The dispatcher runs in every worker (they race harmlessly on the NX flag). It polls the stream
registry, pipelining a few cheap commands per stream, and now and then scans for input streams
written by raw ``XADD`` that no producer registered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from state_store.keys import STREAMS_REGISTRY, InvalidStreamId, StreamKeys, validate_stream_id

log = logging.getLogger(__name__)

Enqueue = Callable[[str], None]
_PIPELINE_STREAMS = 500


def entry_id_key(entry_id: str | bytes | None) -> tuple[int, int]:
    """Redis Stream ids compare as (milliseconds, sequence)."""
    if not entry_id:
        return (-1, -1)
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return (int(ms), int(seq or 0))


class Scheduler:
    """Sets and clears the per-stream ``scheduled`` flag around enqueueing tasks."""

    def __init__(self, client: redis.Redis, enqueue: Enqueue, flag_ttl_s: float) -> None:
        self.client = client
        self.enqueue = enqueue
        self.flag_ttl_ms = max(1, int(flag_ttl_s * 1000))

    def schedule(self, stream_id: str) -> bool:
        """Enqueue a task for the stream unless one is already pending."""
        keys = StreamKeys.of(stream_id)
        if not self.client.set(keys.scheduled, "1", nx=True, px=self.flag_ttl_ms):
            return False
        try:
            self.enqueue(stream_id)
        except BaseException:
            self.client.delete(keys.scheduled)
            raise
        return True

    def refresh(self, stream_id: str) -> None:
        self.client.pexpire(StreamKeys.of(stream_id).scheduled, self.flag_ttl_ms)

    def after_batch(self, stream_id: str, more: bool) -> None:
        """Called by a task when its batch is done: continue, or hand the stream back."""
        keys = StreamKeys.of(stream_id)
        if more:
            self.client.set(keys.scheduled, "1", px=self.flag_ttl_ms)
            self.enqueue(stream_id)
            return
        self.client.delete(keys.scheduled)
        # Input that arrived between our read and the delete would otherwise wait for the
        # dispatcher's next poll; look once more now.
        if self.needs_work([stream_id]):
            self.schedule(stream_id)

    def needs_work(self, stream_ids: Iterable[str]) -> list[str]:
        """Streams with input after their committed entry, not failed and not scheduled."""
        ids = list(stream_ids)
        pipe = self.client.pipeline(transaction=False)
        for sid in ids:
            keys = StreamKeys.of(sid)
            pipe.xrevrange(keys.input, count=1)
            pipe.hget(keys.state, "last_entry_id")
            pipe.exists(keys.scheduled)
            pipe.hget(keys.meta, "status")
        replies = pipe.execute()
        out = []
        for i, sid in enumerate(ids):
            last, committed, scheduled, status = replies[4 * i : 4 * i + 4]
            if not last or scheduled or status == b"failed":
                continue
            if entry_id_key(last[0][0]) > entry_id_key(committed):
                out.append(sid)
        return out


class Dispatcher:
    """Background thread: find streams with unread input and schedule them."""

    def __init__(
        self,
        client: redis.Redis,
        scheduler: Scheduler,
        interval_s: float,
        discover_interval_s: float,
    ) -> None:
        self.client = client
        self.scheduler = scheduler
        self.interval_s = interval_s
        self.discover_interval_s = discover_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sinkstream-dispatcher",
                                        daemon=True)
        self._last_discover = 0.0
        self._failing_since: float | None = None

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def poll_once(self) -> int:
        """One pass over the registry; returns how many streams were scheduled."""
        now = time.monotonic()
        if now - self._last_discover >= self.discover_interval_s:
            self._last_discover = now
            self.discover()
        scheduled = 0
        members: Any = self.client.zrange(STREAMS_REGISTRY, 0, -1)
        stream_ids = [_text(m) for m in members]
        for start in range(0, len(stream_ids), _PIPELINE_STREAMS):
            for sid in self.scheduler.needs_work(stream_ids[start : start + _PIPELINE_STREAMS]):
                scheduled += int(self.scheduler.schedule(sid))
        return scheduled

    def discover(self) -> int:
        """Register input streams created by raw XADD (not on a hot path: a SCAN)."""
        found = 0
        for key in self.client.scan_iter(match="sinkstream:{*}:in", count=1000, _type="STREAM"):
            text = _text(key)
            sid = text[len("sinkstream:{") : -len("}:in")]
            try:
                validate_stream_id(sid)
            except InvalidStreamId:
                continue
            added: Any = self.client.zadd(STREAMS_REGISTRY, {sid: time.time()}, nx=True)
            found += int(added)
        if found:
            log.info("dispatcher: registered %d stream(s) written without the producer", found)
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
                if self._failing_since is not None:
                    log.warning("dispatcher: Redis is back after %.1fs",
                                time.monotonic() - self._failing_since)
                    self._failing_since = None
            except redis.RedisError as exc:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("dispatcher: Redis unavailable (%s); retrying every %.2fs",
                                exc, self.interval_s)
            except Exception:
                log.exception("dispatcher: unexpected error; continuing")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
