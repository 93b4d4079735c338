"""Holding a worker's resident memory growth within ``hot_cache_bytes``, peaks included.

The hot cache counts the tensor bytes of the states it keeps, exactly; but a worker's RSS also
holds what the cache cannot see: the batch in flight (its state as loaded, the Redis reply,
the encoded segments, activations), allocator holes between two heap trims, client buffers.
In the 1,000-stream scale benchmark that was ~11 MB on top of a full 64 MiB cache (RSS growth
1.16x the budget). An operator who sets the budget sizes the machine by it, so the budget
should bound what the process really takes.

:class:`RssBudget` measures the process's peak RSS since its last check (``VmHWM``, reset
through ``/proc/self/clear_refs``, so a peak in the middle of a batch counts), and when growth
over the worker's ready baseline, less the states the cache holds, leaves less than the
budget for states, it lowers the cache's working limit to what is left at once; when room
comes back it raises the limit by half of it per check, up to the budget.
The cache yields to the rest of the worker, never the other way round: a cache miss costs a
state load from Redis, an out-of-memory kill costs the worker.

A batched task holds several streams' states at once, each about three times over until its
commit: 16 SmolLM2 streams with full windows peaked at 2.1 GiB. So with batching the worker
caps the streams per forward to what fits in half of the budget (``Runtime.flight_streams``)
and keeps that much free of states (``reserve_bytes``): the cache has given way before a
batched forward, not after its peak.

Off Linux (no ``/proc``) it reads the current RSS through psutil, without peaks.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from workers.processing.hot_cache import HotStateCache

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_PEAK = re.compile(rb"^VmHWM:\s+(\d+) kB$", re.M)


def peak_rss_since_reset() -> int | None:
    """This process's peak RSS in bytes since the last :func:`reset_peak_rss` (or its start),
    or None where the kernel does not report it."""
    try:
        match = _PEAK.search(_STATUS.read_bytes())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak_rss() -> bool:
    """Start a new peak at the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def current_rss() -> int:
    return int(psutil.Process().memory_info().rss)


class RssBudget:
    """Holds ``cache``'s working limit at the budget less the worker's memory outside the
    cache (peak RSS growth over the ready baseline, less the states the cache holds)."""

    def __init__(
        self,
        cache: HotStateCache[Any],
        budget_bytes: int,
        *,
        read_peak: Callable[[], int | None] = peak_rss_since_reset,
        reset_peak: Callable[[], bool] = reset_peak_rss,
        read_current: Callable[[], int] = current_rss,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        reserve_bytes: int = 0,
    ) -> None:
        """``reserve_bytes``: room kept free of states for the streams one task holds in
        flight when batching (``MultiStreamProcessor.reserve_bytes``), so the cache has given
        way before a batched forward, not after its peak. A peak measured during a flight
        counts it twice (as growth, and reserved): the cache errs on the small side."""
        self.cache = cache
        self.budget_bytes = budget_bytes
        self.interval_s = interval_s
        self._clock = clock
        self._last = -float("inf")
        self._read_peak = read_peak
        self._reset_peak = reset_peak
        self._read_current = read_current
        self._peaks = True
        self._warned = False
        self.reserve_bytes = reserve_bytes
        self.baseline: int | None = None
        #: RSS growth over the baseline seen by the last check (peak since the one before)
        self.growth = 0

    def start(self) -> None:
        """Take the baseline: the worker's RSS now, less what the cache already holds (the
        worker is ready: models loaded and warmed up, nothing in flight). The weights are
        resident by then (``workers/engines/loading/resident.py``): were they still a lazily
        paged file mapping, the first batches would page them in and the budget would count
        the whole model as growth outside the cache (issue 18)."""
        self.baseline = self._read_current() - self.cache.nbytes
        self._peaks = self._reset_peak()
        if self.reserve_bytes:  # room for the first batched task, before any peak is seen
            self.cache.set_limit(min(self.cache.limit_bytes,
                                     self.budget_bytes - self.reserve_bytes))
        log.info("memory budget: RSS baseline %.1f MiB, states may add %.1f MiB%s",
                 self.baseline / 2**20, self.budget_bytes / 2**20,
                 "" if self._peaks else " (current RSS only: peaks are not readable here)")

    def maybe_check(self) -> bool:
        """:meth:`check` if ``interval_s`` has passed since the last one; True if it ran."""
        now = self._clock()
        if now - self._last < self.interval_s:
            return False
        self._last = now
        self.check()
        return True

    def check(self) -> int:
        """Compare the growth since the last check with the budget and move the cache's
        limit; returns the limit now. Call it between tasks, after a heap trim."""
        if self.baseline is None:
            self.start()
            return self.cache.limit_bytes
        rss = self._read_peak() if self._peaks else None
        if rss is None:
            rss = self._read_current()
        else:
            self._reset_peak()
        self.growth = rss - self.baseline
        limit = self.cache.limit_bytes
        # what the cache cannot see: the peak's growth less the states it holds now; and the
        # reserve stays free for the streams of the next batched task
        outside = max(0, self.growth - self.cache.nbytes)
        target = self.budget_bytes - outside - self.reserve_bytes
        if target < limit:
            limit = self.cache.set_limit(target)
            log.debug("memory budget: RSS growth %.1f MiB, %.1f MiB of it outside the hot "
                      "cache, %.1f MiB kept for flights: cache limit %.1f MiB",
                      self.growth / 2**20, outside / 2**20, self.reserve_bytes / 2**20,
                      limit / 2**20)
            if limit == 0 and not self._warned:
                self._warned = True
                log.warning("memory budget: the worker's memory outside the hot cache grew "
                            "%.1f MiB past its ready baseline (and %.1f MiB is kept for the "
                            "streams a batched task holds), more than hot_cache_bytes "
                            "(%.1f MiB) allows: no states are kept in memory and every batch "
                            "loads its state from Redis. Raise hot_cache_bytes or lower "
                            "max_batch_tokens", outside / 2**20, self.reserve_bytes / 2**20,
                            self.budget_bytes / 2**20)
        elif target > limit:  # room came back: take half of it per check (no flapping)
            limit = self.cache.set_limit(limit + (target - limit + 1) // 2)
        return limit
