"""Questions about a log stream, answered from its template table: the templates the question
is about (``workers.logs.search``), their counts, first and last time and bursts, and a
sentence the model writes from those facts, checked by the guard against them.

The facts are the answer's evidence and always travel with it (in its text, and as
``sources``: each template's first and last entry, its time span, an example line as the
quote); the model's sentence is kept only when the guard finds every number, time and name of
it among the facts.
"""

from __future__ import annotations

from typing import Any

from sinkstream.contracts.outputs import OutputEntry, Source, SummaryKind, make_output
from workers.engines.base import Engine, EngineState
from workers.logs import notes as log_notes
from workers.logs import search
from workers.logs.table import Table, TemplateStats
from workers.notes import guard
from workers.processing.summarizer import Summarizer

NO_MATCH = ("no template of this stream matches the question's words; `sinkstream logs "
            "STREAM` lists them all")


def facts(table: Table, stats: TemplateStats) -> list[str]:
    """What the table knows of one template, as sentences."""
    out = [f"{log_notes.described(stats)}: {stats.count} lines, first at "
           f"{log_notes.when(stats.first_ts)}, last at {log_notes.when(stats.last_ts)}."]
    for incident in table.incidents:
        if incident.template_id == stats.template_id:
            out.append(f"Burst of {log_notes.name(stats)}: {incident.count} lines from "
                       f"{log_notes.when(incident.first_ts)} to "
                       f"{log_notes.when(incident.last_ts)}.")
    return out


class LogAnswerer:
    """Answers questions about log streams for one worker (read only)."""

    def __init__(self, engine: Engine[Any], summarizer: Summarizer) -> None:
        self.engine = engine
        self.summarizer = summarizer

    def answer(self, table: Table, state: EngineState, covers: str, question: str,
               request: str = "") -> OutputEntry:
        found = search.relevant(table, question)
        if not found:
            return make_output(SummaryKind.ANSWER, NO_MATCH, covers, state.tokens_seen,
                               self.engine.model_name, request)
        lines = [line for stats, _ in found for line in facts(table, stats)]
        instruction = ("Facts from a log stream:\n" + "\n".join(f"- {f}" for f in lines)
                       + f"\n\nAnswer in one sentence, using only these facts: {question}")
        said = self.summarizer.prose(state, instruction, "", SummaryKind.ANSWER, 1, 48)
        checked = guard.check(said, guard.Support.of(lines))
        self.summarizer.observer.guarded(checked.verdicts)
        text = (checked.text + "\n\n" if checked.text else "") + \
            "\n".join(f"- {line}" for line in lines)
        sources = [Source((s.first_entry, s.last_entry), (), (s.first_ts, s.last_ts), score,
                          s.example if i == 0 else "") for i, (s, score) in enumerate(found)]
        return make_output(SummaryKind.ANSWER, text, covers, state.tokens_seen,
                           self.engine.model_name, request, sources)
