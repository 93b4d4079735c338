"""Shared by the StateStore tests (``test_store``, ``test_commit``, ``test_staging``,
``test_segments``): the stream they commit to, the store and lease fixtures, and readers of the
keys a commit left in Redis."""

from __future__ import annotations

import pytest
import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.lease import LeaseManager
from state_store.store import StateStore, StoredState

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
