"""Output entries as the page and API clients read them: notes split into sections, items
with their citations, citations resolved to the quoted line and its time.

Why parse on the server: the notes are markdown written by a model (``## Summary``,
``## Decisions``, ``## Action items``, ``## Open questions``, ``## Key moments``, bullets
ending in ``(entry id)`` citations), and their exact shape is still moving (grounded notes
with more citations are being built). One tolerant parser here, unit-tested, means every
client (the live page, curl users, other services) gets the same structure: any ``#``
heading starts a section, bullets and numbered lines are items, other lines are prose, and
anything that looks like a Redis entry id (``1700000000000-3``) is a citation, however it is
bracketed. Text without headings is one prose section. Nothing here trusts the text: the page
renders it with ``textContent`` only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from sinkstream.contracts.entries import InputEntry, parse_entry
from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.outputs import parse_sources
from sinkstream.ids import entry_id_ms
from state_store.replies import as_text

_ENTRY_ID = re.compile(r"(?<![\w-])(\d{10,17}-\d{1,9})(?![\w-]|\.\d)")
#: a bracketed group made only of entry ids and list punctuation: "(1700-0)", "[a, b]",
#: "(entries 1700-0..1700-4)", "(1700-0 – 1700-2)"
_CITATION_GROUP = re.compile(
    r"\s*[(\[](?:entries|entry|ids?|see)?[:\s]*\d{10,17}-\d{1,9}"
    r"(?:\s*(?:,|;|\.\.|…|-|–|—|to|and)\s*\d{10,17}-\d{1,9})*\s*[)\]]", re.IGNORECASE)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*(?:[-*•+]|\d{1,3}[.)])\s+(.*)$")
_SPEAKER = re.compile(r"^([A-Z][\w .'-]{0,40}?):\s+(\S.*)$")
MAX_CITATIONS_RESOLVED = 64


@dataclass
class Item:
    """One bullet (or one prose paragraph) of a section."""

    text: str
    citations: list[str] = field(default_factory=list)
    speaker: str | None = None
    prose: bool = False


@dataclass
class Section:
    title: str
    key: str
    items: list[Item] = field(default_factory=list)


def _key(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") or "notes"


def _item(text: str, prose: bool, speakers: bool) -> Item:
    citations = list(dict.fromkeys(_ENTRY_ID.findall(text)))
    shown = _CITATION_GROUP.sub("", text).strip()
    speaker = None
    if speakers and (match := _SPEAKER.match(shown)):
        speaker, shown = match.group(1).strip(), match.group(2).strip()
    return Item(shown or text.strip(), citations, speaker, prose)


def parse_notes(text: str) -> list[Section]:
    """Markdown notes -> sections of items. Never raises; unknown shapes become prose."""
    sections: list[Section] = []
    current: Section | None = None
    lines: list[str] = []  # prose or the current bullet being continued
    in_bullet = False

    def flush() -> None:
        nonlocal lines, in_bullet, current
        if lines:
            if current is None:
                current = Section("Summary", "summary")
                sections.append(current)
            body = " ".join(part.strip() for part in lines if part.strip())
            speakers = current.key == "key_moments"
            current.items.append(_item(body, prose=not in_bullet, speakers=speakers))
        lines, in_bullet = [], False

    for line in text.splitlines():
        if heading := _HEADING.match(line):
            flush()
            title = heading.group(1).strip() or "Notes"
            current = Section(title, _key(title))
            sections.append(current)
        elif bullet := _BULLET.match(line):
            flush()
            lines, in_bullet = [bullet.group(1)], True
        elif not line.strip():
            flush()
        else:
            lines.append(line)
    flush()
    return sections


@dataclass
class Citation:
    """A cited input entry: when it was appended (from its id), and its line when known."""

    id: str
    time: float
    quote: str | None = None
    speaker: str | None = None
    ts: float | None = None


def _quotes_from_sections(sections: Iterable[Section]) -> dict[str, tuple[str | None, str]]:
    """Key moments are verbatim lines with their entry id: the cheapest quotes there are."""
    out: dict[str, tuple[str | None, str]] = {}
    for section in sections:
        if section.key != "key_moments":
            continue
        for item in section.items:
            for cid in item.citations[:1]:
                out[cid] = (item.speaker, item.text)
    return out


def resolve_citations(client: redis.Redis | None, stream_id: str,
                      sections: list[Section]) -> dict[str, Citation]:
    """Every cited id with its time; its line (speaker, text, media ``ts``) from the input
    entry while it is still in Redis (``trim_applied_input = false``, or not applied yet:
    one pipelined round trip, at most ``MAX_CITATIONS_RESOLVED`` ids), else its quote from
    the key moments of the same notes (verbatim lines with their entry ids)."""
    ids = list(dict.fromkeys(c for s in sections for i in s.items for c in i.citations))
    out = {cid: Citation(cid, entry_id_ms(cid) / 1000.0) for cid in ids}
    if client is not None and ids:
        _from_input(client, stream_id, out, ids[:MAX_CITATIONS_RESOLVED])
    for cid, (speaker, text) in _quotes_from_sections(sections).items():
        if cid in out and out[cid].quote is None:
            out[cid].quote, out[cid].speaker = text, speaker
    return out


def _from_input(client: redis.Redis, stream_id: str, out: dict[str, Citation],
                ids: list[str]) -> None:
    key = StreamKeys.of(stream_id).input
    pipe = client.pipeline(transaction=False)
    for cid in ids:
        pipe.xrange(key, cid, cid, count=1)
    for cid, reply in zip(ids, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(reply, Exception) or not reply:
            continue
        parsed = parse_entry(reply[0][0], reply[0][1])
        if isinstance(parsed, InputEntry) and parsed.text:
            out[cid].quote, out[cid].speaker, out[cid].ts = parsed.text, parsed.speaker, \
                parsed.ts


def output_view(client: redis.Redis | None, stream_id: str, entry_id: str,
                fields: dict[str, str]) -> dict[str, Any]:
    """One output entry as the API shows it: the contract's fields, typed, plus the notes'
    sections and resolved citations."""
    sections = parse_notes(fields.get("text", ""))
    citations = resolve_citations(client, stream_id, sections)
    return {
        "id": entry_id,
        "stream": stream_id,
        "kind": fields.get("kind", ""),
        "text": fields.get("text", ""),
        "covers": fields.get("covers", ""),
        "tokens_seen": _int(fields.get("tokens_seen")),
        "model": fields.get("model", ""),
        "ts": _float(fields.get("ts")),
        "request": fields.get("request", ""),
        "sources": [s.to_dict() for s in parse_sources(fields.get("sources", ""))],
        "sections": [asdict(s) for s in sections],
        "citations": {cid: asdict(c) for cid, c in citations.items()},
    }


def dumps(view: dict[str, Any]) -> str:
    return json.dumps(view, ensure_ascii=False, separators=(",", ":"))


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _float(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


def read_outputs(client: redis.Redis, stream_id: str, after: str, until: str = "+",
                 count: int = 500) -> list[tuple[str, dict[str, str]]]:
    """Output entries after ``after`` (exclusive) up to ``until`` (inclusive), oldest first."""
    key = StreamKeys.of(stream_id).output
    reply: Any = client.xrange(key, f"({after}" if after != "0-0" else "-", until, count=count)
    return [(as_text(eid), {as_text(k): as_text(v, "replace") for k, v in f.items()})
            for eid, f in reply]


def latest_outputs(client: redis.Redis, stream_id: str, count: int = 200
                   ) -> list[tuple[str, dict[str, str]]]:
    """The newest ``count`` output entries, oldest first."""
    reply: Any = client.xrevrange(StreamKeys.of(stream_id).output, count=count)
    return [(as_text(eid), {as_text(k): as_text(v, "replace") for k, v in f.items()})
            for eid, f in reversed(reply)]
