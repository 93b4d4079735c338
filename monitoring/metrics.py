"""Prometheus metrics of a sinkstream worker.

Names follow Prometheus conventions (``sinkstream_`` prefix, ``_total`` counters, ``_seconds``
and ``_bytes`` units). Labels stay low-cardinality: engine, model, reason, kind — never a
stream id, so ten thousand streams do not mean ten thousand series.

One port per worker process (``--pool=solo``, one process per GPU) keeps every number right
without prometheus_client's multiprocess mode; run several workers on one host with different
``SINKSTREAM_METRICS_PORT`` values.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

#: Buckets from a fast GPU batch (ms) to a slow CPU summary (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BYTES_BUCKETS = tuple(float(4**i) for i in range(5, 16))  # 1 KiB .. 1 GiB

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
                               "Redis download + decode of a state", buckets=LATENCY_BUCKETS)
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
LEASES_TAKEN_OVER = Counter("sinkstream_leases_taken_over_total",
                            "Streams taken over from a worker whose lease expired")
STALE_COMMITS = Counter("sinkstream_stale_commits_refused_total",
                        "Commits refused because the lease or version moved on", ["reason"])
DEAD_LETTERS = Counter("sinkstream_dead_letters_total", "Input entries dead-lettered",
                       ["reason"])
STREAM_FAILURES = Counter("sinkstream_stream_failures_total", "Streams marked failed",
                          ["reason"])
BATCHES = Counter("sinkstream_batches_total", "Batches by outcome", ["outcome"])


def start_metrics_server(host: str, port: int) -> bool:
    """Serve /metrics on host:port (port 0 disables). Logs and returns False if taken."""
    if port == 0:
        return False
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("metrics: cannot bind %s:%d (%s); /metrics disabled", host, port, exc)
        return False
    log.info("metrics: serving http://%s:%d/metrics", host, port)
    return True


def reason_label(reason: str) -> str:
    """A bounded label value: the reason's first words, without ids or numbers."""
    head = reason.split(":")[0].split("(")[0].strip().lower()
    return "".join(c if c.isalpha() or c == " " else "" for c in head)[:40].strip() or "other"
