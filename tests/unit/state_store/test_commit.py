"""The fenced, exactly-once commit (``state_store/commit.py``) on a real redis-server: fencing
and racing workers, the side data that commits with the state or not at all (outputs, dead
letters, input trimming, summary, hash updates, meta counts), and the request itself (the head
it is built from, its msgpack fields)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial

import msgpack
import pytest
import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.lease import LeaseManager
from state_store.store import (
    CommitError,
    CommitRequest,
    HashUpdate,
    StaleCommitError,
    StateHead,
    StateStore,
)
from tests.redis_server import RedisServer
from tests.unit.state_store.conftest import KEYS, SID, blob, chunk_keys, loaded


# ----- fencing ---------------------------------------------------------------------------------
def test_hash_updates_commit_with_the_batch_and_only_with_it(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    first = HashUpdate(KEYS.memory, {"chunk:0": b"alpha", "open": "partial"})
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"s1", hash_updates=[first]))
    assert r.hgetall(KEYS.memory) == {b"chunk:0": b"alpha", b"open": b"partial"}
    # a refused commit writes none of its side data
    with pytest.raises(StaleCommitError):
        store.commit(CommitRequest(SID, lease.token, 0, "1-2", state=b"s2",
                                   hash_updates=[HashUpdate(KEYS.memory, {"chunk:1": b"beta"})]))
    assert r.hgetall(KEYS.memory) == {b"chunk:0": b"alpha", b"open": b"partial"}
    update = HashUpdate(KEYS.memory, {"chunk:1": b"beta"}, ["chunk:0", "open"])
    store.commit(CommitRequest(SID, lease.token, 1, "1-2", state=b"s2", hash_updates=[update]))
    assert r.hgetall(KEYS.memory) == {b"chunk:1": b"beta"}


def test_hash_updates_stay_inside_the_stream(store: StateStore, leases: LeaseManager) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    for key in ("sinkstream:{other}:memory", KEYS.state, KEYS.meta):
        with pytest.raises(ValueError):
            store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"s",
                                       hash_updates=[HashUpdate(key, {"a": 1})]))
    assert store.load(SID) is None


def test_stale_fence_is_refused_and_counted(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    old = leases.acquire(SID, "w1", 0.05)
    assert old is not None
    time.sleep(0.1)
    new = leases.acquire(SID, "w2", 30)
    assert new is not None and new.token > old.token and new.took_over
    with pytest.raises(StaleCommitError) as info:
        store.commit(CommitRequest(SID, old.token, 0, "1-1", state=b"stale",
                                   outputs=[{"text": "stale summary"}]))
    err = info.value
    assert err.reason == "stale_fence" and err.current_fence == new.token
    assert err.stream_id == SID and "stream 'standup'" in str(err)
    assert store.load(SID) is None
    assert r.xlen(KEYS.output) == 0
    assert store.refused_commits(SID) == {"total": 1, "stale_fence": 1}
    assert r.hget(KEYS.meta, "last_refusal") == b"stale_fence"
    assert store.commit(CommitRequest(SID, new.token, 0, "1-1", state=b"fresh")).version == 1


def test_lease_lost_while_paused_refuses_commit(store: StateStore, leases: LeaseManager) -> None:
    lease = leases.acquire(SID, "w1", 0.05)
    assert lease is not None
    time.sleep(0.1)  # the worker "pauses" past its ttl; nobody else took the stream
    with pytest.raises(StaleCommitError) as info:
        store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"late"))
    assert info.value.reason == "lease_lost"
    assert store.refused_commits(SID) == {"total": 1, "lease_lost": 1}


def test_lease_of_another_worker_with_forged_token_is_refused(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    r.set(KEYS.lease, f"w1|{lease.token + 5}")  # a lease that does not carry the fence token
    with pytest.raises(StaleCommitError, match="lease_lost"):
        store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"x"))


def test_version_conflict_is_refused(store: StateStore, leases: LeaseManager) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"one"))
    with pytest.raises(StaleCommitError) as info:
        store.commit(CommitRequest(SID, lease.token, 0, "1-2", state=b"again"))
    assert info.value.reason == "version_conflict" and info.value.current_version == 1
    assert loaded(store).data == b"one"


def race(*calls: Callable[[], object]) -> list[object]:
    """Run ``calls`` in threads released together; each result or StaleCommitError, in order."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except StaleCommitError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("chunked", [False, True])
