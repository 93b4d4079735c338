"""Claims and the scheduled flag's two lifetimes (issue 22): queued, the flag lasts the queued
TTL; running, it follows the lease (``batch_claim.lua``, ``lease_renew.lua``,
``batch_release.lua``), so a dead holder's stream is re-scheduled about a second after its
lease lapses, while a live holder's renewals keep both."""

from __future__ import annotations

import time

import pytest
import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.claims import FLAG_MARGIN_S, Claimed, Claims, Refused, running_flag_ttl
from state_store.lease import LeaseKeeper, LeaseManager

SID = "standup"
KEYS = StreamKeys.of(SID)
QUEUED_TTL_S = 120.0


@pytest.fixture
def claims(r: redis.Redis) -> Claims:
    return Claims(r)


@pytest.fixture(autouse=True)
def unread(r: redis.Redis) -> str:
    """One input entry after the committed state (none yet): a claim has work to take."""
    return str(r.xadd(KEYS.input, {"text": "hello"}).decode())  # type: ignore[union-attr]


def _claim(claims: Claims, lease_s: float, own: bool = True, worker: str = "w1") -> Claimed:
    got = claims.claim(SID, worker, lease_s, running_flag_ttl(lease_s) if own else None)
    assert isinstance(got, Claimed), got
    return got


def test_running_flag_follows_the_lease_not_the_queued_ttl(
    r: redis.Redis, claims: Claims
) -> None:
    r.set(KEYS.scheduled, "1", px=int(QUEUED_TTL_S * 1000))  # set by the dispatcher
    claimed = _claim(claims, 5.0)
    assert claimed.lease.flag_ttl_s == 5.0 + FLAG_MARGIN_S
    assert 5000 < r.pttl(KEYS.scheduled) <= 6000  # lapses a second after the lease
    assert 4000 < r.pttl(KEYS.lease) <= 5000


def test_renewal_extends_the_flag_with_the_lease(r: redis.Redis, claims: Claims) -> None:
    r.set(KEYS.scheduled, "1", px=60_000)
    claimed = _claim(claims, 0.4)
    leases = LeaseManager(r)
    for _ in range(4):  # 0.8 s: twice the lease
        time.sleep(0.2)
        assert leases.renew(claimed.lease)
    assert r.exists(KEYS.scheduled) and r.exists(KEYS.lease)
    assert 0 < r.pttl(KEYS.scheduled) <= 1400
    assert r.pttl(KEYS.scheduled) > r.pttl(KEYS.lease)  # never lapses before the lease


def test_renewal_never_creates_a_flag(r: redis.Redis, claims: Claims) -> None:
    claimed = _claim(claims, 1.0)  # no flag: e.g. a task sent without the dispatcher
    assert LeaseManager(r).renew(claimed.lease)
    assert not r.exists(KEYS.scheduled)


def test_a_companion_claim_leaves_the_flag_alone(r: redis.Redis, claims: Claims) -> None:
    r.set(KEYS.scheduled, "1", px=60_000)
    claimed = _claim(claims, 0.5, own=False)
    assert claimed.lease.flag_ttl_s == 0.0
    assert LeaseManager(r).renew(claimed.lease)
    assert r.pttl(KEYS.scheduled) > 50_000


def test_a_lost_lease_renews_neither(r: redis.Redis, claims: Claims) -> None:
    r.set(KEYS.scheduled, "1", px=60_000)
    claimed = _claim(claims, 5.0)
    r.delete(KEYS.lease)
    thief = _claim(claims, 5.0, own=False, worker="w2")
    before = r.pttl(KEYS.scheduled)
    assert not LeaseManager(r).renew(claimed.lease)
    assert r.pttl(KEYS.scheduled) <= before
    assert r.get(KEYS.lease) == thief.lease.value.encode()


def test_dead_holder_flag_lapses_about_a_second_after_its_lease(
    r: redis.Redis, claims: Claims
) -> None:
    r.set(KEYS.scheduled, "1", px=60_000)
    _claim(claims, 0.3)  # the worker dies here: nothing renews, nothing releases
    time.sleep(0.35)
    assert not r.exists(KEYS.lease) and r.exists(KEYS.scheduled)
    time.sleep(FLAG_MARGIN_S)
    assert not r.exists(KEYS.scheduled)  # the dispatcher's next pass schedules the stream


