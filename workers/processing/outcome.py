"""What one task did to one stream: how its batches ended, with counts and timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sinkstream.contracts.outcomes import BatchStatus
from sinkstream.contracts.outputs import OutputEntry

#: how a task hands its stream back: ``continue`` (input left: a new task at once), ``done``
#: (caught up, or parked) or ``defer`` (a newer build wrote it: tried again after a while,
#: by whichever worker takes it then, so an upgraded one soon)
Settle = Literal["continue", "done", "defer"]


@dataclass
class Outcome:
    """The result of one batch, or (``then``) of consecutive batches under one lease."""

    stream_id: str
    status: BatchStatus
    entries: int = 0
    tokens: int = 0
    dead_letters: int = 0
    more: bool = False
    version: int = 0
    summaries: list[OutputEntry] = field(default_factory=list)
    load_s: float = 0.0
    feed_s: float = 0.0
    save_s: float = 0.0
    cache_hit: bool = False
    reason: str = ""
    #: the task's own stream was handed back with its scheduled flag set for a new task, which
    #: the caller must enqueue (input is left, or arrived meanwhile)
    reschedule: bool = False

    def then(self, later: Outcome) -> Outcome:
        """This batch followed by ``later`` under the same lease: totals, and later's status."""
        return Outcome(
            self.stream_id, later.status, entries=self.entries + later.entries,
            tokens=self.tokens + later.tokens,
            dead_letters=self.dead_letters + later.dead_letters,
            more=later.more, version=later.version or self.version,
            summaries=[*self.summaries, *later.summaries], load_s=self.load_s + later.load_s,
            feed_s=self.feed_s + later.feed_s, save_s=self.save_s + later.save_s,
            cache_hit=later.cache_hit, reason=later.reason,
        )

    @property
    def continues(self) -> bool:
        """Applied, with input left: the stream wants another batch soon."""
        return self.status == "applied" and self.more

    @property
    def settle(self) -> Settle:
        """How the stream is handed back after this outcome (``Settle``)."""
        if self.continues:
            return "continue"
        return "defer" if self.status == "deferred" else "done"
