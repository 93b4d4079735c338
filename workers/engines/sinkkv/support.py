"""Which Hugging Face models the sink-KV engine serves exactly, and a model's identity.

Sink-KV re-rotates cached keys to new slots (``rotary.py``), which is exact only when:

* attention is Llama-style: rotary on the full head dim with the rotate-half convention,
  keys cached after RoPE, logits = lm_head(final hidden);
* the rotary frequencies are fixed (``inv_freq`` does not depend on the sequence length:
  dynamic NTK and longrope rescale with it, so a stored rotation would mean something else);
* the attention implementation takes our cache and explicit positions as given (eager, sdpa);
* any sliding window covers the whole span a chunk attends to (S + R + T).

Anything else is refused up front with ``UnsupportedModelError`` rather than served inexactly.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch

from workers.engines.base import UnsupportedModelError
from workers.engines.tensor_bytes import dtype_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: model types whose attention is Llama-style: full rotary on every head with the
#: rotate-half convention, keys cached after RoPE, logits = lm_head(final hidden)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: rope types whose frequencies are fixed (do not depend on the sequence length)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ATTENTION = ("eager", "sdpa")

SUPPORTED_TEXT = (
    "supported: decoder-only causal LMs of type "
    + ", ".join(SUPPORTED_MODEL_TYPES)
    + " with rotary embeddings on the full head dim (rope types "
    + ", ".join(SUPPORTED_ROPE_TYPES)
    + "), attention implementation "
    + " or ".join(SUPPORTED_ATTENTION)
    + ", and no sliding window shorter than sink_tokens + recent_tokens + chunk_tokens"
)

# config fields that do not change what a model computes
_VOLATILE_CONFIG_KEYS = (
    "transformers_version",
    "_name_or_path",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_commit_hash",
)


def check_supported(model: Any, window_span: int) -> None:
    """Raise ``UnsupportedModelError`` unless sink-KV serves ``model`` exactly with chunks
    attending to ``window_span`` = S + R + T tokens; the message lists every problem."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face model; " + SUPPORTED_TEXT
        )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    problems = [
        *_architecture_problems(config),
        *_rotary_problems(config, decoder),
        *_window_problems(config, window_span),
    ]
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        problems.append(f"attention implementation {impl!r} (load with attn_implementation='sdpa')")
    if problems:
        raise UnsupportedModelError(
            f"cannot serve {type(model).__name__} with a sink-KV cache exactly: "
            + "; ".join(problems)
            + ". "
            + SUPPORTED_TEXT
        )


def _architecture_problems(config: Any) -> list[str]:
    problems = []
    if getattr(config, "is_encoder_decoder", False):
        problems.append("encoder-decoder models are not supported")
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model type {model_type!r} is not supported")
    return problems


def _rotary_problems(config: Any, decoder: Any) -> list[str]:
    """RoPE present, with fixed frequencies, over the whole head dim."""
    problems = []
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        problems.append("no rotary position embedding (ALiBi or absolute positions)")
    else:
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            problems.append(f"rope type {rope_type!r} changes frequencies with sequence length")
    rope_params = getattr(config, "rope_parameters", None) or {}
    partial = rope_params.get(
        "partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)
    )
    if partial is not None and float(partial) < 1.0:
        problems.append(f"partial rotary embedding (partial_rotary_factor={partial})")
    elif rotary is not None and decoder is not None and hasattr(rotary, "inv_freq"):
        head_dim = getattr(decoder.layers[0].self_attn, "head_dim", None)
        if head_dim is not None and 2 * rotary.inv_freq.numel() != head_dim:
            problems.append("the rotary embedding does not cover the whole head dim")
    return problems


def _window_problems(config: Any, window_span: int) -> list[str]:
    """A sliding window shorter than the span a chunk attends to would drop tokens we keep."""
    window = getattr(config, "sliding_window", None)
    sliding = getattr(config, "model_type", "?") == "mistral" or "sliding_attention" in (
        getattr(config, "layer_types", None) or ()
    )
    if sliding and window is not None and int(window) < window_span:
        return [
            f"sliding window {window} is shorter than sink_tokens + recent_tokens + "
            f"chunk_tokens = {window_span}"
        ]
    return []


def model_fingerprint(model: PreTrainedModel) -> str:
    """sha256 over the architecture, the config (JSON) and every parameter's bytes: a stored
    state only loads into a model that computes exactly what made it."""
    digest = hashlib.sha256(b"sinkstream-model-v1\0")
    digest.update(type(model).__name__.encode() + b"\0")
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode() + b"\0")
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        t = param.detach().to("cpu").contiguous()
        digest.update(f"{name}:{dtype_name(t.dtype)}:{tuple(t.shape)}\0".encode())
        if t.numel():
            # the tensor's own buffer, hashed in place: a bytes copy made the first batch's
            # peak RSS grow by the largest parameter (890 MiB for the 1.5B preset's
            # embeddings), which the memory budget took for growth outside the hot cache
            digest.update(t.view(torch.uint8).numpy().data)
    return digest.hexdigest()
