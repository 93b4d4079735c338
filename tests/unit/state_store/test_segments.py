"""Segmented states (``state_layout = "segments"``) on a real redis-server: a commit writes only
the new segments and deletes the evicted ones, layouts switch both ways, refused commits and
crashed attempts leave nothing behind, and a missing segment is refused by name."""

from __future__ import annotations

import time

import pytest
import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.lease import LeaseManager
from state_store.staging import SegmentPlan, plan_segments
from state_store.store import (
    CommitError,
    CommitRequest,
    HashUpdate,
    SegmentUpdate,
    StaleCommitError,
    StateHead,
    StateReadError,
    StateStore,
)
from tests.unit.state_store.conftest import KEYS, SID, blob, chunk_keys, loaded, state_keys


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
