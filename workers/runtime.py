"""Per-process worker resources, built once and lazily.

The model is loaded on first use in the process that runs tasks (never in a parent before a
fork, so CUDA is never initialised where it would be inherited), and kept for the life of the
process: loading takes seconds, a batch takes milliseconds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import redis

from monitoring.batch_metrics import BatchMetrics
from sinkstream.settings import Settings, load_settings
from state_store.connection import redis_from_settings
from state_store.presence import Heartbeat, WorkerPresence
from workers.engines.base import Engine
from workers.engines.invariance import check_batch_invariance
from workers.heap import HeapTrimmer
from workers.memory_budget import RssBudget
from workers.processing.multistream import FLIGHT_COPIES, MultiStreamProcessor, streams_within
from workers.processing.processor import StreamProcessor
from workers.scheduling.scheduler import Enqueue, Scheduler

log = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Runtime:
    settings: Settings
    enqueue: Enqueue
    heartbeat: Heartbeat | None = field(default=None, init=False)

    @cached_property
    def client(self) -> redis.Redis:
        return redis_from_settings(self.settings, client_name=f"sinkstream-worker-{os.getpid()}")

    @cached_property
    def engine(self) -> Engine[Any]:
        from workers.engines.loading import load_engine

        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        return load_engine(self.settings)

    @cached_property
    def processor(self) -> StreamProcessor:
        import torch

        # its identity in the metrics names its threads: workers that differ in them may
        # commit other float bits for the same stream (alert SinkstreamWorkersComputeDiffer)
        observer = BatchMetrics.of_engine(self.engine, self.settings.device, self.settings.dtype,
                                          threads=torch.get_num_threads())
        return StreamProcessor(self.engine, self.client, self.settings, worker_id(),
                               observer=observer)

    @cached_property
    def batch_streams(self) -> int:
        """Streams per forward in this process: ``batch_streams``, at most as many as fit in
        half of ``hot_cache_bytes`` (``flight_streams``), and 1 where ``batch_exact`` holds and
        the loaded engine is not batch-invariant on this machine (checked once)."""
        wanted = self.flight_streams(self.settings.batch_streams)
        if wanted <= 1 or not self.settings.batch_exact:
            return wanted
        check = check_batch_invariance(self.engine)
        if check.invariant:
            log.info("cross-stream batching on (%d streams): %s; checked in %.1fs", wanted,
                     check.reason, check.seconds)
            return wanted
        log.warning("cross-stream batching off: %s. Set SINKSTREAM_BATCH_EXACT=false to batch "
                    "anyway (a replay after a crash may then differ in the last float bits)",
                    check.reason)
        return 1

    def flight_streams(self, wanted: int) -> int:
        """``wanted``, lowered so the states of one task's streams in flight fit in half of
        ``hot_cache_bytes``, the memory budget for states: a task holds every stream's state
        several times over until its commit (``FLIGHT_COPIES``), which the hot cache cannot
        see; the other half is for the cache, which gives way to the rest of the worker
        (``workers/memory_budget.py``). Without this, 16 streams of SmolLM2 with full windows
        took 2.1 GiB of RSS past the 512 MiB default budget."""
        if wanted <= 1:
            return wanted
        state = self.full_state_bytes
        fit = streams_within(self.settings.hot_cache_bytes // 2, state)
        if fit >= wanted:
            return wanted
        log.info("cross-stream batching: %d stream%s per forward, not %d: %d in flight hold "
                 "about %.0f MiB (%d x %.1f MiB, each stream's largest state), and half of "
                 "hot_cache_bytes (%.0f MiB of %.0f) is for them. Raise hot_cache_bytes to "
                 "batch more", fit, "" if fit == 1 else "s", wanted, wanted,
                 wanted * FLIGHT_COPIES * state / 2**20, FLIGHT_COPIES, state / 2**20,
                 self.settings.hot_cache_bytes / 2**21, self.settings.hot_cache_bytes / 2**20)
        return fit

    @cached_property
    def multistream(self) -> MultiStreamProcessor:
        """Cross-stream batching (``batch_streams`` > 1) around ``processor``."""
        return MultiStreamProcessor(self.processor, self.batch_streams,
                                    self.settings.batch_tokens,
                                    live_workers=self.live_workers,
                                    state_bytes=self.full_state_bytes)

    @cached_property
    def full_state_bytes(self) -> int:
        """Bytes of one stream's state at its largest (a full window) with this engine."""
        from workers.engines.loading import full_state_nbytes

        return full_state_nbytes(self.engine)

    def start_heartbeat(self, slots: int = 1) -> Heartbeat:
        """Join the live workers with ``slots`` task slots (the worker, once ready), until
        ``heartbeat.stop()``; batching shares the runnable streams among them."""
        self.heartbeat = Heartbeat(WorkerPresence(self.client, worker_id(), slots)).start()
        return self.heartbeat

    def live_workers(self) -> int:
        """Live task slots of every worker, read when a task asks (a worker that joined a
        moment ago counts at once); 0 when Redis cannot say (a task then acts as if alone)."""
        try:
            return WorkerPresence(self.client, worker_id()).live()
        except redis.RedisError:
            return 0

    @cached_property
    def scheduler(self) -> Scheduler:
        return Scheduler(self.client, self.enqueue, self.settings.schedule_ttl_seconds)

    @cached_property
    def heap_trimmer(self) -> HeapTrimmer:
        return HeapTrimmer(self.settings.heap_trim_seconds)

    @cached_property
    def memory_budget(self) -> RssBudget | None:
        """The process's RSS budget (``hot_cache_bounds_rss``, CPU workers: on a GPU the cache
        holds device memory, which RSS does not show), made on first use: a forked pool child
        takes its baseline after its first task."""
        if not (self.settings.hot_cache_bounds_rss and self.settings.device == "cpu"):
            return None
        reserve = self.multistream.reserve_bytes if self.batch_streams > 1 else 0
        return RssBudget(self.processor.cache, self.settings.hot_cache_bytes,
                         reserve_bytes=reserve)


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(enqueue: Enqueue) -> Runtime:
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(load_settings(), enqueue)
        return _runtime
