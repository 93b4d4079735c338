"""Keyspace-notification discovery (``workers/scheduling/keyspace.py``) against a real
redis-server: which events name a stream, what the server's setting becomes, and when the
worker does not try ``CONFIG`` at all."""

from __future__ import annotations

import pytest
import redis

from tests.redis_server import RedisServer
from workers.scheduling import keyspace


@pytest.mark.parametrize(("channel", "event", "expected"), [
    ("__keyspace@0__:sinkstream:{standup}:in", "new", "standup"),
    (b"__keyspace@3__:sinkstream:{a.b-c_1}:in", b"new", "a.b-c_1"),
    ("__keyspace@0__:sinkstream:{standup}:in", "xadd", None),  # only key creation
    ("__keyspace@0__:sinkstream:{standup}:out", "new", None),
    ("__keyspace@0__:sinkstream:{standup}:state", "new", None),
    ("__keyspace@0__:sinkstream:{a}b}:in", "new", None),  # invalid id: never a key name
    ("__keyspace@0__:sinkstream:{}:in", "new", None),
    ("__keyspace@0__:other:{x}:in", "new", None),
])
def test_only_new_input_keys_name_a_stream(
    channel: str | bytes, event: str | bytes, expected: str | None
) -> None:
    assert keyspace.stream_of(channel, event) == expected


def test_enable_adds_the_flags_and_keeps_the_servers_own(r: redis.Redis) -> None:
    r.config_set("notify-keyspace-events", "Ex")
    assert keyspace.enable(r, "auto")
    flags = r.config_get("notify-keyspace-events")["notify-keyspace-events"]
    assert set("ExKn") <= set(flags)
    assert keyspace.enable(r, "auto")  # idempotent


def test_listen_and_off_never_touch_the_configuration(r: redis.Redis) -> None:
    r.config_set("notify-keyspace-events", "")
    assert not keyspace.enable(r, "listen")
    assert not keyspace.enable(r, "off")
    assert r.config_get("notify-keyspace-events")["notify-keyspace-events"] == ""


def test_a_refused_config_falls_back_quietly(redis_server: RedisServer, r: redis.Redis) -> None:
    r.acl_setuser("default", enabled=True, nopass=True, commands=["+@all", "-config"],
                  keys=["*"], channels=["*"], reset_keys=False)
    assert not keyspace.enable(r, "auto")  # NOPERM: the discovery scan stays the way


def test_a_named_acl_user_is_never_made_to_try_config(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    r.acl_setuser("limited", enabled=True, passwords=["+pw"], commands=["+@all", "-config"],
                  keys=["*"], channels=["*"])
    limited = redis.Redis(host="127.0.0.1", port=redis_server.port, username="limited",
                          password="pw")
    assert not keyspace.may_configure(limited, "auto")
    assert not keyspace.enable(limited, "auto")
    assert not r.acl_log()  # nothing refused, nothing logged


def test_the_pattern_hears_a_raw_xadd_once(r: redis.Redis) -> None:
    assert keyspace.enable(r, "auto")
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.psubscribe(keyspace.channel_pattern(keyspace.client_db(r)))
    sub.get_message(timeout=1.0)
    for text in ("first", "second"):  # the second XADD creates nothing
        r.xadd("sinkstream:{raw}:in", {"text": text})
    r.xadd("sinkstream:{raw}:out", {"text": "not input"})
    r.set("sinkstream:{raw}:lease", "w|1")
    heard = []
    while (message := sub.get_message(timeout=0.5)) is not None:
        heard.append(keyspace.stream_of(message["channel"], message["data"]))
    assert heard == ["raw"]
    sub.close()
