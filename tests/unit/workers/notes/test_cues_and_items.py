"""Items found in the transcript's own lines, restatements citing the item they restate."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.formats import read_file
from workers.memory.lines import TranscriptLine
from workers.notes import items as item_records
from workers.notes.cues import clauses, due, find
from workers.notes.items import NoteItem, merge
from workers.notes.render import bullet, sections

DEMO = Path(__file__).resolve().parents[4] / "sinkstream" / "samples" / "launch-review.vtt"


def _lines() -> list[TranscriptLine]:
    turns = read_file(DEMO, "vtt")
    return [TranscriptLine(f"{1000 + i}-0", f"{t.speaker}: {t.text}\n", t.speaker, t.ts, 0, 0)
            for i, t in enumerate(turns)]


def _notes(batch: int) -> list[NoteItem]:
    lines, people = _lines(), ["Maya", "Tomas", "Priya", "Jonas"]
    items: list[NoteItem] = []
    for start in range(0, len(lines), batch):
        items, _ = merge(items, find(lines[start:start + batch], people))
    return items


def test_a_recap_is_cut_into_one_clause_per_named_subject() -> None:
    assert clauses("To recap: Tomas merges the crash fix today, Priya reviews it and gets the "
                   "legal answer by Monday, Jonas writes the experiment summary and tells "
                   "marketing.") == [
        "To recap: Tomas merges the crash fix today",
        "Priya reviews it and gets the legal answer by Monday",
        "Jonas writes the experiment summary and tells marketing."]


@pytest.mark.parametrize(("text", "when"), [
    ("I will merge it by two o'clock.", "by two o'clock"),
    ("ask Elena for a final answer by Monday noon", "by Monday noon"),
    ("I will review it right after this meeting.", "right after this meeting"),
    ("we slip by one week to the twenty first", None),
    ("send a short note to marketing today", "today"),
])
def test_due_is_what_the_clause_says_of_when(text: str, when: str | None) -> None:
    assert due(text) == when


def test_the_demo_meeting_gives_its_decisions_owners_and_dues() -> None:
    items = _notes(batch=5)
    decisions = [i.said for i in items if i.kind == "decision"]
    assert any("three-screen onboarding flow" in d for d in decisions)
    assert any("keep the text in the app for launch" in d for d in decisions)
    assert any("twenty first" in d and "Monday noon" in d for d in decisions)  # whole plan
    assert not any(d.startswith("Three topics") for d in decisions)  # an agenda, not a decision
    actions = {(i.owner, i.said) for i in items if i.kind == "action"}
    owners = [owner for owner, _ in actions]
    assert sorted(set(owners)) == ["Jonas", "Priya", "Tomas"]
    merge_fix = next(i for i in items if i.owner == "Tomas" and "merge" in i.said)
    assert set(merge_fix.due) == {"today", "by two o'clock"}
    assert len(merge_fix.cites) >= 3  # the request, the promise, the decision, the recap
    questions = [i.said for i in items if i.kind == "question"]
    assert any("who monitors crash reports" in q for q in questions)


def test_an_action_item_is_told_in_its_owners_own_commitment() -> None:
    # Maya asks "Tomas, can you merge it today?"; Tomas answers "I will merge it by two o'clock"
    items = _notes(batch=5)
    merge_fix = next(i for i in items if i.owner == "Tomas" and "merge" in i.said)
    assert merge_fix.said == merge_fix.text == "I will merge it by two o'clock."
    review = [i for i in items if i.kind == "action" and "review" in i.said]
    assert [(i.owner, i.said) for i in review] == [
        ("Priya", "I will review it right after this meeting.")]


def test_a_task_named_as_a_condition_gives_nobody_an_item() -> None:
    line = TranscriptLine("1-0", "Tomas: Yes, if Priya reviews it this morning.\n", "Tomas",
                          40.0, 0, 0)
    assert find([line], ["Priya", "Tomas"]) == []


def test_items_do_not_depend_on_how_the_stream_was_batched() -> None:
    one_by_one = [(i.kind, i.owner, i.said, [c.entry_id for c in i.cites]) for i in _notes(1)]
    all_at_once = [(i.kind, i.owner, i.said, [c.entry_id for c in i.cites]) for i in _notes(50)]
    assert one_by_one == all_at_once


def test_a_replayed_batch_changes_nothing_and_records_round_trip() -> None:
    lines = _lines()
    items, _ = merge([], find(lines, ["Maya"]))
    again, changed = merge(items, find(lines, ["Maya"]))
    assert again == items and not changed
    assert item_records.decode(item_records.encode(items)) == items


def test_every_bullet_cites_who_when_and_which_entries() -> None:
    items = _notes(batch=5)
    line = bullet(next(i for i in items if i.owner == "Jonas" and "experiment" in i.said))
    assert line.startswith("- **Jonas**: I will write the experiment summary")
    assert "Jonas 1:42" in line and "1018-0" in line
    text = sections(items)
    assert [h for h in text.splitlines() if h.startswith("## ")] == [
        "## Decisions", "## Action items", "## Open questions"]
    assert sections([]).count("- none noted") == 3
