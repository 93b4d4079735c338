"""Architecture adapters: where each model family keeps the pieces the sink-KV engine drives.

The engine runs a Hugging Face decoder with its own cache, reads the first attention module's
head size, re-rotates cached keys with the model's own rotary frequencies and turns final
hidden states into logits. Families keep those pieces under different names (Llama's
``model.layers[i].self_attn``, GPT-NeoX's ``gpt_neox.layers[i].attention``, Falcon's
``transformer.h[i].self_attention``) and some transform the head's output (Granite divides the
logits by ``logits_scaling``). A ``Family`` names them once; ``bind`` looks them up on a model
and returns a ``BoundFamily`` the engine uses instead of reaching into attributes itself, so
a model of another layout is refused with the missing piece named, never an AttributeError.

Families that need a piece the engine does not have yet are listed in ``REFUSED_FAMILIES``
with that piece, so a refusal says what is missing rather than a wrong reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from workers.engines.base import UnsupportedModelError


@dataclass(frozen=True)
class Layout:
    """Attribute names, from the causal LM down, of the pieces the engine uses."""

    decoder: str = "model"  # the base model: embeddings, layers, final norm, rotary
    layers: str = "layers"  # on the decoder: the ModuleList of decoder layers
    attention: str = "self_attn"  # on each layer: the attention module
    #: on the decoder: the rotary embedding (``inv_freq``); None: the family has none (ALiBi)
    rotary: str | None = "rotary_emb"
    embeddings: str = "embed_tokens"  # on the decoder
    final_norm: str = "norm"  # on the decoder
    head: str = "lm_head"  # on the causal LM


def _llama_kv_heads(config: Any) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def _all_heads(config: Any) -> int:
    return int(config.num_attention_heads)


def _falcon_kv_heads(config: Any) -> int:
    """How many key heads Falcon hands its cache: one shared head when multi-query (the old
    decoder architecture), one per query head with neither option, and with the new decoder
    architecture ``num_kv_heads`` groups, except in transformers before 5.25, whose
    ``FalconAttention._split_heads`` broadcast each group to its query heads before the cache."""
    if config.new_decoder_architecture:
        return int(config.num_attention_heads if _falcon_broadcasts_kv_groups()
                   else config.num_kv_heads)
    return 1 if config.multi_query else int(config.num_attention_heads)


def _falcon_broadcasts_kv_groups() -> bool:
    from transformers.models.falcon import modeling_falcon

    return hasattr(modeling_falcon.FalconAttention, "_split_heads")


def _one_table(rotary: Any, config: Any, n_layers: int) -> tuple[Any, ...]:
    """Every layer rotates by the one rotary embedding's ``inv_freq``."""
    return (getattr(rotary, "inv_freq", None),) * n_layers


def _layer_type_tables(rotary: Any, config: Any, n_layers: int) -> tuple[Any, ...]:
    """Gemma 3: one ``{layer_type}_inv_freq`` per layer type (local layers at
    ``rope_local_base_freq``, global layers at the main ``rope_theta``)."""
    return tuple(getattr(rotary, f"{config.layer_types[i]}_inv_freq", None)
                 for i in range(n_layers))


def _no_rope_layers(rotary: Any, config: Any, n_layers: int) -> tuple[Any, ...]:
    """SmolLM3: ``no_rope_layers[i]`` is 1 where layer i uses RoPE, 0 where it is NoPE."""
    inv = getattr(rotary, "inv_freq", None)
    return tuple(inv if config.no_rope_layers[i] else NOPE for i in range(n_layers))


def _global_nope(rotary: Any, config: Any, n_layers: int) -> tuple[Any, ...]:
    """Cohere2: sliding layers use RoPE, global (full attention) layers are NoPE."""
    inv = getattr(rotary, "inv_freq", None)
    return tuple(inv if config.layer_types[i] == "sliding_attention" else NOPE
                 for i in range(n_layers))


#: a layer's rotary table that says: this layer uses no position embedding (NoPE)
NOPE = "nope"


