"""Notes as people read them: markdown sections, every bullet citing what it rests on.

A bullet ends with its sources: who said it, when (media time of the entries, when producers
sent ``ts``) and the entry ids, e.g. ``- We ship the three-screen flow at launch. (Maya 1:37;
entry 1796...-0)``. The same items travel as JSON on the output entry (``items``), for clients
that link bullets to the transcript.
"""

from __future__ import annotations

from collections.abc import Sequence

from sinkstream.contracts.outputs import clock
from workers.notes.items import NoteItem

SECTION_TITLES = {"decision": "Decisions", "action": "Action items",
                  "question": "Open questions"}
NONE_NOTED = "- none noted"


def bullet(item: NoteItem) -> str:
    """One item as a markdown bullet with its owner, due date and citations."""
    text = item.text.strip()
    if not text.endswith((".", "?", "!")):
        text += "."
    if item.kind == "action" and item.owner and not text.lower().startswith(item.owner.lower()):
        text = f"**{item.owner}**: {text}"
    if item.kind == "action" and item.due and not any(d.lower() in text.lower()
                                                      for d in item.due):
        text += f" Due: {'; '.join(item.due)}."
    return f"- {text} ({cite(item)})"


def cite(item: NoteItem) -> str:
    """``Maya 0:48, Tomas 0:40; entries 17...-0, 17...-1``: who, when, which entries."""
    who = []
    for c in item.cites:
        label = c.speaker or "?"
        if c.ts is not None:
            label += f" {clock(c.ts)}"
        if label not in who:
            who.append(label)
    entries = ", ".join(c.entry_id for c in item.cites)
    noun = "entry" if len(item.cites) == 1 else "entries"
    return f"{', '.join(who)}; {noun} {entries}"


def sections(items: Sequence[NoteItem], empty: str = NONE_NOTED) -> str:
    """``## Decisions`` / ``## Action items`` / ``## Open questions``, each listing its items
    in the order they were first said."""
    out = []
    for kind, title in SECTION_TITLES.items():
        mine = [bullet(i) for i in items if i.kind == kind]
        out.append(f"## {title}\n" + ("\n".join(mine) if mine else empty))
    return "\n\n".join(out)


def whats_new(items: Sequence[NoteItem]) -> str:
    """The items a rolling update adds, kind by kind (nothing when there are none)."""
    out = []
    for kind, title in SECTION_TITLES.items():
        mine = [bullet(i) for i in items if i.kind == kind]
        if mine:
            out.append(f"### {title}\n" + "\n".join(mine))
    return "\n".join(out)


def overview(items: Sequence[NoteItem]) -> str:
    """A summary line counted from the items, for models whose own prose is not trusted: what
    it states is true by construction (the counts and owners of the bullets below)."""
    if not items:
        return "Nothing was decided, assigned or left open in what was said so far."
    owners = sorted({i.owner for i in items if i.kind == "action" and i.owner})
    counts = []
    for kind, (one, many) in (("decision", ("decision", "decisions")),
                              ("action", ("action item", "action items")),
                              ("question", ("open question", "open questions"))):
        n = sum(1 for i in items if i.kind == kind)
        if n:
            count = f"{n} {one if n == 1 else many}"
            if kind == "action" and owners:
                count += f" (owners: {', '.join(owners)})"
            counts.append(count)
    said = counts[0] if len(counts) == 1 else ", ".join(counts[:-1]) + " and " + counts[-1]
    return f"{said[0].upper()}{said[1:]}, each below with the lines it rests on."
