"""``sinkstream resume``: a parked stream goes back to work once its cause is fixed, from its
committed state, with nothing skipped; while the cause is there, it is parked again."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from producer.publisher import Producer
from sinkstream.cli import app as cli
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from sinkstream.settings import Settings
from state_store.store import StateStore
from tests.integration.pipeline.harness import (
    committed_tensors,
    last_input_id,
    reference_tensors,
    settings_from_env,
    valid_entries,
    worker_env,
)
from workers.engines.loading import load_engine
from workers.processing.hot_cache import HotStateCache
from workers.processing.processor import StreamProcessor

TURNS = [f"turn {i}: who owns the crash reports in launch week?" for i in range(10)]


def _drain(proc: StreamProcessor, stream: str) -> str:
    while (outcome := proc.process(stream)).status == "applied":
        pass
    return outcome.status


def test_resume_puts_a_repaired_stream_back_to_work_and_a_broken_one_is_parked_again(
    redis_server: RedisServer, tmp_path: Path, runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the reason on one line
    client: redis.Redis = redis_server.client()
    settings: Settings = settings_from_env(worker_env(redis_server.url, tmp_path,
                                                      SINKSTREAM_RETRIEVAL="off"))
    proc = StreamProcessor(load_engine(settings), client, settings, "w1", cache=HotStateCache(0))
    producer = Producer(client, settings=settings)
    producer.publish_many("m", TURNS[:5])
    assert _drain(proc, "m") == "idle"
    producer.publish_many("m", TURNS[5:])
    key = StreamKeys.of("m").state
    good = client.hget(key, "data")
    assert isinstance(good, bytes)
    client.hset(key, "data", good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
    assert _drain(proc, "m") == "failed"

    resumed = runner.invoke(cli.app, ["resume", "m"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed 'm', parked since" in resumed.output
    assert "state checksum mismatch" in resumed.output
    assert StateStore(client).failure("m") is None
    assert _drain(proc, "m") == "failed"  # the cause is still there: parked again

    client.hset(key, "data", good)  # repaired
    assert runner.invoke(cli.app, ["resume", "m"]).exit_code == 0
    assert _drain(proc, "m") == "idle"
    assert StateStore(client).info("m").last_entry_id == last_input_id(client, "m")
    assert committed_tensors(client, "m") == reference_tensors(settings,
                                                               valid_entries(client, "m"))

    again = runner.invoke(cli.app, ["resume", "m"])
    assert again.exit_code == 0 and "is not parked: nothing to resume" in again.output
    bad = runner.invoke(cli.app, ["resume", "no spaces allowed"])
    assert bad.exit_code == 2
