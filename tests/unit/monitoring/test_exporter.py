"""The lag exporter against a private redis-server: exact numbers for every kind of stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from monitoring.exporter import LagExporter, render_once
from monitoring.lag import LagReader
from sinkstream.cli.localredis import RedisServer, free_port
from sinkstream.contracts.keys import STREAMS_REGISTRY, StreamKeys
from state_store.lease import LeaseManager
from state_store.presence import WorkerPresence
from state_store.store import CommitRequest, StateStore
from tests.integration.pipeline.harness import ROOT


def _redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _add(client: redis.Redis, stream: str, n: int, start_ms: int | None = None) -> list[str]:
    """Append ``n`` entries (explicit old ids when ``start_ms`` is given) and register."""
    key = StreamKeys.of(stream).input
    ids = []
    for i in range(n):
        entry_id = f"{start_ms + i}-0" if start_ms is not None else "*"
        added: Any = client.xadd(key, {"text": f"turn {i}"}, id=entry_id)
        ids.append(added.decode())
    client.zadd(STREAMS_REGISTRY, {stream: time.time()})
    return ids


def _commit(client: redis.Redis, stream: str, last_id: str, trim: bool = False,
            payload: bytes = b"x" * 1000) -> None:
    leases = LeaseManager(client)
    lease = leases.acquire(stream, "test-worker", 5)
    assert lease is not None
    store = StateStore(client)
    store.commit(CommitRequest(stream, lease.token, store.version(stream), last_id, state=payload,
                               trim_input=trim))
    leases.release(lease)


@pytest.fixture
def populated(r: redis.Redis) -> redis.Redis:
    now = _redis_ms(r)
    # caught up, input kept: 3 entries all applied
    ids = _add(r, "caught", 3)
    _commit(r, "caught", ids[-1])
    # behind, input kept (trim off): 5 entries, 2 applied -> 3 pending (counted server side)
    ids = _add(r, "behind", 5, start_ms=now - 40_000)
    _commit(r, "behind", ids[1])
    # behind, applied input trimmed: 4 entries, 2 applied and deleted -> 2 pending (XLEN)
    ids = _add(r, "trimmed", 4, start_ms=now - 20_000)
    _commit(r, "trimmed", ids[1], trim=True)
    # never committed: everything pending, oldest 90 s old
    _add(r, "fresh", 2, start_ms=now - 90_000)
    # ended: caught up and marked ended
    ids = _add(r, "ended", 2)
    _commit(r, "ended", ids[-1])
    r.hset(StreamKeys.of("ended").meta, "ended", 1)
    # failed with a backlog: reported as failed, not as lag
    _add(r, "failed", 7, start_ms=now - 500_000)
    StateStore(r).mark_failed("failed", "stream 'failed': state truncated")
    # caught up but a worker holds its lease right now
    ids = _add(r, "leased", 1)
    _commit(r, "leased", ids[-1])
    LeaseManager(r).acquire("leased", "busy-worker", 60)
    # dead letters on two streams
    r.xadd(StreamKeys.of("caught").dead, {"reason": "missing required field 'text'"})
    r.xadd(StreamKeys.of("behind").dead, {"reason": "x"})
    r.xadd(StreamKeys.of("behind").dead, {"reason": "y"})
    # a foreign registry member is never turned into keys
    r.zadd(STREAMS_REGISTRY, {"bad}id": 1})
    return r


def test_snapshot_numbers(populated: redis.Redis) -> None:
    snap = LagReader(populated).read()
    assert snap.registry_size == 8
    assert snap.scanned == 7
    assert snap.streams == {"active": 4, "idle": 1, "ended": 1, "failed": 1}
    assert snap.pending_entries == 3 + 2 + 2
    assert snap.lagging_streams == 3
    assert snap.pending_capped_streams == 0
    assert 89 < snap.oldest_age_s < 100  # "fresh", measured on Redis's clock
    assert snap.age_buckets[-1] == 3
    assert snap.state_bytes == 5 * 1000
    assert snap.dead_letters == 3
    assert snap.top == []  # no per-stream series unless asked


def test_count_cap_and_top_k(populated: redis.Redis) -> None:
    snap = LagReader(populated, count_cap=2, top_k=2).read()
    # "behind" has 3 pending but the walk stops at the cap: a lower bound, flagged
    assert snap.pending_entries == 2 + 2 + 2
    assert snap.pending_capped_streams == 1
    assert [lag.stream_id for lag in snap.top] == ["fresh", "behind"]
    assert snap.top[0].pending == 2


def test_max_streams_bounds_the_work(r: redis.Redis) -> None:
    for i in range(10):
        _add(r, f"s{i}", 1)
    snap = LagReader(r, max_streams=3, batch_size=2).read()
    assert (snap.scanned, snap.registry_size, snap.pending_entries) == (3, 10, 3)


def _parse(exporter: LagExporter) -> dict[str, list[Any]]:
    registry = CollectorRegistry()
    registry.register(exporter)
    text = generate_latest(registry).decode()
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_exposition(populated: redis.Redis) -> None:
    exporter = LagExporter(populated)
    before = _parse(exporter)
    assert before["sinkstream_exporter_redis_up"][0].value == 0
    assert "sinkstream_input_lag_entries" not in before  # nothing measured yet: no made-up 0
    assert exporter.cycle()
    samples = _parse(exporter)
    value = {name: s[0].value for name, s in samples.items() if len(s) == 1}
    assert value["sinkstream_exporter_redis_up"] == 1
    assert value["sinkstream_input_lag_entries"] == 7
    assert value["sinkstream_input_lagging_streams"] == 3
    assert value["sinkstream_dead_letter_entries"] == 3
    assert value["sinkstream_state_stored_bytes"] == 5000
    assert value["sinkstream_input_lag_age_seconds_gcount"] == 3
    by_status = {s.labels["status"]: s.value for s in samples["sinkstream_streams"]}
    assert by_status == {"active": 4, "idle": 1, "ended": 1, "failed": 1}
    buckets = {s.labels["le"]: s.value for s in samples["sinkstream_input_lag_age_seconds_bucket"]}
    assert buckets["15.0"] == 0 and buckets["30.0"] == 1 and buckets["60.0"] == 2
    assert buckets["120.0"] == 3 and buckets["+Inf"] == 3
    assert samples["sinkstream_redis_info"][0].labels == {"maxmemory_policy": "noeviction"}
    for series in samples.values():
        for s in series:
            assert "stream" not in s.labels


def test_redis_down_is_reported_not_raised() -> None:
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.2,
                         retry=Retry(NoBackoff(), 0))
    exporter = LagExporter(client)
    assert not exporter.cycle()
    assert not exporter.cycle()
    samples = _parse(exporter)
    assert samples["sinkstream_exporter_redis_up"][0].value == 0
    assert samples["sinkstream_exporter_errors_total"][0].value == 2
    assert "sinkstream_input_lag_entries" not in samples


def test_exporter_command_serves_and_stops_on_sigterm(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    _add(r, "a", 4)
    port = free_port()
    env = {**os.environ, "SINKSTREAM_REDIS_URL": redis_server.url,
           "SINKSTREAM_METRICS_PORT": str(port), "SINKSTREAM_EXPORTER_TOP_K": "1"}
    env.pop("SINKSTREAM_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "sinkstream", "exporter", "--interval", "0.2"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        body = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "sinkstream_input_lag_entries 4.0" not in body:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as rsp:
                    body = rsp.read().decode()
            except OSError:
                time.sleep(0.1)
        assert "sinkstream_input_lag_entries 4.0" in body, body[-2000:]
        assert 'sinkstream_input_lag_top_entries{stream="a"} 4.0' in body
        assert "process_resident_memory_bytes" in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_lag_on_a_redis_cluster(tmp_path: Any) -> None:
    """Streams spread over three shards: one pipelined pass still reads every one."""
    from sinkstream.cli import localredis

    if not hasattr(localredis, "LocalCluster"):
        pytest.skip("no LocalCluster launcher in this build")
    cluster = localredis.LocalCluster(tmp_path / "cluster", masters=3, replicas=0).start()
    try:
        client = cluster.client()
        streams = [f"call-{i}" for i in range(12)]
        for n, stream in enumerate(streams):
            _add(client, stream, n + 1)
        _commit(client, "call-3", client.xrange(StreamKeys.of("call-3").input)[-1][0].decode())
        shards = {cluster.primary_for(StreamKeys.of(s).input).port for s in streams}
        assert len(shards) > 1
        snap = LagReader(client, batch_size=5).read()
        assert snap.scanned == 12
        assert snap.pending_entries == sum(range(1, 13)) - 4
        assert snap.streams["active"] == 11 and snap.streams["idle"] == 1
        exporter = LagExporter(client)
        assert exporter.cycle()
        assert _parse(exporter)["sinkstream_input_lag_entries"][0].value == 74
    finally:
        cluster.stop()


def test_live_workers_are_the_unexpired_heartbeats(r: redis.Redis) -> None:
    assert LagReader(r).read().live_workers == 0
    WorkerPresence(r, "gpu-host-1", slots=2).beat()
    WorkerPresence(r, "gone", ttl_s=0.05).beat()
    time.sleep(0.1)
    assert LagReader(r).read().live_workers == 2
    assert b"sinkstream_workers_live 2.0" in render_once(r)
