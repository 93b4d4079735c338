"""Reading committed states: the head (one round trip), the hash without the bytes, the bytes.

Reads need no MULTI: a generation's chunks never change once written and are deleted only by
the commit that replaces them, so "every chunk of the generation read from the hash is still
there" proves the bytes belong to that version; a missing chunk means a commit raced the read,
and ``load`` simply reads again. Segments are immutable too and deleted only by the commit
that drops them from the ``segments`` field, so a load that finds the field unchanged but a
segment gone refuses the state by name instead of waiting for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.replies import as_bytes, as_text
from state_store.staging import parse_generation, parse_segments, segment_key

#: State hash fields the store owns; a commit's ``state_fields`` may not overwrite them.
RESERVED_FIELDS = frozenset(
    {"version", "fence", "last_entry_id", "data", "generation", "chunks", "nbytes",
     "committed_ms", "segments"}
)

LOAD_ATTEMPTS = 8
_HEAD_FIELDS = ("version", "segments", "generation", "last_entry_id")


class StateReadError(RuntimeError):
    """The stored state could not be read consistently (chunks kept vanishing, size wrong)."""


@dataclass(frozen=True)
class StateHead:
    """The state hash's head and the stream's pending (staged, uncommitted) sets, read in one
    round trip by :meth:`StateReader.head`.

    Enough for a hot-cache check (``version``), for reading a segmented state in one more round
    trip (``load(head=...)``) and for committing the batch that starts from it without reading
    again (``CommitRequest.head``): the commit script re-checks every part of it that matters.
    """

    version: int  # commits so far (0: no state yet)
    segments: dict[int, str]  # segment id -> name "<id>.<nonce>.<nbytes>"
    #: the chunk set holding the state, "<version>.<nonce>.<count>" ('' = inline, or none)
    generation: str = ""
    last_entry_id: str | None = None
    #: members of the pending set: staged chunk and segment sets not committed (yet)
    pending: tuple[str, ...] = ()
    #: the ``segments`` field as stored (the commit script compares it byte for byte)
    segments_field: str = ""

    @property
    def segment_ids(self) -> list[int]:
        return sorted(self.segments)


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


def request_head(pipe: redis.client.Pipeline, stream_id: str) -> None:
    """Queue the two reads of a head on ``pipe`` (replies: ``parse_head``'s arguments)."""
    keys = StreamKeys.of(stream_id)
    pipe.hmget(keys.state, _HEAD_FIELDS)
    pipe.zrange(keys.state_pending, 0, -1)


def parse_head(stream_id: str, fields: Sequence[Any], members: Sequence[Any]) -> StateHead:
    """A ``StateHead`` from the state hash's ``version, segments, generation, last_entry_id``
    (HMGET order, None or '' for missing) and the pending set's members."""
    version, segments, generation, last_id = fields
    segments_field = as_text(segments, "replace")
    return StateHead(
        version=int(version) if version else 0,
        segments=_segments(stream_id, segments_field),
        generation=as_text(generation, "replace"),
        last_entry_id=as_text(last_id) or None,
        pending=tuple(as_text(m, "replace") for m in members),
        segments_field=segments_field,
    )


class StateReader:
    """Reads of the state hash, its chunks and its segments (bytes-mode client)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def version(self, stream_id: str) -> int:
        """The committed version (0 = no state): one HGET, for the worker's hot cache."""
        raw = self.client.hget(StreamKeys.of(stream_id).state, "version")
        return int(raw) if raw else 0

    def head(self, stream_id: str) -> StateHead:
        """Version, segment names, generation, last entry id and the pending set members in
        one pipelined round trip (version 0: no state yet)."""
        pipe = self.client.pipeline(transaction=False)
        request_head(pipe, stream_id)
        fields, members = pipe.execute()
        return parse_head(stream_id, fields, members)

    def info(self, stream_id: str) -> StateInfo | None:
        """Everything about the stored state but its bytes; None if nothing was committed."""
        keys = StreamKeys.of(stream_id)
        names = [as_bytes(n) for n in self.client.hkeys(keys.state) if as_bytes(n) != b"data"]
        if not names:
            return None
        values = self.client.hmget(keys.state, names)
        fields = {n.decode(): as_bytes(v) for n, v in zip(names, values, strict=True)
                  if v is not None}
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
            segments=len(_segments(stream_id, as_text(fields.get("segments"), "replace"))),
        )

    def load(self, stream_id: str, head: StateHead | None = None) -> StoredState | None:
        """The committed state with its bytes, or None if the stream has none yet.

        With ``head`` (from :meth:`head`), the hash and the segments it names are read in one
        pipelined round trip; if a commit moved on meanwhile the read is simply repeated.
        """
        keys = StreamKeys.of(stream_id)
        names = head.segments if head is not None else None
        for _ in range(LOAD_ATTEMPTS):
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(keys.state)
            wanted = sorted((names or {}).items())
            for _, name in wanted:
                pipe.get(segment_key(keys, name))
            raw, *parts = pipe.execute()
            fields = {as_text(k): as_bytes(v) for k, v in raw.items()}
            if not fields.get("version"):
                return None
            stored_names = _segments(stream_id, as_text(fields.get("segments"), "replace"))
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
            f"stream {stream_id!r}: state changed {LOAD_ATTEMPTS} times while being read"
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
                    f"{now.version} is missing (key {segment_key(keys, name)!r}; "
                    f"{len(missing)} of {len(wanted)} segments missing)"
                )
            return None
        return {seg: as_bytes(part) for (seg, _), part in zip(wanted, parts, strict=True)}

    def _state_bytes(self, keys: StreamKeys, fields: Mapping[str, bytes]) -> bytes | None:
        """Inline data, or the chunks named by ``generation``; None if they are gone."""
        if "data" in fields:
            return fields["data"]
        generation = fields.get("generation", b"").decode()
        if not generation:
            raise StateReadError(f"stream {keys.stream_id!r}: state hash has no data")
        chunks = parse_generation(generation)
        if chunks is None:
            raise StateReadError(f"stream {keys.stream_id!r}: bad generation {generation!r}")
        pipe = self.client.pipeline(transaction=False)
        for key in chunks.keys(keys):
            pipe.get(key)
        parts = pipe.execute()
        if any(part is None for part in parts):
            return None
        return b"".join(parts)


def _segments(stream_id: str, field_value: str) -> dict[int, str]:
    """The ``segments`` field parsed; a damaged one is refused naming the stream."""
    try:
        return parse_segments(field_value)
    except ValueError as exc:
        raise StateReadError(f"stream {stream_id!r}: {exc}") from None


def _int(fields: Mapping[str, bytes], name: str) -> int:
    raw = fields.get(name)
    return int(raw) if raw else 0


def _text(fields: Mapping[str, bytes], name: str) -> str | None:
    raw = fields.get(name)
    return raw.decode() if raw else None


def _extra(fields: Mapping[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in fields.items() if k not in RESERVED_FIELDS}
