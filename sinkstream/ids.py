"""Stream ids and stream entry ids: validated and compared in one place.

A stream id becomes part of every key of its stream (``sinkstream:{<id>}:...``), so it is
validated before it is ever interpolated: an id that could smuggle a ``}`` or ``:`` into
another stream's keyspace is refused. Entry ids are Redis Stream ids, ``<ms>-<seq>``; they
order as the pair (milliseconds, sequence), never as strings.

Ground floor: imports nothing of sinkstream, so every layer can use it.
"""

from __future__ import annotations

import re

MAX_STREAM_ID_LENGTH = 128
_STREAM_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]*")
#: largest part of an entry id (both parts are unsigned 64-bit integers in Redis)
MAX_ENTRY_ID_PART = 2**64 - 1


class InvalidStreamId(ValueError):
    """A stream id outside ``[A-Za-z0-9][A-Za-z0-9._-]*`` or longer than 128 characters."""


def validate_stream_id(stream_id: str) -> str:
    """Return ``stream_id`` unchanged if it is safe to use in keys, else raise InvalidStreamId."""
    if not isinstance(stream_id, str):
        raise InvalidStreamId(f"stream id must be a string, got {type(stream_id).__name__}")
    if not stream_id or len(stream_id) > MAX_STREAM_ID_LENGTH:
        raise InvalidStreamId(
            f"stream id must be 1..{MAX_STREAM_ID_LENGTH} characters, got {len(stream_id)}"
        )
    if not _STREAM_ID_RE.fullmatch(stream_id):
        raise InvalidStreamId(
            f"invalid stream id {stream_id!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return stream_id


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``; ValueError for anything else."""
    ms, sep, seq = entry_id.partition("-")
    if not (sep and ms.isdigit() and seq.isdigit() and ms.isascii() and seq.isascii()):
        raise ValueError(f"{entry_id!r} is not a stream entry id like '1700000000000-0'")
    ms_i, seq_i = int(ms), int(seq)
    if ms_i > MAX_ENTRY_ID_PART or seq_i > MAX_ENTRY_ID_PART:
        raise ValueError(f"{entry_id!r} is out of range")
    return ms_i, seq_i


def entry_id_key(entry_id: str | bytes | None) -> tuple[int, int]:
    """Sort key of an entry id (as Redis orders them); ``(-1, -1)`` for none, before all.

    Lenient where ``parse_entry_id`` is strict: ``"5"`` (a bare millisecond id, as XRANGE
    accepts) sorts as ``(5, 0)``. For ids that came back from Redis.
    """
    if not entry_id:
        return (-1, -1)
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return (int(ms), int(seq or 0))


def entry_id_ms(entry_id: str | bytes) -> int:
    """The millisecond part: when Redis appended the entry (auto-generated ids)."""
    return entry_id_key(entry_id)[0]


def entry_after(entry_id: str) -> str:
    """The smallest id above ``entry_id``: ``XTRIM MINID`` with it drops ``entry_id`` too."""
    ms, seq = parse_entry_id(entry_id)
    return f"{ms + 1}-0" if seq == MAX_ENTRY_ID_PART else f"{ms}-{seq + 1}"
