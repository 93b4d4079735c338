"""Celery tasks: thin wrappers that hand one stream's batch to the StreamProcessor."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from monitoring.metrics import start_metrics_server
from workers.app import QUEUE, app
from workers.runtime import Runtime, get_runtime
from workers.scheduling import Dispatcher
from workers.summaries import SummaryKind, answer_instruction

log = logging.getLogger(__name__)


def enqueue(stream_id: str) -> None:
    process_stream.apply_async(args=[stream_id], queue=QUEUE)


def runtime() -> Runtime:
    return get_runtime(enqueue)


@app.task(name="sinkstream.process_stream", ignore_result=True)
def process_stream(stream_id: str) -> dict[str, Any]:
    """Apply the next batch of one stream, then continue or hand the stream back."""
    rt = runtime()
    rt.scheduler.refresh(stream_id)
    outcome = rt.processor.process(stream_id)
    if outcome.status == "applied":
        log.info("stream %s: %d entries, %d tokens, v%d (feed %.3fs, load %.3fs%s, save %.3fs)",
                 stream_id, outcome.entries, outcome.tokens, outcome.version, outcome.feed_s,
                 outcome.load_s, " hot" if outcome.cache_hit else "", outcome.save_s)
    elif outcome.status in ("failed", "stale", "lost"):
        log.warning("stream %s: %s %s", stream_id, outcome.status, outcome.reason)
    # busy: another worker holds the lease and will continue the stream itself.
    rt.scheduler.after_batch(stream_id, outcome.more and outcome.status == "applied")
    return {"status": outcome.status, "entries": outcome.entries, "tokens": outcome.tokens}


@app.task(name="sinkstream.summarize", ignore_result=True)
def summarize(stream_id: str, request: str, question: str = "") -> None:
    """On-demand summary or answer from the committed state, appended to the output stream."""
    rt = runtime()
    state, covers = rt.processor.committed_state(stream_id)
    kind = SummaryKind.ANSWER if question else SummaryKind.ON_DEMAND
    entry = rt.processor.summarize(
        state, kind, covers or "0-0", answer_instruction(question) if question else None,
        request=request,
    )
    from state_store.keys import StreamKeys

    fields: Any = entry.fields()
    rt.client.xadd(StreamKeys.of(stream_id).output, fields, maxlen=10_000,
                   approximate=True)


_dispatcher: Dispatcher | None = None


@signals.worker_ready.connect
def _start_background(sender: Any = None, **_: Any) -> None:
    """Metrics endpoint, model warm-up and the dispatcher, once the worker is up.

    The model is warmed up here only for the solo pool (tasks run in this very process); with
    a forking pool this is the parent, which must not touch CUDA, so children load lazily.
    """
    global _dispatcher
    rt = runtime()
    start_metrics_server(rt.settings.metrics_host, rt.settings.metrics_port)
    pool = getattr(sender, "pool", None)
    if pool is not None and "solo" in type(pool).__module__:
        rt.engine  # noqa: B018 - load the model before the first task, not during it
    _dispatcher = Dispatcher(rt.client, rt.scheduler, rt.settings.dispatch_interval_seconds,
                             rt.settings.discover_interval_seconds).start()


@signals.worker_shutting_down.connect
def _stop_background(**_: Any) -> None:
    if _dispatcher is not None:
        _dispatcher.stop()
