"""Dispatcher wake-ups on a real Redis Cluster (3 primaries + 3 replicas): producers' PUBLISH
goes through the cluster pipeline, the leader's subscription (redis-py ``ClusterPubSub``, on
one node) hears streams of every shard, and after the primary it listens on is killed the
dispatcher subscribes again on the promoted replica."""

from __future__ import annotations

import threading
import time

from producer.publisher import Producer
from sinkstream.cli.localredis import LocalCluster, RedisServer
from sinkstream.contracts.keys import WAKE_CHANNEL
from sinkstream.settings import Settings
from state_store.connection import redis_from_settings
from tests.integration.scaleout.common import streams_per_shard
from tests.integration.scaleout.servers import wait_for
from workers.scheduling.dispatcher import Dispatcher
from workers.scheduling.scheduler import Scheduler


def _settings(cluster: LocalCluster) -> Settings:
    return Settings(redis_url=cluster.url, broker_url="redis://127.0.0.1:1/0")


def _subscribers(nodes: list[RedisServer]) -> int:
    """Subscribers of the wake-up channel over ``nodes`` (each node counts its own)."""
    return sum(int(dict(n.client().pubsub_numsub(WAKE_CHANNEL)).get(WAKE_CHANNEL.encode(), 0))
               for n in nodes)


class _Enqueued:
    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.lock = threading.Lock()

    def __call__(self, stream_id: str) -> None:
        with self.lock:
            self.at.setdefault(stream_id, time.monotonic())


def test_wake_ups_on_a_cluster_survive_the_loss_of_the_listening_primary(
    cluster: LocalCluster,
) -> None:
    client = redis_from_settings(_settings(cluster))
    enqueued = _Enqueued()
    dispatcher = Dispatcher(client, Scheduler(client, enqueued, 60.0), 3.0, 3600.0).start()
    try:
        wait_for(lambda: _subscribers(cluster.nodes) == 1, 30, "the leader to subscribe")
        producer = Producer(client, settings=_settings(cluster))
        streams = streams_per_shard(client, 1, prefix="wake")
        for sid in streams:
            published = time.monotonic()
            producer.publish(sid, "Alice: ship it friday")
            wait_for(lambda sid=sid: sid in enqueued.at, 5, f"{sid} to be woken")
            assert enqueued.at[sid] - published < 1.0

        # kill the primary the subscription lives on; its replica takes over
        victim = cluster.primary_for(WAKE_CHANNEL)
        (replica,) = cluster.replicas_of(victim)
        victim.stop(hard=True)
        wait_for(lambda: replica.client().info("replication")["role"] == "master", 60,
                 "the replica to be promoted")
        alive = [n for n in cluster.nodes if n is not victim]
        cluster.wait_ok(nodes=alive)
        wait_for(lambda: _subscribers(alive) == 1, 60, "the leader to subscribe again")
        # new streams on every shard: scheduled by wake-ups, not by the 3 s full pass
        for sid in streams_per_shard(client, 1, prefix="late"):
            published = time.monotonic()
            producer.publish(sid, "Bob: back after the failover")
            wait_for(lambda sid=sid: sid in enqueued.at, 5, f"{sid} to be woken")
            assert enqueued.at[sid] - published < 1.0
    finally:
        dispatcher.stop()
