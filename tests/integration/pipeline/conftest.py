from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sinkstream.cli.localredis import RedisServer
from tests.integration.pipeline.harness import WorkerPool, worker_env
from workers.scheduling.dispatcher import Dispatcher


@pytest.fixture
def pool(redis_server: RedisServer, tmp_path: Path) -> Iterator[WorkerPool]:
    workers = WorkerPool(worker_env(redis_server.url, tmp_path), tmp_path)
    try:
        yield workers
    finally:
        workers.close()


@pytest.fixture
def dispatchers() -> Iterator[list[Dispatcher]]:
    """Dispatchers a test starts; each is stopped after it."""
    started: list[Dispatcher] = []
    yield started
    for dispatcher in started:
        dispatcher.stop()
