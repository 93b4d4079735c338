"""Per-stream leases: exclusivity, renewal, expiry, takeover and strictly increasing tokens."""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.lease import LeaseKeeper, LeaseLostError, LeaseManager
from tests.redis_server import RedisServer

SID = "standup"
KEYS = StreamKeys.of(SID)


@pytest.fixture
def leases(r: redis.Redis) -> LeaseManager:
    return LeaseManager(r)


def test_acquire_is_exclusive(leases: LeaseManager) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    assert lease.token == 1 and lease.value == "w1|1" and not lease.took_over
    assert 29 < lease.remaining_s() <= 30
    assert leases.acquire(SID, "w2", 30) is None
    assert leases.acquire(SID, "w1", 30) is None  # not re-entrant: renew instead
    assert leases.holder(SID) == "w1|1"
    assert leases.current_token(SID) == 1


def test_streams_have_independent_leases(leases: LeaseManager) -> None:
    a = leases.acquire("a", "w1", 30)
    b = leases.acquire("b", "w1", 30)
    assert a is not None and b is not None and a.token == b.token == 1


def test_renew_extends_only_our_lease(r: redis.Redis, leases: LeaseManager) -> None:
    lease = leases.acquire(SID, "w1", 0.3)
    assert lease is not None
    for _ in range(4):  # 0.6 s in total, twice the ttl
        time.sleep(0.15)
        assert leases.renew(lease)
    assert leases.holder(SID) == lease.value
    assert 0 < r.pttl(KEYS.lease) <= 300


def test_renew_after_expiry_fails(leases: LeaseManager) -> None:
    lease = leases.acquire(SID, "w1", 0.05)
    assert lease is not None
    time.sleep(0.1)
    assert not leases.renew(lease)
    assert lease.remaining_s() < 0
    assert leases.holder(SID) is None


def test_release_only_if_ours(leases: LeaseManager) -> None:
    old = leases.acquire(SID, "w1", 0.05)
    assert old is not None
    time.sleep(0.1)
    new = leases.acquire(SID, "w2", 30)
    assert new is not None
    assert not leases.release(old)  # must not free w2's lease
    assert leases.holder(SID) == new.value
    assert not leases.renew(old)
    assert leases.release(new)
    assert leases.holder(SID) is None


def test_expiry_takeover_is_reported_and_counted(r: redis.Redis, leases: LeaseManager) -> None:
    first = leases.acquire(SID, "w1", 0.05)
    assert first is not None and not first.took_over
    time.sleep(0.1)
    second = leases.acquire(SID, "w2", 0.05)
    assert second is not None
    assert second.token == first.token + 1
    assert second.took_over and second.previous_holder == "w1|1"
    assert r.hget(KEYS.meta, "leases_taken_over") == b"1"
    assert leases.release(second)
    third = leases.acquire(SID, "w3", 30)
    assert third is not None and not third.took_over  # a clean release is no takeover
    assert third.token == second.token + 1
    assert r.hget(KEYS.meta, "leases_taken_over") == b"1"


def test_tokens_strictly_increase(leases: LeaseManager) -> None:
    tokens = []
    for i in range(50):
        lease = leases.acquire(SID, f"w{i % 3}", 30)
        assert lease is not None
        tokens.append(lease.token)
        assert leases.release(lease)
    assert tokens == list(range(1, 51))


def test_tokens_keep_increasing_across_a_hard_restart(redis_aof_server: RedisServer) -> None:
    mgr = LeaseManager(redis_aof_server.client())
    for _ in range(3):
        lease = mgr.acquire(SID, "w1", 30)
        assert lease is not None
        mgr.release(lease)
    redis_aof_server.restart(hard=True)
    mgr = LeaseManager(redis_aof_server.client())
    lease = mgr.acquire(SID, "w1", 30)
    assert lease is not None and lease.token == 4


def test_bad_arguments(leases: LeaseManager) -> None:
    with pytest.raises(ValueError, match="worker id"):
        leases.acquire(SID, "", 30)
    with pytest.raises(ValueError, match="ttl"):
        leases.acquire(SID, "w1", 0)
    with pytest.raises(ValueError, match="invalid stream id"):
        leases.acquire("bad}id", "w1", 30)


