"""Staging chunks and segments before a commit, the names they are stored under, and the
cleanup of staged sets that were never committed.

Large states (over ``chunk_bytes``) are chunked. The chunks are written *before* the commit
script, under keys carrying the new version and a per-attempt nonce, with an expiry, and are
registered in the stream's ``state:pending`` sorted set under their generation
``"<version>.<nonce>.<count>"``. The segments of a segmented state that are not stored yet are
staged the same way (one key per segment, ``<id>.<nonce>``; pending member
``"s.<nonce>.<id>,<id>..."``). Nothing reads staged keys until the commit script names them in
the state hash, which also makes them permanent and unregisters them in the same atomic step.

A crash between staging and committing leaves orphans: the next successful commit deletes every
pending set listed when its batch started but its own (``orphans`` of the commit request),
:meth:`Staging.cleanup_orphans` deletes old ones on demand, and failing both they expire
(``orphan_ttl_s``). A staged set is deleted only while it is still pending (the scripts check
``ZSCORE``), so a set that was committed meanwhile is never touched.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from sinkstream.contracts.keys import StreamKeys
from state_store import scripts
from state_store.replies import as_text

CHUNK_WRITE_BATCH = 16  # keys per pipeline round trip while staging
MAX_CHUNKS = 100_000  # bounds the key list built from a (possibly damaged) generation name
MAX_SEGMENTS = 1_000_000  # bounds segment ids and lists read back from Redis

_HEX = frozenset("0123456789abcdef")


# ----- names -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkSet:
    """A chunked state's keys: ``state:<version>.<nonce>:<i>`` for i < count."""

    version: int
    nonce: str
    count: int

    @property
    def generation(self) -> str:
        """The name in the state hash's ``generation`` field and in the pending set."""
        return f"{self.version}.{self.nonce}.{self.count}"

    def keys(self, keys: StreamKeys) -> list[str]:
        return [keys.state_chunk(self.version, i, self.nonce) for i in range(self.count)]


def parse_generation(generation: str) -> ChunkSet | None:
    """``"<version>.<nonce>.<count>"`` -> its chunk set; None if it is not one."""
    parts = generation.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
        return None
    if not parts[1] or not _HEX.issuperset(parts[1]):
        return None
    if int(parts[2]) > MAX_CHUNKS:
        return None
    return ChunkSet(int(parts[0]), parts[1], int(parts[2]))


def generation_keys(keys: StreamKeys, generation: str) -> list[str]:
    """The chunk keys a ``generation`` field names ([] for none or a damaged one)."""
    parsed = parse_generation(generation) if generation else None
    return parsed.keys(keys) if parsed else []


def parse_segments(field_value: str) -> dict[int, str]:
    """The ``segments`` field ``"<id>.<nonce>.<nbytes> ..."`` -> {id: name}.

    ValueError names the first damaged entry; readers turn it into a StateReadError naming the
    stream."""
    out: dict[int, str] = {}
    for token in field_value.split():
        parts = token.split(".")
        if not (len(parts) == 3 and all(p.isdigit() and p.isascii() for p in parts[::2])
                and int(parts[0]) < MAX_SEGMENTS and int(parts[0]) not in out
                and parts[1] and _HEX.issuperset(parts[1])):
            raise ValueError(f"bad segments field entry {token!r}")
        out[int(parts[0])] = token
    return out


def segment_key(keys: StreamKeys, name: str) -> str:
    """The key of the segment named ``"<id>.<nonce>.<nbytes>"``."""
    seg, nonce, _ = name.split(".")
    return keys.state_segment(int(seg), nonce)


def segment_size(name: str) -> int:
    return int(name.rsplit(".", 1)[1])


