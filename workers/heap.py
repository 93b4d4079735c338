"""Giving freed heap memory back to the operating system between tasks.

glibc's ``free`` returns memory to the system only from the top of the heap. A worker's
states are tensors of tens of KB, allocated and freed as streams enter and leave the hot
cache, interleaved with allocations that live on, so the freed ones become holes that the
process keeps: with 300 tiny-llama streams and a 16 MiB cache, RSS grew by 45 MiB (2.8x the
budget) and ``malloc_trim(0)`` handed 28 MiB of it back (``benchmarks/README.md``, scale).
Trimming walks the free lists and releases every free page; it took ~1 ms there, so once a
second costs about 0.1% of a worker's time.

Elsewhere (musl, macOS, Windows) there is no ``malloc_trim`` and trimming is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Trim = Callable[[], bool]


def glibc_trim() -> Trim | None:
    """``malloc_trim(0)`` of this process's C library (True when memory was released), or
    None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: bool(trim(0))


class HeapTrimmer:
    """Trims at most once per ``interval_s`` (0 = never), however often it is asked."""

    def __init__(self, interval_s: float, trim: Trim | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._trim = trim if trim is not None else glibc_trim()
        self._clock = clock
        self._last = -float("inf")
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None and self.interval_s > 0

    def maybe_trim(self) -> bool:
        """Trim if the interval has passed since the last trim; True if it trimmed."""
        if not self.available:
            return False
        now = self._clock()
        if now - self._last < self.interval_s:
            return False
        self._last = now
        assert self._trim is not None
        started = time.perf_counter()
        released = self._trim()
        self.trims += 1
        log.debug("heap trim: %s in %.2f ms", "released memory" if released else "nothing",
                  (time.perf_counter() - started) * 1e3)
        return True
