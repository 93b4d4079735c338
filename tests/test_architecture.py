"""The shape of the code, checked like its behaviour: the floors and the absence of cycles
(import-linter contracts in pyproject.toml), module sizes, lint and types.

``docs/architecture.md`` draws the floors these contracts hold.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sinkstream", "producer", "workers", "state_store", "monitoring")
#: one concept per module: a module past this many lines is doing more than one thing
MAX_MODULE_LINES = 520


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_import_contracts_are_kept() -> None:
    """Layers (each floor imports only the floors below it), no torch under the workers, no
    Redis in the engines, no cycles between siblings anywhere."""
    # a process of its own: import-linter reconfigures logging in the process it runs in
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_is_a_god_module() -> None:
    long = {str(p.relative_to(ROOT)): n for package in PACKAGES
            for p in (ROOT / package).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(900)
def test_mypy_is_clean() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
