"""A bounded in-memory cache of hot stream states, keyed by (stream, version).

A worker that processes the same stream batch after batch should not download its state from
Redis each time: if the stored version still equals the cached one, nobody else committed in
between and the cached object is exactly the committed state. The budget is in bytes of tensor
memory, so a worker's RSS stays bounded however many streams it has touched; a lower working
limit (``set_limit``) lets ``workers/memory_budget.py`` make room for memory the cache cannot
see, so that the budget bounds the worker's RSS growth too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class HotStateCache(Generic[T]):
    """LRU by bytes (and by count, with ``max_items``: ``max_streams_per_worker``). ``get``
    only hits when the caller's version matches the cached one."""

    def __init__(self, budget_bytes: int, max_items: int | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.max_items = max_items
        self._limit = budget_bytes
        self._items: OrderedDict[str, tuple[int, T, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def limit_bytes(self) -> int:
        """The bytes the cache may hold now: the budget, or less while the worker's memory
        outside the cache needs the room (``set_limit``)."""
        return self._limit

    def set_limit(self, nbytes: int) -> int:
        """Hold at most ``nbytes`` (clamped to 0..budget), evicting the least recently used
        states now; returns the limit set."""
        with self._lock:
            self._limit = max(0, min(self.budget_bytes, nbytes))
            self._evict()
            return self._limit

    def __len__(self) -> int:
        return len(self._items)

    def get(self, stream_id: str, version: int) -> T | None:
        with self._lock:
            item = self._items.get(stream_id)
            if item is None or item[0] != version:
                self.stats.misses += 1
                return None
            self._items.move_to_end(stream_id)
            self.stats.hits += 1
            return item[1]

    def put(self, stream_id: str, version: int, state: T, nbytes: int) -> None:
        """Cache ``state``; a state larger than the limit is simply not kept."""
        with self._lock:
            self._drop(stream_id)
            if nbytes > self._limit:
                return
            self._items[stream_id] = (version, state, nbytes)
            self._bytes += nbytes
            self._evict()

    def _evict(self) -> None:
        while self._items and (self._bytes > self._limit or (
            self.max_items is not None and len(self._items) > self.max_items
        )):
            oldest = next(iter(self._items))
            self._drop(oldest)
            self.stats.evictions += 1

    def discard(self, stream_id: str) -> None:
        with self._lock:
            self._drop(stream_id)

    def _drop(self, stream_id: str) -> None:
        item = self._items.pop(stream_id, None)
        if item is not None:
            self._bytes -= item[2]
