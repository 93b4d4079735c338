"""The fenced, exactly-once commit of one stream batch.

Why a commit is one Lua script (``lua/state_commit.lua``): the state, the input position, the
version, the summaries published from that state, the dead letters of that batch and its side
data must change together or not at all, and only while the caller still owns the stream. The
script checks the fencing token against the stream's ``fence`` counter and the live lease, and
the stored version, chunk generation and segments against what the caller read, before its
first write; otherwise it only bumps the refusal counters in ``meta`` and the caller gets
:class:`StaleCommitError`.

The script receives the request as one msgpack map with named fields (its layout is documented
at the top of the ``.lua`` file), plus an inline state's bytes as a separate argument; every
key it touches comes in KEYS (Redis Cluster), chunk and segment keys as ranges the map names.
Chunks and segments are staged before the script (:mod:`state_store.staging`); WAIT for
replicas is :mod:`state_store.replication`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import redis

from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.outcomes import STALE_REASONS
from sinkstream.faults import checkpoint
from sinkstream.ids import entry_after, parse_entry_id
from state_store import scripts
from state_store.reads import RESERVED_FIELDS, StateHead, StateReader
from state_store.replication import ReplicaWait
from state_store.replies import as_text
from state_store.staging import (
    ChunkSet,
    SegmentPlan,
    SegmentUpdate,
    Staging,
    check_segment_update,
    generation_keys,
    missing_segments,
    pending_sets,
    plan_segments,
)

FieldValue = str | bytes | int | float

MAX_FIELDS_PER_ENTRY = 1000  # keeps Lua's unpack() far below its C stack limit
_MAX_LUA_INT = 2**53  # fence and version travel as msgpack ints: Lua numbers are doubles
_INLINE_ARG = 2  # the ARGV index of an inline state's bytes


@dataclass(frozen=True)
class HashUpdate:
    """Fields to set, then fields to delete, in one hash of the stream, inside a commit."""

    key: str
    set: Mapping[str, FieldValue] = field(default_factory=dict)
    delete: Sequence[str] = ()


@dataclass(frozen=True)
class CommitRequest:
    """One batch to commit atomically, or not at all (:meth:`Committer.commit`).

    The scalars and ``segments`` are checked when the request is made (ValueError/TypeError);
    fields, entries and hash updates are checked as the commit flattens them, before anything
    is written.
    """

    stream_id: str
    fence: int  # the fencing token of the caller's lease
    expected_version: int
    last_entry_id: str | None  # None keeps the stored one
    #: encoded state, or a segmented state's header; None keeps the stored state
    state: bytes | None = None
    segments: SegmentUpdate | None = None
    #: caller fields of the state hash (tokens seen, engine ... for ``sinkstream status``)
    state_fields: Mapping[str, FieldValue] = field(default_factory=dict)
    meta_fields: Mapping[str, FieldValue] = field(default_factory=dict)
    #: counters of the meta hash increased by these amounts (e.g. ``entries_applied``)
    meta_counts: Mapping[str, int] = field(default_factory=dict)
    outputs: Sequence[Mapping[str, FieldValue]] = ()
    dead_letters: Sequence[Mapping[str, FieldValue]] = ()
    summary: Mapping[str, FieldValue] | None = None
    trim_input: bool = False
    #: with ``trim_input``: the first input entry kept (a log stream keeps its last lines,
    #: ``workers.logs.retention``); None: trim everything up to ``last_entry_id``
    trim_before: str | None = None
    output_maxlen: int | None = None
    hash_updates: Sequence[HashUpdate] = ()
    #: the head read at the start of the batch (``StateStore.head``); None: read it again.
    #: Saves the commit a round trip; safe because the script re-checks it (see Committer).
    head: StateHead | None = None

    def __post_init__(self) -> None:
        StreamKeys.of(self.stream_id)
        if not _lua_int(self.fence) or self.fence < 1:
            raise ValueError(f"fence must be a positive int, got {self.fence!r}")
        if not _lua_int(self.expected_version) or self.expected_version < 0:
            raise ValueError(f"expected_version must be an int >= 0, got "
                             f"{self.expected_version!r}")
        if self.last_entry_id is not None:
            parse_entry_id(self.last_entry_id)
        if self.trim_input and self.last_entry_id is None:
            raise ValueError("trim_input needs last_entry_id")
        if self.trim_before is not None and (
                self.last_entry_id is None
                or parse_entry_id(self.trim_before) > parse_entry_id(self.last_entry_id)):
            raise ValueError("trim_before must be an applied entry (at most last_entry_id)")
        if self.output_maxlen is not None and (not _lua_int(self.output_maxlen)
                                               or self.output_maxlen < 1):
            raise ValueError("output_maxlen must be positive")
        clash = RESERVED_FIELDS.intersection(self.state_fields)
        if clash:
            raise ValueError(f"state_fields may not set store-owned fields {sorted(clash)}")
        check_segment_update(self.state, self.segments)


@dataclass(frozen=True)
class CommitResult:
    version: int
    output_ids: list[str]
    dead_letter_ids: list[str]
    chunks: int
    #: replicas that acknowledged the commit (WAIT), None when the store does not wait
    replicas: int | None = None
    #: segment bytes this commit wrote (0 for whole states)
    segment_bytes: int = 0


class CommitError(RuntimeError):
    """A commit that was not applied. ``reason`` is a short machine-readable word."""

    def __init__(
        self,
        message: str,
        *,
        stream_id: str = "",
        reason: str = "",
        current_fence: int = 0,
        current_version: int = 0,
    ) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.reason = reason
        self.current_fence = current_fence
        self.current_version = current_version


class StaleCommitError(CommitError):
    """The caller no longer owns the stream (fence moved, lease lost, or version moved on).

    Nothing was written except the ``commits_refused`` counters in the stream's ``meta`` hash.
    The batch must be dropped, not retried: another worker owns the stream now.
    """


class Committer:
    """Stages what a request needs, runs the commit script (and WAIT), cleans up on refusal."""

    def __init__(
        self, client: redis.Redis, reader: StateReader, staging: Staging, wait: ReplicaWait
    ) -> None:
        self.client = client
        self.reader = reader
        self.staging = staging
        self.wait = wait
        self._script = client.register_script(scripts.STATE_COMMIT)

    def commit(self, request: CommitRequest) -> CommitResult:
        """Atomically apply one batch to the stream, or raise and change nothing.

        Writes ``state`` (None keeps the stored state, e.g. a batch that was all dead
        letters), ``last_entry_id`` (None keeps it), version+1 and ``state_fields`` into the
        state hash; appends ``outputs`` to the ``output`` stream (approximately capped at
        ``output_maxlen``) and ``dead_letters`` to ``dead``; merges ``meta_fields`` into
        ``meta``; replaces the ``summary`` hash when given; with ``trim_input`` deletes input
        entries up to and including ``last_entry_id``; applies ``hash_updates`` (fields set,
        then fields deleted, in hashes of this stream's hash slot, e.g. the retrieval memory)
        so side data a batch produces commits exactly once with it. All of it happens only if
        ``fence`` is the stream's current fence, the lease still carries it and the stored
        version equals ``expected_version``; else StaleCommitError (counted in ``meta``).
        Other refusals (CommitError): ``no_state``, ``chunks_missing``, ``segments_missing``,
        ``wrong_type``.

        With ``wait_replicas`` > 0, ``CommitResult.replicas`` says how many replicas
        acknowledged the commit (:class:`ReplicaWait`).

        ``segments`` makes the state segmented: ``state`` is then its header, the new segments
        are staged before the script and the evicted ones deleted by it. With ``state`` and no
        ``segments`` any stored segments are deleted (whole layout). A ``keep`` id that is
        neither stored nor written is refused (``segments_missing``).
        """
        keys = StreamKeys.of(request.stream_id)
        side = _side_data(keys, request)
        head = self._head(request)
        segments: SegmentPlan | None = None
        if request.state is not None:
            if request.segments is not None:
                missing = missing_segments(head.segments, request.segments)
                if missing:
                    raise CommitError(
                        f"stream {keys.stream_id!r}: segment {missing[0]} is neither stored "
                        f"nor written", stream_id=keys.stream_id, reason="segments_missing",
                    )
            segments = plan_segments(keys, head.segments, request.segments)

        chunks: ChunkSet | None = None
        try:
            if segments is not None and segments.write:
                self.staging.write_segments(keys, segments)
            if request.state is not None and len(request.state) > self.staging.chunk_bytes:
                chunks = self.staging.write_chunks(keys, request.expected_version + 1,
                                                   request.state)
            if (segments is not None and segments.write) or chunks is not None:
                checkpoint("chunks_written")
            script_keys, args = _script_call(keys, request, head, chunks, segments, side)
            reply, replicas = self._run(keys, script_keys, args)
        except BaseException:
            self.staging.forget(keys, chunks, segments)
            raise
        if int(reply[0]) != 1:
            self.staging.discard(keys, chunks, segments)
            raise _refusal(keys.stream_id, reply)
        return CommitResult(
            version=int(reply[1]),
            output_ids=[as_text(i) for i in reply[2]],
            dead_letter_ids=[as_text(i) for i in reply[3]],
            chunks=chunks.count if chunks else 0,
            replicas=replicas,
            segment_bytes=sum(len(b) for b in segments.write.values()) if segments else 0,
        )

    def _head(self, request: CommitRequest) -> StateHead:
        """The head the commit is planned from: the caller's, else read now (one round trip).

        Using a head read at the start of the batch instead of one read now is safe because
        nothing taken from it is trusted by the script. Its version, generation and segments
        field are compared with the stored ones before the first write: if any commit landed
        since, the script refuses (``version_conflict``) and deletes nothing. The chunk keys
        of its generation and the segment keys it names are deleted only when those checks
        pass, i.e. when they are still the stored ones. Its pending members are deleted only
        if still listed in the pending set (``ZSCORE``) and neither the stored nor this
        commit's own set, so a set committed or cleaned up meanwhile is never touched; a set
        staged after the head was read is simply not listed (its expiry, the next commit or
        ``cleanup_orphans`` removes it). A head of another version than ``expected_version``
        is read again rather than refused, as it would be.
        """
        head = request.head
        if head is None or head.version != request.expected_version:
            head = self.reader.head(request.stream_id)
        return head

    def _run(
        self, keys: StreamKeys, script_keys: list[str], args: list[Any]
    ) -> tuple[list[Any], int | None]:
        if self.wait.replicas > 0:
            return self.wait.run(self._script, keys.state, keys.stream_id, script_keys, args)
        reply: list[Any] = self._script(keys=script_keys, args=args)
        return reply, None


# ----- the script's arguments ------------------------------------------------------------------
class _Keys:
    """KEYS of one script call: the fixed keys, then ranges ``[first, count]`` (1-based)."""

    def __init__(self, fixed: Sequence[str]) -> None:
        self.keys = list(fixed)

    def add(self, more: Sequence[str]) -> list[int]:
        first = len(self.keys) + 1
        self.keys.extend(more)
        return [first, len(more)]


def _side_data(keys: StreamKeys, request: CommitRequest) -> dict[str, Any]:
    """The request's fields, entries and hash updates as script map fields (checked here,
    before anything touches Redis); hash update keys as ``"key"`` names, made indices later."""
    updates = []
    for update in request.hash_updates:
        if not update.key.startswith(f"{keys.tag}:"):
            raise ValueError(f"hash update key {update.key!r} is not a key of {keys.tag}")
        if update.key in (keys.state, keys.meta, keys.summary, keys.producers):
            raise ValueError(f"hash update key {update.key!r} is owned by the store")
        updates.append({"key": update.key, "set": _fields(update.set),
                        "delete": [_value(name) for name in update.delete]})
    side: dict[str, Any] = {
        "state_fields": _fields(request.state_fields),
        "meta_fields": _fields(request.meta_fields),
        "meta_counts": _counts(request.meta_counts),
        "outputs": _entries(request.outputs, "output"),
        "dead_letters": _entries(request.dead_letters, "dead letter"),
        "hash_updates": updates,
    }
    if request.summary is not None:
        side["summary"] = _fields(request.summary)
    if request.trim_input and request.last_entry_id:
        side["trim_minid"] = request.trim_before or entry_after(request.last_entry_id)
    if request.output_maxlen is not None:
        side["output_maxlen"] = request.output_maxlen
    return side


def _counts(counts: Mapping[str, int]) -> list[Any]:
    """``name, delta, ...`` for HINCRBY: names as field names, deltas Lua-safe integers."""
    out: list[Any] = []
    for name, delta in counts.items():
        if not _lua_int(delta):
            raise ValueError(f"meta count {name!r} must be an int, got {delta!r}")
        out.extend((_value(name), delta))
    return out


def _script_call(
    keys: StreamKeys,
    request: CommitRequest,
    head: StateHead,
    chunks: ChunkSet | None,
    segments: SegmentPlan | None,
    side: Mapping[str, Any],
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the commit script: the msgpack request (layout in state_commit.lua)
    and, for an inline state, its bytes."""
    script_keys = _Keys([keys.state, keys.fence, keys.lease, keys.meta, keys.output, keys.dead,
                         keys.input, keys.summary, keys.state_pending])
    req: dict[str, Any] = {
        "fence": request.fence,
        "version": request.expected_version,
        "read": {"generation": head.generation, "segments": head.segments_field},
    }
    if request.last_entry_id is not None:
        req["last_entry_id"] = request.last_entry_id
    args: list[Any] = []
    if request.state is not None:
        nbytes = len(request.state) + (segments.nbytes if segments else 0)
        if chunks is None:
            req["state"] = {"nbytes": nbytes, "data": _INLINE_ARG}
            args.append(request.state)
        else:
            req["state"] = {"nbytes": nbytes, "generation": chunks.generation,
                            "chunks": script_keys.add(chunks.keys(keys))}
        req["read"]["chunks"] = script_keys.add(generation_keys(keys, head.generation))
    if segments is not None:
        req["segments"] = {"field": segments.new_field, "member": segments.member,
                           "new": script_keys.add(list(segments.write)),
                           "evicted": script_keys.add(segments.evicted)}
    members = [m for m in head.pending if m != head.generation]
    req["orphans"] = [[name, script_keys.add(set_keys)]
                      for name, set_keys in pending_sets(keys, members)]
    req.update(side)
    req["hash_updates"] = [{**u, "key": script_keys.add([u["key"]])[0]}
                           for u in side["hash_updates"]]
    packed = msgpack.packb(req, use_bin_type=False)  # Redis 7.0's cmsgpack: no bin types
    return script_keys.keys, [packed, *args]


