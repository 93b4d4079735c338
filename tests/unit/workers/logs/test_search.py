"""Which kept lines a question is about: the identifiers it names, else its words."""

from __future__ import annotations

from workers.logs.parse import parse_line
from workers.logs.retention import KeptLine
from workers.logs.search import identifiers, relevant_lines

RAW = [
    "INFO Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106",
    "INFO Receiving block blk_-160899968791986290 src: /10.250.19.10:54106",
    "ERROR DataXceiver error on datanode 10.250.19.102 writing blk_-1608999687919862906",
    "WARN datanode volume /data/3 is 97% full",
    "INFO Verification succeeded for blk_77",
    "ERROR datanode heartbeat lost",
]
LINES = [KeptLine(f"1-{i}", 1700000000.0 + i, parse_line(text)) for i, text in enumerate(RAW)]


def test_identifiers_are_the_tokens_that_hold_a_digit() -> None:
    assert identifiers("what happened to blk_-1608999687919862906 on 10.250.19.102:50010?") \
        == ["blk_-1608999687919862906", "10.250.19.102:50010"]
    assert identifiers("when did the datanode errors start?") == []


def test_a_named_identifier_must_be_in_the_line_as_a_whole_token() -> None:
    found = relevant_lines(LINES, "what happened to blk_-1608999687919862906?")
    assert [line.entry_id for line, _ in found] == ["1-0", "1-2"]  # not the prefix's line
    assert [line.entry_id for line, _ in relevant_lines(LINES, "who is 10.250.19.10?")] \
        == ["1-1"]  # not 10.250.19.102


def test_without_identifiers_a_line_shares_two_words_and_problems_come_first() -> None:
    found = relevant_lines(LINES, "which datanode errors happened?", k=2)
    assert [line.entry_id for line, _ in found] == ["1-2", "1-5"]  # oldest first
    assert relevant_lines(LINES, "anything about kittens?") == []
    assert relevant_lines(LINES, "what?") == []


def test_a_question_about_a_beginning_quotes_the_earliest_lines() -> None:
    same = [KeptLine(f"2-{i}", 1700000000.0 + i, parse_line("ERROR datanode disk failed"))
            for i in range(8)]
    assert [line.entry_id for line, _ in relevant_lines(same, "when did datanode errors "
                                                         "start?", k=2)] == ["2-0", "2-1"]
    assert [line.entry_id for line, _ in relevant_lines(same, "any datanode errors?", k=2)] \
        == ["2-6", "2-7"]
