"""The dispatcher's two paths against a real redis-server: producers' wake-ups schedule a
stream at once (whatever the full-pass interval, and during a long pass too), and the full
pass still finds what sends no wake-up (raw XADD). Only the leader acts on wake-ups; stop() is
prompt; the subscription comes back after a Redis restart. The last test runs a real worker
with a 30 s full-pass interval."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import DISPATCHER_LEADER, STREAMS_REGISTRY, WAKE_CHANNEL, StreamKeys
from sinkstream.settings import Settings
from state_store.connection import redis_from_settings
from tests.integration.pipeline.harness import WorkerPool, caught_up, wait_until, worker_env
from workers.scheduling.dispatcher import Dispatcher
from workers.scheduling.scheduler import Scheduler


class Enqueued:
    """The enqueue callback: records (stream id, monotonic time) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self._cond = threading.Condition()

    def __call__(self, stream_id: str) -> None:
        with self._cond:
            self.calls.append((stream_id, time.monotonic()))
            self._cond.notify_all()

    @property
    def ids(self) -> list[str]:
        with self._cond:
            return [sid for sid, _ in self.calls]

    def wait_for(self, stream_id: str, timeout: float) -> float | None:
        """Monotonic time ``stream_id`` was first enqueued, waiting up to ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: stream_id in [s for s, _ in self.calls], timeout)
            return next((t for s, t in self.calls if s == stream_id), None)


def _settings(server: RedisServer, **overrides: object) -> Settings:
    return Settings(redis_url=server.url, broker_url=server.url, **overrides)  # type: ignore[arg-type]


def _subscribers(client: redis.Redis) -> int:
    return int(dict(client.pubsub_numsub(WAKE_CHANNEL)).get(WAKE_CHANNEL.encode(), 0))


def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(predicate, timeout, what)


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    # the workers' client (one quiet reconnect, then errors reach the dispatcher)
    return redis_from_settings(_settings(redis_server))


def _dispatcher(client: redis.Redis, started: list[Dispatcher], interval_s: float,
                wake: bool = True) -> tuple[Dispatcher, Enqueued]:
    """A dispatcher acting on wake-ups and full passes only (new-key events: test_discovery)."""
    enqueued = Enqueued()
    dispatcher = Dispatcher(client, Scheduler(client, enqueued, 60.0), interval_s, 3600.0,
                            wake=wake, keyspace_events="off")
    started.append(dispatcher.start())
    return dispatcher, enqueued


def test_a_producer_wakes_the_dispatcher_long_before_its_full_pass(
    redis_server: RedisServer, client: redis.Redis, dispatchers: list[Dispatcher]
) -> None:
    _, enqueued = _dispatcher(client, dispatchers, interval_s=60.0)
    _poll(lambda: _subscribers(client) == 1, 5, "the leader to subscribe")
    producer = Producer(client, settings=_settings(redis_server))
    for sid in ("standup", "retro"):
        published = time.monotonic()
        producer.publish(sid, "Alice: ship it friday")
        at = enqueued.wait_for(sid, 5.0)
        assert at is not None, f"{sid} was not scheduled by its wake-up"
        assert at - published < 0.5, at - published
    # more input to a stream whose task is pending: woken again, but not enqueued twice
    producer.publish_many("standup", ["Bob: the tests are green", "Carol: and the docs?"])
    time.sleep(0.3)
    assert enqueued.ids == ["standup", "retro"]


def test_raw_xadd_without_a_wake_up_is_found_by_the_full_pass(
    client: redis.Redis, dispatchers: list[Dispatcher]
) -> None:
    _, enqueued = _dispatcher(client, dispatchers, interval_s=0.3)
    _poll(lambda: _subscribers(client) == 1, 5, "the leader to subscribe")
    client.xadd(StreamKeys.of("raw").input, {"text": "no producer here"})
    client.zadd(STREAMS_REGISTRY, {"raw": 0}, nx=True)  # as the README shows; no PUBLISH
    assert enqueued.wait_for("raw", 3.0) is not None
    assert enqueued.ids == ["raw"]


def test_without_wake_ups_only_the_full_pass_schedules(
    redis_server: RedisServer, client: redis.Redis, dispatchers: list[Dispatcher]
) -> None:
    _, enqueued = _dispatcher(client, dispatchers, interval_s=60.0, wake=False)
    _poll(lambda: client.get(DISPATCHER_LEADER) is not None, 5, "the dispatcher to lead")
    assert _subscribers(client) == 0
    Producer(client, settings=_settings(redis_server)).publish("quiet", "hello")
    time.sleep(0.5)
    assert enqueued.ids == []


def test_producers_wake_only_when_asked(redis_server: RedisServer, client: redis.Redis) -> None:
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(WAKE_CHANNEL)
    listener.get_message(timeout=1.0)

    def wakes() -> list[bytes]:
        out = []
        while (message := listener.get_message(timeout=0.3)) is not None:
            out.append(message["data"])
        return out

    Producer(client, settings=_settings(redis_server)).publish_many("a", ["1", "2", "3"])
    assert wakes() == [b"a"]  # one per script call, not one per entry
    Producer(client, settings=_settings(redis_server), mark_runnable=False).publish("b", "x")
    Producer(client, settings=_settings(redis_server, dispatch_wake=False)).publish("c", "x")
    assert wakes() == []
    listener.close()


def test_a_producer_refused_publish_keeps_appending_without_wake_ups(
    redis_server: RedisServer, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user without +publish (deploy/redis/acl.conf before wake-ups): appends go on,
    one warning, no more wake-ups from that Producer."""
    client.acl_setuser("old-producer", enabled=True, passwords=["+pw"], keys=["*"],
                       channels=["*"], commands=["+@all", "-publish"], reset=True)
    limited = redis.Redis(port=redis_server.port, username="old-producer", password="pw")
    producer = Producer(limited, settings=_settings(redis_server))
    with caplog.at_level(logging.WARNING, logger="producer.publisher"):
        producer.publish("acl", "first")
        producer.publish("acl", "second")
    assert client.xlen(StreamKeys.of("acl").input) == 2
    assert not producer.wake
    assert sum("refused" in r.getMessage() for r in caplog.records) == 1


