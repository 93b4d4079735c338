"""Failover with the default settings (issue 22): ``kill -9`` of a stream's lease holder, and
streams written by a bare ``XADD``. Shared by ``test_takeover.py`` and ``benchmarks/chaos.py``.

Everything timing-related is left at its default (``lease_seconds``, ``schedule_ttl_seconds``,
``dispatch_interval_seconds``, ``discover_interval_seconds``, keyspace events); only the model
is tiny. Measured from outside, like an operator would:

* ``takeover`` — from the ``kill -9`` of the process holding the stream's lease to the next
  commit of that stream under a newer fencing token (another worker's);
* ``discovery`` — from a raw ``XADD`` creating a stream nobody registered to the stream's
  appearance in the registry (``first commit``: to its first committed state).

The run ends with the chaos verdict (``common.verify``): nothing lost, nothing applied twice,
states bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import redis

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import STREAMS_REGISTRY, StreamKeys
from tests.integration.chaos.common import (
    Reference,
    Workload,
    all_caught_up,
    chaos_env,
    feed_live,
    make_workload,
    settings_for,
    verify,
)
from tests.integration.chaos.scenarios import Report
from tests.integration.pipeline.harness import (
    Worker,
    WorkerPool,
    wait_ready,
    wait_until,
    worker_env,
)

#: the test harness's fast-failover overrides; removed so the defaults apply
_TIMING_OVERRIDES = ("SINKSTREAM_LEASE_SECONDS", "SINKSTREAM_SCHEDULE_TTL_SECONDS",
                     "SINKSTREAM_DISPATCH_INTERVAL_SECONDS", "SINKSTREAM_DISCOVER_INTERVAL_SECONDS",
                     "SINKSTREAM_KEYSPACE_EVENTS")
#: the stream whose holder is killed; others keep the workers busy like a real fleet
_TARGET = "holder-000"
#: seconds between the live producer's turns (one per stream)
_PACE_S = 0.4


def default_env(redis_url: str, tmp: Path) -> dict[str, str]:
    """Worker environment with every failover-related setting at its default."""
    env = chaos_env(worker_env(redis_url, tmp))
    for name in _TIMING_OVERRIDES:
        env.pop(name, None)
    return env


def holder_kills(tmp: Path, *, seed: int, trials: int, raw_streams: int,
                 takeover_timeout_s: float = 180.0) -> Report:
    """Two workers, default settings; ``trials`` times kill -9 the holder of ``_TARGET``'s
    lease (a replacement is started and made ready before the next trial), then
    ``raw_streams`` bare-XADD streams; then verify every stream."""
    started = time.monotonic()
    server = RedisServer(tmp / "redis").start()
    env = default_env(server.url, tmp)
    pool = WorkerPool(env, tmp)
    client = server.client()
    report = Report("kill -9 of the lease holder, default settings",
                    faults="SIGKILL of the worker holding the stream's lease, 2 workers")
    done = threading.Event()
    published: dict[str, list[tuple[str, str]]] = {}
    feeder: threading.Thread | None = None
    try:
        settings = settings_for(env)
        live = [pool.start(f"h{i}") for i in range(2)]
        wait_ready(pool, live)
        source = make_workload(seed, "holder", 2, turns=6000)
        # one turn per stream per _PACE_S: live input at a pace two loaded CPU workers keep
        # up with (a backlog would only measure the machine)
        feeder = threading.Thread(target=feed_live, args=(Producer(client, settings=settings),
                                                          source, published, done, _PACE_S),
                                  daemon=True)
        feeder.start()
        takeovers: list[float] = []
        held = 0
        for n in range(trials):
            victim, token, still_held = _kill_holder(client, live, pool)
            killed_at = time.monotonic()
            live.remove(victim)
            live.append(pool.start(f"h{n + 2}"))
            wait_until(lambda t=token: _committed_fence(client) > t, takeover_timeout_s,
                       f"a commit of {_TARGET} after killing its holder", pool.logs)
            takeovers.append(time.monotonic() - killed_at)
            held += still_held
            report.trials += 1
            print(f"failover trial {n + 1}/{trials}: takeover {takeovers[-1]:.2f} s "
                  f"(lease {'held' if still_held else 'released'} at the kill)", flush=True)
            wait_ready(pool, live)
        done.set()
        feeder.join(timeout=60)
        discovery, first_commit = _raw_streams(client, raw_streams, pool)
        report.notes = _notes(takeovers, held, discovery, first_commit, seed, settings)
        print(f"failover: {report.notes}", flush=True)
        workload = Workload(published)
        wait_until(lambda: all_caught_up(client, workload.streams), 600,
                   "every stream to catch up", pool.logs)
        raw = Workload({f"raw-{i:03d}": [(f"[raw-{i:03d}#0] hello", "")]
                        for i in range(raw_streams)})
        wait_until(lambda: all_caught_up(client, raw.streams), 60,
                   "every raw stream to be applied", pool.logs)
        reference = Reference(settings)
        report.verdict.add(verify(client, reference, workload))
        report.verdict.add(verify(client, reference, raw))
    finally:
        done.set()
        pool.close()
        server.stop(hard=True)
    report.seconds = time.monotonic() - started
    return report


def _kill_holder(client: redis.Redis, live: list[Worker], pool: WorkerPool,
                 timeout_s: float = 60.0) -> tuple[Worker, int, bool]:
    """SIGKILL the live worker that holds ``_TARGET``'s lease the moment one is seen holding
    it; (the victim, its fencing token, whether its lease was still there after the kill)."""
    lease_key = StreamKeys.of(_TARGET).lease
    by_pid = {w.proc.pid: w for w in live if w.proc.poll() is None}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        raw = client.get(lease_key)
        if raw:
            holder, _, token = raw.decode().rpartition("|")
            victim = by_pid.get(int(holder.rsplit("-", 1)[-1].split("+")[0]))
            if victim is not None:
                os.kill(victim.proc.pid, signal.SIGKILL)
                victim.proc.wait(timeout=10)
                return victim, int(token), client.get(lease_key) == raw
        time.sleep(0.002)
    raise AssertionError(f"no live worker held {_TARGET}'s lease in {timeout_s}s\n{pool.logs()}")


def _committed_fence(client: redis.Redis) -> int:
    """The fencing token of the target's latest commit (0 before the first)."""
    raw = client.hget(StreamKeys.of(_TARGET).state, "fence")
    return int(raw) if raw else 0


