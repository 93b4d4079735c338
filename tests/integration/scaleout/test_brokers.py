"""The Celery broker apart from the data Redis: settings and transport options for
``sentinel://`` (kombu's master_name / sentinel_kwargs), and a real worker on RabbitMQ
(``amqp://``, a private vhost created and deleted by the test) with a plain Redis for data."""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.settings import Settings, SettingsError, load_settings, parse_redis_url
from state_store.connection import redact_url
from tests.integration.pipeline.harness import (
    WorkerPool,
    caught_up,
    settings_from_env,
    wait_until,
    worker_env,
)
from tests.integration.scaleout.common import assert_states_match_reference, qmsum_turns
from workers.app import broker_transport_options, create_app


def test_data_urls_for_cluster_and_sentinel_parse() -> None:
    cluster = parse_redis_url("redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2:7001/0")
    assert cluster.kind == "cluster" and cluster.password == "s3cret"
    assert cluster.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    sentinel = parse_redis_url("rediss+sentinel://u:p@s1:26379,[::1]/events/2")
    assert (sentinel.kind, sentinel.tls, sentinel.master, sentinel.db) == (
        "sentinel", True, "events", 2)
    assert sentinel.hosts == (("s1", 26379), ("::1", 26379))
    for bad in ("redis+cluster://h:1/3", "redis+sentinel://h:1", "redis+sentinel://h:1/m/x",
                "redis+shard://h:1"):
        with pytest.raises(SettingsError):
            load_settings(redis_url=bad, broker_url="redis://h:1/0")


def test_cluster_data_needs_a_separate_broker() -> None:
    with pytest.raises(SettingsError, match="broker_url"):
        load_settings(redis_url="redis+cluster://127.0.0.1:7000")
    cfg = load_settings(redis_url="redis+cluster://127.0.0.1:7000",
                        broker_url="amqp://guest:guest@127.0.0.1:5672//")
    assert broker_transport_options(cfg) == {}
    assert create_app(cfg).conf.broker_url.startswith("amqp://")


def test_sentinel_broker_gets_master_name_and_sentinel_credentials() -> None:
    with pytest.raises(SettingsError, match="broker_sentinel_master"):
        load_settings(broker_url="sentinel://127.0.0.1:26379")
    cfg = Settings(broker_url="sentinel://:pw@h1:26379/0;sentinel://:pw@h2:26379/0",
                   broker_sentinel_master="jobs", broker_sentinel_password="sentinel-pw",
                   broker_queue="sinkstream-eu")
    app = create_app(cfg)
    options = app.conf.broker_transport_options
    assert options["master_name"] == "jobs"
    assert options["sentinel_kwargs"]["password"] == "sentinel-pw"
    assert options["visibility_timeout"] > 3600
    assert app.conf.task_default_queue == "sinkstream-eu"
    assert redact_url(cfg.effective_broker_url) == \
        "sentinel://:***@h1:26379/0;sentinel://:***@h2:26379/0"
    # a redis+sentinel:// data URL and no broker_url: the broker uses the same group
    derived = Settings(redis_url="redis+sentinel://:pw@h1:26379,h2:26380/mymaster/0",
                       redis_sentinel_password="sp")
    assert derived.effective_broker_url == "sentinel://:pw@h1:26379/0;sentinel://:pw@h2:26380/0"
    assert broker_transport_options(derived)["master_name"] == "mymaster"
    assert broker_transport_options(derived)["sentinel_kwargs"]["password"] == "sp"
    assert redact_url("redis+cluster://:pw@a:1,b:2/0") == "redis+cluster://:***@a:1,b:2/0"


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=90)


@pytest.fixture
def rabbit_vhost() -> Iterator[str]:
    """A private RabbitMQ vhost for this test (deleted afterwards, with all its queues)."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl not installed")
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError:
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    vhost = f"sinkstream-test-{secrets.token_hex(4)}"
    made = _rabbitmqctl("add_vhost", vhost)
    if made.returncode != 0:
        pytest.skip(f"cannot create a RabbitMQ vhost: {made.stderr.strip()[:200]}")
    try:
        assert _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"
                            ).returncode == 0
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


def test_worker_on_a_rabbitmq_broker(
    rabbit_vhost: str, redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    env = worker_env(redis_server.url, tmp_path, SINKSTREAM_BROKER_URL=rabbit_vhost)
    settings = settings_from_env(env)
    client = redis_server.client()
    streams = ["amqp-a", "amqp-b"]
    producer = Producer(client, settings=settings)
    for sid in streams:
        producer.publish_many(sid, qmsum_turns(qmsum_dir, 12))
    pool = WorkerPool(env, tmp_path)
    try:
        pool.start("rabbit")
        wait_until(lambda: all(caught_up(client, s) for s in streams), 180,
                   "the worker to apply both streams via RabbitMQ", pool.logs)
        assert "amqp://guest:**@127.0.0.1:5672/" in pool.logs()  # celery's banner, redacted
    finally:
        pool.close()
    assert_states_match_reference(client, settings, streams)
