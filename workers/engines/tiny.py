"""Seeded tiny random Hugging Face causal LMs, built from configs (no hub, no files).

They share ``ByteTokenizer``'s vocabulary (256 byte ids), run in milliseconds on a CPU and are
bit-for-bit reproducible from ``(arch, seed, overrides)``: tests, benchmarks and the demo use
them wherever a real model's quality does not matter.

``SUPPORTED_ARCHS`` are the RoPE decoders the sink-KV engine serves exactly (``FAMILY_ARCHS``:
those beyond the Llama layout, one per architecture adapter). ``REFUSED_ARCHS`` are deliberately
unservable configs (ALiBi, scaled RoPE that changes with the sequence, families that need a
piece the engine lacks) for testing the engine's refusals.

Weights are initialised with a larger spread than Hugging Face's default (``initializer_range``
0.1 instead of 0.02) so that attention is far from uniform: a model whose attention ignores
positions would let position bugs pass unnoticed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

#: byte-level vocabulary, as ``workers.engines.tokenizers.ByteTokenizer``
VOCAB_SIZE = 256

#: the common shape of every tiny model: about 100k parameters
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}

_ROPE_BASE = 10000.0
#: sliding window of the tiny sliding layers: shorter than any sink window the tests use
_WINDOW = 12


def _partial_rope(factor: float) -> dict[str, Any]:
    """Default RoPE over the first ``factor`` of each head."""
    return {"rope_type": "default", "rope_theta": _ROPE_BASE, "partial_rotary_factor": factor}


#: arch -> (config class name, config kwargs on top of _COMMON)
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # --- served exactly ---------------------------------------------------------------------
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {"num_hidden_layers": 3}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen3": ("Qwen3Config", {}),
    "llama3-rope": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": _ROPE_BASE,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 512,
            }
        },
    ),
    "yarn-rope": (
        "LlamaConfig",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": _ROPE_BASE,
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
            }
        },
    ),
    # --- other families, one architecture adapter each (sinkkv/families.py) ---------------
    "phi3": ("Phi3Config", {}),
    # Phi-4-mini style: three quarters of each head rotated
    "phi3-partial": ("Phi3Config", {"rope_parameters": _partial_rope(0.75)}),
    "olmo2": ("Olmo2Config", {}),
    # logits divided by logits_scaling; the multipliers act inside the decoder
    "granite": (
        "GraniteConfig",
        {
            "logits_scaling": 8.0,
            "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.3,
        },
    ),
    # Pythia: a quarter of each head rotated, parallel residual, one kv head per query head
    "gpt-neox": ("GPTNeoXConfig", {"rope_parameters": _partial_rope(0.25)}),
    # Falcon-7B: multi-query (one shared key/value head), parallel attention
    "falcon": ("FalconConfig", {"multi_query": True, "new_decoder_architecture": False}),
    # Falcon-40B: the new decoder architecture, grouped kv heads
    "falcon-new": ("FalconConfig", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    # every layer slides over the last 12 slots, well inside the sink window (S + R >= 24)
    "sliding-window": ("MistralConfig", {"sliding_window": _WINDOW}),
    # Gemma 2: sliding then full layer, softcaps small enough to bite on tiny weights,
    # query_pre_attn_scalar 256 (not the head dim 16) scales the queries
    "gemma2": (
        "Gemma2Config",
        {"sliding_window": _WINDOW, "attn_logit_softcapping": 5.0,
         "final_logit_softcapping": 3.0},
    ),
    # GPT-OSS: learned sink logit per head, yarn RoPE, sliding then full layer, tiny MoE
    "gpt-oss": (
        "GptOssConfig",
        {"num_local_experts": 2, "num_experts_per_tok": 1, "sliding_window": _WINDOW},
    ),
    # Gemma 3: local layer at rope_local_base_freq, global at the main theta, sliding then full
    "gemma3": (
        "Gemma3TextConfig",
        {"sliding_window": _WINDOW, "layer_types": ["sliding_attention", "full_attention"],
         "rope_parameters": {
             "sliding_attention": {"rope_type": "default", "rope_theta": _ROPE_BASE},
             "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}},
    ),
    # Cohere (Command-R): interleaved rotary pairs, logits * logit_scale
    "cohere": ("CohereConfig", {}),
    # Cohere2: sliding layer with interleaved RoPE, then a global NoPE layer
    "cohere2": (
        "Cohere2Config",
        {"sliding_window": _WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    # SmolLM3: a RoPE layer, then a NoPE one (no_rope_layers[i] = 0)
    "smollm3": ("SmolLM3Config", {"no_rope_layers": [1, 0]}),
    # partial rotary (a quarter of each head) sliced by the attention itself: StableLM
    "stablelm": (
        "StableLmConfig",
        {"num_key_value_heads": 4, "rope_parameters": _partial_rope(0.25)},
    ),
    # MPT: ALiBi (a bias by key distance), no rotary embedding
    "mpt": ("MptConfig", {}),
    # BLOOM: ALiBi from the attention mask; Falcon with alibi=True likewise
    "bloom": ("BloomConfig", {}),
    "falcon-alibi": ("FalconConfig", {"alibi": True}),
    # --- refused by the sink-KV engine ------------------------------------------------------
    # frequencies recomputed from the sequence length at every forward
    "dynamic-rope": (
        "LlamaConfig",
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": _ROPE_BASE, "factor": 2.0}},
    ),
    "longrope": (
        "LlamaConfig",
        {
            "max_position_embeddings": 8192,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": _ROPE_BASE,
                "factor": 4.0,
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 2048,
            },
        },
    ),
    # ALiBi biases instead of rotary embeddings
    # families needing a piece the engine does not have yet (families.REFUSED_FAMILIES)
}

#: the families beyond Llama's layout the sink-KV engine serves (tests parametrize over them)
FAMILY_ARCHS: tuple[str, ...] = (
    "phi3",
    "phi3-partial",
    "olmo2",
    "granite",
    "gpt-neox",
    "falcon",
    "falcon-new",
    "sliding-window",
    "gemma2",
    "gemma3",
    "gpt-oss",
    "cohere",
    "cohere2",
    "smollm3",
    "stablelm",
    "mpt",
    "bloom",
    "falcon-alibi",
)
SUPPORTED_ARCHS: tuple[str, ...] = (
    "llama",
    "qwen2",
    "mistral",
    "qwen3",
    "llama3-rope",
    "yarn-rope",
    *FAMILY_ARCHS,
)
REFUSED_ARCHS: tuple[str, ...] = (
    "dynamic-rope",
    "longrope",
)

#: config classes whose keyword names differ from the Llama family's: renamed, then dropped
_RENAMED: dict[str, dict[str, str]] = {
    "BloomConfig": {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"},
    "MptConfig": {"hidden_size": "d_model", "num_hidden_layers": "n_layers",
                  "num_attention_heads": "n_heads", "max_position_embeddings": "max_seq_len"},
    "FalconConfig": {"intermediate_size": "ffn_hidden_size"},
}
_DROPPED: dict[str, tuple[str, ...]] = {
    "BloomConfig": ("intermediate_size", "num_key_value_heads", "head_dim",
                    "max_position_embeddings"),
    "MptConfig": ("intermediate_size", "num_key_value_heads", "head_dim", "initializer_range"),
    "FalconConfig": ("num_key_value_heads", "head_dim"),
    "GPTNeoXConfig": ("num_key_value_heads", "head_dim"),
}


def tiny_config(arch: str = "llama", **overrides: Any) -> PretrainedConfig:
    """The config of a tiny model; ``overrides`` replace any config field."""
    import transformers

    if arch not in _PRESETS:
        raise ValueError(
            f"unknown tiny arch {arch!r}; known: {', '.join(SUPPORTED_ARCHS + REFUSED_ARCHS)}"
        )
    class_name, preset = _PRESETS[arch]
    kwargs = {**_COMMON, **preset, **overrides}
    for name in _DROPPED.get(class_name, ()):
        kwargs.pop(name, None)
    renamed = _RENAMED.get(class_name, {})
    kwargs = {renamed.get(k, k): v for k, v in kwargs.items()}
    config_class = getattr(transformers, class_name)
    config: PretrainedConfig = config_class(**kwargs)
    return config


def tiny_hf_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A seeded random causal LM in eval mode, fp32 on CPU.

    The global torch RNG is left untouched: the weights come from a forked RNG seeded with
    ``seed``, so the same ``(arch, seed, overrides)`` always gives the same weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Hugging Face zero-initialises biases; random ones exercise the bias paths (Qwen's
        # q/k/v biases are added before the rotary embedding).
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, config.initializer_range)
    model.eval()
    return model
