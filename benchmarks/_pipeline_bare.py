"""The pipeline benchmark's bare side: the backlog read back from Redis, parsed and tokenized
exactly as the worker does and cut into the worker's batches, then fed to the engine in this
process, round-robin over the streams, timing only ``engine.feed``.

``benchmarks/pipeline.py`` describes the benchmark.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Stream:
    sid: str
    batches: list[list[int]]  # token ids per batch, cut like StreamProcessor._read_batch
    entries: int

    @property
    def tokens(self) -> int:
        return sum(len(b) for b in self.batches)


def _read_streams(client: Any, sids: list[str], engine: Any, settings: Any) -> tuple[
        list[_Stream], float]:
    """Entries back from Redis, parsed and tokenized exactly as the worker does, cut into the
    worker's batches. Returns the streams and the seconds spent tokenizing."""
    from sinkstream.contracts.entries import Rejected, parse_entry
    from sinkstream.contracts.keys import StreamKeys
    from workers.processing.batches import turn_tokens

    limit, budget = settings.max_batch_entries, settings.max_batch_tokens
    out = []
    tokenize_s = 0.0
    for sid in sids:
        raw = client.xrange(StreamKeys.of(sid).input)
        parsed = [parse_entry(eid, f, max_text_bytes=settings.max_entry_bytes) for eid, f in raw]
        batches: list[list[int]] = []
        i = 0
        while i < len(parsed):  # mirrors _read_batch: entry limit, token budget, eos stop
            window = parsed[i : i + limit]
            tokens: list[int] = []
            n_entries = used = 0
            for entry in window:
                if isinstance(entry, Rejected):
                    used += 1
                    continue
                started = time.perf_counter()
                ids = turn_tokens(engine, entry)
                tokenize_s += time.perf_counter() - started
                if n_entries and len(tokens) + len(ids) > budget:
                    break
                n_entries += 1
                tokens.extend(ids)
                used += 1
                if entry.eos:
                    break
            if not batches and n_entries:
                tokens = engine.stream_prefix() + tokens  # as the worker does at stream start
            batches.append(tokens)
            i += used
        out.append(_Stream(sid, batches, sum(not isinstance(p, Rejected) for p in parsed)))
    return out, tokenize_s


def _bare(engine: Any, streams: list[_Stream], threads: int) -> tuple[
        float, float, dict[str, Any]]:
    """Feed every stream's batches round-robin (like re-enqueued tasks taking turns).
    Returns (wall seconds inside engine.feed, CPU seconds of it, final states)."""
    with _torch_threads(threads):
        states = {s.sid: engine.new_state() for s in streams}
        wall = cpu = 0.0
        for r in range(max(len(s.batches) for s in streams)):
            for s in streams:
                if r < len(s.batches) and s.batches[r]:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    states[s.sid] = engine.feed(states[s.sid], s.batches[r])
                    wall += time.perf_counter() - started
                    cpu += time.process_time() - cpu_started
    return wall, cpu, states
