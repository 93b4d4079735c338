"""The checkable facts of a text: names, numbers, dates and times, normalised.

A summary may say "61%" where the meeting said "sixty one percent", "the 14th" for "the
fourteenth", "Monday noon" for "noon on Monday": the same facts. Numbers written in words become
digits (``text2num``'s ``alpha2digit``, English) before they are read, so both sides of a
comparison meet in one form. A fact's ``key`` is what is compared; ``surface`` is how the text
wrote it (for messages and repairs).

What counts as a name: a capitalised word that is not one of the common words that open
sentences or notes ("The", "Overall", "Decision") and not a date word. So "App Store", "Legal
Inc." and "Jonah" are names (and checked), "Next" and "Good" are not. A name is supported by a
text that uses the word at all, capitalised or not ("Completion" opening a summary sentence is
supported by "completion went up"; "Inc" is supported by nothing in a meeting about an app).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from text_to_num import alpha2digit

Kind = Literal["name", "number", "date", "time"]
#: why the guard drops a sentence: a kind of fact it does not support, or not language
Reason = Literal["name", "number", "date", "time", "garbled"]

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december")
#: words that place a thing in time without a number
RELATIVE_DAYS = ("today", "tonight", "tomorrow", "yesterday", "weekend")
#: named times of day
TIMES = ("noon", "midnight")
#: numbers too common as plain words ("no one", "one of them") to count as facts
_TRIVIAL_NUMBERS = frozenset({"0", "1"})

_WORD = re.compile(r"[A-Za-z][A-Za-z'’]*(?:-[A-Za-z]+)*")
_NAME = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)*(?:['’]s)?\b|\b[A-Z]{2,}\b")
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)*)(?:st|nd|rd|th)?(?![\w])")
_CLOCK = re.compile(r"\b(\d{1,2})(?::(\d{2}))?\s*(am|pm|a\.m\.|p\.m\.)\b|\b(\d{1,2}):(\d{2})\b",
                    re.IGNORECASE)
#: capitalised words that are not names: sentence openers and words notes use with capitals
COMMON = frozenset("""
a about after again all also although and any anyone anything are as at be because before
both but by can could decision decisions did do does done each either else even every
everyone first for from good great he her here hers him his how however i if in into is it
its just last let lets like maybe me meanwhile more most my next no nobody none nor not
nothing now of ok okay on once one only or other our ours over perhaps please right same
second she should so some someone something still such sure than thank thanks that the their
theirs them then there these they this those though thus to too under until up us very was
we well were what whatever when where whether which while who whom whose why will with would
yes yeah yet you your yours summary action actions item items open question questions
key moments meeting notes note team everybody everything third fourth last final
agenda topic topics plan goal update updates status owner owners due new already
overall additionally finally also firstly secondly lastly meanwhile furthermore moreover
participants participant attendees discussion discussed discussing conversation speakers
speaker group members member everyone's they're we're it's i'm i'll we'll you'll there's
that's let's don't doesn't didn't isn't aren't wasn't weren't won't can't couldn't shouldn't
wouldn't according regarding since without within among during despite whereas besides
""".split())


@dataclass(frozen=True)
class Fact:
    kind: Kind
    key: str
    surface: str


def normalise_numbers(text: str) -> str:
    """``text`` with numbers written in words as digits ("sixty one" -> "61", "the
    fourteenth" -> "the 14th"); hyphenated words are split first ("sixty-one")."""
    spaced = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", text)
    return str(alpha2digit(spaced, "en", threshold=0))


def facts(text: str) -> list[Fact]:
    """Every fact of ``text``, in order (a fact repeated is listed again)."""
    found: list[Fact] = []
    digits = normalise_numbers(text)
    for match in _CLOCK.finditer(digits):
        found.append(Fact("time", _clock_key(match), match.group(0)))
    clocks = {m.span() for m in _CLOCK.finditer(digits)}
    for match in _NUMBER.finditer(digits):
        if any(start <= match.start() < end for start, end in clocks):
            continue
        key = _number_key(match.group(1))
        if key not in _TRIVIAL_NUMBERS:
            found.append(Fact("number", key, match.group(0)))
    for word in _WORD.findall(text):
        lower = word.lower()
        if lower in WEEKDAYS or lower in MONTHS or lower in RELATIVE_DAYS:
            found.append(Fact("date", lower, word))
        elif lower in TIMES:
            found.append(Fact("time", lower, word))
    for match in _NAME.finditer(text):
        word = re.sub(r"['’]s$", "", match.group(0))
        if _is_name(word):
            found.append(Fact("name", word.lower(), word))
    return found


def words(text: str) -> set[str]:
    """Every word of ``text``, lower-cased (what supports a name)."""
    return {w.lower().rstrip("'’") for w in _WORD.findall(text)} | {
        re.sub(r"['’]s$", "", w.lower()) for w in _WORD.findall(text)}


def _is_name(word: str) -> bool:
    lower = word.lower()
    return not (lower in COMMON or lower in WEEKDAYS or lower in MONTHS
                or lower in RELATIVE_DAYS or lower in TIMES or len(word) < 2)


def _number_key(raw: str) -> str:
    """``"4,000"`` and ``"4000"`` -> ``"4000"``; ``"4.20"`` -> ``"4.2"``."""
    plain = raw.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", raw) else raw
    try:
        value = float(plain)
    except ValueError:
        return raw
    return str(int(value)) if value.is_integer() else repr(value)


def _clock_key(match: re.Match[str]) -> str:
    """``2pm``, ``2 p.m.`` and ``14:00`` -> ``14:00``; ``9:30`` stays ``9:30``."""
    if match.group(4) is not None:  # h:mm, no am/pm
        return f"{int(match.group(4))}:{match.group(5)}"
    hour, minutes = int(match.group(1)), match.group(2) or "00"
    if match.group(3).lower().startswith("p") and hour < 12:
        hour += 12
    return f"{hour}:{minutes}"