def _value(value: Any) -> str | bytes:
    """A field value as redis-py would send it: bytes and str as they are (str is UTF-8 in
    msgpack too), numbers as ``repr`` (so stored values do not depend on Lua's formatting)."""
    if isinstance(value, bool) or not isinstance(value, (str, bytes, int, float)):
        raise TypeError(f"value must be str, bytes, int or float, got {type(value).__name__}")
    return value if isinstance(value, (str, bytes)) else repr(value)


def _fields(fields: Mapping[str, FieldValue]) -> list[str | bytes]:
    """``{name: value}`` as the flat ``name, value, ...`` list HSET and XADD take."""
    flat: list[str | bytes] = []
    for name, value in fields.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"field names must be non-empty strings, got {name!r}")
        try:
            flat += [name, _value(value)]
        except TypeError:
            raise TypeError(f"field {name!r}: value must be str, bytes, int or float") from None
    return flat


def _entries(entries: Sequence[Mapping[str, FieldValue]], what: str) -> list[list[str | bytes]]:
    out = []
    for entry in entries:
        if not entry or len(entry) > MAX_FIELDS_PER_ENTRY:
            raise ValueError(f"each {what} needs 1..{MAX_FIELDS_PER_ENTRY} fields")
        out.append(_fields(entry))
    return out


def _lua_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < _MAX_LUA_INT


def _refusal(stream_id: str, reply: list[Any]) -> CommitError:
    reason = as_text(reply[1])
    fence, version = int(reply[2]), int(reply[3])
    cls = StaleCommitError if reason in STALE_REASONS else CommitError
    return cls(
        f"stream {stream_id!r}: commit refused ({reason}; current fence {fence}, "
        f"version {version})",
        stream_id=stream_id,
        reason=reason,
        current_fence=fence,
        current_version=version,
    )
