"""The notes' summary line for models whose prose is not trusted: counted from the items."""

from __future__ import annotations

from workers.notes.items import NoteItem
from workers.notes.render import overview


def _item(seq: int, kind: str, owner: str | None = None) -> NoteItem:
    return NoteItem(seq, kind, "said", "said", owner)  # type: ignore[arg-type]


def test_overview_counts_each_kind_and_names_the_owners() -> None:
    items = [_item(0, "decision"), _item(1, "action", "Tomas"), _item(2, "action", "Priya"),
             _item(3, "action", "Tomas"), _item(4, "question")]
    assert overview(items) == ("1 decision, 3 action items (owners: Priya, Tomas) and 1 open "
                               "question, each below with the lines it rests on.")


def test_overview_of_one_kind_and_of_nothing() -> None:
    assert overview([_item(0, "decision"), _item(1, "decision")]) == \
        "2 decisions, each below with the lines it rests on."
    assert overview([]).startswith("Nothing was decided")
