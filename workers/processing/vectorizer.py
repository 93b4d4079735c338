"""Embeds the chunks that commits closed, in a background thread, off the feed path.

A commit hands the chunks it closed to ``submit`` and moves on; this thread takes up to
``batch_chunks`` of them across streams, reads their texts (one pipelined round trip), embeds
them in one forward of the embedding model and writes the vectors (``workers.memory.vectors``:
once, and only beside chunks that still exist). On a GPU worker it runs on the CPU beside the
model; on a CPU worker it takes a core the single-threaded feed leaves free.

Bounded: at most ``max_streams`` streams wait (more are dropped with a warning, and their
chunks are embedded by the first question that needs them). Nothing here is needed for
correctness: a worker that dies with chunks queued loses only time, never a chunk.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

import redis

from workers.memory import vectors
from workers.memory.embedder import Embedder
from workers.memory.records import ChunkVector

log = logging.getLogger(__name__)

#: after a Redis error the thread waits this long (doubling) before trying the same chunks
#: again, at most this many times; then they are left for questions to embed
_RETRY_S = 0.5
_RETRIES = 4


class Vectorizer:
    """A bounded queue of ``(stream, chunk seqs)`` and the thread that embeds them."""

    def __init__(
        self, client: redis.Redis, embedder: Embedder, *, max_streams: int = 1024,
        batch_chunks: int = 64,
        on_written: Callable[[int, float, int], None] | None = None,
    ) -> None:
        self.client = client
        self.embedder = embedder
        self.max_streams = max_streams
        self.batch_chunks = batch_chunks
        #: called with (vectors written, seconds taken, chunks still queued) after each batch
        self.on_written = on_written
        self._queue: dict[str, list[int]] = {}
        self._failures = 0
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._dropped_warned = False

    # ----- producers' side --------------------------------------------------------------------
    def submit(self, stream_id: str, seqs: Sequence[int]) -> None:
        """Queue ``seqs`` of ``stream_id`` for embedding; never blocks."""
        if not seqs:
            return
        with self._cond:
            if stream_id not in self._queue and len(self._queue) >= self.max_streams:
                if not self._dropped_warned:
                    self._dropped_warned = True
                    log.warning("vectorizer: %d streams already wait; chunks of %s are left "
                                "for questions to embed", self.max_streams, stream_id)
                return
            pending = self._queue.setdefault(stream_id, [])
            pending.extend(s for s in seqs if s not in pending)
            self._start_locked()
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return sum(len(s) for s in self._queue.values())

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued chunk is embedded (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ----- the thread -------------------------------------------------------------------------
    def _start_locked(self) -> None:
        if self._thread is None and not self._stop:
            self._thread = threading.Thread(target=self._run, name="sinkstream-vectorizer",
                                             daemon=True)
            self._thread.start()

    def _take(self) -> dict[str, list[int]] | None:
        """Up to ``batch_chunks`` queued chunks, oldest streams first; None when stopping."""
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            taken: dict[str, list[int]] = {}
            room = self.batch_chunks
            for stream_id in list(self._queue):
                if room <= 0:
                    break
                seqs = self._queue[stream_id]
                taken[stream_id], rest = seqs[:room], seqs[room:]
                room -= len(taken[stream_id])
                if rest:
                    self._queue[stream_id] = rest
                else:
                    del self._queue[stream_id]
            self._busy = True
            return taken

    def _done(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _requeue(self, taken: dict[str, list[int]]) -> None:
        with self._cond:
            for stream_id, seqs in taken.items():
                pending = self._queue.setdefault(stream_id, [])
                pending[:0] = [s for s in seqs if s not in pending]

    def _run(self) -> None:
        _lower_priority()
        while (taken := self._take()) is not None:
            try:
                self._embed(taken)
                self._failures = 0
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._failures += 1
                if self._failures > _RETRIES:
                    log.warning("vectorizer: Redis unavailable (%s); %d streams' chunks are "
                                "left for questions to embed", exc, len(taken))
                    self._failures = 0
                    continue
                delay = _RETRY_S * 2 ** (self._failures - 1)
                log.warning("vectorizer: Redis unavailable (%s); retrying in %.1fs", exc, delay)
                self._requeue(taken)
                time.sleep(delay)
            except Exception:
                log.exception("vectorizer: embedding failed; those chunks are left for "
                              "questions to embed")
            finally:
                self._done()

    def _embed(self, taken: dict[str, list[int]]) -> None:
        started = time.perf_counter()
        texts = {sid: vectors.read_texts(self.client, sid, seqs) for sid, seqs in taken.items()}
        flat = {(sid, seq): text for sid, by_seq in texts.items() for seq, text in by_seq.items()}
        if not flat:
            return
        keys = list(flat)
        made = vectors.embed(self.embedder, {i: flat[k] for i, k in enumerate(keys)})
        by_stream: dict[str, dict[int, ChunkVector]] = {}
        for i, (sid, seq) in enumerate(keys):
            by_stream.setdefault(sid, {})[seq] = made[i]
        written = vectors.store(self.client, by_stream)
        if self.on_written is not None:
            self.on_written(written, time.perf_counter() - started, self.pending())


#: niceness of the vectorizer thread: the feed of the worker's task wins a contended core
_NICENESS = 10


def _lower_priority() -> None:
    """Make this thread yield to the model's feed when both want a core (Linux: a thread's
    priority is set through its own id; elsewhere, or without permission, nothing changes)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICENESS)
    except (AttributeError, OSError) as exc:
        log.debug("vectorizer: priority unchanged (%s)", exc)
