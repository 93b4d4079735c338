"""The chaos scenarios, shared by the CI tests (``tests/integration/chaos/test_*.py``) and the
soak benchmark (``benchmarks/chaos.py``): each returns a :class:`Report` whose verdict the
caller asserts on.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from tests.integration.chaos.common import (
    Reference,
    Verdict,
    Workload,
    all_caught_up,
    chaos_env,
    feed_live,
    log_lines,
    make_workload,
    mid_task,
    settings_for,
    start_producer,
    total_versions,
    verify,
    wait_for,
    workload_spec,
)
from tests.integration.chaos.common import stop as stop_proc
from tests.integration.pipeline.harness import (
    Worker,
    WorkerPool,
    is_ready,
    wait_ready,
    wait_until,
    worker_env,
)


@dataclass
class Report:
    scenario: str
    trials: int = 0
    faults: str = ""
    verdict: Verdict = field(default_factory=Verdict)
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        v = self.verdict
        return {"scenario": self.scenario, "trials": self.trials, "faults": self.faults,
                "streams": v.streams, "entries": v.entries, "lost": v.lost + v.unapplied,
                "duplicated": v.duplicated, "mismatched": len(v.mismatched),
                "summaries": v.summaries, "bad summaries": len(v.bad_summaries),
                "seconds": round(self.seconds, 1), **self.notes}


# ----- kill -9 at random points -----------------------------------------------------------------
def random_kills(
    tmp: Path, *, seed: int, kills: int, workers: int = 3, streams: int = 6,
    gap_s: tuple[float, float] = (0.5, 2.5), pace_s: float = 0.4, keep_survivor: bool = False,
) -> Report:
    """``workers`` workers at once consume ``streams`` live streams that a producer thread keeps
    publishing to (2 turns per stream every ``pace_s``); ``kills`` times, after a seeded random
    delay, a random worker (a ready one if any) is killed with SIGKILL and a replacement is
    started (``keep_survivor``: first wait until two are ready, so one always survives; slower,
    for the soak). Then publishing stops, every stream catches up and is verified."""
    started = time.monotonic()
    rng = random.Random(seed)
    server = RedisServer(tmp / "redis").start()
    env = chaos_env(worker_env(server.url, tmp))
    pool = WorkerPool(env, tmp)
    client = server.client()
    report = Report("kill -9 at random points", faults=f"SIGKILL, {workers} workers running")
    names = itertools.count()
    mid = 0
    done = threading.Event()
    published: dict[str, list[tuple[str, str]]] = {}
    feeder: threading.Thread | None = None
    try:
        settings = settings_for(env)
        reference = Reference(settings)
        live = [pool.start(f"w{next(names)}") for _ in range(workers)]
        wait_ready(pool, live)
        source = make_workload(seed, "kill", streams, turns=400)
        feeder = threading.Thread(
            target=feed_live, args=(Producer(client, settings=settings), source, published,
                                    done, pace_s, 2, 3), daemon=True)
        feeder.start()
        for _ in range(kills):
            time.sleep(rng.uniform(*gap_s))
            if keep_survivor:
                wait_until(lambda: sum(is_ready(w) for w in live) >= 2, 180,
                           "two ready workers (one survives the kill)", pool.logs)
            # a ready worker if any (those run batches), else one still starting up
            victim = rng.choice([w for w in live if is_ready(w)] or live)
            mid += mid_task(victim)
            victim.kill()
            report.trials += 1
            live.remove(victim)
            live.append(pool.start(f"w{next(names)}"))
        done.set()
        feeder.join(timeout=60)
        workload = Workload(published)
        wait_until(lambda: all_caught_up(client, workload.streams), 180,
                   f"every stream to catch up (seed {seed})", pool.logs)
        report.verdict.add(verify(client, reference, workload))
        report.notes = {"mid-batch kills": mid, "seed": seed,
                        "batching workers": batching_workers(pool)}
    finally:
        done.set()
        pool.close()
        server.stop(hard=True)
    report.seconds = time.monotonic() - started
    return report


def batching_workers(pool: WorkerPool) -> int:
    """Workers that checked batch invariance on start and fed streams in shared forwards
    (their log says so; the default ``batch_streams`` is above 1)."""
    return sum("cross-stream batching on" in w.log.read_text(errors="replace")
               for w in pool.workers)


# ----- Redis restarts and a long outage -----------------------------------------------------------
def redis_outages(
    tmp: Path, *, seed: int, restarts: int, outage_s: float, workers: int = 2,
    streams: int = 4, turns: int = 60,
) -> Report:
    """AOF Redis; a producer process publishes slowly while ``workers`` workers consume. Redis
    is restarted ``restarts`` times at seeded random moments (alternately SIGKILL and SIGTERM,
    down 0.5-2 s), then, if ``outage_s``, stopped for that long and started again on the same
    port. Afterwards: every published output is still there, every entry applied once, and
    workers and producer logged a bounded number of WARNING+ lines."""
    started = time.monotonic()
    rng = random.Random(seed)
    server = RedisServer(tmp / "redis", appendonly=True).start()
    env = chaos_env(worker_env(server.url, tmp))
    pool = WorkerPool(env, tmp)
    client = server.client()
    report = Report("Redis restart / outage (AOF)", faults="")
    producer_proc = None
    try:
        settings = settings_for(env)
        reference = Reference(settings)
        live = [pool.start(f"r{i}") for i in range(workers)]
        wait_ready(pool, live)
        workload = make_workload(seed, "aof", streams, turns)
        producer_proc, producer_log = start_producer(
            env, tmp, workload_spec(workload, pause_s=0.3, batch=2, attempts=8))
        resume_s: list[float] = []
        kinds = []
        for i in range(restarts + (1 if outage_s else 0)):
            outage = outage_s if i == restarts else 0.0
            _wait_progress(client, workload, pool)
            time.sleep(rng.uniform(0.0, 1.0))
            outputs_before = _outputs(client, workload)
            versions_before = total_versions(client, workload.streams)
            hard = i % 2 == 0
            down = outage or rng.uniform(0.5, 2.0)
            kinds.append(f"{'SIGKILL' if hard else 'SIGTERM'} down {down:.1f}s")
            server.stop(hard=hard)
            time.sleep(down)
            server.start()
            back = time.monotonic()
            # committed state survived; summaries published before are all still there
            assert total_versions(client, workload.streams) >= versions_before
            after = _outputs(client, workload)
            for sid, ids in outputs_before.items():
                missing = set(ids) - set(after[sid])
                assert not missing, f"outputs of {sid} lost in the restart: {missing}"
            wait_until(lambda vb=versions_before: total_versions(client, workload.streams) > vb,
                       60, "a commit after Redis came back", pool.logs)
            resume_s.append(time.monotonic() - back)
            report.trials += 1
        wait_for(producer_proc, producer_log, 180)
        wait_until(lambda: all_caught_up(client, workload.streams), 120,
                   f"every stream to catch up (seed {seed})", pool.logs)
        report.verdict.add(verify(client, reference, workload))
        alive = [w.proc.poll() is None for w in live]
        warnings = {w.log.name: len(log_lines(w.log, since=" ready.")) for w in live}
        warnings[producer_log.name] = len(log_lines(producer_log))
        report.faults = "; ".join(kinds)
        report.notes = {"resume s (max)": round(max(resume_s), 2), "workers alive": all(alive),
                        "warning lines (max per process)": max(warnings.values()),
                        "seed": seed}
        report.notes["_warnings"] = warnings
        report.notes["_resume_s"] = [round(x, 2) for x in resume_s]
    finally:
        if producer_proc is not None:
            stop_proc(producer_proc)
        pool.close()
        server.stop(hard=True)
    report.seconds = time.monotonic() - started
    return report


def _wait_progress(client: redis.Redis, workload: Workload, pool: WorkerPool) -> None:
    before = total_versions(client, workload.streams)
    wait_until(lambda: total_versions(client, workload.streams) >= before + 2, 60,
               "workers to make progress", pool.logs)


def _outputs(client: redis.Redis, workload: Workload) -> dict[str, list[bytes]]:
    return {sid: [eid for eid, _ in client.xrange(StreamKeys.of(sid).output)]
            for sid in workload.streams}


def live_workers(workers: list[Worker]) -> list[Worker]:
    return [w for w in workers if w.proc.poll() is None]


# ----- a burst of new streams -----------------------------------------------------------------
def stream_burst(
    tmp: Path, *, streams: int, observe_s: float, drain: bool, max_queued: int = 64,
    sample: int = 20,
) -> Report:
    """``streams`` new stream ids at once (raw XADD + registry, one short entry each) into one
    worker. Watches the queue for ``observe_s`` (it must stay near ``max_queued``, not grow
    with re-scheduled duplicates); with ``drain``, waits until every stream is applied. Applied
    streams (``sample`` of them, or all when draining) are verified against the reference."""
    from sinkstream.contracts.keys import STREAMS_REGISTRY

    started = time.monotonic()
    server = RedisServer(tmp / "redis").start()
    env = worker_env(server.url, tmp, SINKSTREAM_MAX_QUEUED_TASKS=str(max_queued))
    pool = WorkerPool(env, tmp)
    client = server.client()
    report = Report(f"burst of {streams:,} new stream ids", faults="load")
    try:
        worker = pool.start("burst")
        wait_ready(pool, [worker])
        texts: dict[str, list[tuple[str, str]]] = {}
        pipe = client.pipeline(transaction=False)
        for i in range(streams):
            sid = f"burst-{i:05d}"
            text = f"[{sid}#0] hello {i}"
            texts[sid] = [(text, "")]
            pipe.xadd(StreamKeys.of(sid).input, {"text": text})
            pipe.zadd(STREAMS_REGISTRY, {sid: time.time()})
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
        t0 = time.monotonic()
        longest = 0
        applied: list[str] = []
        last_count = t0
        while True:
            longest = max(longest, int(client.llen("sinkstream")))
            elapsed = time.monotonic() - t0
            if not drain and elapsed >= observe_s:
                break
            if drain and elapsed >= observe_s and len(applied) >= streams:
                break
            if drain and time.monotonic() - last_count >= 5:
                applied, last_count = _applied(client), time.monotonic()
            assert worker.proc.poll() is None, pool.logs()
            time.sleep(0.2)
        applied = _applied(client)
        elapsed = time.monotonic() - t0
        report.trials = 1
        reference = Reference(settings_for(env))
        check = applied if drain else sorted(applied)[:sample]
        report.verdict.add(verify(client, reference, Workload({s: texts[s] for s in check})))
        report.verdict.streams = streams
        report.notes = {"applied": len(applied), "streams/s": round(len(applied) / elapsed, 1),
                        "longest queue": longest, "workers alive": worker.proc.poll() is None,
                        "registered": int(client.zcard(STREAMS_REGISTRY))}
        if not drain:
            report.verdict.entries = len(check)
    finally:
        pool.close()
        server.stop(hard=True)
    report.seconds = time.monotonic() - started
    return report


def _applied(client: redis.Redis) -> list[str]:
    return [key.decode()[len("sinkstream:{"):-len("}:state")]
            for key in client.scan_iter(match="sinkstream:{burst-*}:state", count=5000)]
