"""Stream kinds: what a stream's text is, so a worker knows how to read and summarize it.

A ``meeting`` stream is speaker turns: its text is fed to the model line by line and its
notes are decisions, action items and open questions. A ``log`` stream is log lines: each
line is parsed (plain, JSON or syslog), mined into a template, counted, and its notes are
templates, error counts, bursts and an incident timeline (``docs/logs.md``).

The kind is set in one of two ways, both plain Redis so no SDK is needed:

* per stream: ``HSET sinkstream:{<id>}:meta kind log`` (what ``sinkstream publish --kind log``
  and ``Producer.set_kind`` do); absent means ``meeting``;
* per entry: a ``kind`` field on the input entry (``XADD ... kind log text "..."``), which
  wins over the stream's kind for that entry.
"""

from __future__ import annotations

from typing import Literal, get_args

StreamKind = Literal["meeting", "log"]
KINDS: tuple[StreamKind, ...] = get_args(StreamKind)
MEETING: StreamKind = "meeting"
LOG: StreamKind = "log"
DEFAULT_KIND: StreamKind = MEETING
#: the field of a stream's meta hash that holds its kind
META_FIELD = "kind"


def parse_kind(value: bytes | str | None) -> StreamKind | None:
    """The kind a field names; None for an absent or empty one. Raises ValueError for an
    unknown kind (a writer's mistake worth a clear reason, never a silent meeting)."""
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    text = text.strip().lower()
    if not text:
        return None
    for kind in KINDS:
        if text == kind:
            return kind
    raise ValueError(f"unknown stream kind {text[:20]!r}; use one of {', '.join(KINDS)}")


def effective_kind(entry_kind: StreamKind | None, stream_kind: StreamKind | None) -> StreamKind:
    """An entry's kind: its own field, else its stream's, else the default (meeting)."""
    return entry_kind or stream_kind or DEFAULT_KIND
