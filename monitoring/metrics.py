"""Prometheus metrics of a sinkstream worker.

Names follow Prometheus conventions (``sinkstream_`` prefix, ``_total`` counters, ``_seconds``
and ``_bytes`` units). Labels stay low-cardinality: engine, model, kind, outcome and a *fixed*
vocabulary of reasons (:func:`reason_label`) — never a stream id, so ten thousand streams do
not mean ten thousand series.

One port per worker process (``--pool=solo``, one process per GPU) keeps every number right
without prometheus_client's multiprocess mode; run several workers on one host with different
``SINKSTREAM_METRICS_PORT`` values. Input lag is not measured here: it is a property of Redis,
not of a worker, and ``sinkstream exporter`` (``monitoring/exporter.py``) exports it even when
no worker runs.

The default registry also carries prometheus_client's process collector
(``process_resident_memory_bytes``, ``process_cpu_seconds_total``, ... on Linux) and, once
:func:`start_metrics_server` ran, the GPU collector (``monitoring/gpu.py``), which exports
nothing on a machine without an initialised CUDA device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from importlib import metadata

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from sinkstream.contracts.outcomes import BATCH_STATUSES, STALE_REASONS
from sinkstream.contracts.outputs import SummaryKind
from state_store.connection import ROUND_TRIPS

log = logging.getLogger(__name__)

#: Buckets from a fast GPU batch (5 ms) to a slow CPU summary (5 minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: State sizes: 1 KiB .. 4 GiB in factors of 4 (max_state_bytes defaults to 2 GiB).
BYTES_BUCKETS = tuple(float(4**i) for i in range(5, 17))

TOKENS_FED = Counter("sinkstream_tokens_fed_total", "Input tokens fed into stream states",
                     ["engine", "model"])
ENTRIES_APPLIED = Counter("sinkstream_entries_applied_total",
                          "Input entries committed into stream states", ["engine", "model"])
SUMMARY_TOKENS = Counter("sinkstream_summary_tokens_total", "Tokens generated for summaries",
                         ["engine", "model", "kind"])
FEED_SECONDS = Histogram("sinkstream_batch_feed_seconds", "Model time to feed one batch",
                         ["engine", "model"], buckets=LATENCY_BUCKETS)
SUMMARY_SECONDS = Histogram("sinkstream_summary_seconds", "Time to generate one summary",
                            ["engine", "model", "kind"], buckets=LATENCY_BUCKETS)
STATE_LOAD_SECONDS = Histogram("sinkstream_state_load_seconds",
                               "Redis download + decode of a state (hot-cache misses only)",
                               buckets=LATENCY_BUCKETS)
STATE_SAVE_SECONDS = Histogram("sinkstream_state_save_seconds",
                               "Encode + atomic commit of a state", buckets=LATENCY_BUCKETS)
STATE_LOAD_BYTES = Histogram("sinkstream_state_load_bytes", "Bytes of state downloaded",
                             buckets=BYTES_BUCKETS)
STATE_SAVE_BYTES = Histogram("sinkstream_state_save_bytes", "Bytes of state committed",
                             buckets=BYTES_BUCKETS)
STATE_SIZE = Gauge("sinkstream_state_size_bytes", "Size of the last committed state",
                   ["engine", "model"])
HOT_CACHE_HITS = Counter("sinkstream_hot_cache_hits_total",
                         "Batches that reused an in-memory state")
HOT_CACHE_MISSES = Counter("sinkstream_hot_cache_misses_total",
                           "Batches that downloaded the state from Redis")
HOT_CACHE_BYTES = Gauge("sinkstream_hot_cache_bytes", "Tensor bytes held by the hot cache")
HOT_CACHE_LIMIT = Gauge("sinkstream_hot_cache_limit_bytes",
                        "Bytes the hot cache may hold now: hot_cache_bytes, less what the "
                        "worker's memory outside the cache needs")
RSS_GROWTH = Gauge("sinkstream_worker_rss_growth_bytes",
                   "Peak resident memory growth over the worker's ready baseline, since the "
                   "previous check (about once a second)")
MEMORY_VECTORS = Counter("sinkstream_memory_vectors_total",
                         "Retrieval chunks embedded after the commit that closed them")
MEMORY_VECTOR_SECONDS = Histogram("sinkstream_memory_vector_seconds",
                                  "Time to read, embed and store one batch of chunks",
                                  buckets=LATENCY_BUCKETS)
MEMORY_VECTORS_PENDING = Gauge("sinkstream_memory_vectors_pending",
                               "Committed chunks this worker has yet to embed")
GUARD_SENTENCES = Counter(
    "sinkstream_guard_sentences_total",
    "Generated sentences the faithfulness guard checked: kept, repaired (a misspelt name) or "
    "dropped, by the kind of fact that was not in the text they rest on, or garbled (not "
    "language); none when kept",
    ["action", "reason"])
LEASES_TAKEN_OVER = Counter("sinkstream_leases_taken_over_total",
                            "Streams taken over from a worker whose lease expired")
STALE_COMMITS = Counter("sinkstream_stale_commits_refused_total",
                        "Commits refused because the lease or version moved on", ["reason"])
DEAD_LETTERS = Counter("sinkstream_dead_letters_total", "Input entries dead-lettered",
                       ["reason"])
STREAM_FAILURES = Counter("sinkstream_stream_failures_total", "Streams marked failed",
                          ["reason"])
BATCHES = Counter("sinkstream_batches_total", "Batches by outcome", ["outcome"])
# log streams (docs/logs.md): no stream label, the level is a fixed vocabulary
LOG_LINES = Counter("sinkstream_log_lines_total", "Log lines mined into templates, by level",
                    ["level"])
LOG_TEMPLATES_NEW = Counter("sinkstream_log_templates_new_total",
                            "Log templates seen for the first time in their stream")
LOG_BURSTS = Counter("sinkstream_log_bursts_total",
                     "Log bursts detected (a template far above its own baseline)")
#: the levels of ``sinkstream_log_lines_total`` ("none": the line had no level)
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal", "none")
WORKER_STREAMS_ACTIVE = Gauge(
    "sinkstream_worker_streams_active",
    "Distinct streams this worker applied a batch to in the last minute",
)
WORKER = Info("sinkstream_worker", "Engine, model and device of this worker process")

# ----- fixed label vocabularies (pre-initialised so every series exists from the first scrape)
SUMMARY_KINDS = tuple(kind.value for kind in SummaryKind)

#: (label, words that identify it) in match order; the first match wins, else "other".
_DEAD_LETTER_REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("missing_text", ("missing required field",)),
    ("too_large", ("-byte limit", "over the")),
    ("invalid_utf8", ("utf-8",)),
    ("empty_text", ("is empty",)),
    ("invalid_eos", ("field 'eos'",)),
    ("invalid_ts", ("field 'ts'",)),
    ("invalid_kind", ("field 'kind'",)),
)
_FAILURE_REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("logs_unreadable", ("logs unreadable",)),
    ("foreign_state", ("belongs to another",)),
    ("unsupported_format", ("format version", "magic", "flags", "not a sinkstream state")),
    ("state_too_large", ("limit is",)),
    ("corrupt_state", ("truncated", "checksum", "trailing bytes", "msgpack", "structure")),
    ("state_unreadable", ("state hash", "the hash says", "while being read", "generation",
                          "chunk")),
)
DEAD_LETTER_REASONS = tuple(label for label, _ in _DEAD_LETTER_REASONS) + ("other",)
FAILURE_REASONS = tuple(label for label, _ in _FAILURE_REASONS) + ("other",)

ACTIVE_WINDOW_S = 60.0
_MAX_TRACKED_STREAMS = 100_000


def reason_label(reason: str) -> str:
    """Map a dead-letter or failure reason to a fixed, low-cardinality label value.

    The free-text reasons carry stream ids, byte counts and offsets; a label made from them
    would grow a series per stream. Dead-letter reasons map to :data:`DEAD_LETTER_REASONS`,
    stream-failure reasons to :data:`FAILURE_REASONS`; anything unknown is ``other``.
    """
    text = reason.lower()
    # "stream 'id': ..." prefixes name the stream; the classification ignores them
    if text.startswith("stream '") and "': " in text:
        text = text.split("': ", 1)[1]
    for label, words in _FAILURE_REASONS + _DEAD_LETTER_REASONS:
        if any(word in text for word in words):
            return label
    return "other"


class _ActiveStreams:
    """Distinct streams seen in a sliding window, for a gauge without a stream label."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def note(self, stream_id: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._seen[stream_id] = now
            if len(self._seen) > _MAX_TRACKED_STREAMS:
                self._prune(now)

    def count(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._prune(now)
            return len(self._seen)

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        for sid in [s for s, t in self._seen.items() if t < horizon]:
            del self._seen[sid]


class _RoundTripCollector(Collector):
    """``sinkstream_redis_round_trips_total``: commands and pipelines this process sent to the
    data Redis (``state_store.connection.ROUND_TRIPS``)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "sinkstream_redis_round_trips",
            "Round trips to the data Redis (a pipeline is one) made by this process: by its "
            "tasks, its dispatcher, lease renewals and its vectorizer", labels=["source"])
        for source, count in ROUND_TRIPS.by_source().items():
            family.add_metric([source], float(count))
        yield family


REGISTRY.register(_RoundTripCollector())
_active = _ActiveStreams(ACTIVE_WINDOW_S)
WORKER_STREAMS_ACTIVE.set_function(lambda: float(_active.count()))


def note_active_stream(stream_id: str) -> None:
    """A batch of ``stream_id`` was applied (feeds ``sinkstream_worker_streams_active``)."""
    _active.note(stream_id)


def init_worker(engine: str, model: str, device: str = "cpu", dtype: str = "",
                threads: int = 0) -> None:
    """Create every labelled series at zero and publish the worker's identity: what it runs
    and how it computes (``threads``: its torch threads, 0 = not known), so that workers
    which would commit different float bits for the same stream can be told apart.

    A counter that first appears with a non-zero value loses that first increase in
    ``rate()``; pre-created children also keep dashboard panels and alerts from going blank
    on a quiet worker. Idempotent.
    """
    labels = {"engine": engine, "model": model}
    TOKENS_FED.labels(**labels)
    ENTRIES_APPLIED.labels(**labels)
    FEED_SECONDS.labels(**labels)
    STATE_SIZE.labels(**labels)
    for kind in SUMMARY_KINDS:
        SUMMARY_TOKENS.labels(**labels, kind=kind)
        SUMMARY_SECONDS.labels(**labels, kind=kind)
    _init_fixed_labels()
    WORKER.info({"engine": engine, "model": model, "device": device, "dtype": dtype,
                 "threads": str(threads) if threads else "", "version": _version()})


#: what the guard does to a sentence, and the kinds of fact it checks
GUARD_ACTIONS = ("kept", "repaired", "dropped")
GUARD_REASONS = ("name", "number", "date", "time", "garbled")


def _init_fixed_labels() -> None:
    GUARD_SENTENCES.labels(action="kept", reason="none")
    for action in GUARD_ACTIONS[1:]:
        for guard_reason in GUARD_REASONS:
            GUARD_SENTENCES.labels(action=action, reason=guard_reason)
    for outcome in BATCH_STATUSES:
        BATCHES.labels(outcome=outcome)
    for stale in STALE_REASONS:
        STALE_COMMITS.labels(reason=stale)
    for reason in DEAD_LETTER_REASONS:
        DEAD_LETTERS.labels(reason=reason)
    for failure in FAILURE_REASONS:
        STREAM_FAILURES.labels(reason=failure)
    for level in LOG_LEVELS:
        LOG_LINES.labels(level=level)


def _version() -> str:
    try:
        return metadata.version("sinkstream")
    except metadata.PackageNotFoundError:
        return "unknown"


_init_fixed_labels()
_gpu_registered = False


def register_gpu_collector() -> None:
    """Add the GPU memory collector to the default registry once (safe without CUDA)."""
    global _gpu_registered
    if _gpu_registered:
        return
    from monitoring.gpu import GpuCollector

    REGISTRY.register(GpuCollector())
    _gpu_registered = True


def start_metrics_server(host: str, port: int) -> bool:
    """Serve /metrics on host:port (port 0 disables). Logs and returns False if taken."""
    if port == 0:
        return False
    register_gpu_collector()
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("metrics: cannot bind %s:%d (%s); /metrics disabled", host, port, exc)
        return False
    log.info("metrics: serving http://%s:%d/metrics", host, port)
    return True
