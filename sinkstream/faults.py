"""Deterministic fault injection for the kill/pause tests: stop a worker at a named point.

Disabled unless ``SINKSTREAM_FAULT_POINT`` names a point. When a worker reaches that point for
the ``SINKSTREAM_FAULT_AFTER``-th time (default 1), it writes ``SINKSTREAM_FAULT_MARKER`` (a
file path) and sleeps ``SINKSTREAM_FAULT_SLEEP`` seconds (default an hour), so a test can
``kill -9`` or ``SIGSTOP`` it at exactly that point. Points: ``after_load`` (state loaded,
nothing fed), ``after_feed`` (fed in memory, not committed), ``before_commit`` (summaries made,
about to commit), ``chunks_written`` (a large state's chunks are in Redis, commit not run).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_hits: dict[str, int] = {}


def checkpoint(point: str) -> None:
    if os.environ.get("SINKSTREAM_FAULT_POINT") != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != int(os.environ.get("SINKSTREAM_FAULT_AFTER", "1")):
        return
    marker = os.environ.get("SINKSTREAM_FAULT_MARKER")
    if marker:
        Path(marker).write_text(f"{os.getpid()} {point}\n")
    time.sleep(float(os.environ.get("SINKSTREAM_FAULT_SLEEP", "3600")))