def _no_tables(rotary: Any, config: Any, n_layers: int) -> tuple[Any, ...]:
    """ALiBi: positions are a bias inside attention, the keys carry none."""
    return (NOPE,) * n_layers


def _falcon_tables(rotary: Any, config: Any, n_layers: int) -> tuple[Any, ...]:
    """Falcon rotates by its one table, or with ``alibi=True`` carries no positions in keys
    (its ALiBi is built from the attention mask: ones over slots 0..n+T-1)."""
    if getattr(config, "alibi", False):
        return _no_tables(rotary, config, n_layers)
    return _one_table(rotary, config, n_layers)


@dataclass(frozen=True)
class Family:
    """A layout, how many key/value heads its cache holds, and its logit transform."""

    name: str
    model_types: tuple[str, ...]
    layout: Layout = Layout()
    #: key/value heads per layer in the cache, from the config
    kv_heads: Callable[[Any], int] = _llama_kv_heads
    #: config field the head's logits are divided by (Granite's ``logits_scaling``), if any
    logits_divisor: str | None = None
    #: config field of a final logit softcap (Gemma 2/3's ``final_logit_softcapping``), if any
    logits_softcap: str | None = None
    #: config field the head's logits are multiplied by (Cohere's ``logit_scale``), if any
    logits_scale: str | None = None
    #: per layer, its rotary frequencies (``inv_freq``) or ``NOPE``: one table for most
    #: families, one per layer type (Gemma 3), none on NoPE layers (SmolLM3, Cohere2)
    rope_tables: Callable[[Any, Any, int], tuple[Any, ...]] = _one_table
    #: rotary pairs (2i, 2i + 1) instead of rotate-half's (i, i + r/2) (Cohere)
    interleaved: bool = False
    #: whether a model of the family may position by ALiBi instead of rotary tables (all
    #: layers ``NOPE``): the attention adds ``-slope_h * (last key slot - key slot)`` per head,
    #: from the key's index in the window it is handed, so a window at slots 0..n-1 is biased
    #: by cache-slot distance (StreamingLLM's rule for MPT) with nothing to re-rotate
    alibi: bool = False
    #: whether the attention applies ``rotary_dim < head_dim`` (rotates the first dims only)
    partial_rotary: bool = False
    #: whether attention goes through transformers' attention interface with the layer
    #: kwargs passed down (the ragged multi-row path needs both); else a batch runs one
    #: forward per cache length, through the model's own attention
    ragged_batches: bool = True
    #: why a batched feed cannot round like a solo one, whatever the machine (None: nothing
    #: in the architecture; the kernels are checked at run time)
    batch_variance: str | None = None


