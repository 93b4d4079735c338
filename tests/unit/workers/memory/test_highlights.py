"""Key moments: extractive whole-stream memory that a small model cannot make drift."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.outputs import SummaryKind
from tests.unit.workers.processing.test_memory_writer import (  # noqa: F401
    _drain,
    _meeting,
    _processor,
    engine,
)
from workers.engines.base import Engine
from workers.memory.highlights import MOMENT_WORDS, Moment, fold, score
from workers.memory.lines import TranscriptLine
from workers.memory.persistence import read_head
from workers.memory.records import MemoryHead, decode_moments, encode_moments


def _turns(n: int, seed: int = 0) -> list[TranscriptLine]:
    rnd = random.Random(seed)
    words = "budget remote control battery design euro profit marketing deadline screen".split()
    turns = []
    for i in range(n):
        text = " ".join(rnd.choice(words + ["yeah", "okay"]) for _ in range(rnd.randrange(1, 12)))
        speaker = rnd.choice(["Ana", "Ben", None])
        line = f"{speaker}: {text}\n" if speaker else f"{text}\n"
        turns.append(TranscriptLine(f"{1000 + i}-0", line, speaker, float(i), i * 10, i * 10 + 10))
    return turns


def test_score_counts_distinct_content_words_only() -> None:
    assert score("Yeah, okay. Yeah.") == 0
    assert score("The battery design costs twelve euro, battery included") == 6


def test_fold_does_not_depend_on_how_the_stream_was_batched() -> None:
    turns = _turns(200)
    at_once = fold([], turns, keep=8)
    for seed in range(5):
        cuts = sorted(random.Random(seed).sample(range(1, 200), 12))
        moments: list[Moment] = []
        for start, end in zip([0, *cuts], [*cuts, 200], strict=True):
            moments = fold(moments, turns[start:end], keep=8)
        assert moments == at_once
    assert len(at_once) == 8
    assert [m.entry_id for m in at_once] == sorted((m.entry_id for m in at_once),
                                                   key=lambda i: int(i.split("-")[0]))
    assert min(m.score for m in at_once) >= max(
        score(t.line) for t in turns if t.entry_id not in {m.entry_id for m in at_once}) - 1


def test_moments_keep_the_speaker_apart_and_cut_long_turns() -> None:
    long = " ".join(f"word{i:03d}" for i in range(100))
    (moment,) = fold([], [TranscriptLine("5-1", f"Ana: {long}\n", "Ana", None, 0, 100)], keep=3)
    assert moment.speaker == "Ana" and not moment.text.startswith("Ana:")
    assert moment.text.endswith(" ...") and len(moment.text.split()) == MOMENT_WORDS + 1
    assert moment.line().startswith("- Ana: word000") and moment.line().endswith("(5-1)")


def test_moments_round_trip_through_their_record() -> None:
    moments = fold([], _turns(30), keep=5)
    assert decode_moments(encode_moments(moments)) == moments
    head = MemoryHead.from_fields([None, None, None, None, encode_moments(moments), None])
    assert head.moments == moments


def test_final_notes_list_key_moments_from_the_whole_stream(
    engine: Engine[Any], redis_server: RedisServer, qmsum_dir: Path  # noqa: F811
) -> None:
    meeting = _meeting(qmsum_dir, turns=60)
    results = {}
    for memory in (True, False):
        proc = _processor(engine, redis_server, summary_memory=memory, key_moments=4)
        stream = f"moments-{int(memory)}"
        Producer(redis_server.client(), settings=proc.settings).publish_many(
            stream, meeting, eos=True)
        finals = [s for s in _drain(proc, stream) if s.kind is SummaryKind.FINAL]
        assert len(finals) == 1
        results[memory] = (finals[0].text, read_head(redis_server.client(), stream).moments)
    text, moments = results[True]
    assert len(moments) == 4 and "## Key moments" in text
    for moment in moments:
        assert moment.line() in text
    # the window holds 48 tokens (a few turns): the moments reach back to the first half
    ids = [i.decode() for i, _ in redis_server.client().xrange("sinkstream:{moments-1}:in")]
    assert ids.index(moments[0].entry_id) < len(ids) // 2
    assert "## Key moments" not in results[False][0] and results[False][1] == []


def test_answers_quote_the_retrieved_line_that_matches_the_question() -> None:
    from workers.memory.records import Chunk
    from workers.memory.retrieve import Hit, quote

    def chunk(seq: int, text: str) -> Chunk:
        return Chunk(f"{seq}-0", f"{seq}-9", text, seq * 100, seq * 100 + 90, ("Olga", "Ben"),
                     None, seq=seq)

    hits = [
        Hit(chunk(3, "Ben: yeah okay\nOlga: the Zanzibar budget is four thousand euros\n"), 2.0,
            "bm25"),
        Hit(chunk(1, "Ben: the budget review moves to Friday\n"), 1.0, "bm25"),
        Hit(chunk(7, "Olga: Zanzibar budget, Zanzibar travel budget, final\n"), 0.5, "bm25"),
    ]
    found = quote("What is the Zanzibar budget?", hits)
    assert found is not None
    hit, line = found
    assert hit is hits[0] and line == "Olga: the Zanzibar budget is four thousand euros"
    # only the best two hits are quoted from, a line must share a word with the question,
    # and nothing is quoted from nothing
    assert quote("travel plans?", hits) is None
    assert quote("anything", []) is None


def test_words_of_the_whole_stream_do_not_choose_the_quote_or_the_prompt_lines() -> None:
    from workers.memory.records import Chunk
    from workers.memory.retrieve import Hit, pervasive_words, quote, relevant_lines

    def chunk(seq: int, text: str) -> Chunk:
        return Chunk(f"{seq}-0", f"{seq}-9", text, seq * 100, seq * 100 + 90,
                     ("Project Manager", "Marketing"), None, seq=seq)

    stream = [chunk(1, "Project Manager: we design a new remote control for the television"),
              chunk(2, "Marketing: the remote control needs fewer buttons than usual"),
              chunk(3, "Marketing: one long lasting battery keeps the remote control small"),
              chunk(4, "Project Manager: the remote control should sell for twenty five euros")]
    pervasive = pervasive_words(stream)
    assert {"remote", "control"} <= pervasive and "battery" not in pervasive
    hits = [Hit(stream[0], 0.9, "bm25"), Hit(stream[2], 0.8, "bm25")]
    question = "What did the group think of the battery of the remote control?"
    # counted, "remote control" ties the opening line with the battery line; ignored, the
    # battery line is the evidence
    found = quote(question, hits, pervasive=pervasive)
    assert found is not None and "battery" in found[1]
    # a question only the stream's own words match has nothing to quote
    assert quote("What colour is the remote control?", hits, pervasive=pervasive) is None
    assert relevant_lines(question, hits, keep=1, pervasive=pervasive) == [
        "Marketing: one long lasting battery keeps the remote control small"]
    # lines come back in the order they were said, whatever their rank
    assert relevant_lines(question, list(reversed(hits)), keep=2, pervasive=pervasive) == [
        stream[0].text, stream[2].text]
    assert pervasive_words(stream[:3]) == frozenset()  # too few chunks to tell


def test_a_quote_matches_what_was_said_not_who_said_it() -> None:
    from workers.memory.records import Chunk
    from workers.memory.retrieve import Hit, quote

    text = ("Project Manager: Okay thank you.\n"
            "Industrial Designer: Yeah. I have one question.\n"
            "Marketing: the battery cover question is the cost of the rubber case\n")
    hit = Hit(Chunk("1-0", "1-9", text, 0, 90,
                    ("Project Manager", "Industrial Designer", "Marketing"), None, seq=1),
              1.0, "bm25")
    found = quote("What did the Project Manager question about the battery cover?", [hit])
    assert found is not None
    assert found[1] == "Marketing: the battery cover question is the cost of the rubber case"


def test_moments_read_as_clean_verbatim() -> None:
    from workers.memory.highlights import clean

    raw = "um so um in the {vocalsound} stages of the design , uh-huh , umbrella {disfmarker} first"
    assert clean(raw) == "so in the stages of the design, umbrella first"
    (moment,) = fold([], [TranscriptLine("1-0", f"Ana: {raw}\n", "Ana", None, 0, 20)], keep=1)
    assert "{" not in moment.text and " um " not in f" {moment.text} "
