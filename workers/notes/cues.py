"""Decisions, action items and open questions, found in the transcript's own lines.

Notes are grounded by construction: an item exists because a line said it, and it keeps that
line's entry id, speaker and time. The finder reads one clause at a time (a recap such as
"Tomas merges the fix today, Priya reviews it and Jonas tells marketing" holds three action
items) and knows three kinds of cue:

* decisions: "Decision: ...", "we decided/agreed", "we'll go with / ship / keep ...", "the plan
  is", "then we keep ...", "... is a blocker";
* action items: a speaker's own commitment ("I will merge it", "I'll take the first weekend"),
  a request to someone named ("Jonas, can you send ...", "Priya, please ask ..."), a task
  given to someone by name ("Tomas merges the crash fix today"); the owner is that person and
  the due date what the clause says of when ("by two o'clock", "by Monday noon", "today");
* open questions: said to be open ("One open question: who ..."), deferred ("let's decide the
  rotation on Friday"), or not known yet.

Only a known person (a speaker of the stream, or a name addressed in it) becomes an owner.
Rules read the words, not the model: the same lines give the same items on every worker, so a
replay after a crash rewrites the same notes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from workers.memory.highlights import clean, split_speaker
from workers.memory.lines import TranscriptLine

ItemKind = Literal["decision", "action", "question"]

_DAYS = "monday|tuesday|wednesday|thursday|friday|saturday|sunday"
_ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|"
             "twelfth|thirteenth|fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|"
             "nineteenth|twentieth|twenty[- ](?:first|second|third|fourth|fifth|sixth|"
             "seventh|eighth|ninth)|thirtieth|thirty[- ]first|\\d{1,2}(?:st|nd|rd|th)")
_CLOCK = (r"(?:\d{1,2}(?::\d{2})?\s*(?:am|pm|a\.m\.|p\.m\.)|(?:one|two|three|four|five|six|"
          r"seven|eight|nine|ten|eleven|twelve|\d{1,2}) o'clock|noon|midnight)")
#: when a task is due, as the clause says it
DUE = re.compile(
    rf"\b(?:(?:by|before|on|until|till|after|from|at)\s+(?:the\s+)?(?:next\s+)?"
    rf"(?:(?:{_DAYS})(?:\s+(?:noon|morning|afternoon|evening|night))?|{_ORDINALS}|{_CLOCK}|"
    rf"end of (?:the )?(?:day|week|month)|next (?:week|meeting|release|sprint|time))"
    rf"|(?:today|tonight|tomorrow|this (?:morning|afternoon|evening|week)|next (?:week|meeting|"
    rf"release|sprint|time)|right after (?:this|the) meeting|end of (?:the )?(?:day|week)))\b",
    re.IGNORECASE)

_DECISION = re.compile(
    r"\b(?:decision\s*[:,-]|decided\b|we(?:'ve| have)? agreed\b|(?:it's|it is) agreed\b|"
    r"(?:let's|let us) (?:go with|go for|use|keep|ship|stick with|move|make it|take|choose|"
    r"pick|do it)\b|we(?:'ll| will| are going to|'re going to| are gonna|'re gonna) "
    r"(?:go with|go for|ship|keep|use|stick with|move|target|launch|drop|choose|pick|make)\b|"
    r"\bthe plan(?: is)?[:,]|so the plan\b|then we (?:keep|ship|go|use|move|slip|target|make)\b|"
    r"\bwe (?:still )?(?:target|ship|keep|go with)\b|is a (?:launch |release )?blocker\b|"
    r"\bwe decide\b|\bwe(?:'re| are) going (?:with|for)\b|\bwe (?:don't|do not) need\b|"
    r"\bwe(?:'ll| will)? (?:have to|need to) (?:use|have|make|keep|include|drop|stick)\b|"
    r"\b(?:has|have) to work (?:on|with)\b|\bmust be used\b|\bwe(?:'ve| have) settled\b)",
    re.IGNORECASE)
_COMMIT = re.compile(
    r"\bI(?:'ll| will| am going to|'m going to| shall| can| could| have to| need to|'ve got to"
    r"| got to)\s+(?:also\s+|just\s+)?"
    r"(?!be\b|have\b|think\b|guess\b|say\b|probably\b|need\b|see\b|imagine\b|hear\b|"
    r"live\b|understand\b|tell you\b|remember\b|believe\b|agree\b|admit\b|go\b|only\b|"
    r"not\b|never\b|kind of\b|sort of\b|get back\b)[a-z]",
    re.IGNORECASE)
_REQUEST = re.compile(
    r"^(?P<name>[A-Z][a-z]+),\s*(?:(?:can|could|would|will) you\b|please\b)|"
    r"\b(?:can|could|would|will) you\b.*,\s*(?P<name2>[A-Z][a-z]+)\s*\?|"
    r"\b(?P<name3>[A-Z][a-z]+),\s*please\b")
_ASSIGN = re.compile(
    r"\b(?P<name>[A-Z][a-z]+)\s+(?:will|'ll|is going to|is gonna|merges|writes|reviews|covers|"
    r"owns|takes|sends|handles|checks|prepares|asks|tells|gets|shares|looks into|does|"
    r"updates|fixes|drafts|sets up|follows up)\b")
_CONTINUES = re.compile(r"(?:if|unless|otherwise|then|else|so|and then|in that case)\b",
                       re.IGNORECASE)
#: a task named as a condition ("yes, if Priya reviews it") is not given to anyone yet
_CONDITION = re.compile(r"\b(?:if|unless|once|when|whether|as soon as)\s+$", re.IGNORECASE)
#: a cue inside a question about it ("whether we still ship ...") states nothing yet
_HYPOTHETICAL = re.compile(r"\b(?:whether|if)\s+we\b", re.IGNORECASE)
_ACTION_WORDS = re.compile(r"\baction item\b", re.IGNORECASE)
_OPEN = re.compile(
    r"\b(?:open question|still open|(?:is|are) open|(?:we|i) (?:don't|do not) know (?:yet|who|"
    r"whether|if)|not (?:yet )?(?:decided|sure (?:whether|if|who))|to be decided|\btbd\b|"
    r"needs? to (?:decide|figure out|find out)|(?:let's|let us|we'll|we will|we need to) "
    r"(?:decide|discuss|revisit|figure out|talk about)\b.*\b(?:on (?:" + _DAYS + r")|later|"
    r"next (?:week|meeting|time)|tomorrow))", re.IGNORECASE)


@dataclass(frozen=True)
class Candidate:
    """One item a line states: what kind, in the speaker's words, with owner and due."""

    kind: ItemKind
    entry_id: str
    speaker: str | None
    ts: float | None
    said: str  # the clause as said (cleaned), the item's extractive text
    line: str  # the whole line, "Speaker: text", for context and the guard
    owner: str | None = None
    due: str | None = None


