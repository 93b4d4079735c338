"""Segmented sink-KV states (``state_layout = "segments"``) end to end, on a real redis-server.

The committed state of a QMSum meeting must continue exactly like the whole-state layout and
like feeding the engine directly (same tensors, same logits), through layout switches, worker
kills between staging segments and committing, and must refuse a missing or corrupt segment
by name. The window is small (S=4, R=48, 16-token chunks) so segments are evicted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import redis
import torch

from producer.formats import read_file
from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from sinkstream.settings import Settings
from state_store.codec import CHECKSUMS, decode_state
from state_store.store import StateStore
from tests.integration.pipeline.harness import (
    WorkerPool,
    caught_up,
    meta,
    settings_from_env,
    snapshot_bytes,
    valid_entries,
    wait_until,
    worker_env,
)
from workers.engines.loading import load_engine
from workers.engines.sinkkv import SinkKVEngine, SinkKVState
from workers.engines.sinkkv import segments as sinkkv_segments
from workers.processing.batches import entry_tokens
from workers.processing.hot_cache import HotStateCache
from workers.processing.processor import StreamProcessor

PROBE = [72, 105, 33, 10, 65]
#: retrieval memory embeds every batch's text: off here, these tests are about the state
FAST = {"SINKSTREAM_RETRIEVAL": "off"}


def _turns(qmsum_dir: Path, start: int, stop: int) -> list[Any]:
    return read_file(sorted(qmsum_dir.glob("*.json"))[0], "qmsum")[start:stop]


def _settings(url: str, tmp: Path, layout: str) -> Settings:
    return settings_from_env(worker_env(url, tmp, SINKSTREAM_STATE_LAYOUT=layout, **FAST))


def _processor(engine: Any, client: redis.Redis, settings: Settings, name: str) -> StreamProcessor:
    # no hot cache: every batch loads (and reassembles) the committed state from Redis
    return StreamProcessor(engine, client, settings, name, cache=HotStateCache(0))


def _drain(proc: StreamProcessor, stream: str) -> int:
    batches = 0
    while True:
        outcome = proc.process(stream)
        assert outcome.status in ("applied", "idle"), outcome
        if outcome.status == "idle":
            return batches
        batches += 1


def _segment_keys(client: redis.Redis, stream: str) -> set[bytes]:
    tag = StreamKeys.of(stream).tag.replace("{", "\\{").replace("}", "\\}")
    return set(client.scan_iter(match=f"{tag}:segment:*"))


def _committed(client: redis.Redis, engine: SinkKVEngine, stream: str) -> SinkKVState:
    """The committed state of either layout, read like a worker reads it."""
    store = StateStore(client)
    stored = store.load(stream, store.head(stream))
    assert stored is not None
    envelope = decode_state(stored.data, stream_id=stream)
    if not sinkkv_segments.is_segmented(envelope):
        assert not stored.segments
        return engine.import_state(envelope.snapshot)
    return sinkkv_segments.decode(engine, envelope, stored.segments, stream_id=stream)


def _tensors(engine: SinkKVEngine, state: SinkKVState) -> dict[str, bytes]:
    """Same form as ``harness.reference_tensors``."""
    return snapshot_bytes(engine.export_state(state))


def _direct(engine: SinkKVEngine, client: redis.Redis, stream: str) -> SinkKVState:
    """Like ``harness.reference_tensors``: one ``feed`` per valid entry, in this process."""
    state = engine.new_state()
    for index, turn in enumerate(valid_entries(client, stream)):
        state = engine.feed(state, entry_tokens(engine, [turn], at_stream_start=index == 0))
    return state


def _assert_segmented(client: redis.Redis, engine: SinkKVEngine, stream: str) -> None:
    """Stored as segments: exactly the window's, each one key, nothing pending or chunked."""
    keys = StreamKeys.of(stream)
    head = StateStore(client).head(stream)
    state = _committed(client, engine, stream)
    processed = state.tokens_seen - len(state.pending)
    assert head.segment_ids == sinkkv_segments.segment_ids(engine, processed)
    assert len(_segment_keys(client, stream)) == len(head.segments)
    assert client.zcard(keys.state_pending) == 0
    assert client.hget(keys.state, "generation") is None  # the header is small: inline