def test_keeper_renews_the_flag_while_the_model_computes(r: redis.Redis, claims: Claims) -> None:
    """The keeper is a thread; torch releases the GIL in its kernels, so renewals go on while
    the calling thread is inside a forward far longer than the lease."""
    torch = pytest.importorskip("torch")
    r.set(KEYS.scheduled, "1", px=60_000)
    claimed = _claim(claims, 0.3)
    a = torch.randn(384, 384)
    with LeaseKeeper(LeaseManager(r), claimed.lease) as keeper:
        started = time.monotonic()
        while time.monotonic() - started < 1.2:  # four leases of pure compute
            a = torch.tanh(a @ a)
        keeper.check()
    assert keeper.renewals >= 4 and not keeper.lost.is_set()
    assert r.get(KEYS.lease) == claimed.lease.value.encode()
    assert r.exists(KEYS.scheduled)


@pytest.mark.parametrize(("then", "flag_ms", "enqueue"), [
    ("retry", (110_000, 120_000), 0),   # an error: retried after the queued TTL
    ("continue", (110_000, 120_000), 1),  # input left: the caller enqueues the next task
    ("keep", (0, 6000), 0),           # a companion: the flag is left as it was
])
def test_release_settles_the_flag(
    r: redis.Redis, claims: Claims, then: str, flag_ms: tuple[int, int], enqueue: int
) -> None:
    r.set(KEYS.scheduled, "1", px=60_000)
    claimed = _claim(claims, 5.0)
    assert claims.release(claimed.lease, then, QUEUED_TTL_S) == bool(enqueue)  # type: ignore[arg-type]
    assert not r.exists(KEYS.lease)
    low, high = flag_ms
    assert low < r.pttl(KEYS.scheduled) <= high


def test_release_done_drops_the_flag_of_a_caught_up_stream(
    r: redis.Redis, claims: Claims, unread: str
) -> None:
    r.set(KEYS.scheduled, "1", px=60_000)
    claimed = _claim(claims, 5.0)
    r.hset(KEYS.state, "last_entry_id", unread)  # the batch applied it
    assert not claims.release(claimed.lease, "done", QUEUED_TTL_S)
    assert not r.exists(KEYS.scheduled)


def test_a_caught_up_stream_is_refused_as_idle_without_a_lease(
    r: redis.Redis, claims: Claims, unread: str
) -> None:
    r.hset(KEYS.state, "last_entry_id", unread)
    r.set(KEYS.scheduled, "1", px=60_000)
    assert claims.claim(SID, "w1", 5.0, None) == Refused("idle", "")  # a companion probe
    assert r.exists(KEYS.scheduled), "a companion leaves the flag to the stream's own task"
    assert claims.claim(SID, "w1", 5.0, running_flag_ttl(5.0)) == Refused("idle", "")
    assert not r.exists(KEYS.scheduled), "settled as a caught-up release settles it"
    assert not r.exists(KEYS.lease) and not r.exists(KEYS.fence)
    r.xadd(KEYS.input, {"text": "more"})  # new input: claimed again
    assert isinstance(_claim(claims, 5.0), Claimed)


def test_a_stream_without_input_is_idle_and_a_foreign_input_key_is_claimed(
    r: redis.Redis, claims: Claims
) -> None:
    r.delete(KEYS.input)
    assert claims.claim(SID, "w1", 5.0, running_flag_ttl(5.0)) == Refused("idle", "")
    r.set(KEYS.input, "not a stream")  # claimed: the batch's read parks the stream, by name
    assert isinstance(_claim(claims, 5.0), Claimed)


def test_a_parked_stream_is_refused_and_its_flag_cleared(r: redis.Redis, claims: Claims) -> None:
    r.set(KEYS.scheduled, "1", px=60_000)
    r.hset(KEYS.meta, mapping={"status": "failed", "failure_reason": "corrupt"})
    got = claims.claim(SID, "w1", 5.0, running_flag_ttl(5.0))
    assert got == Refused("failed", "corrupt")
    assert not r.exists(KEYS.scheduled)
