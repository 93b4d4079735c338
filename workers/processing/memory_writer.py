"""What a batch adds to its stream's memory: its lines, the key moments, the summary memory
and the retrieval chunks, planned here and committed with the batch (exactly once).

Chunks are committed without their embedding: computing it took ~200 ms of a batch on CPU, on
the feed path of every stream (~75 ms of CPU per 192-token chunk for MiniLM here). Only a chunk
that has left the model's window can be retrieved, so only then is it embedded: the chunks a
commit moves out of the window are handed to the worker's ``Vectorizer``, which embeds them off
the feed path; a question asked before that has happened embeds what it still lacks itself
(``workers/processing/answers.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sinkstream.settings import Settings
from workers.engines.base import Engine, EngineState
from workers.memory import highlights
from workers.memory.highlights import Moment
from workers.memory.lines import TranscriptLine
from workers.memory.persistence import plan_write
from workers.memory.records import MemoryHead, MemoryWrite, SummaryMemory
from workers.processing.batches import Batch
from workers.processing.prompts import format_turn


class MemoryWriter:
    """Plans one worker's memory writes (stateless apart from its settings)."""

    def __init__(self, engine: Engine[Any], settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        #: the stream keeps a memory hash (summary memory and/or retrieval chunks)
        self.enabled = settings.summary_memory or settings.retrieval != "off"

    def lines(self, before: EngineState, after: EngineState, batch: Batch,
              ) -> list[TranscriptLine]:
        """The batch's entries with their token positions in the stream."""
        pos = before.tokens_seen
        if before.tokens_seen == 0 and batch.entries:
            pos += len(self.engine.stream_prefix())
        lines = []
        for entry, n in zip(batch.entries, batch.counts, strict=True):
            line = format_turn(entry.text, entry.speaker) if entry.text else ""
            lines.append(TranscriptLine(entry.id, line, entry.speaker, entry.ts, pos, pos + n))
            pos += n
        if pos != after.tokens_seen:  # would misplace chunks against the window
            raise RuntimeError(f"memory positions disagree with the state: {pos} vs "
                               f"{after.tokens_seen} tokens")
        return lines

    def moments(self, head: MemoryHead | None, lines: Sequence[TranscriptLine],
                ) -> list[Moment] | None:
        """The key moments after this batch (None: not kept)."""
        if head is None or not self.settings.summary_memory or self.settings.key_moments == 0:
            return None
        return highlights.fold(head.moments, lines, self.settings.key_moments)

    def plan(self, head: MemoryHead | None, lines: Sequence[TranscriptLine],
             prose: str | None, covers: str, moments: Sequence[Moment] | None,
             after: EngineState) -> MemoryWrite | None:
        """What this batch changes in the stream's memory (None: the stream keeps none).
        ``prose``: the summary this batch wrote (guarded), which the next one folds in."""
        if head is None:
            return None
        summary = None
        if self.settings.summary_memory and prose:
            summary = SummaryMemory(prose, covers, after.tokens_seen)
        retrieval = self.settings.retrieval != "off"
        window = self.engine.window_tokens()
        return plan_write(
            head, lines if retrieval else [],
            chunk_tokens=self.settings.memory_chunk_tokens if retrieval else None,
            max_chunks=self.settings.memory_max_chunks, summary=summary, moments=moments,
            horizon=None if window is None else after.tokens_seen - window,
        )
