"""The StreamingLLM eviction policy: which cached tokens a stream keeps (arXiv 2309.17453).

A stream's memory is the first ``sink`` tokens (attention sinks: the model dumps attention
on them, so dropping them wrecks perplexity) plus the ``recent`` most recent tokens; every
token in between is evicted. With ``n`` tokens fed so far (stream positions ``0 .. n-1``)::

    n <= S + R:  kept = [0, n)                          nothing evicted yet
    n >  S + R:  kept = [0, S) ++ [n - R, n)            S sinks, then the R most recent

Invariants the rest of the engine relies on:

* the cache never holds more than ``capacity = S + R`` tokens after an eviction, and at most
  ``S + R + T`` while a chunk of T tokens attends (the span the rotary table must cover);
* the kept tokens keep their order, so cache index j holds the j-th kept token and is given
  slot j (position shift): a token's slot only ever decreases, and sinks never move;
* the window only moves forward: a token evicted once never comes back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: index ranges ``[start, stop)`` into a cache, in order
Ranges = list[tuple[int, int]]


@dataclass(frozen=True)
class SinkWindow:
    """Which cached tokens survive: the first ``sink`` plus the last ``recent``."""

    sink: int  # S
    recent: int  # R

    @property
    def capacity(self) -> int:
        """S + R: the most tokens a cache holds between forwards."""
        return self.sink + self.recent

    def kept(self, length: int) -> Ranges:
        """Index ranges ``[start, stop)`` of a cache of ``length`` tokens kept after eviction."""
        if length <= self.capacity:
            return [(0, length)]
        return [(0, self.sink), (length - self.recent, length)]

    def positions(self, processed: int) -> torch.Tensor:
        """Stream position of every cache index after ``processed`` tokens: int64 ``[L]``,
        the ``kept`` ranges spelled out (L = min(processed, S + R))."""
        ranges = self.kept(processed)
        if len(ranges) == 1:
            return torch.arange(processed, dtype=torch.long)
        return torch.cat([torch.arange(a, b, dtype=torch.long) for a, b in ranges])


def _append_evicted(old: torch.Tensor, new: torch.Tensor, ranges: Ranges, dim: int) -> torch.Tensor:
    """``cat([old, new], dim)`` restricted to ``ranges``, without building the full concat.

    ``ranges`` come from :meth:`SinkWindow.kept` of the concatenated length, so the result is
    what the window keeps of ``old`` followed by ``new``: one copy of the kept tokens only.
    """
    n_old = old.shape[dim]
    if ranges == [(0, n_old + new.shape[dim])]:  # nothing evicted: one plain concat
        return torch.cat([old, new], dim=dim)
    parts = []
    for start, stop in ranges:
        if start < n_old:
            parts.append(old.narrow(dim, start, min(stop, n_old) - start))
        if stop > n_old:
            lo = max(start, n_old) - n_old
            parts.append(new.narrow(dim, lo, stop - n_old - lo))
    return torch.cat(parts, dim=dim)
