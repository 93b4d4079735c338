"""Which Hugging Face models the sink-KV engine serves exactly, and a model's identity.

Sink-KV re-rotates cached keys to new slots (``rotary.py``), which is exact only when:

* the model's family has an architecture adapter (``families.py``): rotary with the
  rotate-half convention on the whole head dim or, where the family's attention does it, on
  its first ``rotary_dim`` dims; keys cached after RoPE; logits = the family's head;
* the rotary frequencies are fixed (``inv_freq`` does not depend on the sequence length:
  dynamic NTK and longrope rescale with it, so a stored rotation would mean something else);
* the attention implementation takes our cache and explicit positions as given (eager, sdpa).

A sliding window shorter than S + R is fine: that layer attends to its own most recent
window by slot, as Hugging Face masks it (``positions.py``).

Anything else is refused up front with ``UnsupportedModelError`` rather than served inexactly.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch

from workers.engines.base import UnsupportedModelError
from workers.engines.sinkkv.families import ACCEPTED_MODEL_TYPES, BoundFamily, bind
from workers.engines.tensor_bytes import dtype_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: model types served exactly, one architecture adapter per layout (``families.py``)
SUPPORTED_MODEL_TYPES = ACCEPTED_MODEL_TYPES
#: rope types whose frequencies are fixed (do not depend on the sequence length)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ATTENTION = ("eager", "sdpa")

SUPPORTED_TEXT = (
    "supported: decoder-only causal LMs of type "
    + ", ".join(SUPPORTED_MODEL_TYPES)
    + " with rotary embeddings (rope types "
    + ", ".join(SUPPORTED_ROPE_TYPES)
    + "; partial rotary for phi3 and gpt_neox, interleaved for cohere and cohere2, NoPE "
    + "layers for smollm3 and cohere2, per-layer-type tables for gemma3_text) or ALiBi (mpt), "
    + "attention "
    + "implementation "
    + " or ".join(SUPPORTED_ATTENTION)
)

# config fields that do not change what a model computes
_VOLATILE_CONFIG_KEYS = (
    "transformers_version",
    "_name_or_path",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_commit_hash",
)


def check_supported(model: Any, window_span: int = 0) -> BoundFamily:
    """Raise ``UnsupportedModelError`` unless sink-KV serves ``model`` exactly with chunks
    attending to ``window_span`` = S + R + T slots; the message lists every problem. No
    sliding window limits the sink window any more: a sliding layer keeps its own
    (``positions.py``).

    Returns the model's pieces (``families.bind``) for the engine to drive."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face model; " + SUPPORTED_TEXT
        )
    problems = []
    if getattr(config, "is_encoder_decoder", False):
        problems.append("encoder-decoder models are not supported")
    bound: BoundFamily | None = None
    try:
        bound = bind(model)
    except UnsupportedModelError as exc:
        problems.append(str(exc))
    except (AttributeError, TypeError, ValueError) as exc:  # a config the adapter cannot read
        problems.append(f"{type(model).__name__}: cannot read its layout ({exc})")
    if bound is not None:
        problems += _rotary_problems(config, bound)
        table = getattr(config, "max_seq_len", None)  # MPT builds its ALiBi this wide
        if bound.alibi and isinstance(table, int) and table < window_span:
            problems.append(f"an ALiBi table of max_seq_len={table} keys, fewer than "
                            f"sink_tokens + recent_tokens + chunk_tokens = {window_span}")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        problems.append(f"attention implementation {impl!r} (load with attn_implementation='sdpa')")
    elif impl == "sdpa" and getattr(config, "attn_logit_softcapping", None) is not None:
        # SDPA cannot softcap (HF raises at the first forward; Gemma 2 never loads with it)
        problems.append("an attention logit softcap under sdpa (load with "
                        "attn_implementation='eager')")
    if problems or bound is None:
        raise UnsupportedModelError(
            f"cannot serve {type(model).__name__} with a sink-KV cache exactly: "
            + "; ".join(problems)
            + ". "
            + SUPPORTED_TEXT
        )
    return bound


def _rotary_problems(config: Any, bound: BoundFamily) -> list[str]:
    """Fixed frequencies, over the whole head dim unless the family rotates a prefix of it."""
    if bound.alibi:  # no rotary embedding at all
        return []
    problems = []
    kinds = getattr(bound.rotary, "rope_type", "default")
    for rope_type in kinds.values() if isinstance(kinds, dict) else [kinds]:  # Gemma 3: per type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            problems.append(f"rope type {rope_type!r} changes frequencies with sequence length")
    rotary_dim, head_dim = bound.rotary_dim, bound.head_dim
    if rotary_dim > head_dim or rotary_dim % 2:
        problems.append(f"rotary embedding over {rotary_dim} dims of a {head_dim}-dim head")
    elif rotary_dim < head_dim and not bound.family.partial_rotary:
        rope_params = getattr(config, "rope_parameters", None) or {}
        factor = rope_params.get("partial_rotary_factor", rotary_dim / head_dim)
        problems.append(
            f"partial rotary embedding (partial_rotary_factor={factor}) in a "
            f"{bound.family.name} model, whose attention rotates the whole head")
    return problems


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
