"""A log stream's template table: per template its count, levels, first and last time, a
per-minute history, and the bursts (incidents) found in it.

Everything here is a pure function of the lines applied, in order, and their times (the line's
own time, else its entry's): the table is committed with the state in the batch's fenced
commit, so after a crash or a move the next worker continues from exactly the committed table,
and a replay of the same entries gives a bit-identical one (the encoding is deterministic).

Stored as fields of the stream's logs hash, so that a batch writes what it changed
(``take_changes``): ``table:head`` (line and level counts, the notes cursor, the bucket range
and the incidents) and one ``table:t:<id>`` per template, rewritten by the batches whose
lines it counted. A template keeps the ``history_buckets`` before its own latest bucket (so
a template no batch touches is never rewritten, and the rows do not depend on where batches
were cut); a baseline looks back at most that far. The first format, one ``table`` blob, is still
read (``decode``).

Bursts. Lines are counted per template in buckets of ``bucket_s`` seconds of log time. When a
batch adds lines to a bucket, that bucket is a burst if it holds at least ``min_count`` lines
and ``factor`` times the template's own baseline: its mean count per bucket over the
``history_buckets`` before it (buckets where it did not occur count as zeros, so a template
new to an established stream has a baseline of zero). A stream younger than
``warmup_buckets`` finds no bursts: at its start every template is new. Consecutive burst
buckets of a template are one incident, whose count and first/last time grow as its lines
arrive. An incident also cites the entries of its first and last line, as every bullet of the
notes does: each bucket stores the entry of its first line (its first line may come a batch
before the bucket bursts), and holds the entry of its last line only in memory, because an
incident grows only by the buckets the current batch counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from sinkstream.contracts.formats import NewerFormatError, is_newer
from sinkstream.ids import entry_id_key
from workers.logs.parse import LEVELS, PROBLEM_LEVELS

#: the format of ``table:head`` and the fields beside it; 1 was the single ``table`` blob, 2 the
#: fields without the buckets' and incidents' entries (still read: they cite no entries)
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
LEGACY_VERSION = 1
HEAD_FIELD = "table:head"
TEMPLATE_PREFIX = "table:t:"
#: characters kept of a template's first message (the example line the notes quote)
EXAMPLE_CHARS = 300
#: incidents kept per stream (the oldest go first)
MAX_INCIDENTS = 200
_SEVERE_FIRST = LEVELS[::-1]


class TableStateError(ValueError):
    """A stored template table that cannot be read."""


class TableTooNewError(TableStateError, NewerFormatError):
    """A table stored by a newer build (its head's format version is past ours)."""

    def __init__(self, version: int) -> None:
        super().__init__(self._newer("template table", version, FORMAT_VERSION))


@dataclass(frozen=True)
class BurstConfig:
    bucket_s: float = 60.0
    min_count: int = 10
    factor: float = 5.0
    history_buckets: int = 120
    warmup_buckets: int = 5


#: one bucket of a template: [count, first ts, last ts, first entry, last entry] (a list, not a
#: dataclass: it is updated once per line). The last entry is not stored: it is known for the
#: buckets the current batch counted, "" for the others; the first entry is "" in format 2.
Cell = list[Any]


@dataclass
class TemplateStats:
    """One template's counts. ``buckets`` maps a bucket index to its :data:`Cell` for the
    last ``history_buckets`` buckets of the stream (older ones are dropped)."""

    template_id: int
    template: str
    count: int = 0
    levels: dict[str, int] = field(default_factory=dict)
    first_ts: float = math.inf
    last_ts: float = -math.inf
    first_entry: str = ""
    last_entry: str = ""
    example: str = ""
    buckets: dict[int, Cell] = field(default_factory=dict)
    #: the stream's line count when the template was created (0-based line number)
    first_line: int = 0

    @property
    def level(self) -> str | None:
        """The most severe level its lines had (None: none had one)."""
        for lv in _SEVERE_FIRST:
            if self.levels.get(lv):
                return lv
        return None

    @property
    def problem(self) -> bool:
        """Whether any of its lines was a warning or worse (notes list it as a problem)."""
        return any(self.levels.get(lv) for lv in PROBLEM_LEVELS)


@dataclass(frozen=True)
class Incident:
    """A burst of one template: consecutive burst buckets, their line count, times and the
    entries of their first and last line ("" in a table of format 2)."""

    template_id: int
    start_bucket: int
    end_bucket: int
    count: int
    first_ts: float
    last_ts: float
    baseline: float
    first_entry: str = ""
    last_entry: str = ""


@dataclass
class Table:
    """The template table of one stream (mutated by one batch, on its own decoded copy)."""

    config: BurstConfig = field(default_factory=BurstConfig)
    templates: dict[int, TemplateStats] = field(default_factory=dict)
    incidents: list[Incident] = field(default_factory=list)
    lines: int = 0
    levels: dict[str, int] = field(default_factory=dict)
    first_bucket: int | None = None
    last_bucket: int | None = None
    #: the line count the last published log notes covered ("new since the last update")
    notes_cursor: int = 0
    #: (template id, bucket) counted since ``close_batch`` (not persisted)
    _touched: set[tuple[int, int]] = field(default_factory=set)
    #: templates counted since ``take_changes`` (their fields are rewritten)
    _changed: set[int] = field(default_factory=set)

    def add(self, template_id: int, template: str, level: str | None, ts: float,
            entry_id: str, message: str) -> None:
        """Count one line of ``template_id`` (its template text as it is now)."""
        stats = self.templates.get(template_id)
        if stats is None:
            stats = self.templates[template_id] = TemplateStats(
                template_id, template, example=message[:EXAMPLE_CHARS], first_entry=entry_id,
                first_line=self.lines)
        stats.template = template
        stats.count += 1
        self.lines += 1
        key = level or "none"
        stats.levels[key] = stats.levels.get(key, 0) + 1
        self.levels[key] = self.levels.get(key, 0) + 1
        # comparisons rather than min()/max() (same results, a call less each: once a line)
        if ts < stats.first_ts:
            stats.first_ts = ts
        if ts > stats.last_ts:
            stats.last_ts = ts
        stats.last_entry = entry_id
        bucket = math.floor(ts / self.config.bucket_s)
        cell = stats.buckets.get(bucket)
        if cell is None:
            stats.buckets[bucket] = [1, ts, ts, entry_id, entry_id]
        else:
            cell[0] += 1
            if ts < cell[1]:
                cell[1] = ts
            if ts > cell[2]:
                cell[2] = ts
            cell[4] = entry_id
        if self.first_bucket is None or bucket < self.first_bucket:
            self.first_bucket = bucket
        if self.last_bucket is None or bucket > self.last_bucket:
            self.last_bucket = bucket
        self._touched.add((template_id, bucket))
        self._changed.add(template_id)

    def close_batch(self) -> list[Incident]:
        """Find the bursts among the buckets this batch touched, fold them into incidents,
        drop history older than the window; the incidents that are new (for metrics)."""
        new: list[Incident] = []
        for template_id, bucket in sorted(self._touched):
            if self._is_burst(self.templates[template_id], bucket):
                if self._fold(template_id, bucket):
                    new.append(self.incidents[-1])
        self._prune({template_id for template_id, _ in self._touched})
        self._touched.clear()
        return new

    def baseline(self, stats: TemplateStats, bucket: int) -> float | None:
        """Mean lines per bucket of ``stats`` over the history before ``bucket``; None while
        the stream is younger than the warm-up."""
        if self.first_bucket is None:
            return None
        span = min(self.config.history_buckets, bucket - self.first_bucket)
        if span < self.config.warmup_buckets:
            return None
        total = sum(cell[0] for b, cell in stats.buckets.items() if bucket - span <= b < bucket)
        return total / span

    def _is_burst(self, stats: TemplateStats, bucket: int) -> bool:
        count = stats.buckets[bucket][0]
        baseline = self.baseline(stats, bucket)
        return baseline is not None and count >= self.config.min_count \
            and count >= self.config.factor * baseline

    def _fold(self, template_id: int, bucket: int) -> bool:
        """Extend the template's open incident or start one; True when one was started."""
        stats = self.templates[template_id]
        for index in range(len(self.incidents) - 1, -1, -1):
            old = self.incidents[index]
            if old.template_id == template_id and old.start_bucket - 1 <= bucket \
                    <= old.end_bucket + 1:
                self.incidents[index] = self._incident(stats, min(old.start_bucket, bucket),
                                                       max(old.end_bucket, bucket),
                                                       old.baseline, bucket, old)
                return False
        baseline = self.baseline(stats, bucket) or 0.0
        self.incidents.append(self._incident(stats, bucket, bucket, baseline, bucket))
        del self.incidents[:-MAX_INCIDENTS]
        return True

    @staticmethod
    def _incident(stats: TemplateStats, start: int, end: int, baseline: float, touched: int,
                  old: Incident | None = None) -> Incident:
        """The incident over buckets ``start..end``, grown by bucket ``touched`` (counted by
        this batch, so its last entry is known) from ``old``. Its entries are cited only when
        all of its buckets knew theirs (none did in format 2)."""
        cells = [cell for b, cell in stats.buckets.items() if start <= b <= end]
        first, last = stats.buckets[touched][3:5]
        if old is not None and first:
            first = min(old.first_entry, first, key=entry_id_key) if old.first_entry else ""
            last = max(old.last_entry, last, key=entry_id_key) if old.last_entry else ""
        return Incident(stats.template_id, start, end, int(sum(c[0] for c in cells)),
                        min(c[1] for c in cells), max(c[2] for c in cells), baseline,
                        first, last if first else "")

    def _prune(self, template_ids: set[int]) -> None:
        """Drop the history of ``template_ids`` older than the window before each one's own
        latest bucket: a function of the template's own lines, so the rows stored do not
        depend on where batches were cut (a template no batch touches keeps its rows)."""
        for template_id in template_ids:
            buckets = self.templates[template_id].buckets
            oldest = max(buckets) - self.config.history_buckets
            for b in [b for b in buckets if b < oldest]:
                del buckets[b]

    # ----- views -------------------------------------------------------------------------------
    def top(self, n: int) -> list[TemplateStats]:
        """The ``n`` most frequent templates (ties: the older template first)."""
        return sorted(self.templates.values(), key=lambda s: (-s.count, s.template_id))[:n]

    def problems(self) -> list[TemplateStats]:
        """Error and warning templates, most severe then most frequent first."""
        rank: dict[str, int] = {lv: i for i, lv in enumerate(LEVELS)}
        return sorted((s for s in self.templates.values() if s.problem),
                      key=lambda s: (-rank[s.level or "debug"], -s.count, s.template_id))

    # ----- state -------------------------------------------------------------------------------
    def head(self) -> bytes:
        """``table:head``: everything but the templates."""
        incidents = [[i.template_id, i.start_bucket, i.end_bucket, i.count, i.first_ts,
                      i.last_ts, i.baseline, i.first_entry, i.last_entry]
                     for i in self.incidents]
        return msgpack.packb({"v": FORMAT_VERSION, "i": incidents, "n": self.lines,
                              "l": self.levels, "c": self.notes_cursor,
                              "b": [self.first_bucket, self.last_bucket]}, use_bin_type=True)

    def take_changes(self) -> dict[str, bytes]:
        """The hash fields changed since the last call (the head always), and forget them:
        what a batch's commit writes."""
        fields = {HEAD_FIELD: self.head()}
        for template_id in sorted(self._changed):
            s = self.templates[template_id]
            fields[f"{TEMPLATE_PREFIX}{template_id}"] = msgpack.packb(
                [s.template, s.count, s.levels, s.first_ts, s.last_ts, s.first_entry,
                 s.last_entry, s.example,
                 [[b, *cell[:4]] for b, cell in sorted(s.buckets.items())],
                 s.first_line], use_bin_type=True)
        self._changed.clear()
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, bytes], config: BurstConfig | None = None) -> Table:
        """The table from its hash fields (other fields of the hash are ignored);
        TableStateError if they are not a table of this format."""
        table = cls(config or BurstConfig())
        head = fields.get(HEAD_FIELD)
        if head is None:
            raise TableStateError(f"template table has no {HEAD_FIELD!r}")
        try:
            raw = msgpack.unpackb(head, raw=False, strict_map_key=False)
            if isinstance(raw, dict) and is_newer(raw.get("v"), FORMAT_VERSION):
                raise TableTooNewError(raw["v"])
            if not isinstance(raw, dict) or raw.get("v") not in READ_VERSIONS:
                raise TableStateError("template table has another format version")
            table._read_head(raw)
            rows = [(int(name[len(TEMPLATE_PREFIX):]),
                     msgpack.unpackb(value, raw=False, strict_map_key=False))
                    for name, value in fields.items() if name.startswith(TEMPLATE_PREFIX)]
            stats = [_stats(template_id, row) for template_id, row in rows]
            for s in sorted(stats, key=lambda s: s.first_line):  # in the order first counted
                table.templates[s.template_id] = s
        except (KeyError, IndexError, TypeError, ValueError, msgpack.UnpackException) as exc:
            if isinstance(exc, TableStateError):
                raise
            raise TableStateError(f"template table is malformed ({exc})") from None
        return table

    @classmethod
    def decode(cls, data: bytes, config: BurstConfig | None = None) -> Table:
        """A table of the first format (one ``table`` blob), read so that streams counted
        before the fields keep their counts; its next commit writes every field."""
        table = cls(config or BurstConfig())
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if not isinstance(raw, dict) or raw.get("v") != LEGACY_VERSION:
                raise TableStateError("template table has another format version")
            for row in raw["t"]:
                stats = _stats(int(row[0]), row[1:])
                table.templates[stats.template_id] = stats
            table._read_head(raw)
        except (KeyError, IndexError, TypeError, ValueError, msgpack.UnpackException) as exc:
            if isinstance(exc, TableStateError):
                raise
            raise TableStateError(f"template table is malformed ({exc})") from None
        table._changed.update(table.templates)
        return table

    def _read_head(self, raw: dict[Any, Any]) -> None:
        self.incidents = [Incident(int(i[0]), int(i[1]), int(i[2]), int(i[3]), float(i[4]),
                                   float(i[5]), float(i[6]), *_entries(i[7:]))
                          for i in raw["i"]]
        self.lines, self.levels = int(raw["n"]), _counts(raw["l"])
        self.notes_cursor = int(raw["c"])
        first, last = raw["b"]
        self.first_bucket = None if first is None else int(first)
        self.last_bucket = None if last is None else int(last)


def _stats(template_id: int, row: Any) -> TemplateStats:
    """One template's stats from its stored row (without its id)."""
    stats = TemplateStats(template_id, str(row[0]), int(row[1]), _counts(row[2]),
                          float(row[3]), float(row[4]), str(row[5]), str(row[6]), str(row[7]))
    stats.buckets = {int(c[0]): [int(c[1]), float(c[2]), float(c[3]),
                                 str(c[4]) if len(c) > 4 else "", ""] for c in row[8]}
    stats.first_line = int(row[9])
    return stats


def _entries(raw: Any) -> tuple[str, str]:
    """The first and last entry stored after an incident's numbers (format 1 and 2 stored
    none: such an incident cites no entries)."""
    if not raw:
        return "", ""
    first, last = raw
    return str(first), str(last)


def _counts(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise TypeError("counts are not a map")
    return {str(k): int(v) for k, v in raw.items()}

