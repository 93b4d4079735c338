"""Rolling upgrades: a stream an upgraded worker wrote is left for one, never parked.

A worker that meets a state (or a log miner or template table) in a format version past what
it reads defers the stream (``sinkstream.contracts.formats``): nothing is applied, nothing is
marked failed, the stream's scheduled flag lapses after ``DEFER_RETRY_S`` for whichever worker
takes it next; the worker reads that state only once while it stays at its committed version;
and once the stream's state is one it reads again, it carries on exactly where it was. Here an
"upgraded worker's commit" is the real commit with its format version rewritten in place.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.cli.reading import stream_status
from sinkstream.contracts.keys import RUNNABLE, StreamKeys
from sinkstream.gateway.status import stream_status as gateway_status
from sinkstream.settings import Settings
from state_store.codec import MAGIC, NEWEST_VERSION
from state_store.store import StateStore
from tests.integration.pipeline.harness import (
    WorkerPool,
    caught_up,
    committed_tensors,
    last_input_id,
    meta,
    reference_tensors,
    settings_from_env,
    valid_entries,
    wait_ready,
    wait_until,
    worker_env,
)
from workers.engines.loading import load_engine
from workers.logs import mining, table
from workers.processing.hot_cache import HotStateCache
from workers.processing.multistream import MultiStreamProcessor
from workers.processing.newer import DEFER_RETRY_S
from workers.processing.processor import StreamProcessor

TURNS = [f"turn {i}: the launch moves to the {i}th unless legal answers" for i in range(12)]


@pytest.fixture
def settings(redis_server: RedisServer, tmp_path: Path) -> Settings:
    return settings_from_env(worker_env(redis_server.url, tmp_path, SINKSTREAM_RETRIEVAL="off",
                                        SINKSTREAM_SUMMARY_MEMORY="false"))


def _worker(settings: Settings, client: redis.Redis, name: str) -> StreamProcessor:
    # no hot cache: every batch starts from what is committed in Redis
    return StreamProcessor(load_engine(settings), client, settings, name, cache=HotStateCache(0))


def _drain(proc: StreamProcessor, stream: str) -> None:
    while (outcome := proc.process(stream)).status == "applied":
        pass
    assert outcome.status == "idle", outcome


def _as_newer_build(client: redis.Redis, stream: str) -> bytes:
    """The committed state as an upgraded worker's commit would leave it: the format version
    past ours, the state version one up; the bytes it had."""
    key = StreamKeys.of(stream).state
    good = client.hget(key, "data")
    assert isinstance(good, bytes)
    newer = bytearray(good)
    struct.pack_into(">H", newer, len(MAGIC), NEWEST_VERSION + 1)
    client.hset(key, "data", bytes(newer))
    client.hincrby(key, "version", 1)
    return good


def _as_readable_again(client: redis.Redis, stream: str, good: bytes) -> None:
    """The next commit in a format this build reads (the state version one up again)."""
    client.hset(StreamKeys.of(stream).state, "data", good)
    client.hincrby(StreamKeys.of(stream).state, "version", 1)


def _counting_loads(proc: StreamProcessor) -> list[str]:
    loads: list[str] = []
    load = proc.store.load

    def counted(stream_id: str, *args: Any, **kwargs: Any) -> Any:
        loads.append(stream_id)
        return load(stream_id, *args, **kwargs)

    proc.store.load = counted  # type: ignore[method-assign]
    return loads


def test_a_state_from_a_newer_build_is_deferred_then_continued_exactly(
    redis_server: RedisServer, settings: Settings
) -> None:
    client = redis_server.client()
    producer = Producer(client, settings=settings)
    producer.publish_many("m", TURNS[:6])
    _drain(_worker(settings, client, "w1"), "m")
    producer.publish_many("m", TURNS[6:])
    store = StateStore(client)
    good = _as_newer_build(client, "m")
    version, applied = store.version("m"), store.info("m")

    old = _worker(settings, client, "old")
    loads = _counting_loads(old)
    outcome = old.process("m")
    assert outcome.status == "deferred"
    assert f"state is format version {NEWEST_VERSION + 1}, newer than this build reads " \
           f"(up to {NEWEST_VERSION})" in outcome.reason
    assert store.failure("m") is None and meta(client, "m").get("status") != "failed"
    assert store.version("m") == version and store.info("m") == applied  # nothing applied
    flag_ms = int(client.pttl(StreamKeys.of("m").scheduled))
    assert 0 < flag_ms <= DEFER_RETRY_S * 1000  # retried soon, by whichever worker then
    assert old.process("m").status == "deferred"
    assert loads == ["m"]  # the same committed version: deferred from the head alone
    for status in (stream_status(client, "m"), gateway_status(client, "m")):
        assert status["status"] == "deferred"  # what an operator sees, and why
        assert f"format version {NEWEST_VERSION + 1}" in status["deferred"]

    # once the stream's next commit is in a format this build reads, it carries on exactly
    _as_readable_again(client, "m", good)
    _drain(old, "m")
    assert stream_status(client, "m")["deferred"] == ""  # committed past it: the mark lapsed
    assert gateway_status(client, "m")["deferred"] is None
    assert loads[1:] and set(loads) == {"m"}
    assert store.info("m").last_entry_id == last_input_id(client, "m")
    assert committed_tensors(client, "m") == reference_tensors(settings,
                                                               valid_entries(client, "m"))


def test_a_companion_from_a_newer_build_leaves_the_batch_and_the_runnable_set(
    redis_server: RedisServer, settings: Settings
) -> None:
    client = redis_server.client()
    producer = Producer(client, settings=settings)
    for stream in ("a", "b"):
        producer.publish_many(stream, TURNS[:4])
        _drain(_worker(settings, client, "w1"), stream)
        producer.publish_many(stream, TURNS[4:])
    _as_newer_build(client, "b")
    b_before = StateStore(client).info("b")
    client.zadd(RUNNABLE, {"a": 1, "b": 2})
    old = _worker(settings, client, "old")
    multi = MultiStreamProcessor(old, 2, 100_000)

    outcomes = multi.process("a")
    assert [(o.stream_id, o.status) for o in outcomes] == [("a", "applied")]  # fed alone
    assert old.newer.known("b", StateStore(client).version("b")) is not None  # b was met
    assert client.zscore(RUNNABLE, "b") is None  # not claimed again by this task's refills
    assert StateStore(client).failure("b") is None and StateStore(client).info("b") == b_before
    while multi.process("a")[0].status == "applied":
        pass
    assert StateStore(client).info("a").last_entry_id == last_input_id(client, "a")


@pytest.mark.parametrize(("part", "field", "version"), [
    ("log miner", mining.HEAD_FIELD, mining.FORMAT_VERSION),
    ("template table", table.HEAD_FIELD, table.FORMAT_VERSION)])
def test_a_log_miner_or_table_from_a_newer_build_is_deferred(
    redis_server: RedisServer, settings: Settings, part: str, field: str, version: int
) -> None:
    client = redis_server.client()
    producer = Producer(client, settings=settings)
    producer.set_kind("app", "log")
    producer.publish_many("app", ["GET /health 200 in 3ms", "disk /dev/sda1 at 91%"])
    _drain(_worker(settings, client, "w1"), "app")
    producer.publish_many("app", ["GET /health 200 in 4ms"])
    logs = StreamKeys.of("app").logs
    head = msgpack.unpackb(client.hget(logs, field))
    client.hset(logs, field, msgpack.packb({**head, "v": version + 1}))

    outcome = _worker(settings, client, "old").process("app")
    assert outcome.status == "deferred"
    assert f"{part} is format version {version + 1}" in outcome.reason
    assert StateStore(client).failure("app") is None


def test_a_real_worker_defers_and_its_scheduling_brings_the_stream_back(
    redis_server: RedisServer, pool: WorkerPool
) -> None:
    """Through Celery and the dispatcher: the deferred stream's flag lapses (here after the
    test's 3 s ``schedule_ttl_seconds``), it is tried again, and once its state is one the
    worker reads, it is caught up exactly; the deferral is logged once, not per retry."""
    client = redis_server.client()
    settings = settings_from_env(pool.env)
    producer = Producer(client, settings=settings)
    producer.publish_many("m", TURNS[:6])
    worker = pool.start("old")
    wait_ready(pool, [worker])
    wait_until(lambda: caught_up(client, "m"), 120, "the first turns applied", pool.logs)
    good = _as_newer_build(client, "m")  # (the worker's hot cache holds the version before)
    version = StateStore(client).version("m")
    producer.publish_many("m", TURNS[6:])
    deferred = "left for an upgraded worker"
    wait_until(lambda: deferred in worker.tail(), 60, "the worker to defer the stream",
               pool.logs)
    time.sleep(3 * settings.schedule_ttl_seconds)  # a few retries
    assert worker.log.read_text().count(deferred) == 1, pool.logs()
    assert StateStore(client).version("m") == version and not caught_up(client, "m")
    assert StateStore(client).failure("m") is None

    _as_readable_again(client, "m", good)
    wait_until(lambda: caught_up(client, "m"), 60, "the stream carried on", pool.logs)
    assert committed_tensors(client, "m") == reference_tensors(settings,
                                                               valid_entries(client, "m"))
