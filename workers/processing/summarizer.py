"""Summaries from a stream's state: rolling ones as the stream goes, final notes at its end,
and on-demand ones; the one place that runs the model for text.

Summaries are generated from a *copy* of a stream's state (engines never mutate it): the
state already holds the transcript (sinks + recent window, or the RWKV state), so a summary
costs only its prompt and the new tokens, never a re-read of the transcript.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sinkstream.contracts.outputs import OutputEntry, SummaryKind, make_output
from sinkstream.settings import Settings
from workers.engines.base import Engine, EngineState
from workers.memory.highlights import Moment
from workers.memory.records import MemoryHead
from workers.processing.observer import BatchObserver
from workers.processing.prompts import (
    ANSWER_SAMPLING,
    SECTIONS,
    SUMMARY_SAMPLING,
    Section,
    format_notes,
    rolling_instruction,
    rolling_summary_due,
    section_instruction,
    tidy_section,
)


class Summarizer:
    """Writes the summaries of one worker's streams with its engine."""

    def __init__(self, engine: Engine[Any], settings: Settings, observer: BatchObserver) -> None:
        self.engine = engine
        self.settings = settings
        self.observer = observer

    def for_batch(self, before: EngineState, after: EngineState, last_id: str, eos: bool,
                  head: MemoryHead | None, moments: Sequence[Moment] | None,
                  ) -> list[OutputEntry]:
        """What a batch publishes: the final notes at the end of the stream, a rolling
        summary when the batch crossed a multiple of the rolling cadence, else nothing."""
        notes = self.notes(head)
        if eos:
            return [self.summarize(after, SummaryKind.FINAL, last_id, notes=notes,
                                   moments=moments or ())]
        if rolling_summary_due(before.tokens_seen, after.tokens_seen,
                               self.settings.rolling_every_tokens):
            return [self.summarize(after, SummaryKind.ROLLING, last_id, notes=notes)]
        return []

    def notes(self, head: MemoryHead | None) -> str | None:
        """The previous summary to fold in, when summary memory is on and there is one."""
        if not self.settings.summary_memory or head is None or head.summary is None:
            return None
        return head.summary.text or None

    def summarize(
        self, state: EngineState, kind: SummaryKind, covers: str, instruction: str | None = None,
        request: str = "", notes: str | None = None, moments: Sequence[Moment] = (),
    ) -> OutputEntry:
        """A summary of ``state``; ``notes``, the previous summary (summary memory), folded in.

        A final summary is meeting notes in sections, each generated with its own short
        prompt (``SECTIONS``), then the stream's key ``moments`` verbatim (extractive, so
        they cannot drift).
        """
        if instruction is None and kind is SummaryKind.FINAL:
            key_lines = [m.spoken() for m in moments]
            text = format_notes([(section, self._section(state, section, notes, key_lines))
                                 for section in SECTIONS])
            if moments:
                text += "\n\n## Key moments\n" + "\n".join(m.line() for m in moments)
        else:
            text = self.generate(
                state, self.engine.summary_prompt(instruction or rolling_instruction(notes)),
                self.settings.summary_max_new_tokens, kind)
        return make_output(kind, text, covers, state.tokens_seen, self.engine.model_name,
                           request)

    def _section(self, state: EngineState, section: Section, notes: str | None,
                 key_lines: Sequence[str] = ()) -> str:
        lead = self.engine.tokenizer.encode(section.lead) if section.lead else []
        prompt = self.engine.summary_prompt(section_instruction(section, notes, key_lines)) \
            + lead
        budget = self.settings.summary_max_new_tokens if not section.bullets \
            else max(16, self.settings.summary_max_new_tokens // 2)
        return tidy_section(section, self.generate(state, prompt, budget, SummaryKind.FINAL))

    def generate(
        self, state: EngineState, prompt: list[int], max_new_tokens: int, kind: SummaryKind,
        extra_capacity: int | None = None,
    ) -> str:
        """The one place that runs the model for text: model output only ever becomes the
        ``text`` of an output entry (and, through summary memory, a later prompt's notes).

        By default the prompt and the answer get room of their own beside the window
        (``extra_capacity``, up to the model's position limit), so a long prompt, such as
        notes carrying the summary memory and key moments, never evicts the end of the
        conversation it asks about.
        """
        if extra_capacity is None:
            extra_capacity = min(self.room(state, prompt, max_new_tokens),
                                 self.engine.max_extra_capacity())
        started = time.perf_counter()
        sampling = ANSWER_SAMPLING if kind is SummaryKind.ANSWER else SUMMARY_SAMPLING
        ids = self.engine.generate(state, prompt, max_new_tokens, sampling,
                                   extra_capacity=extra_capacity)
        self.observer.generated(kind.value, len(ids), time.perf_counter() - started)
        return str(self.engine.tokenizer.decode(ids))

    @staticmethod
    def room(state: EngineState, prompt: Sequence[int], max_new_tokens: int) -> int:
        """Slots a generation needs beside the window: the state's pending tokens, the
        prompt and the answer."""
        return len(state.pending) + len(prompt) + max_new_tokens
