"""The notes parser: today's sections, citations however they are bracketed, and text
without any structure, all into the same shape."""

from __future__ import annotations

from sinkstream.gateway.notes import parse_notes, resolve_citations

FINAL = """## Summary
The team reviewed the Harbor launch. They agreed the crash fix blocks it.

## Decisions
- The camera permission fix is a launch blocker (1796280736508-0)
- Ship on the fourteenth [1796280736508-3, 1796280736508-4]

## Action items
1. Tomas: merge the fix by two o'clock (entries 1796280736508-5..1796280736508-6)
2. Priya reviews it
   this morning

## Open questions
- none noted

## Key moments
- Maya: A crash on first launch is a blocker. (1796280736508-0)
- Tomas: I will merge it by two o'clock. (1796280736508-5)
"""


def test_sections_items_and_citations() -> None:
    sections = parse_notes(FINAL)
    assert [s.key for s in sections] == ["summary", "decisions", "action_items",
                                         "open_questions", "key_moments"]
    summary = sections[0].items
    assert len(summary) == 1 and summary[0].prose
    decisions = sections[1].items
    assert decisions[0].text == "The camera permission fix is a launch blocker"
    assert decisions[0].citations == ["1796280736508-0"]
    assert decisions[1].text == "Ship on the fourteenth"
    assert decisions[1].citations == ["1796280736508-3", "1796280736508-4"]
    actions = sections[2].items
    assert actions[0].text == "Tomas: merge the fix by two o'clock"
    assert actions[0].citations == ["1796280736508-5", "1796280736508-6"]
    assert actions[1].text == "Priya reviews it this morning", "continuation lines join"
    moments = sections[4].items
    assert (moments[0].speaker, moments[0].text) == ("Maya", "A crash on first launch is a "
                                                              "blocker.")


def test_key_moments_quote_the_decisions_they_share_an_id_with() -> None:
    citations = resolve_citations(None, "s", parse_notes(FINAL))
    quoted = citations["1796280736508-0"]
    assert quoted.quote == "A crash on first launch is a blocker." and quoted.speaker == "Maya"
    assert quoted.time == 1796280736.508
    assert citations["1796280736508-3"].quote is None


def test_plain_text_and_odd_shapes_never_fail() -> None:
    assert [(s.title, [i.text for i in s.items]) for s in parse_notes(
        "The meeting covered the launch.\n\nThen pricing.")] == [
        ("Summary", ["The meeting covered the launch.", "Then pricing."])]
    assert parse_notes("") == []
    odd = parse_notes("# Notes ##\n* star bullet (1700000000000-1) and text after\n"
                      "### New decisions\n- a decision (see 1700000000000-2)")
    assert [s.title for s in odd] == ["Notes", "New decisions"]
    assert odd[0].items[0].text == "star bullet and text after"
    assert odd[1].items[0].citations == ["1700000000000-2"]
    assert odd[1].items[0].text == "a decision"
    # a number that is not an entry id is not a citation
    assert parse_notes("- ship 2-3 features in 2026")[0].items[0].citations == []
