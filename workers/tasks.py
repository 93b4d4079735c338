"""Celery tasks and worker signals: thin wrappers around the process's ``Runtime``.

``register`` binds the tasks to an app (``workers.app.create_app`` calls it), under fixed
names other processes send by name (``PROCESS_STREAM``, ``SUMMARIZE``), so nothing here
needs an app at import time.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from celery import Celery, signals
from kombu.exceptions import ChannelError

from monitoring import metrics
from monitoring.metrics import start_metrics_server
from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.tasks import PROCESS_STREAM, SUMMARIZE
from state_store.connection import TRANSIENT_ERRORS
from workers.processing.multistream import companion_holder
from workers.processing.outcome import Outcome
from workers.runtime import Runtime, get_runtime
from workers.scheduling.dispatcher import Dispatcher

log = logging.getLogger(__name__)

#: At most one WARNING per this many seconds about Redis being down (the rest at DEBUG).
_REDIS_DOWN_LOG_INTERVAL_S = 30.0
#: a task whose stream is held as a companion comes back after this long
_COMPANION_RETRY_S = 0.2
#: output streams are capped (approximately) at this many entries
_OUTPUT_MAXLEN = 10_000

_app: Celery | None = None
_queue = "sinkstream"
_redis_down_logged = 0.0
_dispatcher: Dispatcher | None = None


def register(app: Celery, queue: str) -> None:
    """Register the tasks on ``app``; tasks this process enqueues go to ``queue``."""
    global _app, _queue
    _app, _queue = app, queue
    app.task(name=PROCESS_STREAM, ignore_result=True)(process_stream)
    app.task(name=SUMMARIZE, ignore_result=True)(summarize)


def enqueue(stream_id: str, countdown: float | None = None) -> None:
    """Send a ``process_stream`` task for ``stream_id`` on this process's app."""
    if _app is None:
        raise RuntimeError("workers.tasks.register(app, queue) has not been called")
    _app.send_task(PROCESS_STREAM, args=[stream_id], queue=_queue, countdown=countdown)


def runtime() -> Runtime:
    return get_runtime(enqueue)


def process_stream(stream_id: str) -> dict[str, Any]:
    """Apply the next batch of one stream, then continue or hand the stream back."""
    rt = runtime()
    try:
        # the claim refreshed the stream's scheduled flag; its release settled it
        outcome = _process(rt, stream_id)
        _log_outcome(stream_id, outcome)
        if outcome.status == "busy" and companion_holder(rt.processor.leases.holder(stream_id)):
            # held for one batched round as another task's companion: that holder does not
            # continue the stream, so this task comes back shortly (the flag stays set)
            enqueue(stream_id, countdown=_COMPANION_RETRY_S)
        elif outcome.status == "busy":
            # another worker holds the lease and continues the stream itself
            rt.scheduler.after_busy(stream_id)
        elif outcome.reschedule:
            # input is left (the next batch waits its turn at the back of the queue), or
            # arrived while the batch ran
            enqueue(stream_id)
    except TRANSIENT_ERRORS as exc:
        # Redis went away mid-batch: nothing was committed (or the commit landed and its reply
        # was lost; the state says which). Hand the stream to the dispatcher, which re-enqueues
        # it as soon as Redis answers, with backoff; the Celery consumer reconnects on its own.
        _warn_redis_down(stream_id, exc)
        rt.scheduler.retry_later(stream_id)
        return {"status": "retry", "entries": 0, "tokens": 0}
    return {"status": outcome.status, "entries": outcome.entries, "tokens": outcome.tokens}


def _process(rt: Runtime, stream_id: str) -> Outcome:
    """The task's batches: of ``stream_id`` alone, or (``Runtime.batch_streams`` > 1) with
    companions claimed by ``workers/processing/multistream.py``; ``stream_id``'s outcome.
    Companions keep their own scheduling (their queued tasks or the dispatcher)."""
    if rt.batch_streams <= 1:
        return rt.processor.process(stream_id, rt.settings.batch_time_slice_seconds)
    outcomes = rt.multistream.process(stream_id, rt.settings.batch_time_slice_seconds)
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


