"""``sinkstream exporter``: input lag and stream health from Redis, whether or not workers run.

A small process: every ``interval`` seconds it reads every registered stream's committed entry
id and unapplied input (``monitoring/lag.py``, pipelined, bounded per stream) and keeps the
aggregates; ``/metrics`` serves the latest ones without touching Redis, so a slow Redis never
makes a scrape time out. Run exactly one per Redis (deployment replicas: 1): two exporters
scraped into one job would double every ``sum()``.

Series (all gauges unless noted; no stream label unless ``--top-k`` is given):

* ``sinkstream_streams{status}`` — registered streams by status: ``active`` (unapplied input or
  a lease held), ``idle``, ``ended`` (end-of-stream applied), ``failed``
* ``sinkstream_input_lag_entries`` — unapplied input entries, summed over non-failed streams
* ``sinkstream_input_lagging_streams`` — streams with unapplied input
* ``sinkstream_input_oldest_unapplied_age_seconds`` — age of the oldest unapplied entry (max)
* ``sinkstream_input_lag_age_seconds`` — gauge histogram of each lagging stream's oldest age
  (``_bucket{le}``, ``_gcount``, ``_gsum``): how many streams are how far behind
* ``sinkstream_input_lag_capped_streams`` — streams whose count hit the cap (lower bound)
* ``sinkstream_input_lag_top_age_seconds{stream}``, ``sinkstream_input_lag_top_entries{stream}``
  — only with ``--top-k K``: the K streams furthest behind (bounded, but the label churns)
* ``sinkstream_state_stored_bytes`` — encoded state bytes stored in Redis, all streams
* ``sinkstream_dead_letter_entries`` — entries held in dead-letter streams, all streams
* ``sinkstream_streams_registered`` — size of the stream registry
* ``sinkstream_workers_live`` — task slots of the workers whose heartbeat has not expired
  (``state_store/presence.py``; what cross-stream batching shares the runnable streams among)
* ``sinkstream_redis_memory_used_bytes``, ``sinkstream_redis_memory_max_bytes`` (0 = no
  limit), ``sinkstream_redis_info{maxmemory_policy}`` — from ``INFO memory`` when allowed
* ``sinkstream_exporter_redis_up`` (1/0), ``sinkstream_exporter_last_success_timestamp_seconds``,
  ``sinkstream_exporter_cycle_seconds``, ``sinkstream_exporter_streams_scanned``,
  ``sinkstream_exporter_errors_total`` (counter)
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client import REGISTRY, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from monitoring.lag import AGE_BUCKETS, STATUSES, LagReader, LagSnapshot, redis_memory

log = logging.getLogger(__name__)


class LagExporter(Collector):
    """Refreshes a :class:`LagSnapshot` on demand (``cycle``) and serves the last one."""

    def __init__(self, client: redis.Redis, *, top_k: int = 0, max_streams: int = 100_000,
                 count_cap: int = 10_000, batch_size: int = 500) -> None:
        self.client = client
        self.reader = LagReader(client, max_streams=max_streams, batch_size=batch_size,
                                count_cap=count_cap, top_k=top_k)
        self._lock = threading.Lock()
        self._snapshot: LagSnapshot | None = None
        self._memory: dict[str, Any] = {}
        self._up = False
        self._last_success = 0.0
        self._cycle_s = 0.0
        self._errors = 0

    def cycle(self) -> bool:
        """One pass over Redis; True on success. Errors are counted and logged once."""
        started = time.monotonic()
        try:
            snapshot = self.reader.read()
            memory = redis_memory(self.client)
        except redis.RedisError as exc:
            with self._lock:
                if self._up or self._errors == 0:
                    log.warning("exporter: cannot read Redis (%s); retrying", exc)
                self._up = False
                self._errors += 1
                self._cycle_s = time.monotonic() - started
            return False
        with self._lock:
            if not self._up and self._errors:
                log.warning("exporter: Redis is back")
            self._snapshot, self._memory, self._up = snapshot, memory, True
            self._last_success = time.time()
            self._cycle_s = time.monotonic() - started
        return True

    def run(self, interval_s: float, stop: threading.Event) -> None:
        while not stop.is_set():
            self.cycle()
            stop.wait(interval_s)

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the snapshot; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snap, memory, up = self._snapshot, dict(self._memory), self._up
            last, cycle_s, errors = self._last_success, self._cycle_s, self._errors
        yield _gauge("sinkstream_exporter_redis_up", "1 if the last pass over Redis succeeded",
                     float(up))
        yield _gauge("sinkstream_exporter_last_success_timestamp_seconds",
                     "Unix time of the last successful pass over Redis", last)
        yield _gauge("sinkstream_exporter_cycle_seconds", "Duration of the last pass over Redis",
                     cycle_s)
        errs = CounterMetricFamily("sinkstream_exporter_errors",
                                   "Passes over Redis that failed")
        errs.add_metric([], float(errors))
        yield errs
        if snap is None:
            return  # nothing known yet: export no lag rather than a made-up zero
        yield from _snapshot_families(snap)
        if memory:
            yield _gauge("sinkstream_redis_memory_used_bytes", "Redis used_memory",
                         memory["used_memory"])
            yield _gauge("sinkstream_redis_memory_max_bytes", "Redis maxmemory (0: no limit)",
                         memory["maxmemory"])
            info = GaugeMetricFamily("sinkstream_redis_info", "Redis settings that matter",
                                     labels=["maxmemory_policy"])
            info.add_metric([memory["maxmemory_policy"]], 1.0)
            yield info


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _snapshot_families(snap: LagSnapshot) -> Iterator[Metric]:
    streams = GaugeMetricFamily("sinkstream_streams", "Registered streams by status",
                                labels=["status"])
    for status in STATUSES:
        streams.add_metric([status], float(snap.streams.get(status, 0)))
    yield streams
    yield _gauge("sinkstream_streams_registered", "Streams in the registry",
                 snap.registry_size)
    yield _gauge("sinkstream_exporter_streams_scanned", "Streams read in the last pass",
                 snap.scanned)
    yield _gauge("sinkstream_workers_live",
                 "Task slots of the workers whose heartbeat in Redis has not expired",
                 snap.live_workers)
    yield _gauge("sinkstream_input_lag_entries",
                 "Input entries not yet applied, over all non-failed streams",
                 snap.pending_entries)
    yield _gauge("sinkstream_input_lagging_streams", "Streams with unapplied input",
                 snap.lagging_streams)
    yield _gauge("sinkstream_input_lag_capped_streams",
                 "Streams whose unapplied count hit the cap (the count is a lower bound)",
                 snap.pending_capped_streams)
    yield _gauge("sinkstream_input_oldest_unapplied_age_seconds",
                 "Age of the oldest unapplied input entry of any non-failed stream",
                 snap.oldest_age_s)
    buckets = [(floatToGoString(b), float(n))
               for b, n in zip(AGE_BUCKETS, snap.age_buckets, strict=False)]
    buckets.append(("+Inf", float(snap.age_buckets[-1])))
    yield GaugeHistogramMetricFamily(
        "sinkstream_input_lag_age_seconds",
        "Lagging streams by the age of their oldest unapplied entry",
        buckets=buckets, gsum_value=snap.age_sum_s,
    )
    if snap.top:
        top_age = GaugeMetricFamily("sinkstream_input_lag_top_age_seconds",
                                    "Oldest unapplied entry age of the K most lagging streams",
                                    labels=["stream"])
        top_entries = GaugeMetricFamily("sinkstream_input_lag_top_entries",
                                        "Unapplied entries of the K most lagging streams",
                                        labels=["stream"])
        for lag in snap.top:
            top_age.add_metric([lag.stream_id], lag.oldest_age_s)
            top_entries.add_metric([lag.stream_id], float(lag.pending))
        yield top_age
        yield top_entries
    yield _gauge("sinkstream_state_stored_bytes", "Encoded state bytes stored in Redis",
                 snap.state_bytes)
    yield _gauge("sinkstream_dead_letter_entries", "Entries held in dead-letter streams",
                 snap.dead_letters)


def run_exporter(client: redis.Redis, host: str, port: int, *, interval_s: float = 10.0,
                 top_k: int = 0, max_streams: int = 100_000, count_cap: int = 10_000,
                 stop: threading.Event | None = None) -> None:
    """Serve /metrics on host:port and refresh from Redis until SIGTERM/SIGINT (or ``stop``).

    Raises OSError when the port cannot be bound.
    """
    exporter = LagExporter(client, top_k=top_k, max_streams=max_streams, count_cap=count_cap)
    REGISTRY.register(exporter)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    server, _ = start_http_server(port, addr=host)
    log.info("exporter: serving http://%s:%d/metrics, refreshing every %.1fs", host, port,
             interval_s)
    try:
        exporter.run(interval_s, stop)
    finally:
        server.shutdown()
        REGISTRY.unregister(exporter)


def render_once(client: redis.Redis, *, top_k: int = 0, max_streams: int = 100_000,
                count_cap: int = 10_000) -> bytes:
    """One pass, rendered in the Prometheus text format (``sinkstream exporter --once``)."""
    exporter = LagExporter(client, top_k=top_k, max_streams=max_streams, count_cap=count_cap)
    exporter.cycle()
    REGISTRY.register(exporter)
    try:
        return generate_latest(REGISTRY)
    finally:
        REGISTRY.unregister(exporter)
