"""Which templates a question is about: words of the question against each template's words,
its example line and its level ("when did the datanode errors start?" finds the error
templates that mention datanodes).

Plain lexical matching on purpose: a template is a handful of constant words, and an operator
asks with those words (the component, the verb, the level); the answer then quotes the
counts, so a wrong match is visible, never invented.
"""

from __future__ import annotations

import re

from workers.logs.parse import LEVEL_WORDS
from workers.logs.table import Table, TemplateStats

_WORD = re.compile(r"[a-z][a-z0-9]+")
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


def relevant(table: Table, question: str, k: int = 3) -> list[tuple[TemplateStats, float]]:
    """The ``k`` templates best matching ``question`` (score > 0), best first; ties go to
    error/warning templates, then the most frequent."""
    asked = words(question)
    if not asked:
        return []
    about_problems = bool(asked & _PROBLEM_WORDS) or any(
        LEVEL_WORDS.get(w) in ("warn", "error", "fatal") for w in asked)
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
