"""Shared by the producer tests against a real redis-server (``test_publisher``,
``test_publisher_retries``, ``test_reader``, ``test_replay``, ``test_cli``): the sample files,
a producer on the production client, what a stream holds, and quiet retry logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from producer.formats import Turn
from producer.publisher import Producer
from producer.reader import read_entries
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.entries import InputEntry
from sinkstream.settings import Settings
from state_store.connection import redis_from_settings

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def make_producer(server: RedisServer, **kwargs: Any) -> Producer:
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in Settings.model_fields}
    cfg = Settings(redis_url=server.url, **overrides)
    # the production client: redis-py retries once quietly, longer outages reach retry_call
    return Producer(redis_from_settings(cfg), settings=cfg, **kwargs)


def entries(server: RedisServer, stream: str) -> list[InputEntry]:
    out = []
    for parsed in read_entries(server.client(), stream):
        assert isinstance(parsed, InputEntry), parsed
        out.append(parsed)
    return out


def turns_of(items: list[InputEntry]) -> list[Turn]:
    return [Turn(e.text, e.speaker, e.ts) for e in items if not e.eos]


@pytest.fixture
def quiet_retries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