def parse_segment_member(name: str) -> tuple[str, list[int]] | None:
    """A pending member ``s.<nonce>.<id>,<id>...`` -> (nonce, ids); None if not one."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "s" or not parts[1]:
        return None
    if not _HEX.issuperset(parts[1]):
        return None
    ids = parts[2].split(",")
    if not ids or len(ids) > MAX_CHUNKS or not all(i.isdigit() and i.isascii() for i in ids):
        return None
    return parts[1], [int(i) for i in ids]


def pending_sets(keys: StreamKeys, members: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(generation, its chunk keys) or (segment set, its segment keys) for each parseable
    pending member; unparseable members are skipped (they expire with nothing to delete)."""
    out = []
    for name in members:
        chunks = parse_generation(name)
        if chunks is not None:
            out.append((name, chunks.keys(keys)))
            continue
        staged = parse_segment_member(name)
        if staged is not None:
            nonce, ids = staged
            out.append((name, [keys.state_segment(i, nonce) for i in ids]))
    return out


# ----- segment plans ---------------------------------------------------------------------------
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
class SegmentPlan:
    """What a commit does to the segment keys."""

    new_field: str = ""  # the new ``segments`` field ('' = a whole state: no segments)
    member: str = ""  # pending member of the staged segments ('' = nothing staged)
    write: dict[str, bytes] = field(default_factory=dict)  # staged key -> bytes
    evicted: list[str] = field(default_factory=list)  # stored keys to delete
    nbytes: int = 0  # bytes of every segment of the new window


def check_segment_update(state: bytes | None, update: SegmentUpdate | None) -> None:
    """Refuse a malformed update (ValueError/TypeError) before anything touches Redis."""
    if update is None:
        return
    if state is None:
        raise ValueError("segments need state (the segmented state's header)")
    keep = list(update.keep)
    for seg in [*keep, *update.write]:
        if isinstance(seg, bool) or not isinstance(seg, int) or not 0 <= seg < MAX_SEGMENTS:
            raise ValueError(f"segment ids must be ints in [0, {MAX_SEGMENTS}), got {seg!r}")
    if len(set(keep)) != len(keep):
        raise ValueError("segments.keep lists a segment twice")
    extra = set(update.write) - set(keep)
    if extra:
        raise ValueError(f"segments.write has segments {sorted(extra)} outside keep")
    for seg, data in update.write.items():
        if not isinstance(data, bytes):
            raise TypeError(f"segment {seg}: bytes needed, got {type(data).__name__}")


def missing_segments(stored: Mapping[int, str], update: SegmentUpdate) -> list[int]:
    """Ids the update keeps that are neither stored nor written."""
    return [s for s in sorted(update.keep) if s not in update.write and s not in stored]


def plan_segments(
    keys: StreamKeys, stored: Mapping[int, str], update: SegmentUpdate | None
) -> SegmentPlan:
    """Keys to stage and to delete, from the stored segment names and the update (None: the
    new state is whole, so every stored segment goes). Every kept id must be stored or written
    (:func:`missing_segments`)."""
    if update is None:
        return SegmentPlan(evicted=[segment_key(keys, n) for n in stored.values()])
    missing = missing_segments(stored, update)
    if missing:
        raise ValueError(f"segments {missing} are neither stored nor written")
    nonce = os.urandom(8).hex()
    names: dict[int, str] = {}
    write: dict[str, bytes] = {}
    for seg in sorted(update.keep):
        if seg in update.write:
            names[seg] = f"{seg}.{nonce}.{len(update.write[seg])}"
            write[segment_key(keys, names[seg])] = update.write[seg]
        else:
            names[seg] = stored[seg]
    kept = set(names.values())
    member = f"s.{nonce}.{','.join(str(s) for s in sorted(update.write))}" if write else ""
    return SegmentPlan(
        new_field=" ".join(names[s] for s in sorted(names)), member=member, write=write,
        evicted=[segment_key(keys, n) for n in stored.values() if n not in kept],
        nbytes=sum(segment_size(n) for n in names.values()),
    )


