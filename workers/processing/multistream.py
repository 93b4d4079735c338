"""Cross-stream batching: several streams' batches in one forward, each committed on its own.

Opt-in (``batch_streams`` > 1). A task for stream X takes X's lease as usual, then claims up to
``batch_streams - 1`` other runnable streams, oldest first, from the ``RUNNABLE`` set (leases
taken without waiting; a stream leased elsewhere, parked as failed or with nothing to read is
skipped), until their batches add up to ``batch_tokens``. The batches go through the engine's
``feed_batch`` in one forward; then every stream runs the same steps as a solo batch
(``StreamProcessor._finish``: summaries, memory, the commit fenced by *its own* lease). So:

* per-stream order: each stream is read after its committed entry id and fed in order, under
  its own lease, one batch at a time;
* exactly once: each commit is guarded by that stream's fencing token; a stale or lost lease
  drops only that stream's commit (the others commit), and a worker killed anywhere leaves
  every stream at its own last commit, from which any worker replays it;
* hot cache: loads and commits go through the processor's cache, as for a solo batch.

The trade-off, and why this is off by default: a batched forward rounds differently from a
solo one (sink-KV: another attention kernel per row group; RWKV: the batched re-implementation
of the package's forward), so a stream fed in a batch matches the same stream fed alone only to
~1e-6 (fp32 logits), not bit for bit. With batching off, a stream's state after N entries is
bit-identical whichever worker replays it; with it on, a replay after a crash can differ from
the lost attempt in the last float bits (never in which entries were applied).

Scheduling stays per stream. A claimed stream keeps its ``scheduled`` flag and its queued task
(which later finds less or nothing to do); streams still holding input are moved to the back
of ``RUNNABLE`` (round-robin, so no runnable stream starves behind the busiest ones) and
caught-up ones removed. ``RUNNABLE`` is a hint for choosing companions only: a stream missing
from it is still scheduled by the dispatcher as before. A task that finds its stream held as
someone's companion re-queues itself shortly instead of waiting for the flag to lapse (see
``companion_holder`` and ``workers/tasks.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monitoring import metrics
from sinkstream.contracts.keys import RUNNABLE
from sinkstream.ids import InvalidStreamId, validate_stream_id
from state_store.lease import Lease, LeaseKeeper, LeaseLostError
from workers.engines.base import EngineState
from workers.processor import Outcome, StreamProcessor, _Batch, _Loaded

log = logging.getLogger(__name__)

#: lease holder suffix of a stream claimed as a companion: ``<worker id>+batch``
COMPANION_SUFFIX = "+batch"
#: how many RUNNABLE members are looked at per companion wanted (busy ones are skipped)
_SCAN_FACTOR = 4


def companion_holder(lease_value: str | None) -> bool:
    """True when a lease value (``holder|token``) is a companion claim: held for one short
    batched round, after which the holder does not continue the stream itself."""
    if not lease_value:
        return False
    return lease_value.rpartition("|")[0].endswith(COMPANION_SUFFIX)


@dataclass
class _Held:
    """A stream this task holds: its lease, the keeper renewing it, and the batch in hand."""

    stream_id: str
    lease: Lease
    keeper: LeaseKeeper
    outcome: Outcome | None = None  # batches applied so far in this task
    loaded: _Loaded | None = None
    batch: _Batch | None = None
    load_s: float = 0.0

    def add(self, later: Outcome) -> None:
        self.outcome = later if self.outcome is None else self.outcome.then(later)

    @property
    def continues(self) -> bool:
        o = self.outcome
        return o is not None and o.status == "applied" and o.more


class MultiStreamProcessor:
    """Feeds up to ``max_streams`` streams per forward; composes a ``StreamProcessor``."""

    def __init__(self, processor: StreamProcessor, max_streams: int, max_tokens: int) -> None:
        if max_streams < 1 or max_tokens < 1:
            raise ValueError("max_streams and max_tokens must be >= 1")
        self.p = processor
        self.max_streams = max_streams
        self.max_tokens = max_tokens
        self.companion_id = processor.worker_id + COMPANION_SUFFIX

    def process(self, stream_id: str, time_slice_s: float = 0.0) -> list[Outcome]:
        """Apply batches of ``stream_id`` and of the companions claimed with it.

        Returns one outcome per stream touched, ``stream_id``'s first (totals over the rounds,
        as ``StreamProcessor.process`` returns them). Rounds repeat while some held stream has
        input left and ``time_slice_s`` has not run out; a stream leaves the round as soon as
        it is caught up (its lease is released at once).
        """
        first = self.p._acquire(stream_id)
        if isinstance(first, Outcome):
            return [first]
        held: list[_Held] = []
        finished: list[Outcome] = []
        with contextlib.ExitStack() as stack:
            stack.callback(self._release_all, held)
            held.append(self._hold(stack, stream_id, first))
            try:
                self._begin(held[0])
            except LeaseLostError as exc:
                held[0].add(Outcome(stream_id, "lost", reason=str(exc)))
            budget = self.max_tokens - (len(held[0].batch.tokens) if held[0].batch else 0)
            if held[0].batch is not None and self.max_streams > 1:
                self._claim_companions(stack, held, budget)
            order = [h.stream_id for h in held]  # outcomes come back in claim order
            deadline = time.monotonic() + time_slice_s
            while True:
                self._round([h for h in held if h.batch is not None])
                for h in [h for h in held if not h.continues]:
                    finished.append(self._leave(h, held))
                if not held or time.monotonic() >= deadline:
                    break
                for h in held:
                    try:
                        self._begin(h)
                    except LeaseLostError as exc:
                        h.add(Outcome(h.stream_id, "lost", reason=str(exc)))
            for h in list(held):
                finished.append(self._leave(h, held))
        claimed = {sid: i for i, sid in enumerate(order)}
        outcomes = sorted(finished, key=lambda o: claimed.get(o.stream_id, len(claimed)))
        for o in outcomes:
            if o.status == "applied":
                metrics.note_active_stream(o.stream_id)
        return outcomes

    # ----- claiming ----------------------------------------------------------------------------
    def _hold(self, stack: contextlib.ExitStack, stream_id: str, lease: Lease) -> _Held:
        keeper = stack.enter_context(LeaseKeeper(self.p.leases, lease))
        return _Held(stream_id, lease, keeper)

    def _claim_companions(
        self, stack: contextlib.ExitStack, held: list[_Held], budget: int
    ) -> None:
        """Claim runnable streams, oldest first, until ``max_streams`` are held or their
        batches would pass the token budget. Never waits for a lease."""
        wanted = self.max_streams - len(held)
        members: Any = self.p.client.zrange(RUNNABLE, 0, wanted * _SCAN_FACTOR - 1)
        taken = {h.stream_id for h in held}
        for member in members:
            if len(held) >= self.max_streams or budget <= 0:
                return
            sid = member.decode(errors="replace") if isinstance(member, bytes) else str(member)
            try:
                validate_stream_id(sid)
            except InvalidStreamId:
                continue  # anyone can ZADD the set; the dispatcher logs bad members
            if sid in taken:
                continue
            taken.add(sid)
            lease = self.p._acquire(sid, self.companion_id)
            if isinstance(lease, Outcome):
                if lease.status == "failed":  # parked: not runnable until someone resets it
                    self._forget(sid)
                continue  # busy elsewhere: its holder carries on
            h = self._hold(stack, sid, lease)
            held.append(h)
            try:
                self._begin(h, count=False)
            except LeaseLostError:
                h.batch = None
            if h.batch is None or (len(h.batch.tokens) > budget and len(held) > 1):
                self._drop(h, held)  # nothing to feed, or too big for this forward
                continue
            budget -= len(h.batch.tokens)

    def _begin(self, h: _Held, count: bool = True) -> None:
        """Load ``h``'s state and read its next batch (``h.batch`` None when there is none).
        ``count``: whether an idle/failed outcome is counted (not for companion probes)."""
        h.keeper.check()
        began = self.p._begin(h.stream_id)
        if isinstance(began, Outcome):
            h.loaded, h.batch = None, None
            if count or began.status != "idle":
                metrics.BATCHES.labels(outcome=began.status).inc()
            h.add(began)
            return
        h.loaded, h.batch, h.load_s = began

    def _drop(self, h: _Held, held: list[_Held]) -> None:
        """Give back a companion claimed for nothing (no input, or over the budget)."""
        held.remove(h)
        h.keeper.stop()
        self.p._release(h.lease)
        if h.batch is None and h.outcome is not None and h.outcome.status in ("idle", "failed"):
            self._forget(h.stream_id)

    # ----- one batched round -------------------------------------------------------------------
    def _round(self, ready: Sequence[_Held]) -> None:
        """One forward for every stream in ``ready``, then each stream's own fenced commit."""
        if not ready:
            return
        rows = [h for h in ready if h.batch is not None and h.batch.tokens]
        started = time.perf_counter()
        fed = self._feed([h.loaded.state for h in rows if h.loaded is not None],
                         [h.batch.tokens for h in rows if h.batch is not None])
        feed_s = time.perf_counter() - started
        if rows:
            metrics.FEED_SECONDS.labels(**self.p._labels).observe(feed_s)
            log.debug("batched forward: %d streams, %d tokens, %.3fs", len(rows),
                      sum(len(h.batch.tokens) for h in rows if h.batch is not None), feed_s)
        new_states = {id(h): s for h, s in zip(rows, fed, strict=True)}
        for h in ready:
            assert h.loaded is not None and h.batch is not None
            new_state = new_states.get(id(h), h.loaded.state)
            try:
                outcome = self.p._finish(h.stream_id, h.lease, h.keeper, h.loaded, h.batch,
                                         new_state, h.load_s, feed_s / max(1, len(rows)))
            except LeaseLostError as exc:  # this stream only: the others still commit
                outcome = Outcome(h.stream_id, "lost", reason=str(exc))
            metrics.BATCHES.labels(outcome=outcome.status).inc()
            h.add(outcome)
            h.loaded, h.batch = None, None

    def _feed(
        self, states: list[EngineState], tokens: list[list[int]]
    ) -> list[EngineState]:
        if not states:
            return []
        if len(states) == 1:  # one stream: the solo path, bit-identical replays
            return [self.p.engine.feed(states[0], tokens[0])]
        return list(self.p.engine.feed_batch(states, tokens))

    # ----- leaving -----------------------------------------------------------------------------
    def _leave(self, h: _Held, held: list[_Held]) -> Outcome:
        """Release ``h``'s lease and note where the stream stands in ``RUNNABLE``."""
        held.remove(h)
        h.keeper.stop()
        self.p._release(h.lease)
        outcome = h.outcome or Outcome(h.stream_id, "idle")
        if outcome.status == "applied" and outcome.more:
            self._requeue(h.stream_id)
        elif outcome.status in ("applied", "idle", "failed"):
            self._forget(h.stream_id)
        return outcome

    def _release_all(self, held: list[_Held]) -> None:
        """On the way out (also when an error propagates): every lease still held."""
        for h in list(held):
            held.remove(h)
            h.keeper.stop()
            self.p._release(h.lease)

    def _requeue(self, stream_id: str) -> None:
        """To the back of ``RUNNABLE``: the next claims take streams that waited longer."""
        self.p.client.zadd(RUNNABLE, {stream_id: time.time()}, xx=True)

    def _forget(self, stream_id: str) -> None:
        """Caught up: out of ``RUNNABLE`` (a producer's next publish marks it again)."""
        self.p.client.zrem(RUNNABLE, stream_id)
