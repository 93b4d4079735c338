"""Streams written by foreign clients (a bare ``XADD``, no registry, no wake-up) are found
within a second from keyspace notifications, and the discovery scan stays the fallback where
the server refuses ``CONFIG`` (issue 22). The last test runs a real worker with the default
discovery settings."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import STREAMS_REGISTRY, StreamKeys
from sinkstream.settings import Settings
from state_store.connection import redis_from_settings
from tests.integration.pipeline.harness import WorkerPool, caught_up, wait_until, worker_env
from tests.integration.pipeline.test_dispatch import Enqueued
from workers.scheduling.dispatcher import Dispatcher
from workers.scheduling.keyspace import Mode
from workers.scheduling.scheduler import Scheduler


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    return redis_from_settings(Settings(redis_url=redis_server.url, broker_url=redis_server.url))


def _start(client: redis.Redis, started: list[Dispatcher], mode: Mode = "auto",
           discover_s: float = 3600.0) -> tuple[Dispatcher, Enqueued]:
    """A dispatcher whose full pass and scan are far away: only events can be quick."""
    enqueued = Enqueued()
    dispatcher = Dispatcher(client, Scheduler(client, enqueued, 60.0), 60.0, discover_s,
                            keyspace_events=mode)
    started.append(dispatcher.start())
    wait_until(lambda: int(client.execute_command("PUBSUB", "NUMPAT")) == 1, 5,
               "the leader to listen for new keys")
    return dispatcher, enqueued


def test_a_raw_xadd_stream_is_registered_and_scheduled_at_once(
    client: redis.Redis, dispatchers: list[Dispatcher]
) -> None:
    dispatcher, enqueued = _start(client, dispatchers)
    assert dispatcher.keyspace_on
    for sid in ("raw-a", "raw-b"):
        written = time.monotonic()
        client.xadd(StreamKeys.of(sid).input, {"text": "Alice: no SDK here"})
        at = enqueued.wait_for(sid, 3.0)
        assert at is not None and at - written < 1.0, (sid, at and at - written)
        assert client.zscore(STREAMS_REGISTRY, sid) is not None
    client.xadd(StreamKeys.of("raw-a").input, {"text": "more"})  # not new: no event
    time.sleep(0.3)
    assert enqueued.ids == ["raw-a", "raw-b"]


def test_listen_hears_a_server_configured_by_the_operator(
    client: redis.Redis, dispatchers: list[Dispatcher]
) -> None:
    client.config_set("notify-keyspace-events", "Kn")  # as redis.conf would
    dispatcher, enqueued = _start(client, dispatchers, mode="listen")
    assert not dispatcher.keyspace_on  # it did not check: it never sends CONFIG
    client.xadd(StreamKeys.of("heard").input, {"text": "hi"})
    assert enqueued.wait_for("heard", 2.0) is not None


def test_where_config_is_refused_the_scan_still_finds_the_stream(
    client: redis.Redis, dispatchers: list[Dispatcher]
) -> None:
    client.acl_setuser("default", enabled=True, nopass=True, commands=["+@all", "-config"],
                       keys=["*"], channels=["*"], reset_keys=False)
    dispatcher, enqueued = _start(client, dispatchers, discover_s=0.5)
    assert not dispatcher.keyspace_on
    client.xadd(StreamKeys.of("scanned").input, {"text": "hi"})
    assert enqueued.wait_for("scanned", 0.3) is None  # no event: the server sends none
    # the full pass is 60 s away; the scan registers it, the next pass schedules it
    wait_until(lambda: client.zscore(STREAMS_REGISTRY, "scanned") is not None, 5,
               "the discovery scan to register the stream")


def test_a_worker_with_default_settings_applies_a_raw_xadd_stream_within_seconds(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = worker_env(redis_server.url, tmp_path, SINKSTREAM_DISPATCH_INTERVAL_SECONDS="1",
                     SINKSTREAM_LEASE_SECONDS="5", SINKSTREAM_SCHEDULE_TTL_SECONDS="120")
    env.pop("SINKSTREAM_DISCOVER_INTERVAL_SECONDS", None)  # the default 10 s scan
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    try:
        pool.start("discover")
        # the dispatcher sets the flags right before it subscribes (Celery holds patterns
        # of its own, so PUBSUB NUMPAT cannot tell)
        wait_until(lambda: "n" in client.config_get("notify-keyspace-events")
                   ["notify-keyspace-events"], 120,
                   "the worker's dispatcher to listen for new keys", pool.logs)
        time.sleep(0.5)
        written = time.monotonic()
        client.xadd(StreamKeys.of("foreign").input, {"text": "Alice: raw redis-cli XADD"})
        wait_until(lambda: client.zscore(STREAMS_REGISTRY, "foreign") is not None, 1.0,
                   "the stream to be discovered", pool.logs)
        discovered = time.monotonic() - written
        wait_until(lambda: caught_up(client, "foreign"), 30, "the stream to be applied",
                   pool.logs)
        assert discovered < 1.0
    finally:
        pool.close()
