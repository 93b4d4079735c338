"""The ``rwkv`` pip package (0.8.x) as a process-wide resource: strategy, generation, loading.

* **One model configuration per process.** ``rwkv.model`` picks its code path at import time
  (``RWKV_V7_ON=1`` swaps the ``RWKV`` class for the RWKV-7 one, and the older v4/v5/v6 class
  is then unreachable), and RWKV-7 keeps ``DTYPE``/``DEVICE`` as module globals that every
  model construction overwrites. So a process serves either RWKV-7 or v4-v6 checkpoints, and
  for RWKV-7 one (device, dtype) pair; a conflicting request raises :class:`RWKVConfigError`
  instead of silently corrupting the first model. Several checkpoints with the same
  configuration may share a process.
* The package prints a banner on import and progress while loading: both are swallowed.
* Strategies are ``"<cpu|cuda[:N]|mps> <fp32|fp16|bf16>"`` only: layer-split, streaming and
  int8 strategies are refused because a stream's state must live on one device in known dtypes.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from workers.engines.base import EngineError

__all__ = ["RWKVConfigError", "load_model", "parse_strategy", "rwkv_strategy"]

_STRATEGY = re.compile(r"^(cpu|mps|cuda(?::\d+)?) (fp32|fp16|bf16)$")
_STRATEGY_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_STRATEGY = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


class RWKVConfigError(EngineError):
    """This process is already set up for another RWKV generation, device or dtype."""


def rwkv_strategy(device: str = "cpu", dtype: str = "float32") -> str:
    """Map the project's (device, torch dtype name) settings to an ``rwkv`` strategy string."""
    try:
        return f"{device} {_DTYPE_STRATEGY[dtype]}"
    except KeyError:
        raise ValueError(f"RWKV serves float32, float16 or bfloat16, not {dtype!r}") from None


def parse_strategy(strategy: str) -> tuple[str, str, torch.dtype]:
    """(normalised strategy, device, dtype) of a one-device strategy; ValueError otherwise."""
    strategy = " ".join(strategy.split())
    m = _STRATEGY.match(strategy)
    if m is None:
        raise ValueError(
            f"unsupported RWKV strategy {strategy!r}: use '<cpu|cuda[:N]|mps> "
            f"<fp32|fp16|bf16>' (the state must live on one device)"
        )
    return strategy, m.group(1), _STRATEGY_DTYPES[m.group(2)]


# ----- process-wide package configuration --------------------------------------------------


@dataclass(frozen=True)
class _ProcessConfig:
    v7: bool
    device: str
    dtype: torch.dtype


_CONFIG_LOCK = threading.Lock()
_PROCESS_CONFIG: _ProcessConfig | None = None


def load_model(path: Path, strategy: str, *, v7: bool, device: str, dtype: torch.dtype) -> Any:
    """The package's model for the raw ``.pth`` checkpoint ``path``, once this process's
    configuration is claimed for (generation, device, dtype); the claim is undone if loading
    fails."""
    with _CONFIG_LOCK:
        previous = _claim_config(_ProcessConfig(v7, device, dtype))
        try:
            mod = _rwkv_model_module(v7)
            with contextlib.redirect_stdout(io.StringIO()):  # loaders print progress
                if v7:  # RWKV_x070(model, strategy) appends ".pth" itself
                    return mod.RWKV(str(path)[: -len(".pth")], strategy)
                return mod.RWKV(str(path), strategy, verbose=False)
        except BaseException:
            _restore_config(previous)
            raise


def _rwkv_model_module(v7: bool) -> ModuleType:
    """Import ``rwkv.model`` in the mode the checkpoint needs, or fail if it is too late."""
    mod = sys.modules.get("rwkv.model")
    if mod is None:
        os.environ["RWKV_V7_ON"] = "1" if v7 else "0"
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a banner
            mod = importlib.import_module("rwkv.model")
    imported_v7 = hasattr(mod, "RWKV_x070")
    if imported_v7 != v7:
        raise RWKVConfigError(
            f"rwkv.model was imported in {'RWKV-7' if imported_v7 else 'RWKV-4/5/6'} mode "
            f"(RWKV_V7_ON={'1' if imported_v7 else 'unset'}) but this checkpoint is "
            f"{'RWKV-7' if v7 else 'RWKV-4/5/6'}; the package picks its code path once per "
            f"process, so serve this model from a separate worker process"
        )
    return mod


def _claim_config(want: _ProcessConfig) -> _ProcessConfig | None:
    """Reserve the process configuration; returns the previous one (to undo on failure)."""
    global _PROCESS_CONFIG
    have = _PROCESS_CONFIG
    if have is not None:
        conflict = have.v7 != want.v7 or (
            want.v7 and (have.device != want.device or have.dtype != want.dtype)
        )
        if conflict:
            raise RWKVConfigError(
                f"this process already serves RWKV {_describe(have)}; cannot also load "
                f"{_describe(want)}: the rwkv package keeps the generation (RWKV_V7_ON) and, "
                f"for RWKV-7, the device and dtype as module globals. Run one worker process "
                f"per model configuration"
            )
    _PROCESS_CONFIG = want
    return have


def _restore_config(previous: _ProcessConfig | None) -> None:
    global _PROCESS_CONFIG
    _PROCESS_CONFIG = previous


def _describe(cfg: _ProcessConfig) -> str:
    gen = "v7" if cfg.v7 else "v4-v6"
    return f"{gen} on {cfg.device} {str(cfg.dtype).removeprefix('torch.')}"
