"""The faithfulness guard: every name, number, date and time a generated sentence states must
be in the text it rests on.

A sentence whose facts are all supported is kept. An unsupported name close to a supported one
("Jonah" where the meeting said "Jonas", "Toma" for "Tomas") is repaired to it; a sentence
with anything else unsupported (a number, a date, a time, a name like nothing said) is
dropped, and the caller may fall back to the source's own words. Every sentence the guard
touches is counted by action and reason, so an operator sees how often the model invents.

The guard applies to every model, large or small: a 1.5B model writes "60%" for "sixty one
percent" less often than a 135M one, not never.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from workers.notes.facts import Fact, Kind, Reason, facts, words

#: how close an unsupported name must be to a supported one to be repaired to it
_REPAIR_CUTOFF = 0.7
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


@dataclass(frozen=True)
class Support:
    """What a set of source texts vouches for: their facts, their words, their names."""

    facts: frozenset[tuple[Kind, str]] = frozenset()
    words: frozenset[str] = frozenset()
    #: supported names as written (lower-case key -> display), for repairs
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, texts: Iterable[str], names: Iterable[str] = ()) -> Support:
        """The support of ``texts`` (transcript lines, chunks) and of ``names`` (speakers)."""
        found: set[tuple[Kind, str]] = set()
        vocabulary: set[str] = set()
        display: dict[str, str] = {}
        for text in [*texts, *names]:
            for fact in facts(text):
                found.add((fact.kind, fact.key))
                if fact.kind == "name":
                    display.setdefault(fact.key, fact.surface)
            vocabulary |= words(text)
        for name in names:
            display[name.lower()] = name
            vocabulary.add(name.lower())
        return cls(frozenset(found), frozenset(vocabulary), display)

    def __or__(self, other: Support) -> Support:
        return Support(self.facts | other.facts, self.words | other.words,
                       {**other.names, **self.names})

    def supports(self, fact: Fact) -> bool:
        if fact.kind == "name":
            return fact.key in self.words
        return (fact.kind, fact.key) in self.facts

    def repair(self, name: str) -> str | None:
        """The supported name ``name`` most likely misspells, if one is close enough."""
        candidates = [k for k in self.names if k[:1] == name[:1]]
        match = difflib.get_close_matches(name, candidates, n=1, cutoff=_REPAIR_CUTOFF)
        return self.names[match[0]] if match else None


@dataclass(frozen=True)
class Verdict:
    """What the guard did to one sentence: ``kept``, ``repaired`` or ``dropped``, and for the
    last two the kinds of fact that were not supported."""

    sentence: str
    action: str
    reasons: tuple[Reason, ...] = ()
    text: str = ""  # the sentence as published ("" when dropped)


@dataclass(frozen=True)
class Checked:
    """A generated text after the guard: what may be published, and every verdict."""

    text: str
    verdicts: tuple[Verdict, ...]

    @property
    def dropped(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.action == "dropped"]

    @property
    def changed(self) -> bool:
        return any(v.action != "kept" for v in self.verdicts)


def check_sentence(sentence: str, support: Support) -> Verdict:
    """One sentence against ``support``. A sentence that is not language (bytes a broken
    or tiny model emitted, words glued to symbols) is dropped as ``garbled``: it states
    nothing checkable, and states it badly."""
    if garbled(sentence):
        return Verdict(sentence, "dropped", ("garbled",))
    unsupported = [f for f in facts(sentence) if not support.supports(f)]
    if not unsupported:
        return Verdict(sentence, "kept", text=sentence)
    reasons = tuple(dict.fromkeys(f.kind for f in unsupported))
    if any(f.kind != "name" for f in unsupported):
        return Verdict(sentence, "dropped", reasons)
    repaired = sentence
    for fact in unsupported:
        fix = support.repair(fact.key)
        if fix is None:
            return Verdict(sentence, "dropped", reasons)
        repaired = re.sub(rf"\b{re.escape(fact.surface)}\b", fix, repaired)
    return Verdict(sentence, "repaired", reasons, repaired)


def check(text: str, support: Support) -> Checked:
    """``text`` (prose or a markdown list) with every sentence checked: repaired ones rewritten,
    dropped ones left out; a line whose every sentence is dropped goes too."""
    lines: list[str] = []
    verdicts: list[Verdict] = []
    for line in text.splitlines():
        prefix, body = _split_marker(line)
        kept: list[str] = []
        for sentence in _sentences(body):
            verdict = check_sentence(sentence, support)
            verdicts.append(verdict)
            if verdict.action != "dropped":
                kept.append(verdict.text)
        if kept or not body.strip():
            lines.append(prefix + " ".join(kept))
    return Checked("\n".join(lines).strip(), tuple(verdicts))


def garbled(sentence: str) -> bool:
    """Not language: replacement or control characters, or fewer than half of its tokens
    words."""
    if any(c == "\ufffd" or (ord(c) < 32 and c not in "\t\n") for c in sentence):
        return True
    tokens = sentence.split()
    plain = [t for t in tokens if re.fullmatch(r"[\"'(\[]*[\w'’%$€£-]+[\"')\],.;:!?]*", t)]
    return not tokens or len(plain) < len(tokens) / 2


def grounded_share(sentence: str, sources: Iterable[str]) -> float:
    """The share of ``sentence``'s content words that its ``sources`` use too (stems): a
    rephrasing of some lines uses their words; a sentence made up beside them does not."""
    from workers.memory.highlights import content_words

    mine = {_stem(w) for w in content_words(sentence)}
    if not mine:
        return 1.0
    theirs = {_stem(w) for text in sources for w in content_words(text)}
    return len(mine & theirs) / len(mine)


def _stem(word: str) -> str:
    return word[:5]


def _split_marker(line: str) -> tuple[str, str]:
    """A list line's marker ("- ", "1. ") apart from its text."""
    match = re.match(r"^(\s*(?:[-*•]|\d+[.)])\s+)", line)
    return (match.group(1), line[match.end():]) if match else ("", line)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