#: transcripts that write contractions apart ("I 'll", "do n't", as ICSI's do)
_SPLIT_CONTRACTION = re.compile(r"\s+('(?:ll|re|ve|s|d|m)|n't)\b", re.IGNORECASE)


def find(lines: Sequence[TranscriptLine], people: Iterable[str]) -> list[Candidate]:
    """Every item the ``lines`` state, in order. ``people``: the stream's speakers and the
    names said in it (an owner must be one of them)."""
    known = {p.lower(): p for p in people if p}
    for line in lines:
        if line.speaker:
            known.setdefault(line.speaker.lower(), line.speaker)
    found: list[Candidate] = []
    for line in lines:
        speaker, said = split_speaker(line.line.strip(), [line.speaker] if line.speaker else [])
        parts = clauses(_SPLIT_CONTRACTION.sub(r"\1", clean(said)))
        for i, clause in enumerate(parts):
            candidate = _classify(clause, line, speaker or line.speaker, known)
            if candidate is None:
                continue
            if candidate.kind == "decision":  # its conditions and consequences go with it
                rest = _continuation(parts[i + 1:], line, speaker or line.speaker, known)
                if rest:
                    candidate = replace(candidate, said=" ".join([clause, *rest]))
            found.append(candidate)
    return found


def _continuation(parts: Sequence[str], line: TranscriptLine, speaker: str | None,
                  known: dict[str, str]) -> list[str]:
    """The sentences after a decision that spell it out ("If legal approves by Monday noon, we
    submit ... If not, we slip by one week"), up to the next item of another kind."""
    out: list[str] = []
    for part in parts:
        if not _CONTINUES.match(part) or _classify(part, line, speaker, known) is not None:
            break
        out.append(part)
    return out


def clauses(text: str) -> list[str]:
    """``text`` cut into sentences, and a sentence listing several tasks ("Tomas merges the
    fix, Priya reviews it and Jonas tells marketing") into one clause per named subject."""
    out: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        parts = re.split(r",\s+(?=[A-Z][a-z]+\s+\w)|\s+and\s+(?=[A-Z][a-z]+\s+\w+s\b)",
                         sentence)
        out += [p.strip(" ,;") for p in parts if p.strip(" ,;")]
    return out


def due(text: str) -> str | None:
    match = DUE.search(text)
    return match.group(0) if match else None


def _classify(clause: str, line: TranscriptLine, speaker: str | None,
              known: dict[str, str]) -> Candidate | None:
    def make(kind: ItemKind, owner: str | None = None) -> Candidate:
        return Candidate(kind, line.entry_id, line.speaker, line.ts, clause, line.line.strip(),
                         owner, due(clause) if kind == "action" else None)

    if _OPEN.search(clause):
        return make("question")
    decision = _DECISION.search(clause)
    if decision and not _HYPOTHETICAL.search(clause[:decision.end()]):
        return make("decision")
    request = _REQUEST.search(clause)
    if request:
        name = request.group("name") or request.group("name2") or request.group("name3")
        if name and name.lower() in known:
            return make("action", known[name.lower()])
    if _COMMIT.search(clause) and speaker:
        return make("action", speaker)
    assign = _ASSIGN.search(clause)
    if assign and assign.group("name").lower() in known \
            and not _CONDITION.search(clause[:assign.start()]):
        return make("action", known[assign.group("name").lower()])
    if _ACTION_WORDS.search(clause):
        return make("action")
    return None
