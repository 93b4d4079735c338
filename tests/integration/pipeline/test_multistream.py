"""Cross-stream batching (``batch_streams`` > 1): several streams per forward, each committed
exactly once under its own lease, bit-identical to feeding each stream alone.

In-process tests drive ``MultiStreamProcessor`` against a real redis-server; the end-to-end
tests run real worker subprocesses (``tests/integration/pipeline/harness.py``), incl. kill -9
mid-batch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.formats import read_file
from producer.publisher import Producer
from sinkstream import faults
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import RUNNABLE, StreamKeys
from sinkstream.settings import Settings
from state_store.lease import LeaseManager
from state_store.store import StateStore
from tests.integration.pipeline.harness import (
    WorkerPool,
    caught_up,
    committed_id,
    last_input_id,
    settings_from_env,
    valid_entries,
    wait_until,
    worker_env,
)
from workers.engines.base import Engine, EngineState
from workers.engines.loading import load_engine
from workers.engines.sinkkv.segments import whole_snapshot
from workers.processing.batches import entry_tokens
from workers.processing.multistream import (
    AUTO_MIN_TOKENS,
    COMPANION_SUFFIX,
    MultiStreamProcessor,
    companion_holder,
)
from workers.processing.processor import StreamProcessor

# the solo references are compared bit for bit with what worker subprocesses (one thread) commit
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: stream -> (first turn, number of turns) of the QMSum meeting: uneven lengths and offsets
STREAMS = {"s0": (0, 9), "s1": (20, 7), "s2": (40, 13), "s3": (70, 4), "s4": (90, 10)}
#: characters kept of each turn (the tiny models read bytes: short turns keep tests fast)
TURN_CHARS = 90
#: batching on; no summaries and no retrieval memory (this file tests the feeding)
BATCHING = {"SINKSTREAM_BATCH_STREAMS": "4", "SINKSTREAM_BATCH_TOKENS": "100000",
            "SINKSTREAM_SUMMARY_MEMORY": "false", "SINKSTREAM_RETRIEVAL": "off"}


def _env(redis_url: str, tmp: Path, model: str, **extra: str) -> dict[str, str]:
    return worker_env(redis_url, tmp, model=model, **{**BATCHING, **extra})


def _publish(client: redis.Redis, qmsum_dir: Path, settings: Settings) -> None:
    turns = [(t.text[:TURN_CHARS], t.speaker, t.ts)
             for t in read_file(sorted(qmsum_dir.glob("*.json"))[0], "qmsum")]
    producer = Producer(client, settings=settings)
    for stream, (start, count) in STREAMS.items():
        producer.publish_many(stream, turns[start : start + count])


def _solo(engine: Engine[Any], client: redis.Redis, stream: str) -> EngineState:
    """The stream fed alone in this process, one ``feed`` per entry (the replay reference)."""
    state = engine.new_state()
    for i, entry in enumerate(valid_entries(client, stream)):
        state = engine.feed(state, entry_tokens(engine, [entry], at_stream_start=i == 0))
    return state


def _committed(engine: Engine[Any], client: redis.Redis, stream: str) -> EngineState:
    stored = StateStore(client).load(stream)
    assert stored is not None, f"nothing committed for {stream}"
    return engine.import_state(whole_snapshot(stored.data, stored.segments))  # either layout


def _assert_equal_to_solo(engine: Engine[Any], client: redis.Redis, stream: str) -> None:
    """The committed state is bit-identical to the stream fed alone in this process: the same
    entries applied exactly once (token count, pending tail), the same bytes of memory."""
    got, ref = _committed(engine, client, stream), _solo(engine, client, stream)
    assert (got.tokens_seen, got.pending) == (ref.tokens_seen, ref.pending), stream
    assert engine.export_state(got) == engine.export_state(ref), stream


@pytest.fixture(params=["tiny-llama", "tiny-rwkv"])
def setup(
    request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> tuple[StreamProcessor, MultiStreamProcessor, redis.Redis]:
    settings = settings_from_env(_env(redis_server.url, tmp_path, request.param))
    client = redis_server.client()
    processor = StreamProcessor(load_engine(settings), client, settings, "w1@test")
    _publish(client, qmsum_dir, settings)
    return processor, MultiStreamProcessor(processor, 4, 100_000), client


def _drain(multi: MultiStreamProcessor, client: redis.Redis) -> list[int]:
    """Run tasks until every stream is caught up; returns the streams per task."""
    sizes: list[int] = []
    for _ in range(200):
        pending = [s for s in STREAMS if not caught_up(client, s)]
        if not pending:
            return sizes
        outcomes = multi.process(pending[0])
        assert outcomes[0].stream_id == pending[0]
        assert all(o.status in ("applied", "idle") for o in outcomes), outcomes
        sizes.append(len(outcomes))
    raise AssertionError("streams did not catch up")


def test_batched_streams_equal_solo_feeding_and_apply_each_entry_once(
    setup: tuple[StreamProcessor, MultiStreamProcessor, redis.Redis],
) -> None:
    processor, multi, client = setup
    sizes = _drain(multi, client)
    assert max(sizes) == 4  # four streams shared forwards
    for stream in STREAMS:
        _assert_equal_to_solo(processor.engine, client, stream)
        assert committed_id(client, stream) == last_input_id(client, stream)
    # caught-up streams left the runnable set; every lease was given back
    assert client.zcard(RUNNABLE) == 0
    assert all(LeaseManager(client).holder(s) is None for s in STREAMS)


def test_oldest_runnable_streams_are_claimed_first(
    setup: tuple[StreamProcessor, MultiStreamProcessor, redis.Redis],
) -> None:
    processor, multi, client = setup
    client.zadd(RUNNABLE, {s: 1000 + i for i, s in enumerate(["s4", "s3", "s2", "s1", "s0"])})
    outcomes = multi.process("s0", 0.0)
    assert [o.stream_id for o in outcomes] == ["s0", "s4", "s3", "s2"]  # s1 is the newest
    # streams with input left go to the back of the queue: the next claim starts with s1
    assert client.zrange(RUNNABLE, 0, 0) == [b"s1"]


def test_busy_streams_are_skipped_and_a_stale_fence_drops_only_that_commit(
    setup: tuple[StreamProcessor, MultiStreamProcessor, redis.Redis],
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    processor, multi, client = setup
    leases = LeaseManager(client)
    other = leases.acquire("s1", "other@test", 30)  # s1 is busy elsewhere: skipped
    assert other is not None
    client.zadd(RUNNABLE, {"s0": 1, "s1": 2, "s2": 3, "s3": 4, "s4": 5})
    versions = {s: StateStore(client).version(s) for s in STREAMS}

    # Pause at the second commit of the round (s2's, the first companion) and, meanwhile,
    # let another worker take s2 over (its lease expires, a new fencing token is issued).
    marker = tmp_path / "paused"
    monkeypatch.setattr(faults, "_hits", {})
    monkeypatch.setenv("SINKSTREAM_FAULT_POINT", "before_commit")
    monkeypatch.setenv("SINKSTREAM_FAULT_AFTER", "2")
    monkeypatch.setenv("SINKSTREAM_FAULT_MARKER", str(marker))
    monkeypatch.setenv("SINKSTREAM_FAULT_SLEEP", "1.5")
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(multi.process("s0", 0.0)))
    worker.start()
    wait_until(marker.exists, 60, "the round to reach s2's commit")
    holder = leases.holder("s2")
    assert holder is not None and companion_holder(holder) and COMPANION_SUFFIX in holder
    client.delete(StreamKeys.of("s2").lease)  # as if it had expired
    thief = leases.acquire("s2", "thief@test", 30)
    assert thief is not None
    worker.join(60)
    monkeypatch.delenv("SINKSTREAM_FAULT_POINT")

    by_stream = {o.stream_id: o for o in result[0]}
    assert set(by_stream) == {"s0", "s2", "s3", "s4"}  # s1 was busy
    assert by_stream["s2"].status in ("stale", "lost")
    for s in ("s0", "s3", "s4"):
        assert by_stream[s].status == "applied"
        assert StateStore(client).version(s) == versions[s] + 1
    assert StateStore(client).version("s2") == versions["s2"]  # nothing from the stale commit
    assert StateStore(client).version("s1") == versions["s1"]

    # once the others let go, every stream resumes from its own commit, exactly
    leases.release(other)
    leases.release(thief)
    _drain(multi, client)
    for stream in STREAMS:
        _assert_equal_to_solo(processor.engine, client, stream)


def test_one_stream_per_forward_is_the_bit_identical_solo_path(
    setup: tuple[StreamProcessor, MultiStreamProcessor, redis.Redis],
) -> None:
    processor, _, client = setup
    solo = MultiStreamProcessor(processor, 1, 100_000)
    for stream in STREAMS:
        while not caught_up(client, stream):
            assert [o.stream_id for o in solo.process(stream, 0.0)] == [stream]
    for stream in STREAMS:
        got = processor.engine.export_state(_committed(processor.engine, client, stream))
        ref = processor.engine.export_state(_solo(processor.engine, client, stream))
        assert {k: t.data for k, t in got.tensors.items()} == \
            {k: t.data for k, t in ref.tensors.items()}


# ----- real worker processes -------------------------------------------------------------------


def test_with_other_workers_live_a_task_holds_its_even_share_of_the_runnable_streams(
    setup: tuple[StreamProcessor, MultiStreamProcessor, redis.Redis],
) -> None:
    processor, _, client = setup
    live = 1
    multi = MultiStreamProcessor(processor, 4, 100_000, live_workers=lambda: live)
    assert client.zcard(RUNNABLE) == 5
    assert multi.share() == 4  # alone: a whole forward
    live = 2
    assert multi.share() == 3  # five runnable streams over two workers, rounded up
    outcomes = multi.process("s0", 0.0)
    assert len(outcomes) == 3
    live = 5
    assert [o.stream_id for o in multi.process("s1", 0.0)] == ["s1"]  # one stream each


def test_the_automatic_budget_is_one_time_slice_of_the_measured_feed_speed(
    setup: tuple[StreamProcessor, MultiStreamProcessor, redis.Redis],
) -> None:
    processor, _, client = setup
    assert MultiStreamProcessor(processor, 4, 123).budget(1.0) == 123  # a fixed budget
    auto = MultiStreamProcessor(processor, 4, 0)
    assert auto.budget(1.0) == AUTO_MIN_TOKENS  # no forward timed yet
    auto.process("s0", 0.0)
    assert auto.budget(1e-9) == AUTO_MIN_TOKENS  # the floor
    assert auto.budget(1000.0) > auto.budget(10.0) > AUTO_MIN_TOKENS  # tokens per time slice


def test_idle_workers_share_a_small_workload_instead_of_one_taking_it_whole(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    env = _env(redis_server.url, tmp_path, "tiny-llama", SINKSTREAM_BATCH_STREAMS="16")
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    try:
        for name in ("a", "b", "c"):
            pool.start(name)
        wait_until(lambda: all(" ready." in w.log.read_text() for w in pool.workers), 120,
                   "three workers to be ready", pool.logs)
        # the whole workload runnable at once: scheduling held back (each stream's flag set
        # as if a task were queued) while it is published, then released for the next pass
        flags = [StreamKeys.of(s).scheduled for s in STREAMS]
        for flag in flags:
            client.set(flag, "1")
        _publish(client, qmsum_dir, settings_from_env(env))
        client.delete(*flags)
        wait_until(lambda: all(caught_up(client, s) for s in STREAMS), 240,
                   "the workers to apply every stream", pool.logs)
    finally:
        pool.close()
    # five streams, three live workers: a task holds at most two, so no worker applies the
    # workload alone (without shares, the first task claimed all five as its companions)
    applied = [w.log.read_text().count(" entries, ") for w in pool.workers]
    assert sum(n > 0 for n in applied) >= 2, (applied, pool.logs())
    engine = load_engine(settings_from_env(env))
    for stream in STREAMS:
        _assert_equal_to_solo(engine, client, stream)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-rwkv"])
def test_workers_with_batching_commit_every_stream_as_if_fed_alone(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path, model: str
) -> None:
    env = _env(redis_server.url, tmp_path, model)
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    settings = settings_from_env(env)
    try:
        _publish(client, qmsum_dir, settings)
        pool.start("a")
        pool.start("b")
        wait_until(lambda: all(caught_up(client, s) for s in STREAMS), 240,
                   "the workers to apply every stream", pool.logs)
    finally:
        pool.close()
    # the workers checked invariance on start and batched (not a silent fallback to solo)
    logs = [w.log.read_text() for w in pool.workers]
    assert any("cross-stream batching on (4 streams)" in text for text in logs), pool.logs()
    engine = load_engine(settings)
    for stream in STREAMS:
        _assert_equal_to_solo(engine, client, stream)


def test_worker_killed_mid_batched_round_resumes_each_stream_from_its_own_commit(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    env = _env(redis_server.url, tmp_path, "tiny-llama")
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    settings = settings_from_env(env)
    marker = tmp_path / "fault"
    try:
        _publish(client, qmsum_dir, settings)
        # the 6th commit: the first round (4 streams) committed, the second one half-way
        doomed = pool.start("doomed", SINKSTREAM_FAULT_POINT="before_commit",
                            SINKSTREAM_FAULT_AFTER="6", SINKSTREAM_FAULT_MARKER=str(marker))
        wait_until(marker.exists, 120, "the worker to reach its 6th commit", pool.logs)
        versions = {s: StateStore(client).version(s) for s in STREAMS}
        doomed.kill()
        assert sum(versions.values()) == 5  # five batches committed, the sixth in flight
        assert sum(1 for v in versions.values() if v) >= 2  # spread over several streams
        pool.start("survivor")
        wait_until(lambda: all(caught_up(client, s) for s in STREAMS), 240,
                   "the survivor to finish every stream", pool.logs)
    finally:
        pool.close()
    engine = load_engine(settings)
    for stream in STREAMS:
        _assert_equal_to_solo(engine, client, stream)


def test_a_stream_fed_early_refills_its_row_within_the_longest_batch(
    setup: tuple[StreamProcessor, MultiStreamProcessor, redis.Redis], qmsum_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forwards stay full: a companion whose batch is fed while a longer one is still in
    flight commits it and feeds its next batch (cut to the steps left) in the same forwards;
    the call lasts no longer than the longest batch, and both streams equal solo feeding bit
    for bit."""
    processor, multi, client = setup
    engine = processor.engine
    text = " ".join(t.text for t in read_file(sorted(qmsum_dir.glob("*.json"))[0], "qmsum"))
    producer = Producer(client, settings=processor.settings)
    producer.publish_many("long", [(text[:1500], "A", None)])  # one entry: one long batch
    producer.publish_many("short", [(text[i * 50:(i + 1) * 50], "B", None) for i in range(12)])
    client.delete(RUNNABLE)
    client.zadd(RUNNABLE, {"short": 1})
    long_tokens = entry_tokens(engine, valid_entries(client, "long"), at_stream_start=True)
    steps: list[int] = []  # rows per step (one feed or feed_batch call each)
    feed, feed_batch = engine.feed, engine.feed_batch
    inside = [False]  # an engine's feed may call its own feed_batch: one step, not two

    def counted_feed(state: Any, tokens: Any) -> Any:
        steps.append(1)
        inside[0] = True
        try:
            return feed(state, tokens)
        finally:
            inside[0] = False

    def counted_batch(states: Any, token_lists: Any) -> Any:
        if not inside[0]:
            steps.append(len(states))
        return feed_batch(states, token_lists)

    monkeypatch.setattr(engine, "feed", counted_feed)
    monkeypatch.setattr(engine, "feed_batch", counted_batch)

    outcomes = multi.process("long", 0.0)

    assert [(o.stream_id, o.status) for o in outcomes] == [("long", "applied"),
                                                          ("short", "applied")]
    # short's first batch took 6 entries (max_batch_entries); the rest came in the same call
    assert outcomes[1].entries == 12 and caught_up(client, "short")
    assert StateStore(client).version("short") >= 2
    assert len(steps) <= len(long_tokens) // engine.chunk_tokens + 1  # the longest batch
    assert steps[0] == 2 and sum(steps) > len(steps) + 1  # short shared several forwards
    for stream in ("long", "short"):
        _assert_equal_to_solo(engine, client, stream)


