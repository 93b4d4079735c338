"""A worker's memory stays within its budget however many streams it touches.

200 streams whose states are ~0.27 MB each (54 MB if all were kept) through one worker with
``SINKSTREAM_HOT_CACHE_BYTES`` = 1 MiB: the worker's own ``sinkstream_hot_cache_bytes`` gauge,
scraped from its /metrics throughout, never exceeds the budget, and its RSS grows far less
than keeping every state would need.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import psutil

from producer.publisher import Producer
from sinkstream.localredis import RedisServer, free_port
from tests.chaos.common import all_caught_up, chaos_seed, make_workload, publish, settings_for
from tests.chaos.common import wait_ready as wait_workers_ready
from tests.pipeline.harness import WorkerPool, wait_until, worker_env

STREAMS = 200
BUDGET = 1 << 20
STATE_MB = 0.27  # 2 layers x 2 KV heads x 516 slots x 16 dims x fp32 x (K, V) + slots
_GAUGE = re.compile(rb"^sinkstream_hot_cache_bytes ([0-9.e+]+)$", re.M)


def _gauge(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        body = reply.read()
    match = _GAUGE.search(body)
    return float(match.group(1)) if match else 0.0


def test_hot_cache_budget_holds_over_200_streams(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    env = worker_env(
        redis_server.url, tmp_path, SINKSTREAM_METRICS_PORT=str(port),
        SINKSTREAM_HOT_CACHE_BYTES=str(BUDGET), SINKSTREAM_RECENT_TOKENS="512",
        SINKSTREAM_CHUNK_TOKENS="64", SINKSTREAM_MAX_BATCH_ENTRIES="64",
        SINKSTREAM_MAX_ENTRY_BYTES="4096",
    )
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    producer = Producer(client, settings=settings_for(env))
    workload = make_workload(chaos_seed(), "mem", streams=STREAMS, turns=12)
    warm, rest = workload.streams[:10], workload.streams[10:]
    try:
        worker = pool.start("mem")
        wait_workers_ready(pool, [worker])
        proc = psutil.Process(worker.proc.pid)
        publish(producer, _subset(workload, warm))
        wait_until(lambda: all_caught_up(client, warm), 120, "warm-up streams", pool.logs)
        rss_before = proc.memory_info().rss
        publish(producer, _subset(workload, rest))
        peak = 0.0
        deadline = time.monotonic() + 240
        while not all_caught_up(client, rest):
            assert time.monotonic() < deadline, pool.logs()
            peak = max(peak, _gauge(port))
            time.sleep(0.2)
        peak = max(peak, _gauge(port))
        rss_growth_mb = (proc.memory_info().rss - rss_before) / 2**20
        assert worker.proc.poll() is None
    finally:
        pool.close()
    print(f"hot cache peak {peak / 2**20:.2f} MiB of {BUDGET / 2**20:.0f}; "
          f"RSS growth {rss_growth_mb:.1f} MiB over {len(rest)} streams")
    assert 0 < peak <= BUDGET
    # keeping every state would add ~STATE_MB per stream; allow allocator noise, not that
    assert rss_growth_mb < 0.4 * STATE_MB * len(rest), rss_growth_mb


def _subset(workload, streams):  # type: ignore[no-untyped-def]
    from tests.chaos.common import Workload

    return Workload({s: workload.turns[s] for s in streams})
