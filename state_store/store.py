"""Per-stream engine states in Redis, committed exactly once under a fencing token.

One stream's state lives in the ``state`` hash::

    version         commits so far (0 / absent: no state yet); +1 on every successful commit
    fence           the fencing token of the commit that wrote it
    last_entry_id   id of the last input entry folded into the state
    data            the encoded state, when it fits in one value ("inline"), else
    generation      "<version>.<nonce>.<count>" naming the chunk keys that hold it
    chunks          number of chunks (absent when inline)
    nbytes          encoded size (segmented states: header plus every segment)
    committed_ms    Redis server time of the commit
    segments        segmented states only: "<id>.<nonce>.<nbytes> ..." naming the segment
                    keys (``<id>.<nonce>``) and their sizes
    + caller fields (``CommitRequest.state_fields``: tokens seen, engine, model ... for
      ``sinkstream status``)

:class:`StateStore` is the facade the rest of sinkstream uses; each concern is its own module:

- :mod:`state_store.reads`: ``head`` (version, segment names, generation, last entry id and
  pending sets in one round trip), ``info`` and ``load``;
- :mod:`state_store.commit`: the fenced commit of a :class:`CommitRequest` (one Lua script,
  ``lua/state_commit.lua``), and :mod:`state_store.replication` for WAIT;
- :mod:`state_store.staging`: chunks and segments written before a commit, their names, and
  ``cleanup_orphans``;
- :mod:`state_store.health`: failed streams and refused-commit counters.

Segmented states (sink-KV with ``state_layout = "segments"``, see
``workers/engines/sinkkv/segments.py``): ``data``/chunks hold a small header (the envelope
with the window's segment ids) and the window's K/V lives in immutable segment keys. A commit
passes a :class:`SegmentUpdate`: the ids of the new window and the bytes of the segments not
stored yet; Redis traffic per batch is the new tokens plus the header. A commit without
segments (the whole layout) deletes any stored segments: switching layouts is just the next
commit. ``load(head=...)`` reads the hash and every segment in one pipelined round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis

from state_store.commit import (
    CommitError,
    CommitRequest,
    CommitResult,
    Committer,
    FieldValue,
    HashUpdate,
    StaleCommitError,
)
from state_store.health import Failure, StreamHealth
from state_store.reads import (
    RESERVED_FIELDS,
    StateHead,
    StateInfo,
    StateReader,
    StateReadError,
    StoredState,
)
from state_store.replication import ReplicaWait
from state_store.staging import SegmentUpdate, Staging

if TYPE_CHECKING:
    from sinkstream.settings import Settings

__all__ = [
    "RESERVED_FIELDS",
    "CommitError",
    "CommitRequest",
    "CommitResult",
    "Failure",
    "FieldValue",
    "HashUpdate",
    "SegmentUpdate",
    "StaleCommitError",
    "StateHead",
    "StateInfo",
    "StateReadError",
    "StateStore",
    "StoredState",
]


class StateStore:
    """Load and commit stream states through a bytes-mode client (``decode_responses=False``).

    ``reads``, ``staging``, ``committer`` and ``health`` are the parts it is made of.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        chunk_bytes: int = 4 * 1024 * 1024,
        orphan_ttl_s: float = 3600.0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        if _decodes_responses(client):
            raise ValueError("StateStore needs a redis client with decode_responses=False")
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        self.client = client
        self.chunk_bytes = chunk_bytes
        self.reads = StateReader(client)
        self.staging = Staging(client, chunk_bytes=chunk_bytes,
                               orphan_ttl_ms=max(1, int(orphan_ttl_s * 1000)))
        #: WAIT for ``wait_replicas`` replicas after every commit (0 = off)
        self.replication = ReplicaWait(client, wait_replicas, wait_timeout_ms)
        self.committer = Committer(client, self.reads, self.staging, self.replication)
        self.health = StreamHealth(client)

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> StateStore:
        return cls(client, chunk_bytes=settings.state_chunk_bytes,
                   wait_replicas=settings.redis_wait_replicas,
                   wait_timeout_ms=settings.redis_wait_timeout_ms)

    @property
    def unreplicated_commits(self) -> int:
        """Commits that fewer than ``wait_replicas`` replicas acknowledged in time."""
        return self.replication.unreplicated

    # ----- reading (state_store.reads) ---------------------------------------------------------
    def version(self, stream_id: str) -> int:
        """The committed version (0 = no state): one HGET."""
        return self.reads.version(stream_id)

    def head(self, stream_id: str) -> StateHead:
        """Version, segment names, generation, last entry id and pending sets: one round trip.
        Pass it to :meth:`load` and as ``CommitRequest.head``."""
        return self.reads.head(stream_id)

    def info(self, stream_id: str) -> StateInfo | None:
        """Everything about the stored state but its bytes; None if nothing was committed."""
        return self.reads.info(stream_id)

    def load(self, stream_id: str, head: StateHead | None = None) -> StoredState | None:
        """The committed state with its bytes, or None if the stream has none yet."""
        return self.reads.load(stream_id, head)

    # ----- committing (state_store.commit, state_store.staging) --------------------------------
    def commit(self, request: CommitRequest) -> CommitResult:
        """Atomically apply one batch, or raise and change nothing (:meth:`Committer.commit`)."""
        return self.committer.commit(request)

    def cleanup_orphans(self, stream_id: str, min_age_s: float = 600.0) -> int:
        """Delete uncommitted chunk and segment sets older than ``min_age_s``; how many."""
        return self.staging.cleanup_orphans(stream_id, min_age_s)

    # ----- health (state_store.health) ---------------------------------------------------------
    def mark_failed(self, stream_id: str, reason: str) -> None:
        """Park a stream (e.g. corrupt or foreign state); ``sinkstream status`` shows why."""
        self.health.mark_failed(stream_id, reason)

    def mark_deferred(self, stream_id: str, version: int, reason: str) -> None:
        """Note a stream left to an upgraded worker at committed ``version`` (shown by
        ``sinkstream status`` until a commit moves the version)."""
        self.health.mark_deferred(stream_id, version, reason)

    def failure(self, stream_id: str) -> Failure | None:
        """The failure recorded by ``mark_failed``, or None if the stream is healthy."""
        return self.health.failure(stream_id)

    def clear_failure(self, stream_id: str) -> bool:
        """Mark the stream healthy again; True if it was failed."""
        return self.health.clear_failure(stream_id)

    def refused_commits(self, stream_id: str) -> dict[str, int]:
        """Refusal counters from ``meta``: {"total": n, "stale_fence": n, ...}."""
        return self.health.refused_commits(stream_id)


def _decodes_responses(client: Any) -> bool:
    try:
        return bool(client.get_encoder().decode_responses)
    except AttributeError:
        return False
