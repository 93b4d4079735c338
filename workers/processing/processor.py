"""One batch of one stream, exactly once: lease, load, read, feed, summarize, fenced commit.

This is the whole per-stream algorithm, kept free of Celery so it can be tested and
benchmarked directly. A batch either commits completely (state, last applied entry id,
summaries and dead letters in one Lua script guarded by the fencing token) or changes nothing;
a worker killed anywhere in between leaves the committed state as it was, and the next owner
replays the same entries into the same state (fixed chunk boundaries make that bit-identical).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from monitoring import metrics
from sinkstream.contracts.entries import InputEntry, Rejected, parse_entry
from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.outcomes import BatchStatus
from sinkstream.contracts.outputs import OutputEntry, Source, SummaryKind, make_output
from sinkstream.faults import checkpoint
from sinkstream.settings import Settings
from state_store.codec import (
    StateEnvelope,
    StateError,
    check_compatible,
    decode_state,
    encode_state,
)
from state_store.connection import TRANSIENT_ERRORS
from state_store.lease import Lease, LeaseKeeper, LeaseLostError, LeaseManager
from state_store.store import (
    HashUpdate,
    SegmentUpdate,
    StaleCommitError,
    StateReadError,
    StateStore,
    StoredState,
)
from workers.engines import sinkkv_segments
from workers.engines.base import Engine, EngineError, EngineState
from workers.hot_cache import HotStateCache
from workers.memory import highlights, retrieve
from workers.memory.chunks import Turn
from workers.memory.embedder import Embedder, get_embedder
from workers.memory.highlights import Moment
from workers.memory.records import MemoryHead, MemoryWrite, SummaryMemory
from workers.memory.store import plan_write, read_chunks, read_head
from workers.summaries import (
    ANSWER_SAMPLING,
    SECTIONS,
    SUMMARY_SAMPLING,
    Section,
    answer_with_context_instruction,
    context_block,
    format_notes,
    format_turn,
    rolling_instruction,
    rolling_summary_due,
    section_instruction,
    short_answer,
    tidy_section,
)

log = logging.getLogger(__name__)

#: Longest field value copied into a dead letter; the rest is cut with a note.
DEAD_LETTER_FIELD_BYTES = 4096
#: Most fields, and longest field name, copied into a dead letter.
DEAD_LETTER_MAX_FIELDS = 32
DEAD_LETTER_NAME_BYTES = 128
OUTPUT_MAXLEN = 10_000


@dataclass
class Outcome:
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


@dataclass
class _Loaded:
    state: EngineState
    version: int
    last_entry_id: str | None
    cache_hit: bool
    #: ids of the segments stored for this version (segmented states; [] when whole)
    segments: list[int] = field(default_factory=list)


@dataclass
class _Batch:
    entries: list[InputEntry]
    rejected: list[Rejected]
    tokens: list[int]
    last_id: str
    eos: bool
    more: bool
    #: tokens of each entry in ``entries`` (counted once, when the batch is read)
    counts: list[int] = field(default_factory=list)


class StreamProcessor:
    """Processes stream batches for one worker process (one engine, one Redis client)."""

    def __init__(
        self,
        engine: Engine[Any],
        client: redis.Redis,
        settings: Settings,
        worker_id: str,
        cache: HotStateCache[tuple[EngineState, str | None]] | None = None,
    ) -> None:
        self.engine = engine
        self.client = client
        self.settings = settings
        self.worker_id = worker_id
        self.store = StateStore.from_settings(client, settings)
        self.leases = LeaseManager(client)
        self.cache = cache if cache is not None else HotStateCache(
            settings.hot_cache_bytes, max_items=settings.max_streams_per_worker)
        #: leases whose release failed (Redis went away): released on the next try, so the
        #: stream does not wait for the lease to expire when Redis comes back
        self._unreleased: dict[str, Lease] = {}
        self._labels = {"engine": engine.kind, "model": engine.model_name}
        metrics.init_worker(**self._labels, device=settings.device, dtype=settings.dtype)
        metrics.HOT_CACHE_LIMIT.set(self.cache.limit_bytes)
        #: the stream keeps a memory hash (summary memory and/or retrieval chunks)
        self.keeps_memory = settings.summary_memory or settings.retrieval != "off"

    # ----- one batch ---------------------------------------------------------------------------
    def process(self, stream_id: str, time_slice_s: float = 0.0) -> Outcome:
        """Apply bounded batches of ``stream_id``'s input, if this worker can own it.

        Under one lease, batches follow each other while input remains and ``time_slice_s``
        has not run out; each batch still commits on its own (fenced), so exactly-once is the
        same as one batch per task, minus the scheduling round trips between batches.
        """
        lease = self._acquire(stream_id)
        if isinstance(lease, Outcome):
            return lease
        try:
            with LeaseKeeper(self.leases, lease) as keeper:
                outcome = self._process_leased(stream_id, lease, keeper)
                metrics.BATCHES.labels(outcome=outcome.status).inc()
                deadline = time.monotonic() + time_slice_s
                while outcome.status == "applied" and outcome.more \
                        and time.monotonic() < deadline:
                    following = self._process_leased(stream_id, lease, keeper)
                    metrics.BATCHES.labels(outcome=following.status).inc()
                    outcome = outcome.then(following)
        except LeaseLostError as exc:
            outcome = Outcome(stream_id, "lost", reason=str(exc))
            metrics.BATCHES.labels(outcome=outcome.status).inc()
        finally:
            self._release(lease)
        if outcome.status == "applied":
            metrics.note_active_stream(stream_id)
        return outcome

    def _acquire(self, stream_id: str, holder: str | None = None) -> Lease | Outcome:
        """The stream's lease (``holder`` defaults to this worker's id), or why not: "failed"
        (parked) or "busy" (leased elsewhere). Never waits. Shared with workers/multistream.py.
        """
        if self.store.failure(stream_id) is not None:
            return Outcome(stream_id, "failed", reason="stream is marked failed")
        self._release_unreleased(stream_id)
        lease = self.leases.acquire(stream_id, holder or self.worker_id,
                                    self.settings.lease_seconds)
        if lease is None:
            return Outcome(stream_id, "busy")
        if lease.took_over:
            metrics.LEASES_TAKEN_OVER.inc()
            log.info("stream %s: took over from %s", stream_id, lease.previous_holder)
        return lease

    def _release(self, lease: Lease) -> None:
        """Release, or remember the lease if Redis is unreachable (never masks the error that
        is already propagating: a failed release only delays the stream until the next try)."""
        try:
            self.leases.release(lease)
        except TRANSIENT_ERRORS as exc:
            log.debug("stream %s: lease release failed (%s); retried later",
                      lease.stream_id, exc)
            if len(self._unreleased) < self.settings.max_streams_per_worker:
                self._unreleased[lease.stream_id] = lease

    def _release_unreleased(self, stream_id: str) -> None:
        stale = self._unreleased.pop(stream_id, None)
        if stale is not None:
            self._release(stale)

    def _process_leased(self, stream_id: str, lease: Lease, keeper: LeaseKeeper) -> Outcome:
        began = self._begin(stream_id)
        if isinstance(began, Outcome):
            return began
        loaded, batch, load_s = began
        started = time.perf_counter()
        new_state = self.engine.feed(loaded.state, batch.tokens) if batch.tokens else loaded.state
        feed_s = time.perf_counter() - started
        if batch.tokens:
            metrics.FEED_SECONDS.labels(**self._labels).observe(feed_s)
        return self._finish(stream_id, lease, keeper, loaded, batch, new_state, load_s, feed_s)

    def _begin(self, stream_id: str) -> tuple[_Loaded, _Batch, float] | Outcome:
        """The steps before the feed: the committed state and the next batch after it, with
        the load time; or the outcome when there is nothing to feed ("idle", "failed").
        Shared with workers/multistream.py, which feeds several streams' batches at once."""
        started = time.perf_counter()
        try:
            loaded = self._load(stream_id)
        except (StateError, StateReadError, EngineError) as exc:
            return self._fail(stream_id, str(exc))
        load_s = time.perf_counter() - started
        checkpoint("after_load")

        try:
            batch = self._read_batch(stream_id, loaded.last_entry_id,
                                     at_stream_start=loaded.state.tokens_seen == 0,
                                     token_cap=self._rolling_cap(loaded.state.tokens_seen))
        except redis.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            # anyone can write the input key: a non-stream there parks this stream only
            return self._fail(stream_id, f"stream {stream_id!r}: input key is not a stream "
                                         f"({exc})")
        if batch is None:
            return Outcome(stream_id, "idle", version=loaded.version, cache_hit=loaded.cache_hit)
        return loaded, batch, load_s

    def _finish(
        self, stream_id: str, lease: Lease, keeper: LeaseKeeper, loaded: _Loaded, batch: _Batch,
        new_state: EngineState, load_s: float, feed_s: float,
    ) -> Outcome:
        """The steps after the feed, under ``lease``: summaries, memory and the fenced
        commit. Shared with workers/multistream.py."""
        checkpoint("after_feed")
        keeper.check()

        head = read_head(self.client, stream_id) if self.keeps_memory else None
        turns = self._turns(loaded.state, new_state, batch) if head is not None else []
        moments = self._moments(head, turns)
        summaries = self._summaries(loaded.state, new_state, batch, head, moments)
        memory = self._memory_write(head, turns, summaries, moments)
        keeper.check()
        # deliberately after the last lease check: a paused worker that resumes here must be
        # stopped by the commit's fencing check, not by luck
        checkpoint("before_commit")

        started = time.perf_counter()
        try:
            version, nbytes = self._commit(stream_id, lease, loaded, new_state, batch, summaries,
                                           memory)
        except StaleCommitError as exc:
            self.cache.discard(stream_id)
            metrics.STALE_COMMITS.labels(reason=exc.reason or "stale").inc()
            log.warning("stream %s: commit refused (%s)", stream_id, exc)
            return Outcome(stream_id, "stale", reason=str(exc))
        save_s = time.perf_counter() - started

        self._count(batch, nbytes)
        return Outcome(
            stream_id, "applied", entries=len(batch.entries) + len(batch.rejected),
            tokens=len(batch.tokens), dead_letters=len(batch.rejected), more=batch.more,
            version=version, summaries=summaries, load_s=load_s, feed_s=feed_s, save_s=save_s,
            cache_hit=loaded.cache_hit,
        )

    # ----- steps -------------------------------------------------------------------------------
    def _load(self, stream_id: str) -> _Loaded:
        """The committed state: from the hot cache when its version is current, else Redis.

        Either layout loads, whatever ``state_layout`` says (the header tells), so switching
        layouts needs no migration: the next commit writes the configured one.
        """
        head = self.store.head(stream_id)  # version + segment names: one HMGET
        version = head.version
        cached = self.cache.get(stream_id, version)
        if cached is not None:
            metrics.HOT_CACHE_HITS.inc()
            return _Loaded(cached[0], version, cached[1], cache_hit=True,
                           segments=head.segment_ids)
        if version == 0:  # a new stream: nothing to load, neither a hit nor a miss
            return _Loaded(self.engine.new_state(), 0, None, cache_hit=False)
        metrics.HOT_CACHE_MISSES.inc()
        started = time.perf_counter()
        stored = self.store.load(stream_id, head)  # hash + segments: one round trip
        if stored is None:
            return _Loaded(self.engine.new_state(), 0, None, cache_hit=False)
        state = self._decode(stream_id, stored)
        metrics.STATE_LOAD_BYTES.observe(
            len(stored.data) + sum(len(b) for b in stored.segments.values()))
        metrics.STATE_LOAD_SECONDS.observe(time.perf_counter() - started)
        return _Loaded(state, stored.version, stored.last_entry_id, cache_hit=False,
                       segments=sorted(stored.segments))

    def _decode(self, stream_id: str, stored: StoredState) -> EngineState:
        """A stored state of either layout as an engine state; refuses foreign or damaged
        states (and segments) by name."""
        envelope = decode_state(
            stored.data, stream_id=stream_id, max_bytes=self.settings.max_state_bytes
        )
        check_compatible(
            envelope, self.engine.kind, self.engine.fingerprint, self.engine.params,
            stream_id=stream_id,
        )
        if not sinkkv_segments.is_segmented(envelope):
            if stored.segments:
                raise StateReadError(f"stream {stream_id!r}: a whole state with "
                                     f"{len(stored.segments)} segment keys")
            return self.engine.import_state(envelope.snapshot)
        if not sinkkv_segments.supports(self.engine):
            raise StateReadError(f"stream {stream_id!r}: segmented state, engine "
                                 f"{self.engine.kind} cannot read it")
        return sinkkv_segments.decode(
            self.engine, envelope, stored.segments,  # type: ignore[arg-type]
            stream_id=stream_id, max_bytes=self.settings.max_state_bytes,
        )

    def _encode(
        self, loaded: _Loaded, new_state: EngineState, last_entry_id: str
    ) -> tuple[bytes, SegmentUpdate | None]:
        """The bytes a commit writes: the whole envelope, or (``state_layout = "segments"``,
        sink-KV) the header plus the segments not stored yet."""
        if self.settings.state_layout == "segments" and sinkkv_segments.supports(self.engine):
            return sinkkv_segments.encode(
                self.engine, new_state, loaded.segments, last_entry_id,  # type: ignore[arg-type]
                max_bytes=self.settings.max_state_bytes,
            )
        return encode_state(
            StateEnvelope(
                engine=self.engine.kind, fingerprint=self.engine.fingerprint,
                params=self.engine.params, tokens_seen=new_state.tokens_seen,
                last_entry_id=last_entry_id, snapshot=self.engine.export_state(new_state),
            ),
            max_bytes=self.settings.max_state_bytes,
        ), None

    def _read_batch(
        self, stream_id: str, after: str | None, at_stream_start: bool,
        token_cap: int | None = None,
    ) -> _Batch | None:
        """Entries after the committed id, bounded by entry count and token budget.

        A batch stops right after an end-of-stream entry so the final summary covers exactly
        the stream up to its end. ``token_cap`` lowers the token budget (see ``_rolling_cap``).
        """
        limit = self.settings.max_batch_entries
        raw: Any = self.client.xrange(
            StreamKeys.of(stream_id).input, min=f"({after}" if after else "-", count=limit + 1
        )
        if not raw:
            return None
        entries: list[InputEntry] = []
        rejected: list[Rejected] = []
        tokens: list[int] = []
        counts: list[int] = []
        used = 0
        eos = False
        # the stream prefix (added below) counts against the batch's token budget too
        budget = self.settings.max_batch_tokens - (
            len(self.engine.stream_prefix()) if at_stream_start else 0)
        if token_cap is not None:
            budget = min(budget, token_cap)
        for entry_id, fields in raw[:limit]:
            parsed = parse_entry(entry_id, fields, max_text_bytes=self.settings.max_entry_bytes)
            if isinstance(parsed, Rejected):
                rejected.append(parsed)
                used += 1
                continue
            ids = turn_tokens(self.engine, parsed)
            if entries and len(tokens) + len(ids) > budget:
                break
            entries.append(parsed)
            tokens.extend(ids)
            counts.append(len(ids))
            used += 1
            if parsed.eos:
                eos = True
                break
        if at_stream_start and entries:
            tokens = self.engine.stream_prefix() + tokens  # same as entry_tokens()
        last_id = raw[used - 1][0]
        return _Batch(
            entries, rejected, tokens, last_id.decode() if isinstance(last_id, bytes) else last_id,
            eos, more=len(raw) > used, counts=counts,
        )

    def _rolling_cap(self, tokens_seen: int) -> int | None:
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

    def _summaries(
        self, before: EngineState, after: EngineState, batch: _Batch,
        head: MemoryHead | None = None, moments: Sequence[Moment] | None = None,
    ) -> list[OutputEntry]:
        notes = self._notes(head)
        if batch.eos:
            return [self.summarize(after, SummaryKind.FINAL, batch.last_id, notes=notes,
                                   moments=moments or ())]
        if rolling_summary_due(
            before.tokens_seen, after.tokens_seen,
            self.settings.rolling_every_tokens,
        ):
            return [self.summarize(after, SummaryKind.ROLLING, batch.last_id, notes=notes)]
        return []

    def _notes(self, head: MemoryHead | None) -> str | None:
        """The previous summary to fold in, when summary memory is on and there is one."""
        if not self.settings.summary_memory or head is None or head.summary is None:
            return None
        return head.summary.text or None

    def summarize(
        self, state: EngineState, kind: SummaryKind, covers: str, instruction: str | None = None,
        request: str = "", notes: str | None = None, moments: Sequence[Moment] = (),
    ) -> OutputEntry:
        """Generate from a copy of ``state`` (engines never mutate it).

        ``notes``: the previous summary (summary memory), folded in. A final summary is
        meeting notes in sections, each generated with its own short prompt (``SECTIONS``),
        then the stream's key ``moments`` verbatim (extractive, so they cannot drift).
        """
        if instruction is None and kind is SummaryKind.FINAL:
            key_lines = [m.spoken() for m in moments]
            text = format_notes([(section, self._section(state, section, notes, key_lines))
                                 for section in SECTIONS])
            if moments:
                text += "\n\n## Key moments\n" + "\n".join(m.line() for m in moments)
        else:
            text = self._generate(
                state, self.engine.summary_prompt(instruction or rolling_instruction(notes)),
                self.settings.summary_max_new_tokens, kind)
        return make_output(
            kind, text, covers, state.tokens_seen, self.engine.model_name, request,
        )

    def _section(self, state: EngineState, section: Section, notes: str | None,
                 key_lines: Sequence[str] = ()) -> str:
        lead = self.engine.tokenizer.encode(section.lead) if section.lead else []
        prompt = self.engine.summary_prompt(section_instruction(section, notes, key_lines)) \
            + lead
        budget = self.settings.summary_max_new_tokens if not section.bullets \
            else max(16, self.settings.summary_max_new_tokens // 2)
        return tidy_section(section, self._generate(state, prompt, budget, SummaryKind.FINAL))

    def _generate(
        self, state: EngineState, prompt: list[int], max_new_tokens: int, kind: SummaryKind,
        extra_capacity: int | None = None,
    ) -> str:
        """The one place that runs the model for text: model output only ever becomes the
        ``text`` of an output entry (and, through summary memory, a later prompt's notes).

        By default the prompt and the answer get room of their own beside the window
        (``extra_capacity``, up to the model's position limit), so a long prompt, such as
        notes carrying the summary memory and key moments, never evicts the end of the
        conversation it asks about.
        """
        if extra_capacity is None:
            extra_capacity = min(self._room(state, prompt, max_new_tokens),
                                 self.engine.max_extra_capacity())
        started = time.perf_counter()
        sampling = ANSWER_SAMPLING if kind is SummaryKind.ANSWER else SUMMARY_SAMPLING
        ids = self.engine.generate(state, prompt, max_new_tokens, sampling,
                                   extra_capacity=extra_capacity)
        labels = {**self._labels, "kind": kind.value}
        metrics.SUMMARY_SECONDS.labels(**labels).observe(time.perf_counter() - started)
        metrics.SUMMARY_TOKENS.labels(**labels).inc(len(ids))
        return str(self.engine.tokenizer.decode(ids))

    @staticmethod
    def _room(state: EngineState, prompt: Sequence[int], max_new_tokens: int) -> int:
        """Slots a generation needs beside the window: the state's pending tokens, the
        prompt and the answer."""
        return len(state.pending) + len(prompt) + max_new_tokens

    # ----- whole-stream memory ------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder | None:
        """The embedding model when ``retrieval = "embedding"`` and it can load (else BM25)."""
        if self.settings.retrieval != "embedding":
            return None
        return get_embedder(self.settings.embedding_model)

    def _moments(self, head: MemoryHead | None, turns: Sequence[Turn]) -> list[Moment] | None:
        """The key moments after this batch (None: not kept)."""
        if head is None or not self.settings.summary_memory or self.settings.key_moments == 0:
            return None
        return highlights.fold(head.moments, turns, self.settings.key_moments)

    def _memory_write(
        self, head: MemoryHead | None, turns: Sequence[Turn], summaries: Sequence[OutputEntry],
        moments: Sequence[Moment] | None,
    ) -> MemoryWrite | None:
        """What this batch changes in the stream's memory, committed with the batch."""
        if head is None:
            return None
        summary = None
        if self.settings.summary_memory and summaries and summaries[-1].text:
            last = summaries[-1]
            summary = SummaryMemory(last.text, last.covers, last.tokens_seen)
        retrieval = self.settings.retrieval != "off"
        return plan_write(
            head, turns if retrieval else [],
            chunk_tokens=self.settings.memory_chunk_tokens if retrieval else None,
            max_chunks=self.settings.memory_max_chunks, embedder=self.embedder,
            summary=summary, moments=moments,
        )

    def _turns(self, before: EngineState, after: EngineState, batch: _Batch) -> list[Turn]:
        """The batch's entries with their token positions in the stream."""
        pos = before.tokens_seen
        if before.tokens_seen == 0 and batch.entries:
            pos += len(self.engine.stream_prefix())
        turns = []
        for entry, n in zip(batch.entries, batch.counts, strict=True):
            line = format_turn(entry.text, entry.speaker) if entry.text else ""
            turns.append(Turn(entry.id, line, entry.speaker, entry.ts, pos, pos + n))
            pos += n
        if pos != after.tokens_seen:  # would misplace chunks against the window
            raise RuntimeError(f"memory positions disagree with the state: {pos} vs "
                               f"{after.tokens_seen} tokens")
        return turns

    def answer(self, stream_id: str, question: str, request: str = "") -> OutputEntry:
        """Answer ``question`` from the committed state, plus the most relevant text that left
        the window (``retrieval``): the retrieved chunks' lines that best match the question,
        placed in a temporary context after the window.

        Read-only: needs no lease. The output's ``sources`` cite the retrieved chunks, one
        of them with the line that best matches the question (``Source.quote``).
        """
        state, covers = self.committed_state(stream_id)
        notes = self._notes(read_head(self.client, stream_id)) \
            if self.settings.summary_memory else None
        hits: list[retrieve.Hit] = []
        pervasive: frozenset[str] = frozenset()
        if self.settings.retrieval != "off":
            candidates = retrieve.evicted(read_chunks(self.client, stream_id),
                                          state.tokens_seen, self.engine.window_tokens())
            hits = retrieve.rank(question, candidates, top_k=self.settings.retrieval_top_k,
                                 embedder=self.embedder)
            pervasive = retrieve.pervasive_words(candidates)
        max_new = self.settings.summary_max_new_tokens
        limit = self.engine.max_extra_capacity()
        while True:
            lines = retrieve.relevant_lines(question, hits, pervasive=pervasive)
            instruction = answer_with_context_instruction(
                question, context_block(lines) if lines else "", notes)
            prompt = self.engine.summary_prompt(instruction)
            if self._room(state, prompt, max_new) <= limit or not hits:
                break
            hits = sorted(hits, key=lambda h: -h.score)[:-1]  # drop the least relevant
        text = short_answer(self._generate(state, prompt, max_new, SummaryKind.ANSWER))
        quoted = retrieve.quote(question, hits, pervasive=pervasive)
        sources = [Source((h.chunk.first_id, h.chunk.last_id), h.chunk.speakers, h.chunk.ts,
                          h.score, quoted[1] if quoted is not None and quoted[0] is h else "")
                   for h in sorted(hits, key=lambda h: h.chunk.seq)]  # in the order said
        return make_output(SummaryKind.ANSWER, text, covers or "0-0", state.tokens_seen,
                           self.engine.model_name, request, sources)

    def summary_now(self, stream_id: str, request: str = "") -> OutputEntry:
        """An on-demand summary of the committed state, folding in the summary memory."""
        state, covers = self.committed_state(stream_id)
        notes = self._notes(read_head(self.client, stream_id)) \
            if self.settings.summary_memory else None
        return self.summarize(state, SummaryKind.ON_DEMAND, covers or "0-0", request=request,
                              notes=notes)

    def _commit(
        self, stream_id: str, lease: Lease, loaded: _Loaded, new_state: EngineState,
        batch: _Batch, summaries: Sequence[OutputEntry], memory: MemoryWrite | None = None,
    ) -> tuple[int, int]:
        started = time.perf_counter()
        payload: bytes | None = None
        segments: SegmentUpdate | None = None
        if batch.tokens or loaded.version == 0:
            payload, segments = self._encode(loaded, new_state, batch.last_id)
        tokens_total = new_state.tokens_seen
        meta: dict[str, str | int | float] = {"tokens_seen": tokens_total,
                                              "worker": self.worker_id}
        if summaries:
            meta["last_summary_ts"] = summaries[-1].ts
        if batch.eos:
            meta["ended"] = 1
        result = self.store.commit(
            stream_id, lease.token, loaded.version, payload, batch.last_id,
            extra_fields={"state_nbytes": self.engine.state_nbytes(new_state),
                          "tokens_seen": tokens_total},
            meta_fields=meta,
            outputs=[s.fields() for s in summaries],
            dead_letters=[_dead_letter(r) for r in batch.rejected],
            summary=summaries[-1].fields() if summaries else None,
            trim_input=self.settings.trim_applied_input,
            output_maxlen=OUTPUT_MAXLEN,
            hash_updates=[HashUpdate(StreamKeys.of(stream_id).memory, memory.set, memory.delete)]
            if memory else (),
            segments=segments,
        )
        self.cache.put(stream_id, result.version, (new_state, batch.last_id),
                       self.engine.state_nbytes(new_state))
        metrics.HOT_CACHE_BYTES.set(self.cache.nbytes)
        written = len(payload or b"") + result.segment_bytes
        if payload is not None:
            metrics.STATE_SAVE_BYTES.observe(written)
            metrics.STATE_SIZE.labels(**self._labels).set(
                len(payload) if segments is None else self.engine.state_nbytes(new_state))
        metrics.STATE_SAVE_SECONDS.observe(time.perf_counter() - started)
        return result.version, written

    def _fail(self, stream_id: str, reason: str) -> Outcome:
        """Park a stream whose state cannot be used; the others carry on."""
        log.error("stream %s: marked failed: %s", stream_id, reason)
        self.store.mark_failed(stream_id, reason)
        self.cache.discard(stream_id)
        metrics.STREAM_FAILURES.labels(reason=metrics.reason_label(reason)).inc()
        return Outcome(stream_id, "failed", reason=reason)

    def _count(self, batch: _Batch, nbytes: int) -> None:
        metrics.TOKENS_FED.labels(**self._labels).inc(len(batch.tokens))
        metrics.ENTRIES_APPLIED.labels(**self._labels).inc(len(batch.entries))
        for rejected in batch.rejected:
            metrics.DEAD_LETTERS.labels(reason=metrics.reason_label(rejected.reason)).inc()

    # ----- read-only helpers for on-demand summaries and answers ---------------------------------
    def committed_state(self, stream_id: str) -> tuple[EngineState, str | None]:
        """The latest committed state (no lease needed: it is only read, never written)."""
        loaded = self._load(stream_id)
        return loaded.state, loaded.last_entry_id


def turn_tokens(engine: Engine[Any], entry: InputEntry) -> list[int]:
    """One entry as the model reads it: a ``Speaker: text`` line."""
    return engine.tokenizer.encode(format_turn(entry.text, entry.speaker)) if entry.text else []


def entry_tokens(
    engine: Engine[Any], entries: Sequence[InputEntry], at_stream_start: bool
) -> list[int]:
    """The tokens a run of entries feeds, after the stream's prefix at its very start.

    Every worker (and every test reference) tokenizes exactly like this, which is what makes
    replays bit-identical.
    """
    tokens = engine.stream_prefix() if at_stream_start and entries else []
    for entry in entries:
        tokens.extend(turn_tokens(engine, entry))
    return tokens


def _dead_letter(rejected: Rejected) -> dict[str, str]:
    """The rejected entry's id, reason and (bounded) fields: at most DEAD_LETTER_MAX_FIELDS
    fields, names and values cut, so no input can make the commit itself fail."""
    items = list(rejected.fields.items())
    fields = {f"field:{_cut(k, DEAD_LETTER_NAME_BYTES)}": _cut(v)
              for k, v in items[:DEAD_LETTER_MAX_FIELDS]}
    out = {"entry_id": rejected.id, "reason": rejected.reason, "ts": f"{time.time():.3f}",
           **fields}
    if len(items) > DEAD_LETTER_MAX_FIELDS:
        out["fields_cut"] = str(len(items) - DEAD_LETTER_MAX_FIELDS)
    return out


def _cut(value: str, limit: int = DEAD_LETTER_FIELD_BYTES) -> str:
    data = value.encode("utf-8", "replace")
    if len(data) <= limit:
        return value
    head = data[:limit].decode("utf-8", "ignore")
    return f"{head}... [{len(data) - limit} more bytes cut]"
