"""Questions about a log stream, answered from its template table and the lines it keeps: the
templates the question is about (``workers.logs.search``), their counts, first and last time
and bursts; the kept lines that match it (``workers.logs.retention``: an identifier the
question names must be in the line), quoted with their time and entry; and a sentence the
model writes from those facts, checked by the guard against them.

The facts and lines are the answer's evidence and always travel with it (in its text, and as
``sources``: each template's first and last entry, its time span, an example line as the
quote; each line's entry and time); the model's sentence is kept only when the guard finds
every number, time and name of it among them.
"""

from __future__ import annotations

from typing import Any

from sinkstream.contracts.outputs import OutputEntry, Source, SummaryKind, make_output
from workers.engines.base import Engine, EngineState
from workers.logs import notes as log_notes
from workers.logs import search
from workers.logs.mining import Miner
from workers.logs.retention import KeptLine
from workers.logs.table import Incident, Table, TemplateStats
from workers.notes import guard
from workers.processing.summarizer import Summarizer

NO_MATCH = ("no template of this stream matches the question's words; `sinkstream logs "
            "STREAM` lists them all")


def facts(table: Table, stats: TemplateStats) -> list[str]:
    """What the table knows of one template, as sentences."""
    out = [f"{log_notes.described(stats)}: {stats.count} lines, first at "
           f"{log_notes.when(stats.first_ts)}, last at {log_notes.when(stats.last_ts)}."]
    out += [f"Burst of {log_notes.name(stats)}: {incident.count} lines from "
            f"{log_notes.when(incident.first_ts)} to {log_notes.when(incident.last_ts)}."
            for incident in _bursts(table, stats)]
    return out


def _bursts(table: Table, stats: TemplateStats) -> list[Incident]:
    """The bursts of one template, oldest first (each a fact, and a source where it cites
    its entries)."""
    return [i for i in table.incidents if i.template_id == stats.template_id]


class LogAnswerer:
    """Answers questions about log streams for one worker (read only)."""

    def __init__(self, engine: Engine[Any], summarizer: Summarizer) -> None:
        self.engine = engine
        self.summarizer = summarizer

    def answer(self, table: Table, state: EngineState, covers: str, question: str,
               request: str = "", kept: list[KeptLine] | None = None,
               miner: Miner | None = None) -> OutputEntry:
        """The answer from ``table`` and the ``kept`` lines (oldest first). A question naming
        an identifier found in kept lines is about those lines: its templates are theirs
        (``miner`` matches them, read only), not the ones sharing its words."""
        matched = search.relevant_lines(kept or [], question)
        found = _templates_of(table, miner, matched) if search.identifiers(question) else []
        found = found or search.relevant(table, question)
        if not found and not matched:
            return make_output(SummaryKind.ANSWER, NO_MATCH, covers, state.tokens_seen,
                               self.engine.model_name, request)
        lines = [line for stats, _ in found for line in facts(table, stats)]
        quoted = [quote(line) for line, _ in matched]
        support = lines + quoted
        instruction = ("Facts from a log stream:\n" + "\n".join(f"- {f}" for f in support)
                       + f"\n\nAnswer in one sentence, using only these facts: {question}")
        said = self.summarizer.prose(state, instruction, "", SummaryKind.ANSWER, 1, 48)
        checked = guard.check(said, guard.Support.of(support))
        self.summarizer.observer.guarded(checked.verdicts)
        parts = [checked.text] if checked.text else []
        if lines:
            parts.append("\n".join(f"- {line}" for line in lines))
        if quoted:
            parts.append("Lines:\n" + "\n".join(f"- {line}" for line in quoted))
        sources = [Source((s.first_entry, s.last_entry), (), (s.first_ts, s.last_ts), score,
                          s.example if i == 0 else "") for i, (s, score) in enumerate(found)]
        sources += [Source((b.first_entry, b.last_entry), (), (b.first_ts, b.last_ts), score)
                    for s, score in found for b in _bursts(table, s) if b.first_entry]
        sources += [Source((line.entry_id, line.entry_id), (), (line.ts, line.ts), score)
                    for line, score in matched]
        return make_output(SummaryKind.ANSWER, "\n\n".join(parts), covers, state.tokens_seen,
                           self.engine.model_name, request, sources)


def _templates_of(table: Table, miner: Miner | None,
                  lines: list[tuple[KeptLine, float]]) -> list[tuple[TemplateStats, float]]:
    """The templates ``lines`` belong to, in order of first line, scored by their lines."""
    counts: dict[int, int] = {}
    for line, _ in lines:
        template_id = miner.match(line.record.message) if miner is not None else None
        if template_id is not None and template_id in table.templates:
            counts[template_id] = counts.get(template_id, 0) + 1
    return [(table.templates[t], float(n)) for t, n in counts.items()]


def quote(line: KeptLine) -> str:
    """A kept line as an answer quotes it: time, level, message and entry."""
    level = f" [{line.record.level.upper()}]" if line.record.level else ""
    return f"{log_notes.when(line.ts)}{level} {line.record.message} (entry {line.entry_id})"
