"""The applied lines a log stream keeps in its input, so questions can quote single lines.

A meeting stream's input is trimmed once applied (``trim_applied_input``): its text lives on
in the state and the memory chunks. A log line's text lives on only in its template's counts,
so trimming a log stream down to nothing would leave ``sinkstream ask`` the template table
alone, and "what happened to blk_-1608..." unanswerable. So a log stream keeps its last
``keep_lines`` applied lines where they already are, in its input stream, and the commit trims
only what lies before them. Redis Streams are the log buffer; nothing is copied.

Where the kept lines start must not depend on how the stream was cut into batches (the logs
hash is bit-identical for any cut, ``workers/processing/log_batches.py``). So the marks are the
entry ids of every ``step``-th log line of the stream (line index k * step, ``step`` =
``keep_lines // MARKS``), and a batch trims up to the newest mark at least ``keep_lines``
lines back: between ``keep_lines`` and ``keep_lines + step`` applied lines stay. Marks older
than that are dropped, so the ``keep`` field holds about ``MARKS + 1`` of them (~0.5 KB,
rewritten only when a mark comes or goes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import msgpack
import redis

from sinkstream.contracts.entries import Rejected, parse_entry
from sinkstream.contracts.keys import StreamKeys
from sinkstream.ids import parse_entry_id
from workers.logs.parse import LogRecord, parse_line

#: the logs hash field of the marks: msgpack ``[[line index, entry id], ...]``, oldest first
FIELD = "keep"
#: marks per ``keep_lines``: the kept lines overshoot ``keep_lines`` by at most 1 / MARKS
MARKS = 16
#: a stored ``keep`` field holds about MARKS + 1 marks; one with more than this is refused
#: (a hostile or corrupt field must not cost a worker memory or time to decode)
MAX_STORED_MARKS = 1024


def kept_lines(keep_lines: int, max_stream_length: int) -> int:
    """The applied lines a log stream keeps: ``log_keep_lines``, at most half of
    ``max_stream_length``. Kept lines count toward the producers' backpressure cap, so the
    other half always stays free for lines not yet applied (else a small cap would fill with
    kept lines and hold producers back forever)."""
    return min(keep_lines, max_stream_length // 2)


class RetentionStateError(ValueError):
    """A ``keep`` field that is not a list of marks."""


class Retention:
    """One log stream's marks, and where its input may be trimmed."""

    def __init__(self, keep_lines: int, marks: list[tuple[int, str]] | None = None) -> None:
        self.keep_lines = keep_lines
        self.step = max(1, keep_lines // MARKS)
        self.marks: list[tuple[int, str]] = marks or []
        self._changed = False

    @classmethod
    def from_fields(cls, fields: Mapping[str, bytes] | None, keep_lines: int) -> Retention:
        """The marks in a logs hash (none: a stream without them, or a hash not read)."""
        raw = (fields or {}).get(FIELD)
        if raw is None:
            return cls(keep_lines)
        try:
            data: Any = msgpack.unpackb(raw, raw=False, max_bin_len=0, max_ext_len=0,
                                        max_array_len=MAX_STORED_MARKS)
            if not isinstance(data, list):
                raise ValueError("not a list of marks")
            marks = [(int(index), str(entry_id)) for index, entry_id in data]
            for index, entry_id in marks:
                parse_entry_id(entry_id)
                if index < 0:
                    raise ValueError("negative line index")
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise RetentionStateError(f"logs field {FIELD!r} is malformed ({exc})") from None
        return cls(keep_lines, marks)

    def line(self, index: int, entry_id: str) -> None:
        """Log line number ``index`` (0-based, in the stream) is entry ``entry_id``."""
        if self.keep_lines and index % self.step == 0:
            self.marks.append((index, entry_id))
            self._changed = True

    def trim_before(self, lines: int) -> str | None:
        """The first entry the input keeps once the stream holds ``lines`` log lines: the
        newest mark at least ``keep_lines`` lines back (older marks are dropped); None while
        there is none, i.e. nothing may be trimmed yet."""
        if not self.keep_lines:
            return None
        last = lines - self.keep_lines
        usable = [i for i, (index, _) in enumerate(self.marks) if index <= last]
        if not usable:
            return None
        if usable[-1] > 0:
            del self.marks[:usable[-1]]
            self._changed = True
        return self.marks[0][1]

    def take_changes(self) -> dict[str, bytes]:
        """The ``keep`` field when the marks changed since the last call."""
        if not self._changed:
            return {}
        self._changed = False
        return {FIELD: msgpack.packb([list(mark) for mark in self.marks], use_bin_type=True)}


class KeptLine(NamedTuple):
    """One applied log line read back from the input: its entry, time and record."""

    entry_id: str
    ts: float
    record: LogRecord


def read_kept(client: redis.Redis, stream_id: str, applied: str | None,
              limit: int) -> list[KeptLine]:
    """The last ``limit`` applied lines of a log stream still in its input, oldest first (read
    only; what ``ask`` quotes). Entries that are not text lines (an end-of-stream marker, a
    malformed entry) are skipped."""
    if not applied or limit <= 0:
        return []
    raw: Any = client.xrevrange(StreamKeys.of(stream_id).input, max=applied, count=limit)
    out = []
    for entry_id, fields in reversed(raw):
        entry = parse_entry(entry_id, fields)
        if isinstance(entry, Rejected) or not entry.text:
            continue
        when = entry.time
        record = parse_line(entry.text, when)
        out.append(KeptLine(entry.id, record.ts if record.ts is not None else when, record))
    return out
