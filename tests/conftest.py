from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.redis_server import RedisServer
from tests.threads import one_torch_thread as one_torch_thread_block

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


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run a module single-threaded: tiny models gain nothing from intra-op threads, on a
    shared CPU the threads of small ops wait on each other (10x slower), and in-process
    references then compute like the workers (OMP_NUM_THREADS=1). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    with one_torch_thread_block():
        yield


@pytest.fixture
def runner(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A Typer ``CliRunner`` for the ``sinkstream`` CLI, pointed at the private Redis, with
    no settings file and this invocation's settings read afresh."""
    from typer.testing import CliRunner

    from sinkstream.cli import common as cli_common

    monkeypatch.setenv("SINKSTREAM_REDIS_URL", redis_server.url)
    monkeypatch.delenv("SINKSTREAM_CONFIG", raising=False)
    monkeypatch.setattr(cli_common.state, "settings", None)
    monkeypatch.setattr(cli_common.state, "config", None)
    return CliRunner()
