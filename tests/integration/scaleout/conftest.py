"""Fixtures for the scale-out tests: a real local Redis Cluster (3 primaries + 3 replicas) and
a separate plain redis-server as the Celery broker."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sinkstream.cli.localredis import LocalCluster, RedisServer


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is needed to create a Redis Cluster")
    nodes = LocalCluster(tmp_path / "cluster", masters=3, replicas=1, node_timeout_ms=1000)
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    """The Celery broker: a plain Redis apart from the data cluster (Celery's Redis
    transport does not speak Redis Cluster)."""
    server = RedisServer(tmp_path / "broker").start()
    try:
        yield server
    finally:
        server.stop(hard=True)
