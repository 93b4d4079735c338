"""The output-entry contract: what a summary or an answer looks like on ``sinkstream:{id}:out``.

One entry per summary or answer (README, "Wire format"): its ``kind``, ``text``, the last input
entry it ``covers``, ``tokens_seen``, the ``model``, a ``ts``, the on-demand ``request`` id,
for answers the ``sources`` it rests on (JSON), and for notes the ``items`` they list (JSON:
decisions, action items and open questions, each with the entries it cites). Workers write
these; the CLI, the gateway and any Redis client read them.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any


class SummaryKind(str, Enum):
    ROLLING = "rolling"
    FINAL = "final"
    ON_DEMAND = "on_demand"
    ANSWER = "answer"


@dataclass(frozen=True)
class Source:
    """What an answer rests on: a run of input entries, who spoke, when, how relevant, and
    the line of it the answer quotes (at most one source of an answer has one).

    The quote travels with its source, not inside the answer's text: it is the speakers'
    own words, evidence the reader can check, and a client can show it, link it to the
    entries or leave it out; appended to the text, it was a second answer glued to the
    model's (on QMSum it also pulled the answer's ROUGE-L from 0.162 to 0.153).
    """

    entries: tuple[str, str]
    speakers: tuple[str, ...] = ()
    ts: tuple[float, float] | None = None
    score: float = 0.0
    quote: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"entries": list(self.entries), "speakers": list(self.speakers),
                               "ts": list(self.ts) if self.ts is not None else None,
                               "score": round(self.score, 4)}
        if self.quote:
            out["quote"] = self.quote
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Source:
        first, last = raw["entries"]
        ts = raw.get("ts")
        return cls((str(first), str(last)), tuple(str(s) for s in raw.get("speakers") or ()),
                   (float(ts[0]), float(ts[1])) if ts else None, float(raw.get("score", 0.0)),
                   str(raw.get("quote") or ""))

    def label(self) -> str:
        """``12:01-14:30, Alice, Bob`` (or the entry ids when there are no timestamps)."""
        where = (f"{clock(self.ts[0])}-{clock(self.ts[1])}" if self.ts is not None
                 else f"entries {self.entries[0]}..{self.entries[1]}")
        return f"{where}, {', '.join(self.speakers)}" if self.speakers else where


#: a time this far from 0 is a wall-clock time (seconds since 1970: log lines, captions with
#: absolute times), not an offset into a recording; about 10 years
_EPOCH_FROM_S = 315_360_000


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss`` for an offset into a recording (timestamps of entries are
    seconds); ``YYYY-MM-DD HH:MM:SS`` UTC for a wall-clock time (e.g. a log line's)."""
    if abs(seconds) >= _EPOCH_FROM_S:
        return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    whole = int(seconds)
    h, m, s = whole // 3600, whole // 60 % 60, whole % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass(frozen=True)
class OutputEntry:
    """One entry of ``sinkstream:{id}:out`` (contract: see README "Output entries")."""

    kind: SummaryKind
    text: str
    covers: str  # id of the last input entry applied to the state summarized
    tokens_seen: int
    model: str
    ts: float
    request: str = ""
    sources: tuple[Source, ...] = ()
    #: notes: ``{"kind", "text", "entries", "speakers", "ts", "owner"?, "due"?,
    #: "verbatim"?}`` per item (``workers/notes/items.py``)
    items: tuple[dict[str, Any], ...] = ()

    def fields(self) -> dict[str, str]:
        out = {
            "kind": self.kind.value,
            "text": self.text,
            "covers": self.covers,
            "tokens_seen": str(self.tokens_seen),
            "model": self.model,
            "ts": f"{self.ts:.3f}",
        }
        if self.request:
            out["request"] = self.request
        if self.sources:
            out["sources"] = json.dumps([src.to_dict() for src in self.sources])
        if self.items:
            out["items"] = json.dumps(list(self.items))
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> OutputEntry:
        return cls(
            kind=SummaryKind(fields["kind"]),
            text=fields.get("text", ""),
            covers=fields.get("covers", ""),
            tokens_seen=int(fields.get("tokens_seen", "0")),
            model=fields.get("model", ""),
            ts=float(fields.get("ts", "0")),
            request=fields.get("request", ""),
            sources=parse_sources(fields.get("sources", "")),
            items=parse_items(fields.get("items", "")),
        )


def parse_sources(text: str) -> tuple[Source, ...]:
    """The ``sources`` field of an output entry (empty or unreadable: none)."""
    if not text:
        return ()
    try:
        return tuple(Source.from_dict(raw) for raw in json.loads(text))
    except (ValueError, KeyError, TypeError):
        return ()


def parse_items(text: str) -> tuple[dict[str, Any], ...]:
    """The ``items`` field of an output entry (empty or unreadable: none)."""
    if not text:
        return ()
    try:
        raw = json.loads(text)
    except ValueError:
        return ()
    return tuple(i for i in raw if isinstance(i, dict)) if isinstance(raw, list) else ()


def make_output(
    kind: SummaryKind, text: str, covers: str, tokens_seen: int, model: str, request: str = "",
    sources: Sequence[Source] = (), items: Sequence[dict[str, Any]] = (),
) -> OutputEntry:
    return OutputEntry(kind, text.strip(), covers, tokens_seen, model, time.time(), request,
                       tuple(sources), tuple(items))
