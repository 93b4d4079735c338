"""Chaos: kill -9 and Redis restart/outage trials, a burst of new streams, and a fuzzing pass;
every trial is checked against an uninterrupted run (``tests/integration/chaos/common.py::verify``).

``--quick`` (the CI-sized run): 8 random kills with 3 workers, 2 Redis restarts, a 2,000-stream
burst watched for 15 s, 200k atheris inputs. Without ``--quick`` it is the soak: 40 kills
(always one ready survivor), 6 restarts and a 30 s outage, 10,000 streams drained completely,
and 5 minutes of atheris. Headline keys: ``trials`` (faults injected), ``lost`` (entries never
applied or never written) and ``duplicated`` (entries applied or written twice): both must be 0.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.run import BenchResult
from tests.integration.chaos.common import chaos_seed
from tests.integration.chaos.scenarios import Report, random_kills, redis_outages, stream_burst

ROOT = Path(__file__).resolve().parents[1]


def run(quick: bool) -> BenchResult:
    seed = chaos_seed()
    reports: list[Report] = []
    with tempfile.TemporaryDirectory(prefix="sinkstream-chaos-") as tmp:
        base = Path(tmp)
        if quick:
            reports.append(random_kills(base / "kill", seed=seed, kills=8))
            reports.append(redis_outages(base / "restart", seed=seed, restarts=2, outage_s=0))
            reports.append(stream_burst(base / "burst", streams=2000, observe_s=15, drain=False))
        else:
            reports.append(random_kills(base / "kill", seed=seed, kills=40, keep_survivor=True,
                                        streams=8))
            reports.append(redis_outages(base / "outage", seed=seed, restarts=6, outage_s=30))
            reports.append(stream_burst(base / "burst", streams=10_000, observe_s=0, drain=True,
                                        max_queued=256))
    fuzz = _atheris(runs=200_000 if quick else 50_000_000, seconds=30 if quick else 300)
    rows = [_clean(r.row()) for r in reports] + [fuzz]
    lost = sum(r.verdict.lost + r.verdict.unapplied for r in reports)
    duplicated = sum(r.verdict.duplicated for r in reports)
    mismatched = sum(len(r.verdict.mismatched) for r in reports)
    return BenchResult(
        title=f"chaos ({'quick' if quick else 'soak'}; seed {seed})",
        rows=rows,
        summary={"trials": sum(r.trials for r in reports), "lost": lost,
                 "duplicated": duplicated, "mismatched": mismatched,
                 "bad_summaries": sum(len(r.verdict.bad_summaries) for r in reports),
                 "fuzz_inputs": fuzz.get("inputs", 0), "fuzz_crashes": fuzz.get("crashes", 0)},
        extra={"reports": [{**r.row(), "notes": r.notes} for r in reports]},
    )


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _atheris(runs: int, seconds: int) -> dict[str, Any]:
    """One atheris pass in a subprocess (it owns the process); skipped if not installed."""
    row: dict[str, Any] = {"scenario": "atheris: state codec + entry parser", "faults": "fuzz"}
    try:
        import atheris  # noqa: F401
    except ImportError:
        return {**row, "trials": 0, "note": "atheris not installed"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.chaos.fuzz_atheris", f"-runs={runs}",
         f"-max_total_time={seconds}", "-print_final_stats=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120,
    )
    output = result.stdout + result.stderr
    inputs = 0
    for line in output.splitlines():
        if line.startswith("stat::number_of_executed_units:"):
            inputs = int(line.split(":")[-1])
    return {**row, "trials": inputs, "inputs": inputs,
            "crashes": 0 if result.returncode == 0 else 1,
            "seconds": round(time.monotonic() - started, 1)}
