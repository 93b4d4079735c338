"""Scale-out: throughput with 1, 2 and 4 worker processes, against one Redis and against a
3-shard Redis Cluster (3 primaries + 3 replicas), same streams, same run; plus the measured
constants behind docs/scaling.md: the commit round trip per state size (with and without
``WAIT 1``) and the dispatcher's poll cost per registered stream.

Throughput: ``streams`` QMSum meetings (a different slice each) are published up front, then
``k`` real ``sinkstream worker`` processes (tiny-llama, one torch thread each, the Celery
broker a separate plain Redis) apply them; tokens/s = tokens committed / wall seconds from
the first publish to the last commit. Each cell starts its own workers (model load excluded:
a warm-up stream per worker is applied before the clock starts). The cells alternate between
the backends so both sample the same stretches of this shared, noisy machine.

What it can show here: the box has 2 CPU cores shared with other work, each worker is
CPU-bound (feeding the model), and Redis, the broker, the dispatcher and this process compete
for the same 2 cores; so 4 workers cannot beat 2 by much, and the cluster's extra processes
(6 redis-servers) cost CPU rather than add capacity. The numbers measure coordination overhead
and correctness under parallelism, not how a fleet on separate hosts scales.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DATA_DIR
from benchmarks.run import BenchResult

REPO = Path(__file__).resolve().parents[1]
WORKER_COUNTS = (1, 2, 4)
#: state sizes for the commit round trip: RWKV-7 0.1B fp32, SmolLM2 bf16 / fp32 at R=1020
STATE_SIZES = {
    "64 KiB": 64 * 1024,
    "2.7 MB (RWKV-7 0.1B fp32)": 2_695_168,
    "23.6 MB (SmolLM2 bf16, R=1020)": 23_602_304,
    "47.2 MB (SmolLM2 fp32, R=1020)": 47_196_416,
}


def _worker_env(data_url: str, broker_url: str, tmp: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "SINKSTREAM_REDIS_URL": data_url,
        "SINKSTREAM_BROKER_URL": broker_url,
        "SINKSTREAM_MODEL": "tiny-llama",
        "SINKSTREAM_MODEL_CACHE_DIR": str(tmp / "models"),
        "SINKSTREAM_RECENT_TOKENS": "48",
        "SINKSTREAM_CHUNK_TOKENS": "16",
        "SINKSTREAM_MAX_BATCH_ENTRIES": "8",
        "SINKSTREAM_SUMMARY_EVERY_TOKENS": "0",
        "SINKSTREAM_LEASE_SECONDS": "10",
        "SINKSTREAM_SCHEDULE_TTL_SECONDS": "10",
        "SINKSTREAM_DISPATCH_INTERVAL_SECONDS": "0.05",
        "SINKSTREAM_METRICS_PORT": "0",
        "SINKSTREAM_TRIM_APPLIED_INPUT": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
    }
    env.pop("SINKSTREAM_CONFIG", None)
    return env


def _turns(n_streams: int, per_stream: int) -> list[list[Any]]:
    from producer.formats import read_file

    files = sorted((DATA_DIR / "qmsum" / "val").glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no QMSum data under {DATA_DIR / 'qmsum' / 'val'}")
    out = []
    for i in range(n_streams):
        turns = read_file(files[i % len(files)], "qmsum")
        start = (i // len(files)) * per_stream
        out.append(turns[start : start + per_stream])
    return out


def _flush(client: Any) -> None:
    from state_store.connection import is_cluster

    if is_cluster(client):
        client.flushall(target_nodes="primaries")
    else:
        client.flushall()


def _committed(client: Any, sid: str) -> tuple[str | None, int]:
    from sinkstream.contracts.keys import StreamKeys

    last, tokens = client.hmget(StreamKeys.of(sid).state, ["last_entry_id", "tokens_seen"])
    return (last.decode() if last else None), int(tokens or 0)


def _wait(predicate: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]],
          logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(p.poll() is not None for p in procs):
            tails = "\n".join(log.read_text(errors="replace")[-2000:] for log in logs)
            raise RuntimeError(f"a worker exited while waiting for {what}:\n{tails}")
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def _cell(backend: str, data: Any, data_url: str, broker: Any, workers: int,
          streams: list[list[Any]], tmp: Path, round_no: int) -> dict[str, Any]:
    """Start ``workers`` workers, warm them up, time applying every stream; stop them."""
    from producer.publisher import Producer
    from sinkstream.contracts.keys import StreamKeys
    from sinkstream.settings import Settings

    client = data.client()
    _flush(client)
    broker.client().flushall()
    env = _worker_env(data_url, broker.url, tmp)
    settings = Settings(redis_url=data_url, broker_url=broker.url)
    producer = Producer(client, settings=settings)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for i in range(workers):
            log = tmp / f"{backend}-{workers}w-r{round_no}-{i}.log"
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sinkstream", "worker", "--name", f"bench{i}@%h"],
                env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                start_new_session=True))
        # warm-up: one short stream per worker, applied before the clock starts
        warm = {}
        for i in range(workers):
            result = producer.publish_many(f"warm-{i}", streams[0][:4])
            warm[f"warm-{i}"] = result.last_id
        _wait(lambda: all(_committed(client, s)[0] == last for s, last in warm.items()), 300,
              "the warm-up streams", procs, logs)
        sids = [f"{backend}-{i}" for i in range(len(streams))]
        started = time.perf_counter()
        last_ids = {}
        for sid, turns in zip(sids, streams, strict=True):
            last_ids[sid] = producer.publish_many(sid, turns).last_id
        _wait(lambda: all(_committed(client, s)[0] == last for s, last in last_ids.items()),
              900, "every stream to be applied", procs, logs)
        wall = time.perf_counter() - started
        tokens = sum(_committed(client, s)[1] for s in sids)
        by_worker: dict[str, int] = {}
        for sid in sids:
            raw = client.hget(StreamKeys.of(sid).meta, "worker")
            name = raw.decode() if raw else "?"
            by_worker[name] = by_worker.get(name, 0) + 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    return {"backend": backend, "workers": workers, "round": round_no, "streams": len(sids),
            "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": tokens / wall,
            "workers_that_committed": len(by_worker)}


def _redis_cpu_s(client: Any) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _commit_redis_cpu(client: Any, reps: int) -> dict[str, float]:
    """Redis CPU milliseconds per commit for each state size on one server (INFO cpu
    delta): what bounds a shard's commit bandwidth, apart from the network."""
    from state_store.lease import LeaseManager
    from state_store.store import CommitRequest, StateStore

    store, leases = StateStore(client), LeaseManager(client)
    out: dict[str, float] = {}
    for label, size in STATE_SIZES.items():
        sid = f"cpu-{size}"
        payload = os.urandom(size)
        lease = leases.acquire(sid, "bench", 600)
        assert lease is not None
        store.commit(CommitRequest(sid, lease.token, 0, "1-0", state=payload))
        before = _redis_cpu_s(client)
        for i in range(1, reps + 1):
            store.commit(CommitRequest(sid, lease.token, i, f"{i + 1}-0", state=payload))
        out[label] = (_redis_cpu_s(client) - before) / reps * 1000
        leases.release(lease)
        for key in list(client.scan_iter(match=f"sinkstream:{{{sid}}}:*")):
            client.delete(key)
    return out