def test_keeper_holds_the_lease_through_a_long_batch(leases: LeaseManager) -> None:
    lease = leases.acquire(SID, "w1", 0.3)
    assert lease is not None
    with LeaseKeeper(leases, lease) as keeper:
        time.sleep(1.0)  # over three ttls
        keeper.check()
    assert keeper.renewals >= 5 and not keeper.lost.is_set()
    assert leases.holder(SID) == lease.value
    assert leases.acquire(SID, "w2", 30) is None


def test_keeper_flags_a_lost_lease(r: redis.Redis, leases: LeaseManager) -> None:
    lease = leases.acquire(SID, "w1", 0.3)
    assert lease is not None
    with LeaseKeeper(leases, lease) as keeper:
        r.delete(KEYS.lease)  # e.g. the worker was paused past its ttl
        thief = leases.acquire(SID, "w2", 30)
        assert thief is not None
        assert keeper.lost.wait(2.0)
        with pytest.raises(LeaseLostError, match="stream 'standup'"):
            keeper.check()
    assert leases.holder(SID) == thief.value  # the keeper never touched the new lease


def test_keeper_flags_loss_when_redis_is_unreachable_past_the_deadline(
    redis_server: RedisServer,
) -> None:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=0.2,
                         socket_connect_timeout=0.2)
    mgr = LeaseManager(client)
    lease = mgr.acquire(SID, "w1", 0.4)
    assert lease is not None
    with LeaseKeeper(mgr, lease, interval_s=0.05) as keeper:
        redis_server.stop(hard=True)
        started = time.monotonic()
        with pytest.raises(LeaseLostError):  # from the local deadline, even mid-retry
            while time.monotonic() - started < 3.0:
                keeper.check()
                time.sleep(0.02)
        assert time.monotonic() - started < 1.0
        assert keeper.lost.is_set()
    assert isinstance(keeper.last_error, redis.RedisError)


def test_keepers_share_one_renewer_thread_and_stop_for_good(leases: LeaseManager) -> None:
    held = [leases.acquire(f"s{i}", "w1", 0.3) for i in range(20)]
    keepers = [LeaseKeeper(leases, lease) for lease in held if lease is not None]
    threads_before = threading.active_count()
    for keeper in keepers:
        keeper.__enter__()
    assert threading.active_count() <= threads_before + 1  # one renewer, not one per lease
    time.sleep(0.5)
    for keeper in keepers[:10]:
        keeper.stop()
    stopped_at = [k.renewals for k in keepers[:10]]
    time.sleep(0.5)  # past the ttl: only the kept half is still held
    assert [k.renewals for k in keepers[:10]] == stopped_at
    assert all(leases.holder(f"s{i}") is None for i in range(10))
    assert all(leases.holder(f"s{i}") == keepers[i].lease.value for i in range(10, 20))
    assert all(k.renewals >= 3 and not k.lost.is_set() for k in keepers[10:])
    for keeper in keepers[10:]:
        keeper.stop()


def test_a_forked_child_renews_none_of_the_parents_leases(leases: LeaseManager) -> None:
    lease = leases.acquire("forked", "w1", 0.3)
    assert lease is not None
    with LeaseKeeper(leases, lease):
        pid = os.fork()
        if pid == 0:  # the child: a fresh renewer, with nothing to keep
            os._exit(0 if not leases.renewer._due and leases.renewer._thread is None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_the_renewer_thread_ends_when_idle_and_starts_again(
    leases: LeaseManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leases.renewer, "IDLE_EXIT_S", 0.2)
    first = leases.acquire("idle-a", "w1", 0.3)
    assert first is not None
    with LeaseKeeper(leases, first):
        time.sleep(0.2)
    time.sleep(0.5)  # nothing to keep for longer than IDLE_EXIT_S
    assert leases.renewer._thread is None
    second = leases.acquire("idle-b", "w1", 0.3)
    assert second is not None
    with LeaseKeeper(leases, second) as keeper:
        time.sleep(0.6)
        keeper.check()
    assert keeper.renewals >= 3
