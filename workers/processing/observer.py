"""What the batch steps report, and to whom: metrics are an observer around the steps.

``monitoring.batch_metrics.BatchMetrics`` is the Prometheus observer every worker uses;
``NullObserver`` records nothing (benchmarks that time the steps themselves, unit tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from workers.notes.guard import Verdict


class BatchObserver(Protocol):
    def batch_done(self, stream_id: str, status: str) -> None: ...

    def lease_taken_over(self) -> None: ...

    def state_loaded(self, hit: bool, nbytes: int = 0, seconds: float = 0.0) -> None: ...

    def fed(self, tokens: int, seconds: float) -> None: ...

    def generated(self, kind: str, tokens: int, seconds: float) -> None: ...

    def committed(self, tokens: int, entries: int, dead_letter_reasons: Sequence[str],
                  written: int, state_size: int | None, seconds: float) -> None: ...

    def commit_refused(self, reason: str) -> None: ...

    def stream_failed(self, reason: str) -> None: ...

    def vectors_written(self, count: int, seconds: float, pending: int) -> None: ...

    def guarded(self, verdicts: Sequence[Verdict]) -> None: ...

    def cache_changed(self, nbytes: int, limit: int) -> None: ...

    def logs_committed(self, levels: Mapping[str, int], new_templates: int,
                       bursts: int) -> None: ...


class NullObserver:
    """Records nothing."""

    def batch_done(self, stream_id: str, status: str) -> None:
        pass

    def lease_taken_over(self) -> None:
        pass

    def state_loaded(self, hit: bool, nbytes: int = 0, seconds: float = 0.0) -> None:
        pass

    def fed(self, tokens: int, seconds: float) -> None:
        pass

    def generated(self, kind: str, tokens: int, seconds: float) -> None:
        pass

    def committed(self, tokens: int, entries: int, dead_letter_reasons: Sequence[str],
                  written: int, state_size: int | None, seconds: float) -> None:
        pass

    def commit_refused(self, reason: str) -> None:
        pass

    def stream_failed(self, reason: str) -> None:
        pass

    def vectors_written(self, count: int, seconds: float, pending: int) -> None:
        pass

    def guarded(self, verdicts: Sequence[Verdict]) -> None:
        pass

    def cache_changed(self, nbytes: int, limit: int) -> None:
        pass

    def logs_committed(self, levels: Mapping[str, int], new_templates: int,
                       bursts: int) -> None:
        pass
