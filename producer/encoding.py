"""Turning what a caller publishes into input-entry fields: validated, UTF-8, size-safe.

Texts over ``max_entry_bytes`` (text + speaker, both are fed to the model) are split at
whitespace; ``b"".join`` of the pieces is the text. Invalid Unicode, empty texts, oversized
speakers and non-finite timestamps are refused here, before anything reaches Redis.
"""

from __future__ import annotations

import math
from typing import Any

#: A turn as accepted by :meth:`producer.Producer.publish_many`: a Turn, a
#: ``(text, speaker, ts)`` tuple (speaker and ts optional) or just the text.
TurnLike = Any
#: An encoded but not yet numbered entry: (text, speaker, ts as text; b"" / "" when absent).
EncodedEntry = tuple[bytes, bytes, str]

_WHITESPACE = (b" ", b"\n", b"\t", b"\r", b"\x0b", b"\x0c")


def split_utf8(data: bytes, max_bytes: int) -> list[bytes]:
    """Split UTF-8 ``data`` into chunks of at most ``max_bytes``, after whitespace.

    Each chunk ends just after the last ASCII whitespace that fits (ASCII bytes never occur
    inside a multi-byte character, so this is UTF-8 safe); a run without whitespace longer
    than the limit is cut at a character boundary. ``b"".join(chunks) == data``.
    """
    if max_bytes < 4:
        raise ValueError("max_bytes must be at least 4 (one UTF-8 character)")
    chunks: list[bytes] = []
    pos, size = 0, len(data)
    while size - pos > max_bytes:
        end = pos + max_bytes
        cut = max(data.rfind(ws, pos, end) for ws in _WHITESPACE) + 1
        if cut <= pos:  # no whitespace: back off to the start of a character
            cut = end
            while data[cut] & 0xC0 == 0x80:
                cut -= 1
        chunks.append(data[pos:cut])
        pos = cut
    chunks.append(data[pos:])
    return chunks


def _normalise(turn: TurnLike) -> tuple[str, str | None, float | None]:
    if isinstance(turn, str):
        return turn, None, None
    if isinstance(turn, tuple) and len(turn) == 3:  # Turn, or (text, speaker, ts)
        return turn
    values = tuple(turn)
    if not 1 <= len(values) <= 3:
        raise TypeError(f"a turn is text or (text, speaker, ts), got {len(values)} values")
    text, speaker, ts = (*values, None, None)[:3]
    return text, speaker, ts


def _encode_ts(ts: float | None) -> str:
    if ts is None:
        return ""
    value = ts if type(ts) is float else float(ts)
    if not math.isfinite(value):
        raise ValueError(f"ts must be a finite number of seconds, got {ts!r}")
    return repr(value)


def _encode_str(value: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode (unpaired surrogate at index {exc.start})"
        ) from None


def encode_turn(turn: TurnLike, max_entry_bytes: int) -> list[EncodedEntry]:
    """Validate and encode one turn into entry fields, split if over ``max_entry_bytes``."""
    text, speaker, ts = _normalise(turn)
    data = _encode_str(text, "text")
    if not data:
        raise ValueError("text is empty; use end_stream() to mark the end of a stream")
    spk = _encode_str(speaker, "speaker") if speaker else b""
    # workers count text + speaker against max_entry_bytes (both are fed to the model)
    if len(spk) > max_entry_bytes // 4:
        raise ValueError(f"speaker is {len(spk)} bytes, over {max_entry_bytes // 4} "
                         "(a quarter of max_entry_bytes)")
    ts_s = _encode_ts(ts)
    budget = max_entry_bytes - len(spk)
    if len(data) <= budget:
        return [(data, spk, ts_s)]
    return [(chunk, spk, ts_s) for chunk in split_utf8(data, budget)]
