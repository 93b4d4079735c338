"""A stream's next batch: the entries after its committed id, bounded, parsed and tokenized.

Every worker (and every test reference) tokenizes a stream exactly like this
(``entry_tokens``): a ``Speaker: text`` line per entry, after the engine's stream prefix at the
very start. With the engines' fixed chunk boundaries that is what makes replays bit-identical.

Reading is split in two so the XRANGE can share a round trip with other reads of the batch
(``request`` adds it to a pipeline, ``parse`` turns the reply into a ``Batch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from sinkstream.contracts.entries import InputEntry, Rejected, parse_entry
from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.kinds import LOG, StreamKind, effective_kind
from sinkstream.settings import Settings
from state_store.replies import as_text
from workers.engines.base import Engine
from workers.processing.prompts import format_turn


@dataclass
class Batch:
    """Entries read after the committed id, in order, within the batch limits."""

    entries: list[InputEntry]
    rejected: list[Rejected]
    #: every token the batch feeds (the stream prefix first when the stream starts here)
    tokens: list[int]
    #: the id of the last entry read: applied or dead-lettered, it is committed as the offset
    last_id: str
    #: the batch ends with the end-of-stream entry
    eos: bool
    #: input remains after this batch
    more: bool
    #: tokens of each entry in ``entries`` (counted once, when the batch is read)
    counts: list[int] = field(default_factory=list)


def turn_tokens(engine: Engine[Any], entry: InputEntry) -> list[int]:
    """One entry as the model reads it: a ``Speaker: text`` line."""
    return engine.tokenizer.encode(format_turn(entry.text, entry.speaker)) if entry.text else []


def entry_tokens(
    engine: Engine[Any], entries: Sequence[InputEntry], at_stream_start: bool
) -> list[int]:
    """The tokens a run of entries feeds, after the stream's prefix at its very start."""
    tokens = engine.stream_prefix() if at_stream_start and entries else []
    for entry in entries:
        tokens.extend(turn_tokens(engine, entry))
    return tokens


class BatchReader:
    """Reads and cuts batches for one engine under one worker's settings."""

    def __init__(self, engine: Engine[Any], settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    def request(self, pipe: redis.client.Pipeline, stream_id: str, after: str | None) -> None:
        """Queue the XRANGE for the entries after ``after`` (one more than a batch can hold,
        so ``parse`` can tell whether input remains)."""
        pipe.xrange(StreamKeys.of(stream_id).input, min=f"({after}" if after else "-",
                    count=self.settings.max_batch_entries + 1)

    def parse(self, raw: Sequence[Any], at_stream_start: bool, token_cap: int | None = None,
              stream_kind: StreamKind | None = None) -> Batch | None:
        """The batch in an XRANGE reply, bounded by entry count and token budget; None when
        there is nothing to read.

        A batch stops right after an end-of-stream entry so the final summary covers exactly
        the stream up to its end. ``token_cap`` lowers the token budget (``rolling_cap``).
        Log entries (``stream_kind``, or their own kind) are not tokenized here: what they
        feed is decided when they are mined (``workers/processing/log_batches.py``).
        """
        if not raw:
            return None
        limit = self.settings.max_batch_entries
        entries: list[InputEntry] = []
        rejected: list[Rejected] = []
        tokens: list[int] = []
        counts: list[int] = []
        used = 0
        eos = False
        prefix = self.engine.stream_prefix() if at_stream_start else []
        # the stream prefix (added below) counts against the batch's token budget too
        budget = self.settings.max_batch_tokens - len(prefix)
        if token_cap is not None:
            budget = min(budget, token_cap)
        for entry_id, fields in raw[:limit]:
            parsed = parse_entry(entry_id, fields, max_text_bytes=self.settings.max_entry_bytes)
            if isinstance(parsed, Rejected):
                rejected.append(parsed)
                used += 1
                continue
            ids = [] if effective_kind(parsed.kind, stream_kind) == LOG \
                else turn_tokens(self.engine, parsed)
            if entries and len(tokens) + len(ids) > budget:
                break
            entries.append(parsed)
            tokens.extend(ids)
            counts.append(len(ids))
            used += 1
            if parsed.eos:
                eos = True
                break
        if entries:
            tokens = prefix + tokens  # same as entry_tokens()
        return Batch(entries, rejected, tokens, as_text(raw[used - 1][0]), eos,
                     more=len(raw) > used, counts=counts)

    def rolling_cap(self, tokens_seen: int) -> int | None:
        """With summary memory, a batch ends before the next rolling-summary boundary.

        The batch after it then crosses the boundary with its first entry and is summarized at
        once, so a rolling summary always sees every entry since the previous one inside the
        window (``summary_every_tokens`` <= ``recent_tokens``): summary memory misses nothing.
        """
        every = self.settings.rolling_every_tokens
        if not (self.settings.summary_memory and every > 0) \
                or self.engine.window_tokens() is None:
            return None
        return max(1, (tokens_seen // every + 1) * every - tokens_seen)
