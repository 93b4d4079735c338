"""The producer's idempotent retries against a real private redis-server: a reply lost on the
wire or in a hard restart is not appended twice, pending entries go first after a failed call,
and producer ids keep their numbering."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from sinkstream.settings import Settings
from state_store.connection import redis_from_settings
from tests.unit.producer.conftest import entries, make_producer

pytestmark = pytest.mark.usefixtures("quiet_retries")


# --- idempotent retries -------------------------------------------------------------------------


def test_retry_after_a_lost_reply_does_not_duplicate(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis runs the append but the reply is lost: the retry must skip what landed."""
    original = redis.client.Pipeline.execute
    calls = {"n": 0}

    def execute_then_drop_reply(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        replies = original(self, *args, **kwargs)
        if calls["n"] in (2, 3):
            raise redis.ConnectionError("connection reset by peer (simulated after execution)")
        return replies

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute_then_drop_reply)
    producer = make_producer(redis_server, batch_entries=10)
    result = producer.publish_many("s", [f"t{i}" for i in range(35)])
    assert [e.text for e in entries(redis_server, "s")] == [f"t{i}" for i in range(35)]
    assert result.entries == 35 and result.duplicates == 10  # 10 landed in a lost attempt
    assert sum("publishing to" in rec.getMessage() for rec in caplog.records) == 2


def test_publish_survives_a_redis_restart(
    redis_aof_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL + restart (AOF) twice while a long publish runs: no duplicates, no gaps."""
    producer = make_producer(redis_aof_server, batch_entries=10)
    n = 3000
    marks = {n // 4: threading.Event(), n // 2: threading.Event()}

    def turns() -> Iterator[tuple[str, str, float]]:
        for i in range(n):
            if i in marks:
                marks[i].set()
            if i % 10 == 0:
                time.sleep(0.002)
            yield (f"turn {i}", f"S{i % 3}", float(i))

    def restarter() -> None:
        for event in marks.values():
            event.wait(20)
            redis_aof_server.restart(hard=True, down_seconds=0.2)

    thread = threading.Thread(target=restarter)
    thread.start()
    try:
        result = producer.publish_many("live", turns(), eos=True)
    finally:
        thread.join()
    got = entries(redis_aof_server, "live")
    assert [e.text for e in got[:-1]] == [f"turn {i}" for i in range(n)]
    assert got[-1].eos and result.last_id == got[-1].id
    assert any("publishing to" in rec.getMessage() for rec in caplog.records), "no outage hit"


class ReplyCuttingProxy:
    """A TCP proxy in front of Redis that, for the N-th script call, lets Redis execute it,
    then SIGKILLs and restarts Redis and closes the client's socket before the reply reaches
    it: the worst case for a retry (the append happened and survived, the producer can't know).
    """

    def __init__(self, server: RedisServer, cut_on_call: int) -> None:
        self.server = server
        self.cut_on_call = cut_on_call
        self.calls = 0
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.server.port))
            except OSError:  # Redis is restarting: the client sees a reset and retries
                client.close()
                continue
            cut = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, cut), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, cut: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if b"EVALSHA" in data:
                    with self._lock:
                        self.calls += 1
                        if self.calls == self.cut_on_call:
                            cut.set()
                dst.sendall(data)
        except OSError:
            pass

    def _down(self, src: socket.socket, dst: socket.socket, cut: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if cut.is_set():  # Redis ran the script (its reply is here): lose the reply
                    self.cuts += 1
                    self.server.restart(hard=True, down_seconds=0.2)
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # FIN now, even with a thread in recv()
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_reply_lost_in_a_restart_is_not_duplicated(redis_aof_server: RedisServer) -> None:
    proxy = ReplyCuttingProxy(redis_aof_server, cut_on_call=3)
    try:
        cfg = Settings(redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        producer = Producer(redis_from_settings(cfg), settings=cfg, batch_entries=10)
        result = producer.publish_many("s", [f"t{i}" for i in range(50)], eos=True)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    got = entries(redis_aof_server, "s")
    assert [e.text for e in got[:-1]] == [f"t{i}" for i in range(50)] and got[-1].eos
    assert result.duplicates == 10 and result.entries == 51


def test_pending_entries_go_first_after_a_call_failed(redis_aof_server: RedisServer) -> None:
    producer = make_producer(redis_aof_server, batch_entries=5, retry_attempts=2)
    producer.publish_many("s", ["a", "b"])
    redis_aof_server.stop(hard=True)
    with pytest.raises(redis.ConnectionError):
        producer.publish_many("s", ["c", "d", "e"])
    assert producer.pending == 3
    redis_aof_server.start()
    producer.publish_many("s", ["f"])
    assert [e.text for e in entries(redis_aof_server, "s")] == ["a", "b", "c", "d", "e", "f"]
    assert producer.pending == 0


def test_fixed_producer_id_resumes_numbering_and_close_forgets(redis_server: RedisServer) -> None:
    first = make_producer(redis_server, producer_id="camera-1")
    first.publish_many("s", ["a", "b"])
    second = make_producer(redis_server, producer_id="camera-1")
    second.publish_many("s", ["c"])  # would be skipped as a duplicate if numbering restarted
    assert [e.text for e in entries(redis_server, "s")] == ["a", "b", "c"]
    producers_key = StreamKeys.of("s").producers
    assert redis_server.client().hget(producers_key, "camera-1") is not None
    second.close()
    assert redis_server.client().hget(producers_key, "camera-1") is None
    assert 0 < redis_server.client().pttl(producers_key) or not redis_server.client().exists(
        producers_key)


def test_two_producers_interleave_without_losing_entries(redis_server: RedisServer) -> None:
    a, b = make_producer(redis_server), make_producer(redis_server)
    assert a.producer_id != b.producer_id
    for i in range(5):
        a.publish("s", f"a{i}")
        b.publish("s", f"b{i}")
    assert [e.text for e in entries(redis_server, "s")] == [
        x for i in range(5) for x in (f"a{i}", f"b{i}")]
