from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sinkstream.cli.localredis import RedisServer
from tests.integration.gateway.server import GatewayProcess, Tokens, gateway_env


@pytest.fixture(scope="module")
def gw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def gw_redis(gw_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(gw_dir / "redis").start()
    try:
        yield server
    finally:
        server.stop(hard=True)


@pytest.fixture(scope="module")
def tokens(gw_dir: Path) -> Tokens:
    return Tokens.create(gw_dir / "tokens.json")


@pytest.fixture(scope="module")
def gateway(gw_redis: RedisServer, tokens: Tokens, gw_dir: Path) -> Iterator[GatewayProcess]:
    """One gateway per test module, small limits so the limits are testable."""
    env = gateway_env(gw_redis.url, tokens.path, SINKSTREAM_GATEWAY_MAX_BODY_BYTES="65536",
                      SINKSTREAM_GATEWAY_MAX_BATCH_ENTRIES="100",
                      SINKSTREAM_MAX_ENTRY_BYTES="1024",
                      SINKSTREAM_GATEWAY_HEARTBEAT_SECONDS="0.5",
                      SINKSTREAM_GATEWAY_ASK_TIMEOUT_SECONDS="2")
    process = GatewayProcess(env, gw_dir / "gateway.log").start()
    try:
        yield process
    finally:
        process.stop()
