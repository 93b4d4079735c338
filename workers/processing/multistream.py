"""Cross-stream batching: several streams' batches in one forward, each committed on its own.

On by default (``batch_streams`` 16; 1 turns it off). A task for stream X takes X's lease as
usual, then claims up to ``batch_streams - 1`` other runnable streams, oldest first, from the
``RUNNABLE`` set (leases taken without waiting; a stream leased elsewhere, parked as failed or
with nothing to read is skipped), until their first batches add up to ``batch_tokens`` (by
default what this worker feeds in one time slice, measured: ``budget``). The
held streams are fed chunk by chunk, one forward per step holding the next chunk of every
stream with a batch in flight; a stream whose batch is fed runs the same steps as a solo batch
(``StreamProcessor.finish``: summaries, memory, the commit fenced by *its own* lease) and its
next batch joins the following step, so forwards stay full while long batches run (``process``
says how refills are cut to the time slice); a stream that catches up within the time slice
leaves, and another runnable stream is claimed into its row (``_refill``). So:

* per-stream order: each stream is read after its committed entry id and fed in order, under
  its own lease, one batch at a time;
* exactly once: each commit is guarded by that stream's fencing token; a stale or lost lease
  drops only that stream's commit (the others commit), and a worker killed anywhere leaves
  every stream at its own last commit, from which any worker replays it;
* hot cache: loads and commits go through the processor's cache, as for a solo batch.

Replays stay bit-identical: a stream fed in a batch commits the same bits as the stream fed
alone, whatever its neighbours (the engines round a row alike in and out of a batch; see
``workers/engines/invariance.py``). The worker checks this once with its own model and kernels
(``Runtime.batch_streams``) and feeds solo where it does not hold (``batch_exact``), so a
replay after a crash commits exactly the state the lost attempt would have.

With other workers live (``state_store/presence.py``), a task holds at most its even share of
the runnable streams (``share``), so a small workload spreads over the workers; each task
looks again, with the workers live then, when its time slice ends.

Scheduling stays per stream. A claimed stream keeps its ``scheduled`` flag and its queued task
(which later finds less or nothing to do); streams still holding input are moved to the back
of ``RUNNABLE`` (round-robin, so no runnable stream starves behind the busiest ones) and
caught-up ones removed. ``RUNNABLE`` is a hint for choosing companions only: a stream missing
from it is still scheduled by the dispatcher as before. A task that finds its stream held as
someone's companion re-queues itself shortly instead of waiting for the flag to lapse (see
``companion_holder`` and ``workers/tasks.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sinkstream.contracts.keys import RUNNABLE
from sinkstream.ids import InvalidStreamId, validate_stream_id
from state_store.lease import LeaseLostError
from state_store.replies import as_text
from workers.engines.base import EngineState
from workers.processing.outcome import Outcome
from workers.processing.processor import Claim, Prepared, StreamProcessor

log = logging.getLogger(__name__)

#: lease holder suffix of a stream claimed as a companion: ``<worker id>+batch``
COMPANION_SUFFIX = "+batch"
#: how many RUNNABLE members are looked at per companion wanted (busy ones are skipped)
_SCAN_FACTOR = 4
#: the automatic token budget's floor, and the budget before this worker has timed a
#: forward: on a 2-core CPU with SmolLM2 the smallest budget that drains a 16-stream backlog at
#: full speed (2,048 loses a fifth; 32,768 gains nothing and holds streams 2-3x longer)
AUTO_MIN_TOKENS = 8192
#: each forward's weight in the feed speed decays by this per later forward
_RATE_DECAY = 0.8
#: what a stream in flight holds, in states at their largest (a full window): the state its
#: batch started from (kept until its commit), the state after the last forward, the one the
#: next forward builds, and the forward's own copies of its keys and values. Measured as peak
#: RSS growth per stream of a task whose streams all had full windows, loaded from Redis:
#: SmolLM2-135M 2.7x at 4 streams, 3.0x at 16 (2.1 GiB); tiny-llama 2.2x and 3.5x
FLIGHT_COPIES = 4


def companion_holder(lease_value: str | None) -> bool:
    """True when a lease value (``holder|token``) is a companion claim: held for one short
    batched round, after which the holder does not continue the stream itself."""
    if not lease_value:
        return False
    return lease_value.rpartition("|")[0].endswith(COMPANION_SUFFIX)


@dataclass
class _Held:
    """A stream this task holds: its claim, what it applied so far, the batch in hand."""

    claim: Claim
    outcome: Outcome | None = None  # batches applied so far in this task
    prepared: Prepared | None = None

    @property
    def stream_id(self) -> str:
        return self.claim.stream_id

    def add(self, later: Outcome) -> None:
        self.outcome = later if self.outcome is None else self.outcome.then(later)

    @property
    def continues(self) -> bool:
        return self.outcome is not None and self.outcome.continues

    @property
    def tokens(self) -> int:
        return len(self.prepared.batch.tokens) if self.prepared is not None else 0


@dataclass
class _Feeding:
    """A batch in flight: the state after the tokens fed so far (``pos`` of them)."""

    held: _Held
    prepared: Prepared
    state: EngineState
    #: the step after which the batch is fed (its last forward)
    end: int
    pos: int = 0
    feed_s: float = 0.0

    @property
    def fed(self) -> bool:
        return self.pos >= len(self.prepared.batch.tokens)


def streams_within(memory_bytes: int, state_bytes: int) -> int:
    """How many streams one task may feed together so that, each counted at ``FLIGHT_COPIES``
    times its largest state (``state_bytes``), they fit in ``memory_bytes``; at least one (a
    lone stream is fed whatever its size, as before batching)."""
    return max(1, memory_bytes // max(1, FLIGHT_COPIES * state_bytes))


class MultiStreamProcessor:
    """Feeds up to ``max_streams`` streams per forward; composes a ``StreamProcessor``."""

    def __init__(self, processor: StreamProcessor, max_streams: int, max_tokens: int,
                 live_workers: Callable[[], int] | None = None, state_bytes: int = 0) -> None:
        """``max_tokens``: the token budget of the first batches claimed together, 0 for
        ``budget`` to size it by this worker's measured speed; ``live_workers``: the live task
        slots of every worker (``state_store/presence.py``); None, or a count of at most 1,
        lets every task hold ``max_streams`` streams; ``state_bytes``: a stream's largest
        state, the unit of the memory a stream in flight holds (``reserve_bytes``)."""
        if max_streams < 1 or max_tokens < 0:
            raise ValueError("max_streams must be >= 1 and max_tokens >= 0")
        self.p = processor
        self.max_streams = max_streams
        self.max_tokens = max_tokens
        self.live_workers = live_workers
        self.companion_id = processor.worker_id + COMPANION_SUFFIX
        #: decayed sums of tokens fed and feed seconds: their ratio is the recent feed speed
        self._fed_tokens = 0.0
        self._fed_seconds = 0.0
        #: what one stream in a batched forward holds (estimated: FLIGHT_COPIES states)
        self.row_bytes = FLIGHT_COPIES * state_bytes

    @property
    def reserve_bytes(self) -> int:
        """What a task's streams in flight may hold at most (0 without batching): the room
        the memory budget keeps free of cached states (``workers/memory_budget.py``)."""
        return self.max_streams * self.row_bytes if self.max_streams > 1 else 0

    def budget(self, time_slice_s: float) -> int:
        """Tokens the first batches of one task's streams may add up to: ``max_tokens``, or
        (0, auto) what this worker feeds in ``time_slice_s`` at its recent speed, at least
        ``AUTO_MIN_TOKENS`` (also the budget until a forward has been timed). On a CPU the
        floor binds (it is where tokens/s stopped growing there, benchmarks/README.md,
        batching); a model fed faster than that per time slice, e.g. on a GPU, gathers as
        many streams as it feeds in one slice."""
        if self.max_tokens:
            return self.max_tokens
        if self._fed_seconds <= 0 or time_slice_s <= 0:
            return AUTO_MIN_TOKENS
        rate = self._fed_tokens / self._fed_seconds
        return max(AUTO_MIN_TOKENS, int(rate * time_slice_s))

    def _timed(self, tokens: int, seconds: float) -> None:
        """One forward's tokens and seconds into the feed speed (older forwards decay)."""
        self._fed_tokens = self._fed_tokens * _RATE_DECAY + tokens
        self._fed_seconds = self._fed_seconds * _RATE_DECAY + seconds

    def process(self, stream_id: str, time_slice_s: float = 0.0) -> list[Outcome]:
        """Apply batches of ``stream_id`` and of the companions claimed with it.

        Returns one outcome per stream touched, ``stream_id``'s first (totals over its
        batches, as ``StreamProcessor.process`` returns them). The held streams are fed chunk
        by chunk, one forward per step for every stream with a batch in flight (``_run``); a
        stream whose batch is fed commits at once and starts its next batch in the same
        forwards: a whole one while ``time_slice_s`` has not run out, afterwards one cut to
        end with the longest batch already in flight. A stream leaves as soon as it is
        caught up (its lease is released at once). ``max_tokens`` bounds the first batches
        of the streams claimed together; a forward holds at most one chunk per stream."""
        first = self.p.claim(stream_id)
        if isinstance(first, Outcome):
            return [first]
        held = [_Held(first)]
        finished: list[Outcome] = []
        try:
            self._prepare(held[0])
            budget = self.budget(time_slice_s)
            if held[0].prepared is not None and self.max_streams > 1:
                self._claim_companions(held, budget - held[0].tokens)
            order = [h.stream_id for h in held]  # outcomes come back in claim order
            self._run(held, finished, time.monotonic() + time_slice_s, budget)
            for h in list(held):
                finished.append(self._leave(h, held))
        finally:
            for h in held:  # on the way out of an error: every lease still held
                self.p.release(h.claim)
        claimed = {sid: i for i, sid in enumerate(order)}
        return sorted(finished, key=lambda o: claimed.get(o.stream_id, len(claimed)))

    # ----- claiming ----------------------------------------------------------------------------
    def share(self) -> int:
        """How many streams one task may hold: ``max_streams``, or with other workers live,
        an even share of the runnable streams among the live task slots (rounded up). So a
        small workload spreads over the workers instead of gathering on the one that took the
        first task, and a large one still fills every forward."""
        workers = self.live_workers() if self.live_workers is not None else 0
        if workers <= 1:
            return self.max_streams
        runnable = int(self.p.client.zcard(RUNNABLE))
        return max(1, min(self.max_streams, -(-runnable // workers)))

    def _claim_companions(self, held: list[_Held], budget: int) -> None:
        """Claim runnable streams, oldest first, until this task's ``share`` is held or their
        batches would pass the token budget. Never waits for a lease."""
        limit = self.share()
        wanted = limit - len(held)
        if wanted <= 0:
            return
        members: Any = self.p.client.zrange(RUNNABLE, 0, wanted * _SCAN_FACTOR - 1)
        taken = {h.stream_id for h in held}
        for member in members:
            if len(held) >= limit or budget <= 0:
                return
            sid = as_text(member, "replace")
            try:
                validate_stream_id(sid)
            except InvalidStreamId:
                continue  # anyone can ZADD the set; the dispatcher logs bad members
            if sid in taken:
                continue
            taken.add(sid)
            claim = self.p.claim(sid, self.companion_id)
            if isinstance(claim, Outcome):
                if claim.status in ("failed", "idle"):  # parked, or caught up: not runnable
                    self._forget(sid)
                continue  # busy elsewhere: its holder carries on
            h = _Held(claim)
            held.append(h)
            self._prepare(h, count=False)
            if h.prepared is None or (h.tokens > budget and len(held) > 1):
                self._drop(h, held)  # nothing to feed, or too big for this forward
                continue
            budget -= h.tokens

    def _prepare(self, h: _Held, count: bool = True, token_cap: int | None = None) -> None:
        """Load ``h``'s state and read its next batch (``h.prepared`` None when there is none).
        ``count``: whether an idle/failed outcome is counted (not for companion probes);
        ``token_cap``: the most tokens the batch may take (``StreamProcessor.prepare``)."""
        h.prepared = None
        try:
            prepared = self.p.prepare(h.claim, token_cap)
        except LeaseLostError as exc:
            h.add(Outcome(h.stream_id, "lost", reason=str(exc)))
            return
        if isinstance(prepared, Outcome):
            if count or prepared.status != "idle":
                self.p.observer.batch_done(h.stream_id, prepared.status)
            h.add(prepared)
            return
        h.prepared = prepared

    def _drop(self, h: _Held, held: list[_Held]) -> None:
        """Give back a companion claimed for nothing (no input, or over the budget)."""
        held.remove(h)
        self.p.release(h.claim)
        if h.prepared is None and h.outcome is not None \
                and h.outcome.status in ("idle", "failed", "deferred"):
            self._forget(h.stream_id)

    # ----- feeding, one chunk per stream per forward ----------------------------------------
    def _run(self, held: list[_Held], finished: list[Outcome], deadline: float,
             budget: int = 0) -> None:
        """Feed every prepared stream of ``held`` until no batch is in flight.

        Each step feeds every in-flight batch up to its stream's next chunk boundary (one
        forward, whatever the batches' lengths), so short and long batches share forwards
        instead of short ones idling while the longest finishes. A batch fully fed commits
        at once (``StreamProcessor.finish``: fenced by its own lease), and its stream reads
        its next batch: fed from the next step on before ``deadline``; afterwards cut to the
        tokens that end by ``horizon`` (the last step of the batches started before it), so
        the forwards stay full until then, and a call outlasts its longest batch by at most
        one entry (a batch takes at least one) once the time slice is over.

        A stream that leaves before ``deadline`` (caught up) frees its row for another
        runnable stream, claimed as the first companions were, within what is left of
        ``budget`` (``_refill``): with more runnable streams than a forward holds, forwards
        stay full instead of thinning out to the longest batch.
        """
        flying: list[_Feeding] = []
        step = horizon = 0
        for h in held:
            if h.prepared is not None:
                flying.append(self._start(h, step))
                horizon = max(horizon, flying[-1].end)
        while flying:
            rows = [f for f in flying if not f.fed]
            if rows:
                self._step(rows)
                step += 1
            streams = len(held)
            for f in [f for f in flying if f.fed]:
                flying.remove(f)
                h = f.held
                self._finish(f)
                if not h.continues:
                    finished.append(self._leave(h, held))
                    continue
                before = time.monotonic() < deadline
                cap = None
                if not before:  # only a batch that ends by the horizon: cut to the room left
                    room = horizon - step  # steps: the last one also takes a partial chunk
                    if room <= 0:
                        continue  # no room: the stream waits for its next call
                    cap = (room + 1) * self.p.engine.chunk_tokens - len(f.state.pending) - 1
                self._prepare(h, token_cap=cap)
                if h.prepared is None:
                    if not h.continues:
                        finished.append(self._leave(h, held))
                    continue
                flying.append(self._start(h, step))
                if before:  # after the deadline the horizon stays: an entry longer than the
                    horizon = max(horizon, flying[-1].end)  # room left runs past it, once
            if len(held) < streams and budget and time.monotonic() < deadline:
                for f in self._refill(held, flying, budget, step):
                    flying.append(f)
                    horizon = max(horizon, f.end)

    def _refill(self, held: list[_Held], flying: Sequence[_Feeding], budget: int,
                step: int) -> list[_Feeding]:
        """Claim runnable streams for the rows streams that left have freed, while the
        tokens still to feed leave room in ``budget``; their first batches, ready to join
        the next forward."""
        left = budget - sum(len(f.prepared.batch.tokens) - f.pos for f in flying)
        if left <= 0:
            return []
        before = len(held)
        self._claim_companions(held, left)
        return [self._start(h, step) for h in held[before:] if h.prepared is not None]

    def _start(self, h: _Held, step: int) -> _Feeding:
        assert h.prepared is not None
        state, tokens = h.prepared.loaded.state, h.prepared.batch.tokens
        steps = 0 if not tokens else max(1, (len(state.pending) + len(tokens))
                                          // self.p.engine.chunk_tokens)
        return _Feeding(h, h.prepared, state, end=step + steps)

    def _step(self, rows: Sequence[_Feeding]) -> None:
        """One forward: each row's tokens up to its next chunk boundary (a batch's last piece
        also takes the tokens after it that fill no chunk: they wait as ``pending``)."""
        chunk = self.p.engine.chunk_tokens
        pieces = []
        for f in rows:
            tokens = f.prepared.batch.tokens
            end = f.pos + chunk - len(f.state.pending)
            if len(tokens) - end < chunk:
                end = len(tokens)
            pieces.append(tokens[f.pos:end])
        started = time.perf_counter()
        if len(rows) == 1:  # one stream: the solo path, bit-identical replays
            states = [self.p.engine.feed(rows[0].state, pieces[0])]
        else:
            states = list(self.p.engine.feed_batch([f.state for f in rows], pieces))
        seconds = time.perf_counter() - started
        self.p.observer.fed(sum(len(p) for p in pieces), seconds)
        self._timed(sum(len(p) for p in pieces), seconds)
        for f, state, piece in zip(rows, states, pieces, strict=True):
            f.state = state
            f.pos += len(piece)
            f.feed_s += seconds / len(rows)
        if len(rows) > 1:
            log.debug("batched forward: %d streams, %d tokens, %.3fs", len(rows),
                      sum(len(p) for p in pieces), seconds)

    def _finish(self, f: _Feeding) -> None:
        """The fed batch's own fenced commit; a stale or lost lease drops only this stream's."""
        h = f.held
        try:
            outcome = self.p.finish(h.claim, f.prepared, f.state, f.feed_s)
        except LeaseLostError as exc:  # this stream only: the others still commit
            outcome = Outcome(h.stream_id, "lost", reason=str(exc))
        self.p.observer.batch_done(h.stream_id, outcome.status)
        h.add(outcome)
        h.prepared = None

    # ----- leaving -----------------------------------------------------------------------------
    def _leave(self, h: _Held, held: list[_Held]) -> Outcome:
        """Release ``h``'s lease and note where the stream stands in ``RUNNABLE``."""
        held.remove(h)
        outcome = h.outcome or Outcome(h.stream_id, "idle")
        outcome.reschedule = self.p.release(h.claim, outcome.settle)
        if outcome.continues:
            self._requeue(h.stream_id)
        elif outcome.status in ("applied", "idle", "failed", "deferred"):
            self._forget(h.stream_id)
        return outcome

    def _requeue(self, stream_id: str) -> None:
        """To the back of ``RUNNABLE``: the next claims take streams that waited longer."""
        self.p.client.zadd(RUNNABLE, {stream_id: time.time()}, xx=True)

    def _forget(self, stream_id: str) -> None:
        """Caught up: out of ``RUNNABLE`` (a producer's next publish marks it again)."""
        self.p.client.zrem(RUNNABLE, stream_id)