def _commit_rtt(client: Any, reps: int, wait_replicas: int = 0) -> dict[str, float]:
    """Median milliseconds of StateStore.commit for each state size (lease held)."""
    from state_store.lease import LeaseManager
    from state_store.store import CommitRequest, StateStore

    store = StateStore(client, wait_replicas=wait_replicas, wait_timeout_ms=5000)
    leases = LeaseManager(client)
    out: dict[str, float] = {}
    for label, size in STATE_SIZES.items():
        sid = f"rtt-{size}-{wait_replicas}"
        payload = os.urandom(size)
        lease = leases.acquire(sid, "bench", 600)
        assert lease is not None
        times = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            result = store.commit(CommitRequest(sid, lease.token, i, f"{i + 1}-0", state=payload))
            if i:  # the first one also loads the script: not counted
                times.append((time.perf_counter() - t0) * 1000)
            if wait_replicas:
                assert result.replicas is not None and result.replicas >= wait_replicas
        leases.release(lease)
        for key in list(client.scan_iter(match=f"sinkstream:{{{sid}}}:*")):
            client.delete(key)  # keep the servers' memory down between sizes
        out[label] = statistics.median(times)
    return out


def _poll_cost(server: Any, n_streams: int) -> dict[str, float]:
    """One dispatcher pass over ``n_streams`` idle registered streams: client wall ms and
    Redis CPU ms (INFO cpu), median of 3."""
    from sinkstream.contracts.keys import STREAMS_REGISTRY, StreamKeys
    from workers.scheduling.dispatcher import Dispatcher
    from workers.scheduling.scheduler import Scheduler

    client = server.client()
    client.flushall()
    pipe = client.pipeline(transaction=False)
    for i in range(n_streams):
        keys = StreamKeys.of(f"idle-{i}")
        pipe.xadd(keys.input, {"text": "hi"}, id=f"{1000 + i}-0")
        pipe.hset(keys.state, mapping={"last_entry_id": f"{1000 + i}-0", "version": 1})
        pipe.zadd(STREAMS_REGISTRY, {f"idle-{i}": time.time()})
        if i % 1000 == 999:
            pipe.execute()
            pipe = client.pipeline(transaction=False)
    pipe.execute()
    dispatcher = Dispatcher(client, Scheduler(client, lambda sid: None, 10), 0.25, 1e9)
    dispatcher._last_discover = time.monotonic()  # no SCAN: the poll alone
    walls, cpus = [], []
    for _ in range(3):
        cpu = client.info("cpu")
        before = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        t0 = time.perf_counter()
        dispatcher.poll_once()
        walls.append((time.perf_counter() - t0) * 1000)
        cpu = client.info("cpu")
        cpus.append((float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]) - before) * 1000)
    client.flushall()
    return {"streams": n_streams, "poll_wall_ms": statistics.median(walls),
            "redis_cpu_ms": statistics.median(cpus)}