def _raw_streams(client: redis.Redis, count: int, pool: WorkerPool,
                 ) -> tuple[list[float], list[float]]:
    """XADD ``count`` new streams one at a time, as ``redis-cli`` would; seconds to their
    registration and to their first commit."""
    discovery: list[float] = []
    first_commit: list[float] = []
    for i in range(count):
        sid = f"raw-{i:03d}"
        keys = StreamKeys.of(sid)
        written = time.monotonic()
        client.xadd(keys.input, {"text": f"[{sid}#0] hello"})
        wait_until(lambda s=sid: client.zscore(STREAMS_REGISTRY, s) is not None, 60,
                   f"{sid} to be discovered", pool.logs)
        discovery.append(time.monotonic() - written)
        wait_until(lambda k=keys: client.exists(k.state) == 1, 60, f"{sid} to be applied",
                   pool.logs)
        first_commit.append(time.monotonic() - written)
    return discovery, first_commit


def _notes(takeovers: list[float], held: int, discovery: list[float],
           first_commit: list[float], seed: int, settings: Any) -> dict[str, Any]:
    def p50(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 2) if xs else None

    def top(xs: list[float]) -> float | None:
        return round(max(xs), 2) if xs else None

    return {
        "takeover_seconds_p50": p50(takeovers), "takeover_seconds_max": top(takeovers),
        "lease held at kill": held,
        "discovery_seconds_p50": p50(discovery), "discovery_seconds_max": top(discovery),
        "first_commit_seconds_max": top(first_commit),
        "lease_seconds": settings.lease_seconds,
        "schedule_ttl_seconds": settings.schedule_ttl_seconds,
        "seed": seed,
        "_takeover_s": [round(x, 2) for x in takeovers],
        "_discovery_s": [round(x, 3) for x in discovery],
    }
