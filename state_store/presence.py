"""Which workers are alive: one heartbeat per task slot in the ``WORKERS`` sorted set.

Cross-stream batching needs it: a task may claim other runnable streams as companions, and
without knowing how many workers share the work, the first worker to take a task would claim
a small workload whole while the others idle. With the live count, each task holds at most its
even share of the runnable streams (``workers/processing/multistream.py``).

Invariants: a member lives ``ttl_s`` after its last heartbeat, measured on the Redis server's
clock (``worker_presence.lua``), so a killed worker drops out within ``ttl_s`` and hosts with
skewed clocks agree; a worker that shuts down cleanly leaves at once. The count is a hint for
sharing work, never a lock: being wrong for a few seconds only makes a share larger or
smaller, and every stream is still fenced by its own lease.
"""

from __future__ import annotations

import logging
import threading

import redis

from sinkstream.contracts.keys import WORKERS
from state_store import scripts
from state_store.connection import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

#: a heartbeat lasts this long; ``Heartbeat`` renews it three times as often
DEFAULT_TTL_S = 15.0


class WorkerPresence:
    """A worker's entry in ``WORKERS``: ``beat`` keeps it live, ``leave`` drops it, and
    ``live`` counts every live worker's task slots."""

    def __init__(self, client: redis.Redis, worker_id: str, slots: int = 1,
                 ttl_s: float = DEFAULT_TTL_S) -> None:
        if slots < 1 or ttl_s <= 0:
            raise ValueError("slots must be >= 1 and ttl_s > 0")
        self.worker_id = worker_id
        self.slots = slots
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._script = client.register_script(scripts.WORKER_PRESENCE)

    def beat(self) -> int:
        """Mark this worker's slots live for ``ttl_s``; returns the live slots, its own included."""
        return self._call(self.worker_id, self.ttl_ms)

    def leave(self) -> int:
        """Drop this worker's slots now (a clean shutdown); returns the slots still live."""
        return self._call(self.worker_id, 0)

    def live(self) -> int:
        """Live task slots of every worker, this one included only while its beats last."""
        return self._call("", 0)

    def _call(self, worker_id: str, ttl_ms: int) -> int:
        return int(self._script(keys=[WORKERS], args=[worker_id, ttl_ms, self.slots]))


def live_slots(client: redis.Redis, now_ms: int | None = None) -> int:
    """Live task slots, read-only (a monitoring user may lack write access): members whose
    heartbeat expires after ``now_ms``, the server's clock by default."""
    if now_ms is None:
        seconds, micros = client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
    return int(client.zcount(WORKERS, now_ms, "+inf"))


class Heartbeat:
    """Background thread: ``presence.beat()`` every third of its TTL, until ``stop``. The
    first beat runs in ``start``, so a worker counts as live from then on."""

    def __init__(self, presence: WorkerPresence) -> None:
        self.presence = presence
        self._refused = False  # the last beat was refused (logged once per refusal spell)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sinkstream-heartbeat",
                                        daemon=True)

    @property
    def beating(self) -> bool:
        """Beating in this process (a forked child inherits the object, not the thread)."""
        return self._thread.is_alive()

    def start(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and leave, so the other workers' shares grow at once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self.presence.leave()
        except redis.RedisError as exc:  # the entry expires on its own
            log.debug("heartbeat: cannot leave the live-worker set (%s)", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.presence.ttl_ms / 3000):
            self._beat()

    def _beat(self) -> None:
        try:
            self.presence.beat()
            self._refused = False
        except TRANSIENT_ERRORS as exc:
            log.debug("heartbeat: Redis unavailable (%s); retrying in %.1fs", exc,
                      self.presence.ttl_ms / 3000)
        except redis.RedisError as exc:  # e.g. NOREPLICAS, or NOPERM from an older ACL
            if not self._refused:
                self._refused = True
                hint = (" (give the worker's ACL user the commands in deploy/redis/acl.conf)"
                        if isinstance(exc, redis.exceptions.NoPermissionError) else "")
                log.warning("heartbeat: Redis refused it: %s; until one succeeds, the other "
                            "workers do not count this one when they share streams%s", exc, hint)
