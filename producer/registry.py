"""What streams exist: the registry sorted set plus each input stream's length and last entry,
and what the workers applied of it.

Producers ZADD every stream they append to into ``sinkstream:streams`` (score = last
activity, unix seconds). Entries written with a bare ``XADD`` are registered by the workers'
dispatcher (at once where Redis publishes keyspace events, else by its discovery scan).

Workers delete applied input (``trim_applied_input``), so a finished stream's input is empty:
how many entries it had, when the last one came and whether it ended are read from what the
workers committed (the state's last applied entry id, meta ``entries_applied`` and ``ended``),
not from the input alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from sinkstream.contracts.entries import InputEntry, parse_entry
from sinkstream.contracts.keys import STREAMS_REGISTRY, StreamKeys
from sinkstream.ids import entry_id_key, entry_id_ms, validate_stream_id
from state_store.replies import as_text


@dataclass(frozen=True)
class StreamInfo:
    """One registered stream as ``sinkstream streams`` shows it."""

    stream_id: str
    #: entries in the input stream now: the unapplied ones, and the applied ones not trimmed
    #: (none by default, a log stream's last ``log_keep_lines``)
    length: int
    #: the last entry written or applied, whichever is later (None: nothing ever)
    last_entry_id: str | None
    last_activity: float
    ended: bool = False
    #: entries the workers applied into the state (meta ``entries_applied``; 0 for streams
    #: committed before the counter existed)
    applied: int = 0

    @property
    def last_entry_time(self) -> float | None:
        """Unix seconds of the last entry (from its id), None for an empty stream."""
        if self.last_entry_id is None:
            return None
        return entry_id_ms(self.last_entry_id) / 1000.0


def _later(a: str | None, b: str | None) -> str | None:
    """The later of two entry ids (either may be None)."""
    if a is None or b is None:
        return a or b
    return max(a, b, key=entry_id_key)


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
        keys = StreamKeys.of(stream_id)
        pipe.xlen(keys.input)
        pipe.xrevrange(keys.input, count=1)
        pipe.hmget(keys.state, ["last_entry_id"])
        pipe.hmget(keys.meta, ["entries_applied", "ended"])
    replies = pipe.execute()
    return [_info(stream_id, score, *replies[4 * i : 4 * i + 4])
            for i, (stream_id, score) in enumerate(valid)]


def _info(stream_id: str, score: float, length: Any, last: Any, state: Any,
          meta: Any) -> StreamInfo:
    """One stream's row from its input (length, last entry) and what was committed."""
    last_id = as_text(last[0][0], "replace") if last else None
    parsed = parse_entry(last[0][0], last[0][1]) if last else None
    applied_id = as_text(state[0], "replace") if state[0] else None
    applied, ended = meta
    return StreamInfo(
        stream_id, int(length), _later(last_id, applied_id), score,
        ended=(isinstance(parsed, InputEntry) and parsed.eos) or as_text(ended or b"") == "1",
        applied=int(applied or 0))
