"""Redis restarted mid-run (AOF, SIGKILL and SIGTERM), then unreachable for 30 s.

Committed state and published summaries survive; workers (Celery consumer, dispatcher thread,
tasks) and a producer process reconnect with backoff and resume on their own within seconds;
the producer's retries duplicate nothing; each process logs a bounded number of WARNING+
lines, not a flood.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.chaos.common import chaos_seed
from tests.integration.chaos.scenarios import redis_outages

RESTARTS = 2
OUTAGE_S = 30.0
#: WARNING+ records per process over the whole run (two restarts + a 30 s outage): a few per
#: outage from each of Celery's consumer, the dispatcher, the task, the producer's retries.
MAX_WARNING_LINES = 30


def test_redis_restarts_and_30s_outage_lose_nothing(tmp_path: Path) -> None:
    report = redis_outages(tmp_path, seed=chaos_seed(), restarts=RESTARTS, outage_s=OUTAGE_S)
    print(report.row(), report.notes)
    assert report.trials == RESTARTS + 1
    assert report.verdict.ok, report.verdict.describe()
    assert report.notes["workers alive"]
    # workers resumed on their own, within seconds of Redis coming back
    assert report.notes["resume s (max)"] < 20, report.notes
    assert report.notes["warning lines (max per process)"] <= MAX_WARNING_LINES, report.notes
