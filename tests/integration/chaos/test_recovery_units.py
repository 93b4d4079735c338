"""Fast, deterministic checks of the recovery paths the chaos runs exercise at random:
a task that loses Redis, the dispatcher's backoff and its defences against bad registry
entries, duplicate-task handling and the queue bound."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis

from sinkstream.cli.localredis import RedisServer, free_port
from sinkstream.contracts.keys import STREAMS_REGISTRY, StreamKeys
from sinkstream.settings import Settings
from state_store.connection import redis_from_settings
from state_store.lease import LeaseManager
from workers.scheduling.dispatcher import Dispatcher
from workers.scheduling.scheduler import Scheduler


def _scheduler(client: redis.Redis, ttl_s: float = 60.0) -> tuple[Scheduler, list[str]]:
    enqueued: list[str] = []
    return Scheduler(client, enqueued.append, ttl_s), enqueued


def test_invalid_registry_members_and_wrong_types_do_not_stop_scheduling(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis_server.client()
    scheduler, enqueued = _scheduler(client)
    client.zadd(STREAMS_REGISTRY, {b"a}:state": 0, b"\xff": 0, b"": 0, "good": 1, "typo": 2})
    client.xadd(StreamKeys.of("good").input, {"text": "hi"})
    client.set(StreamKeys.of("typo").input, "a string where a stream belongs")
    dispatcher = Dispatcher(client, scheduler, 0.05, 3600)
    with caplog.at_level(logging.WARNING, logger="workers.scheduling"):
        for _ in range(3):
            dispatcher.poll_once()
            client.delete(StreamKeys.of("good").scheduled)
    assert enqueued == ["good"] * 3
    warned = [r for r in caplog.records if "ignoring registry member" in r.getMessage()]
    assert len(warned) == 3  # one per bad member, not one per poll


def test_busy_duplicate_leaves_the_flag_to_the_holder(redis_server: RedisServer) -> None:
    client = redis_server.client()
    scheduler, enqueued = _scheduler(client, ttl_s=120)
    keys = StreamKeys.of("held")
    assert scheduler.schedule("held")
    lease = LeaseManager(client).acquire("held", "holder", 5)
    assert lease is not None
    scheduler.after_busy("held")
    assert client.exists(keys.scheduled)  # not cleared: no re-enqueue loop
    assert 4000 < client.pttl(keys.scheduled) <= 6000  # lapses ~1 s after the lease would
    assert enqueued == ["held"]
    LeaseManager(client).release(lease)
    ttl = client.pttl(keys.scheduled)
    scheduler.after_busy("held")  # nobody holds it any more: leave the flag alone
    assert client.pttl(keys.scheduled) <= ttl


def test_task_that_lost_redis_is_rescheduled_as_soon_as_it_is_back(
    redis_aof_server: RedisServer,
) -> None:
    client = redis_aof_server.client()
    scheduler, enqueued = _scheduler(client, ttl_s=120)
    assert scheduler.schedule("s")  # its flag would hold the stream for 120 s
    scheduler.retry_later("s")
    redis_aof_server.stop(hard=True)
    with pytest.raises(redis.ConnectionError):
        scheduler.retry_pending()
    redis_aof_server.start()
    assert scheduler.retry_pending() == 1
    assert enqueued == ["s", "s"]
    assert scheduler.retry_pending() == 0


def test_process_stream_task_survives_redis_being_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Celery task catches the connection error (no traceback, no lost stream)."""
    from workers import runtime as runtime_module
    from workers import tasks

    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_socket_timeout=1)
    rt = runtime_module.Runtime(settings, lambda sid: None)
    monkeypatch.setattr(tasks, "runtime", lambda: rt)
    monkeypatch.setattr(tasks, "_redis_down_logged", 0.0)
    result = tasks.process_stream("down")
    assert result["status"] == "retry"
    assert rt.scheduler._retry == {"down"}
    assert tasks.process_stream("down")["status"] == "retry"  # logged once, at DEBUG now


def test_dispatcher_backs_off_and_logs_once_while_redis_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_socket_timeout=1)
    client = redis_from_settings(settings)  # the workers' client: one quick retry only
    scheduler, _ = _scheduler(client)
    calls = []
    real = scheduler.retry_pending

    def counted() -> int:
        calls.append(time.monotonic())
        return real()

    scheduler.retry_pending = counted  # type: ignore[method-assign]
    dispatcher = Dispatcher(client, scheduler, 0.01, 3600)
    with caplog.at_level(logging.WARNING, logger="workers.scheduling"):
        dispatcher.start()
        time.sleep(3.0)
        dispatcher.stop()
    # a fixed 10 ms interval would have made ~300 attempts; backoff to 5 s makes a handful
    assert 3 <= len(calls) <= 20, len(calls)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()


def test_dispatcher_keeps_the_queue_bounded(redis_server: RedisServer) -> None:
    client = redis_server.client()
    scheduler, enqueued = _scheduler(client)
    queue: list[str] = []
    scheduler.enqueue = queue.append
    scheduler.backlog = lambda: len(queue)
    scheduler.max_backlog = 10
    for i in range(50):
        sid = f"s{i:02d}"
        client.xadd(StreamKeys.of(sid).input, {"text": "x"})
        client.zadd(STREAMS_REGISTRY, {sid: i})
    dispatcher = Dispatcher(client, scheduler, 0.05, 3600)
    assert dispatcher.poll_once() == 10
    assert dispatcher.poll_once() == 0  # full: the registry is not even polled
    del queue[:4]
    assert dispatcher.poll_once() == 4 and len(queue) == 10


def test_concurrent_retry_later_is_thread_safe(redis_server: RedisServer) -> None:
    scheduler, enqueued = _scheduler(redis_server.client())

    def add(n: int) -> None:
        for i in range(200):
            scheduler.retry_later(f"t{n}-{i}")

    threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert scheduler.retry_pending() == 800 and len(set(enqueued)) == 800