def run(quick: bool) -> BenchResult:
    from sinkstream.cli.localredis import LocalCluster, RedisServer

    n_streams, per_stream = (8, 24) if quick else (16, 48)
    rounds = 1 if quick else 2
    streams = _turns(n_streams, per_stream)
    tmp = Path(tempfile.mkdtemp(prefix="scaleout-"))
    single = RedisServer(tmp / "single")
    cluster = LocalCluster(tmp / "cluster", masters=3, replicas=1)
    broker = RedisServer(tmp / "broker")
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    try:
        single.start()
        cluster.start()
        broker.start()
        backends = {"single": (single, single.url), "cluster": (cluster, cluster.url)}
        for round_no in range(rounds):
            for workers in WORKER_COUNTS:
                order = ["single", "cluster"] if (workers + round_no) % 2 else \
                    ["cluster", "single"]
                for name in order:
                    data, url = backends[name]
                    rows.append(_cell(name, data, url, broker, workers, streams, tmp, round_no))
        # constants for docs/scaling.md
        reps = 3 if quick else 7
        rtt = {
            "single, no WAIT": _commit_rtt(single.client(), reps),
            "cluster, no WAIT": _commit_rtt(cluster.client(), reps),
            "cluster, WAIT 1": _commit_rtt(cluster.client(), reps, wait_replicas=1),
        }
        extra["commit_ms"] = rtt
        extra["commit_redis_cpu_ms"] = _commit_redis_cpu(single.client(), reps)
        extra["dispatcher_poll"] = [_poll_cost(single, n) for n in
                                    ((1000, 5000) if quick else (1000, 10_000))]
    finally:
        broker.stop(hard=True)
        cluster.stop()
        single.stop(hard=True)

    def tput(backend: str, workers: int) -> float:
        return statistics.median(r["tokens_per_s"] for r in rows
                                 if r["backend"] == backend and r["workers"] == workers)

    for row in rows:
        row["vs_1_worker"] = row["tokens_per_s"] / tput(row["backend"], 1)
    summary: dict[str, Any] = {
        "scaling_4_workers": tput("single", 4) / tput("single", 1),
        "scaling_4_workers_cluster": tput("cluster", 4) / tput("cluster", 1),
        "scaling_2_workers": tput("single", 2) / tput("single", 1),
        "scaling_2_workers_cluster": tput("cluster", 2) / tput("cluster", 1),
        "cluster_vs_single_1_worker": tput("cluster", 1) / tput("single", 1),
        "cluster_vs_single_4_workers": tput("cluster", 4) / tput("single", 4),
        "cpu_cores": os.cpu_count(),
    }
    for label, ms in extra["commit_ms"]["single, no WAIT"].items():
        summary[f"commit_ms {label} single"] = ms
    for label, ms in extra["commit_ms"]["cluster, WAIT 1"].items():
        summary[f"commit_ms {label} cluster WAIT 1"] = ms
    for label, ms in extra["commit_redis_cpu_ms"].items():
        summary[f"commit_redis_cpu_ms {label}"] = ms
    last_poll = extra["dispatcher_poll"][-1]
    summary["dispatcher_poll_ms_per_1k_streams"] = \
        last_poll["poll_wall_ms"] / last_poll["streams"] * 1000
    summary["dispatcher_redis_cpu_ms_per_1k_streams"] = \
        last_poll["redis_cpu_ms"] / last_poll["streams"] * 1000
    return BenchResult(
        title=f"Scale-out: {n_streams} streams x {per_stream} QMSum turns, tiny-llama, "
              f"1/2/4 worker processes, single Redis vs 3-shard cluster "
              f"({os.cpu_count()} CPU cores)",
        rows=rows, summary=summary, extra=extra)
