"""Prometheus metrics of the HTTP gateway (``sinkstream serve``).

Same conventions as the workers' (``monitoring/metrics.py``): the ``sinkstream_`` prefix,
``_total`` counters, ``_seconds`` units, and low-cardinality labels only: the *route
template* (``/v1/streams/{stream_id}/entries``), never the stream id or a token, so a
thousand streams or tenants do not mean a thousand series. Kept apart from the worker's
metrics so a gateway's ``/metrics`` shows the gateway, not empty worker series.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Buckets from a cached read (1 ms) to a long ask (2 minutes).
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60, 120)

REQUESTS = Counter("sinkstream_gateway_requests_total", "HTTP requests by route and status",
                   ["method", "route", "status"])
REQUEST_SECONDS = Histogram("sinkstream_gateway_request_seconds",
                            "Time to answer an HTTP request (SSE streams excluded)",
                            ["method", "route"], buckets=REQUEST_BUCKETS)
SSE_CLIENTS = Gauge("sinkstream_gateway_sse_clients", "Open Server-Sent Events connections")
SSE_EVENTS = Counter("sinkstream_gateway_sse_events_total", "Events sent to SSE clients")
SSE_DROPPED = Counter("sinkstream_gateway_sse_dropped_total",
                      "SSE clients closed because they fell too far behind (they reconnect "
                      "with Last-Event-ID)")
ENTRIES = Counter("sinkstream_gateway_entries_total",
                  "Input entries accepted over HTTP: added, or skipped as a retry's duplicate",
                  ["outcome"])
AUTH_FAILURES = Counter("sinkstream_gateway_auth_failures_total",
                        "Requests refused by authentication or authorization", ["reason"])
AUTH_REASONS = ("missing", "invalid", "scope", "tenant", "origin")

for _outcome in ("added", "duplicate"):
    ENTRIES.labels(_outcome)
for _reason in AUTH_REASONS:
    AUTH_FAILURES.labels(_reason)
