"""End to end: real redis-server, real Celery worker subprocesses, tiny seeded models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from producer.formats import read_file
from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from state_store.lease import LeaseManager
from state_store.store import CommitRequest, StateStore
from tests.integration.pipeline.harness import (
    ROOT,
    WorkerPool,
    caught_up,
    committed_tensors,
    meta,
    reference_tensors,
    settings_from_env,
    valid_entries,
    wait_ready,
    wait_until,
    worker_env,
)

QMSUM_TURNS = 60


def _publish_qmsum(client: redis.Redis, qmsum_dir: Path, stream: str, env: dict[str, str]) -> None:
    turns = read_file(sorted(qmsum_dir.glob("*.json"))[0], "qmsum")[:QMSUM_TURNS]
    Producer(client, settings=settings_from_env(env)).publish_many(stream, turns)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-rwkv"])
def test_committed_state_equals_feeding_the_engine_directly(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path, model: str
) -> None:
    pool = WorkerPool(worker_env(redis_server.url, tmp_path, model=model), tmp_path)
    client = redis_server.client()
    try:
        _publish_qmsum(client, qmsum_dir, "meeting", pool.env)
        pool.start("a")
        wait_until(lambda: caught_up(client, "meeting"), 180, "the worker to apply the meeting",
                   pool.logs)
    finally:
        pool.close()
    reference = reference_tensors(settings_from_env(pool.env), valid_entries(client, "meeting"))
    assert committed_tensors(client, "meeting") == reference


@pytest.mark.parametrize("point", ["after_load", "after_feed", "before_commit", "chunks_written"])
def test_worker_killed_mid_batch_loses_nothing_and_applies_nothing_twice(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path, point: str
) -> None:
    # a small chunk size makes every state a chunked one, so "chunks_written" is reachable
    pool = WorkerPool(worker_env(redis_server.url, tmp_path, SINKSTREAM_STATE_CHUNK_BYTES="8192"),
                      tmp_path)
    client = redis_server.client()
    marker = tmp_path / "fault"
    try:
        _publish_qmsum(client, qmsum_dir, "meeting", pool.env)
        doomed = pool.start("doomed", SINKSTREAM_FAULT_POINT=point, SINKSTREAM_FAULT_AFTER="3",
                            SINKSTREAM_FAULT_MARKER=str(marker))
        wait_until(marker.exists, 120, f"the worker to reach {point}", pool.logs)
        committed_before = StateStore(client).version("meeting")
        doomed.kill()
        assert committed_before == 2  # two batches committed, the third was in flight
        pool.start("survivor")
        wait_until(lambda: caught_up(client, "meeting"), 180, "the survivor to finish",
                   pool.logs)
    finally:
        pool.close()
    reference = reference_tensors(settings_from_env(pool.env), valid_entries(client, "meeting"))
    assert committed_tensors(client, "meeting") == reference
    assert int(meta(client, "meeting").get("leases_taken_over", 0)) >= 1
    # the killed worker's uncommitted chunks are gone or expiring, never the live state's
    StateStore(client).cleanup_orphans("meeting", min_age_s=0)
    live = StateStore(client).info("meeting")
    assert live is not None
    chunk_keys = list(client.scan_iter(match=b"sinkstream:{meeting}:state:*"))
    assert len(chunk_keys) == live.chunks


def test_paused_worker_commit_is_refused(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    pool = WorkerPool(worker_env(redis_server.url, tmp_path), tmp_path)
    client = redis_server.client()
    marker = tmp_path / "fault"
    try:
        _publish_qmsum(client, qmsum_dir, "meeting", pool.env)
        zombie = pool.start("zombie", SINKSTREAM_FAULT_POINT="before_commit",
                            SINKSTREAM_FAULT_AFTER="2", SINKSTREAM_FAULT_SLEEP="1",
                            SINKSTREAM_FAULT_MARKER=str(marker))
        wait_until(marker.exists, 120, "the zombie to reach its commit", pool.logs)
        os.kill(zombie.proc.pid, signal.SIGSTOP)
        time.sleep(3)  # > lease (2 s): the lease expires while the zombie is frozen
        pool.start("survivor")
        wait_until(lambda: caught_up(client, "meeting"), 180, "the survivor to finish",
                   pool.logs)
        os.kill(zombie.proc.pid, signal.SIGCONT)
        wait_until(lambda: int(meta(client, "meeting").get("commits_refused", 0)) >= 1, 30,
                   "the zombie's late commit to be refused", pool.logs)
    finally:
        pool.close()
    reference = reference_tensors(settings_from_env(pool.env), valid_entries(client, "meeting"))
    assert committed_tensors(client, "meeting") == reference


def test_two_workers_twenty_streams_all_in_order(pool: WorkerPool) -> None:
    """Two live workers share twenty streams (each task holds its even share of the runnable
    ones) and every stream commits as if fed alone. The streams are published once both are
    ready: a worker alone at the start takes a whole time slice's worth, and these twenty
    drain within one."""
    client = redis.Redis.from_url(pool.env["SINKSTREAM_REDIS_URL"])
    producer = Producer(client, settings=settings_from_env(pool.env))
    streams = [f"call-{i:02d}" for i in range(20)]
    wait_ready(pool, [pool.start("one"), pool.start("two")])
    for n, stream in enumerate(streams):
        producer.publish_many(
            stream, [(f"turn {t} of call {n}: the customer asks about invoice {n * 7 + t}",
                      "Agent" if t % 2 else "Caller", None) for t in range(8 + n % 5)])
    wait_until(lambda: all(caught_up(client, s) for s in streams), 240,
               "both workers to finish 20 streams", pool.logs)
    pool.close()
    settings = settings_from_env(pool.env)
    workers_seen = set()
    for stream in streams:
        assert committed_tensors(client, stream) == reference_tensors(
            settings, valid_entries(client, stream)), stream
        workers_seen.add(meta(client, stream)["worker"])
    assert len(workers_seen) == 2, "both workers should have taken streams"


def test_corrupt_state_and_malformed_entries_do_not_stop_other_streams(
    pool: WorkerPool,
) -> None:
    client = redis.Redis.from_url(pool.env["SINKSTREAM_REDIS_URL"])
    store = StateStore(client)
    lease = LeaseManager(client).acquire("broken", "vandal", 5)
    assert lease is not None
    store.commit(CommitRequest("broken", lease.token, 0, "0-1",
                               state=b"SNKSTATE but not really a state"))
    LeaseManager(client).release(lease)
    producer = Producer(client, settings=settings_from_env(pool.env))
    producer.publish_many("broken", [("hello", "A", None)])
    good = StreamKeys.of("good").input
    producer.publish_many("good", [("first good turn", "A", None)])
    client.xadd(good, {"speaker": "B"})  # no text
    client.xadd(good, {"text": b"\xff\xfe not utf-8"})
    client.xadd(good, {"text": "x" * 100_000})  # over max_entry_bytes
    producer.publish_many("good", [("second good turn", "B", None)])
    pool.start("one")
    wait_until(lambda: caught_up(client, "good"), 120, "the good stream", pool.logs)
    wait_until(lambda: meta(client, "broken").get("status") == "failed", 30,
               "the broken stream to be marked failed", pool.logs)
    assert "broken" in meta(client, "broken")["failure_reason"]
    dead = client.xrange(StreamKeys.of("good").dead)
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert len(reasons) == 3
    assert any("missing required field 'text'" in r for r in reasons)
    assert any("UTF-8" in r for r in reasons)
    assert any("limit" in r for r in reasons)
    pool.close()
    assert committed_tensors(client, "good") == reference_tensors(
        settings_from_env(pool.env), valid_entries(client, "good"))
    status = subprocess.run(
        [sys.executable, "-m", "sinkstream", "status", "broken", "--json"], env=pool.env,
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    row = json.loads(status.stdout)
    assert row["status"] == "failed"
    assert "stream 'broken'" in row["failure"] and "truncated" in row["failure"]


def test_demo_prints_rolling_and_final_summaries(tmp_path: Path) -> None:
    env = {**os.environ, "SINKSTREAM_MODEL": "tiny-llama", "OMP_NUM_THREADS": "1",
           "SINKSTREAM_MODEL_CACHE_DIR": str(tmp_path / "models"),
           "SINKSTREAM_SUMMARY_MAX_NEW_TOKENS": "16", "COLUMNS": "120"}
    result = subprocess.run(
        [sys.executable, "-m", "sinkstream", "demo", "--speed", "100", "--summary-every", "300"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rolling summary" in result.stdout
    assert "final summary" in result.stdout
    assert "/metrics" in result.stdout
    json.dumps(result.stdout)  # printable


def test_summarize_and_ask_on_demand_from_the_committed_state(pool: WorkerPool) -> None:
    env = {**pool.env, "SINKSTREAM_SUMMARY_MAX_NEW_TOKENS": "8", "COLUMNS": "200"}
    client = redis.Redis.from_url(env["SINKSTREAM_REDIS_URL"])
    Producer(client, settings=settings_from_env(env)).publish_many(
        "standup",
        [("we ship on friday", "Maya", None), ("I own the release notes", "Jonas", None)],
    )
    pool.start("one", SINKSTREAM_SUMMARY_MAX_NEW_TOKENS="8")
    wait_until(lambda: caught_up(client, "standup"), 120, "the stream to be applied", pool.logs)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sinkstream", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    summary = cli("summarize", "standup", "--timeout", "60")
    assert summary.returncode == 0, summary.stdout + summary.stderr
    assert "on_demand summary" in summary.stdout
    answer = cli("ask", "standup", "who owns the release notes?", "--timeout", "60")
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "answer" in answer.stdout
    kinds = [f[b"kind"] for _, f in client.xrange(StreamKeys.of("standup").output)]
    assert kinds == [b"on_demand", b"answer"]
    Producer(client, settings=settings_from_env(env)).end_stream("standup")
    followed = cli("follow", "standup", "--from-start", "--until-final")
    assert followed.returncode == 0, followed.stdout + followed.stderr
    for kind in ("on_demand summary", "answer", "final summary"):
        assert kind in followed.stdout


def test_asking_about_a_stream_without_state_says_what_to_do(pool: WorkerPool) -> None:
    result = subprocess.run([sys.executable, "-m", "sinkstream", "ask", "nothing-here", "hi?"],
                            env=pool.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "no committed state" in result.stderr and "sinkstream worker" in result.stderr
