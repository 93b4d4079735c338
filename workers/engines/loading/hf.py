"""Hugging Face causal LMs: load a model and its tokenizer for a file-based or hub spec."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from workers.engines.loading.offline import hub_offline
from workers.engines.loading.resident import make_resident
from workers.engines.loading.sources import prepare
from workers.engines.loading.specs import ModelLoadError, ModelSpec, ModelSpecError, parse_spec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = ["load_hf_model"]


def load_hf_model(
    spec: ModelSpec | str,
    cache_root: Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[PreTrainedModel, Any]:
    """Load an HF causal LM and its tokenizer for a smollm2 / preset / directory / gguf / hub
    spec."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    torch_dtype: torch.dtype = getattr(torch, dtype)
    if spec.kind == "hub":
        return _load_hub(spec, torch_dtype, device)
    if spec.kind not in ("smollm2", "preset", "gguf", "hf-dir"):
        raise ModelSpecError(f"model spec {spec.text!r} is not a Hugging Face model")
    directory = prepare(spec, cache_root).directory
    with hub_offline():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch_dtype, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"cannot load model from {directory} (spec {spec.text!r}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    cast(Any, model).to(device)
    make_resident(model)  # before any memory baseline: see resident.py
    model.eval()
    return model, tokenizer


def _load_hub(spec: ModelSpec, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(local_only: bool) -> tuple[PreTrainedModel, Any]:
        model = AutoModelForCausalLM.from_pretrained(
            spec.name, dtype=dtype, local_files_only=local_only
        )
        tokenizer = AutoTokenizer.from_pretrained(spec.name, local_files_only=local_only)
        return model, tokenizer

    try:  # the local HF cache first: no network when it already holds the model
        model, tokenizer = load(True)
    except Exception:  # noqa: BLE001 - any miss falls through to the hub
        try:
            model, tokenizer = load(False)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(
                f"cannot load {spec.name!r} from the Hugging Face hub (unreachable, offline, "
                f"or no such model: {type(exc).__name__}: {_first_line(exc)}). "
                f"Download it where the hub is reachable, save it with "
                f"model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR), and point "
                f"SINKSTREAM_MODEL at that local directory instead."
            ) from exc
    cast(Any, model).to(device)
    make_resident(model)  # before any memory baseline: see resident.py
    model.eval()
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
