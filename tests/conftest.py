from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.redis_server import RedisServer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private, empty redis-server on a free loopback port (no persistence)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop(hard=True)


@pytest.fixture
def redis_aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Like ``redis_server`` but with AOF (fsync always), so restarts keep the data."""
    server = RedisServer(tmp_path / "redis-aof", appendonly=True).start()
    try:
        yield server
    finally:
        server.stop(hard=True)


@pytest.fixture
def r(redis_server: RedisServer) -> redis.Redis:
    return redis_server.client(decode_responses=False)


@pytest.fixture
def qmsum_dir() -> Path:
    path = SHARED_DATA / "qmsum" / "val"
    if not path.is_dir():
        pytest.skip(f"QMSum data not found at {path}")
    return path
