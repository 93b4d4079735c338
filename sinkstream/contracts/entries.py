"""The input-entry contract, parsed in one place for producers, workers and tools.

An input entry is a plain Redis Stream entry on ``sinkstream:{<id>}:in``, so any client can
write one (``redis-cli XADD 'sinkstream:{standup}:in' '*' text "Alice: ship it"``). Fields:

``text``     required, UTF-8 (may be empty only on an end-of-stream entry)
``speaker``  optional, UTF-8; empty means none
``ts``       optional, seconds as a decimal string (media time or unix time, producer's choice)
``eos``      optional, ``"1"`` marks the end of the stream
``kind``     optional, ``meeting`` or ``log`` (``sinkstream.contracts.kinds``); absent: the
             stream's kind

Other fields are ignored. Because the writer may be anything, :func:`parse_entry` never
raises on bad data: it returns a :class:`Rejected` with a reason that a worker can put on the
dead-letter stream, and the stream continues.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sinkstream.contracts.kinds import StreamKind, parse_kind
from sinkstream.ids import entry_id_ms

TEXT = "text"
SPEAKER = "speaker"
TS = "ts"
EOS = "eos"
KIND = "kind"

_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"", "0", "false", "no"})


@dataclass(frozen=True, slots=True)
class InputEntry:
    """One valid input entry. ``id`` is the Redis Stream entry id (``"1700000000000-0"``)."""

    id: str
    text: str
    speaker: str | None = None
    ts: float | None = None
    eos: bool = False
    #: the entry's own kind field; None: the stream's kind applies
    kind: StreamKind | None = None

    @property
    def time(self) -> float:
        """Unix seconds: the producer's ``ts``, else when Redis appended the entry (its id),
        never the clock, so a replay dates the entry the same."""
        if self.ts is not None:
            return self.ts
        return entry_id_ms(self.id) / 1000.0


@dataclass(frozen=True, slots=True)
class Rejected:
    """An entry that breaks the contract: ``reason`` says why, ``fields`` what it held.

    ``fields`` are decoded with replacement characters so they can always be written to the
    dead-letter stream and shown to a person.
    """

    id: str
    reason: str
    fields: dict[str, str]


ParsedEntry = InputEntry | Rejected


def _decode_field(name: str, value: bytes | str) -> str:
    """Decode one field strictly; the error names the field and the byte offset."""
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Reject(f"field {name!r} is not valid UTF-8 (byte offset {exc.start})") from None


class _Reject(Exception):
    """Internal: carries a rejection reason out of the field checks."""


def _lossy(fields: Mapping[Any, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in fields.items():
        k = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        v = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        out[k] = v
    return out


def parse_entry(
    entry_id: bytes | str,
    fields: Mapping[Any, Any],
    *,
    max_text_bytes: int | None = None,
) -> ParsedEntry:
    """Turn a raw stream entry (bytes or str keys/values) into an InputEntry or a Rejected.

    ``max_text_bytes`` lets a worker refuse giant texts (text + speaker, both are fed to the
    model) written by clients that bypass the producer's splitting; ``None`` accepts any size.
    """
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    try:
        return _parse(eid, fields, max_text_bytes)
    except _Reject as exc:
        return Rejected(eid, str(exc), _lossy(fields))


def _parse(eid: str, fields: Mapping[Any, Any], max_text_bytes: int | None) -> InputEntry:
    raw = _known_fields(fields)
    eos = _parse_eos(raw.get(EOS))
    if TEXT not in raw and not eos:
        raise _Reject("missing required field 'text'")
    text_value = raw.get(TEXT, b"")
    if max_text_bytes is not None and len(text_value) > max_text_bytes:
        raise _Reject(f"text is {len(text_value)} bytes, over the {max_text_bytes}-byte limit")
    # the speaker is fed to the model too ("speaker: text"), so it counts against the limit
    speaker_value = raw.get(SPEAKER, b"")
    if max_text_bytes is not None and len(text_value) + len(speaker_value) > max_text_bytes:
        raise _Reject(f"text + speaker are {len(text_value) + len(speaker_value)} bytes, over "
                      f"the {max_text_bytes}-byte limit")
    text = _decode_field(TEXT, text_value)
    if not text and not eos:
        raise _Reject("field 'text' is empty (only an end-of-stream entry may be empty)")
    speaker = _decode_field(SPEAKER, raw[SPEAKER]) if SPEAKER in raw else ""
    ts = _parse_ts(raw.get(TS))
    return InputEntry(eid, text, speaker or None, ts, eos, _parse_kind(raw.get(KIND)))


#: the text field as Redis returns it (bytes): an entry of that field alone is the common case
_TEXT_KEY = TEXT.encode()


def _known_fields(fields: Mapping[Any, Any]) -> dict[str, bytes | str]:
    """The contract's fields of an entry by name; others are ignored. An entry whose only
    field is ``text`` (a log line, most caption lines) skips the loop over its keys, which
    cost as much as the rest of the read for a one-field entry."""
    if len(fields) == 1 and (only_text := fields.get(_TEXT_KEY)) is not None:
        return {TEXT: only_text}
    raw: dict[str, bytes | str] = {}
    for key, value in fields.items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if name in (TEXT, SPEAKER, TS, EOS, KIND):
            raw[name] = value
    return raw


def _parse_eos(value: bytes | str | None) -> bool:
    if value is None:
        return False
    flag = _decode_field(EOS, value).strip().lower()
    if flag in _TRUE:
        return True
    if flag in _FALSE:
        return False
    raise _Reject(f"field 'eos' must be '1' (end of stream), got {flag[:20]!r}")


def _parse_kind(value: bytes | str | None) -> StreamKind | None:
    if value is None:
        return None
    try:
        return parse_kind(_decode_field(KIND, value))
    except ValueError as exc:
        raise _Reject(f"field 'kind': {exc}") from None


def _parse_ts(value: bytes | str | None) -> float | None:
    if value is None:
        return None
    text = _decode_field(TS, value).strip()
    if not text:
        return None
    try:
        ts = float(text)
    except ValueError:
        raise _Reject(f"field 'ts' must be a number of seconds, got {text[:30]!r}") from None
    if not math.isfinite(ts):
        raise _Reject(f"field 'ts' must be finite, got {text[:30]!r}")
    return ts
