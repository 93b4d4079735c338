"""The faithfulness guard: what a generated sentence states must be in what it rests on."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.formats import read_file
from workers.notes.facts import facts, normalise_numbers
from workers.notes.guard import Support, check, check_sentence

DEMO = Path(__file__).resolve().parents[4] / "sinkstream" / "samples" / "launch-review.vtt"


@pytest.fixture(scope="module")
def meeting() -> Support:
    turns = read_file(DEMO, "vtt")
    return Support.of([f"{t.speaker}: {t.text}" for t in turns],
                      names=sorted({t.speaker for t in turns if t.speaker}))


def test_numbers_written_in_words_are_the_same_facts_as_digits() -> None:
    assert normalise_numbers("from sixty one percent to seventy-four") == "from 61 percent to 74"
    said = {(f.kind, f.key) for f in facts("we slip by one week to the twenty first")}
    written = {(f.kind, f.key) for f in facts("The launch moves to the 21st.")}
    assert ("number", "21") in said & written
    assert {(f.kind, f.key) for f in facts("by 2pm")} == {("time", "14:00")}
    assert ("number", "4000") in {(f.kind, f.key) for f in facts("4,000 users")}


def test_what_the_meeting_said_is_kept_in_any_wording(meeting: Support) -> None:
    for sentence in ("Completion rose from 61% to 74% over two weeks.",
                     "Jonas shares the experiment summary by Thursday.",
                     "Priya asks Elena for a final answer by Monday noon.",
                     "If legal approves, the launch stays on the 14th; else it slips to the "
                     "21st.",
                     "Overall, the team agreed to ship the three-screen flow."):
        assert check_sentence(sentence, meeting).action == "kept", sentence


def test_a_misspelt_name_is_repaired_to_the_speaker_it_means(meeting: Support) -> None:
    verdict = check_sentence("Jonah will share the summary by Thursday.", meeting)
    assert (verdict.action, verdict.text) == (
        "repaired", "Jonas will share the summary by Thursday.")
    assert check_sentence("Toma merges the fix.", meeting).text == "Tomas merges the fix."


@pytest.mark.parametrize(("sentence", "reason"), [
    ("Completion rose from 60% to 74%.", "number"),              # 61, not 60
    ("The report was submitted at 1230 GMT.", "number"),
    ("The launch is on Tuesday.", "date"),                        # Monday, Thursday, Friday only
    ("Approval is due by 5pm.", "time"),
    ("Legal Inc. signed off.", "name"),                           # invented company
    ("Alice will review the fix.", "name"),                       # nobody called Alice
])
def test_an_invented_fact_drops_its_sentence(meeting: Support, sentence: str,
                                             reason: str) -> None:
    verdict = check_sentence(sentence, meeting)
    assert verdict.action == "dropped" and reason in verdict.reasons, verdict


def test_check_keeps_the_supported_sentences_of_a_text(meeting: Support) -> None:
    text = ("The team reviewed the launch. Completion rose to 74%. The date is June 13.\n"
            "- Tomas merges the fix today.\n- Legal Inc. approves by Tuesday.")
    checked = check(text, meeting)
    assert checked.text == ("The team reviewed the launch. Completion rose to 74%.\n"
                            "- Tomas merges the fix today.")
    assert [v.action for v in checked.verdicts] == ["kept", "kept", "dropped", "kept",
                                                    "dropped"]