def test_two_racing_workers_only_one_commit_wins(
    redis_server: RedisServer, chunked: bool
) -> None:
    """Old holder (paused past its lease) and new holder commit at the same instant."""
    size = 4500 if chunked else 100
    for round_ in range(10):
        sid = f"race-{round_}"
        stores = [StateStore(redis_server.client(), chunk_bytes=1000) for _ in range(2)]
        mgr = LeaseManager(redis_server.client())
        old = mgr.acquire(sid, "old", 0.02)
        assert old is not None
        time.sleep(0.04)
        new = mgr.acquire(sid, "new", 30)
        assert new is not None
        old_result, new_result = race(
            partial(stores[0].commit, CommitRequest(sid, old.token, 0, "1-1", state=blob(size, 1),
                                                    outputs=[{"text": "old"}])),
            partial(stores[1].commit, CommitRequest(sid, new.token, 0, "1-1", state=blob(size, 2),
                                                    outputs=[{"text": "new"}])),
        )
        assert isinstance(old_result, StaleCommitError)
        assert not isinstance(new_result, Exception)
        got = stores[0].load(sid)
        assert got is not None and got.version == 1 and got.data == blob(size, 2)
        out = stores[0].client.xrange(StreamKeys.of(sid).output)
        assert [e[1][b"text"] for e in out] == [b"new"]


def test_same_token_concurrent_commits_apply_once(redis_server: RedisServer) -> None:
    """A retry racing the original attempt (same token, same expected version): one wins."""
    lease = LeaseManager(redis_server.client()).acquire(SID, "w1", 30)
    assert lease is not None
    stores = [StateStore(redis_server.client(), chunk_bytes=1000) for _ in range(4)]
    for v in range(5):
        results = race(*(
            partial(store.commit, CommitRequest(SID, lease.token, v, f"1-{v}", state=blob(2500, i),
                                                outputs=[{"n": i}]))
            for i, store in enumerate(stores)
        ))
        assert sum(not isinstance(x, Exception) for x in results) == 1
    client = redis_server.client()
    assert client.xlen(KEYS.output) == 5
    assert loaded(stores[0]).version == 5
    assert len(chunk_keys(client)) == 3  # only the live generation's chunks remain
    assert client.zcard(KEYS.state_pending) == 0


# ----- outputs, dead letters, input trimming, summary ------------------------------------------
def test_outputs_dead_letters_and_trim_are_atomic_with_commit(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    ids = [r.xadd(KEYS.input, {"text": f"t{i}"}).decode() for i in range(5)]
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    res = store.commit(
        CommitRequest(SID, lease.token, 0, ids[2], state=b"s",
                      outputs=[{"kind": "rolling", "text": "summary one", "covers": ids[2]}],
                      dead_letters=[{"entry": ids[1], "reason": "missing text"}],
                      summary={"text": "summary one", "covers": ids[2]},
                      meta_fields={"last_summary_ms": 123}, trim_input=True),
    )
    out = r.xrange(KEYS.output)
    assert [e[0].decode() for e in out] == res.output_ids
    assert out[0][1] == {b"kind": b"rolling", b"text": b"summary one", b"covers": ids[2].encode()}
    assert [e[0].decode() for e in r.xrange(KEYS.dead)] == res.dead_letter_ids
    assert [e[0].decode() for e in r.xrange(KEYS.input)] == ids[3:]
    assert r.hgetall(KEYS.summary) == {b"text": b"summary one", b"covers": ids[2].encode()}
    assert r.hget(KEYS.meta, "last_summary_ms") == b"123"

    # refused: nothing of it happens
    with pytest.raises(StaleCommitError):
        store.commit(CommitRequest(SID, lease.token, 0, ids[4], state=b"s2",
                                   outputs=[{"text": "dup"}], dead_letters=[{"reason": "x"}],
                                   summary={"text": "dup"}, trim_input=True))
    assert r.xlen(KEYS.output) == 1 and r.xlen(KEYS.dead) == 1 and r.xlen(KEYS.input) == 2
    assert r.hget(KEYS.summary, "text") == b"summary one"


def test_output_maxlen_caps_the_output_stream(store: StateStore, leases: LeaseManager,
                                              r: redis.Redis) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    for v in range(300):
        store.commit(CommitRequest(SID, lease.token, v, f"1-{v}", state=b"s", outputs=[{"n": v}],
                                   output_maxlen=10))
    assert r.xlen(KEYS.output) < 300


def test_keep_mode_advances_position_without_rewriting_state(
    store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    with pytest.raises(CommitError) as info:
        store.commit(CommitRequest(SID, lease.token, 0, "1-1"))
    assert info.value.reason == "no_state" and not isinstance(info.value, StaleCommitError)
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=blob(3000, 7)))
    res = store.commit(CommitRequest(SID, lease.token, 1, "1-9", dead_letters=[{"reason": "bad"}]))
    got = loaded(store)
    assert res.version == 2 and got.data == blob(3000, 7) and got.last_entry_id == "1-9"


def test_wrong_key_type_is_an_error_with_no_partial_write(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    r.set(KEYS.output, "not a stream")
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    with pytest.raises(CommitError) as info:
        store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"s",
                                   dead_letters=[{"reason": "x"}]))
    assert info.value.reason == "wrong_type"
    assert store.version(SID) == 0 and r.xlen(KEYS.dead) == 0


