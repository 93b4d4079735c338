"""The notes' items: decisions, action items and open questions, with what they rest on.

An item is born from a line that states it (``cues``) and keeps that line's entry id, speaker
and time; a later line that says it again (a confirmation, a recap) adds its citation rather
than a second item. Items live in the stream's memory hash (``items``), written only inside the
batch's own fenced commit, so a replay after a crash rewrites the same items.

``text`` is what the notes publish: the model's phrasing when it passed the guard, else the
speaker's own words (``said``). ``lines`` keeps the cited lines themselves (a few, cut), which
is what the phrasing prompt and the guard read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from workers.memory.highlights import content_words
from workers.notes.cues import Candidate, ItemKind

#: most items kept per stream (a two-hour meeting has a few dozen)
MAX_ITEMS = 200
#: cited lines kept per item (the first statements and the latest restatement)
MAX_LINES = 4
MAX_LINE_CHARS = 400
#: how much two statements must share (content-word stems, Jaccard) to be the same item; an
#: action also needs the same owner, a strong sign on its own
_SAME_ITEM = {"action": 0.2, "decision": 0.25, "question": 0.3}
RECORD_VERSION = 1


class ItemRecordError(ValueError):
    """An ``items`` field this version cannot read."""


@dataclass(frozen=True)
class Citation:
    entry_id: str
    speaker: str | None
    ts: float | None


@dataclass(frozen=True)
class NoteItem:
    seq: int
    kind: ItemKind
    said: str
    text: str
    owner: str | None = None
    due: tuple[str, ...] = ()
    cites: tuple[Citation, ...] = ()
    lines: tuple[str, ...] = ()
    #: ``text`` is the model's phrasing of ``lines`` (checked by the guard)
    phrased: bool = False
    #: the item gained a citation or a due date since ``text`` was written
    stale: bool = True
    #: every clause that stated it (what a new clause is compared with)
    clauses: tuple[str, ...] = ()

    @property
    def speakers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.speaker for c in self.cites if c.speaker))

    def to_dict(self) -> dict[str, Any]:
        """The item as output entries carry it (JSON)."""
        out: dict[str, Any] = {
            "kind": self.kind, "text": self.text,
            "entries": [c.entry_id for c in self.cites],
            "speakers": list(self.speakers),
            "ts": [c.ts for c in self.cites if c.ts is not None][:1]
            + [c.ts for c in self.cites if c.ts is not None][-1:],
        }
        if self.owner:
            out["owner"] = self.owner
        if self.due:
            out["due"] = list(self.due)
        if not self.phrased:
            out["verbatim"] = True
        return out


def merge(items: Sequence[NoteItem], found: Iterable[Candidate]) -> tuple[list[NoteItem], bool]:
    """``items`` with ``found`` folded in: each candidate either cites an item it restates or
    becomes a new one. Returns the items and whether anything changed. Deterministic: the same
    items and candidates give the same result, whatever the batching."""
    out = list(items)
    changed = False
    for candidate in found:
        best = _restated(out, candidate)
        if best is None:
            if len(out) >= MAX_ITEMS:
                continue
            out.append(_new(candidate, (out[-1].seq + 1) if out else 0))
        else:
            updated = _cite(out[best], candidate)
            if updated == out[best]:
                continue
            out[best] = updated
        changed = True
    return out, changed


def stems(text: str) -> set[str]:
    """Content words without their endings: "merge", "merges", "merged", "merging" -> "merg";
    "write", "writes" -> "writ" (enough to tell that two statements are about one task)."""
    return {_stem(w) for w in content_words(text)}


def _stem(word: str) -> str:
    if word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 4 else word


def _restated(items: Sequence[NoteItem], candidate: Candidate) -> int | None:
    """Index of the item ``candidate`` says again, if any (the most similar one)."""
    words = stems(candidate.said)
    best, best_score = None, _SAME_ITEM[candidate.kind]
    for i, item in enumerate(items):
        if item.kind != candidate.kind or (item.kind == "action" and item.owner != candidate.owner):
            continue
        if any(c.entry_id == candidate.entry_id for c in item.cites) \
                and candidate.said in item.said:
            return i  # the same clause read again (a replayed batch)
        score = max(_similarity(words, stems(said)) for said in item.clauses)
        if score >= best_score:
            best, best_score = i, score
    return best


def _similarity(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


def _new(candidate: Candidate, seq: int) -> NoteItem:
    said = candidate.said
    return NoteItem(seq, candidate.kind, said, said, candidate.owner,
                    (candidate.due,) if candidate.due else (),
                    (Citation(candidate.entry_id, candidate.speaker, candidate.ts),),
                    (_cut(candidate.line),), clauses=(_cut(said),))


def _cite(item: NoteItem, candidate: Candidate) -> NoteItem:
    cites = item.cites
    if all(c.entry_id != candidate.entry_id for c in cites):
        cites = (*cites, Citation(candidate.entry_id, candidate.speaker, candidate.ts))
    due = item.due
    if candidate.due and candidate.due.lower() not in {d.lower() for d in due}:
        due = (*due, candidate.due)
    lines = item.lines
    line = _cut(candidate.line)
    if line not in lines:
        lines = (*lines[:MAX_LINES - 1], line)
    clauses = item.clauses
    said = _cut(candidate.said)
    if said not in clauses:
        clauses = (*clauses[:MAX_LINES - 1], said)
    said_now = item.said
    if _owner_speaks(item, candidate):
        said_now = candidate.said
    if (cites, due, lines, clauses, said_now) == (item.cites, item.due, item.lines,
                                                  item.clauses, item.said):
        return item
    text = item.text if item.phrased or said_now == item.said else said_now
    return replace(item, said=said_now, text=text, cites=cites, due=due, lines=lines,
                   clauses=clauses, stale=True)


def _owner_speaks(item: NoteItem, candidate: Candidate) -> bool:
    """An action item first stated by someone else ("Tomas, can you merge it today?") is
    then told in its owner's own commitment ("I will merge it by two o'clock"), once."""
    if item.kind != "action" or not item.owner or candidate.speaker != item.owner:
        return False
    own = f"{item.owner}:"
    return not any(line.startswith(own) and item.said in line for line in item.lines)


