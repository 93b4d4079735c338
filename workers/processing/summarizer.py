"""Prose from a stream's state: the one place that runs the model for text.

Summaries are generated from a *copy* of a stream's state (engines never mutate it): the state
already holds the transcript (sinks + recent window, or the RWKV state), so a summary costs
only its prompt and the new tokens, never a re-read of the transcript. What the prose may
state is checked by the guard before it is published (``workers/processing/notes_writer.py``,
``workers/processing/answers.py``); this module only writes it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sinkstream.contracts.outputs import SummaryKind
from sinkstream.settings import Settings
from workers.engines.base import Engine, EngineState, Sampling
from workers.engines.loading.presets import phrases_notes
from workers.memory.records import MemoryHead
from workers.processing.observer import BatchObserver
from workers.processing.prompts import (
    ANSWER_SAMPLING,
    SUMMARY_LEAD,
    SUMMARY_SAMPLING,
    rolling_instruction,
    rolling_summary_due,
    summary_instruction,
    whole_sentences,
)

#: sentences a rolling update's "so far" keeps, and the final notes' summary
ROLLING_SENTENCES = 2
SUMMARY_SENTENCES = 3
#: new tokens a rolling update's two sentences may take (generation dominates an update's
#: cost on a CPU: ~3 tokens/s for a 1.5B model)
ROLLING_TOKENS = 64


class Summarizer:
    """Writes the prose of one worker's streams with its engine."""

    def __init__(self, engine: Engine[Any], settings: Settings, observer: BatchObserver) -> None:
        self.engine = engine
        self.settings = settings
        self.observer = observer

    def rolling_due(self, before: EngineState, after: EngineState) -> bool:
        """This batch crossed a multiple of the rolling cadence."""
        return rolling_summary_due(before.tokens_seen, after.tokens_seen,
                                   self.settings.rolling_every_tokens)

    def notes(self, head: MemoryHead | None) -> str | None:
        """The previous summary to fold in, when summary memory is on and there is one."""
        if not self.settings.summary_memory or head is None or head.summary is None:
            return None
        return head.summary.text or None

    def rolling_prose(self, state: EngineState, previous: str | None,
                      kind: SummaryKind = SummaryKind.ROLLING) -> str:
        """What the conversation has been about so far, in a couple of sentences."""
        return self.prose(state, rolling_instruction(previous), "", kind, ROLLING_SENTENCES,
                          min(ROLLING_TOKENS, self.settings.summary_max_new_tokens))

    def summary_prose(self, state: EngineState, previous: str | None,
                      key_lines: Sequence[str] = (), items: Sequence[str] = ()) -> str:
        """The final notes' summary: three sentences about the whole meeting."""
        return self.prose(state, summary_instruction(previous, key_lines, items), SUMMARY_LEAD,
                          SummaryKind.FINAL, SUMMARY_SENTENCES)

    def prose(self, state: EngineState, instruction: str, lead: str, kind: SummaryKind,
              sentences: int, max_new_tokens: int | None = None) -> str:
        """Generated prose, one paragraph (the generation stops at a line break), cut to whole
        sentences (a list it announces but never wrote goes too)."""
        prompt = self.engine.summary_prompt(instruction)
        if lead:
            prompt += self.engine.tokenizer.encode(lead)
        text = self.generate(state, prompt, max_new_tokens or self.settings.summary_max_new_tokens,
                             kind, sampling=self.one_line(SUMMARY_SAMPLING))
        return whole_sentences(lead + text, sentences)

    def one_line(self, sampling: Sampling) -> Sampling:
        """``sampling`` stopping at the first line break of the generated text."""
        breaks = tuple(getattr(self.engine.tokenizer, "line_break_ids", ()))
        return replace(sampling, stop_token_ids=(*sampling.stop_token_ids, *breaks))

    def generate(
        self, state: EngineState, prompt: list[int], max_new_tokens: int, kind: SummaryKind,
        sampling: Sampling | None = None, extra_capacity: int | None = None,
    ) -> str:
        """Run the model: model output only ever becomes text that the guard checks before
        it is published (and, through summary memory, a later prompt's notes).

        By default the prompt and the answer get room of their own beside the window
        (``extra_capacity``, up to the model's position limit), so a long prompt, such as
        notes carrying the summary memory and key moments, never evicts the end of the
        conversation it asks about.
        """
        if extra_capacity is None:
            extra_capacity = min(self.room(state, prompt, max_new_tokens),
                                 self.engine.max_extra_capacity())
        if sampling is None:
            sampling = ANSWER_SAMPLING if kind is SummaryKind.ANSWER else SUMMARY_SAMPLING
        started = time.perf_counter()
        ids = self.engine.generate(state, prompt, max_new_tokens, sampling,
                                   extra_capacity=extra_capacity)
        self.observer.generated(kind.value, len(ids), time.perf_counter() - started)
        return str(self.engine.tokenizer.decode(ids))

    @staticmethod
    def room(state: EngineState, prompt: Sequence[int], max_new_tokens: int) -> int:
        """Slots a generation needs beside the window: the state's pending tokens, the
        prompt and the answer."""
        return len(state.pending) + len(prompt) + max_new_tokens


def prose_on(settings: Settings) -> bool:
    """Whether the model writes free prose (summaries, 'so far', log narratives): only with
    ``notes_prose`` on top of phrasing, since the guard checks its facts but not its claims."""
    return settings.notes_prose and phrasing_on(settings)


def phrasing_on(settings: Settings) -> bool:
    """``notes_phrasing``, its auto (unset) resolved by the model preset."""
    if settings.notes_phrasing is not None:
        return settings.notes_phrasing
    return phrases_notes(settings.model)
