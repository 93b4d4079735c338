"""kill -9 of workers at seeded random moments, three workers at once: nothing lost, nothing
applied twice, every published summary readable (see ``tests/integration/chaos/common.py::verify``).
The workers batch streams (the default): each committed state is still bit-identical to the
stream fed alone in one uninterrupted pass.

The deterministic fault points (after_load / after_feed / before_commit / chunks_written) are
covered one by one in ``tests/integration/pipeline/test_pipeline.py``; here the moments are random.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.chaos.common import chaos_seed
from tests.integration.chaos.scenarios import random_kills

KILLS = 10


def test_random_kill9_three_workers_loses_nothing(tmp_path: Path) -> None:
    report = random_kills(tmp_path, seed=chaos_seed(), kills=KILLS)
    print(report.row())
    assert report.trials == KILLS
    assert report.verdict.ok, report.verdict.describe()
    assert report.verdict.summaries > 0
    assert report.notes["batching workers"] > 0
