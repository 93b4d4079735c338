"""The dispatcher: finds streams with unread input and schedules them (``Scheduler``).

The dispatcher thread runs in every worker, but only one at a time dispatches: the one holding
the ``sinkstream:dispatcher`` leader key (SET NX with a TTL, renewed on every pass; another
worker takes over within the TTL when the leader dies). Leaving it to one worker keeps the
fleet's load on Redis independent of the number of workers (two acting at once, e.g. around a
takeover, only race harmlessly on the NX flag).

New input reaches the leader two ways:

* **Wake-ups (push).** A producer PUBLISHes the stream id on ``sinkstream:wake`` with every
  append (same round trip). The leader is subscribed and, as messages arrive, checks just those
  streams (deduplicated, in arrival order) and schedules them, so an entry is enqueued within
  milliseconds. A poll interval made every entry wait for the next poll plus the poll itself,
  and a poll costs one pipelined script per registered stream (~10 ms of a worker's CPU for
  1,000 streams, taken from the model by the GIL; ~31 ms with four plain commands each): with
  many streams that wait dominated entry latency and its spread over streams. Non-leaders are
  not subscribed.
* **New input keys (push).** A raw ``XADD`` that creates an input stream sends no wake-up;
  where the server publishes keyspace notifications for new keys, the leader hears of the new
  key at once (``workers/scheduling/keyspace.py``: one PSUBSCRIBE pattern, matched by Redis),
  registers the stream and schedules it: discovered within milliseconds instead of at the
  next discovery scan.
* **Full pass (safety net).** Every ``dispatch_interval_seconds`` the leader checks every
  registered stream, for what sends no wake-up: raw ``XADD`` writers, a task lost with its
  worker (its flag, which follows the lease while a task runs, lapsed), wake-ups lost while
  the leader changed or Redis reconnected (the leader subscribes before the pass that
  follows, so nothing falls in between), and streams skipped while the queue was full. Every
  ``discover_interval_seconds`` it also scans for input streams written by raw ``XADD`` that
  no producer registered (the fallback where keyspace notifications are unavailable).

With Redis Cluster the subscription is on one node (redis-py's ``ClusterPubSub``) and a
cluster forwards every PUBLISH to all nodes; with Sentinel it follows the master like every
other connection. After any Redis error the subscription is dropped and made again once Redis
answers, followed by a full pass. ``dispatch_wake = false`` turns wake-ups off (producers
publish none, the dispatcher polls only); ``keyspace_events = "off"`` the new-key events.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from sinkstream.contracts.keys import DISPATCHER_LEADER, STREAMS_REGISTRY, WAKE_CHANNEL
from sinkstream.ids import InvalidStreamId, validate_stream_id
from state_store.connection import Backoff, is_cluster
from state_store.replies import as_text
from state_store.scripts import DISPATCHER_LEAD
from workers.scheduling import keyspace
from workers.scheduling.scheduler import Scheduler

log = logging.getLogger(__name__)

_PIPELINE_STREAMS = 500
#: A full pass checks this many streams per pipeline, serving wake-ups in between.
_PASS_SLICE = 100
#: While Redis stays unreachable the dispatcher waits up to this long between attempts and
#: logs a reminder at most this often (one line per outage otherwise).
_OUTAGE_BACKOFF_CAP_S = 5.0
_OUTAGE_LOG_EVERY_S = 60.0
#: How many distinct invalid registry members are remembered (each is logged once).
_MAX_WARNED_IDS = 1000
#: Dispatcher leadership lasts max(this, 3 ticks) unless renewed: a dead leader's wake-ups go
#: unanswered until then.
_LEADER_TTL_MIN_S = 2.0
#: Longest one wait for wake-ups blocks: bounds how long stop() takes.
_WAKE_WAIT_S = 0.2
#: Longest wait for the server to confirm the wake-up subscription.
_SUBSCRIBE_WAIT_S = 1.0


class Dispatcher:
    """Background thread: find streams with unread input and schedule them (see the module
    docstring: wake-ups as they arrive, a full pass every ``interval_s``)."""

    def __init__(
        self,
        client: redis.Redis,
        scheduler: Scheduler,
        interval_s: float,
        discover_interval_s: float,
        wake: bool = True,
        keyspace_events: keyspace.Mode = "auto",
    ) -> None:
        self.client = client
        self.scheduler = scheduler
        self.interval_s = interval_s
        self.discover_interval_s = discover_interval_s
        #: listen for producers' wake-ups while leading (False: full passes only)
        self.wake = wake
        #: listen for new input keys while leading (keyspace notifications; see keyspace.py)
        self.keyspace_events: keyspace.Mode = keyspace_events
        #: the server confirmed (or was set) to publish new-key events this leadership term
        self.keyspace_on = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sinkstream-dispatcher",
                                        daemon=True)
        self._last_discover = 0.0
        self._failing_since: float | None = None
        self._last_outage_log = 0.0
        self._backoff = Backoff(base=max(interval_s, 0.05), cap=_OUTAGE_BACKOFF_CAP_S)
        self._warned_ids: set[str] = set()
        #: who this dispatcher is in the leader key; the leader's TTL bounds a takeover
        self.node_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.leader_ttl_ms = int(max(_LEADER_TTL_MIN_S, 3 * interval_s) * 1000)
        self._leader_script = client.register_script(DISPATCHER_LEAD)
        self._leading = False
        #: the wake-up subscription; only the dispatcher thread touches it
        self._pubsub: Any = None
        #: a Redis error since the last subscription (a cluster's slot map may be stale)
        self._stale_slots = False

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._leading:  # hand over now rather than after the TTL
            try:
                self._leader_script(keys=[DISPATCHER_LEADER], args=[self.node_id, 0])
            except redis.RedisError:
                pass
            self._leading = False

    def poll_once(self) -> int:
        """One pass over the registry; returns how many streams were scheduled.

        Wake-ups that arrive meanwhile are served between its slices: a pass over 1,000
        streams takes ~15 ms of this thread, which would otherwise be added to every entry
        published during it."""
        self._discover_if_due()
        scheduled = 0
        room = self.scheduler.room()
        if room <= 0:
            return 0  # the queue is full: new tasks would only wait (and their flags lapse)
        members: Any = self.client.zrange(STREAMS_REGISTRY, 0, -1)
        stream_ids = self._valid_ids(members)
        for start in range(0, len(stream_ids), _PASS_SLICE):
            if start:
                if self._leading and start % _PIPELINE_STREAMS == 0:
                    self.lead()  # a long pass keeps its leadership
                scheduled += self._serve_wakes(0.0)
            for sid in self.scheduler.needs_work(stream_ids[start : start + _PASS_SLICE]):
                if scheduled >= room:
                    return scheduled
                scheduled += int(self.scheduler.schedule(sid))
        return scheduled

    def schedule_woken(self, stream_ids: list[str]) -> int:
        """Schedule those of ``stream_ids`` that need a task; returns how many were.

        Streams left out because the queue is full wait for a later full pass, like any
        other stream then."""
        ready = self.scheduler.needs_work(stream_ids)
        if not ready:
            return 0
        room = self.scheduler.room()
        scheduled = 0
        for sid in ready:
            if scheduled >= room:
                break
            scheduled += int(self.scheduler.schedule(sid))
        return scheduled

    def lead(self) -> bool:
        """Take or renew the dispatcher leadership (one key: fine on Redis Cluster)."""
        self._leading = int(self._leader_script(
            keys=[DISPATCHER_LEADER], args=[self.node_id, self.leader_ttl_ms])) == 1
        return self._leading

    def _valid_ids(self, members: Iterable[bytes | str], source: str = "registry member",
                   ) -> list[str]:
        """Members that are valid stream ids; anyone can ZADD the registry or PUBLISH a
        wake-up, and one bad member must neither reach a key name nor stop the others
        (logged once each)."""
        out = []
        for member in members:
            sid = as_text(member, errors="replace")
            try:
                out.append(validate_stream_id(sid))
            except InvalidStreamId as exc:
                if sid not in self._warned_ids and len(self._warned_ids) < _MAX_WARNED_IDS:
                    self._warned_ids.add(sid)
                    log.warning("dispatcher: ignoring %s %.80r: %s", source, sid, exc)
        return out

    def discover(self) -> int:
        """Register input streams created by raw XADD (not on a hot path: a SCAN).

        The streams found are registered with one ``ZADD NX`` per ``_PASS_SLICE`` of them and
        wake-ups are served in between: one ``ZADD`` per stream, every
        ``discover_interval_seconds``, held up every wake-up for ~0.2-0.4 s at 1,000 streams
        (the scale benchmark's latency tail came in bursts exactly 10 s apart).

        With Redis Cluster the SCAN runs on every primary in turn (each holds a part of the
        keyspace); replicas are skipped, their keys are their primary's."""
        found = 0
        scan_kwargs: dict[str, Any] = {}
        if is_cluster(self.client):
            scan_kwargs["target_nodes"] = "primaries"
        batch: dict[str, float] = {}
        for key in self.client.scan_iter(match="sinkstream:{*}:in", count=1000, _type="STREAM",
                                         **scan_kwargs):
            text = as_text(key, errors="replace")
            sid = text[len("sinkstream:{") : -len("}:in")]
            try:
                validate_stream_id(sid)
            except InvalidStreamId:
                continue
            batch[sid] = time.time()
            if len(batch) >= _PASS_SLICE:
                found += self._register(batch)
                self._serve_wakes(0.0)
        found += self._register(batch)
        if found:
            log.info("dispatcher: registered %d stream(s) written without the producer", found)
        return found

    def _discover_if_due(self) -> None:
        """Run the discovery scan when ``discover_interval_s`` has passed since the last."""
        now = time.monotonic()
        if now - self._last_discover >= self.discover_interval_s:
            self._last_discover = now
            self.discover()

    def _register(self, streams: dict[str, float]) -> int:
        """``ZADD NX`` the registry with ``streams`` (then cleared); how many were new."""
        if not streams:
            return 0
        added: Any = self.client.zadd(STREAMS_REGISTRY, streams, nx=True)
        streams.clear()
        return int(added)

    # --- the thread --------------------------------------------------------------------

    def _tick(self) -> float:
        """Retry this worker's lost tasks; as the leader, make sure of the subscription, run
        a full pass, then serve wake-ups until the next one is due. Returns how long to wait
        before the next tick."""
        # this worker's own tasks that lost Redis mid-batch: leader or not
        self.scheduler.retry_pending()
        if not self.lead():
            self._unsubscribe()  # a non-leader does not act on wake-ups
            return self.interval_s
        if self._pubsub is None and self._listens():
            self._subscribe()
        self.poll_once()
        if self._pubsub is None:
            return self.interval_s
        deadline = time.monotonic() + self.interval_s
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self._serve_wakes(min(left, _WAKE_WAIT_S))
            self._discover_if_due()  # on its own interval, even between long full passes
        return 0.0

    def _serve_wakes(self, timeout: float) -> int:
        """Schedule the streams of the wake-ups and new-key events received (waiting up to
        ``timeout`` for the first); how many were scheduled. A stream announced by a new-key
        event is registered first (``ZADD NX``), as the discovery scan would. Nothing without
        a subscription."""
        if self._pubsub is None:
            return 0
        woken, created = self._read_wakes(timeout)
        if created:
            found = self._register(dict.fromkeys(created, time.time()))
            if found:
                log.info("dispatcher: registered %d new stream(s) written without the "
                         "producer (keyspace event)", found)
        ready = list(dict.fromkeys([*woken, *created]))
        return self.schedule_woken(ready) if ready else 0

    def _read_wakes(self, timeout: float) -> tuple[list[str], list[str]]:
        """The stream ids of the wake-ups and of the new input keys announced, waiting up to
        ``timeout`` for the first message: valid ones, each once, in arrival order, at most
        one pipeline's worth in all."""
        woken: dict[bytes | str, None] = {}
        created: dict[str, None] = {}
        message = self._pubsub.get_message(timeout=timeout)
        while message is not None:
            kind = message.get("type")
            if kind == "message":
                woken[message["data"]] = None
            elif kind == "pmessage" and (sid := keyspace.stream_of(message["channel"],
                                                                    message["data"])):
                created[sid] = None
            if len(woken) + len(created) >= _PIPELINE_STREAMS:
                break
            message = self._pubsub.get_message(timeout=0.0)
        return (self._valid_ids(woken, source="wake-up") if woken else []), list(created)

    def _hears_new_keys(self) -> bool:
        """Whether to listen for new input keys: not on a cluster, whose notifications are
        per node (its discovery scan covers every primary instead)."""
        return self.keyspace_events != "off" and not is_cluster(self.client)

    def _listens(self) -> bool:
        """Whether the leader keeps a subscription: for wake-ups, new input keys, or both."""
        return self.wake or self._hears_new_keys()

    def _subscribe(self) -> None:
        """Subscribe to wake-ups and wait for the confirmation: done before a full pass, so
        the pass covers what came before and input appended from then on wakes us."""
        if self._stale_slots and is_cluster(self.client):
            # redis-py re-reads a cluster's slot map after a failed command, not after a
            # failed subscription: without this, a dispatcher whose node died would subscribe
            # on that dead node again and again
            self.client.nodes_manager.initialize()  # type: ignore[attr-defined]
        self._pubsub = self.client.pubsub()
        confirmations = 0
        if self.wake:
            self._pubsub.subscribe(WAKE_CHANNEL)
            confirmations += 1
        if self._hears_new_keys():
            self.keyspace_on = keyspace.enable(self.client, self.keyspace_events)
            self._pubsub.psubscribe(keyspace.channel_pattern(keyspace.client_db(self.client)))
            confirmations += 1
        deadline = time.monotonic() + _SUBSCRIBE_WAIT_S
        while confirmations and (left := deadline - time.monotonic()) > 0:
            reply = self._pubsub.get_message(timeout=left)
            if reply is not None and reply.get("type") in ("subscribe", "psubscribe"):
                confirmations -= 1
        self._stale_slots = False

    def _unsubscribe(self) -> None:
        """Drop the subscription (and anything buffered in it); a later leader term makes a
        new one, on a fresh connection after an outage."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception as exc:  # a dead connection: nothing left to release
                log.debug("dispatcher: closing the wake-up subscription: %s", exc)

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                delay = self._tick()
                self._backoff.reset()
                if self._failing_since is not None:
                    log.warning("dispatcher: Redis is back after %.1fs",
                                time.monotonic() - self._failing_since)
                    self._failing_since = None
            except (redis.RedisError, RedisClusterException) as exc:
                # exponential backoff with jitter while Redis is down; one line per outage,
                # plus a reminder every _OUTAGE_LOG_EVERY_S
                self._unsubscribe()
                self._stale_slots = True
                delay = max(self.interval_s, self._backoff.next_delay())
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = self._last_outage_log = now
                    log.warning("dispatcher: Redis unavailable (%s); retrying with backoff "
                                "up to %.0fs", exc, _OUTAGE_BACKOFF_CAP_S)
                elif now - self._last_outage_log >= _OUTAGE_LOG_EVERY_S:
                    self._last_outage_log = now
                    log.warning("dispatcher: Redis still unavailable after %.0fs (%s)",
                                now - self._failing_since, exc)
            except Exception:
                log.exception("dispatcher: unexpected error; continuing")
                self._unsubscribe()
                delay = max(self.interval_s, self._backoff.next_delay())
        self._unsubscribe()