# ----- writing and cleaning up -----------------------------------------------------------------
class Staging:
    """Writes staged chunk and segment keys and deletes staged sets nobody committed."""

    def __init__(self, client: redis.Redis, *, chunk_bytes: int, orphan_ttl_ms: int) -> None:
        self.client = client
        self.chunk_bytes = chunk_bytes
        self.orphan_ttl_ms = orphan_ttl_ms
        self._cleanup = client.register_script(scripts.STATE_CLEANUP)

    def write_chunks(self, keys: StreamKeys, version: int, data: bytes) -> ChunkSet:
        """Write ``data`` as expiring chunk keys, registered as pending; nobody reads them yet."""
        view = memoryview(data)
        chunks = ChunkSet(version, os.urandom(8).hex(), -(-len(data) // self.chunk_bytes))
        self.client.zadd(keys.state_pending, {chunks.generation: int(time.time() * 1000)})
        for start in range(0, chunks.count, CHUNK_WRITE_BATCH):
            pipe = self.client.pipeline(transaction=False)
            for i in range(start, min(chunks.count, start + CHUNK_WRITE_BATCH)):
                piece = view[i * self.chunk_bytes : (i + 1) * self.chunk_bytes]
                pipe.set(keys.state_chunk(version, i, chunks.nonce), piece, px=self.orphan_ttl_ms)
            pipe.execute()
        return chunks

    def write_segments(self, keys: StreamKeys, plan: SegmentPlan) -> None:
        """Stage the new segments as expiring keys, registered as pending first (one round
        trip per batch of keys): nobody reads them until the commit names them."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(keys.state_pending, {plan.member: int(time.time() * 1000)})
        for i, (key, data) in enumerate(plan.write.items(), start=1):
            pipe.set(key, data, px=self.orphan_ttl_ms)
            if i % CHUNK_WRITE_BATCH == 0:
                pipe.execute()
                pipe = self.client.pipeline(transaction=False)
        pipe.execute()

    def forget(
        self, keys: StreamKeys, chunks: ChunkSet | None, segments: SegmentPlan | None
    ) -> None:
        """Best effort: drop what a commit that failed (its outcome unknown: the reply may
        have been lost) had staged. Never live keys: the script deletes only sets still
        pending and not committed."""
        sets = _staged_sets(keys, chunks, segments)
        if sets:
            try:
                self._delete_sets(keys, sets)
            except redis.RedisError:
                pass  # the next commit, cleanup_orphans or the keys' expiry will do it

    def discard(
        self, keys: StreamKeys, chunks: ChunkSet | None, segments: SegmentPlan | None
    ) -> None:
        """Best effort: drop what a refused commit had staged. The refusal proves the set was
        not committed and its keys carry this attempt's nonce, so they are deleted whether
        or not still pending: a concurrent commit may have unregistered (and deleted) the set
        between its registration and the writes of its keys, which would otherwise outlive
        the refusal until they expire."""
        sets = _staged_sets(keys, chunks, segments)
        if sets:
            pipe = self.client.pipeline(transaction=False)
            for name, set_keys in sets:
                pipe.delete(*set_keys)
                pipe.zrem(keys.state_pending, name)
            try:
                pipe.execute()
            except redis.RedisError:
                pass  # the next commit, cleanup_orphans or the keys' expiry will do it

    def cleanup_orphans(self, stream_id: str, min_age_s: float = 600.0) -> int:
        """Delete uncommitted chunk and segment sets older than ``min_age_s``; return how many.

        The age guard spares a write in progress; a set committed meanwhile is never touched
        (the script re-checks). Commits already do this for every set but their own.
        """
        keys = StreamKeys.of(stream_id)
        cutoff = int((time.time() - min_age_s) * 1000)
        members: Any = self.client.zrangebyscore(keys.state_pending, "-inf", cutoff)
        sets = pending_sets(keys, [as_text(m, "replace") for m in members])
        return self._delete_sets(keys, sets) if sets else 0

    def _delete_sets(self, keys: StreamKeys, sets: Sequence[tuple[str, list[str]]]) -> int:
        script_keys: list[str] = [keys.state, keys.state_pending]
        args: list[str | int] = []
        for name, set_keys in sets:
            script_keys += set_keys
            args += [name, len(set_keys)]
        return int(self._cleanup(keys=script_keys, args=args))


def _staged_sets(
    keys: StreamKeys, chunks: ChunkSet | None, segments: SegmentPlan | None
) -> list[tuple[str, list[str]]]:
    """(pending member, keys) of what one commit attempt staged."""
    sets: list[tuple[str, list[str]]] = []
    if chunks is not None:
        sets.append((chunks.generation, chunks.keys(keys)))
    if segments is not None and segments.write:
        sets.append((segments.member, list(segments.write)))
    return sets
