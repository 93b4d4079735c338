"""Worker metrics recorded around the steps of a batch, not inside them.

The batch code (``workers/processing``) reports what each step did to one observer
(``workers.processing.observer.BatchObserver``); this is the Prometheus one. Keeping the
metric calls here leaves the batch code a readable list of steps, and lets a test or a
benchmark plug in its own observer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from monitoring import metrics


class BatchMetrics:
    """Records a worker's batches in the ``sinkstream_*`` series (``monitoring.metrics``)."""

    def __init__(self, engine: str, model: str, device: str = "cpu", dtype: str = "",
                 threads: int = 0) -> None:
        self.labels = {"engine": engine, "model": model}
        metrics.init_worker(engine, model, device=device, dtype=dtype, threads=threads)

    @classmethod
    def of_engine(cls, engine: Any, device: str, dtype: str, threads: int = 0) -> BatchMetrics:
        """Labelled with ``engine``'s kind, model and the dtype it computes in (a ``dtype``
        setting of "auto" names none): sink-KV engines call it ``compute_dtype``, RWKV
        engines ``dtype``; ``threads``: the process's torch threads, where the caller knows."""
        computes = getattr(engine, "compute_dtype", None) or getattr(engine, "dtype", None) \
            or dtype
        return cls(engine.kind, engine.model_name, device, str(computes).removeprefix("torch."),
                   threads)

    def batch_done(self, stream_id: str, status: str) -> None:
        metrics.BATCHES.labels(outcome=status).inc()
        if status == "applied":
            metrics.note_active_stream(stream_id)

    def lease_taken_over(self) -> None:
        metrics.LEASES_TAKEN_OVER.inc()

    def state_loaded(self, hit: bool, nbytes: int = 0, seconds: float = 0.0) -> None:
        """A state came from the hot cache (``hit``) or was downloaded and decoded."""
        if hit:
            metrics.HOT_CACHE_HITS.inc()
            return
        metrics.HOT_CACHE_MISSES.inc()
        metrics.STATE_LOAD_BYTES.observe(nbytes)
        metrics.STATE_LOAD_SECONDS.observe(seconds)

    def fed(self, tokens: int, seconds: float) -> None:
        if tokens:
            metrics.FEED_SECONDS.labels(**self.labels).observe(seconds)

    def generated(self, kind: str, tokens: int, seconds: float) -> None:
        labels = {**self.labels, "kind": kind}
        metrics.SUMMARY_SECONDS.labels(**labels).observe(seconds)
        metrics.SUMMARY_TOKENS.labels(**labels).inc(tokens)

    def committed(self, tokens: int, entries: int, dead_letter_reasons: Sequence[str],
                  written: int, state_size: int | None, seconds: float) -> None:
        """A batch's commit: what it applied and dead-lettered, the state bytes it wrote
        (``state_size`` None: the state was kept as it was)."""
        metrics.TOKENS_FED.labels(**self.labels).inc(tokens)
        metrics.ENTRIES_APPLIED.labels(**self.labels).inc(entries)
        for reason in dead_letter_reasons:
            metrics.DEAD_LETTERS.labels(reason=metrics.reason_label(reason)).inc()
        if state_size is not None:
            metrics.STATE_SAVE_BYTES.observe(written)
            metrics.STATE_SIZE.labels(**self.labels).set(state_size)
        metrics.STATE_SAVE_SECONDS.observe(seconds)

    def commit_refused(self, reason: str) -> None:
        metrics.STALE_COMMITS.labels(reason=reason).inc()

    def stream_failed(self, reason: str) -> None:
        metrics.STREAM_FAILURES.labels(reason=metrics.reason_label(reason)).inc()

    def vectors_written(self, count: int, seconds: float, pending: int) -> None:
        metrics.MEMORY_VECTORS.inc(count)
        metrics.MEMORY_VECTOR_SECONDS.observe(seconds)
        metrics.MEMORY_VECTORS_PENDING.set(pending)

    def guarded(self, verdicts: Sequence[Any]) -> None:
        """The guard's verdicts on generated sentences (``workers.notes.guard.Verdict``): one
        count per sentence, under its first unsupported kind of fact."""
        for verdict in verdicts:
            reason = verdict.reasons[0] if verdict.reasons else "none"
            metrics.GUARD_SENTENCES.labels(action=verdict.action, reason=reason).inc()

    def logs_committed(self, levels: Mapping[str, int], new_templates: int,
                       bursts: int) -> None:
        """A committed batch of log lines: lines per level, templates and bursts it found."""
        for level, count in levels.items():
            label = level if level in metrics.LOG_LEVELS else "none"
            metrics.LOG_LINES.labels(level=label).inc(count)
        if new_templates:
            metrics.LOG_TEMPLATES_NEW.inc(new_templates)
        if bursts:
            metrics.LOG_BURSTS.inc(bursts)

    def cache_changed(self, nbytes: int, limit: int) -> None:
        metrics.HOT_CACHE_BYTES.set(nbytes)
        metrics.HOT_CACHE_LIMIT.set(limit)
