"""Celery tasks: thin wrappers that hand one stream's batch to the StreamProcessor."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from celery import signals
from kombu.exceptions import ChannelError

from monitoring import metrics
from monitoring.metrics import start_metrics_server
from state_store.connection import TRANSIENT_ERRORS
from workers.app import QUEUE, app
from workers.heap import HeapTrimmer
from workers.memory_budget import RssBudget
from workers.multistream import MultiStreamProcessor, companion_holder
from workers.processor import Outcome
from workers.runtime import Runtime, get_runtime
from workers.scheduling import Dispatcher

log = logging.getLogger(__name__)


#: At most one WARNING per this many seconds about Redis being down (the rest at DEBUG).
_REDIS_DOWN_LOG_INTERVAL_S = 30.0
_redis_down_logged = 0.0


def _warn_redis_down(stream_id: str, exc: BaseException) -> None:
    global _redis_down_logged
    now = time.monotonic()
    if now - _redis_down_logged >= _REDIS_DOWN_LOG_INTERVAL_S:
        _redis_down_logged = now
        log.warning("stream %s: Redis unavailable mid-batch (%s: %s); nothing committed, "
                    "re-scheduled once Redis is back", stream_id, type(exc).__name__, exc)
    else:
        log.debug("stream %s: Redis unavailable mid-batch (%s)", stream_id, exc)


def enqueue(stream_id: str) -> None:
    process_stream.apply_async(args=[stream_id], queue=QUEUE)


def runtime() -> Runtime:
    return get_runtime(enqueue)


@app.task(name="sinkstream.process_stream", ignore_result=True)
def process_stream(stream_id: str) -> dict[str, Any]:
    """Apply the next batch of one stream, then continue or hand the stream back."""
    rt = runtime()
    try:
        rt.scheduler.refresh(stream_id)
        outcome = _process(rt, stream_id)
        _log_outcome(stream_id, outcome)
        if outcome.status == "busy" and companion_holder(rt.processor.leases.holder(stream_id)):
            # held for one batched round as another task's companion: that holder does not
            # continue the stream, so this task comes back shortly (the flag stays set)
            rt.scheduler.refresh(stream_id)
            process_stream.apply_async(args=[stream_id], queue=QUEUE,
                                       countdown=_COMPANION_RETRY_S)
        elif outcome.status == "busy":
            # another worker holds the lease and continues the stream itself
            rt.scheduler.after_busy(stream_id)
        else:
            rt.scheduler.after_batch(stream_id, outcome.more and outcome.status == "applied")
    except TRANSIENT_ERRORS as exc:
        # Redis went away mid-batch: nothing was committed (or the commit landed and its reply
        # was lost; the state says which). Hand the stream to the dispatcher, which re-enqueues
        # it as soon as Redis answers, with backoff; the Celery consumer reconnects on its own.
        _warn_redis_down(stream_id, exc)
        rt.scheduler.retry_later(stream_id)
        return {"status": "retry", "entries": 0, "tokens": 0}
    return {"status": outcome.status, "entries": outcome.entries, "tokens": outcome.tokens}


#: a task whose stream is held as a companion comes back after this long
_COMPANION_RETRY_S = 0.2
_multistream: MultiStreamProcessor | None = None


def _process(rt: Runtime, stream_id: str) -> Outcome:
    """The task's batches: of ``stream_id`` alone, or (``batch_streams`` > 1) together with
    companions claimed by ``workers/multistream.py``; returns ``stream_id``'s outcome.
    Companions keep their own scheduling (their queued tasks or the dispatcher)."""
    if rt.settings.batch_streams <= 1:
        return rt.processor.process(stream_id, rt.settings.batch_time_slice_seconds)
    global _multistream
    if _multistream is None:
        _multistream = MultiStreamProcessor(rt.processor, rt.settings.batch_streams,
                                            rt.settings.batch_tokens)
    outcomes = _multistream.process(stream_id, rt.settings.batch_time_slice_seconds)
    for companion in outcomes[1:]:
        _log_outcome(companion.stream_id, companion)
    return outcomes[0]


def _log_outcome(stream_id: str, outcome: Outcome) -> None:
    if outcome.status == "applied":
        log.info("stream %s: %d entries, %d tokens, v%d (feed %.3fs, load %.3fs%s, save %.3fs)",
                 stream_id, outcome.entries, outcome.tokens, outcome.version, outcome.feed_s,
                 outcome.load_s, " hot" if outcome.cache_hit else "", outcome.save_s)
    elif outcome.status in ("failed", "stale", "lost"):
        log.warning("stream %s: %s %s", stream_id, outcome.status, outcome.reason)


@app.task(name="sinkstream.summarize", ignore_result=True)
def summarize(stream_id: str, request: str, question: str = "") -> None:
    """On-demand summary or answer from the committed state, appended to the output stream.

    An answer also draws on the stream's retrieval memory and cites it (``sources``).
    """
    rt = runtime()
    if question:
        entry = rt.processor.answer(stream_id, question, request=request)
    else:
        entry = rt.processor.summary_now(stream_id, request=request)
    from sinkstream.contracts.keys import StreamKeys

    fields: Any = entry.fields()
    rt.client.xadd(StreamKeys.of(stream_id).output, fields, maxlen=10_000,
                   approximate=True)


_dispatcher: Dispatcher | None = None
_trimmer: HeapTrimmer | None = None
_budget: RssBudget | None = None


@signals.task_postrun.connect
def _after_task(**_: Any) -> None:
    """Hand the memory the task freed back to the system (``workers/heap.py``), then hold the
    hot cache to what the worker's RSS growth leaves of the budget
    (``workers/memory_budget.py``), in the process that ran the task."""
    rt = runtime()
    _heap_trimmer(rt).maybe_trim()
    budget = _memory_budget(rt)
    if budget is not None and budget.maybe_check():
        metrics.HOT_CACHE_LIMIT.set(budget.cache.limit_bytes)
        metrics.HOT_CACHE_BYTES.set(budget.cache.nbytes)
        metrics.RSS_GROWTH.set(budget.growth)


def _heap_trimmer(rt: Runtime) -> HeapTrimmer:
    global _trimmer
    if _trimmer is None:
        _trimmer = HeapTrimmer(rt.settings.heap_trim_seconds)
    return _trimmer


def _memory_budget(rt: Runtime) -> RssBudget | None:
    """The process's RSS budget (``hot_cache_bounds_rss``, CPU workers: on a GPU the cache
    holds device memory, which RSS does not show), made on first use: a forked pool child
    takes its baseline after its first task."""
    global _budget
    if _budget is None and rt.settings.hot_cache_bounds_rss and rt.settings.device == "cpu":
        _budget = RssBudget(rt.processor.cache, rt.settings.hot_cache_bytes)
    return _budget


@signals.worker_ready.connect
def _start_background(sender: Any = None, **_: Any) -> None:
    """Metrics endpoint, model warm-up and the dispatcher, once the worker is up.

    The models are warmed up here only for the solo pool (tasks run in this very process);
    with a forking pool this is the parent, which must not touch CUDA, so children load
    lazily.
    """
    global _dispatcher
    rt = runtime()
    try:
        pool = getattr(sender, "pool", None)
        if pool is not None and "solo" in type(pool).__module__:
            # load the model (and create its metric series at zero) before the first task
            rt.processor  # noqa: B018
            _warm_up_embedder(rt)
            # the models, modules and Celery's objects live as long as the process: out of
            # the collector's sight, a full collection no longer walks them mid-batch
            gc.collect()
            gc.freeze()
            budget = _memory_budget(rt)
            if budget is not None:
                _heap_trimmer(rt).maybe_trim()  # start-up garbage goes before the baseline
                budget.start()
        # only now: an answering /metrics means "ready" (the demo and probes rely on it)
        start_metrics_server(rt.settings.metrics_host, rt.settings.metrics_port)
    except Exception:
        log.exception("worker start-up: metrics or model warm-up failed; scheduling anyway")
    finally:
        rt.scheduler.backlog = _queue_backlog
        rt.scheduler.max_backlog = rt.settings.max_queued_tasks
        _dispatcher = Dispatcher(rt.client, rt.scheduler, rt.settings.dispatch_interval_seconds,
                                 rt.settings.discover_interval_seconds,
                                 wake=rt.settings.dispatch_wake).start()


def _warm_up_embedder(rt: Runtime) -> None:
    """Load the retrieval embedding model now (``retrieval = "embedding"``), not when the
    first memory chunk of some stream closes: that load (1-2 s for MiniLM) would stall that
    batch, and every stream waiting behind it, mid-stream. A failure is logged; the batch
    that needs the model then loads it (or falls back to BM25) as before."""
    if rt.settings.retrieval != "embedding":
        return
    try:
        embedder = rt.processor.embedder
        if embedder is not None:
            embedder.embed(["warm-up"])  # loads the weights and runs one forward
    except Exception:
        log.exception("worker start-up: loading the embedding model %s failed",
                      rt.settings.embedding_model)


def _queue_backlog() -> int:
    """Messages waiting in the task queue (any broker); 0 when the queue does not exist yet
    (the Redis transport has no queue while its list is empty)."""
    try:
        with app.pool.acquire(block=True) as conn:
            try:
                return int(conn.default_channel.queue_declare(queue=QUEUE, passive=True)
                           .message_count)
            except ChannelError:  # the Redis transport: an empty queue has no list key
                return 0
    except Exception as exc:  # broker unreachable: enqueue nothing new until it is back
        log.debug("dispatcher: cannot read the queue length (%s)", exc)
        return 1 << 62


@signals.worker_shutting_down.connect
def _stop_background(**_: Any) -> None:
    if _dispatcher is not None:
        _dispatcher.stop()
