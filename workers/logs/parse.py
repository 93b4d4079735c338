"""One log line read as a record: its message, level, time and logger, whatever the format.

Three shapes are recognised, tried in this order, and a line never fails to parse (the worst
case is a plain line with no level and no time of its own):

* **JSON lines** from structured loggers: an object with the message, level, time and logger
  under their common key names (``message``/``msg``/``log``, ``level``/``levelname``/
  ``severity``, ``timestamp``/``time``/``@timestamp``/``ts``, ``logger``/``name``/...);
* **syslog**: RFC 5424 (``<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG``) and RFC 3164
  (``<PRI>Mmm dd hh:mm:ss host tag[pid]: msg``, the ``<PRI>`` optional); the level is the
  PRI's severity, the logger the app/tag;
* **plain** lines: a leading ISO-8601 or ``YYYY-MM-DD hh:mm:ss`` time, and a level word among
  the first tokens (``ERROR``, ``[warn]``, ``W``... see ``LEVEL_WORDS``); the message is what
  follows the level.

Parsing is a pure function of the line and a reference time (the entry's own ``ts``, else the
time in its stream entry id), never of the clock: a replay parses every line the same way,
which is what keeps the template counts and times identical after a crash.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any, Literal, NamedTuple

Level = Literal["debug", "info", "warn", "error", "fatal"]
LEVELS: tuple[Level, ...] = ("debug", "info", "warn", "error", "fatal")
#: levels that make a template an error/warning template in the notes
PROBLEM_LEVELS: frozenset[str] = frozenset({"warn", "error", "fatal"})

#: level words (lower case) as loggers write them, to the five levels
LEVEL_WORDS: dict[str, Level] = {
    "trace": "debug", "debug": "debug", "dbg": "debug", "fine": "debug", "finer": "debug",
    "info": "info", "information": "info", "notice": "info", "inf": "info",
    "warn": "warn", "warning": "warn", "wrn": "warn",
    "error": "error", "err": "error", "severe": "error", "failure": "error",
    "fatal": "fatal", "critical": "fatal", "crit": "fatal", "alert": "fatal",
    "emerg": "fatal", "emergency": "fatal", "panic": "fatal",
}
#: syslog severities 0..7 to levels
_SYSLOG_LEVELS: tuple[Level, ...] = ("fatal", "fatal", "fatal", "error", "warn", "info",
                                     "info", "debug")

_MESSAGE_KEYS = ("message", "msg", "log", "text", "event", "@message", "body", "short_message")
_LEVEL_KEYS = ("level", "levelname", "severity", "lvl", "loglevel", "log.level", "level_name",
               "severity_text", "@level")
_TIME_KEYS = ("timestamp", "time", "@timestamp", "ts", "datetime", "date", "t", "asctime",
              "eventTime", "timeMillis")
_LOGGER_KEYS = ("logger", "logger_name", "loggerName", "name", "log.logger", "component",
                "module", "source", "service", "caller")

#: how many leading tokens of a plain line may hold its level word
_LEVEL_SCAN = 6

_ISO_TIME = re.compile(
    r"^\[?(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d{1,9})?(?:Z|[+-]\d{2}:?\d{2})?)\]?"
    r"(?:\s+|$)")
#: other times a plain line commonly starts with (the year's century is 2000 where it has two
#: digits): log4j's ``yy/MM/dd HH:mm:ss`` (Spark), ``yyMMdd HHmmss`` (Hadoop HDFS), and the
#: Apache error log's bracketed ``[Www Mmm dd HH:MM:SS yyyy]``; each group is
#: (year, month, day, hour, minute, second)
_SLASH_TIME = re.compile(r"^(\d{2})/(\d{2})/(\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\s+|$)")
_COMPACT_TIME = re.compile(r"^(\d{2})(\d{2})(\d{2}) (\d{2})(\d{2})(\d{2})(?:\s+|$)")
_ASCTIME = re.compile(r"^\[?(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) ([A-Z][a-z]{2}) {1,2}(\d{1,2}) "
                      r"(\d{2}):(\d{2}):(\d{2}) (\d{4})\]?(?:\s+|$)")
_RFC5424 = re.compile(
    r"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|(?:\[.*?\])+)\s?(.*)$", re.S)
_RFC3164 = re.compile(
    r"^(?:<(\d{1,3})>)?([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d{2}):(\d{2}):(\d{2}) (\S+) "
    r"([^\s:\[]+)(?:\[\d+\])?: ?(.*)$", re.S)
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


class LogRecord(NamedTuple):
    """A parsed line. ``message`` is what template mining reads (never empty when the line is
    not); ``ts`` is unix seconds (None when neither the line nor its entry says);
    ``shape`` says which parser read it (``json``, ``syslog`` or ``plain``).

    A named tuple, not a frozen dataclass: one is made per log line, and a frozen dataclass
    costs ~1 us to build (a ``object.__setattr__`` per field)."""

    message: str
    level: Level | None
    ts: float | None
    logger: str | None
    shape: str


def parse_line(line: str, reference_ts: float | None = None) -> LogRecord:
    """``line`` as a record; ``reference_ts`` (the entry's time) stands in for a missing time
    and gives the year to syslog times that carry none."""
    text = line.strip()
    if text.startswith("{"):
        record = _json_record(text, reference_ts)
        if record is not None:
            return record
    if text.startswith("<") or text[:3] in _MONTHS:
        record = _syslog_record(text, reference_ts)
        if record is not None:
            return record
    return _plain_record(text, reference_ts)


def level_of(value: Any) -> Level | None:
    """A level from a word (``"WARNING"``, ``"[err]"``) or a number (syslog severity 0..7, or
    Python/bunyan numbers: 10 debug .. 50 fatal)."""
    if isinstance(value, str):  # first: the common case (and never a bool or a number)
        return LEVEL_WORDS.get(value.strip("[]():<>").lower())
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        number = int(value)
        if 0 <= number <= 7:
            return _SYSLOG_LEVELS[number]
        for bound, level in ((20, "debug"), (30, "info"), (40, "warn"), (50, "error")):
            if number < bound:
                return level  # type: ignore[return-value]
        return "fatal"
    return None


def time_of(value: Any) -> float | None:
    """Unix seconds from epoch seconds/milliseconds/microseconds or an ISO-8601 string (a time
    without a zone is UTC)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
        if not math.isfinite(number) or number <= 0:
            return None
        while number > 1e11:  # ms, us, ns since the epoch
            number /= 1000.0
        return number
    if isinstance(value, str):
        text = value.strip()
        try:
            return time_of(float(text))
        except ValueError:
            pass
        return _iso_time(text)
    return None


def _iso_time(text: str) -> float | None:
    try:
        parsed = dt.datetime.fromisoformat(text.replace(",", ".", 1))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.timestamp()


def _json_record(text: str, reference_ts: float | None) -> LogRecord | None:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    message, level, when, logger = _fields(data)
    stripped = message.strip() if isinstance(message, str) else ""
    if not stripped:
        # no message field: the object itself is the message, keys sorted for stable templates
        stripped = " ".join(f"{k}={data[k]}" for k in sorted(data) if not isinstance(
            data[k], dict | list)).strip()
    ts = time_of(when) if when is not None else None
    return LogRecord(stripped or text, level_of(level),
                     ts if ts is not None else reference_ts,
                     logger if isinstance(logger, str) and logger else None, "json")


#: the four fields' key tuples, in ``_fields``' order
_FIELD_KEYS = (_MESSAGE_KEYS, _LEVEL_KEYS, _TIME_KEYS, _LOGGER_KEYS)
#: every key name to (its field, its rank among that field's keys)
_KEY_RANKS: dict[str, tuple[int, int]] = {
    key: (field, rank) for field, keys in enumerate(_FIELD_KEYS)
    for rank, key in reversed(list(enumerate(keys)))}
#: per field, its dotted keys split once (``log.level`` is ``{"log": {"level": ...}}`` in ECS)
_DOTTED: tuple[tuple[tuple[str, str], ...], ...] = tuple(
    tuple((head, tail) for head, _, tail in (k.partition(".") for k in keys) if tail)
    for keys in _FIELD_KEYS)
#: the fields that have dotted keys, with them
_DOTTED_FIELDS = tuple((field, dotted) for field, dotted in enumerate(_DOTTED) if dotted)
#: a rank past every key of each field: not found
_NO_RANK = tuple(len(keys) for keys in _FIELD_KEYS)


def _fields(data: dict[str, Any]) -> list[Any]:
    """Message, level, time and logger of a JSON record: per field, the value of its first key
    (in its tuple's order) present in ``data``, else of its first dotted key present one level
    down, else None. One pass over the record's keys (a record has a few; the key tuples
    hold 36 names, looked up one by one this took ~2 us a line)."""
    found: list[Any] = [None, None, None, None]
    ranks = list(_NO_RANK)
    for key, value in data.items():
        hit = _KEY_RANKS.get(key)
        if hit is not None:
            field, rank = hit
            if rank < ranks[field]:
                found[field] = value
                ranks[field] = rank
    for field, dotted in _DOTTED_FIELDS:
        if ranks[field] == _NO_RANK[field]:
            found[field] = _dotted(data, dotted)
    return found


def _dotted(data: dict[str, Any], dotted: tuple[tuple[str, str], ...]) -> Any:
    for head, tail in dotted:
        inner = data.get(head)
        if isinstance(inner, dict) and tail in inner:
            return inner[tail]
    return None


def _syslog_record(text: str, reference_ts: float | None) -> LogRecord | None:
    match = _RFC5424.match(text)
    if match:
        pri, stamp, _host, app, _pid, _msgid, _sd, msg = match.groups()
        ts = _iso_time(stamp) if stamp != "-" else None
        return LogRecord(msg.strip() or text, _syslog_level(pri),
                         ts if ts is not None else reference_ts,
                         app if app != "-" else None, "syslog")
    match = _RFC3164.match(text)
    if match:
        pri, month, day, hh, mm, ss, _host, tag, msg = match.groups()
        ts = _syslog_time(int(_MONTHS[month]), int(day), int(hh), int(mm), int(ss),
                          reference_ts)
        level = _syslog_level(pri) if pri else _plain_level(msg.split()[:_LEVEL_SCAN])[0]
        return LogRecord(msg.strip() or text, level, ts if ts is not None else reference_ts,
                         tag, "syslog")
    return None


def _syslog_level(pri: str) -> Level | None:
    number = int(pri)
    return _SYSLOG_LEVELS[number % 8] if number <= 191 else None


def _syslog_time(month: int, day: int, hh: int, mm: int, ss: int,
                 reference_ts: float | None) -> float | None:
    """An RFC 3164 time has no year: take the reference's (or 1970 without one), and the year
    before when that would put the line more than a day after its reference."""
    year = dt.datetime.fromtimestamp(reference_ts, dt.timezone.utc).year \
        if reference_ts is not None else 1970
    ts = _utc(year, month, day, hh, mm, ss)
    if ts is not None and reference_ts is not None and ts > reference_ts + 86400:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).replace(year=year - 1).timestamp()
    return ts


