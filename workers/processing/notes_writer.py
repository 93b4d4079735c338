"""Keeping a stream's notes as it goes: items from each batch's lines, phrased by the model when
a summary is due, every phrasing checked by the guard against the lines it cites.

Per batch (``update``): the lines' decisions, action items and open questions
(``workers.notes.cues``) are folded into the stream's items (``workers.notes.items``: a
restatement cites the item it restates), and the speakers join the stream's people. When a
rolling summary or the final notes are due (``phrase``), every item that is new or gained a
citation since it was last written is phrased by the model from its own cited lines only, in
one short sentence; the guard keeps the phrasing if every name, number, date and time in it is
in those lines (repairing a misspelt name) and most of its words are those of the clauses that
stated the item, else the item keeps the speaker's own words. So an item's facts are the
lines' facts, and its wording stays close to what was said (the guard cannot check a claim,
which is also why free prose is opt-in: ``notes_prose``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis

from sinkstream.contracts.outputs import OutputEntry, SummaryKind, make_output
from sinkstream.settings import Settings
from workers.engines.base import Engine, EngineState
from workers.memory.highlights import Moment
from workers.memory.lines import TranscriptLine
from workers.memory.persistence import parse_head as parse_memory_head
from workers.memory.persistence import request_head as request_memory_head
from workers.memory.records import MemoryHead
from workers.notes import cues, guard, head, render, vocab
from workers.notes.head import NotesHead
from workers.notes.items import NoteItem, merge
from workers.processing.observer import BatchObserver
from workers.processing.prompts import PHRASE_SAMPLING
from workers.processing.summarizer import Summarizer, phrasing_on, prose_on

#: what the model is asked for each kind of item (one sentence; the lines come before it)
PHRASE_INSTRUCTIONS = {
    "decision": "Write the decision these lines state as one short sentence.",
    "action": "Write what {owner} will do, as these lines say it, in one short sentence{due}.",
    "question": "Write the question these lines leave open as one short sentence.",
}
#: new tokens a phrasing may take
PHRASE_TOKENS = 40
#: share of a phrasing's content words that must come from the clauses that stated its item
#: (a rephrasing of them). Not the whole cited lines: a recap line holds every task, and the
#: 1.5B preset phrased "We decide the on-call rotation on Friday" from it as "The meeting
#: discusses the progress of a project, ..." (0.19 of its words in the clause, 0.69 in the line)
#: and "Let's decide the rotation on Friday" as "Who will cover the first weekend?" (0.0)
PHRASE_GROUNDING = 0.6
#: what a summary says when the guard dropped every sentence of the model's
NO_SUPPORTED_SUMMARY = ("(no summary: the faithfulness guard dropped every sentence the model "
                        "wrote, for stating what the transcript does not say; the items below "
                        "are what the meeting said)")


@dataclass(frozen=True)
class Published:
    """What a batch publishes: its output entries, the notes after it, and the prose that
    summary memory keeps (None: no summary this batch)."""

    entries: list[OutputEntry]
    notes: NotesHead
    prose: str | None = None


class NotesWriter:
    """Updates and phrases one worker's streams' notes."""

    def __init__(self, engine: Engine[Any], client: redis.Redis, settings: Settings,
                 summarizer: Summarizer, observer: BatchObserver) -> None:
        self.engine = engine
        self.client = client
        self.settings = settings
        self.summarizer = summarizer
        self.observer = observer
        self.phrasing = phrasing_on(settings)
        #: free prose beside the items (``notes_prose``): checked for facts, not for claims
        self.prose = prose_on(settings)

    # ----- per batch -------------------------------------------------------------------------
    def publish(self, stream_id: str, before: EngineState, after: EngineState, last_id: str,
                eos: bool, lines: Sequence[TranscriptLine], memory: MemoryHead | None,
                moments: Sequence[Moment] | None, notes: NotesHead) -> Published:
        """The final notes at the end of the stream, a rolling update when the batch crossed
        a multiple of the rolling cadence, else nothing."""
        if eos:
            return self.final(stream_id, after, last_id, lines, memory, moments or (), notes)
        if self.summarizer.rolling_due(before, after):
            return self._rolling(stream_id, after, last_id, lines, memory, notes)
        return Published([], notes)

    def _rolling(self, stream_id: str, after: EngineState, last_id: str,
                 lines: Sequence[TranscriptLine], memory: MemoryHead | None,
                 notes: NotesHead) -> Published:
        """What is new since the last update (items first said or restated since), and a
        couple of guarded sentences about the conversation so far."""
        notes = self.phrase(notes)
        new = [i for i in notes.items if i.seq >= notes.cursor]
        prose = ""
        if self.prose:
            support = self.support(stream_id, notes.people, lines)
            prose = self._guarded(self.summarizer.rolling_prose(
                after, self.summarizer.notes(memory)), support)
        parts = ["## New since the last update\n"
                 + (render.whats_new(new) or "- nothing new decided, assigned or left open")]
        if prose:
            parts.append(f"## So far\n{prose}")
        entry = make_output(SummaryKind.ROLLING, "\n\n".join(parts), last_id, after.tokens_seen,
                            self.engine.model_name, items=[i.to_dict() for i in new])
        cursor = (notes.items[-1].seq + 1) if notes.items else notes.cursor
        return Published([entry], NotesHead(notes.items, notes.people, cursor), prose or None)

    def final(self, stream_id: str, after: EngineState, last_id: str,
              lines: Sequence[TranscriptLine], memory: MemoryHead | None,
              moments: Sequence[Moment], notes: NotesHead) -> Published:
        """The meeting notes: a guarded summary, every item with its citations, the key
        moments verbatim. Nothing is written: the caller commits what it returns."""
        notes = self.phrase(notes)
        if self.prose:
            support = self.support(stream_id, notes.people, lines)
            prose = self._guarded(self.summarizer.summary_prose(
                after, self.summarizer.notes(memory), [m.spoken() for m in moments],
                [f"- {i.text}" for i in notes.items]), support)
            summary = prose or NO_SUPPORTED_SUMMARY
        else:
            prose, summary = "", render.overview(notes.items)
        text = f"## Summary\n{summary}\n\n" + render.sections(notes.items)
        if moments:
            text += "\n\n## Key moments\n" + "\n".join(m.line() for m in moments)
        entry = make_output(SummaryKind.FINAL, text, last_id, after.tokens_seen,
                            self.engine.model_name, items=[i.to_dict() for i in notes.items])
        cursor = (notes.items[-1].seq + 1) if notes.items else notes.cursor
        return Published([entry], NotesHead(notes.items, notes.people, cursor), prose or None)

    # ----- read only -------------------------------------------------------------------------
    def on_demand(self, stream_id: str, state: EngineState, covers: str,
                  request: str = "") -> OutputEntry:
        """The notes so far, from the committed state and memory (nothing is written)."""
        memory, notes = self.heads(stream_id)
        notes = self.phrase(notes)
        if self.prose:
            support = self.support(stream_id, notes.people, ())
            prose = self._guarded(self.summarizer.rolling_prose(
                state, self.summarizer.notes(memory), SummaryKind.ON_DEMAND), support)
            so_far = prose or NO_SUPPORTED_SUMMARY
        else:
            so_far = render.overview(notes.items)
        text = f"## So far\n{so_far}\n\n" + render.sections(notes.items)
        return make_output(SummaryKind.ON_DEMAND, text, covers, state.tokens_seen,
                           self.engine.model_name, request,
                           items=[i.to_dict() for i in notes.items])

    def heads(self, stream_id: str) -> tuple[MemoryHead | None, NotesHead]:
        """The stream's committed memory and notes heads, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        request_memory_head(pipe, stream_id)
        head.request(pipe, stream_id)
        memory_raw, notes_raw = pipe.execute()
        return parse_memory_head(stream_id, memory_raw), head.parse(stream_id, notes_raw)

    def support(self, stream_id: str, people: Sequence[str],
                lines: Sequence[TranscriptLine]) -> guard.Support:
        """What the stream has said (its vocab, and this batch's lines, committed with it)."""
        said = vocab.read_support(self.client, stream_id, people)
        return said | guard.Support.of([line.line for line in lines]) if lines else said

    def _guarded(self, text: str, support: guard.Support) -> str:
        checked = guard.check(text, support)
        self.observer.guarded(checked.verdicts)
        return checked.text

    def update(self, head: NotesHead, lines: Sequence[TranscriptLine]) -> NotesHead:
        """``head`` with the batch's ``lines`` folded in (deterministic: rules, no model)."""
        head = head.with_people([line.speaker for line in lines])
        items, _ = merge(head.items, cues.find(lines, head.people))
        return NotesHead(items, head.people, head.cursor)

    def phrase(self, head: NotesHead) -> NotesHead:
        """Every stale item phrased (when ``notes_phrasing``) and guarded."""
        items = [self._phrased(item, head.people) if item.stale else item
                 for item in head.items]
        return NotesHead(items, head.people, head.cursor)

    def _phrased(self, item: NoteItem, people: Sequence[str]) -> NoteItem:
        said = item.said.strip()
        if not self.phrasing:
            return replace(item, text=said, phrased=False, stale=False)
        lead = f"{item.owner} will" if item.kind == "action" and item.owner else ""
        due = f", and by when ({'; '.join(item.due)})" if item.due else ""
        instruction = PHRASE_INSTRUCTIONS[item.kind].format(owner=item.owner or "someone",
                                                            due=due)
        context = "Lines from a meeting:\n" + "\n".join(item.lines)
        prompt = (self.engine.stream_prefix()
                  + self.engine.tokenizer.encode(context)
                  + self.engine.summary_prompt(instruction)
                  + (self.engine.tokenizer.encode(lead) if lead else []))
        text = _sentence(lead + " " + self.summarizer.generate(
            self.engine.new_state(), prompt, PHRASE_TOKENS, SummaryKind.ROLLING,
            sampling=self.summarizer.one_line(PHRASE_SAMPLING)).strip())
        checked = guard.check(text, guard.Support.of(item.lines, people))
        self.observer.guarded(checked.verdicts)
        if not checked.text or checked.dropped or len(checked.text) < 8 \
                or guard.grounded_share(checked.text, item.clauses or (said,)) \
                < PHRASE_GROUNDING:
            return replace(item, text=said, phrased=False, stale=False)
        return replace(item, text=checked.text, phrased=True, stale=False)


def _sentence(text: str) -> str:
    """The first sentence of ``text`` (first line), without list markers or quotes."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    first = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*", "", first).strip().strip('"“”')
    match = re.match(r"(.+?[.!?])(?:\s|$)", first)
    return (match.group(1) if match else first).strip()
