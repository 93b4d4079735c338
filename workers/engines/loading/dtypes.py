"""Which dtype a model computes in when ``Settings.dtype`` is ``auto``.

Measured for the 1.5B preset (docs/models.md): on a CPU without bf16 instructions (this
project's AMD EPYC, AVX2 only) bf16 matrix products are emulated, and a 64-token product ran
4.4x slower than in float32 (prefill 1.3 vs 4.5 tokens/s, decode equal at 0.65), for half the
memory (3.9 vs 7.3 GB RSS). Where bf16 is native (GPUs; CPUs with AVX512-BF16 or AMX) it was
faster than float32 on these machines before (DESIGN.md: 82 vs 31 tokens/s prefill, 3.3 vs
1.85 decode). So a preset names the dtype it runs in where bf16 is native, and float32
is used on CPUs without it; every other model stays float32 unless the setting says otherwise.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from workers.engines.loading.presets import find_preset
from workers.engines.loading.specs import ModelSpec

if TYPE_CHECKING:
    from sinkstream.settings import Settings

__all__ = ["cpu_has_native_bf16", "model_dtype"]

_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); False where that
    cannot be read (no /proc): float32 is the safe side, never the slow one."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(_BF16_FLAGS & set(line.split(":", 1)[-1].split()))
    return False


def model_dtype(spec: ModelSpec, settings: Settings) -> str:
    """The dtype the model computes in: ``Settings.dtype``, or with ``auto`` the preset's own
    where bf16 is native, float32 on CPUs without bf16 and for every other model."""
    if settings.dtype != "auto":
        return settings.dtype
    preset = find_preset(spec.name) if spec.kind in ("preset", "smollm2") else None
    if preset is None:
        return "float32"
    if settings.device == "cpu" and not cpu_has_native_bf16():
        return "float32"
    return preset.dtype
