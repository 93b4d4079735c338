"""Every Redis key sinkstream uses, in one place (the key schema: a contract).

All keys of one stream carry the Redis Cluster hash tag ``{<id>}`` so that a stream's input,
state, offsets and outputs live on one shard and can change together in one Lua script or
MULTI/EXEC. Stream ids are validated (``sinkstream.ids``) before they are ever interpolated
into a key.
"""

from __future__ import annotations

from dataclasses import dataclass

from sinkstream.ids import validate_stream_id

PREFIX = "sinkstream"

#: Registry of known streams: a sorted set, member = stream id, score = last activity (unix s).
STREAMS_REGISTRY = f"{PREFIX}:streams"
#: Streams with unread input that need a task; member = stream id, score = time first marked.
RUNNABLE = f"{PREFIX}:runnable"
#: String: the worker whose dispatcher currently polls the registry (with a TTL).
DISPATCHER_LEADER = f"{PREFIX}:dispatcher"
#: Live workers: a sorted set, member = ``<worker id>#<task slot>``, score = when its heartbeat
#: expires (server ms). Cross-stream batching shares the runnable streams among them.
WORKERS = f"{PREFIX}:workers"
#: Pub/sub channel (not a key): producers PUBLISH a stream id after appending to it, so the
#: leading dispatcher schedules that stream at once rather than at its next full pass.
WAKE_CHANNEL = f"{PREFIX}:wake"

@dataclass(frozen=True)
class StreamKeys:
    """The keys of one stream. Build with ``StreamKeys.of(stream_id)``, which validates."""

    stream_id: str

    @classmethod
    def of(cls, stream_id: str) -> StreamKeys:
        return cls(validate_stream_id(stream_id))

    @property
    def tag(self) -> str:
        return f"{PREFIX}:{{{self.stream_id}}}"

    @property
    def input(self) -> str:
        """Redis Stream of input entries (``text``, optional ``speaker``, ``ts``, ``eos``)."""
        return f"{self.tag}:in"

    @property
    def output(self) -> str:
        """Redis Stream of summaries and answers."""
        return f"{self.tag}:out"

    @property
    def dead(self) -> str:
        """Dead-letter stream: rejected input entries with the reason."""
        return f"{self.tag}:dead"

    @property
    def state(self) -> str:
        """Hash: encoded engine state (or its chunk count), version, last applied entry id."""
        return f"{self.tag}:state"

    def state_chunk(self, version: int, index: int, nonce: str = "") -> str:
        """One chunk of a large state, written under its version so commits stay atomic.

        ``nonce`` (hex, one per write attempt) keeps two attempts at the same version, e.g. a
        stale worker and the lease holder, or a retry after a lost reply, from overwriting each
        other's chunks.
        """
        generation = f"{version}.{nonce}" if nonce else str(version)
        return f"{self.tag}:state:{generation}:{index}"

    @property
    def state_pending(self) -> str:
        """Sorted set: chunk sets written but not committed yet (score = ms written).

        A crash between writing chunks and committing leaves its set here; the next commit or
        ``StateStore.cleanup_orphans`` deletes it (chunks also expire on their own until the
        commit makes them permanent).
        """
        return f"{self.tag}:state:pending"

    def state_segment(self, segment: int, nonce: str) -> str:
        """One segment of a segmented state (``state_layout = "segments"``): an immutable
        piece of the window, written once by the commit that first needed it.

        ``nonce`` (hex, one per write attempt) keeps a stale worker's or a retried attempt's
        copy of the same segment apart from the committed one; the state hash's ``segments``
        field names the committed ``<segment>.<nonce>`` pairs.
        """
        return f"{self.tag}:segment:{segment}.{nonce}"

    @property
    def lease(self) -> str:
        """String: the worker holding the stream, with an expiry."""
        return f"{self.tag}:lease"

    @property
    def fence(self) -> str:
        """Counter: fencing token, incremented on every lease acquisition."""
        return f"{self.tag}:fence"

    @property
    def producers(self) -> str:
        """Hash: producer id -> last sequence number applied (idempotent publish)."""
        return f"{self.tag}:producers"

    @property
    def meta(self) -> str:
        """Hash: status (ok/failed), failure reason, last summary time, counters."""
        return f"{self.tag}:meta"

    @property
    def summary(self) -> str:
        """Hash: the latest summary and the entry id it covers."""
        return f"{self.tag}:summary"

    @property
    def memory(self) -> str:
        """Hash: the stream's long-term memory (summary memory and retrieval chunks of text
        that left the window); written only inside commits (``HashUpdate``)."""
        return f"{self.tag}:memory"

    @property
    def vocab(self) -> str:
        """Hash: the words and facts (names, numbers, dates) the stream has said, one field
        each; what the faithfulness guard checks generated text against. Written only inside
        commits."""
        return f"{self.tag}:vocab"

    @property
    def logs(self) -> str:
        """Hash: a log stream's template miner and template table (``workers/logs``), and the
        entry they cover; written only inside commits, with the state."""
        return f"{self.tag}:logs"

    @property
    def scheduled(self) -> str:
        """String set NX while a task for this stream is queued or running."""
        return f"{self.tag}:scheduled"
