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
from sinkstream.ids import parse_entry_id
from workers.engines.base import Engine
from workers.logs.head import APPLIED_FIELD, MINER_FIELD, TABLE_FIELD, LogsHead
from workers.logs.mining import Miner, MiningConfig
from workers.logs.parse import LogRecord, parse_line
from workers.logs.table import BurstConfig, Incident, Table
from workers.processing.batches import Batch, turn_tokens


@dataclass(frozen=True)
class LogUpdate:
    """What one batch did to its stream's logs: the miner and table after it, the hash fields
    its commit sets, and what metrics and notes report about it."""

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


def is_log(entry: InputEntry, stream_kind: StreamKind | None) -> bool:
    return effective_kind(entry.kind, stream_kind) == LOG


def entry_time(entry: InputEntry) -> float:
    """An entry's own time: its ``ts`` field, else the time in its stream entry id (never the
    clock, so a replay dates each line the same)."""
    if entry.ts is not None:
        return entry.ts
    return parse_entry_id(entry.id)[0] / 1000.0


def feed_line(record: LogRecord, template: str) -> str:
    """The line the model reads for a new template."""
    return f"{(record.level or 'log').upper()} {template}"


#: committed (miner, table) pairs a worker keeps decoded (see ``LogFolder.remember``), and
#: their encoded bytes at most: decoded, a pair takes ~9x its bytes (a stream at the
#: 5,000-template bound: ~1 MB encoded, ~9 MB decoded), outside the hot cache's budget
WARM_LOGS = 16
WARM_LOGS_BYTES = 2 << 20


class LogFolder:
    """Folds batches' log lines in, for one worker: stateless apart from its configuration
    and the decoded miners and tables of its last commits (``remember``)."""

    def __init__(self, engine: Engine[Any], mining: MiningConfig | None = None,
                 bursts: BurstConfig | None = None, feed: str = "templates",
                 warm: int = WARM_LOGS, warm_bytes: int = WARM_LOGS_BYTES) -> None:
        self.engine = engine
        #: "templates": a new template is fed as one line; "none": log lines feed nothing
        self.feed = feed
        self.mining = mining or MiningConfig()
        self.bursts = bursts or BurstConfig()
        self.warm, self.warm_bytes = warm, warm_bytes
        self._warm_nbytes = 0
        #: (miner bytes, table bytes) committed -> the objects they encode, not in use
        self._warm: OrderedDict[tuple[bytes, bytes], tuple[Miner, Table]] = OrderedDict()

    def remember(self, update: LogUpdate, fields: dict[str, bytes | str]) -> None:
        """After ``fields`` were committed: keep ``update``'s miner and table for the next
        batch that starts from exactly those bytes, so it need not decode them (~1.5 us a
        line of a 256-line batch, and more as a miner grows). Keyed by the committed bytes
        themselves, so a head written by anyone else, or not at all, is decoded as before;
        an object is handed out once (``_load`` pops it), so a batch that fails half-way
        can never leave a mutated object behind under an unchanged key."""
        miner, table = fields.get(MINER_FIELD), fields.get(TABLE_FIELD)
        if not isinstance(miner, bytes) or not isinstance(table, bytes) or self.warm <= 0 \
                or len(miner) + len(table) > self.warm_bytes:
            return
        key = (miner, table)
        if self._warm.pop(key, None) is None:
            self._warm_nbytes += len(miner) + len(table)
        self._warm[key] = (update.miner, update.table)
        while len(self._warm) > self.warm or self._warm_nbytes > self.warm_bytes:
            self._forget(next(iter(self._warm)))

    def _forget(self, key: tuple[bytes, bytes]) -> tuple[Miner, Table] | None:
        pair = self._warm.pop(key, None)
        if pair is not None:
            self._warm_nbytes -= len(key[0]) + len(key[1])
        return pair

    def _load(self, head: LogsHead) -> tuple[Miner, Table]:
        """The head's miner and table to mutate: remembered, else decoded."""
        if head.miner is not None and head.table is not None:
            warm = self._forget((head.miner, head.table))
            if warm is not None:
                return warm
        return head.load(self.mining, self.bursts)

    def fold(self, head: LogsHead, batch: Batch) -> tuple[Batch, LogUpdate | None]:
        """``batch`` as the model feeds it, and the logs update (None: a stream with no log
        lines, in this batch or before). Raises MinerStateError / TableStateError for a
        committed miner or table that cannot be read."""
        logs = [is_log(e, head.kind) for e in batch.entries]
        if not any(logs):
            if not head.has_logs:
                return batch, None
            miner, table = head.load(self.mining, self.bursts)
            return batch, LogUpdate(miner, table, {APPLIED_FIELD: batch.last_id}, {}, [], [],
                                    [], table.lines)
        miner, table = self._load(head)
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
            reference = entry_time(entry)
            record = parse_line(entry.text, reference)
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
        fields: dict[str, bytes | str] = {MINER_FIELD: miner.encode(),
                                          TABLE_FIELD: table.encode(),
                                          APPLIED_FIELD: batch.last_id}
        folded = replace(batch, entries=entries, tokens=tokens, counts=counts)
        return folded, LogUpdate(miner, table, fields, levels, created, incidents, assignments,
                                 lines_before)


def _pieces(batch: Batch) -> list[list[int]]:
    """``batch.tokens`` cut into [prefix, entry 1, entry 2, ...] by ``batch.counts``."""
    prefix = len(batch.tokens) - sum(batch.counts)
    out: list[list[int]] = [batch.tokens[:prefix]]
    pos = prefix
    for n in batch.counts:
        out.append(batch.tokens[pos:pos + n])
        pos += n
    return out

