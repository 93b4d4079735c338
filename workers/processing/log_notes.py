"""Publishing a log stream's notes: the sections counted from the template table, and a short
narrative the model writes from those counts, checked by the faithfulness guard.

Cadence: rolling log notes each time the stream crosses a multiple of
``log_notes_every_lines`` lines, and the final ones at the end-of-stream entry. The narrative
prompt is the fact lines of ``workers.logs.notes`` and nothing else, and the guard's support is
the same lines: a sentence stating a number, time or name not among them is dropped (and
counted in ``sinkstream_guard_sentences_total``); with every sentence dropped the notes have no
summary section, only the counted facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sinkstream.contracts.outputs import OutputEntry, SummaryKind, make_output
from sinkstream.settings import Settings
from workers.engines.base import Engine, EngineState
from workers.logs import notes as log_notes
from workers.logs.table import Table
from workers.notes import guard
from workers.processing.log_batches import LogUpdate
from workers.processing.observer import BatchObserver
from workers.processing.summarizer import Summarizer, prose_on

NARRATIVE_INSTRUCTION = ("In two short sentences, say what happened in these logs: what broke, "
                         "when, and how often. Use only the facts listed.")
#: new tokens the narrative may take
NARRATIVE_TOKENS = 64
NARRATIVE_SENTENCES = 2


@dataclass(frozen=True)
class LogPublished:
    """What a log batch publishes, and its logs hash fields after it (the notes cursor moves
    when notes are published, so the table's head is re-encoded)."""

    entries: list[OutputEntry]
    fields: dict[str, bytes | str]
    prose: str | None = None


class LogNotesWriter:
    """Writes one worker's log streams' notes."""

    def __init__(self, engine: Engine[Any], settings: Settings, summarizer: Summarizer,
                 observer: BatchObserver) -> None:
        self.engine = engine
        self.settings = settings
        self.summarizer = summarizer
        self.observer = observer

    def due(self, update: LogUpdate, eos: bool) -> SummaryKind | None:
        every = self.settings.log_notes_every_lines
        if eos:
            return SummaryKind.FINAL
        if every > 0 and update.table.lines // every > update.lines_before // every:
            return SummaryKind.ROLLING
        return None

    def publish(self, state: EngineState, last_id: str, eos: bool,
                update: LogUpdate) -> LogPublished:
        """The batch's log notes when due (else nothing), and the hash fields to commit."""
        kind = self.due(update, eos)
        if kind is None:
            return LogPublished([], update.fields)
        entry = self.notes(update.table, state, last_id, kind)
        update.table.notes_cursor = update.table.lines
        fields = {**update.fields, **update.table.take_changes()}
        return LogPublished([entry], fields, None)

    def notes(self, table: Table, state: EngineState, covers: str,
              kind: SummaryKind, request: str = "") -> OutputEntry:
        """The log notes of ``table`` (nothing is written)."""
        narrative = self.narrative(table, state) if prose_on(self.settings) else ""
        return make_output(kind, log_notes.render(table, narrative), covers, state.tokens_seen,
                           self.engine.model_name, request,
                           items=log_notes.template_rows(table, log_notes.MAX_ROWS))

    def narrative(self, table: Table, state: EngineState) -> str:
        """Two guarded sentences from the table's facts ("" when the guard kept none)."""
        facts = log_notes.fact_lines(table)
        instruction = "Facts from a log stream:\n" + "\n".join(f"- {f}" for f in facts) + \
            "\n\n" + NARRATIVE_INSTRUCTION
        text = self.summarizer.prose(state, instruction, "", SummaryKind.ROLLING,
                                     NARRATIVE_SENTENCES, NARRATIVE_TOKENS)
        checked = guard.check(text, guard.Support.of(facts))
        self.observer.guarded(checked.verdicts)
        return checked.text