# ----- the head and the request --------------------------------------------------------------
def test_head_reads_what_the_commit_needs_in_one_round_trip(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    assert store.head(SID) == StateHead(version=0, segments={})
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=blob(2500, 1)))
    orphan = store.staging.write_chunks(KEYS, 2, blob(4000, 2))  # a crashed attempt
    generation = r.hget(KEYS.state, "generation")
    assert isinstance(generation, bytes)
    head = store.head(SID)
    assert (head.version, head.generation, head.last_entry_id, head.pending, head.segments) == (
        1, generation.decode(), "1-1", (orphan.generation,), {})

    # committing from that head: no HMGET/ZRANGE of its own, and the previous generation and
    # the orphans it lists are deleted as before
    r.config_resetstat()
    store.commit(CommitRequest(SID, lease.token, 1, "1-2", state=blob(1500, 3), head=head))
    stats = r.info("commandstats")
    assert "cmdstat_hmget" not in stats and "cmdstat_zrange" not in stats
    assert len(chunk_keys(r)) == 2 and r.zcard(KEYS.state_pending) == 0
    assert loaded(store).data == blob(1500, 3)

    # a head of another version than the expected one is read again, not trusted
    store.commit(CommitRequest(SID, lease.token, 2, "1-3", state=b"small", head=head))
    assert loaded(store).data == b"small" and chunk_keys(r) == set()


def test_a_stale_batch_head_is_refused_and_deletes_nothing(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=blob(2500, 1)))
    head = store.head(SID)
    store.commit(CommitRequest(SID, lease.token, 1, "1-2", state=blob(3500, 2)))  # moved on
    live = chunk_keys(r)
    stale = StateHead(2, {}, head.generation)  # the right version, a replaced generation
    with pytest.raises(StaleCommitError) as info:
        store.commit(CommitRequest(SID, lease.token, 2, "1-3", state=blob(2500, 3), head=stale))
    assert info.value.reason == "version_conflict"
    assert chunk_keys(r) == live and loaded(store).data == blob(3500, 2)


def test_cmsgpack_round_trips_binary_strings(r: redis.Redis) -> None:
    """The commit request travels as msgpack raw strings: Redis's cmsgpack reads them back
    byte for byte, including bytes that are not UTF-8."""
    values = [bytes(range(256)), b"\xff\xfe\xc3\x28", b"", "h\u00e9llo".encode(), bytes(70_000)]
    packed = msgpack.packb({"v": values}, use_bin_type=False)
    echoed = r.eval("return cmsgpack.unpack(ARGV[1]).v", 0, packed)
    assert echoed == values


def test_binary_and_number_fields_are_stored_as_redis_py_would(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    raw = bytes(range(256)) + b"\xc3\x28"
    res = store.commit(CommitRequest(
        SID, lease.token, 0, "1-1", state=raw,
        state_fields={"blob": raw, "n": 2**40 + 3, "f": 1712345678.123, "s": "h\u00e9"},
        meta_fields={"ts": 0.1}, outputs=[{"text": raw, "n": -5}], summary={"covers": raw},
        hash_updates=[HashUpdate(KEYS.memory, {"vec:0": raw})]))
    assert r.hmget(KEYS.state, ["data", "blob", "n", "f", "s", "nbytes"]) == [
        raw, raw, b"1099511627779", b"1712345678.123", "h\u00e9".encode(), b"258"]
    assert r.hget(KEYS.meta, "ts") == b"0.1"
    [(entry_id, fields)] = r.xrange(KEYS.output)
    assert entry_id.decode() == res.output_ids[0] and fields == {b"text": raw, b"n": b"-5"}
    assert r.hgetall(KEYS.summary) == {b"covers": raw}
    assert r.hgetall(KEYS.memory) == {b"vec:0": raw}


# ----- meta counts -----------------------------------------------------------------------------
def test_meta_counts_add_up_across_commits_and_a_refused_one_adds_nothing(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    """``entries_applied`` (``sinkstream streams``) grows with each commit, atomically."""
    ids = [r.xadd(KEYS.input, {"text": f"t{i}"}).decode() for i in range(5)]
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, ids[2], state=b"s",
                               meta_counts={"entries_applied": 3}, trim_input=True))
    store.commit(CommitRequest(SID, lease.token, 1, ids[4], state=b"s2",
                               meta_counts={"entries_applied": 2}, trim_input=True))
    assert r.hget(KEYS.meta, "entries_applied") == b"5"
    assert r.xlen(KEYS.input) == 0  # trimmed: the count is all that is left of them
    r.delete(KEYS.lease)  # the lease lapsed and another worker took the stream
    assert leases.acquire(SID, "w2", 30) is not None
    with pytest.raises(StaleCommitError):  # the zombie's commit counts nothing
        store.commit(CommitRequest(SID, lease.token, 2, ids[4], state=b"s3",
                                   meta_counts={"entries_applied": 7}))
    assert r.hget(KEYS.meta, "entries_applied") == b"5"
    with pytest.raises(ValueError, match="must be an int"):
        store.commit(CommitRequest(SID, lease.token, 2, ids[4],
                                   meta_counts={"entries_applied": 1.5}))  # type: ignore[dict-item]