def test_a_stream_caught_up_within_the_time_slice_frees_its_row_for_another_runnable_one(
    setup: tuple[StreamProcessor, MultiStreamProcessor, redis.Redis],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With more runnable streams than a forward holds, a stream that catches up before the
    time slice ends leaves, and a waiting stream takes its row in the same call: one task
    drains all five streams two rows at a time, each bit-identical to solo feeding."""
    processor, _, client = setup
    multi = MultiStreamProcessor(processor, 2, 100_000)
    rows: list[int] = []
    feed_batch = processor.engine.feed_batch

    def counted_batch(states: Any, token_lists: Any) -> Any:
        rows.append(len(states))
        return feed_batch(states, token_lists)

    monkeypatch.setattr(processor.engine, "feed_batch", counted_batch)
    outcomes = multi.process("s3", 60.0)
    assert [o.stream_id for o in outcomes][:2] == ["s3", "s0"]  # claimed first, oldest next
    assert sorted(o.stream_id for o in outcomes) == sorted(STREAMS)
    assert all(o.status == "applied" for o in outcomes), outcomes
    assert max(rows) == 2 and rows.count(2) > len(rows) // 2  # rows refilled, not thinned
    for stream in STREAMS:
        assert caught_up(client, stream)
        _assert_equal_to_solo(processor.engine, client, stream)
    assert client.zcard(RUNNABLE) == 0
    assert all(LeaseManager(client).holder(s) is None for s in STREAMS)
