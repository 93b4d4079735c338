"""Redis Cluster for the data side: a real local cluster (3 primaries + 3 replicas, started by
the fixture from the redis-server binary) with a plain redis-server as the Celery broker.

* every Lua script sinkstream runs takes the keys of one slot (checked on every call, and
  Redis Cluster itself would refuse anything else with CROSSSLOT);
* the dispatcher's SCAN discovery covers every primary;
* the end-to-end pipeline test and the kill -9 test pass unchanged against the cluster;
* a primary killed with SIGKILL mid-run: its replica is promoted, processing resumes, no
  committed state is lost and every final state is bit-identical to the reference.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.commands.core import Script

from monitoring.lag import LagReader
from producer.publisher import Producer
from producer.registry import list_streams
from sinkstream.cli.localredis import LocalCluster, RedisServer
from sinkstream.contracts.keys import STREAMS_REGISTRY, StreamKeys
from sinkstream.settings import Settings
from state_store.connection import is_cluster, redis_from_settings
from state_store.lease import LeaseManager
from state_store.store import CommitRequest, StaleCommitError, StateStore
from tests.integration.pipeline import harness
from tests.integration.pipeline import test_pipeline as pipeline_tests
from tests.integration.pipeline.harness import WorkerPool, caught_up, settings_from_env, worker_env
from tests.integration.scaleout.common import (
    BackgroundPublisher,
    assert_states_match_reference,
    committed_ms,
    lost_entries,
    qmsum_turns,
    report,
    streams_per_shard,
    version,
)
from tests.integration.scaleout.servers import wait_for
from workers.scheduling.dispatcher import Dispatcher
from workers.scheduling.scheduler import Scheduler


@dataclass
class ClusterAsServer:
    """What the pipeline tests use of a RedisServer (``url``, ``client()``), for a cluster."""

    cluster: LocalCluster

    @property
    def url(self) -> str:
        return self.cluster.url

    def client(self, **kwargs: Any) -> Any:
        return self.cluster.client(**kwargs)


def _env_with_broker(broker_url: str, redis_url: str, tmp: Path, model: str = "tiny-llama",
                     **extra: str) -> dict[str, str]:
    return worker_env(redis_url, tmp, model, **{"SINKSTREAM_BROKER_URL": broker_url, **extra})


@pytest.fixture
def on_cluster(cluster: LocalCluster, broker: RedisServer,
               monkeypatch: pytest.MonkeyPatch) -> ClusterAsServer:
    """Run the pipeline tests as they are, with the cluster for data and ``broker`` for Celery."""
    monkeypatch.setattr(pipeline_tests, "worker_env",
                        functools.partial(_env_with_broker, broker.url))
    return ClusterAsServer(cluster)


def _settings(cluster: LocalCluster, **overrides: Any) -> Settings:
    return Settings(redis_url=cluster.url, broker_url="redis://127.0.0.1:1/0", **overrides)


# ----- keys and scripts ------------------------------------------------------------------------
def test_every_script_and_transaction_stays_in_one_slot(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis_from_settings(_settings(cluster))
    assert is_cluster(client)
    slots_seen: list[set[int]] = []
    original = Script.__call__

    def checked(self: Script, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        slots = {cluster_client.keyslot(k) for k in keys or []}
        slots_seen.append(slots)
        assert len(slots) == 1, f"script keys span slots {slots}: {keys}"
        return original(self, keys=keys, args=args, client=client)

    cluster_client = client
    monkeypatch.setattr(Script, "__call__", checked)

    settings = _settings(cluster)
    producer = Producer(client, settings=settings)
    streams = streams_per_shard(client, 1, prefix="slot")
    for sid in streams:
        producer.publish_many(sid, [("a first turn", "A", 1.0), ("a second one", "B", None)])
    producer.end_stream(streams[0])
    leases, store = LeaseManager(client), StateStore(client, chunk_bytes=4096)
    for sid in streams:
        lease = leases.acquire(sid, "w1", 5)
        assert lease is not None and leases.renew(lease)
        entries = client.xrange(StreamKeys.of(sid).input)
        last = entries[-1][0].decode()
        big = os.urandom(10_000)  # chunked: chunk keys carry the hash tag too
        store.commit(CommitRequest(
            sid, lease.token, 0, last, state=big, outputs=[{"kind": "rolling", "text": "x"}],
            dead_letters=[{"reason": "test"}], summary={"text": "x"}, trim_input=True,
            state_fields={"tokens_seen": 3}, meta_fields={"worker": "w1"}))
        with pytest.raises(StaleCommitError):
            store.commit(CommitRequest(sid, lease.token + 1, 1, last, state=b"late"))
        # replaces the chunks
        store.commit(CommitRequest(sid, lease.token, 1, last, state=b"small inline state"))
        assert store.load(sid).data == b"small inline state"  # type: ignore[union-attr]
        assert store.cleanup_orphans(sid, min_age_s=0) == 0
        assert leases.release(lease)
        store.mark_failed(sid, "test")
        assert store.clear_failure(sid)  # a MULTI/EXEC on one key
    waiting = StateStore(client, wait_replicas=1, wait_timeout_ms=2000)
    lease = leases.acquire(streams[1], "w2", 5)
    assert lease is not None
    result = waiting.commit(CommitRequest(streams[1], lease.token, 2, None, state=b"replicated"))
    assert result.replicas == 1, "WAIT must run on the connection that ran the commit"
    leases.release(lease)
    snapshot = LagReader(client).read()  # pipelined per-stream scripts, after a NOSCRIPT too
    assert snapshot.scanned == len(streams)
    assert {s.stream_id for s in list_streams(client)} == set(streams)
    assert len(slots_seen) > 20


def test_dispatcher_discovers_raw_xadd_streams_on_every_primary(cluster: LocalCluster) -> None:
    client = redis_from_settings(_settings(cluster))
    streams = streams_per_shard(client, 2, prefix="raw")
    nodes = {client.get_node_from_key(StreamKeys.of(s).input).name for s in streams}
    assert len(nodes) == 3
    for sid in streams:
        client.xadd(StreamKeys.of(sid).input, {"text": "written with plain XADD"})
    scheduled: list[str] = []
    dispatcher = Dispatcher(client, Scheduler(client, scheduled.append, 10), 1.0, 0.0)
    assert dispatcher.discover() == len(streams)
    registered = {m.decode() for m in client.zrange(STREAMS_REGISTRY, 0, -1)}
    assert registered == set(streams)
    assert dispatcher.poll_once() == len(streams)
    assert sorted(scheduled) == streams


# ----- the pipeline tests, unchanged, against the cluster --------------------------------------
def test_pipeline_end_to_end_on_cluster(
    on_cluster: ClusterAsServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    pipeline_tests.test_committed_state_equals_feeding_the_engine_directly(
        on_cluster, tmp_path, qmsum_dir, "tiny-llama")  # type: ignore[arg-type]


@pytest.mark.parametrize("point", ["chunks_written"])  # chunk keys on the cluster too
def test_worker_killed_mid_batch_on_cluster(
    on_cluster: ClusterAsServer, tmp_path: Path, qmsum_dir: Path, point: str
) -> None:
    pipeline_tests.test_worker_killed_mid_batch_loses_nothing_and_applies_nothing_twice(
        on_cluster, tmp_path, qmsum_dir, point)  # type: ignore[arg-type]


# ----- failover --------------------------------------------------------------------------------
def test_primary_killed_mid_run_replica_takes_over_nothing_committed_is_lost(
    cluster: LocalCluster, broker: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    env = worker_env(cluster.url, tmp_path, SINKSTREAM_BROKER_URL=broker.url,
                     SINKSTREAM_REDIS_WAIT_REPLICAS="1", SINKSTREAM_REDIS_WAIT_TIMEOUT_MS="300")
    settings = settings_from_env(env)
    client = cluster.client()
    streams = streams_per_shard(client, 2, prefix="fo")
    turns = qmsum_turns(qmsum_dir, 36)
    producer = Producer(client, settings=settings)
    for sid in streams:
        producer.publish_many(sid, turns[:18])
    victim = cluster.primary_for(StreamKeys.of(streams[0]).state)
    (replica,) = cluster.replicas_of(victim)
    on_victim = [s for s in streams if cluster.primary_for(StreamKeys.of(s).state) is victim]
    pool = WorkerPool(env, tmp_path)
    publisher = BackgroundPublisher(client, settings, streams, turns[18:], interval_s=0.15)
    try:
        pool.start("a")
        pool.start("b")
        wait_for(lambda: all(version(client, s) >= 2 for s in on_victim), 180,
                 "two commits on each stream of the doomed primary")
        publisher.start()
        time.sleep(0.5)
        direct = victim.client()
        before = {s: version(direct, s) for s in on_victim}
        fault = time.time()
        victim.stop(hard=True)  # kill -9
        promoted = wait_for(
            lambda: replica.client().info("replication")["role"] == "master", 60,
            "the replica to be promoted")
        after_promotion = {s: version(replica.client(), s) for s in on_victim}
        resumed = wait_for(
            lambda: any(committed_ms(client, s) > fault * 1000 for s in on_victim), 120,
            "a commit on the failed-over shard")
        publisher.join()
        assert not publisher.errors, publisher.errors
        harness.wait_until(lambda: all(caught_up(client, s) for s in streams), 240,
                           "the workers to finish every stream", pool.logs)
        done = time.time()
    finally:
        pool.close()
    lost = lost_entries(client, publisher.acked)
    report(tmp_path, "cluster-failover", {
        "fault": "SIGKILL of the primary of " + ", ".join(on_victim),
        "replica_promoted_after_s": round(promoted - fault, 3),
        "first_commit_on_that_shard_after_s": round(resumed - fault, 3),
        "all_streams_caught_up_after_s": round(done - fault, 3),
        "versions_before_kill": before, "versions_on_promoted_replica": after_promotion,
        "acknowledged_entries_lost": lost,
        "commits_on_victim_streams": {s: version(client, s) for s in on_victim},
    })
    # WAIT 1 after every commit: the promoted replica had every commit the primary had
    assert all(after_promotion[s] >= before[s] for s in on_victim), (before, after_promotion)
    assert_states_match_reference(client, settings, streams)