def _warn_redis_down(stream_id: str, exc: BaseException) -> None:
    global _redis_down_logged
    now = time.monotonic()
    if now - _redis_down_logged >= _REDIS_DOWN_LOG_INTERVAL_S:
        _redis_down_logged = now
        log.warning("stream %s: Redis unavailable mid-batch (%s: %s); nothing committed, "
                    "re-scheduled once Redis is back", stream_id, type(exc).__name__, exc)
    else:
        log.debug("stream %s: Redis unavailable mid-batch (%s)", stream_id, exc)


def summarize(stream_id: str, request: str, question: str = "") -> None:
    """On-demand summary or answer from the committed state, appended to the output stream.

    An answer also draws on the stream's retrieval memory and cites it (``sources``).
    """
    rt = runtime()
    if question:
        entry = rt.processor.answer(stream_id, question, request=request)
    else:
        entry = rt.processor.summary_now(stream_id, request=request)
    fields: Any = entry.fields()
    rt.client.xadd(StreamKeys.of(stream_id).output, fields, maxlen=_OUTPUT_MAXLEN,
                   approximate=True)


@signals.task_postrun.connect
def _after_task(**_: Any) -> None:
    """Hand the memory the task freed back to the system (``workers/heap.py``), then hold the
    hot cache to what the worker's RSS growth leaves of the budget
    (``workers/memory_budget.py``), in the process that ran the task."""
    rt = runtime()
    rt.heap_trimmer.maybe_trim()
    budget = rt.memory_budget
    if budget is not None and budget.maybe_check():
        metrics.HOT_CACHE_LIMIT.set(budget.cache.limit_bytes)
        metrics.HOT_CACHE_BYTES.set(budget.cache.nbytes)
        metrics.RSS_GROWTH.set(budget.growth)


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
            rt.batch_streams  # noqa: B018  (the batch-invariance check, once, before ready)
            _warm_up_embedder(rt)
            # the models, modules and Celery's objects live as long as the process: out of
            # the collector's sight, a full collection no longer walks them mid-batch
            gc.collect()
            gc.freeze()
            budget = rt.memory_budget
            if budget is not None:
                rt.heap_trimmer.maybe_trim()  # start-up garbage goes before the baseline
                budget.start()
        # join the live workers: batching leaves each its share of the runnable streams
        rt.start_heartbeat(slots=max(1, int(getattr(pool, "limit", None) or 1)))
        # only now: an answering /metrics means "ready" (the demo and probes rely on it)
        start_metrics_server(rt.settings.metrics_host, rt.settings.metrics_port)
    except Exception:
        log.exception("worker start-up: metrics or model warm-up failed; scheduling anyway")
    finally:
        rt.scheduler.backlog = _queue_backlog
        rt.scheduler.max_backlog = rt.settings.max_queued_tasks
        _dispatcher = Dispatcher(rt.client, rt.scheduler, rt.settings.dispatch_interval_seconds,
                                 rt.settings.discover_interval_seconds,
                                 wake=rt.settings.dispatch_wake,
                                 keyspace_events=rt.settings.keyspace_events).start()


def _warm_up_embedder(rt: Runtime) -> None:
    """Load the retrieval embedding model now (``retrieval = "embedding"``), not when the
    first memory chunk of some stream closes: that load (1-2 s for MiniLM) would stall the
    vectorizer's first batch, or the first question. A failure is logged; whoever needs the
    model then loads it (or falls back to BM25) as before."""
    if rt.settings.retrieval != "embedding":
        return
    try:
        embedder = rt.processor.answers.embedder
        if embedder is not None:
            embedder.embed(["warm-up"])  # loads the weights and runs one forward
    except Exception:
        log.exception("worker start-up: loading the embedding model %s failed",
                      rt.settings.embedding_model)


def _queue_backlog() -> int:
    """Messages waiting in the task queue (any broker); 0 when the queue does not exist yet
    (the Redis transport has no queue while its list is empty)."""
    if _app is None:
        return 0
    try:
        with _app.pool.acquire(block=True) as conn:
            try:
                return int(conn.default_channel.queue_declare(queue=_queue, passive=True)
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
    heartbeat = runtime().heartbeat
    if heartbeat is not None:  # leave now: the other workers' shares grow at once
        heartbeat.stop()
