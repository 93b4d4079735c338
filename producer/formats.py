"""Readers that turn transcript files into turns ``(text, speaker, ts)``.

Formats: ``text`` (one line = one turn, optional ``Speaker: text`` prefix), ``jsonl`` (one
object per line with ``text``, optional ``speaker``, ``ts``), ``vtt`` (WebVTT, ``<v Name>``
voice tags give the speaker, cue start gives ``ts``), ``srt`` (SubRip) and ``qmsum`` (QMSum
meeting JSON: ``meeting_transcripts`` = [{speaker, content}], no timestamps).

Input must be UTF-8. Invalid bytes are an error that names the byte offset (and line), never
a silent replacement character: a transcript with mojibake would reach the model unnoticed.
``text`` and ``jsonl`` also parse line by line (:class:`LineDecoder`) so stdin and ``--follow``
can publish while the file is still being written.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import srt
import webvtt
import webvtt.errors

FORMATS: tuple[str, ...] = ("text", "jsonl", "vtt", "srt", "qmsum")
#: Formats that can be read line by line (stdin streaming and ``--follow``).
LINE_FORMATS: tuple[str, ...] = ("text", "jsonl")

_SUFFIXES = {
    ".txt": "text", ".text": "text", ".log": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".vtt": "vtt", ".srt": "srt", ".json": "qmsum",
}

#: ``Speaker: text`` where the speaker is 1-4 capitalised words (``Alice``, ``Project
#: Manager``, ``Dr. Smith``, ``Speaker 2``) and the colon is followed by whitespace, so URLs,
#: clock times and ordinary sentences with a colon are left alone.
_SPEAKER_RE = re.compile(
    r"^\s*([^\W\d_][\w.'’-]*(?: [\w.'’-]+){0,3})\s*:\s+(\S.*?)\s*$", re.DOTALL
)
_VOICE_RE = re.compile(r"^\s*<v(?:\.[\w-]+)*\s+([^>]*?)\s*>")
_TAG_RE = re.compile(r"<[^>]*>|\{\\[^}]*\}")


class Turn(NamedTuple):
    """One utterance: the text, who said it (if known), when (seconds, if known)."""

    text: str
    speaker: str | None = None
    ts: float | None = None


class InputFormatError(ValueError):
    """The input cannot be read in the requested format; the message says where and why."""


# --- decoding ------------------------------------------------------------------------------


def decode_utf8(data: bytes, source: str, base_offset: int = 0, base_line: int = 1) -> str:
    """Decode strictly; the error names the byte offset (from the start of the input)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = base_offset + exc.start
        line = base_line + data.count(b"\n", 0, exc.start)
        raise InputFormatError(
            f"{source}: not valid UTF-8 at byte offset {offset} (line {line}): "
            f"byte 0x{data[exc.start]:02x} {exc.reason}; convert the file to UTF-8 first "
            "(e.g. iconv -f latin1 -t utf-8)"
        ) from None
    return text[1:] if base_offset == 0 and text.startswith("\ufeff") else text


