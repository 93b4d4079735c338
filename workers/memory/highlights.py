"""Key moments: the most substantive turns of the whole stream, kept verbatim.

Generated summary memory is only as good as the model: a 135M model folding its own notes
drifts further from the meeting with every fold (measured in ``benchmarks/qmsum.py``).
Key moments are extractive, so they cannot drift: every batch folds its turns into a bounded
set of the highest-scoring turns so far, with speaker and entry id, and the final notes list
them in order under "Key moments". The selection is the top ``keep`` of all turns under one
total order (score, then entry id), so it does not depend on how the stream was cut into
batches: a replay after a crash rewrites the same set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sinkstream.ids import entry_id_key
from workers.memory.lines import TranscriptLine

#: longest text kept per moment, in words (the rest is cut with "..."): the gist of a turn,
#: short enough that the moments stay a fraction of the notes and fit the notes' prompts
MOMENT_WORDS = 25
_WORD = re.compile(r"[a-z][a-z']{3,}")
#: frequent words of four letters or more that carry no content in transcripts
_FILLER = frozenset("""
about actually after again also been before being both but could didn does doing done
down each even every from going gonna have having here into just know like made make
maybe more most much must need okay only other over really right said same should since
some something still such sure than that thats the their them then there these they thing
things think this those though through very want wanna well were what when where which
while will with would yeah yes your you're it's i'm that's don't there's we're they're
i've can't won't didn't isn't let's
""".split())


_ANNOTATION = re.compile(r"\{[a-z_]+\}")
_HESITATION = re.compile(r"(?<![\w'])(?:uh-huh|um+|uh+|erm|er|mm+|hmm+)(?![\w'])", re.IGNORECASE)


@dataclass(frozen=True)
class Moment:
    entry_id: str
    speaker: str | None
    text: str
    score: int

    def to_list(self) -> list[object]:
        return [self.entry_id, self.speaker or "", self.text, self.score]

    @classmethod
    def from_list(cls, raw: Sequence[object]) -> Moment:
        entry_id, speaker, text, score = raw
        return cls(str(entry_id), str(speaker) or None, str(text), int(str(score)))

    def spoken(self) -> str:
        """``Speaker: text``, as the model reads a transcript line."""
        return f"{self.speaker}: {self.text}" if self.speaker else self.text

    def line(self) -> str:
        return f"- {self.spoken()} ({self.entry_id})"


def content_words(text: str) -> set[str]:
    """Lower-cased words of four letters or more that are not transcript filler."""
    return {w for w in _WORD.findall(text.lower()) if w not in _FILLER}


def score(text: str) -> int:
    """Distinct content words: long, substantive turns score high; "yeah, okay" scores 0."""
    return len(content_words(text))


def fold(previous: Sequence[Moment], turns: Iterable[TranscriptLine], keep: int) -> list[Moment]:
    """The best ``keep`` of ``previous`` and ``turns``, in stream order."""
    candidates = list(previous)
    for turn in turns:
        if not turn.line:  # a log line (its text is in the template table): scores 0
            continue
        text = _spoken(turn)
        points = score(text)
        if points > 0:
            candidates.append(Moment(turn.entry_id, turn.speaker, cut(text), points))
    best = sorted(candidates, key=lambda m: (-m.score, entry_id_key(m.entry_id)))[:keep]
    return sorted(best, key=lambda m: entry_id_key(m.entry_id))


def _spoken(turn: TranscriptLine) -> str:
    """The turn's words without the ``Speaker:`` prefix the model read."""
    return split_speaker(turn.line.strip(), [turn.speaker] if turn.speaker else [])[1]


def split_speaker(line: str, speakers: Sequence[str]) -> tuple[str, str]:
    """(speaker, what was said) of a ``Speaker: text`` transcript line (``format_turn``),
    when the label is one of ``speakers``; else ("", the whole line)."""
    head, sep, rest = line.partition(": ")
    if sep and head.strip() in speakers:
        return head.strip(), rest.strip()
    return "", line


def clean(text: str) -> str:
    """Clean verbatim for notes: transcript annotations (``{vocalsound}``, ``{disfmarker}``)
    and hesitations (um, uh) dropped, spaces before punctuation closed up."""
    text = _ANNOTATION.sub(" ", text)
    text = _HESITATION.sub(" ", text)
    text = re.sub(r"\s+([,.?!;:])", r"\1", text)
    text = re.sub(r"([,.?!;:])(?:\s*[,;])+", r"\1", text)
    return " ".join(text.split()).lstrip(",;. ")


def cut(text: str) -> str:
    """``text`` cleaned and cut to MOMENT_WORDS words."""
    words = clean(text).split()
    return " ".join(words[:MOMENT_WORDS]) + (" ..." if len(words) > MOMENT_WORDS else "")
