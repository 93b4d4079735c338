"""What a stream has said, as the guard's support: its words and its facts.

Every batch adds the words and facts of its lines to the stream's ``vocab`` hash (one field
each, set inside the batch's commit: idempotent, so no read is needed to write). A generated
summary or answer is checked against it: a name, number, date or time the stream never said is
not in the summary either. Kept apart from the memory hash because it is only read when
something is generated, never on the feed path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.replies import as_text
from workers.memory.lines import TranscriptLine
from workers.notes.facts import facts, words
from workers.notes.guard import Support

_WORD = "w:"
_FACT = "f:"


def fields_of(lines: Sequence[TranscriptLine]) -> dict[str, int]:
    """The vocab fields ``lines`` add (field -> 1)."""
    out: dict[str, int] = {}
    for line in lines:
        if not line.line:  # a log line: its text went into the template table instead
            continue
        for word in words(line.line):
            out[_WORD + word] = 1
        for fact in facts(line.line):
            out[f"{_FACT}{fact.kind}:{fact.key}"] = 1
        if line.speaker:
            out[_WORD + line.speaker.lower()] = 1
    return out


def read_support(client: redis.Redis, stream_id: str, people: Iterable[str] = ()) -> Support:
    """The stream's support: everything its vocab holds, and its people's names."""
    names: Any = client.hkeys(StreamKeys.of(stream_id).vocab)
    return support_of((as_text(n, "replace") for n in names), people)


def support_of(fields: Iterable[str], people: Iterable[str] = ()) -> Support:
    found = set()
    vocabulary = set()
    for name in fields:
        if name.startswith(_WORD):
            vocabulary.add(name[len(_WORD):])
        elif name.startswith(_FACT):
            kind, _, key = name[len(_FACT):].partition(":")
            found.add((kind, key))
    people = list(people)
    vocabulary |= {p.lower() for p in people}
    return Support(frozenset(found), frozenset(vocabulary),  # type: ignore[arg-type]
                   {p.lower(): p for p in people})