def _cut(line: str) -> str:
    return line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS].rsplit(" ", 1)[0]


# ----- the record ---------------------------------------------------------------------------------
def encode(items: Sequence[NoteItem]) -> bytes:
    return msgpack.packb({"v": RECORD_VERSION, "items": [_pack(i) for i in items]},
                         use_bin_type=True)


def decode(data: bytes) -> list[NoteItem]:
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if not isinstance(raw, dict) or raw.get("v") != RECORD_VERSION:
            raise ItemRecordError("items record of another format version")
        return [_unpack(i) for i in raw["items"]]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
        raise ItemRecordError(f"unreadable items record: {exc}") from None


def _pack(item: NoteItem) -> list[Any]:
    return [item.seq, item.kind, item.said, item.text, item.owner or "", list(item.due),
            [[c.entry_id, c.speaker or "", c.ts] for c in item.cites], list(item.lines),
            item.phrased, item.stale, list(item.clauses)]


def _unpack(raw: list[Any]) -> NoteItem:
    seq, kind, said, text, owner, due, cites, lines, phrased, stale, clauses = raw
    if kind not in _SAME_ITEM:
        raise ItemRecordError(f"unknown item kind {kind!r}")
    return NoteItem(int(seq), kind, str(said), str(text), str(owner) or None,
                    tuple(str(d) for d in due),
                    tuple(Citation(str(e), str(s) or None, None if t is None else float(t))
                          for e, s, t in cites),
                    tuple(str(line) for line in lines), bool(phrased), bool(stale),
                    tuple(str(c) for c in clauses))
