"""Rejected input entries as dead letters: bounded, so no input can make a commit fail.

A dead letter keeps the entry id, the reason and the fields it held (decoded with
replacement characters), cut to fixed sizes: anyone can XADD anything to an input stream,
and the dead letter is written inside the batch's commit script, which must not fail on it.
"""

from __future__ import annotations

import time

from sinkstream.contracts.entries import Rejected

#: Longest field value copied into a dead letter; the rest is cut with a note.
DEAD_LETTER_FIELD_BYTES = 4096
#: Most fields, and longest field name, copied into a dead letter.
DEAD_LETTER_MAX_FIELDS = 32
DEAD_LETTER_NAME_BYTES = 128


def dead_letter(rejected: Rejected) -> dict[str, str]:
    """The rejected entry's id, reason and (bounded) fields: at most DEAD_LETTER_MAX_FIELDS
    fields, names and values cut."""
    items = list(rejected.fields.items())
    fields = {f"field:{_cut(k, DEAD_LETTER_NAME_BYTES)}": _cut(v)
              for k, v in items[:DEAD_LETTER_MAX_FIELDS]}
    out = {"entry_id": rejected.id, "reason": rejected.reason, "ts": f"{time.time():.3f}",
           **fields}
    if len(items) > DEAD_LETTER_MAX_FIELDS:
        out["fields_cut"] = str(len(items) - DEAD_LETTER_MAX_FIELDS)
    return out


def _cut(value: str, limit: int = DEAD_LETTER_FIELD_BYTES) -> str:
    data = value.encode("utf-8", "replace")
    if len(data) <= limit:
        return value
    head = data[:limit].decode("utf-8", "ignore")
    return f"{head}... [{len(data) - limit} more bytes cut]"
