"""A short, bounded atheris run over the state codec and the entry parser (see
``tests/integration/chaos/fuzz_atheris.py``); the hypothesis properties live in
``tests/unit/state_store/test_codec.py``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.pipeline.harness import ROOT

pytest.importorskip("atheris", reason="atheris (dev extra) has no wheel for this Python")


def test_atheris_finds_nothing_in_a_bounded_run() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.chaos.fuzz_atheris", "-runs=200000",
         "-max_total_time=15", "-seed=20261123", "-rss_limit_mb=2048"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Done" in output and "ERROR" not in output, output[-4000:]
