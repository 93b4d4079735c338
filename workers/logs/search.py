"""Which templates and kept lines a question is about: words of the question against each
template's words, its example line and its level ("when did the datanode errors start?" finds
the error templates that mention datanodes); and against the lines a stream keeps
(``workers.logs.retention``), where an identifier the question names (``blk_-1608...``,
``10.250.19.102``) must appear as it is written.

Plain lexical matching on purpose: a template is a handful of constant words, and an operator
asks with those words (the component, the verb, the level); the answer then quotes the
counts, so a wrong match is visible, never invented.
"""

from __future__ import annotations

import re

from workers.logs.parse import LEVEL_WORDS
from workers.logs.retention import KeptLine
from workers.logs.table import Table, TemplateStats

_WORD = re.compile(r"[a-z][a-z0-9]+")
#: a question about how something began: its earliest matching lines are the evidence
_BEGINNING = re.compile(r"\b(?:start|started|starting|begin|began|begun|first|since|earliest)\b",
                        re.IGNORECASE)
#: a token of a question that names one thing: it holds a digit (ids, addresses, numbers)
_IDENTIFIER = re.compile(r"[\w./:@-]*\d[\w./:@-]*")
#: words a question is made of that say nothing about which template
_STOP = frozenset("""a an and are at be been by did do does for from had has have how in is it
its many much of on or since so start started starting that the their them then there these
they this to was we were what when where which who why will with did often last first times
time happen happened""".split())
#: question words that ask about problems (error and warning templates)
_PROBLEM_WORDS = frozenset({"error", "fail", "failure", "failed", "fails", "crash", "warn",
                            "warning", "exception", "fatal", "broke", "broken", "problem",
                            "incident", "issue", "wrong"})


#: endings dropped after a plural -s, when at least four letters are left: an operator asks
#: about "deletions" of what the log calls "Deleting block", or what "started"/"starting"
_ENDINGS = ("ing", "ion", "ed")


def _stem(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    for ending in _ENDINGS:
        if word.endswith(ending) and len(word) - len(ending) >= 4:
            return word[:-len(ending)]
    return word


def words(text: str) -> set[str]:
    """Lower-case content words of ``text``, plural -s and -ing/-ion/-ed endings dropped."""
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP}


def _about_problems(asked: set[str]) -> bool:
    return bool(asked & _PROBLEM_WORDS) or any(
        LEVEL_WORDS.get(w) in ("warn", "error", "fatal") for w in asked)


def identifiers(question: str) -> list[str]:
    """The tokens of ``question`` that name one thing (a block id, an address, a request
    id): those holding a digit, at least three characters, edge punctuation stripped."""
    out = []
    for token in _IDENTIFIER.findall(question):
        token = token.strip(".:/@-")
        if len(token) >= 3 and token not in out:
            out.append(token)
    return out


def relevant(table: Table, question: str, k: int = 3) -> list[tuple[TemplateStats, float]]:
    """The ``k`` templates best matching ``question`` (score > 0), best first; ties go to
    error/warning templates, then the most frequent."""
    asked = words(question)
    if not asked:
        return []
    about_problems = _about_problems(asked)
    scored = []
    for stats in table.templates.values():
        own = words(stats.template) | words(stats.example)
        score = float(len(asked & own))
        if about_problems and stats.problem:
            score += 1.0
        if score > 0:
            scored.append((stats, score))
    scored.sort(key=lambda pair: (-pair[1], not pair[0].problem, -pair[0].count,
                                  pair[0].template_id))
    return scored[:k]


def _whole(identifier: str) -> re.Pattern[str]:
    """``identifier`` as a whole token (any case): ``blk_2`` is not in ``blk_25``, nor
    ``10.0.0.1`` in ``10.0.0.15``."""
    return re.compile(rf"(?<![\w.-]){re.escape(identifier)}(?![\w-]|\.\w)", re.IGNORECASE)


def relevant_lines(lines: list[KeptLine], question: str,
                   k: int = 5) -> list[tuple[KeptLine, float]]:
    """The ``k`` kept lines best matching ``question``, oldest first. When the question
    names identifiers, a line must hold one of them as a whole token (3 points each, plus a
    point per shared word); otherwise a line must share at least two of its words (its level
    counts as one), or all of them when it has one (a point each, and one more for an
    error/warning line when it asks about problems). Ties go to the latest line, or the
    earliest when it asks how something began ("when did ... start?")."""
    asked, named = words(question), [_whole(n) for n in identifiers(question)]
    if not asked and not named:
        return []
    about_problems = _about_problems(asked)
    needed = 1 if named else min(2, len(asked))
    scored = []
    for index, line in enumerate(lines):
        message = line.record.message
        hits = sum(1 for n in named if n.search(message))
        level = line.record.level
        shared = len(asked & words(f"{message} {level}" if level else message))
        if (named and not hits) or (not named and shared < needed):
            continue
        score = 3.0 * hits + shared
        if about_problems and level in ("warn", "error", "fatal"):
            score += 1.0
        scored.append((score, index, line))
    earliest = _BEGINNING.search(question) is not None
    best = sorted(scored, key=lambda s: (-s[0], s[1] if earliest else -s[1]))[:k]
    return [(line, score) for score, _, line in sorted(best, key=lambda s: s[1])]
