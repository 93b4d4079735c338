"""What streams exist: the registry sorted set plus each input stream's length and last entry.

Producers ZADD every stream they append to into ``sinkstream:streams`` (score = last
activity, unix seconds). Entries written with a bare ``XADD`` are not registered until some
producer or worker touches the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from sinkstream.contracts.entries import InputEntry, parse_entry
from sinkstream.contracts.keys import STREAMS_REGISTRY, StreamKeys
from sinkstream.ids import validate_stream_id
from state_store.replies import as_text


@dataclass(frozen=True)
class StreamInfo:
    """One registered stream as ``sinkstream streams`` shows it."""

    stream_id: str
    length: int
    last_entry_id: str | None
    last_activity: float
    ended: bool = False

    @property
    def last_entry_time(self) -> float | None:
        """Unix seconds of the last entry (from its id), None for an empty stream."""
        if self.last_entry_id is None:
            return None
        return int(self.last_entry_id.split("-", 1)[0]) / 1000.0


def list_streams(client: redis.Redis, limit: int = 100) -> list[StreamInfo]:
    """The ``limit`` most recently active streams, newest first (one pipelined round trip)."""
    members: list[Any] = client.zrevrange(
        STREAMS_REGISTRY, 0, max(0, limit - 1), withscores=True
    )
    return describe_streams(client, [(as_text(m, "replace"), float(s)) for m, s in members])


def describe_streams(client: redis.Redis, members: list[tuple[str, float]]) -> list[StreamInfo]:
    """Length, last entry and end marker of the given ``(stream id, last activity)`` pairs,
    in one pipelined round trip; invalid ids (foreign registry members) are left out."""
    valid: list[tuple[str, float]] = []
    for stream_id, score in members:
        try:
            validate_stream_id(stream_id)
        except ValueError:
            continue  # never build keys from a foreign registry member
        valid.append((stream_id, score))
    if not valid:
        return []
    pipe = client.pipeline(transaction=False)
    for stream_id, _ in valid:
        key = StreamKeys.of(stream_id).input
        pipe.xlen(key)
        pipe.xrevrange(key, count=1)
    replies = pipe.execute()
    out = []
    for i, (stream_id, score) in enumerate(valid):
        length, last = int(replies[2 * i]), replies[2 * i + 1]
        last_id = as_text(last[0][0], "replace") if last else None
        parsed = parse_entry(last[0][0], last[0][1]) if last else None
        ended = isinstance(parsed, InputEntry) and parsed.eos
        out.append(StreamInfo(stream_id, length, last_id, score, ended))
    return out
