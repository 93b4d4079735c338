"""The notes' part of a stream's memory hash: items, the people of the stream, the cursor.

``items`` (``workers.notes.items``), ``people`` (the speakers so far: who can own an action
item, whose names the notes may use) and ``notes_cursor`` (the first item the next rolling
update reports as new) are read with the batch's other reads and written only inside its
fenced commit, like the rest of the memory hash.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import redis

from sinkstream.contracts.keys import StreamKeys
from workers.notes import items as item_records
from workers.notes.items import NoteItem

log = logging.getLogger(__name__)

ITEMS_FIELD = "items"
PEOPLE_FIELD = "people"
CURSOR_FIELD = "notes_cursor"
FIELDS = (ITEMS_FIELD, PEOPLE_FIELD, CURSOR_FIELD)
#: most people remembered per stream
MAX_PEOPLE = 200


@dataclass
class NotesHead:
    items: list[NoteItem] = field(default_factory=list)
    people: list[str] = field(default_factory=list)
    cursor: int = 0

    def with_people(self, speakers: Sequence[str | None]) -> NotesHead:
        """This head knowing ``speakers`` too (first-seen order, bounded)."""
        people = list(self.people)
        for speaker in speakers:
            if speaker and speaker not in people and len(people) < MAX_PEOPLE:
                people.append(speaker)
        return NotesHead(self.items, people, self.cursor)

    def fields(self, before: NotesHead) -> dict[str, bytes | int]:
        """The hash fields that changed since ``before`` (what the commit sets)."""
        out: dict[str, bytes | int] = {}
        if self.items != before.items:
            out[ITEMS_FIELD] = item_records.encode(self.items)
        if self.people != before.people:
            out[PEOPLE_FIELD] = msgpack.packb(self.people)
        if self.cursor != before.cursor:
            out[CURSOR_FIELD] = self.cursor
        return out


def request(pipe: redis.client.Pipeline, stream_id: str) -> None:
    """Queue the head's HMGET on ``pipe`` (it shares the batch's read round trip)."""
    pipe.hmget(StreamKeys.of(stream_id).memory, list(FIELDS))


def parse(stream_id: str, values: Sequence[Any]) -> NotesHead:
    """The head from its HMGET reply; an unreadable part starts afresh (with a warning):
    notes are an aid, not the state."""
    raw_items, raw_people, raw_cursor = values
    head = NotesHead()
    try:
        if raw_items:
            head.items = item_records.decode(raw_items)
        if raw_people:
            head.people = [str(p) for p in msgpack.unpackb(raw_people, raw=False)]
        head.cursor = int(raw_cursor) if raw_cursor else 0
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        log.warning("stream %s: notes unreadable (%s); starting them afresh", stream_id, exc)
        return NotesHead()
    return head
