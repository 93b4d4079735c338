"""One batch of one stream, exactly once: claim, prepare, feed, finish, release.

This is the whole per-stream algorithm, kept free of Celery so it can be tested and
benchmarked directly, as a public step API that the single-stream loop (``process``) and the
multi-stream path (``workers/processing/multistream.py``) both call:

1. ``claim``: the stream's lease with a fencing token (never waits: "busy" or "failed");
2. ``prepare``: the committed state (hot cache or Redis) and the next batch after it
   ("deferred": a newer build wrote the state; ``workers/processing/newer.py``);
3. ``feed``: the engine folds the batch into a new state (copy-on-write, nothing stored yet);
4. ``finish``: summaries, memory, and the fenced commit of everything the batch produced;
5. ``release``: the lease goes back (a failed release only delays the stream to its expiry).

A batch either commits completely (state, last applied entry id, summaries, memory and dead
letters in one Lua script guarded by the fencing token) or changes nothing; a worker killed
anywhere in between leaves the committed state as it was, and the next owner replays the same
entries into the same state (fixed chunk boundaries make that bit-identical).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

from sinkstream.contracts.formats import NewerFormatError
from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.outputs import OutputEntry
from sinkstream.faults import checkpoint
from sinkstream.settings import Settings
from state_store.claims import Claims, Refused, Then, running_flag_ttl
from state_store.codec import StateError
from state_store.connection import TRANSIENT_ERRORS
from state_store.lease import Lease, LeaseKeeper, LeaseLostError, LeaseManager
from state_store.reads import parse_head as parse_state_head
from state_store.reads import request_head as request_state_head
from state_store.replies import raised
from state_store.store import (
    CommitRequest,
    StaleCommitError,
    StateHead,
    StateReadError,
    StateStore,
)
from workers.engines.base import Engine, EngineError, EngineState
from workers.logs import head as logs_head
from workers.logs.retention import kept_lines
from workers.memory.persistence import parse_head as parse_memory_head
from workers.memory.persistence import request_head as request_memory_head
from workers.memory.records import MemoryHead
from workers.notes import head as notes_head
from workers.notes.head import NotesHead
from workers.notes.vocab import fields_of
from workers.processing.answers import Answerer
from workers.processing.batches import Batch, BatchReader
from workers.processing.changes import Changes
from workers.processing.dead_letters import dead_letter
from workers.processing.hot_cache import HotStateCache
from workers.processing.log_batches import LOG_STATE_ERRORS, LogFolder, LogUpdate
from workers.processing.log_notes import LogNotesWriter
from workers.processing.memory_writer import MemoryWriter
from workers.processing.newer import DEFER_RETRY_S, NewerStreams
from workers.processing.notes_writer import NotesWriter, Published
from workers.processing.observer import BatchObserver
from workers.processing.outcome import Outcome, Settle
from workers.processing.states import Loaded, StateRepository
from workers.processing.summarizer import Summarizer
from workers.processing.vectorizer import Vectorizer

log = logging.getLogger(__name__)

#: output streams are capped (approximately) at this many entries
OUTPUT_MAXLEN = 10_000


@dataclass
class Claim:
    """A stream this worker holds: its lease, and the keeper renewing it while it works."""

    stream_id: str
    lease: Lease
    keeper: LeaseKeeper
    #: the task's own stream (it settles the scheduled flag), not another task's companion
    own: bool
    #: the state head read with the claim, for the first batch (then None)
    head: StateHead | None
    #: the last entry this claim committed (where the next batch reads from)
    committed: str | None = None


@dataclass
class Prepared:
    """What a batch feeds and starts from, read after the claim."""

    head: StateHead
    loaded: Loaded
    batch: Batch
    memory: MemoryHead | None
    notes: NotesHead
    load_s: float
    #: the batch's log lines folded into the stream's miner and table (None: no logs)
    logs: LogUpdate | None = None


class StreamProcessor:
    """Processes stream batches for one worker process (one engine, one Redis client)."""

    def __init__(
        self,
        engine: Engine[Any],
        client: redis.Redis,
        settings: Settings,
        worker_id: str,
        cache: HotStateCache[tuple[EngineState, str | None]] | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        if observer is None:
            from monitoring.batch_metrics import BatchMetrics

            observer = BatchMetrics.of_engine(engine, settings.device, settings.dtype)
        self.engine = engine
        self.client = client
        self.settings = settings
        self.worker_id = worker_id
        self.observer = observer
        self.store = StateStore.from_settings(client, settings)
        self.leases = LeaseManager(client)
        self.claims = Claims(client)
        self.cache = cache if cache is not None else HotStateCache(
            settings.hot_cache_bytes, max_items=settings.max_streams_per_worker)
        self.states = StateRepository(engine, self.store, settings, self.cache, observer)
        self.reader = BatchReader(engine, settings)
        self.summarizer = Summarizer(engine, settings, observer)
        self.memory = MemoryWriter(engine, settings)
        self.logs = LogFolder(engine, feed=settings.log_feed, keep_lines=kept_lines(
            settings.log_keep_lines, settings.max_stream_length))
        self.log_notes = LogNotesWriter(engine, settings, self.summarizer, observer)
        self.notes = NotesWriter(engine, client, settings, self.summarizer, observer)
        self.answers = Answerer(engine, client, settings, self.states, self.summarizer,
                                self.notes)
        self._vectorizer: Vectorizer | None = None
        self.newer = NewerStreams(settings.max_streams_per_worker, self.store.mark_deferred)
        #: leases whose release failed (Redis went away): released on the next try, so the
        #: stream does not wait for the lease to expire when Redis comes back
        self._unreleased: dict[str, Lease] = {}
        observer.cache_changed(self.cache.nbytes, self.cache.limit_bytes)

    # ----- the single-stream loop ------------------------------------------------------------
    def process(self, stream_id: str, time_slice_s: float = 0.0) -> Outcome:
        """Apply bounded batches of ``stream_id``'s input, if this worker can own it.

        Under one lease, batches follow each other while input remains and ``time_slice_s``
        has not run out; each batch still commits on its own (fenced), so exactly-once is the
        same as one batch per task, minus the scheduling round trips between batches.
        """
        claim = self.claim(stream_id)
        if isinstance(claim, Outcome):
            return claim
        then: Then | Settle = "keep"  # an error propagating leaves the flag to the task's handler
        try:
            outcome = self._one(claim)
            deadline = time.monotonic() + time_slice_s
            while outcome.continues and time.monotonic() < deadline:
                outcome = outcome.then(self._one(claim))
            then = outcome.settle
        finally:
            reschedule = self.release(claim, then)
        outcome.reschedule = reschedule
        return outcome

    def _one(self, claim: Claim) -> Outcome:
        try:
            prepared = self.prepare(claim)
            if isinstance(prepared, Outcome):
                outcome = prepared
            else:
                new_state, feed_s = self.feed(prepared)
                outcome = self.finish(claim, prepared, new_state, feed_s)
        except LeaseLostError as exc:
            outcome = Outcome(claim.stream_id, "lost", reason=str(exc))
        self.observer.batch_done(claim.stream_id, outcome.status)
        return outcome

    # ----- the steps ---------------------------------------------------------------------------
    def claim(self, stream_id: str, holder: str | None = None) -> Claim | Outcome:
        """The stream's lease with a keeper renewing it, and the state head, in one round trip;
        or why not: "failed" (parked), "busy" (leased elsewhere) or "idle" (nothing to read:
        no lease taken, and the task's own scheduled flag settled as a caught-up release
        settles it). Never waits.

        Without ``holder`` this is the task's own stream: the claim refreshes its scheduled
        flag and ``release`` settles it. With one (a companion of another stream's task) the
        flag is left to that stream's own task."""
        self._release_unreleased(stream_id)
        own = holder is None
        lease_s = self.settings.lease_seconds
        got = self.claims.claim(stream_id, holder or self.worker_id, lease_s,
                                running_flag_ttl(lease_s) if own else None)
        if isinstance(got, Refused):
            if got.status == "idle" and own:  # counted as a batch that found nothing
                self.observer.batch_done(stream_id, "idle")
            reason = got.detail if got.status == "failed" else ""
            return Outcome(stream_id, got.status, reason=reason)
        lease = got.lease
        if lease.took_over:
            self.observer.lease_taken_over()
            log.info("stream %s: took over from %s", stream_id, lease.previous_holder)
        keeper = LeaseKeeper(self.leases, lease)
        keeper.__enter__()
        return Claim(stream_id, lease, keeper, own=own, head=got.head)

    def release(self, claim: Claim, then: Then | Settle = "keep") -> bool:
        """Stop renewing, give the lease back and settle the task's own stream's scheduled
        flag (``then``; a companion's is left alone); True when the stream must be enqueued
        again now. ``keep`` on the own stream (an error cut the batch short) becomes
        ``retry``: the flag gets the queued TTL back, so an error is retried after
        ``schedule_ttl_seconds``; ``defer`` after ``DEFER_RETRY_S``. If Redis is unreachable
        the lease is remembered and released on the next try: a failed release never masks
        the error already propagating."""
        claim.keeper.stop()
        flag_ttl_s = self.settings.schedule_ttl_seconds
        if then == "defer":
            then, flag_ttl_s = "retry", min(flag_ttl_s, DEFER_RETRY_S)
        if not claim.own:
            then = "keep"
        elif then == "keep":
            then = "retry"
        try:
            return self.claims.release(claim.lease, then, flag_ttl_s)
        except TRANSIENT_ERRORS as exc:
            log.debug("stream %s: lease release failed (%s); retried later",
                      claim.stream_id, exc)
            if len(self._unreleased) < self.settings.max_streams_per_worker:
                self._unreleased[claim.stream_id] = claim.lease
            return False

    def _release_unreleased(self, stream_id: str) -> None:
        stale = self._unreleased.pop(stream_id, None)
        if stale is None:
            return
        try:
            self.leases.release(stale)
        except TRANSIENT_ERRORS:
            self._unreleased[stream_id] = stale

    def prepare(self, claim: Claim, token_cap: int | None = None) -> Prepared | Outcome:
        """The committed state and the next batch after it; or the outcome when there is
        nothing to feed ("idle", or "failed" for a state that cannot be used). ``token_cap``
        bounds the batch's tokens further (it still takes at least one entry).

        One round trip reads the batch (and the memory head); the first batch of a claim
        starts from the head read with it, a later one reads the head in the same trip. A
        hot-cache miss costs one more, for the state's bytes."""
        claim.keeper.check()
        stream_id = claim.stream_id
        started = time.perf_counter()
        head, claim.head = claim.head, None
        after = head.last_entry_id if head is not None else claim.committed
        pipe = self.client.pipeline(transaction=False)
        if head is None:
            request_state_head(pipe, stream_id)
        self.reader.request(pipe, stream_id, after)
        notes_head.request(pipe, stream_id)
        logs_head.request(pipe, stream_id)
        if self.memory.enabled:
            request_memory_head(pipe, stream_id)
        replies = pipe.execute(raise_on_error=False)
        if head is None:
            head = parse_state_head(stream_id, *raised(replies[:2]))
            replies = replies[2:]
        entries, notes_raw = replies[0], replies[1]
        logs_raw = replies[2:2 + logs_head.REPLIES]
        memory_head = replies[2 + logs_head.REPLIES] if self.memory.enabled else None
        if isinstance(entries, redis.ResponseError) and "WRONGTYPE" in str(entries):
            # anyone can write the input key: a non-stream there parks this stream only
            return self._fail(stream_id, f"stream {stream_id!r}: input key is not a stream "
                                         f"({entries})")
        raised(replies)
        if (known := self.newer.known(stream_id, head.version)) is not None:
            return self._defer(stream_id, head.version, known)  # not read again
        try:
            loaded = self.states.load(stream_id, head)
        except NewerFormatError as exc:  # before StateError: a state's is one of those too
            return self._defer(stream_id, head.version, str(exc))
        except (StateError, StateReadError, EngineError) as exc:
            return self._fail(stream_id, str(exc))
        if loaded.last_entry_id != after:  # the state moved under the head: never feed it
            raise LeaseLostError(f"stream {stream_id!r}: state at {loaded.last_entry_id}, "
                                 f"expected {after}")
        load_s = time.perf_counter() - started
        checkpoint("after_load")
        logs = logs_head.parse(stream_id, logs_raw)
        if logs.has_logs and logs.applied != after:
            raise LeaseLostError(f"stream {stream_id!r}: logs at {logs.applied}, expected "
                                 f"{after}")
        cap = self.reader.rolling_cap(loaded.state.tokens_seen)
        if token_cap is not None:
            cap = token_cap if cap is None else min(cap, token_cap)
        batch = self.reader.parse(entries, at_stream_start=loaded.state.tokens_seen == 0,
                                  token_cap=cap, stream_kind=logs.kind)
        if batch is None:
            return Outcome(stream_id, "idle", version=loaded.version, cache_hit=loaded.cache_hit)
        try:
            if not logs.complete and not self.logs.holds(stream_id, logs):
                logs = logs_head.read_fields(self.client, stream_id, logs)  # another worker's
                if logs.applied != after:
                    raise LeaseLostError(f"stream {stream_id!r}: logs at {logs.applied}, "
                                         f"expected {after}")
            batch, logs_update = self.logs.fold(stream_id, logs, batch)
        except NewerFormatError as exc:
            return self._defer(stream_id, head.version, f"stream {stream_id!r}: {exc}")
        except LOG_STATE_ERRORS as exc:
            return self._fail(stream_id, f"stream {stream_id!r}: logs unreadable: {exc}")
        memory = parse_memory_head(stream_id, memory_head) if self.memory.enabled else None
        return Prepared(head, loaded, batch, memory, notes_head.parse(stream_id, notes_raw),
                        load_s, logs_update)

    def feed(self, prepared: Prepared) -> tuple[EngineState, float]:
        """The state after the batch, and the seconds the model took."""
        if not prepared.batch.tokens:
            return prepared.loaded.state, 0.0
        started = time.perf_counter()
        state = self.engine.feed(prepared.loaded.state, prepared.batch.tokens)
        seconds = time.perf_counter() - started
        self.observer.fed(len(prepared.batch.tokens), seconds)
        return state, seconds

    def finish(self, claim: Claim, prepared: Prepared, new_state: EngineState,
               feed_s: float) -> Outcome:
        """Notes, summaries, memory and the fenced commit of one fed batch, under ``claim``."""
        checkpoint("after_feed")
        claim.keeper.check()
        stream_id, loaded, batch = claim.stream_id, prepared.loaded, prepared.batch
        lines = self.memory.lines(loaded.state, new_state, batch)
        moments = self.memory.moments(prepared.memory, lines)
        logs = prepared.logs
        logs_fields = logs.fields if logs is not None else None
        if logs is not None and logs.table.lines:  # a log stream: log notes, not meeting notes
            log_out = self.log_notes.publish(new_state, batch.last_id, batch.eos, logs)
            published = Published(log_out.entries, prepared.notes, log_out.prose)
            logs_fields = log_out.fields
        else:
            notes = self.notes.update(prepared.notes, lines)
            published = self.notes.publish(stream_id, loaded.state, new_state, batch.last_id,
                                           batch.eos, lines, prepared.memory, moments, notes)
        memory = self.memory.plan(prepared.memory, lines, published.prose, batch.last_id,
                                  moments, new_state)
        changes = Changes(memory, published.notes.fields(prepared.notes), fields_of(lines),
                          logs_fields, logs)
        claim.keeper.check()
        # deliberately after the last lease check: a paused worker that resumes here must be
        # stopped by the commit's fencing check, not by luck
        checkpoint("before_commit")

        started = time.perf_counter()
        try:
            version, written = self._commit(claim, prepared, new_state, published.entries,
                                            changes)
        except StaleCommitError as exc:
            self.states.forget(stream_id)
            self.observer.commit_refused(exc.reason or "stale")
            log.warning("stream %s: commit refused (%s)", stream_id, exc)
            return Outcome(stream_id, "stale", reason=str(exc))
        save_s = time.perf_counter() - started
        claim.committed = batch.last_id
        if prepared.logs is not None:
            self.logs.remember(stream_id, prepared.logs, logs_fields or {})
            self.observer.logs_committed(prepared.logs.levels, len(prepared.logs.new_templates),
                                         len(prepared.logs.new_incidents))
        if memory is not None and memory.evicted:
            self._vectorize(stream_id, memory.evicted)
        return Outcome(
            stream_id, "applied", entries=len(batch.entries) + len(batch.rejected),
            tokens=len(batch.tokens), dead_letters=len(batch.rejected), more=batch.more,
            version=version, summaries=published.entries, load_s=prepared.load_s,
            feed_s=feed_s, save_s=save_s, cache_hit=loaded.cache_hit,
        )

    def _commit(self, claim: Claim, prepared: Prepared, new_state: EngineState,
                summaries: list[OutputEntry], changes: Changes) -> tuple[int, int]:
        """Commit the batch; (the new version, state bytes written)."""
        started = time.perf_counter()
        loaded, batch = prepared.loaded, prepared.batch
        payload, segments = (None, None)
        if batch.tokens or loaded.version == 0:
            payload, segments = self.states.encode(loaded, new_state, batch.last_id)
        meta: dict[str, str | int | float] = {"tokens_seen": new_state.tokens_seen,
                                              "worker": self.worker_id}
        if summaries:
            meta["last_summary_ts"] = summaries[-1].ts
        if batch.eos:
            meta["ended"] = 1
        keys = StreamKeys.of(claim.stream_id)
        result = self.store.commit(CommitRequest(
            stream_id=claim.stream_id, fence=claim.lease.token,
            expected_version=loaded.version, last_entry_id=batch.last_id, state=payload,
            segments=segments,
            state_fields={"state_nbytes": self.engine.state_nbytes(new_state),
                          "tokens_seen": new_state.tokens_seen},
            meta_fields=meta,
            meta_counts={"entries_applied": len(batch.entries)} if batch.entries else {},
            outputs=[s.fields() for s in summaries],
            dead_letters=[dead_letter(r) for r in batch.rejected],
            summary=summaries[-1].fields() if summaries else None,
            trim_input=self.settings.trim_applied_input and changes.trim,
            trim_before=changes.trim_before,
            output_maxlen=OUTPUT_MAXLEN,
            hash_updates=changes.updates(keys),
            head=prepared.head,
        ))
        self.states.remember(claim.stream_id, result.version, new_state, batch.last_id)
        written = len(payload or b"") + result.segment_bytes
        state_size = None
        if payload is not None:
            state_size = len(payload) if segments is None \
                else self.engine.state_nbytes(new_state)
        self.observer.committed(len(batch.tokens), len(batch.entries),
                                [r.reason for r in batch.rejected], written, state_size,
                                time.perf_counter() - started)
        return result.version, written

    def _defer(self, stream_id: str, version: int, reason: str) -> Outcome:
        self.newer.met(stream_id, version, reason)  # left for an upgraded worker
        return Outcome(stream_id, "deferred", reason=reason)

    def _fail(self, stream_id: str, reason: str) -> Outcome:
        """Park a stream whose state cannot be used; the others carry on."""
        log.error("stream %s: marked failed: %s", stream_id, reason)
        self.store.mark_failed(stream_id, reason)
        self.states.forget(stream_id)
        self.observer.stream_failed(reason)
        return Outcome(stream_id, "failed", reason=reason)

    # ----- whole-stream memory ---------------------------------------------------------------
    @property
    def vectorizer(self) -> Vectorizer | None:
        """The thread embedding committed chunks (made on first use; None without an
        embedding model)."""
        if self._vectorizer is None and (embedder := self.answers.embedder) is not None:
            self._vectorizer = Vectorizer(
                self.client, embedder, max_streams=self.settings.max_streams_per_worker,
                on_written=self.observer.vectors_written)
        return self._vectorizer

    def _vectorize(self, stream_id: str, seqs: list[int]) -> None:
        vectorizer = self.vectorizer
        if vectorizer is not None:
            vectorizer.submit(stream_id, seqs)

    # ----- read-only: on-demand summaries and answers ------------------------------------------
    def answer(self, stream_id: str, question: str, request: str = "") -> OutputEntry:
        return self.answers.answer(stream_id, question, request)

    def summary_now(self, stream_id: str, request: str = "") -> OutputEntry:
        return self.answers.summary_now(stream_id, request)

    def final_now(self, stream_id: str) -> OutputEntry:
        """The final notes the end-of-stream entry writes, from the committed state, memory
        and notes (nothing is written; a finished stream's gives its own final again)."""
        loaded = self.states.committed(stream_id)
        memory, notes = self.notes.heads(stream_id)
        memory = memory if self.memory.enabled else None
        published = self.notes.final(stream_id, loaded.state, loaded.last_entry_id or "0-0", (),
                                     memory, self.memory.moments(memory, ()) or (), notes)
        return published.entries[0]

    def committed_state(self, stream_id: str) -> tuple[EngineState, str | None]:
        """The latest committed state and the last entry in it (no lease: read only)."""
        loaded = self.states.committed(stream_id)
        return loaded.state, loaded.last_entry_id
