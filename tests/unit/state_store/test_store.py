"""StateStore on a real redis-server: its basics, failure marks, and durability across a hard
restart.

The rest of the store has modules of its own: fenced commits and their side data in
``test_commit.py``, chunked states in ``test_staging.py``, segmented states in
``test_segments.py`` (shared fixtures and helpers: ``conftest.py``)."""

from __future__ import annotations

import pytest

from sinkstream.contracts.keys import StreamKeys
from state_store.codec import StateEnvelope, decode_state, encode_state
from state_store.lease import LeaseManager
from state_store.store import CommitRequest, StaleCommitError, StateStore
from state_store.tensors import RawTensor, StateSnapshot
from tests.redis_server import RedisServer
from tests.unit.state_store.conftest import KEYS, SID, blob, loaded


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
def test_a_deferral_holds_at_the_version_it_was_marked_at(store: StateStore) -> None:
    from state_store.health import Deferral
    from state_store.replies import text_fields

    store.mark_deferred(SID, 4, "state is format version 3, newer than this build reads")

    def deferral(version: int) -> Deferral | None:
        return Deferral.of(text_fields(store.client.hgetall(StreamKeys.of(SID).meta)),
                           version)

    held = deferral(4)
    assert held is not None and held.reason.startswith("state is format version 3")
    assert held.deferred_at > 0
    assert deferral(5) is None  # a commit since: an upgraded worker carried it on
    assert store.failure(SID) is None  # deferred is not parked


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