def test_segmented_processor_matches_whole_layout_and_direct_feed(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    client = redis_server.client()
    seg_settings = _settings(redis_server.url, tmp_path, "segments")
    whole_settings = _settings(redis_server.url, tmp_path, "whole")
    engine = load_engine(seg_settings)
    assert isinstance(engine, SinkKVEngine)
    producer = Producer(client, settings=seg_settings)
    for stream in ("seg", "whole"):
        producer.publish_many(stream, _turns(qmsum_dir, 0, 60))
    batches = _drain(_processor(engine, client, seg_settings, "w-seg"), "seg")
    _drain(_processor(engine, client, whole_settings, "w-whole"), "whole")
    assert batches >= 8

    seg = _committed(client, engine, "seg")
    whole = _committed(client, engine, "whole")
    direct = _direct(engine, client, "seg")
    assert seg.tokens_seen > 4 * engine.window.capacity  # the window moved: segments evicted
    _assert_segmented(client, engine, "seg")
    assert _segment_keys(client, "whole") == set()
    assert _tensors(engine, seg) == _tensors(engine, whole) == _tensors(engine, direct)
    # identical continuations: logits bit for bit, and the same generated tokens
    for a, b in ((seg, whole), (seg, direct)):
        assert torch.equal(engine.logits(a, PROBE), engine.logits(b, PROBE))
    assert engine.generate(seg, PROBE, 8) == engine.generate(whole, PROBE, 8)


def test_switching_layouts_continues_the_stream(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    client = redis_server.client()
    layouts = ["whole", "segments", "whole", "segments"]
    settings = {name: _settings(redis_server.url, tmp_path, name) for name in set(layouts)}
    engine = load_engine(settings["whole"])
    assert isinstance(engine, SinkKVEngine)
    producer = Producer(client, settings=settings["whole"])
    for step, layout in enumerate(layouts):
        producer.publish_many("switch", _turns(qmsum_dir, 10 * step, 10 * step + 10))
        _drain(_processor(engine, client, settings[layout], f"w-{step}"), "switch")
        if layout == "segments":
            _assert_segmented(client, engine, "switch")
        else:  # the whole state replaced the segments in the same commit
            assert _segment_keys(client, "switch") == set()
            assert StateStore(client).head("switch").segments == {}
        direct = _direct(engine, client, "switch")
        assert _tensors(engine, _committed(client, engine, "switch")) == _tensors(engine, direct)


def test_switching_state_checksums_continues_the_stream(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    """A deployment that switches ``state_checksum`` to xxh3 (and back): every worker of this
    build reads both digests, in both layouts, and the stream continues bit for bit."""
    client = redis_server.client()
    steps = [("segments", "blake2b"), ("segments", "xxh3"), ("whole", "xxh3"),
             ("segments", "xxh3"), ("segments", "blake2b")]
    engine = load_engine(_settings(redis_server.url, tmp_path, "segments"))
    assert isinstance(engine, SinkKVEngine)
    producer = Producer(client, settings=_settings(redis_server.url, tmp_path, "segments"))
    keys = StreamKeys.of("digests")
    for step, (layout, checksum) in enumerate(steps):
        settings = settings_from_env(worker_env(
            redis_server.url, tmp_path, SINKSTREAM_STATE_LAYOUT=layout,
            SINKSTREAM_STATE_CHECKSUM=checksum, **FAST))
        producer.publish_many("digests", _turns(qmsum_dir, 10 * step, 10 * step + 10))
        assert _drain(_processor(engine, client, settings, f"w-{step}"), "digests") >= 1
        header = cast(bytes, client.hget(keys.state, "data"))
        assert int.from_bytes(header[8:10], "big") == CHECKSUMS[checksum]
        direct = _direct(engine, client, "digests")
        assert _tensors(engine, _committed(client, engine, "digests")) == _tensors(engine, direct)


def test_missing_or_corrupt_segment_is_refused_by_name(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    client = redis_server.client()
    settings = _settings(redis_server.url, tmp_path, "segments")
    engine = load_engine(settings)
    assert isinstance(engine, SinkKVEngine)
    producer = Producer(client, settings=settings)
    producer.publish_many("meeting", _turns(qmsum_dir, 0, 30))
    _drain(_processor(engine, client, settings, "w1"), "meeting")
    producer.publish_many("meeting", _turns(qmsum_dir, 30, 35))
    store = StateStore(client)
    version = store.version("meeting")
    seg, name = sorted(store.head("meeting").segments.items())[-1]
    key = StreamKeys.of("meeting").state_segment(seg, name.split(".")[1])
    good = client.get(key)
    assert isinstance(good, bytes)

    client.set(key, good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
    outcome = _processor(engine, client, settings, "w2").process("meeting")
    assert outcome.status == "failed"
    assert f"stream 'meeting': segment {seg}: state checksum mismatch" in outcome.reason
    failure = store.failure("meeting")
    assert failure is not None and f"segment {seg}" in failure.reason

    client.delete(key)
    assert store.clear_failure("meeting")
    outcome = _processor(engine, client, settings, "w3").process("meeting")
    assert outcome.status == "failed"
    assert f"stream 'meeting': segment {seg} of state version {version} is missing" \
        in outcome.reason
    assert store.version("meeting") == version  # nothing applied on top of a broken state

    client.set(key, good)  # repaired: the stream carries on, nothing lost
    assert store.clear_failure("meeting")
    _drain(_processor(engine, client, settings, "w4"), "meeting")
    direct = _direct(engine, client, "meeting")
    assert _tensors(engine, _committed(client, engine, "meeting")) == _tensors(engine, direct)


# ----- real worker subprocesses ------------------------------------------------------------------
def _check_against_reference(client: redis.Redis, pool: WorkerPool, stream: str) -> None:
    """The workers' committed state equals feeding the engine directly (harness reference:
    one ``feed`` per entry, in this process): tensors, and logits bit for bit."""
    engine = load_engine(settings_from_env(pool.env))
    assert isinstance(engine, SinkKVEngine)
    committed, direct = _committed(client, engine, stream), _direct(engine, client, stream)
    assert _tensors(engine, committed) == _tensors(engine, direct)
    assert torch.equal(engine.logits(committed, PROBE), engine.logits(direct, PROBE))
    _assert_segmented(client, engine, stream)


def test_workers_commit_segmented_states_through_a_layout_switch(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    env = worker_env(redis_server.url, tmp_path, **FAST)
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    producer = Producer(client, settings=settings_from_env(env))
    try:
        producer.publish_many("meeting", _turns(qmsum_dir, 0, 30))
        pool.start("whole", SINKSTREAM_STATE_LAYOUT="whole")
        wait_until(lambda: caught_up(client, "meeting"), 180, "the whole-layout worker",
                   pool.logs)
        pool.close()
        assert _segment_keys(client, "meeting") == set()
        producer.publish_many("meeting", _turns(qmsum_dir, 30, 60))
        pool.env["SINKSTREAM_STATE_LAYOUT"] = "segments"
        pool.start("segments")
        wait_until(lambda: caught_up(client, "meeting"), 180, "the segments-layout worker",
                   pool.logs)
    finally:
        pool.close()
    _check_against_reference(client, pool, "meeting")


@pytest.mark.parametrize("point", ["chunks_written", "before_commit"])
def test_worker_killed_with_staged_segments_loses_nothing(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path, point: str
) -> None:
    env = worker_env(redis_server.url, tmp_path, SINKSTREAM_STATE_LAYOUT="segments", **FAST)
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    marker = tmp_path / "fault"
    try:
        Producer(client, settings=settings_from_env(env)).publish_many(
            "meeting", _turns(qmsum_dir, 0, 60))
        doomed = pool.start("doomed", SINKSTREAM_FAULT_POINT=point, SINKSTREAM_FAULT_AFTER="3",
                            SINKSTREAM_FAULT_MARKER=str(marker))
        wait_until(marker.exists, 120, f"the worker to reach {point}", pool.logs)
        store = StateStore(client)
        assert store.version("meeting") == 2  # two batches committed, the third in flight
        staged = cast(list[bytes], client.zrange(StreamKeys.of("meeting").state_pending, 0, -1))
        if point == "chunks_written":  # the third batch's new segments are staged, pending
            assert len(staged) == 1 and staged[0].startswith(b"s.")
        doomed.kill()
        pool.start("survivor")
        wait_until(lambda: caught_up(client, "meeting"), 180, "the survivor to finish",
                   pool.logs)
    finally:
        pool.close()
    assert int(meta(client, "meeting").get("leases_taken_over", 0)) >= 1
    store.cleanup_orphans("meeting", min_age_s=0)  # (the survivor's commits already did)
    _check_against_reference(client, pool, "meeting")
