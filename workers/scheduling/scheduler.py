"""Which streams need a task, and making sure each has exactly one.

A stream with unread input gets one pending task at a time: the ``scheduled`` key is set NX
before a task is enqueued (here, by the dispatcher) and cleared when the task finds nothing more
to do. A task that still has input re-enqueues itself at the back of the queue, so a busy stream
takes turns with the others (fairness) instead of draining itself first. The task's side of the
flag (refreshed when it claims the stream, kept or dropped when it releases it) rides in the
claim and release scripts (``state_store/claims.py``). A queued task's flag expires after
``schedule_ttl_seconds``; a running task's follows its lease (the claim and every renewal set
it to the lease plus a second), so a task lost with a killed worker is re-scheduled by the
dispatcher (``workers/scheduling/dispatcher.py``) about a second after its lease lapses;
leases and fencing make any duplicate harmless.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.claims import FLAG_MARGIN_S
from state_store.scripts import NEEDS_WORK, run_script_each

log = logging.getLogger(__name__)

Enqueue = Callable[[str], None]
#: A busy stream's flag lapses this long after the holder's lease would expire.
_BUSY_FLAG_MARGIN_MS = int(FLAG_MARGIN_S * 1000)


class Scheduler:
    """Sets and clears the per-stream ``scheduled`` flag around enqueueing tasks."""

    def __init__(self, client: redis.Redis, enqueue: Enqueue, flag_ttl_s: float) -> None:
        self.client = client
        self.enqueue = enqueue
        self.flag_ttl_ms = max(1, int(flag_ttl_s * 1000))
        self._retry: set[str] = set()
        self._retry_lock = threading.Lock()
        #: tasks waiting in the broker queue (None: unknown) and the most the dispatcher keeps
        #: there; set by the worker (workers/tasks.py)
        self.backlog: Callable[[], int] | None = None
        self.max_backlog = 0

    def room(self) -> int:
        """How many new streams the dispatcher may enqueue now.

        A queue longer than the workers drain within ``schedule_ttl_seconds`` makes the flags
        of queued streams lapse before their tasks start, and the dispatcher then enqueued
        each of them again, every TTL: a burst of 10,000 new streams grew the queue without
        bound. Keeping at most ``max_backlog`` tasks queued bounds both the wait and the
        duplicates (continuations of running streams are not counted against it).
        """
        if self.backlog is None or self.max_backlog <= 0:
            return 1 << 62
        return self.max_backlog - self.backlog()

    def retry_later(self, stream_id: str) -> None:
        """A task lost Redis mid-batch: re-enqueue the stream as soon as Redis answers again.

        The stream's ``scheduled`` flag may survive the outage (AOF keeps it with its expiry),
        so without this the stream would wait for the flag to lapse (``schedule_ttl_seconds``).
        The dispatcher thread drains these with its own backoff (:meth:`retry_pending`).
        """
        with self._retry_lock:
            self._retry.add(stream_id)

    def retry_pending(self) -> int:
        """Re-enqueue streams handed to :meth:`retry_later`; raises RedisError if still down."""
        with self._retry_lock:
            pending = sorted(self._retry)
        for stream_id in pending:
            self.client.set(StreamKeys.of(stream_id).scheduled, "1", px=self.flag_ttl_ms)
            self.enqueue(stream_id)
            with self._retry_lock:
                self._retry.discard(stream_id)
        return len(pending)

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

    def after_busy(self, stream_id: str) -> None:
        """A task found the stream leased by another worker (a duplicate delivery, or a task
        racing the holder's own continuation). The holder continues the stream itself, so the
        flag is left set, not cleared: clearing it made duplicates re-enqueue each other in a
        tight loop for as long as the holder's batch ran. It is only shortened to lapse a
        moment after the holder's lease would, so a holder that died is replaced then rather
        than after the full flag TTL."""
        keys = StreamKeys.of(stream_id)
        remaining: Any = self.client.pttl(keys.lease)
        if int(remaining) > 0:
            ttl = min(self.flag_ttl_ms, int(remaining) + _BUSY_FLAG_MARGIN_MS)
            self.client.pexpire(keys.scheduled, ttl)

    def needs_work(self, stream_ids: Iterable[str]) -> list[str]:
        """Streams with input after their committed entry, not failed and not scheduled
        (``NEEDS_WORK``, one script per stream, pipelined)."""
        ids = list(stream_ids)
        calls = [((k.input, k.state, k.scheduled, k.meta), ()) for k in map(StreamKeys.of, ids)]
        out = []
        for sid, reply in zip(ids, run_script_each(self.client, NEEDS_WORK, calls), strict=True):
            if isinstance(reply, redis.ConnectionError | redis.TimeoutError):
                raise reply
            if isinstance(reply, Exception):
                # one stream's bad key (e.g. its input is not a stream: WRONGTYPE) must not
                # stop the others from being scheduled
                log.debug("stream %s: skipped by the dispatcher (%s)", sid, reply)
            elif int(reply):
                out.append(sid)
        return out
