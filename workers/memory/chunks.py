"""Cutting the transcript into retrieval chunks, deterministically.

A chunk closes right after the entry that brings it to ``chunk_tokens`` tokens. Boundaries
depend only on the sequence of entries (never on how workers happened to batch them), so a
batch replayed after a crash, by any worker, closes the same chunks with the same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from workers.memory.lines import TranscriptLine
from workers.memory.records import OpenChunk


def extend_chunks(
    open_chunk: OpenChunk | None, turns: Sequence[TranscriptLine], chunk_tokens: int
) -> tuple[list[OpenChunk], OpenChunk | None]:
    """Add ``turns`` to the open chunk; return the chunks that closed and the new open one."""
    closed: list[OpenChunk] = []
    current = open_chunk
    for turn in turns:
        if turn.end <= turn.start or not turn.line.strip():
            continue  # e.g. the empty end-of-stream entry
        current = _append(current, turn)
        if current.tokens >= chunk_tokens:
            closed.append(current)
            current = None
    return closed, current


def _append(chunk: OpenChunk | None, turn: TranscriptLine) -> OpenChunk:
    speakers: tuple[str, ...] = (turn.speaker,) if turn.speaker else ()
    ts = (turn.ts, turn.ts) if turn.ts is not None else None
    if chunk is None:
        return OpenChunk(turn.entry_id, turn.entry_id, turn.line, turn.start, turn.end,
                         speakers, ts)
    if turn.speaker and turn.speaker not in chunk.speakers:
        speakers = (*chunk.speakers, turn.speaker)
    else:
        speakers = chunk.speakers
    if chunk.ts is None:
        merged_ts = ts
    elif turn.ts is None:
        merged_ts = chunk.ts
    else:
        merged_ts = (chunk.ts[0], turn.ts)
    return replace(chunk, last_id=turn.entry_id, text=chunk.text + turn.line, end=turn.end,
                   speakers=speakers, ts=merged_ts)
