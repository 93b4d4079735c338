"""A batch's log lines folded into its stream's miner and template table, before the feed.

A log stream is not fed to the model line by line: thousands of lines repeat a few templates,
and what the model needs to know is which templates exist, not the ten-thousandth copy of one.
So each log entry is parsed (``workers.logs.parse``), mined (``workers.logs.mining``) and
counted (``workers.logs.table``), and only an entry that creates a template is fed, as one
line ``LEVEL template``; the other log entries feed nothing (their text is in the counts). A
meeting entry in the same batch is fed as always.

Everything here is deterministic in the committed miner and table and the batch's entries, and
its result (``LogUpdate.fields``) is committed in the batch's fenced commit with the state it
fed: a line enters the counts exactly once, and a replay gives identical bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from sinkstream.contracts.entries import InputEntry
from sinkstream.contracts.kinds import LOG, StreamKind, effective_kind
from workers.engines.base import Engine
from workers.logs.head import APPLIED_FIELD, LEGACY_FIELDS, LogsHead
from workers.logs.mining import HEAD_FIELD as MINER_HEAD
from workers.logs.mining import Miner, MinerStateError, MiningConfig
from workers.logs.parse import LogRecord, parse_line
from workers.logs.retention import Retention, RetentionStateError
from workers.logs.table import HEAD_FIELD as TABLE_HEAD
from workers.logs.table import BurstConfig, Incident, Table, TableStateError
from workers.processing.batches import Batch, turn_tokens


@dataclass(frozen=True)
class LogUpdate:
    """What one batch did to its stream's logs: the miner and table after it, the hash fields
    its commit sets (and deletes), and what metrics and notes report about it."""

    miner: Miner
    table: Table
    fields: dict[str, bytes | str]
    #: log lines in the batch, per level ("none": no level)
    levels: dict[str, int]
    #: templates this batch created, in order
    new_templates: list[int]
    new_incidents: list[Incident]
    #: (entry id, template id) of every log line, in order
    assignments: list[tuple[str, int]]
    #: the stream's lines before this batch (the log notes' cadence)
    lines_before: int
    #: the marks of the lines the stream keeps in its input (``workers.logs.retention``)
    retention: Retention
    #: fields the commit deletes: the first format's blobs, replaced by the fields
    delete: tuple[str, ...] = ()
    #: the first input entry the stream keeps: the commit trims before it; None: trim
    #: nothing yet (the stream keeps lines) or all that is applied (it keeps none)
    trim_before: str | None = None

    @property
    def trim(self) -> bool:
        """Whether the commit may trim the applied input (up to ``trim_before`` if set)."""
        return not self.retention.keep_lines or self.trim_before is not None


#: what a committed logs hash that cannot be used raises (the stream is parked with it)
LOG_STATE_ERRORS = (MinerStateError, TableStateError, RetentionStateError)


def is_log(entry: InputEntry, stream_kind: StreamKind | None) -> bool:
    return effective_kind(entry.kind, stream_kind) == LOG


def feed_line(record: LogRecord, template: str) -> str:
    """The line the model reads for a new template."""
    return f"{(record.level or 'log').upper()} {template}"


#: committed (miner, table) pairs a worker keeps decoded (see ``LogFolder.remember``), and the
#: templates they may hold together: decoded, a template takes ~2 KB (a stream at the
#: 5,000-template bound: ~9 MB), outside the hot cache's budget
WARM_LOGS = 16
WARM_LOGS_TEMPLATES = 10_000

#: what names a committed miner and table: stream, last entry covered, miner and table heads
_WarmKey = tuple[str, str, bytes, bytes]
#: what a stream's log lines are folded into: its miner, table and input retention
_Logs = tuple[Miner, Table, Retention]


class LogFolder:
    """Folds batches' log lines in, for one worker: stateless apart from its configuration
    and the decoded miners and tables of its last commits (``remember``)."""

    def __init__(self, engine: Engine[Any], mining: MiningConfig | None = None,
                 bursts: BurstConfig | None = None, feed: str = "templates",
                 warm: int = WARM_LOGS, warm_templates: int = WARM_LOGS_TEMPLATES,
                 keep_lines: int = 0) -> None:
        self.engine = engine
        #: applied log lines a stream keeps in its input (0: trim them all)
        self.keep_lines = keep_lines
        #: "templates": a new template is fed as one line; "none": log lines feed nothing
        self.feed = feed
        self.mining = mining or MiningConfig()
        self.bursts = bursts or BurstConfig()
        self.warm, self.warm_templates = warm, warm_templates
        self._warm_count = 0
        #: what a commit left -> the objects it encodes, not in use
        self._warm: OrderedDict[_WarmKey, _Logs] = OrderedDict()

    def remember(self, stream_id: str, update: LogUpdate,
                 fields: dict[str, bytes | str]) -> None:
        """After ``fields`` were committed: keep ``update``'s miner and table for the
        stream's next batch, so it need neither read the whole hash nor decode it (~100 ms
        at 5,000 templates). Keyed by the stream, the entry they cover and both heads as
        committed, so a head written by anyone else, or not at all, is read and decoded as
        before; an object is handed out once (``_load`` pops it), so a batch that fails
        half-way can never leave a mutated object behind under an unchanged key."""
        key = _key(stream_id, fields)
        size = len(update.table.templates)
        if key is None or self.warm <= 0 or size > self.warm_templates:
            return
        if self._warm.pop(key, None) is None:
            self._warm_count += size
        self._warm[key] = (update.miner, update.table, update.retention)
        while len(self._warm) > self.warm or self._warm_count > self.warm_templates:
            self._forget(next(iter(self._warm)))

    def holds(self, stream_id: str, head: LogsHead) -> bool:
        """Whether ``head``'s miner and table are remembered (no need to read them)."""
        return _head_key(stream_id, head) in self._warm

    def _forget(self, key: _WarmKey) -> _Logs | None:
        pair = self._warm.pop(key, None)
        if pair is not None:
            self._warm_count -= len(pair[1].templates)
        return pair

    def _load(self, stream_id: str, head: LogsHead) -> _Logs:
        """The head's miner, table and retention to mutate: remembered, else decoded."""
        key = _head_key(stream_id, head)
        warm = self._forget(key) if key is not None else None
        if warm is not None:
            return warm
        return (*head.load(self.mining, self.bursts),
                Retention.from_fields(head.fields, self.keep_lines))

    def fold(self, stream_id: str, head: LogsHead,
             batch: Batch) -> tuple[Batch, LogUpdate | None]:
        """``batch`` as the model feeds it, and the logs update (None: a stream with no log
        lines, in this batch or before). ``head`` must be ``complete`` unless its miner and
        table are remembered (``holds``). Raises MinerStateError / TableStateError /
        RetentionStateError for a committed miner, table or retention that cannot be read."""
        logs = [is_log(e, head.kind) for e in batch.entries]
        if not any(logs):
            if not head.has_logs:
                return batch, None
            parts = self._load(stream_id, head)
            return batch, _update(parts, batch.last_id, {}, [], [], [], parts[1].lines, head)
        parts = miner, table, retention = self._load(stream_id, head)
        lines_before = table.lines
        pieces = _pieces(batch)
        fed_pieces = [pieces[0]]
        entries: list[InputEntry] = []
        counts: list[int] = []
        levels: dict[str, int] = {}
        created: list[int] = []
        assignments: list[tuple[str, int]] = []
        for entry, log_entry, piece in zip(batch.entries, logs, pieces[1:], strict=True):
            if not log_entry or not entry.text:
                entries.append(entry)
                counts.append(len(piece))
                fed_pieces.append(piece)
                continue
            reference = entry.time
            record = parse_line(entry.text, reference)
            retention.line(table.lines, entry.id)
            mined = miner.add(record.message)
            when = record.ts if record.ts is not None else reference
            table.add(mined.template_id, mined.template, record.level, when, entry.id,
                      record.message)
            key = record.level or "none"
            levels[key] = levels.get(key, 0) + 1
            assignments.append((entry.id, mined.template_id))
            if mined.change == "created":
                created.append(mined.template_id)
            if mined.change == "created" and self.feed == "templates":
                fed = replace(entry, text=feed_line(record, mined.template), speaker=None)
                ids = turn_tokens(self.engine, fed)
                entries.append(fed)
                counts.append(len(ids))
                fed_pieces.append(ids)
            else:  # built directly: dataclasses.replace costs more than the mining here
                entries.append(InputEntry(entry.id, "", None, entry.ts, entry.eos, entry.kind))
                counts.append(0)
                fed_pieces.append([])
        incidents = table.close_batch()
        tokens = [t for piece in fed_pieces for t in piece]
        folded = replace(batch, entries=entries, tokens=tokens, counts=counts)
        return folded, _update(parts, batch.last_id, levels, created, incidents, assignments,
                               lines_before, head)


