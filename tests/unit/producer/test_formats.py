"""Transcript readers: every format yields the turns a person reading the file would expect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.formats import (
    InputFormatError,
    LineDecoder,
    Turn,
    guess_format,
    parse_turns,
    read_file,
    split_speaker,
)

SAMPLES = Path(__file__).resolve().parents[2] / "samples"

VTT_TURNS = [
    Turn("Good morning, everyone. Let's start with the release status.", "Alice", 1.0),
    Turn("The build is green & the installer is signed.", "Bob Smith", 5.25),
    Turn("Ship it on Friday!", "Carol", 7.5),
    Turn("Agreed.", "Alice", 10.0),
    Turn("I'll write the notes — ünïcödé ✓.", "Bob Smith", 10.0),
    Turn("No voice tag on this one.", None, 12.5),
]
SRT_TURNS = [
    Turn("Good morning, everyone. Let's start with the release status.", "Alice", 1.0),
    Turn("The build is green & the installer is signed.", "Bob Smith", 5.25),
    Turn("Ship it on Friday!", None, 7.5),
    Turn("Agreed.", None, 10.0),
    Turn("I'll write the notes — ünïcödé ✓.", None, 10.0),
]
JSONL_TURNS = [
    Turn("Good morning, everyone.", "Alice", 0.0),
    Turn("no speaker on this one", None, 0.5),
    Turn("Timestamps may be strings.", "Bob Smith", 1.25),
    Turn("ünïcödé ✓ and no time", "Carol", None),
]
TEXT_TURNS = [
    Turn("ship it friday", "Alice"),
    Turn("the installer is signed", "Bob Smith"),
    Turn("no speaker here, just a note: fine", None),
]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("standup.vtt", VTT_TURNS), ("standup.srt", SRT_TURNS),
     ("standup.jsonl", JSONL_TURNS), ("standup.txt", TEXT_TURNS)],
)
def test_samples_parse_to_expected_turns(name: str, expected: list[Turn]) -> None:
    assert read_file(SAMPLES / name) == expected


def test_text_without_speaker_detection_keeps_lines_whole() -> None:
    turns = read_file(SAMPLES / "standup.txt", "text", detect_speakers=False)
    assert [t.text for t in turns][0] == "Alice: ship it friday"
    assert all(t.speaker is None for t in turns)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Alice: ship it friday", ("Alice", "ship it friday")),
        ("Project Manager: So", ("Project Manager", "So")),
        ("Dr. Smith: hi", ("Dr. Smith", "hi")),
        ("Speaker 2: yes", ("Speaker 2", "yes")),
        ("I said this: ok", (None, "I said this: ok")),
        ("see http://example.com: now", (None, "see http://example.com: now")),
        ("10:30 standup", (None, "10:30 standup")),
        ("alice: lower case", (None, "alice: lower case")),
        ("A B C D E: five words", (None, "A B C D E: five words")),
    ],
)
def test_speaker_prefix_detection(line: str, expected: tuple[str | None, str]) -> None:
    assert split_speaker(line) == expected


def test_qmsum_turns_match_the_file(qmsum_dir: Path) -> None:
    path = sorted(qmsum_dir.glob("*.json"))[0]
    source = json.loads(path.read_text(encoding="utf-8"))["meeting_transcripts"]
    turns = read_file(path, "qmsum")
    kept = [t for t in source if t["content"].strip()]
    assert [(t.text, t.speaker) for t in turns] == [(t["content"], t["speaker"]) for t in kept]
    assert all(t.ts is None for t in turns)


def test_qmsum_synthetic_and_errors() -> None:
    doc = {"meeting_transcripts": [{"speaker": "PM", "content": "Hi ."},
                                   {"speaker": "UI", "content": "  "},
                                   {"speaker": "ME", "content": "Yeah {vocalsound}"}]}
    turns = parse_turns(json.dumps(doc).encode(), "qmsum")
    assert turns == [Turn("Hi .", "PM"), Turn("Yeah {vocalsound}", "ME")]
    with pytest.raises(InputFormatError, match="meeting_transcripts"):
        parse_turns(b'{"topic_list": []}', "qmsum")
    with pytest.raises(InputFormatError, match=r"meeting_transcripts\[0\]"):
        parse_turns(b'{"meeting_transcripts": [{"speaker": "x"}]}', "qmsum")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"x\.jsonl:2: invalid JSON"),
        ('["a list"]', r"x\.jsonl:2: expected a JSON object"),
        ('{"speaker": "A"}', r"x\.jsonl:2: 'text' must be a string"),
        ('{"text": "t", "ts": "soon"}', r"x\.jsonl:2: 'ts' must be a number"),
        ('{"text": "t", "ts": true}', r"x\.jsonl:2: 'ts' must be a number"),
        ('{"text": "t", "speaker": 3}', r"x\.jsonl:2: 'speaker' must be a string"),
    ],
)
def test_jsonl_errors_name_the_line(line: str, message: str) -> None:
    data = ('{"text": "fine"}\n' + line + "\n").encode()
    with pytest.raises(InputFormatError, match=message):
        parse_turns(data, "jsonl", "x.jsonl")


def test_non_utf8_file_names_the_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"Alice: hello\nBob: caf\xe9 au lait\n")
    with pytest.raises(InputFormatError) as info:
        read_file(path, "text")
    message = str(info.value)
    assert "byte offset 21" in message and "line 2" in message and str(path) in message


@pytest.mark.parametrize("fmt", ["vtt", "srt", "qmsum", "jsonl"])
def test_non_utf8_is_refused_in_every_format(fmt: str) -> None:
    with pytest.raises(InputFormatError, match="byte offset 3"):
        parse_turns(b"abc\xff\n", fmt)


def test_line_decoder_keeps_offsets_across_reads_and_split_characters() -> None:
    decoder = LineDecoder("<stdin>")
    assert decoder.feed(b"\xef\xbb\xbfcaf\xc3") == []  # BOM, then half a character
    assert decoder.feed(b"\xa9\r\nsecond") == [(1, "café")]
    assert decoder.finish() == [(2, "second")]
    decoder = LineDecoder("<stdin>")
    decoder.feed(b"ok line\n")
    with pytest.raises(InputFormatError, match=r"byte offset 10 \(line 2\)"):
        decoder.feed(b"ab\x80\n")


def test_malformed_captions_are_clear_errors() -> None:
    with pytest.raises(InputFormatError, match="not a valid WebVTT"):
        parse_turns(b"this is not webvtt\n", "vtt", "x.vtt")
    with pytest.raises(InputFormatError, match="not a valid SRT"):
        parse_turns(b"1\nnot a timestamp\nhello\n\n", "srt", "x.srt")


def test_unknown_format_and_suffix_guessing() -> None:
    with pytest.raises(InputFormatError, match="unknown format"):
        parse_turns(b"x", "docx")
    assert guess_format("a/b.VTT") == "vtt"
    assert guess_format("talk.srt") == "srt"
    assert guess_format("m.json") == "qmsum"
    assert guess_format("m.jsonl") == "jsonl"
    assert guess_format("-") == "text"
    assert guess_format("notes") == "text"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputFormatError, match="cannot read"):
        read_file(tmp_path / "nope.txt", "text")
