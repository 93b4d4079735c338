"""Building an engine from settings: the sink-KV engine for Hugging Face models, the RWKV
engine for ``rwkv:`` and ``tiny-rwkv`` specs; and making a spec loadable fast, offline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.engines.base import Engine
from workers.engines.loading.chunks import StepProgress
from workers.engines.loading.dtypes import model_dtype
from workers.engines.loading.hf import load_hf_model
from workers.engines.loading.prepared import PreparedModel
from workers.engines.loading.presets import find_preset
from workers.engines.loading.sources import prepare, prepare_preset
from workers.engines.loading.specs import TINY_FAMILIES, ModelSpec, ModelSpecError, parse_spec

if TYPE_CHECKING:
    from sinkstream.settings import Settings
    from workers.engines.rwkv import RWKVEngine

__all__ = ["load_engine", "prepare_model"]


def prepare_model(
    spec: ModelSpec | str, settings: Settings, progress: StepProgress | None = None
) -> PreparedModel:
    """What ``sinkstream model prepare`` does: make the model loadable fast, offline.

    GGUF specs (``smollm2`` included) are converted into the cache; a chunked preset is
    downloaded, verified and converted (``progress`` hears its steps); ``tiny-rwkv`` writes
    its checkpoint into the cache; hub ids are fetched into the Hugging Face cache; local
    directories and RWKV checkpoints are used in place (nothing to do).
    """
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    started = time.perf_counter()
    cache_root = Path(settings.model_cache_dir)
    if spec.kind == "preset":
        preset = find_preset(spec.name)
        if preset is None:
            raise ModelSpecError(f"unknown preset {spec.name!r}")
        return prepare_preset(preset, cache_root, progress)
    if spec.kind in ("smollm2", "gguf", "hf-dir"):
        return prepare(spec, cache_root)
    if spec.kind == "tiny" and spec.name == "tiny-rwkv":
        engine = _tiny_rwkv_engine(spec, settings)
        seconds = time.perf_counter() - started
        return PreparedModel(engine.path, False, seconds, engine.path, action="written")
    if spec.kind == "hub":
        load_hf_model(spec, cache_root, device="cpu", dtype="float32")
        seconds = time.perf_counter() - started
        return PreparedModel(Path(spec.name), False, seconds, action="fetched")
    if spec.kind == "rwkv":
        assert spec.path is not None
        return PreparedModel(spec.path, False, 0.0, spec.path, action="in-place")
    return PreparedModel(Path(spec.display_name), False, 0.0, action="seeded")


def _tiny_rwkv_engine(spec: ModelSpec, settings: Settings) -> RWKVEngine:
    from workers.engines.rwkv import RWKVEngine, rwkv_strategy

    return RWKVEngine.tiny(
        Path(settings.model_cache_dir) / "tiny-rwkv",
        seed=spec.seed,
        strategy=rwkv_strategy(settings.device, model_dtype(spec, settings)),
        chunk_tokens=settings.chunk_tokens,
    )


#: tiny spec -> ``workers.engines.tiny`` arch (every tiny spec but tiny-rwkv)
_TINY_HF_ARCHS = {
    name: name.removeprefix("tiny-") for name in TINY_FAMILIES if name != "tiny-rwkv"
}


def load_engine(settings: Settings, spec: ModelSpec | str | None = None) -> Engine[Any]:
    """The engine for ``spec`` (default ``settings.model``) with the settings' device, dtype,
    state_dtype, sink_tokens, recent_tokens and chunk_tokens: sink-KV for Hugging Face
    models, the RWKV engine for ``rwkv:`` and ``tiny-rwkv`` specs."""
    if not isinstance(spec, ModelSpec):
        spec = parse_spec(spec if spec is not None else settings.model)
    if spec.engine_kind == "rwkv":
        from workers.engines.rwkv import RWKVEngine, rwkv_strategy

        if spec.kind == "tiny":
            return _tiny_rwkv_engine(spec, settings)
        assert spec.path is not None
        return RWKVEngine(
            spec.path,
            strategy=rwkv_strategy(settings.device, model_dtype(spec, settings)),
            chunk_tokens=settings.chunk_tokens,
            model_name=spec.display_name,
        )

    from workers.engines.sinkkv import SinkKVEngine

    model: Any
    tokenizer: Any
    dtype = model_dtype(spec, settings)
    if spec.kind == "tiny":
        from workers.engines.tiny import tiny_hf_model
        from workers.engines.tokenizers import ByteTokenizer

        model = tiny_hf_model(_TINY_HF_ARCHS[spec.name], seed=spec.seed)
        tokenizer = ByteTokenizer()
    else:
        model, tokenizer = load_hf_model(
            spec, Path(settings.model_cache_dir), device=settings.device, dtype=dtype
        )
    return SinkKVEngine(
        model,
        tokenizer,
        model_name=spec.display_name,
        sink_tokens=settings.sink_tokens,
        recent_tokens=settings.recent_tokens,
        chunk_tokens=settings.chunk_tokens,
        compute_dtype=dtype,
        storage_dtype=None if settings.state_dtype == "auto" else settings.state_dtype,
        device=settings.device,
    )
