"""Settings (env, TOML, errors naming the setting) and the Redis client built from them."""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY, generate_latest
from redis.connection import SSLConnection, UnixDomainSocketConnection

from sinkstream.cli.localredis import RedisServer, free_port
from sinkstream.settings import CONFIG_ENV, Settings, SettingsError, load_settings
from state_store.connection import (
    Backoff,
    describe_redis_error,
    redact_url,
    redis_from_settings,
    retry_call,
)


@pytest.fixture(autouse=True)
def clean_env() -> Iterator[None]:
    """No SINKSTREAM_* from the outside; and load_settings(config_file) writes the
    environment, so restore it exactly afterwards."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("SINKSTREAM_"):
            del os.environ[name]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_defaults_are_valid() -> None:
    cfg = load_settings()
    assert cfg.redis_url.startswith("redis://")
    assert cfg.on_full == "block"
    assert cfg.max_entry_bytes == 16_384


def test_environment_variables_are_read() -> None:
    os.environ["SINKSTREAM_REDIS_URL"] = "redis://10.0.0.5:6380/2"
    os.environ["SINKSTREAM_MAX_ENTRY_BYTES"] = "1000"
    os.environ["SINKSTREAM_ON_FULL"] = "fail"
    os.environ["SINKSTREAM_REDIS_SSL_CHECK_HOSTNAME"] = "false"
    cfg = load_settings()
    assert cfg.redis_url == "redis://10.0.0.5:6380/2"
    assert cfg.max_entry_bytes == 1000
    assert cfg.on_full == "fail"
    assert cfg.redis_ssl_check_hostname is False


def test_toml_file_then_env_then_arguments(tmp_path: Path) -> None:
    config = tmp_path / "sinkstream.toml"
    config.write_text(
        'redis_url = "redis://db.internal:6379/1"\nmax_stream_length = 500\n'
        'on_full = "fail"\nmax_entry_bytes = 2048\n'
    )
    cfg = load_settings(config)
    assert (cfg.redis_url, cfg.max_stream_length, cfg.on_full) == (
        "redis://db.internal:6379/1", 500, "fail")
    os.environ["SINKSTREAM_MAX_STREAM_LENGTH"] = "700"
    cfg = load_settings(config, max_entry_bytes=4096)
    assert cfg.max_stream_length == 700  # env beats the file
    assert cfg.max_entry_bytes == 4096  # arguments beat both
    assert cfg.on_full == "fail"  # still from the file


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("max_stream_length = 42\n")
    os.environ[CONFIG_ENV] = str(config)
    assert load_settings().max_stream_length == 42


@pytest.mark.parametrize(
    ("env", "value", "setting"),
    [
        ("SINKSTREAM_MAX_ENTRY_BYTES", "10", "max_entry_bytes"),
        ("SINKSTREAM_MAX_ENTRY_BYTES", "lots", "max_entry_bytes"),
        ("SINKSTREAM_ON_FULL", "drop", "on_full"),
        ("SINKSTREAM_REDIS_URL", "http://localhost:6379", "redis_url"),
        ("SINKSTREAM_MAX_STREAM_LENGTH", "0", "max_stream_length"),
        ("SINKSTREAM_REDIS_SOCKET_TIMEOUT", "-1", "redis_socket_timeout"),
        ("SINKSTREAM_REDIS_SSL_CA_CERTS", "/nonexistent/ca.pem", "redis_ssl_ca_certs"),
    ],
)
def test_invalid_env_values_name_the_setting(env: str, value: str, setting: str) -> None:
    os.environ[env] = value
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert setting in str(info.value)
    if setting != "redis_ssl_ca_certs":  # a model-level check names the field only
        assert env in str(info.value)


def test_invalid_toml_value_and_unknown_key_are_named(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('on_full = "sometimes"\nmax_strem_length = 5\n')
    with pytest.raises(SettingsError) as info:
        load_settings(config)
    assert "on_full" in str(info.value)
    assert "max_strem_length" in str(info.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    os.environ[CONFIG_ENV] = str(tmp_path / "missing.toml")
    with pytest.raises(SettingsError, match=CONFIG_ENV):
        load_settings()


# --- Redis clients from settings ------------------------------------------------------------


def test_client_from_redis_url_uses_timeouts(redis_server: RedisServer) -> None:
    cfg = Settings(redis_url=redis_server.url, redis_socket_timeout=2.5)
    client = redis_from_settings(cfg)
    assert client.ping()
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 2.5
    assert kwargs["socket_connect_timeout"] == 2.5
    assert kwargs["health_check_interval"] == 30.0


def test_client_with_username_and_password(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    admin.acl_setuser("alice", enabled=True, passwords=["+s3cret"], keys=["*"],
                      commands=["+@all"])
    url = f"redis://alice:s3cret@127.0.0.1:{redis_server.port}/0"
    client = redis_from_settings(Settings(redis_url=url))
    assert client.acl_whoami() in ("alice", b"alice")
    wrong = Settings(redis_url=url.replace("s3cret", "wrong"))
    with pytest.raises(redis.AuthenticationError) as info:
        redis_from_settings(wrong).ping()
    message = describe_redis_error(wrong.redis_url, info.value)
    assert "credentials" in message and "wrong" not in message and "***" in message


def test_client_over_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    server = RedisServer(tmp_path / "unix", extra_args=("--unixsocket", str(sock),
                                                        "--unixsocketperm", "700")).start()
    try:
        client = redis_from_settings(Settings(redis_url=f"unix://{sock}?db=0"))
        assert client.ping()
        assert issubclass(client.connection_pool.connection_class, UnixDomainSocketConnection)
    finally:
        server.stop(hard=True)


def test_rediss_url_gets_the_tls_settings(tmp_path: Path) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("placeholder")
    cfg = Settings(
        redis_url="rediss://user:pw@redis.example:6380/0",
        redis_ssl_ca_certs=tmp_path / "ca.pem",
        redis_ssl_certfile=tmp_path / "client.pem",
        redis_ssl_keyfile=tmp_path / "client.key",
        redis_ssl_check_hostname=False,
    )
    pool = redis_from_settings(cfg).connection_pool
    assert issubclass(pool.connection_class, SSLConnection)
    kwargs = pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    assert kwargs["ssl_certfile"] == str(tmp_path / "client.pem")
    assert kwargs["ssl_keyfile"] == str(tmp_path / "client.key")
    assert kwargs["ssl_check_hostname"] is False
    assert (kwargs["username"], kwargs["password"]) == ("user", "pw")


def test_plain_url_ignores_tls_files(tmp_path: Path, redis_server: RedisServer) -> None:
    (tmp_path / "ca.pem").write_text("placeholder")
    cfg = Settings(redis_url=redis_server.url, redis_ssl_ca_certs=tmp_path / "ca.pem")
    client = redis_from_settings(cfg)
    assert "ssl_ca_certs" not in client.connection_pool.connection_kwargs
    assert client.ping()


def test_unreachable_redis_message_names_url_and_fix() -> None:
    url = f"redis://u:topsecret@127.0.0.1:{free_port()}/0"
    client = redis_from_settings(Settings(redis_url=url, redis_socket_timeout=1))
    with pytest.raises(redis.ConnectionError) as info:
        client.ping()
    message = describe_redis_error(url, info.value)
    assert "127.0.0.1" in message and "SINKSTREAM_REDIS_URL" in message
    assert "topsecret" not in message


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://me:pw@h/0") == "rediss://me:***@h/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


# --- retry helper -----------------------------------------------------------------------------


def test_retry_call_retries_transient_errors_and_logs_once_per_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []
    slept: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("Connection refused")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="state_store.connection"):
        assert retry_call(flaky, what="pinging", sleep=slept.append) == "ok"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(calls) == 3 and len(slept) == 2 and len(warnings) == 2
    assert "pinging failed" in warnings[0].getMessage()
    assert "attempt 1/8" in warnings[0].getMessage()


def test_retry_call_gives_up_and_does_not_retry_other_errors() -> None:
    slept: list[float] = []

    def down() -> None:
        raise redis.TimeoutError("timed out")

    with pytest.raises(redis.TimeoutError):
        retry_call(down, what="x", attempts=3, sleep=slept.append)
    assert len(slept) == 2

    def bug() -> None:
        raise redis.ResponseError("WRONGTYPE")

    with pytest.raises(redis.ResponseError):
        retry_call(bug, what="x", sleep=slept.append)
    assert len(slept) == 2


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    backoff = Backoff(base=0.1, cap=1.0, rng=random.Random(0))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [min(1.0, 0.1 * 2**i) for i in range(8)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 1.0
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_torch_threads_apply_when_the_worker_loads_its_model(tmp_path: Path) -> None:
    import torch

    from workers.runtime import Runtime

    with pytest.raises(SettingsError, match="torch_threads"):
        load_settings(torch_threads=-1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        settings = load_settings(model="tiny-llama", torch_threads=1, model_cache_dir=tmp_path)
        runtime = Runtime(settings, enqueue=lambda stream_id: None)
        assert runtime.engine.kind == "sinkkv" and torch.get_num_threads() == 1
        # and the worker's identity in its metrics says so (SinkstreamWorkersComputeDiffer)
        runtime.processor  # noqa: B018 (built on first use, with its metrics)
        text = generate_latest(REGISTRY).decode()
        assert re.search(r'sinkstream_worker_info\{[^}]*threads="1"', text), text
    finally:
        torch.set_num_threads(before)
