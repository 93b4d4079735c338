"""Chaos: kill -9 and Redis restart/outage trials, a burst of new streams, and a fuzzing pass;
every trial is checked against an uninterrupted run (``tests/integration/chaos/common.py::verify``).

``--quick`` (the CI-sized run): 8 random kills with 3 workers, 2 Redis restarts, a 2,000-stream
burst watched for 15 s, 200k atheris inputs. Without ``--quick`` it is the soak: 40 kills
(always one ready survivor), 6 restarts and a 30 s outage, 10,000 streams drained completely,
and 5 minutes of atheris. Headline keys: ``trials`` (faults injected), ``lost`` (entries never
applied or never written) and ``duplicated`` (entries applied or written twice): both must be 0.

Failover with the default settings (``tests/integration/chaos/failover.py``, issue 22): kill -9
of the worker holding a stream's lease, 20 times (5 with ``--quick``), then streams written by
a bare ``XADD`` (10; 3). Keys ``takeover_seconds_p50`` / ``takeover_seconds_max`` (kill to the
next commit of that stream by another worker; target max <= 10 s) and
``discovery_seconds_max`` (raw XADD to registered; target <= 1 s).
``--only failover`` runs just that scenario; ``--failover-trials N`` overrides the count.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.run import BenchResult
from tests.integration.chaos.common import chaos_seed
from tests.integration.chaos.failover import holder_kills
from tests.integration.chaos.scenarios import Report, random_kills, redis_outages, stream_burst

ROOT = Path(__file__).resolve().parents[1]


_FAILOVER_KEYS = ("takeover_seconds_p50", "takeover_seconds_max", "discovery_seconds_p50",
                  "discovery_seconds_max", "first_commit_seconds_max")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=("all", "failover"), default="all",
                        help="failover: only the kill-the-lease-holder and raw-XADD scenario")
    parser.add_argument("--failover-trials", type=int, default=0,
                        help="kills of the lease holder (default 20, 5 with --quick)")


def run(quick: bool, options: argparse.Namespace | None = None) -> BenchResult:
    only = options.only if options is not None else "all"
    trials = (options.failover_trials if options is not None else 0) or (5 if quick else 20)
    seed = chaos_seed()
    reports: list[Report] = []
    with tempfile.TemporaryDirectory(prefix="sinkstream-chaos-") as tmp:
        base = Path(tmp)
        failover = holder_kills(base / "failover", seed=seed, trials=trials,
                                raw_streams=3 if quick else 10)
        reports.append(failover)
        if only == "all":
            reports.extend(_other_scenarios(base, seed, quick))
    fuzz: dict[str, Any] = {} if only == "failover" else _atheris(
        runs=200_000 if quick else 50_000_000, seconds=30 if quick else 300)
    rows = [_clean(r.row()) for r in reports] + ([fuzz] if fuzz else [])
    lost = sum(r.verdict.lost + r.verdict.unapplied for r in reports)
    duplicated = sum(r.verdict.duplicated for r in reports)
    mismatched = sum(len(r.verdict.mismatched) for r in reports)
    return BenchResult(
        title=f"chaos ({'quick' if quick else 'soak'}"
              f"{', failover only' if only == 'failover' else ''}; seed {seed})",
        rows=rows,
        summary={"trials": sum(r.trials for r in reports), "lost": lost,
                 "duplicated": duplicated, "mismatched": mismatched,
                 "bad_summaries": sum(len(r.verdict.bad_summaries) for r in reports),
                 "fuzz_inputs": fuzz.get("inputs", 0), "fuzz_crashes": fuzz.get("crashes", 0),
                 **{k: failover.notes.get(k) for k in _FAILOVER_KEYS}},
        extra={"reports": [{**r.row(), "notes": r.notes} for r in reports]},
    )


def _other_scenarios(base: Path, seed: int, quick: bool) -> list[Report]:
    """Random kills, Redis restarts/outages and the burst of new streams."""
    if quick:
        return [random_kills(base / "kill", seed=seed, kills=8),
                redis_outages(base / "restart", seed=seed, restarts=2, outage_s=0),
                stream_burst(base / "burst", streams=2000, observe_s=15, drain=False)]
    return [random_kills(base / "kill", seed=seed, kills=40, keep_survivor=True, streams=8),
            redis_outages(base / "outage", seed=seed, restarts=6, outage_s=30),
            stream_burst(base / "burst", streams=10_000, observe_s=0, drain=True,
                         max_queued=256)]


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
