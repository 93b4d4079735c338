"""What one batch costs in round trips to the data Redis: pinned, so a change that adds one
shows up here (the re-cut took a batch from about eleven to four, five when it stages new
segments of a segmented state)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.settings import Settings
from state_store.connection import ROUND_TRIPS, redis_from_settings
from workers.engines.base import Engine
from workers.processing.hot_cache import HotStateCache
from workers.processing.processor import StreamProcessor

BASE: dict[str, Any] = {
    "model": "tiny-llama", "recent_tokens": 48, "sink_tokens": 4, "chunk_tokens": 16,
    "summary_every_tokens": 0, "metrics_port": 0, "retrieval": "bm25",
    "max_batch_entries": 4,
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine[Any]]:
    from workers.engines.loading import load_engine

    yield load_engine(Settings(**BASE, model_cache_dir=tmp_path_factory.mktemp("models")))


def _processor(engine: Engine[Any], server: RedisServer, cache_bytes: int,
               layout: str = "whole") -> StreamProcessor:
    settings = Settings(**BASE, redis_url=server.url, state_layout=layout)
    client = redis_from_settings(settings)
    proc = StreamProcessor(engine, client, settings, "round-trips",
                           cache=HotStateCache(cache_bytes))
    # warm up: the connection's set-up commands and the scripts' first loads are not a batch's
    Producer(server.client(), settings=settings).publish_many("warm-up", ["hello"])
    proc.process("warm-up")
    return proc


def _counted(proc: StreamProcessor, stream: str, time_slice_s: float = 0.0) -> tuple[int, Any]:
    before = ROUND_TRIPS.count
    outcome = proc.process(stream, time_slice_s)
    return ROUND_TRIPS.count - before, outcome


def test_a_batch_on_a_hot_state_costs_four_round_trips(
    engine: Engine[Any], redis_server: RedisServer
) -> None:
    """claim (lease + flag + state head), read (entries + memory head), commit, release."""
    proc = _processor(engine, redis_server, cache_bytes=1 << 30)
    Producer(redis_server.client(), settings=proc.settings).publish_many(
        "hot", [f"turn {i} of the meeting" for i in range(12)])
    first, outcome = _counted(proc, "hot")  # a new stream: nothing to load
    assert outcome.status == "applied" and outcome.more and first == 4
    second, outcome = _counted(proc, "hot")
    assert outcome.status == "applied" and outcome.cache_hit and second == 4


def test_staging_new_segments_costs_one_more(
    engine: Engine[Any], redis_server: RedisServer
) -> None:
    """A segmented state's new segments are staged (expiring keys) before the commit script
    names them: a round trip of its own, so that a crash in between leaves only orphans."""
    proc = _processor(engine, redis_server, cache_bytes=1 << 30, layout="segments")
    Producer(redis_server.client(), settings=proc.settings).publish_many(
        "segmented", [f"turn {i} of the meeting" for i in range(12)])
    _counted(proc, "segmented")
    staged, outcome = _counted(proc, "segmented")
    assert outcome.status == "applied" and outcome.cache_hit and staged == 5


def test_a_cache_miss_costs_one_more_and_later_batches_of_a_claim_two(
    engine: Engine[Any], redis_server: RedisServer
) -> None:
    proc = _processor(engine, redis_server, cache_bytes=0)  # nothing stays hot
    Producer(redis_server.client(), settings=proc.settings).publish_many(
        "cold", [f"turn {i} of the meeting" for i in range(16)])
    _counted(proc, "cold")
    missed, outcome = _counted(proc, "cold")
    assert outcome.status == "applied" and not outcome.cache_hit and missed == 5
    # two batches under one claim: the second reads the head with its entries (one round
    # trip), loads its state (a miss here), commits
    both, outcome = _counted(proc, "cold", time_slice_s=60.0)
    assert outcome.entries == 8 and both == 5 + 3


def test_an_idle_claim_costs_one(engine: Engine[Any], redis_server: RedisServer) -> None:
    """Nothing to read: the claim script answers idle itself (no lease, no read, no release):
    under cross-stream batching most tasks are a stream's own task finding it fed already."""
    proc = _processor(engine, redis_server, cache_bytes=1 << 30)
    idle, outcome = _counted(proc, "nothing-here")
    assert outcome.status == "idle" and idle == 1
    Producer(redis_server.client(), settings=proc.settings).publish_many("fed", ["a turn"])
    _counted(proc, "fed")
    caught_up, outcome = _counted(proc, "fed")
    assert outcome.status == "idle" and caught_up == 1
