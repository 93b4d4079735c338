"""Live workers: heartbeats per task slot that expire on the server's clock, a clean leave,
and a background beat that keeps a worker counted."""

from __future__ import annotations

import time

import pytest
import redis

from sinkstream.contracts.keys import WORKERS
from state_store.presence import Heartbeat, WorkerPresence
from tests.redis_server import RedisServer


def test_each_task_slot_counts_until_its_heartbeat_expires(r: redis.Redis) -> None:
    solo = WorkerPresence(r, "host-a-1", ttl_s=0.3)
    forked = WorkerPresence(r, "host-b-2", slots=3, ttl_s=30)
    assert solo.live() == 0
    assert solo.beat() == 1
    assert forked.beat() == 4
    assert sorted(m.decode() for m in r.zrange(WORKERS, 0, -1)) == [
        "host-a-1#1", "host-b-2#1", "host-b-2#2", "host-b-2#3"]
    time.sleep(0.4)  # host-a stopped beating: it drops out, host-b stays
    assert solo.live() == 3
    assert r.zcard(WORKERS) == 3  # expired members are removed, not only skipped


def test_a_worker_that_leaves_drops_out_at_once(r: redis.Redis) -> None:
    a, b = WorkerPresence(r, "a", ttl_s=30), WorkerPresence(r, "b", ttl_s=30)
    a.beat()
    b.beat()
    assert a.leave() == 1
    assert b.live() == 1


def test_expiry_is_measured_on_the_server_clock(r: redis.Redis) -> None:
    WorkerPresence(r, "w", ttl_s=10).beat()
    seconds, micros = r.time()
    expiry = r.zscore(WORKERS, "w#1")
    assert expiry is not None
    assert abs(expiry - (seconds * 1000 + micros // 1000 + 10_000)) < 1_000


def test_heartbeat_keeps_beating_and_leaves_when_stopped(r: redis.Redis) -> None:
    heartbeat = Heartbeat(WorkerPresence(r, "beater", ttl_s=0.3)).start()
    try:
        assert heartbeat.beating and WorkerPresence(r, "reader").live() == 1  # at once
        time.sleep(0.8)  # more than two TTLs: only renewals keep it live
        assert WorkerPresence(r, "reader").live() == 1
    finally:
        heartbeat.stop()
    assert not heartbeat.beating
    assert WorkerPresence(r, "reader").live() == 0


def test_heartbeat_outlives_a_redis_outage(redis_server: RedisServer) -> None:
    client = redis_server.client()
    heartbeat = Heartbeat(WorkerPresence(client, "w", ttl_s=0.3)).start()
    try:
        redis_server.stop(hard=True)
        time.sleep(0.5)  # beats fail (logged) and the thread goes on
        assert heartbeat.beating
        redis_server.start()
        deadline = time.monotonic() + 10
        while WorkerPresence(client, "reader").live() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert WorkerPresence(client, "reader").live() == 1  # beating again
    finally:
        heartbeat.stop()


def test_presence_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        WorkerPresence(redis.Redis(), "w", slots=0)
