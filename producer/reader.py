"""Reading a stream's input entries back, parsed: for tools, tests and audits.

Workers read their batches themselves (``workers``); this is the plain, paged reader for
anyone else who wants to look at what producers wrote.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis

from sinkstream.contracts.entries import ParsedEntry, parse_entry
from sinkstream.contracts.keys import StreamKeys
from state_store.replies import as_text


def read_entries(
    client: redis.Redis,
    stream_id: str,
    *,
    start: str = "-",
    end: str = "+",
    count: int | None = None,
    page_size: int = 1000,
    max_text_bytes: int | None = None,
) -> Iterator[ParsedEntry]:
    """Yield the entries of ``stream_id``'s input stream in order, parsed, page by page.

    ``start``/``end`` are inclusive XRANGE bounds (``"("`` prefix for exclusive). Works with
    clients with or without ``decode_responses``.
    """
    key = StreamKeys.of(stream_id).input
    remaining = count
    lower = start
    while remaining is None or remaining > 0:
        size = page_size if remaining is None else min(page_size, remaining)
        page: list[Any] = client.xrange(key, min=lower, max=end, count=size)  # type: ignore[assignment]
        for entry_id, fields in page:
            yield parse_entry(entry_id, fields, max_text_bytes=max_text_bytes)
        if len(page) < size:
            return
        if remaining is not None:
            remaining -= len(page)
        lower = "(" + as_text(page[-1][0])