#: mixture-of-experts layers multiply each expert's weights by the tokens routed to it across
#: the whole batch, so the shape of that matmul, and its rounding, depends on the neighbours
_MOE = ("a mixture of experts: each expert's matmul runs over the tokens the whole batch "
        "routed to it, so its rounding depends on the other streams in the batch")

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3")),
    Family("olmo2", ("olmo2",)),
    Family("phi3", ("phi3",), partial_rotary=True),
    Family("granite", ("granite",), logits_divisor="logits_scaling"),
    # attention softcap (passed to the attention function) and query_pre_attn_scalar (the
    # module's scaling) act inside attention; the final softcap in the head
    Family("gemma2", ("gemma2",), logits_softcap="final_logit_softcapping"),
    Family("gemma3", ("gemma3_text",), logits_softcap="final_logit_softcapping",
           rope_tables=_layer_type_tables),
    # learned sink logits per head (``s_aux``), yarn RoPE, sliding/full layers
    Family("gpt-oss", ("gpt_oss",), batch_variance=_MOE),
    Family("cohere", ("cohere",), logits_scale="logit_scale", interleaved=True),
    Family("cohere2", ("cohere2",), logits_scale="logit_scale", interleaved=True,
           rope_tables=_global_nope),
    Family("smollm3", ("smollm3",), rope_tables=_no_rope_layers),
    # partial rotary sliced by the attention itself before apply_rotary_pos_emb (the same
    # first-dims rotation); its decoder layers drop the kwargs the ragged path needs
    Family("stablelm", ("stablelm",), partial_rotary=True, ragged_batches=False),
    # ALiBi built in MptModel from the key count (slots 0..n+T-1); inline attention
    Family(
        "mpt",
        ("mpt",),
        Layout(decoder="transformer", layers="blocks", attention="attn", rotary=None,
               embeddings="wte", final_norm="norm_f"),
        kv_heads=_all_heads,
        ragged_batches=False,
        rope_tables=_no_tables,
        alibi=True,
    ),
    # ALiBi built in BloomModel from the attention mask (ones over slots 0..n+T-1)
    Family(
        "bloom",
        ("bloom",),
        Layout(decoder="transformer", layers="h", attention="self_attention", rotary=None,
               embeddings="word_embeddings", final_norm="ln_f"),
        kv_heads=_all_heads,
        ragged_batches=False,
        rope_tables=_no_tables,
        alibi=True,
    ),
    Family(
        "gpt-neox",
        ("gpt_neox",),
        Layout(decoder="gpt_neox", attention="attention", embeddings="embed_in",
               final_norm="final_layer_norm"),
        kv_heads=_all_heads,
        partial_rotary=True,
    ),
    Family(
        "falcon",
        ("falcon",),
        Layout(decoder="transformer", layers="h", attention="self_attention",
               embeddings="word_embeddings", final_norm="ln_f"),
        kv_heads=_falcon_kv_heads,
        ragged_batches=False,
        rope_tables=_falcon_tables,
        alibi=True,
    ),
)

#: model type -> the piece the engine lacks to serve it exactly
REFUSED_FAMILIES: dict[str, str] = {
    "gemma3": "an adapter for the multimodal Gemma 3 wrapper (load its text model: model "
    "type gemma3_text, Gemma3ForCausalLM)",
}

ACCEPTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(model_type: str) -> Family | None:
    """The family serving ``model_type``, or None."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


@dataclass(frozen=True)
class BoundFamily:
    """A family's pieces looked up on one model: what the engine calls instead of attributes."""

    family: Family
    decoder: torch.nn.Module
    layers: torch.nn.ModuleList
    rotary: torch.nn.Module | None  # None: no rotary embedding (ALiBi)
    embeddings: torch.nn.Embedding
    final_norm: torch.nn.Module
    head: torch.nn.Module
    kv_heads: int  # H_kv of the cache
    head_dim: int  # D
    #: the head's logits are divided by this (Granite), None: used as they come
    logits_divisor: float | None
    #: final logit softcap c (Gemma): ``logits = c * tanh(logits / c)``, None: none
    logits_softcap: float | None = None
    #: the head's logits are multiplied by this (Cohere), None: used as they come
    logits_scale: float | None = None
    #: per layer, the rotary frequencies it rotates keys by; None on NoPE layers
    layer_inv_freq: tuple[torch.Tensor | None, ...] = ()

    @property
    def alibi(self) -> bool:
        """Positions by ALiBi: no layer has a rotary table."""
        return all(t is None for t in self.layer_inv_freq)

    @property
    def rotary_dim(self) -> int:
        """Dims of each head the first rotary layer rotates (the first ones): 2 * len(inv_freq)."""
        tables = [t for t in self.layer_inv_freq if t is not None]
        return 2 * int(tables[0].numel()) if tables else 0

    def rope_type(self) -> str:
        """The rotary embedding's rope type(s): ``default``, or ``full_attention=default,...``
        for per-layer-type tables (Gemma 3)."""
        if self.rotary is None:
            return "none"
        kind = getattr(self.rotary, "rope_type", "default")
        if isinstance(kind, dict):
            return ",".join(f"{k}={v}" for k, v in sorted(kind.items()))
        return str(kind)

    def attention(self, layer: int) -> torch.nn.Module:
        module: torch.nn.Module = getattr(self.layers[layer], self.family.layout.attention)
        return module

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head over final hidden states ``[..., E]``, then the family's transform, in the
        head's dtype as the model's own forward does it (so logits match it bit for bit)."""
        out: torch.Tensor = self.head(hidden)
        if self.logits_divisor is not None:
            out = out / self.logits_divisor
        if self.logits_scale is not None:
            out = out * self.logits_scale
        if self.logits_softcap is not None:  # the three ops Gemma's forward does, in order
            out = torch.tanh(out / self.logits_softcap) * self.logits_softcap
        return out


def bind(model: Any) -> BoundFamily:
    """``model``'s pieces per its family's layout.

    Raises ``UnsupportedModelError`` naming the family's missing piece for a refused family,
    an unknown model type, or a model lacking a piece its layout names."""
    config = model.config
    model_type = str(getattr(config, "model_type", "?"))
    name = type(model).__name__
    if model_type in REFUSED_FAMILIES:
        raise UnsupportedModelError(f"{name} (model type {model_type!r}) needs "
                                    f"{REFUSED_FAMILIES[model_type]}")
    family = family_of(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"{name}: model type {model_type!r} has no architecture adapter")
    lay = family.layout
    decoder = _piece(model, lay.decoder, name, f"the {family.name} decoder at {lay.decoder} "
                     "(pass the causal LM, not its base model)")
    layers = _piece(decoder, lay.layers, name, f"decoder layers at {lay.decoder}.{lay.layers}")
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise UnsupportedModelError(f"{name} lacks decoder layers at {lay.decoder}.{lay.layers}")
    attention = _piece(layers[0], lay.attention, name,
                       f"attention at {lay.decoder}.{lay.layers}[0].{lay.attention}")
    rotary = None
    if lay.rotary is not None:
        rotary = _piece(decoder, lay.rotary, name,
                        f"a rotary position embedding at {lay.decoder}.{lay.rotary}")
    tables = family.rope_tables(rotary, config, len(layers))
    rotating = [t for t in tables if not (isinstance(t, str) and t == NOPE)]
    if not (rotating or family.alibi) or not all(isinstance(t, torch.Tensor) for t in rotating):
        raise UnsupportedModelError(f"{name}: {lay.decoder}.{lay.rotary} lacks inv_freq")
    embeddings = _piece(decoder, lay.embeddings, name, f"embeddings at {lay.decoder}."
                        f"{lay.embeddings}")
    divisor = getattr(config, family.logits_divisor, None) if family.logits_divisor else None
    softcap = getattr(config, family.logits_softcap, None) if family.logits_softcap else None
    scale = getattr(config, family.logits_scale, None) if family.logits_scale else None
    return BoundFamily(
        family=family,
        decoder=decoder,
        layers=layers,
        rotary=rotary,
        embeddings=embeddings,
        final_norm=_piece(decoder, lay.final_norm, name, f"final norm at {lay.decoder}."
                          f"{lay.final_norm}"),
        head=_piece(model, lay.head, name, f"output head at {lay.head}"),
        kv_heads=family.kv_heads(config),
        head_dim=_head_dim(attention, config),
        logits_divisor=float(divisor) if divisor is not None else None,
        logits_softcap=float(softcap) if softcap is not None else None,
        logits_scale=float(scale) if scale is not None else None,
        layer_inv_freq=tuple(None if isinstance(t, str) else t for t in tables),
    )


def _piece(owner: Any, attribute: str, model_name: str, what: str) -> Any:
    found = getattr(owner, attribute, None)
    if found is None:
        raise UnsupportedModelError(f"{model_name} lacks {what}")
    return found


def _head_dim(attention: torch.nn.Module, config: Any) -> int:
    """D: the attention's own ``head_dim`` (``head_size`` in GPT-NeoX), else hidden / heads."""
    for name in ("head_dim", "head_size"):
        value = getattr(attention, name, None)
        if isinstance(value, int):
            return value
    return int(config.hidden_size) // int(config.num_attention_heads)