def test_a_non_leader_ignores_wake_ups_until_it_leads(
    redis_server: RedisServer, client: redis.Redis, dispatchers: list[Dispatcher]
) -> None:
    client.set(DISPATCHER_LEADER, "another-worker", px=60_000)
    dispatcher, enqueued = _dispatcher(client, dispatchers, interval_s=0.2)
    producer = Producer(client, settings=_settings(redis_server))
    producer.publish("waiting", "hello")
    time.sleep(0.6)
    assert enqueued.ids == [] and _subscribers(client) == 0
    client.delete(DISPATCHER_LEADER)  # the other leader is gone: this one takes over
    assert enqueued.wait_for("waiting", 3.0) is not None  # its first full pass
    _poll(lambda: _subscribers(client) == 1, 3, "the new leader to subscribe")
    # and it stops listening once it has lost the leadership
    client.set(DISPATCHER_LEADER, "another-worker", px=60_000)
    _poll(lambda: _subscribers(client) == 0, 3, "the ex-leader to unsubscribe")
    producer.publish("later", "hello")
    time.sleep(0.6)
    assert enqueued.ids == ["waiting"]
    assert not dispatcher._leading


def test_invalid_wake_ups_are_ignored_and_logged_once(
    redis_server: RedisServer, client: redis.Redis, dispatchers: list[Dispatcher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, enqueued = _dispatcher(client, dispatchers, interval_s=60.0)
    _poll(lambda: _subscribers(client) == 1, 5, "the leader to subscribe")
    with caplog.at_level(logging.WARNING, logger="workers.scheduling"):
        for _ in range(3):
            client.publish(WAKE_CHANNEL, "a}:state")
        client.publish(WAKE_CHANNEL, "nobody-wrote-here")  # valid, but no input: nothing
        producer = Producer(client, settings=_settings(redis_server))
        producer.publish("good", "hello")
        assert enqueued.wait_for("good", 3.0) is not None
        # "good" may also come from the dispatcher's first full pass, ahead of the wake-ups:
        # a later wake-up, served in channel order, shows every earlier one was handled
        producer.publish("good-2", "hello")
        assert enqueued.wait_for("good-2", 3.0) is not None
        _poll(lambda: any("ignoring wake-up" in r.getMessage() for r in caplog.records), 3,
              "the invalid wake-up to be logged")
    assert enqueued.ids == ["good", "good-2"]
    warned = [r for r in caplog.records if "ignoring wake-up" in r.getMessage()]
    assert len(warned) == 1


def test_a_long_full_pass_serves_wake_ups_between_its_slices(client: redis.Redis) -> None:
    enqueued = Enqueued()
    dispatcher = Dispatcher(client, Scheduler(client, enqueued, 60.0), 60.0, 3600.0)
    client.zadd(STREAMS_REGISTRY, {f"idle{i:04d}": i for i in range(1000)})
    dispatcher._subscribe()
    try:
        # a writer that wakes the dispatcher but never registers: only the wake-up finds it
        client.xadd(StreamKeys.of("urgent").input, {"text": "now, please"})
        client.publish(WAKE_CHANNEL, "urgent")
        assert dispatcher.poll_once() == 1
        assert enqueued.ids == ["urgent"]
    finally:
        dispatcher._unsubscribe()


def test_stop_is_prompt_while_waiting_for_wake_ups(
    client: redis.Redis, dispatchers: list[Dispatcher]
) -> None:
    for wake in (True, False):
        dispatcher, _ = _dispatcher(client, dispatchers, interval_s=60.0, wake=wake)
        _poll(lambda: client.get(DISPATCHER_LEADER) is not None, 5, "the dispatcher to lead")
        time.sleep(0.3)  # inside its wait
        started = time.monotonic()
        dispatcher.stop()
        assert time.monotonic() - started < 1.0
        assert client.get(DISPATCHER_LEADER) is None  # handed over at once
        assert _subscribers(client) == 0


def test_the_subscription_comes_back_after_a_redis_restart(
    redis_server: RedisServer, client: redis.Redis, dispatchers: list[Dispatcher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, enqueued = _dispatcher(client, dispatchers, interval_s=2.0)
    _poll(lambda: _subscribers(client) == 1, 5, "the leader to subscribe")
    with caplog.at_level(logging.WARNING, logger="workers.scheduling"):
        redis_server.stop(hard=True)
        time.sleep(1.5)
        redis_server.start()
        _poll(lambda: _subscribers(client) == 1, 15, "the leader to subscribe again")
        published = time.monotonic()
        Producer(client, settings=_settings(redis_server)).publish("after", "hello")
        at = enqueued.wait_for("after", 5.0)
    assert at is not None and at - published < 1.0, (at, published)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Redis unavailable" in m for m in messages) <= 1, messages


def test_a_worker_applies_published_input_without_waiting_for_its_full_pass(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The whole chain: Producer -> PUBLISH -> the worker's dispatcher -> task -> commit,
    with a full pass only every 30 s (after the one at start-up)."""
    pool = WorkerPool(worker_env(redis_server.url, tmp_path,
                                 SINKSTREAM_DISPATCH_INTERVAL_SECONDS="30"), tmp_path)
    client = redis_server.client()
    try:
        pool.start("w")
        wait_until(lambda: _subscribers(client) == 1, 120, "the worker's dispatcher to lead",
                   pool.logs)
        producer = Producer(client, settings=_settings(redis_server))
        for turn in range(3):
            started = time.monotonic()
            producer.publish("live", f"Speaker {turn}: a caption of the live meeting")
            wait_until(lambda: caught_up(client, "live"), 20, "the worker to apply it",
                       pool.logs)
            # a first batch loads the stream's state; all well under the 30 s pass interval
            assert time.monotonic() - started < 10.0
    finally:
        pool.close()


def test_needs_work_is_input_past_the_committed_entry_and_nothing_else(
        client: redis.Redis) -> None:
    """One script per stream decides; each case is a stream the dispatcher must (not) pick."""
    def stream(name: str, entries: int = 1) -> tuple[StreamKeys, list[bytes]]:
        keys = StreamKeys.of(name)
        return keys, [client.xadd(keys.input, {"text": "x"}) for _ in range(entries)]

    stream("fresh")  # input, nothing committed yet
    keys, ids = stream("behind", 3)
    client.hset(keys.state, "last_entry_id", ids[0])
    keys, ids = stream("caught-up", 2)
    client.hset(keys.state, "last_entry_id", ids[-1])
    keys, ids = stream("trimmed", 2)  # applied input trimmed away: the committed id is gone
    client.hset(keys.state, "last_entry_id", ids[-1])
    client.xtrim(keys.input, maxlen=0)
    keys, ids = stream("trimmed-then-more", 2)
    client.hset(keys.state, "last_entry_id", ids[0])
    client.xdel(keys.input, ids[0])
    keys, _ = stream("scheduled")
    client.set(keys.scheduled, "1")
    keys, _ = stream("failed")
    client.hset(keys.meta, "status", "failed")
    client.set(StreamKeys.of("wrong-type").input, "not a stream")
    names = ["fresh", "behind", "caught-up", "trimmed", "trimmed-then-more", "scheduled",
             "failed", "wrong-type", "never-written"]

    scheduler = Scheduler(client, Enqueued(), 60.0)
    assert scheduler.needs_work(names) == ["fresh", "behind", "trimmed-then-more"]
    client.script_flush()  # a restarted server lacks the script: loaded again, same answer
    assert scheduler.needs_work(names) == ["fresh", "behind", "trimmed-then-more"]
