"""Every size limit in Settings is enforced: entry bytes (text + speaker), batch entries and
tokens, hot-cache bytes and streams per worker. Runs the processor in-process (no Celery)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer.publisher import Producer
from producer.reader import read_entries
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.entries import InputEntry
from sinkstream.contracts.keys import StreamKeys
from sinkstream.settings import Settings
from workers.engines.base import Engine
from workers.processing.batches import entry_tokens
from workers.processing.processor import StreamProcessor

BASE: dict[str, Any] = {
    "model": "tiny-llama", "recent_tokens": 48, "sink_tokens": 4, "chunk_tokens": 16,
    "summary_every_tokens": 0, "metrics_port": 0, "trim_applied_input": False,
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine[Any]]:
    from workers.engines.loading import load_engine

    tmp = tmp_path_factory.mktemp("limits")
    yield load_engine(Settings(**BASE, model_cache_dir=tmp / "models"))


def _processor(engine: Engine[Any], server: RedisServer, **limits: Any) -> StreamProcessor:
    settings = Settings(**BASE, redis_url=server.url, **limits)
    return StreamProcessor(engine, server.client(), settings, "limits-test")


def _drain(proc: StreamProcessor, stream: str) -> list[Any]:
    outcomes = []
    while True:
        outcome = proc.process(stream)
        assert outcome.status in ("applied", "idle"), outcome
        if outcome.status == "idle":
            return outcomes
        outcomes.append(outcome)


def test_max_entry_bytes_counts_text_and_speaker(engine: Engine[Any],
                                                 redis_server: RedisServer) -> None:
    proc = _processor(engine, redis_server, max_entry_bytes=256)
    client: redis.Redis = redis_server.client()
    key = StreamKeys.of("sizes").input
    client.xadd(key, {"text": "a" * 200, "speaker": "Ana"})         # fits
    client.xadd(key, {"text": "b" * 257})                           # text over
    client.xadd(key, {"text": "c" * 100, "speaker": "S" * 200})     # text + speaker over
    client.xadd(key, {"text": "d" * 256})                           # exactly at the limit
    outcomes = _drain(proc, "sizes")
    assert sum(o.dead_letters for o in outcomes) == 2
    reasons = [f[b"reason"].decode() for _, f in client.xrange(StreamKeys.of("sizes").dead)]
    assert any("text is 257 bytes" in r for r in reasons)
    assert any("text + speaker are 300 bytes" in r for r in reasons)


def test_producer_splits_so_workers_never_reject(engine: Engine[Any],
                                                redis_server: RedisServer) -> None:
    settings = Settings(**BASE, redis_url=redis_server.url, max_entry_bytes=128)
    client = redis_server.client()
    Producer(client, settings=settings).publish("split", "word " * 200, speaker="Speaker-Name")
    entries = list(read_entries(client, "split"))
    assert len(entries) > 8
    for e in entries:
        assert isinstance(e, InputEntry)
        assert len(e.text.encode()) + len((e.speaker or "").encode()) <= 128
    with pytest.raises(ValueError, match="speaker"):
        Producer(client, settings=settings).publish("split", "hi", speaker="x" * 40)
    proc = StreamProcessor(engine, client, settings, "limits-test")
    assert sum(o.dead_letters for o in _drain(proc, "split")) == 0


def test_batches_respect_entry_and_token_limits(engine: Engine[Any],
                                                redis_server: RedisServer) -> None:
    proc = _processor(engine, redis_server, max_batch_entries=5, max_batch_tokens=120)
    client = redis_server.client()
    texts = [f"turn {i}: " + "word " * (i % 7 + 2) for i in range(30)]
    for text in texts:
        client.xadd(StreamKeys.of("batches").input, {"text": text})
    entries = [InputEntry("0-1", t) for t in texts]
    assert max(len(entry_tokens(engine, [e], at_stream_start=True)) for e in entries) <= 120
    outcomes = _drain(proc, "batches")
    assert sum(o.entries for o in outcomes) == 30
    assert all(o.entries <= 5 and o.tokens <= 120 for o in outcomes), \
        [(o.entries, o.tokens) for o in outcomes]
    assert sum(o.tokens for o in outcomes) == len(entry_tokens(engine, entries, True))


def test_hot_cache_bytes_and_max_streams_per_worker(engine: Engine[Any],
                                                    redis_server: RedisServer) -> None:
    client = redis_server.client()
    for i in range(10):
        client.xadd(StreamKeys.of(f"hot-{i}").input, {"text": f"stream {i} says hello"})
    by_count = _processor(engine, redis_server, max_streams_per_worker=3)
    for i in range(10):
        _drain(by_count, f"hot-{i}")
        assert len(by_count.cache) <= 3
    state_bytes = by_count.cache.nbytes // len(by_count.cache)
    for i in range(10):
        client.xadd(StreamKeys.of(f"hot-{i}").input, {"text": "more"})
    by_bytes = _processor(engine, redis_server, hot_cache_bytes=int(state_bytes * 2.5))
    for i in range(10):
        _drain(by_bytes, f"hot-{i}")
        assert by_bytes.cache.nbytes <= by_bytes.cache.budget_bytes
        assert len(by_bytes.cache) <= 2
    none = _processor(engine, redis_server, hot_cache_bytes=0)
    client.xadd(StreamKeys.of("hot-0").input, {"text": "again"})
    _drain(none, "hot-0")
    assert len(none.cache) == 0


def test_failed_lease_release_is_retried_next_time(
    engine: Engine[Any], redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis dropping right at release must not leave the stream leased until expiry."""
    proc = _processor(engine, redis_server, lease_seconds=60)
    client = redis_server.client()
    client.xadd(StreamKeys.of("release").input, {"text": "one"})
    real = proc.claims.release
    calls: list[str] = []

    def flaky(lease: Any, *args: Any) -> bool:
        calls.append(lease.stream_id)
        if len(calls) == 1:
            raise redis.ConnectionError("Connection reset by peer")
        return real(lease, *args)

    monkeypatch.setattr(proc.claims, "release", flaky)
    assert proc.process("release").status == "applied"  # the error did not escape
    assert proc.leases.holder("release") is not None      # still leased (60 s)...
    client.xadd(StreamKeys.of("release").input, {"text": "two"})
    assert proc.process("release").status == "applied"  # ...but released first, not "busy"
    assert proc.leases.holder("release") is None
