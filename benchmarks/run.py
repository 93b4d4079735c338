"""Run one benchmark, print its table and write its JSON.

A benchmark is a module ``benchmarks/<name>.py`` with ``run(quick: bool) -> BenchResult``.
Baselines are always measured in the same run as the thing they are compared with, because
the machines are shared and noisy: compare ratios, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class BenchResult:
    """``rows`` become the printed table; ``summary`` holds the headline keys (e.g. ratio)."""

    title: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


#: modules of this folder that are not benchmarks (notes_labels checks hand-made labels)
NOT_BENCHMARKS = {"__init__", "run", "common", "notes_labels"}


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(
        p.stem for p in here.glob("*.py") if p.stem not in NOT_BENCHMARKS
        and not p.stem.startswith("_")
    )


def print_table(result: BenchResult, console: Console) -> None:
    table = Table(title=result.title)
    columns: list[str] = []
    for row in result.rows:
        columns.extend(k for k in row if k not in columns)
    for col in columns:
        table.add_column(col, justify="right")
    for row in result.rows:
        table.add_row(*(_fmt(row.get(c, "")) for c in columns))
    console.print(table)
    for key, value in result.summary.items():
        console.print(f"  [bold]{key}[/bold] = {_fmt(value)}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("name", choices=available())
    parser.add_argument("--quick", action="store_true", help="finish in under a minute or so")
    parser.add_argument("--json", type=Path, help="write the result as JSON here")
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(f"benchmarks.{args.name}")
    kwargs: dict[str, Any] = {}
    if hasattr(module, "add_arguments"):  # a benchmark's own options, e.g. qmsum --model
        own = argparse.ArgumentParser(prog=f"python -m benchmarks.run {args.name}")
        module.add_arguments(own)
        kwargs["options"] = own.parse_args(rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    started = dt.datetime.now(dt.timezone.utc)
    result: BenchResult = module.run(quick=args.quick, **kwargs)
    console = Console()
    print_table(result, console)
    if args.json:
        payload = {
            "benchmark": args.name,
            "quick": args.quick,
            "started": started.isoformat(),
            "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
            "title": result.title,
            "rows": result.rows,
            **result.summary,
            **({"extra": result.extra} if result.extra else {}),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
