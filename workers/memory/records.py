"""The records of a stream's memory hash and their msgpack encoding (never pickle).

Hash fields (all in ``StreamKeys.memory``):

- ``summary``: the latest summary folded into the next one (``SummaryMemory``);
- ``open``: the chunk still being filled (``OpenChunk``);
- ``next``: sequence number the next closed chunk gets; ``first``: oldest kept;
- ``chunk:<seq>``: a closed chunk (``Chunk``), zero-padded so fields sort by age;
- ``vec:<seq>``: that chunk's embedding (``ChunkVector``), written after the commit that
  closed the chunk, off the feed path (``workers/memory/vectors.py``);
- ``moments``: the key moments so far (``workers.memory.highlights``);
- ``window``: the closed chunks still inside the model's window, ``[[seq, end], ...]``: they
  cannot be retrieved yet (the window holds them), so they are embedded when they leave it.

Everything is derived from the committed entries and the previous memory only, so a batch
replayed after a crash rewrites exactly the same fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from workers.memory.highlights import Moment

SUMMARY_FIELD = "summary"
OPEN_FIELD = "open"
NEXT_FIELD = "next"
FIRST_FIELD = "first"
CHUNK_PREFIX = "chunk:"
VECTOR_PREFIX = "vec:"
MOMENTS_FIELD = "moments"
WINDOW_FIELD = "window"
#: fields read at the start of every batch (never the chunks themselves)
HEAD_FIELDS = (SUMMARY_FIELD, OPEN_FIELD, NEXT_FIELD, FIRST_FIELD, MOMENTS_FIELD, WINDOW_FIELD)
#: bumped if the record layout changes; records of another version are ignored, not misread
RECORD_VERSION = 1


class MemoryRecordError(ValueError):
    """A memory field that is not a record this version wrote."""


def chunk_field(seq: int) -> str:
    return f"{CHUNK_PREFIX}{seq:012d}"


def vector_field(seq: int) -> str:
    return f"{VECTOR_PREFIX}{seq:012d}"


def field_seq(name: str) -> int:
    """The sequence number in a ``chunk:<seq>`` or ``vec:<seq>`` field name."""
    return int(name.rpartition(":")[2])


@dataclass(frozen=True)
class SummaryMemory:
    """The summary the next one folds in: its text, the last entry and tokens it covers."""

    text: str
    covers: str
    tokens_seen: int

    def encode(self) -> bytes:
        return _pack({"text": self.text, "covers": self.covers, "tokens": self.tokens_seen})

    @classmethod
    def decode(cls, data: bytes) -> SummaryMemory:
        raw = _unpack(data)
        return cls(str(raw["text"]), str(raw["covers"]), int(raw["tokens"]))


@dataclass(frozen=True)
class OpenChunk:
    """Consecutive entries of the transcript, as the model read them.

    ``start``/``end``: token positions in the stream (end exclusive); ``ts``: first and last
    entry timestamps when the entries had one.
    """

    first_id: str
    last_id: str
    text: str
    start: int
    end: int
    speakers: tuple[str, ...] = ()
    ts: tuple[float, float] | None = None

    @property
    def tokens(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [self.first_id, self.last_id], "text": self.text,
                "start": self.start, "end": self.end, "speakers": list(self.speakers),
                "ts": list(self.ts) if self.ts is not None else None}

    def encode(self) -> bytes:
        return _pack(self.to_dict())

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OpenChunk:
        first, last = raw["entries"]
        ts = raw.get("ts")
        return cls(str(first), str(last), str(raw["text"]), int(raw["start"]), int(raw["end"]),
                   tuple(str(s) for s in raw.get("speakers") or ()),
                   (float(ts[0]), float(ts[1])) if ts else None)

    @classmethod
    def decode(cls, data: bytes) -> OpenChunk:
        return cls.from_dict(_unpack(data))


@dataclass(frozen=True)
class Chunk(OpenChunk):
    """A closed chunk: numbered, and embedded when an embedding model was configured."""

    seq: int = 0
    embedding: bytes = b""  # float16 little-endian, L2-normalised; empty: none
    embed_model: str = ""

    def encode(self) -> bytes:
        return _pack({**self.to_dict(), "seq": self.seq, "emb": self.embedding,
                      "emb_model": self.embed_model})

    @classmethod
    def decode(cls, data: bytes) -> Chunk:
        raw = _unpack(data)
        base = OpenChunk.from_dict(raw)
        return cls(base.first_id, base.last_id, base.text, base.start, base.end, base.speakers,
                   base.ts, seq=int(raw["seq"]), embedding=bytes(raw.get("emb") or b""),
                   embed_model=str(raw.get("emb_model") or ""))


@dataclass(frozen=True)
class ChunkVector:
    """A closed chunk's embedding: float16 little-endian, L2-normalised, and its model."""

    model: str
    embedding: bytes

    def encode(self) -> bytes:
        return _pack({"model": self.model, "emb": self.embedding})

    @classmethod
    def decode(cls, data: bytes) -> ChunkVector:
        raw = _unpack(data)
        return cls(str(raw["model"]), bytes(raw["emb"]))


@dataclass
class MemoryHead:
    """The small fields of the memory hash a batch needs (read once per batch)."""

    summary: SummaryMemory | None = None
    open: OpenChunk | None = None
    next_seq: int = 0
    first_seq: int = 0
    moments: list[Moment] = field(default_factory=list)
    #: closed chunks still in the model's window: (seq, end token position), oldest first
    in_window: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_fields(cls, values: list[bytes | None]) -> MemoryHead:
        """From ``HMGET memory *HEAD_FIELDS`` (missing fields are None)."""
        summary, open_, next_, first, moments, window = values
        return cls(
            SummaryMemory.decode(summary) if summary else None,
            OpenChunk.decode(open_) if open_ else None,
            int(next_) if next_ else 0,
            int(first) if first else 0,
            decode_moments(moments) if moments else [],
            decode_window(window) if window else [],
        )


def encode_moments(moments: Sequence[Moment]) -> bytes:
    return _pack({"moments": [m.to_list() for m in moments]})


def decode_moments(data: bytes) -> list[Moment]:
    raw = _unpack(data).get("moments")
    if not isinstance(raw, list):
        raise MemoryRecordError("memory record without moments")
    try:
        return [Moment.from_list(item) for item in raw]
    except (TypeError, ValueError) as exc:
        raise MemoryRecordError(f"unreadable key moment: {exc}") from None


def encode_window(chunks: Sequence[tuple[int, int]]) -> bytes:
    return _pack({"window": [[seq, end] for seq, end in chunks]})


def decode_window(data: bytes) -> list[tuple[int, int]]:
    raw = _unpack(data).get("window")
    if not isinstance(raw, list):
        raise MemoryRecordError("memory record without a window")
    return [(int(seq), int(end)) for seq, end in raw]


@dataclass
class MemoryWrite:
    """What one batch changes in the memory hash: fields to set, then to delete."""

    set: dict[str, bytes | str | int] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)
    #: chunks that left the model's window with this write (to embed once it is committed:
    #: from now on a question can retrieve them)
    evicted: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.set or self.delete)


def _pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": RECORD_VERSION, **obj}, use_bin_type=True)


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise MemoryRecordError(f"unreadable memory record: {exc}") from None
    if not isinstance(raw, dict) or raw.get("v") != RECORD_VERSION:
        raise MemoryRecordError("memory record of another format version")
    return raw