def _update(parts: _Logs, last_id: str, levels: dict[str, int], created: list[int],
            incidents: list[Incident], assignments: list[tuple[str, int]], lines_before: int,
            head: LogsHead) -> LogUpdate:
    """The update of a folded batch, with the fields its commit sets: what the batch
    changed, and where it ends."""
    miner, table, retention = parts
    trim_before = retention.trim_before(table.lines)
    fields: dict[str, bytes | str] = {**miner.take_changes(), **table.take_changes(),
                                      **retention.take_changes(), APPLIED_FIELD: last_id}
    return LogUpdate(miner, table, fields, levels, created, incidents, assignments,
                     lines_before, retention, _deleted(head), trim_before)


def _deleted(head: LogsHead) -> tuple[str, ...]:
    """The first format's blobs go once the fields replace them."""
    return LEGACY_FIELDS if head.legacy is not None else ()


def _key(stream_id: str, fields: dict[str, bytes | str]) -> _WarmKey | None:
    """The key of what ``fields`` committed: the head the stream's next batch reads."""
    applied = fields.get(APPLIED_FIELD)
    miner, table = fields.get(MINER_HEAD), fields.get(TABLE_HEAD)
    if not isinstance(applied, str) or not isinstance(miner, bytes) \
            or not isinstance(table, bytes):
        return None
    return _head_key(stream_id, LogsHead(applied=applied, miner=miner, table=table))


def _head_key(stream_id: str, head: LogsHead) -> _WarmKey | None:
    if head.applied is None or head.miner is None or head.table is None:
        return None
    return stream_id, head.applied, head.miner, head.table


def _pieces(batch: Batch) -> list[list[int]]:
    """``batch.tokens`` cut into [prefix, entry 1, entry 2, ...] by ``batch.counts``."""
    prefix = len(batch.tokens) - sum(batch.counts)
    out: list[list[int]] = [batch.tokens[:prefix]]
    pos = prefix
    for n in batch.counts:
        out.append(batch.tokens[pos:pos + n])
        pos += n
    return out