def _plain_record(text: str, reference_ts: float | None) -> LogRecord:
    ts, end = _leading_time(text)
    rest = text[end:]
    tokens = rest.split(maxsplit=_LEVEL_SCAN)
    level, at = _plain_level(tokens[:_LEVEL_SCAN])
    if level is not None and at + 1 < len(tokens):
        rest = rest.split(maxsplit=at + 1)[-1]
    return LogRecord(rest.strip() or text, level, ts if ts is not None else reference_ts,
                     None, "plain")


def _leading_time(text: str) -> tuple[float | None, int]:
    """The time a plain line starts with (ISO 8601, or one of the forms above) and where it
    ends; (None, 0) when it starts with none, or with a date that does not exist."""
    if match := _ISO_TIME.match(text):
        return _iso_time(match.group(1)), match.end()
    if text[:1].isdigit():
        match = _SLASH_TIME.match(text) or _COMPACT_TIME.match(text)
        if match:
            yy, mo, d, h, mi, sec = (int(g) for g in match.groups())
            return _ending(_utc(2000 + yy, mo, d, h, mi, sec), match.end())
    elif (match := _ASCTIME.match(text)) and match.group(1) in _MONTHS:
        name, *numbers = match.groups()
        d, h, mi, sec, year = (int(g) for g in numbers)
        return _ending(_utc(year, _MONTHS[name], d, h, mi, sec), match.end())
    return None, 0


def _ending(ts: float | None, end: int) -> tuple[float | None, int]:
    """(``ts``, ``end``) for a time that exists, else (None, 0): the line starts with none."""
    return (ts, end) if ts is not None else (None, 0)


def _utc(year: int, month: int, day: int, hour: int, minute: int, second: int
         ) -> float | None:
    """The UTC time of these fields, None for a date that does not exist (Feb 30)."""
    try:
        when = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.timezone.utc)
    except ValueError:
        return None
    return when.timestamp()


def _plain_level(tokens: list[str]) -> tuple[Level | None, int]:
    """The first level word among ``tokens`` written as a level is written: upper case
    (``ERROR``) or bracketed (``[error]``, ``<warn>``), so prose such as "an error in ..."
    is not taken for a level. (None, -1) when there is none."""
    for index, token in enumerate(tokens):
        bare = token.strip("[]():<>")
        if bare and (bare.isupper() or token != bare):
            level = LEVEL_WORDS.get(bare.rstrip(":").lower())
            if level is not None:
                return level, index
    return None, -1
