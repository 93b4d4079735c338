"""Sentinel: data (``redis+sentinel://``) and the Celery broker (kombu ``sentinel://``) each on
a Sentinel-managed group (a primary and a replica each, three Sentinels watching both, all on
free loopback ports). Mid-run ``SENTINEL FAILOVER`` promotes both replicas at once; workers
and producers follow, nothing acknowledged is lost, every final state equals feeding the
engine directly.

The data group runs ``min-replicas-to-write 1``: after a forced failover the old primary keeps
serving the clients still connected to it until Sentinel reconfigures it (its next INFO
refresh, up to ~10 s), and whatever it accepts then is discarded when it resyncs from the new
primary. With the setting it refuses those writes (NOREPLICAS) instead; producers and workers
retry. The broker group cannot run that way: Celery treats a NOREPLICAS reply from its broker
as unrecoverable and the worker exits; a task lost in the broker's failover is re-dispatched
once its stream's ``scheduled`` flag expires.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.publisher import Producer
from sinkstream.contracts.keys import StreamKeys
from state_store.connection import redis_from_settings
from tests.integration.pipeline import harness
from tests.integration.pipeline.harness import WorkerPool, caught_up, settings_from_env, worker_env
from tests.integration.scaleout.common import (
    BackgroundPublisher,
    assert_states_match_reference,
    committed_ms,
    lost_entries,
    qmsum_turns,
    report,
    version,
)
from tests.integration.scaleout.servers import SentinelGroup, wait_for


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path / "sentinel", groups={"data": 1, "jobs": 0})
    try:
        group.start()
        yield group
    finally:
        group.stop()


def test_workers_and_producers_follow_a_sentinel_failover(
    sentinels: SentinelGroup, tmp_path: Path, qmsum_dir: Path
) -> None:
    env = worker_env(sentinels.url("data"), tmp_path, SINKSTREAM_BROKER_URL=sentinels.broker_url(),
                     SINKSTREAM_BROKER_SENTINEL_MASTER="jobs",
                     SINKSTREAM_REDIS_WAIT_REPLICAS="1", SINKSTREAM_REDIS_WAIT_TIMEOUT_MS="300")
    settings = settings_from_env(env)
    client = redis_from_settings(settings, retries=3)
    streams = [f"call-{i}" for i in range(4)]
    turns = qmsum_turns(qmsum_dir, 36)
    for sid in streams:
        Producer(client, settings=settings).publish_many(sid, turns[:18])
    pool = WorkerPool(env, tmp_path)
    publisher = BackgroundPublisher(client, settings, streams, turns[18:], interval_s=0.15)
    old = {name: sentinels.master_port(name) for name in ("data", "jobs")}
    try:
        pool.start("a")
        pool.start("b")
        wait_for(lambda: all(version(client, s) >= 2 for s in streams), 180,
                 "two commits on every stream")
        publisher.start()
        time.sleep(0.5)
        old_primary = sentinels.server("data", old["data"]).client()
        before = {s: version(old_primary, s) for s in streams}
        fault = time.time()
        sentinels.failover("data")
        sentinels.failover("jobs")
        promoted = wait_for(lambda: all(sentinels.master_port(n) != p for n, p in old.items()),
                            60, "Sentinel to promote both replicas")
        new_primary = sentinels.server("data", sentinels.master_port("data")).client()
        after_promotion = {s: version(new_primary, s) for s in streams}
        # read the new primary itself: a client still connected to the old one could show a
        # write that the old primary accepted and the failover then discarded
        resumed = wait_for(
            lambda: any(committed_ms(new_primary, s) > fault * 1000 for s in streams), 120,
            "a commit on the new primary")
        publisher.join()
        assert not publisher.errors, publisher.errors
        harness.wait_until(lambda: all(caught_up(client, s) for s in streams), 240,
                           "the workers to finish every stream", pool.logs)
        done = time.time()
        alive = [w.proc.poll() is None for w in pool.workers]
    finally:
        pool.close()
    lost = lost_entries(client, publisher.acked)
    report(tmp_path, "sentinel-failover", {
        "fault": "SENTINEL FAILOVER of the data group and of the broker group at once",
        "old_primary_ports": old,
        "new_primary_ports": {n: sentinels.master_port(n) for n in old},
        "replicas_promoted_after_s": round(promoted - fault, 3),
        "first_commit_after_s": round(resumed - fault, 3),
        "all_streams_caught_up_after_s": round(done - fault, 3),
        "versions_before": before, "versions_on_new_primary": after_promotion,
        "acknowledged_entries_lost": lost,
        "producer_retries_during_failover": len(publisher.retried),
        "producer_retry_errors": sorted({r.split(":")[0] for r in publisher.retried}),
        "input_entries": {s: client.xlen(StreamKeys.of(s).input) for s in streams},
        "workers_alive_at_end": alive,
    })
    assert all(alive), "a worker died in the failover:\n" + pool.logs()
    assert all(after_promotion[s] >= before[s] for s in streams), (before, after_promotion)
    assert sum(lost.values()) == 0, lost
    assert_states_match_reference(client, settings, streams)
