"""Chunked states (``state_store/staging.py``) on a real redis-server: chunks staged before the
commit, the replaced generation and orphans of crashed attempts deleted, and loads that never
see a torn state while commits replace the chunks."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.lease import LeaseManager
from state_store.staging import ChunkSet
from state_store.store import CommitError, CommitRequest, StaleCommitError, StateStore
from tests.redis_server import RedisServer
from tests.unit.state_store.conftest import KEYS, SID, blob, chunk_keys, loaded


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
