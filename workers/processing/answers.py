"""Answers to questions about a stream, and on-demand summaries: read-only, no lease.

An answer rests on the committed state (the window) plus the text that left the window and
matches the question best (``retrieval``): the retrieved chunks' lines that match it, placed
in a temporary context after the window. Its ``sources`` cite the retrieved chunks, one of
them with the line that best matches the question (``Source.quote``).
"""

from __future__ import annotations

from typing import Any

import redis

from sinkstream.contracts.outputs import OutputEntry, Source, SummaryKind, make_output
from sinkstream.settings import Settings
from workers.engines.base import Engine
from workers.logs import head as logs_head
from workers.logs.mining import MiningConfig
from workers.logs.retention import kept_lines, read_kept
from workers.logs.table import BurstConfig
from workers.memory import retrieve, vectors
from workers.memory.embedder import Embedder, get_embedder
from workers.memory.persistence import read_chunks, read_head
from workers.memory.records import Chunk
from workers.notes.guard import Support, check
from workers.processing.log_answers import LogAnswerer
from workers.processing.log_notes import LogNotesWriter
from workers.processing.notes_writer import NotesWriter
from workers.processing.prompts import (
    answer_with_context_instruction,
    context_block,
    short_answer,
)
from workers.processing.states import StateRepository
from workers.processing.summarizer import Summarizer

#: an answer whose every sentence stated something the stream never said
NO_SUPPORTED_ANSWER = ("(no answer: the faithfulness guard dropped what the model wrote, for "
                       "stating what the transcript does not say)")


class Answerer:
    """Answers and on-demand summaries from one worker's committed states."""

    def __init__(self, engine: Engine[Any], client: redis.Redis, settings: Settings,
                 states: StateRepository, summarizer: Summarizer, notes: NotesWriter) -> None:
        self.engine = engine
        self.client = client
        self.settings = settings
        self.states = states
        self.summarizer = summarizer
        self.notes = notes
        self.observer = summarizer.observer
        self.logs = LogAnswerer(engine, summarizer)
        self.log_notes = LogNotesWriter(engine, settings, summarizer, summarizer.observer)

    @property
    def embedder(self) -> Embedder | None:
        """The embedding model when ``retrieval = "embedding"`` and it can load (else BM25)."""
        if self.settings.retrieval != "embedding":
            return None
        return get_embedder(self.settings.embedding_model)

    def answer(self, stream_id: str, question: str, request: str = "") -> OutputEntry:
        """Answer ``question`` from the committed state and the text retrieved for it; for a
        log stream, from its template table."""
        loaded = self.states.committed(stream_id)
        state = loaded.state
        logs = logs_head.read(self.client, stream_id)
        if logs.has_logs:
            miner, table = logs.load(MiningConfig(), BurstConfig())
            kept = read_kept(self.client, stream_id, loaded.last_entry_id, kept_lines(
                self.settings.log_keep_lines, self.settings.max_stream_length))
            return self.logs.answer(table, state, loaded.last_entry_id or "0-0", question,
                                    request, kept, miner)
        notes = self._notes(stream_id)
        hits: list[retrieve.Hit] = []
        pervasive: frozenset[str] = frozenset()
        if self.settings.retrieval != "off":
            candidates = retrieve.evicted(read_chunks(self.client, stream_id),
                                          state.tokens_seen, self.engine.window_tokens())
            candidates = self._with_vectors(stream_id, candidates)
            hits = retrieve.rank(question, candidates, top_k=self.settings.retrieval_top_k,
                                 embedder=self.embedder)
            pervasive = retrieve.pervasive_words(candidates)
        max_new = self.settings.summary_max_new_tokens
        limit = self.engine.max_extra_capacity()
        while True:
            lines = retrieve.relevant_lines(question, hits, pervasive=pervasive)
            instruction = answer_with_context_instruction(
                question, context_block(lines) if lines else "", notes)
            prompt = self.engine.summary_prompt(instruction)
            if self.summarizer.room(state, prompt, max_new) <= limit or not hits:
                break
            hits = sorted(hits, key=lambda h: -h.score)[:-1]  # drop the least relevant
        text = short_answer(self.summarizer.generate(state, prompt, max_new,
                                                     SummaryKind.ANSWER))
        support = self.notes.support(stream_id, (), ())
        if lines:
            support = support | Support.of(lines)
        text = self._guarded(text, support)
        quoted = retrieve.quote(question, hits, pervasive=pervasive)
        sources = [Source((h.chunk.first_id, h.chunk.last_id), h.chunk.speakers, h.chunk.ts,
                          h.score, quoted[1] if quoted is not None and quoted[0] is h else "")
                   for h in sorted(hits, key=lambda h: h.chunk.seq)]  # in the order said
        return make_output(SummaryKind.ANSWER, text, loaded.last_entry_id or "0-0",
                           state.tokens_seen, self.engine.model_name, request, sources)

    def summary_now(self, stream_id: str, request: str = "") -> OutputEntry:
        """The notes so far, from the committed state and memory (nothing is written); a log
        stream's log notes."""
        loaded = self.states.committed(stream_id)
        logs = logs_head.read(self.client, stream_id)
        if logs.has_logs:
            _, table = logs.load(MiningConfig(), BurstConfig())
            return self.log_notes.notes(table, loaded.state, loaded.last_entry_id or "0-0",
                                        SummaryKind.ON_DEMAND, request)
        return self.notes.on_demand(stream_id, loaded.state, loaded.last_entry_id or "0-0",
                                    request)

    def _guarded(self, text: str, support: Support) -> str:
        """The answer with every sentence the stream does not support left out; when none is
        left, a plain statement of that (the quoted line under ``sources`` still stands)."""
        checked = check(text, support)
        self.observer.guarded(checked.verdicts)
        return checked.text or NO_SUPPORTED_ANSWER

    def _notes(self, stream_id: str) -> str | None:
        if not self.settings.summary_memory:
            return None
        return self.summarizer.notes(read_head(self.client, stream_id))

    def _with_vectors(self, stream_id: str, chunks: list[Chunk]) -> list[Chunk]:
        """``chunks``, the ones the vectorizer has not reached yet embedded now (and stored,
        so the next question finds them): ranking by embedding needs every candidate's."""
        embedder = self.embedder
        missing = {c.seq: c.text for c in chunks if not c.embedding}
        if embedder is None or not missing:
            return chunks
        made = vectors.embed(embedder, missing)
        vectors.store(self.client, {stream_id: made})
        return [c if c.embedding else Chunk(
            c.first_id, c.last_id, c.text, c.start, c.end, c.speakers, c.ts, seq=c.seq,
            embedding=made[c.seq].embedding, embed_model=embedder.name) for c in chunks]
