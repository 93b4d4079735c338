"""One applied entry as memory sees it: the line the model read, and where it sits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TranscriptLine:
    """One applied entry as memory sees it: the line the model read and where it sits.

    ``start``/``end`` are token positions in the stream (end exclusive).
    """

    entry_id: str
    line: str
    speaker: str | None
    ts: float | None
    start: int
    end: int
