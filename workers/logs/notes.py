"""Log notes from a template table: what is new, what errs, what bursts, and when.

Pure functions of the committed table (no model, no Redis): the sections are facts counted
from the lines, so they can be wrong only if the counts are. The model's narrative is written
elsewhere (``workers/processing/log_notes.py``) from :func:`fact_lines` and checked by the
faithfulness guard against those same lines: every number, template and time it states must
be one of theirs.

Sections: new templates since the last update, error and warning templates (count, first and
last time), bursts (count, first and last time, the template's own baseline), the incident
timeline (first appearances of error/warning templates and bursts, in time order), and the top
templates. Times are UTC, ``YYYY-MM-DD HH:MM:SS``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from workers.logs.table import Incident, Table, TemplateStats

#: rows per section
TOP_TEMPLATES = 10
MAX_ROWS = 20


@dataclass(frozen=True)
class TimelineEvent:
    ts: float
    #: 0: a template's first line, 1: a burst (at the same time, the first line comes first)
    order: int
    text: str


def when(ts: float) -> str:
    """A line time as the notes write it (UTC, to the second)."""
    if ts != ts or ts in (float("inf"), float("-inf")):  # NaN or no time
        return "unknown time"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def name(stats: TemplateStats) -> str:
    return f"T{stats.template_id}"


def described(stats: TemplateStats) -> str:
    """``T7 [ERROR] `template```: how every section names a template."""
    level = f" [{stats.level.upper()}]" if stats.level and stats.level != "none" else ""
    return f"{name(stats)}{level} `{shown(stats.template)}`"


def shown(template: str) -> str:
    """A template as the notes show it: a run of three or more equal tokens (``<BLK> <BLK>
    ...``, a list in one line) is written once with its length, ``<BLK> x101``."""
    out: list[str] = []
    tokens = template.split(" ")
    index = 0
    while index < len(tokens):
        end = index
        while end + 1 < len(tokens) and tokens[end + 1] == tokens[index]:
            end += 1
        run = end - index + 1
        out.append(f"{tokens[index]} x{run}" if run >= 3 else " ".join(tokens[index:end + 1]))
        index = end + 1
    return " ".join(out)


def cited(found: TemplateStats | Incident) -> str:
    """Where a template's or a burst's lines are, as every bullet about it ends:
    `` (entries A..B)``, its first and last line's entries (`` (entry A)`` for one)."""
    if not found.first_entry:
        return ""
    if found.first_entry == found.last_entry:
        return f" (entry {found.first_entry})"
    return f" (entries {found.first_entry}..{found.last_entry})"


def new_templates(table: Table) -> list[TemplateStats]:
    """Templates created since the last published notes, in the order they appeared."""
    return sorted((s for s in table.templates.values() if s.first_line >= table.notes_cursor),
                  key=lambda s: s.first_line)


def timeline(table: Table) -> list[TimelineEvent]:
    """First appearances of error/warning templates and their bursts, in time order (bursts of
    other templates are under "Bursts": busy is not broken)."""
    events = [TimelineEvent(s.first_ts, 0, f"{when(s.first_ts)} first {described(s)}"
                            + (f" (entry {s.first_entry})" if s.first_entry else ""))
              for s in table.problems()]
    for incident in table.incidents:
        stats = table.templates.get(incident.template_id)
        if stats is not None and stats.problem:
            burst = _burst(stats, incident, table.config.bucket_s)
            events.append(TimelineEvent(incident.first_ts, 1,
                                        f"{when(incident.first_ts)} burst {burst}"))
    return sorted(events, key=lambda e: (e.ts, e.order, e.text))[-MAX_ROWS:]


def bursts(table: Table) -> list[Incident]:
    """Incidents, those of error/warning templates first, then the largest."""
    def key(incident: Incident) -> tuple[bool, int, float]:
        stats = table.templates[incident.template_id]
        return (not stats.problem, -incident.count, incident.first_ts)
    return sorted((i for i in table.incidents if i.template_id in table.templates), key=key)


def _burst(stats: TemplateStats, incident: Incident, bucket_s: float) -> str:
    return (f"{described(stats)}: {incident.count} lines from {when(incident.first_ts)} to "
            f"{when(incident.last_ts)} (baseline {incident.baseline:.1f} lines per "
            f"{bucket_s:g} s){cited(incident)}")


def render(table: Table, narrative: str = "") -> str:
    """The log notes as markdown: a narrative (if any) and the sections."""
    parts = [f"## Summary\n{narrative}"] if narrative else []
    parts.append(f"## Totals\n- {table.lines} lines, {len(table.templates)} templates; "
                 + ", ".join(f"{lv}: {n}" for lv, n in sorted(table.levels.items())))
    parts.append(_section("New templates", [
        f"{described(s)}: {s.count} lines, first at {when(s.first_ts)}{cited(s)}"
        for s in new_templates(table)], "no new templates since the last update"))
    parts.append(_section("Errors and warnings", [
        f"{described(s)}: {s.count} lines, first {when(s.first_ts)}, last {when(s.last_ts)}"
        f"{cited(s)}" for s in table.problems()], "no error or warning lines"))
    parts.append(_section("Bursts", [
        _burst(table.templates[i.template_id], i, table.config.bucket_s)
        for i in bursts(table)], "no bursts"))
    parts.append(_section("Incident timeline", [e.text for e in timeline(table)],
                          "nothing to report"))
    parts.append(_section("Top templates", [
        f"{described(s)}: {s.count} lines{cited(s)}" for s in table.top(TOP_TEMPLATES)],
        "no lines yet"))
    return "\n\n".join(parts)


def fact_lines(table: Table) -> list[str]:
    """The facts the narrative may use, one per line (also its guard's support)."""
    facts = [f"{table.lines} log lines in {len(table.templates)} templates."]
    facts += [f"Error or warning template {described(s)} appeared {s.count} times, first at "
              f"{when(s.first_ts)}, last at {when(s.last_ts)}." for s in table.problems()[:8]]
    facts += [f"Burst of {described(table.templates[i.template_id])}: {i.count} lines from "
              f"{when(i.first_ts)} to {when(i.last_ts)}." for i in bursts(table)[:5]]
    facts += [f"New template {described(s)}." for s in new_templates(table)[:5]]
    facts += [f"Frequent template {described(s)}: {s.count} lines." for s in table.top(3)]
    return facts


def template_rows(table: Table, limit: int | None = None) -> list[dict[str, object]]:
    """The template table as rows, most frequent first (``sinkstream logs``, output items):
    all of them, or the first ``limit``."""
    return [{"id": s.template_id, "template": s.template, "count": s.count,
             "level": s.level or "", "first": when(s.first_ts), "last": when(s.last_ts),
             "first_entry": s.first_entry, "last_entry": s.last_entry}
            for s in sorted(table.templates.values(),
                            key=lambda s: (-s.count, s.template_id))[:limit]]


def _section(title: str, rows: Sequence[str], empty: str) -> str:
    body = "\n".join(f"- {row}" for row in rows[:MAX_ROWS]) or f"- {empty}"
    more = f"\n- ... and {len(rows) - MAX_ROWS} more" if len(rows) > MAX_ROWS else ""
    return f"## {title}\n{body}{more}"
