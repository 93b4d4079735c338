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
    + caller fields (``extra_fields``: tokens seen, engine, model ... for ``sinkstream status``)

Why a commit is one Lua script: the state, the input position, the version, the summaries
published from that state and the dead letters of that batch must change together or not at
all, and only while the caller still owns the stream. The script checks the fencing token
against the stream's ``fence`` counter and the live lease, and the stored version against the
caller's expected version, before its first write; otherwise it only bumps the refusal counters
in ``meta`` and the caller gets :class:`StaleCommitError`.

Large states (over ``chunk_bytes``) are chunked. Chunks are written *before* the commit script
under keys carrying the new version and a per-attempt nonce, with an expiry, and are recorded
in the ``state:pending`` sorted set. Nothing reads them until the commit script flips the
``generation`` field, which also makes them permanent and deletes the previous version's chunks
in the same atomic step. A crash between writing chunks and committing leaves orphans: the next
successful commit deletes every pending set but its own, ``cleanup_orphans`` deletes old ones
on demand, and failing both they expire (``orphan_ttl_s``).

Segmented states (sink-KV with ``state_layout = "segments"``, see
``workers/engines/sinkkv_segments.py``): ``data``/chunks hold a small header (the envelope
with the window's segment ids) and the window's K/V lives in immutable segment keys. A commit
passes a :class:`SegmentUpdate`: the ids of the new window and the bytes of the segments not
stored yet. Those are staged like chunks (expiring, pending member ``s.<nonce>.<ids>``); the
script persists them, swaps the ``segments`` field and deletes the evicted segments in the
same atomic, fenced step, so Redis traffic per batch is the new tokens plus the header. A
commit without segments (the whole layout) deletes any stored segments: switching layouts is
just the next commit. ``head`` returns the version and the segment names in one HMGET, so a
load reads the hash and every segment in one pipelined round trip.

Reads need no MULTI: a generation's chunks never change once written and are deleted only by
the commit that replaces them, so "every chunk of the generation read from the hash is still
there" proves the bytes belong to that version; a missing chunk means a commit raced the read,
and ``load`` simply reads again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.outcomes import STALE_REASONS
from sinkstream.faults import checkpoint
from sinkstream.ids import entry_after, parse_entry_id
from state_store import scripts
from state_store.connection import is_cluster

if TYPE_CHECKING:
    from sinkstream.settings import Settings

log = logging.getLogger(__name__)

FieldValue = str | bytes | int | float

#: State hash fields the store owns; ``extra_fields`` may not overwrite them.
RESERVED_FIELDS = frozenset(
    {"version", "fence", "last_entry_id", "data", "generation", "chunks", "nbytes",
     "committed_ms", "segments"}
)


_MAX_FIELDS_PER_ENTRY = 1000  # keeps Lua's unpack() far below its C stack limit
_MAX_FAILURE_REASON = 4000
_CHUNK_WRITE_BATCH = 16  # chunks per pipeline round trip while writing
_LOAD_ATTEMPTS = 8
_UNREPLICATED_LOG_INTERVAL_S = 30.0
_MAX_CHUNKS = 100_000  # bounds the key list built from a (possibly damaged) generation name
_MAX_SEGMENTS = 1_000_000  # bounds segment ids and lists read back from Redis


@dataclass(frozen=True)
class HashUpdate:
    """Fields to set, then fields to delete, in one hash of the stream, inside a commit."""

    key: str
    set: Mapping[str, FieldValue] = field(default_factory=dict)
    delete: Sequence[str] = ()


@dataclass(frozen=True)
class SegmentUpdate:
    """The window of a segmented state after a commit.

    ``keep``: every segment id the new state is made of; ``write``: the bytes of those not
    stored yet (each an encoded, checksummed envelope). Stored segments outside ``keep`` are
    deleted by the same commit.
    """

    keep: Sequence[int]
    write: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class StateHead:
    """The committed version and segment names: one HMGET, enough for a hot-cache check and
    for reading a segmented state in a single round trip (``load(head=...)``)."""

    version: int
    segments: dict[int, str]  # segment id -> key name suffix "<id>.<nonce>"

    @property
    def segment_ids(self) -> list[int]:
        return sorted(self.segments)


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


class StateReadError(RuntimeError):
    """The stored state could not be read consistently (chunks kept vanishing, size wrong)."""


@dataclass(frozen=True)
class StateInfo:
    """The state hash without the bytes: cheap enough for status pages and hot-cache checks."""

    version: int
    fence: int
    last_entry_id: str | None
    nbytes: int
    chunks: int
    committed_ms: int
    fields: dict[str, bytes]
    segments: int = 0


@dataclass(frozen=True)
class StoredState:
    """A committed state: the bytes plus who wrote it and how far into the input it got."""

    version: int
    fence: int
    last_entry_id: str | None
    data: bytes
    chunks: int
    fields: dict[str, bytes]
    #: segmented states: segment id -> its encoded bytes (empty for a whole state)
    segments: dict[int, bytes] = field(default_factory=dict)


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


@dataclass(frozen=True)
class Failure:
    reason: str
    failed_at: float


class StateStore:
    """Load and commit stream states through a bytes-mode client (``decode_responses=False``)."""

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
        self.orphan_ttl_ms = max(1, int(orphan_ttl_s * 1000))
        #: WAIT for this many replicas after every commit (0 = off; see commit())
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        #: commits that fewer than ``wait_replicas`` replicas acknowledged in time
        self.unreplicated_commits = 0
        self._unreplicated_logged = 0.0
        self._commit = client.register_script(scripts.STATE_COMMIT)
        self._cleanup = client.register_script(scripts.STATE_CLEANUP)

    @classmethod
    def from_settings(cls, client: redis.Redis, settings: Settings) -> StateStore:
        return cls(client, chunk_bytes=settings.state_chunk_bytes,
                   wait_replicas=settings.redis_wait_replicas,
                   wait_timeout_ms=settings.redis_wait_timeout_ms)

    # ----- reading -----------------------------------------------------------------------------
    def version(self, stream_id: str) -> int:
        """The committed version (0 = no state): one HGET, for the worker's hot cache."""
        raw = self.client.hget(StreamKeys.of(stream_id).state, "version")
        return int(raw) if raw else 0

    def head(self, stream_id: str) -> StateHead:
        """Version and segment names in one HMGET (version 0: no state yet)."""
        raw_version, raw_segments = self.client.hmget(
            StreamKeys.of(stream_id).state, ["version", "segments"]
        )
        return StateHead(
            version=int(raw_version) if raw_version else 0,
            segments=_parse_segments(stream_id, _b(raw_segments or b"")),
        )

    def info(self, stream_id: str) -> StateInfo | None:
        """Everything about the stored state but its bytes; None if nothing was committed."""
        keys = StreamKeys.of(stream_id)
        names = [_b(n) for n in self.client.hkeys(keys.state) if _b(n) != b"data"]
        if not names:
            return None
        values = self.client.hmget(keys.state, names)
        fields = {n.decode(): _b(v) for n, v in zip(names, values, strict=True) if v is not None}
        if not fields.get("version"):
            return None
        return StateInfo(
            version=_int(fields, "version"),
            fence=_int(fields, "fence"),
            last_entry_id=_text(fields, "last_entry_id"),
            nbytes=_int(fields, "nbytes"),
            chunks=_int(fields, "chunks"),
            committed_ms=_int(fields, "committed_ms"),
            fields=_extra(fields),
            segments=len(_parse_segments(stream_id, fields.get("segments", b""))),
        )

    def load(self, stream_id: str, head: StateHead | None = None) -> StoredState | None:
        """The committed state with its bytes, or None if the stream has none yet.

        With ``head`` (from :meth:`head`), the hash and the segments it names are read in one
        pipelined round trip; if a commit moved on meanwhile the read is simply repeated.
        """
        keys = StreamKeys.of(stream_id)
        names = head.segments if head is not None else None
        for _ in range(_LOAD_ATTEMPTS):
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(keys.state)
            wanted = sorted((names or {}).items())
            for _, name in wanted:
                pipe.get(_segment_key(keys, name))
            raw, *parts = pipe.execute()
            fields = {_b(k).decode(): _b(v) for k, v in raw.items()}
            if not fields.get("version"):
                return None
            stored_names = _parse_segments(stream_id, fields.get("segments", b""))
            if names != stored_names:
                names = stored_names  # first read, or a commit moved the window: read again
                if stored_names:
                    continue
                wanted, parts = [], []
            segments = self._segments_read(keys, fields, wanted, parts)
            if segments is None:
                continue  # a commit replaced the window while we read: read again
            data = self._state_bytes(keys, fields)
            if data is None:
                continue  # a commit replaced this generation while we read: read again
            size = len(data) + sum(len(part) for part in segments.values())
            if size != _int(fields, "nbytes"):
                raise StateReadError(
                    f"stream {stream_id!r}: state is {size} bytes, the hash says "
                    f"{_int(fields, 'nbytes')}"
                )
            return StoredState(
                version=_int(fields, "version"),
                fence=_int(fields, "fence"),
                last_entry_id=_text(fields, "last_entry_id"),
                data=data,
                chunks=_int(fields, "chunks"),
                fields=_extra(fields),
                segments=segments,
            )
        raise StateReadError(
            f"stream {stream_id!r}: state changed {_LOAD_ATTEMPTS} times while being read"
        )

    def _segments_read(
        self,
        keys: StreamKeys,
        fields: Mapping[str, bytes],
        wanted: Sequence[tuple[int, str]],
        parts: Sequence[Any],
    ) -> dict[int, bytes] | None:
        """The segments read, or None if a commit raced the read (read again).

        Segments are deleted only by the commit that drops them from the hash, so a segment
        missing while the hash still names it at the same version is really gone (deleted by
        hand, lost by a failover to a lagging replica): refused by name, never waited on.
        """
        missing = [(seg, name) for (seg, name), part in zip(wanted, parts, strict=True)
                   if part is None]
        if missing:
            now = self.head(keys.stream_id)
            if now.version == _int(fields, "version") and now.segments == dict(wanted):
                seg, name = missing[0]
                raise StateReadError(
                    f"stream {keys.stream_id!r}: segment {seg} of state version "
                    f"{now.version} is missing (key {_segment_key(keys, name)!r}; "
                    f"{len(missing)} of {len(wanted)} segments missing)"
                )
            return None
        return {seg: _b(part) for (seg, _), part in zip(wanted, parts, strict=True)}

    def _state_bytes(self, keys: StreamKeys, fields: Mapping[str, bytes]) -> bytes | None:
        """Inline data, or the chunks named by ``generation``; None if they are gone."""
        if "data" in fields:
            return fields["data"]
        generation = fields.get("generation", b"").decode()
        if not generation:
            raise StateReadError(f"stream {keys.stream_id!r}: state hash has no data")
        parsed = _parse_generation(generation)
        if parsed is None:
            raise StateReadError(f"stream {keys.stream_id!r}: bad generation {generation!r}")
        pipe = self.client.pipeline(transaction=False)
        for key in _chunk_keys(keys, *parsed):
            pipe.get(key)
        parts = pipe.execute()
        if any(part is None for part in parts):
            return None
        return b"".join(parts)

    # ----- committing --------------------------------------------------------------------------
    def commit(
        self,
        stream_id: str,
        fence_token: int,
        expected_version: int,
        state_bytes: bytes | None,
        last_entry_id: str | None,
        *,
        extra_fields: Mapping[str, FieldValue] | None = None,
        meta_fields: Mapping[str, FieldValue] | None = None,
        outputs: Sequence[Mapping[str, FieldValue]] = (),
        dead_letters: Sequence[Mapping[str, FieldValue]] = (),
        summary: Mapping[str, FieldValue] | None = None,
        trim_input: bool = False,
        output_maxlen: int | None = None,
        hash_updates: Sequence[HashUpdate] = (),
        segments: SegmentUpdate | None = None,
    ) -> CommitResult:
        """Atomically apply one batch to the stream, or raise and change nothing.

        Writes ``state_bytes`` (None keeps the stored state, e.g. a batch that was all dead
        letters), ``last_entry_id`` (None keeps it), version+1 and ``extra_fields`` into the
        state hash; appends ``outputs`` to the ``output`` stream (approximately capped at
        ``output_maxlen``) and ``dead_letters`` to ``dead``; merges ``meta_fields`` into
        ``meta``; replaces the ``summary`` hash when given; with ``trim_input`` deletes input
        entries up to and including ``last_entry_id``; applies ``hash_updates`` (fields set,
        then fields deleted, in hashes of this stream's hash slot, e.g. the retrieval memory)
        so side data a batch produces commits exactly once with it. All of it happens only if
        ``fence_token`` is the stream's current fence, the lease still carries it and the
        stored version equals ``expected_version``; else StaleCommitError (counted in
        ``meta``). Other refusals (CommitError): ``no_state``, ``chunks_missing``,
        ``wrong_type``.

        With ``wait_replicas`` > 0 the script is followed, on the same connection, by
        ``WAIT wait_replicas wait_timeout_ms``, and ``CommitResult.replicas`` says how many
        replicas acknowledged it. A commit they acknowledged survives a failover to one of
        them. Fewer in time (no replica left after a failover, or one lagging) is logged and
        counted (``unreplicated_commits``), not raised: the commit is applied on the primary
        and cannot be taken back, and if a later failover does roll it back, the state, its
        input position, version and input trim roll back together and the stream is simply
        replayed from there (the version check still refuses any double application).

        ``segments`` makes the state segmented: ``state_bytes`` is then its header, the new
        segments are staged before the script and the evicted ones deleted by it. With
        ``state_bytes`` and no ``segments`` any stored segments are deleted (whole layout).
        A ``keep`` id that is neither stored nor written is refused (``segments_missing``).
        """
        keys = StreamKeys.of(stream_id)
        _check_commit_args(fence_token, expected_version, last_entry_id, trim_input,
                           output_maxlen, extra_fields)
        entry_args = _entries_args(outputs, "output") + _entries_args(dead_letters, "dead letter")
        update_keys, update_args = _updates_args(keys, hash_updates)
        entry_args += update_args
        _check_segments(state_bytes, segments)
        stored_generation, stored_segments, orphans = self._commit_context(keys)
        seg_plan = _plan_segments(keys, stored_segments, segments, state_bytes is None)

        chunk_plan: tuple[int, str, int] | None = None
        try:
            if seg_plan.write:
                self._write_segments(keys, seg_plan)
            if state_bytes is not None and len(state_bytes) > self.chunk_bytes:
                chunk_plan = self._write_chunks(keys, expected_version + 1, state_bytes)
            if seg_plan.write or chunk_plan is not None:
                checkpoint("chunks_written")
            reply, replicas = self._run_commit(
                keys, fence_token, expected_version, state_bytes, last_entry_id, chunk_plan,
                stored_generation, orphans, extra_fields, meta_fields, summary,
                trim_input, output_maxlen, entry_args, update_keys, seg_plan,
            )
        except BaseException:
            self._forget(keys, chunk_plan, seg_plan)
            raise
        if reply[0] != 1:
            self._forget(keys, chunk_plan, seg_plan)
            raise _refusal(stream_id, reply)
        return CommitResult(
            version=int(reply[1]),
            output_ids=[i.decode() for i in reply[2]],
            dead_letter_ids=[i.decode() for i in reply[3]],
            chunks=chunk_plan[2] if chunk_plan else 0,
            replicas=replicas,
            segment_bytes=sum(len(b) for b in seg_plan.write.values()),
        )

    def _commit_context(
        self, keys: StreamKeys
    ) -> tuple[str, str, list[tuple[str, list[str]]]]:
        """The stored generation and segments field and the pending (uncommitted) chunk and
        segment sets, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(keys.state, ["generation", "segments"])
        pipe.zrange(keys.state_pending, 0, -1)
        (generation_raw, segments_raw), members = pipe.execute()
        stored = generation_raw.decode() if generation_raw else ""
        segments = segments_raw.decode() if segments_raw else ""
        return stored, segments, [o for o in _pending_sets(keys, members) if o[0] != stored]

    def _write_segments(self, keys: StreamKeys, plan: _SegmentPlan) -> None:
        """Stage the new segments as expiring keys, registered as pending first (one round
        trip per batch of keys): nobody reads them until the commit names them."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(keys.state_pending, {plan.member: int(time.time() * 1000)})
        for i, (key, data) in enumerate(plan.write.items(), start=1):
            pipe.set(key, data, px=self.orphan_ttl_ms)
            if i % _CHUNK_WRITE_BATCH == 0:
                pipe.execute()
                pipe = self.client.pipeline(transaction=False)
        pipe.execute()

    def _forget(
        self, keys: StreamKeys, chunk_plan: tuple[int, str, int] | None, seg_plan: _SegmentPlan
    ) -> None:
        if chunk_plan is not None:
            self._forget_chunks(keys, chunk_plan)
        if seg_plan.write:
            try:
                self._cleanup(keys=[keys.state, keys.state_pending, *seg_plan.write],
                              args=[seg_plan.member, len(seg_plan.write)])
            except redis.RedisError:
                pass  # the next commit, cleanup_orphans or the segments' expiry will do it

    def _write_chunks(self, keys: StreamKeys, version: int, data: bytes) -> tuple[int, str, int]:
        """Write ``data`` as expiring chunk keys, registered as pending; nobody reads them yet."""
        nonce = os.urandom(8).hex()
        view = memoryview(data)
        count = -(-len(data) // self.chunk_bytes)
        generation = _generation(version, nonce, count)
        self.client.zadd(keys.state_pending, {generation: int(time.time() * 1000)})
        for start in range(0, count, _CHUNK_WRITE_BATCH):
            pipe = self.client.pipeline(transaction=False)
            for i in range(start, min(count, start + _CHUNK_WRITE_BATCH)):
                piece = view[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]
                pipe.set(keys.state_chunk(version, i, nonce), piece, px=self.orphan_ttl_ms)
            pipe.execute()
        return version, nonce, count

    def _forget_chunks(self, keys: StreamKeys, plan: tuple[int, str, int]) -> None:
        """Best effort: drop the chunks of a commit that was refused (never the live ones)."""
        version, nonce, count = plan
        try:
            self._cleanup(
                keys=[keys.state, keys.state_pending, *_chunk_keys(keys, version, nonce, count)],
                args=[_generation(version, nonce, count), count],
            )
        except redis.RedisError:
            pass  # the next commit, cleanup_orphans or the chunks' expiry will do it

    def _run_commit(
        self,
        keys: StreamKeys,
        fence_token: int,
        expected_version: int,
        state_bytes: bytes | None,
        last_entry_id: str | None,
        chunk_plan: tuple[int, str, int] | None,
        stored_generation: str,
        orphans: list[tuple[str, list[str]]],
        extra_fields: Mapping[str, FieldValue] | None,
        meta_fields: Mapping[str, FieldValue] | None,
        summary: Mapping[str, FieldValue] | None,
        trim_input: bool,
        output_maxlen: int | None,
        entry_args: list[FieldValue],
        update_keys: Sequence[str] = (),
        seg_plan: _SegmentPlan | None = None,
    ) -> tuple[list[Any], int | None]:
        if state_bytes is None:
            mode, data, generation, new_chunks = "keep", b"", "", list[str]()
        elif chunk_plan is None:
            mode, data, generation, new_chunks = "inline", state_bytes, "", []
        else:
            mode, data = "chunked", b""
            generation = _generation(*chunk_plan)
            new_chunks = _chunk_keys(keys, *chunk_plan)
        old_chunks = _generation_keys(keys, stored_generation)
        seg = seg_plan or _SegmentPlan(stored="", mode="keep")
        script_keys: list[str] = [
            keys.state, keys.fence, keys.lease, keys.meta, keys.output, keys.dead, keys.input,
            keys.summary, keys.state_pending, *new_chunks, *old_chunks,
        ]
        args: list[FieldValue] = [
            str(fence_token), str(expected_version), last_entry_id or "", mode, data, generation,
            len(state_bytes) + seg.nbytes if state_bytes is not None else 0,
            len(new_chunks), stored_generation, len(old_chunks), len(orphans),
        ]
        for name, chunk_keys in orphans:
            args += [name, len(chunk_keys)]
            script_keys += chunk_keys
        args += [seg.stored, seg.mode, seg.new_field, seg.member, len(seg.write),
                 len(seg.evicted)]
        script_keys += [*seg.write, *seg.evicted]
        args += _fields_args(extra_fields) + _fields_args(meta_fields)
        args += [-1] if summary is None else _fields_args(summary)
        args += [entry_after(last_entry_id) if trim_input and last_entry_id else ""]
        args += ["" if output_maxlen is None else output_maxlen]
        args += entry_args
        script_keys += update_keys
        if self.wait_replicas > 0:
            return self._commit_and_wait(keys, script_keys, args)
        reply: list[Any] = self._commit(keys=script_keys, args=args)
        return reply, None

    def _commit_and_wait(
        self, keys: StreamKeys, script_keys: list[str], args: list[FieldValue]
    ) -> tuple[list[Any], int]:
        """The commit script then WAIT, pipelined on one connection to the slot's primary.

        WAIT counts the replicas that have every write made *on this connection*, so it must
        follow the script on the same connection: with Redis Cluster that is a connection to
        the primary owning the stream's slot, not the cluster client's routing. A MOVED/ASK
        reply means the script did not run (the slot moved in a failover): re-read the slot
        map and try again.
        """
        cluster = is_cluster(self.client)
        for _ in range(3):
            target: Any = self.client
            if cluster:
                node = self.client.get_node_from_key(keys.state)  # type: ignore[attr-defined]
                target = self.client.get_redis_connection(node)  # type: ignore[attr-defined]
            pipe = target.pipeline(transaction=False)
            self._commit(keys=script_keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            reply, acked = pipe.execute(raise_on_error=False)
            if cluster and isinstance(reply, (redis.exceptions.MovedError,
                                              redis.exceptions.AskError)):
                self.client.nodes_manager.initialize()  # type: ignore[attr-defined]
                continue
            if isinstance(reply, Exception):
                raise reply
            replicas = 0 if isinstance(acked, Exception) else int(acked)
            if int(reply[0]) == 1 and replicas < self.wait_replicas:
                self._note_unreplicated(keys.stream_id, int(reply[1]), replicas)
            return list(reply), replicas
        raise redis.exceptions.ConnectionError(
            f"stream {keys.stream_id!r}: slot kept moving while committing"
        )

    def _note_unreplicated(self, stream_id: str, version: int, replicas: int) -> None:
        self.unreplicated_commits += 1
        now = time.monotonic()
        if now - self._unreplicated_logged >= _UNREPLICATED_LOG_INTERVAL_S:
            self._unreplicated_logged = now
            log.warning(
                "stream %s: commit v%d acknowledged by %d of %d replicas within %d ms (%d such "
                "commits so far); until replicas catch up a failover can roll commits back "
                "(they are then replayed)", stream_id, version, replicas, self.wait_replicas,
                self.wait_timeout_ms, self.unreplicated_commits,
            )

    def cleanup_orphans(self, stream_id: str, min_age_s: float = 600.0) -> int:
        """Delete uncommitted chunk sets older than ``min_age_s``; return how many.

        The age guard spares a write in progress; a set committed meanwhile is never touched
        (the script re-checks). Commits already do this for every set but their own.
        """
        keys = StreamKeys.of(stream_id)
        cutoff = int((time.time() - min_age_s) * 1000)
        members = self.client.zrangebyscore(keys.state_pending, "-inf", cutoff)
        sets = _pending_sets(keys, [_b(m) for m in members])
        if not sets:
            return 0
        script_keys: list[str] = [keys.state, keys.state_pending]
        args: list[FieldValue] = []
        for name, chunk_keys in sets:
            script_keys += chunk_keys
            args += [name, len(chunk_keys)]
        return int(self._cleanup(keys=script_keys, args=args))

    # ----- failures and counters ---------------------------------------------------------------
    def mark_failed(self, stream_id: str, reason: str) -> None:
        """Park a stream (e.g. corrupt or foreign state); ``sinkstream status`` shows why."""
        self.client.hset(
            StreamKeys.of(stream_id).meta,
            mapping={
                "status": "failed",
                "failure_reason": reason[:_MAX_FAILURE_REASON],
                "failed_at": repr(time.time()),
            },
        )

    def failure(self, stream_id: str) -> Failure | None:
        """The failure recorded by ``mark_failed``, or None if the stream is healthy."""
        status, reason, at = self.client.hmget(
            StreamKeys.of(stream_id).meta, ["status", "failure_reason", "failed_at"]
        )
        if status != b"failed":
            return None
        return Failure(
            reason=_b(reason or b"").decode(errors="replace"), failed_at=float(at or 0.0)
        )

    def clear_failure(self, stream_id: str) -> bool:
        """Mark the stream healthy again; True if it was failed."""
        meta = StreamKeys.of(stream_id).meta
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(meta, "status")
        pipe.hset(meta, "status", "ok")
        pipe.hdel(meta, "failure_reason", "failed_at")
        was, _, _ = pipe.execute()
        return bool(was == b"failed")

    def refused_commits(self, stream_id: str) -> dict[str, int]:
        """Refusal counters from ``meta``: {"total": n, "stale_fence": n, ...}."""
        raw = self.client.hgetall(StreamKeys.of(stream_id).meta)
        out: dict[str, int] = {}
        for name, value in raw.items():
            key = _b(name).decode()
            if key == "commits_refused":
                out["total"] = int(value)
            elif key.startswith("commits_refused:"):
                out[key.split(":", 1)[1]] = int(value)
        return out


# ----- helpers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SegmentPlan:
    """What a commit does to the segment keys (script arguments)."""

    stored: str  # the ``segments`` field as read before the commit
    mode: str  # 'keep' | 'set' | 'none'
    new_field: str = ""  # the new ``segments`` field
    member: str = ""  # pending member of the staged segments
    write: dict[str, bytes] = field(default_factory=dict)  # staged key -> bytes
    evicted: list[str] = field(default_factory=list)  # stored keys to delete
    nbytes: int = 0  # bytes of every segment of the new window


def _check_segments(state_bytes: bytes | None, segments: SegmentUpdate | None) -> None:
    if segments is None:
        return
    if state_bytes is None:
        raise ValueError("segments need state_bytes (the segmented state's header)")
    keep = list(segments.keep)
    for seg in [*keep, *segments.write]:
        if isinstance(seg, bool) or not isinstance(seg, int) or not 0 <= seg < _MAX_SEGMENTS:
            raise ValueError(f"segment ids must be ints in [0, {_MAX_SEGMENTS}), got {seg!r}")
    if len(set(keep)) != len(keep):
        raise ValueError("segments.keep lists a segment twice")
    extra = set(segments.write) - set(keep)
    if extra:
        raise ValueError(f"segments.write has segments {sorted(extra)} outside keep")
    for seg, data in segments.write.items():
        if not isinstance(data, bytes):
            raise TypeError(f"segment {seg}: bytes needed, got {type(data).__name__}")


def _plan_segments(
    keys: StreamKeys, stored_field: str, update: SegmentUpdate | None, keep_state: bool
) -> _SegmentPlan:
    """Keys to stage and to delete, from the stored ``segments`` field and the update."""
    if keep_state:  # the stored state stays as it is, segments included
        return _SegmentPlan(stored=stored_field, mode="keep")
    stored = _parse_segments(keys.stream_id, stored_field.encode())
    if update is None:  # a whole state replaces any segments: delete them all
        return _SegmentPlan(stored=stored_field, mode="none",
                            evicted=[_segment_key(keys, n) for n in stored.values()])
    nonce = os.urandom(8).hex()
    names: dict[int, str] = {}
    write: dict[str, bytes] = {}
    for seg in sorted(update.keep):
        if seg in update.write:
            names[seg] = f"{seg}.{nonce}.{len(update.write[seg])}"
            write[_segment_key(keys, names[seg])] = update.write[seg]
        elif seg in stored:
            names[seg] = stored[seg]
        else:
            raise CommitError(
                f"stream {keys.stream_id!r}: segment {seg} is neither stored nor written",
                stream_id=keys.stream_id, reason="segments_missing",
            )
    kept = set(names.values())
    member = f"s.{nonce}.{','.join(str(s) for s in sorted(update.write))}" if write else ""
    return _SegmentPlan(
        stored=stored_field, mode="set", new_field=" ".join(names[s] for s in sorted(names)),
        member=member, write=write,
        evicted=[_segment_key(keys, n) for n in stored.values() if n not in kept],
        nbytes=sum(_segment_size(n) for n in names.values()),
    )


def _segment_key(keys: StreamKeys, name: str) -> str:
    seg, nonce, _ = name.split(".")
    return keys.state_segment(int(seg), nonce)


def _segment_size(name: str) -> int:
    return int(name.rsplit(".", 1)[1])


def _parse_segments(stream_id: str, raw: bytes) -> dict[int, str]:
    """``"<id>.<nonce>.<nbytes> ..."`` -> {id: name}; a damaged field is refused by name."""
    out: dict[int, str] = {}
    for token in raw.decode(errors="replace").split():
        parts = token.split(".")
        if not (len(parts) == 3 and all(p.isdigit() and p.isascii() for p in parts[::2])
                and int(parts[0]) < _MAX_SEGMENTS and int(parts[0]) not in out
                and parts[1] and all(c in "0123456789abcdef" for c in parts[1])):
            raise StateReadError(f"stream {stream_id!r}: bad segments field entry {token!r}")
        out[int(parts[0])] = token
    return out


def _parse_segment_member(name: str) -> tuple[str, list[int]] | None:
    """A pending member ``s.<nonce>.<id>,<id>...`` -> (nonce, ids); None if not one."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "s" or not parts[1]:
        return None
    if any(c not in "0123456789abcdef" for c in parts[1]):
        return None
    ids = parts[2].split(",")
    if not ids or len(ids) > _MAX_CHUNKS or not all(i.isdigit() and i.isascii() for i in ids):
        return None
    return parts[1], [int(i) for i in ids]


def _decodes_responses(client: Any) -> bool:
    try:
        return bool(client.get_encoder().decode_responses)
    except AttributeError:
        return False


def _refusal(stream_id: str, reply: list[Any]) -> CommitError:
    reason = reply[1].decode()
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


def _check_commit_args(
    fence_token: int,
    expected_version: int,
    last_entry_id: str | None,
    trim_input: bool,
    output_maxlen: int | None,
    extra_fields: Mapping[str, FieldValue] | None,
) -> None:
    if isinstance(fence_token, bool) or not isinstance(fence_token, int) or fence_token < 1:
        raise ValueError(f"fence_token must be a positive int, got {fence_token!r}")
    if isinstance(expected_version, bool) or not isinstance(expected_version, int):
        raise ValueError(f"expected_version must be an int, got {expected_version!r}")
    if expected_version < 0:
        raise ValueError("expected_version must be >= 0")
    if last_entry_id is not None:
        parse_entry_id(last_entry_id)
    if trim_input and last_entry_id is None:
        raise ValueError("trim_input needs last_entry_id")
    if output_maxlen is not None and output_maxlen < 1:
        raise ValueError("output_maxlen must be positive")
    clash = RESERVED_FIELDS.intersection(extra_fields or ())
    if clash:
        raise ValueError(f"extra_fields may not set store-owned fields {sorted(clash)}")


def _fields_args(fields: Mapping[str, FieldValue] | None) -> list[FieldValue]:
    flat: list[FieldValue] = []
    for name, value in (fields or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"field names must be non-empty strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (str, bytes, int, float)):
            raise TypeError(f"field {name!r}: value must be str, bytes, int or float")
        flat += [name, value]
    return [len(flat), *flat]


def _updates_args(
    keys: StreamKeys, updates: Sequence[HashUpdate]
) -> tuple[list[str], list[FieldValue]]:
    """Script keys and arguments for ``hash_updates``; refuses keys outside the stream's slot
    (in Redis Cluster a script may only touch keys of one slot)."""
    update_keys: list[str] = []
    args: list[FieldValue] = [len(updates)]
    for update in updates:
        if not update.key.startswith(f"{keys.tag}:"):
            raise ValueError(f"hash update key {update.key!r} is not a key of {keys.tag}")
        if update.key in (keys.state, keys.meta, keys.summary, keys.producers):
            raise ValueError(f"hash update key {update.key!r} is owned by the store")
        update_keys.append(update.key)
        args += _fields_args(update.set)
        args += [len(update.delete), *update.delete]
    return update_keys, args


def _entries_args(entries: Sequence[Mapping[str, FieldValue]], what: str) -> list[FieldValue]:
    args: list[FieldValue] = [len(entries)]
    for entry in entries:
        if not entry or len(entry) > _MAX_FIELDS_PER_ENTRY:
            raise ValueError(f"each {what} needs 1..{_MAX_FIELDS_PER_ENTRY} fields")
        args += _fields_args(entry)
    return args


def _generation(version: int, nonce: str, count: int) -> str:
    return f"{version}.{nonce}.{count}"


def _parse_generation(generation: str) -> tuple[int, str, int] | None:
    parts = generation.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
        return None
    if not parts[1] or any(c not in "0123456789abcdef" for c in parts[1]):
        return None
    if int(parts[2]) > _MAX_CHUNKS:
        return None
    return int(parts[0]), parts[1], int(parts[2])


def _chunk_keys(keys: StreamKeys, version: int, nonce: str, count: int) -> list[str]:
    return [keys.state_chunk(version, i, nonce) for i in range(count)]


def _generation_keys(keys: StreamKeys, generation: str) -> list[str]:
    parsed = _parse_generation(generation) if generation else None
    return _chunk_keys(keys, *parsed) if parsed else []


def _pending_sets(keys: StreamKeys, members: Sequence[bytes]) -> list[tuple[str, list[str]]]:
    """(generation, its chunk keys) or (segment set, its segment keys) for each parseable
    pending member."""
    out = []
    for member in members:
        name = member.decode(errors="replace")
        parsed = _parse_generation(name)
        if parsed is not None:
            out.append((name, _chunk_keys(keys, *parsed)))
            continue
        staged = _parse_segment_member(name)
        if staged is not None:
            nonce, ids = staged
            out.append((name, [keys.state_segment(i, nonce) for i in ids]))
    return out


def _b(value: Any) -> bytes:
    """redis-py types replies as ``bytes | str``; this client is bytes-mode (checked at init)."""
    return value.encode() if isinstance(value, str) else bytes(value)


def _int(fields: Mapping[str, bytes], name: str) -> int:
    raw = fields.get(name)
    return int(raw) if raw else 0


def _text(fields: Mapping[str, bytes], name: str) -> str | None:
    raw = fields.get(name)
    return raw.decode() if raw else None


def _extra(fields: Mapping[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in fields.items() if k not in RESERVED_FIELDS}

