"""StateStore on a real redis-server: fenced exactly-once commits, chunking, durability."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial

import msgpack
import pytest
import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.codec import StateEnvelope, decode_state, encode_state
from state_store.lease import LeaseManager
from state_store.staging import ChunkSet, SegmentPlan, plan_segments
from state_store.store import (
    CommitError,
    CommitRequest,
    HashUpdate,
    SegmentUpdate,
    StaleCommitError,
    StateHead,
    StateReadError,
    StateStore,
    StoredState,
)
from state_store.tensors import RawTensor, StateSnapshot
from tests.redis_server import RedisServer

SID = "standup"
KEYS = StreamKeys.of(SID)


@pytest.fixture
def store(r: redis.Redis) -> StateStore:
    return StateStore(r, chunk_bytes=1000)


@pytest.fixture
def leases(r: redis.Redis) -> LeaseManager:
    return LeaseManager(r)


def blob(n: int, fill: int) -> bytes:
    return bytes([fill % 256]) * n


def state_keys(r: redis.Redis) -> set[bytes]:
    return {k for k in r.scan_iter(match=KEYS.tag.replace("{", "\\{").replace("}", "\\}") + ":*")}


def chunk_keys(r: redis.Redis) -> set[bytes]:
    return {k for k in state_keys(r) if k.count(b":") == 4 and b":state:" in k
            and not k.endswith(b":pending")}


def loaded(store: StateStore) -> StoredState:
    got = store.load(SID)
    assert got is not None
    return got


# ----- basics ----------------------------------------------------------------------------------
def test_refuses_decoding_clients(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="decode_responses"):
        StateStore(redis_server.client(decode_responses=True))


def test_empty_stream_has_no_state(store: StateStore) -> None:
    assert store.load(SID) is None
    assert store.info(SID) is None
    assert store.version(SID) == 0


def test_commit_with_current_fence_bumps_version(store: StateStore, leases: LeaseManager) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    res = store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"state-1",
                                     state_fields={"tokens_seen": 7}))
    assert res.version == 1 and res.chunks == 0
    got = loaded(store)
    assert (got.version, got.fence, got.last_entry_id, got.data) == (1, lease.token, "1-1",
                                                                     b"state-1")
    assert got.fields["tokens_seen"] == b"7"
    res = store.commit(CommitRequest(SID, lease.token, 1, "1-2", state=b"state-2"))
    assert res.version == 2 and store.version(SID) == 2
    info = store.info(SID)
    assert info is not None and info.nbytes == 7 and info.last_entry_id == "1-2"
    assert info.committed_ms > 1_600_000_000_000
    assert store.refused_commits(SID) == {}


def test_real_envelope_round_trips_through_redis(store: StateStore, leases: LeaseManager) -> None:
    tensor = RawTensor("bfloat16", (3, 700), bytes(range(256)) * 16 + bytes(104))
    env = StateEnvelope("sinkkv", "f" * 64, {"sink_tokens": 4}, 99, "5-0",
                        StateSnapshot({"k": tensor}, {"pending": [1, 2]}))
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    res = store.commit(CommitRequest(SID, lease.token, 0, "5-0", state=encode_state(env)))
    assert res.chunks == 5  # 4200+ bytes in 1000-byte chunks
    assert decode_state(loaded(store).data, stream_id=SID) == env


def test_invalid_arguments_are_refused_before_redis(store: StateStore) -> None:
    with pytest.raises(ValueError, match="store-owned"):
        store.commit(CommitRequest(SID, 1, 0, "1-1", state=b"x", state_fields={"version": 9}))
    with pytest.raises(ValueError, match="entry id"):
        store.commit(CommitRequest(SID, 1, 0, "nope", state=b"x"))
    with pytest.raises(ValueError, match="fence must be a positive int"):
        store.commit(CommitRequest(SID, 0, 0, "1-1", state=b"x"))
    with pytest.raises(ValueError, match="fields"):
        store.commit(CommitRequest(SID, 1, 0, "1-1", state=b"x", outputs=[{}]))
    with pytest.raises(ValueError, match="trim_input"):
        store.commit(CommitRequest(SID, 1, 0, None, state=b"x", trim_input=True))
    with pytest.raises(ValueError, match="invalid stream id"):
        store.commit(CommitRequest("a}b", 1, 0, "1-1", state=b"x"))


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


# ----- chunking --------------------------------------------------------------------------------
def test_chunked_round_trip_and_previous_chunks_deleted(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    first = bytes(range(256)) * 20  # 5120 bytes -> 6 chunks
    assert store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=first)).chunks == 6
    v1_chunks = chunk_keys(r)
    assert len(v1_chunks) == 6 and all(b":state:1." in k for k in v1_chunks)
    assert all(r.pttl(k) == -1 for k in v1_chunks)  # the commit made them permanent
    assert loaded(store).data == first

    second = blob(2500, 9)
    assert store.commit(CommitRequest(SID, lease.token, 1, "1-2", state=second)).chunks == 3
    v2_chunks = chunk_keys(r)
    assert len(v2_chunks) == 3 and not (v1_chunks & v2_chunks)
    assert loaded(store).data == second

    assert store.commit(CommitRequest(SID, lease.token, 2, "1-3", state=b"small again")).chunks == 0
    assert chunk_keys(r) == set()
    assert loaded(store).data == b"small again" and loaded(store).chunks == 0


def test_orphan_chunks_are_removed_by_the_next_commit(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=blob(2500, 1)))
    live = chunk_keys(r)
    store.staging.write_chunks(KEYS, 2, blob(4000, 2))  # a worker crashed before its commit
    orphans = chunk_keys(r) - live
    assert len(orphans) == 4 and all(0 < r.pttl(k) <= 3_600_000 for k in orphans)
    assert loaded(store).data == blob(2500, 1)  # invisible to readers
    store.commit(CommitRequest(SID, lease.token, 1, "1-2", state=blob(1500, 3)))
    assert len(chunk_keys(r)) == 2 and not (chunk_keys(r) & (orphans | live))
    assert r.zcard(KEYS.state_pending) == 0


def test_cleanup_orphans_spares_young_and_committed_sets(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=blob(2500, 1)))
    live = chunk_keys(r)
    store.staging.write_chunks(KEYS, 2, blob(4000, 2))
    assert store.cleanup_orphans(SID, min_age_s=600) == 0  # too young: maybe a write in progress
    assert store.cleanup_orphans(SID, min_age_s=0) == 1
    assert chunk_keys(r) == live and loaded(store).data == blob(2500, 1)
    # a live generation that is (wrongly) still listed as pending is never deleted
    generation = r.hget(KEYS.state, "generation")
    assert generation is not None
    r.zadd(KEYS.state_pending, {generation: 0})
    assert store.cleanup_orphans(SID, min_age_s=0) == 0
    assert chunk_keys(r) == live


def test_orphan_chunks_expire_on_their_own(r: redis.Redis) -> None:
    store = StateStore(r, chunk_bytes=1000, orphan_ttl_s=0.05)
    store.staging.write_chunks(KEYS, 1, blob(3000, 1))
    assert len(chunk_keys(r)) == 3
    time.sleep(0.15)
    assert chunk_keys(r) == set()


def test_refused_chunked_commit_leaves_no_chunks(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    with pytest.raises(StaleCommitError):
        store.commit(CommitRequest(SID, lease.token + 1, 0, "1-1", state=blob(5000, 1)))
    assert chunk_keys(r) == set() and r.zcard(KEYS.state_pending) == 0


def test_missing_chunk_refuses_commit(
    r: redis.Redis, store: StateStore, leases: LeaseManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_chunks = store.staging.write_chunks

    def losing(keys: StreamKeys, version: int, data: bytes) -> ChunkSet:
        chunks = write_chunks(keys, version, data)
        r.delete(chunks.keys(keys)[1])  # expired before the commit
        return chunks

    monkeypatch.setattr(store.staging, "write_chunks", losing)
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    with pytest.raises(CommitError) as info:
        store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=blob(3000, 1)))
    assert info.value.reason == "chunks_missing"
    assert StateStore(r).version(SID) == 0


def test_loads_stay_consistent_while_commits_replace_chunks(redis_server: RedisServer) -> None:
    client = redis_server.client()
    mgr = LeaseManager(client)
    lease = mgr.acquire(SID, "writer", 60)
    assert lease is not None
    writer = StateStore(client, chunk_bytes=1000)
    writer.commit(CommitRequest(SID, lease.token, 0, "1-0", state=blob(6000, 0)))
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            v = 1
            while not stop.is_set():
                writer.commit(CommitRequest(SID, lease.token, v, f"1-{v}",
                                            state=blob(6000 + 1000 * (v % 3), v)))
                v += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    reader = StateStore(redis_server.client(), chunk_bytes=1000)
    try:
        for _ in range(300):
            got = reader.load(SID)
            assert got is not None
            v = got.version - 1
            assert got.data == blob(6000 + 1000 * (v % 3), v), f"torn read at version {v + 1}"
    finally:
        stop.set()
        thread.join()
    assert not errors


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


# ----- failures --------------------------------------------------------------------------------
def test_mark_failed_and_clear(store: StateStore) -> None:
    assert store.failure(SID) is None
    store.mark_failed(SID, "state checksum mismatch")
    failure = store.failure(SID)
    assert failure is not None and failure.reason == "state checksum mismatch"
    assert failure.failed_at > 1_600_000_000
    assert store.clear_failure(SID) is True
    assert store.failure(SID) is None and store.clear_failure(SID) is False


# ----- durability ------------------------------------------------------------------------------
def test_committed_state_and_fence_survive_a_hard_restart(redis_aof_server: RedisServer) -> None:
    client = redis_aof_server.client()
    store, mgr = StateStore(client, chunk_bytes=1000), LeaseManager(client)
    lease = mgr.acquire(SID, "w1", 60)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=blob(100, 1)))
    store.commit(CommitRequest(SID, lease.token, 1, "1-2", state=blob(3500, 2),
                               outputs=[{"text": "s"}]))
    redis_aof_server.restart(hard=True)

    client = redis_aof_server.client()
    store, mgr = StateStore(client, chunk_bytes=1000), LeaseManager(client)
    got = store.load(SID)
    assert got is not None
    assert (got.version, got.fence, got.last_entry_id, got.data) == (2, lease.token, "1-2",
                                                                     blob(3500, 2))
    assert mgr.current_token(SID) == lease.token
    assert client.xlen(KEYS.output) == 1
    # the fence still works after the restart, and new tokens keep increasing
    assert store.commit(CommitRequest(SID, lease.token, 2, "1-3", state=b"x")).version == 3
    client.delete(KEYS.lease)
    newer = mgr.acquire(SID, "w2", 60)
    assert newer is not None and newer.token == lease.token + 1
    with pytest.raises(StaleCommitError):
        store.commit(CommitRequest(SID, lease.token, 3, "1-4", state=b"y"))


# ----- segmented states (state_layout = "segments") --------------------------------------------
def segment_keys(r: redis.Redis) -> set[bytes]:
    return {k for k in state_keys(r) if b":segment:" in k}


def segment_ids(r: redis.Redis) -> set[int]:
    return {int(k.rsplit(b":", 1)[1].split(b".")[0]) for k in segment_keys(r)}


def test_segments_write_only_new_ones_and_delete_evicted_in_the_commit(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    first = {0: blob(300, 0), 1: blob(300, 1), 2: blob(300, 2)}
    res = store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"header-1",
                                     segments=SegmentUpdate(keep=[0, 1, 2], write=first)))
    assert res.segment_bytes == 900 and res.chunks == 0
    v1 = segment_keys(r)
    assert segment_ids(r) == {0, 1, 2} and all(r.pttl(k) == -1 for k in v1)  # made permanent
    assert r.zcard(KEYS.state_pending) == 0
    got = loaded(store)
    assert got.data == b"header-1" and got.segments == first
    assert store.head(SID).segment_ids == [0, 1, 2]

    # the window moves: segment 1 evicted, 3 new; 0 and 2 are neither rewritten nor read
    res = store.commit(CommitRequest(
        SID, lease.token, 1, "1-2", state=b"header-2",
        segments=SegmentUpdate(keep=[0, 2, 3], write={3: blob(300, 3)})))
    assert res.segment_bytes == 300
    v2 = segment_keys(r)
    assert segment_ids(r) == {0, 2, 3} and len(v1 & v2) == 2
    again = store.load(SID, store.head(SID))  # hash + segments in one round trip
    assert again is not None and again.data == b"header-2"
    assert again.segments == {0: blob(300, 0), 2: blob(300, 2), 3: blob(300, 3)}
    info = store.info(SID)
    assert info is not None and info.segments == 3 and info.nbytes == len(b"header-2") + 900
    assert "segments" not in info.fields  # store-owned, not a caller field

    # a batch of dead letters only keeps the state, segments included
    store.commit(CommitRequest(SID, lease.token, 2, "1-3"))
    assert segment_ids(r) == {0, 2, 3} and loaded(store).segments == again.segments


def test_segmented_header_can_be_chunked(r: redis.Redis, store: StateStore,
                                         leases: LeaseManager) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    res = store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=blob(2500, 7),
                                     segments=SegmentUpdate(keep=[4], write={4: blob(10, 4)})))
    assert res.chunks == 3
    got = loaded(store)
    assert got.data == blob(2500, 7) and got.segments == {4: blob(10, 4)}


def test_layout_switch_whole_to_segments_and_back(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=blob(2500, 1)))  # whole, chunked
    assert len(chunk_keys(r)) == 3
    store.commit(CommitRequest(SID, lease.token, 1, "1-2", state=b"hdr",
                               segments=SegmentUpdate(keep=[0, 1], write={0: b"s0", 1: b"s1"})))
    assert chunk_keys(r) == set() and segment_ids(r) == {0, 1}
    assert loaded(store).segments == {0: b"s0", 1: b"s1"}
    # no segments: the whole layout
    store.commit(CommitRequest(SID, lease.token, 2, "1-3", state=b"whole again"))
    assert segment_keys(r) == set() and r.hget(KEYS.state, "segments") is None
    got = loaded(store)
    assert got.data == b"whole again" and got.segments == {}
    # and segmented again: every segment is written anew
    with pytest.raises(CommitError) as info:
        store.commit(CommitRequest(SID, lease.token, 3, "1-4", state=b"hdr",
                                   segments=SegmentUpdate(keep=[0, 1], write={1: b"x"})))
    assert info.value.reason == "segments_missing"
    assert store.version(SID) == 3 and segment_keys(r) == set()
    store.commit(CommitRequest(SID, lease.token, 3, "1-4", state=b"hdr",
                               segments=SegmentUpdate(keep=[0, 1], write={0: b"a", 1: b"b"})))
    assert loaded(store).segments == {0: b"a", 1: b"b"}


def test_refused_segmented_commit_leaves_nothing(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"hdr",
                               segments=SegmentUpdate(keep=[0, 1], write={0: b"s0", 1: b"s1"})))
    before = segment_keys(r)
    for token, version in ((lease.token + 1, 1), (lease.token, 0)):  # stale fence, old version
        with pytest.raises(StaleCommitError):
            store.commit(CommitRequest(SID, token, version, "1-2", state=b"hdr2",
                                       segments=SegmentUpdate(keep=[0, 2], write={2: b"s2"})))
    assert segment_keys(r) == before and r.zcard(KEYS.state_pending) == 0
    assert loaded(store).segments == {0: b"s0", 1: b"s1"}


@pytest.mark.parametrize("batch_head", [True, False])
def test_segments_field_changed_behind_the_caller_is_a_version_conflict(
    r: redis.Redis, store: StateStore, leases: LeaseManager, monkeypatch: pytest.MonkeyPatch,
    batch_head: bool,
) -> None:
    """The head is read (at the start of the batch, or by the commit itself), then someone
    swaps the segments field before the script runs."""
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"hdr",
                               segments=SegmentUpdate(keep=[0], write={0: b"s0"})))
    head = None
    if batch_head:
        head = store.head(SID)
        r.hset(KEYS.state, "segments", "0.abcdef")
    else:
        read_head = store.reads.head

        def racing(stream_id: str) -> StateHead:
            got = read_head(stream_id)
            r.hset(KEYS.state, "segments", "0.abcdef")
            return got

        monkeypatch.setattr(store.reads, "head", racing)
    with pytest.raises(StaleCommitError) as info:
        store.commit(CommitRequest(SID, lease.token, 1, "1-2", state=b"hdr2", head=head,
                                   segments=SegmentUpdate(keep=[0, 1], write={1: b"s1"})))
    assert info.value.reason == "version_conflict"
    assert segment_ids(r) == {0} and r.zcard(KEYS.state_pending) == 0


def test_orphan_segments_are_removed_by_the_next_commit_or_cleanup(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"hdr",
                               segments=SegmentUpdate(keep=[0, 1], write={0: b"s0", 1: b"s1"})))

    def crash_after_staging(segs: dict[int, bytes]) -> set[bytes]:
        """A worker that staged its segments, then died before its commit script."""
        live = segment_keys(r)
        head = store.head(SID)
        plan = plan_segments(KEYS, head.segments,
                             SegmentUpdate(keep=[*head.segment_ids, *segs], write=segs))
        store.staging.write_segments(KEYS, plan)
        return segment_keys(r) - live

    orphans = crash_after_staging({2: b"s2", 3: b"s3"})
    assert len(orphans) == 2 and all(0 < r.pttl(k) <= 3_600_000 for k in orphans)
    assert loaded(store).segments == {0: b"s0", 1: b"s1"}  # invisible to readers
    store.commit(CommitRequest(SID, lease.token, 1, "1-2", state=b"hdr2",
                               segments=SegmentUpdate(keep=[1, 2], write={2: b"t2"})))
    assert not (segment_keys(r) & orphans) and segment_ids(r) == {1, 2}
    assert r.zcard(KEYS.state_pending) == 0

    orphans = crash_after_staging({5: b"s5"})
    assert store.cleanup_orphans(SID, min_age_s=600) == 0  # too young: maybe a write in progress
    assert store.cleanup_orphans(SID, min_age_s=0) == 1
    assert not (segment_keys(r) & orphans) and segment_ids(r) == {1, 2}
    assert loaded(store).segments == {1: b"s1", 2: b"t2"}


def test_orphan_segments_expire_on_their_own(r: redis.Redis) -> None:
    store = StateStore(r, orphan_ttl_s=0.05)
    store.staging.write_segments(KEYS, plan_segments(KEYS, {}, SegmentUpdate([0, 1], {0: b"a",
                                                                                   1: b"b"})))
    assert segment_ids(r) == {0, 1}
    time.sleep(0.15)
    assert segment_keys(r) == set()


def test_expired_staged_segment_refuses_the_commit(
    r: redis.Redis, leases: LeaseManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(r)
    write_segments = store.staging.write_segments

    def losing(keys: StreamKeys, plan: SegmentPlan) -> None:
        write_segments(keys, plan)
        r.delete(next(iter(plan.write)))  # expired before the commit

    monkeypatch.setattr(store.staging, "write_segments", losing)
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    with pytest.raises(CommitError) as info:
        store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"hdr",
                                   segments=SegmentUpdate(keep=[0, 1], write={0: b"a", 1: b"b"})))
    assert info.value.reason == "segments_missing"
    assert StateStore(r).version(SID) == 0 and segment_keys(r) == set()
    assert r.zcard(KEYS.state_pending) == 0


def test_missing_segment_is_refused_by_name(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"hdr",
                               segments=SegmentUpdate(keep=[0, 7], write={0: b"a", 7: b"b"})))
    [key] = [k for k in segment_keys(r) if b":segment:7." in k]
    r.delete(key)
    for head in (None, store.head(SID)):
        with pytest.raises(StateReadError, match=r"stream 'standup': segment 7 of state "
                                                 r"version 1 is missing"):
            store.load(SID, head)
    r.set(key, b"bb")  # there, but not the size the commit recorded
    with pytest.raises(StateReadError, match=r"stream 'standup': state is 6 bytes, the hash "
                                             r"says 5"):
        store.load(SID)
    r.hset(KEYS.state, "segments", "0.zz.1")
    with pytest.raises(StateReadError, match=r"stream 'standup': bad segments field entry"):
        store.load(SID)


def test_segment_arguments_are_checked(store: StateStore) -> None:
    with pytest.raises(ValueError, match="header"):
        store.commit(CommitRequest(SID, 1, 0, "1-1",
                                   segments=SegmentUpdate(keep=[0], write={0: b"a"})))
    with pytest.raises(ValueError, match="outside keep"):
        store.commit(CommitRequest(SID, 1, 0, "1-1", state=b"h",
                                   segments=SegmentUpdate(keep=[0], write={1: b"a"})))
    with pytest.raises(ValueError, match="twice"):
        store.commit(CommitRequest(SID, 1, 0, "1-1", state=b"h",
                                   segments=SegmentUpdate(keep=[0, 0])))
    with pytest.raises(ValueError, match="segment ids"):
        store.commit(CommitRequest(SID, 1, 0, "1-1", state=b"h", segments=SegmentUpdate(keep=[-1])))


def test_segments_work_with_hash_updates(
    r: redis.Redis, store: StateStore, leases: LeaseManager
) -> None:
    lease = leases.acquire(SID, "w1", 30)
    assert lease is not None
    store.commit(CommitRequest(SID, lease.token, 0, "1-1", state=b"hdr",
                               segments=SegmentUpdate(keep=[0], write={0: b"a"}),
                               hash_updates=[HashUpdate(KEYS.memory, {"chunk:0": b"alpha"})]))
    assert r.hgetall(KEYS.memory) == {b"chunk:0": b"alpha"}
    assert loaded(store).segments == {0: b"a"}


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