class LineDecoder:
    """Split a byte stream into decoded lines as data arrives, keeping exact byte offsets.

    Only complete lines come out of :meth:`feed`, so a line half-written by the producer of a
    followed file (or a multi-byte character cut across two reads) is never published early.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self._buf = b""
        self._offset = 0  # byte offset of _buf[0] in the whole input
        self.lineno = 0  # number of the last line returned

    def feed(self, data: bytes) -> list[tuple[int, str]]:
        """Return ``(line number, line)`` for every line completed by ``data``."""
        self._buf += data
        out: list[tuple[int, str]] = []
        start = 0
        while (nl := self._buf.find(b"\n", start)) >= 0:
            out.append(self._decode(self._buf[start:nl], self._offset + start))
            start = nl + 1
        self._buf = self._buf[start:]
        self._offset += start
        return out

    def finish(self) -> list[tuple[int, str]]:
        """The last line if the input did not end with a newline."""
        if not self._buf:
            return []
        line = self._decode(self._buf, self._offset)
        self._offset += len(self._buf)
        self._buf = b""
        return [line]

    def _decode(self, raw: bytes, offset: int) -> tuple[int, str]:
        self.lineno += 1
        text = decode_utf8(raw, self.source, offset, self.lineno)
        if offset == 0 and text.startswith("\ufeff"):
            text = text[1:]
        return self.lineno, text.rstrip("\r")


# --- line formats --------------------------------------------------------------------------


def split_speaker(line: str) -> tuple[str | None, str]:
    """``"Alice: ship it"`` -> ``("Alice", "ship it")``; no speaker prefix -> ``(None, line)``.

    Each word of the speaker must start with a capital or a digit, so ordinary sentences with
    a colon ("I said this: ok") are not mistaken for a speaker.
    """
    match = _SPEAKER_RE.match(line)
    if match is None:
        return None, line
    speaker = match.group(1)
    if not all(word[0].isupper() or word[0].isdigit() for word in speaker.split(" ")):
        return None, line
    return speaker, match.group(2)


def text_line(line: str, lineno: int, source: str, detect_speakers: bool = True) -> Turn | None:
    """One line of plain text -> a turn; blank lines -> None."""
    text = line.strip()
    if not text:
        return None
    if detect_speakers:
        speaker, text = split_speaker(text)
        return Turn(text, speaker)
    return Turn(text)


def jsonl_line(line: str, lineno: int, source: str, detect_speakers: bool = True) -> Turn | None:
    """One JSON object ``{"text": ..., "speaker": ..., "ts": ...}`` -> a turn."""
    if not line.strip():
        return None
    where = f"{source}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputFormatError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise InputFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        raise InputFormatError(f"{where}: 'text' must be a string, got {_kind(text)}")
    if not text.strip():
        return None
    speaker = obj.get("speaker")
    if speaker is not None and not isinstance(speaker, str):
        raise InputFormatError(f"{where}: 'speaker' must be a string or null, got {_kind(speaker)}")
    return Turn(text, speaker or None, _json_ts(obj.get("ts"), where))


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _json_ts(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputFormatError(f"{where}: 'ts' must be a number of seconds, got {_kind(value)}")
    try:
        ts = float(value)
    except ValueError:
        raise InputFormatError(f"{where}: 'ts' must be a number of seconds, got {value!r}") \
            from None
    if not math.isfinite(ts):
        raise InputFormatError(f"{where}: 'ts' must be finite, got {value!r}")
    return ts


LineParser = Callable[[str, int, str, bool], "Turn | None"]
LINE_PARSERS: dict[str, LineParser] = {"text": text_line, "jsonl": jsonl_line}


def parse_lines(
    lines: Iterable[tuple[int, str]], fmt: str, source: str, detect_speakers: bool = True
) -> Iterator[Turn]:
    """Turns from already-decoded ``(line number, line)`` pairs of a line format."""
    parser = LINE_PARSERS[fmt]
    for lineno, line in lines:
        turn = parser(line, lineno, source, detect_speakers)
        if turn is not None:
            yield turn


# --- whole-file formats --------------------------------------------------------------------


def _cue_turns(raw_lines: list[str], ts: float | None, detect_speakers: bool) -> list[Turn]:
    """Caption lines -> turns: a ``<v Name>`` tag or a ``- `` dialogue dash starts a new turn;
    other lines are wrapped continuations of the current one (joined with a space)."""
    segments: list[tuple[str | None, list[str]]] = []
    dashes = sum(1 for ln in raw_lines if ln.lstrip().startswith("- ")) >= 2
    for raw in raw_lines:
        voice = _VOICE_RE.match(raw)
        text = html.unescape(_TAG_RE.sub("", raw)).strip()
        if voice is not None:
            segments.append((voice.group(1) or None, []))
        elif dashes and text.startswith("- "):
            text = text[2:].strip()
            segments.append((None, []))
        elif not segments:
            segments.append((None, []))
        if text:
            segments[-1][1].append(text)
    turns = []
    for speaker, parts in segments:
        text = " ".join(parts)
        if not text:
            continue
        if speaker is None and detect_speakers:
            speaker, text = split_speaker(text)
        turns.append(Turn(text, speaker, ts))
    return turns


def parse_vtt(content: str, source: str, detect_speakers: bool = True) -> Iterator[Turn]:
    """WebVTT cues -> turns (``<v Speaker>`` -> speaker, cue start -> ts in seconds)."""
    try:
        captions = webvtt.from_string(content).captions
    except (webvtt.errors.MalformedFileError, webvtt.errors.MalformedCaptionError) as exc:
        raise InputFormatError(f"{source}: not a valid WebVTT file ({exc})") from None
    for cue in captions:
        ts = cue.start_time.in_milliseconds() / 1000.0
        yield from _cue_turns(cue.raw_text.split("\n"), ts, detect_speakers)


def parse_srt(content: str, source: str, detect_speakers: bool = True) -> Iterator[Turn]:
    """SubRip subtitles -> turns (start time -> ts; ``Name:`` prefixes or voice tags -> speaker)."""
    try:
        subtitles = list(srt.parse(content))
    except (srt.SRTParseError, srt.TimestampParseError, ValueError) as exc:
        raise InputFormatError(f"{source}: not a valid SRT file ({exc})") from None
    for sub in subtitles:
        yield from _cue_turns(sub.content.split("\n"), sub.start.total_seconds(), detect_speakers)


def parse_qmsum(content: str, source: str, detect_speakers: bool = True) -> Iterator[Turn]:
    """QMSum meeting JSON -> turns, in order, text and speaker exactly as in the file.

    Turns whose content is blank are skipped (there is nothing to say); QMSum has no times.
    """
    try:
        doc = json.loads(content)
    except json.JSONDecodeError as exc:
        raise InputFormatError(
            f"{source}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    turns = doc.get("meeting_transcripts") if isinstance(doc, dict) else None
    if not isinstance(turns, list):
        raise InputFormatError(f"{source}: not QMSum: no 'meeting_transcripts' list")
    for index, item in enumerate(turns):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise InputFormatError(
                f"{source}: meeting_transcripts[{index}] needs a string 'content'"
            )
        speaker = item.get("speaker")
        if item["content"].strip():
            yield Turn(item["content"], speaker if isinstance(speaker, str) and speaker else None)


# --- entry points --------------------------------------------------------------------------


def guess_format(path: str | Path | None, default: str = "text") -> str:
    """The format implied by a file suffix (``.vtt`` -> vtt, ``.json`` -> qmsum, ...)."""
    if path is None or str(path) == "-":
        return default
    return _SUFFIXES.get(Path(path).suffix.lower(), default)


def parse_turns(
    data: bytes, fmt: str, source: str = "<input>", detect_speakers: bool = True
) -> list[Turn]:
    """All turns of an input held in memory (decoded strictly as UTF-8)."""
    if fmt not in FORMATS:
        raise InputFormatError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    content = decode_utf8(data, source)
    if fmt in LINE_FORMATS:
        numbered = enumerate((line.rstrip("\r") for line in content.split("\n")), start=1)
        return list(parse_lines(numbered, fmt, source, detect_speakers))
    parsers = {"vtt": parse_vtt, "srt": parse_srt, "qmsum": parse_qmsum}
    return list(parsers[fmt](content, source, detect_speakers))


def read_file(path: str | Path, fmt: str | None = None, detect_speakers: bool = True) -> list[Turn]:
    """All turns of a file; ``fmt`` defaults to one guessed from the suffix."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputFormatError(f"cannot read {p}: {exc.strerror or exc}") from None
    return parse_turns(data, fmt or guess_format(p), str(p), detect_speakers)
