"""Per-layer attention facts the engine needs beyond the family's layout: which layers look
through a sliding window, and how wide it is.

StreamingLLM keeps S sinks + R recent tokens for every layer. A layer with a sliding window W
(Mistral, Phi-3 mini, Gemma 2/3 local layers, GPT-OSS, Cohere2) attends, in Hugging Face, to
the key slots ``q - W < j <= q`` of a query at slot q (``masking_utils.sliding_window_overlay``):
where W < S + R + T that layer sees only its own most recent W tokens, sinks excluded, while the
full layers see the whole sink window. The engine masks by slot exactly so, on every path: the
solo path runs the model's own mask, the ragged batched path builds the same mask per layer
(``attention._ForwardWindows.mask``). The state stays S + R tokens for every layer (simpler,
and what a full layer needs); a sliding layer just never attends beyond its window.
"""

from __future__ import annotations

from typing import Any


def layer_slides(config: Any, layer: int) -> bool:
    """Whether ``layer`` attends through a sliding window (``config.sliding_window`` tokens).

    A config that lists layer types slides only on its ``sliding_attention`` layers (Qwen2
    with use_sliding_window off lists none); one that does not slides on every layer when its
    window is set (Mistral; Phi-3, whose mini 4k ships sliding_window 2047)."""
    if getattr(config, "sliding_window", None) is None:
        return False
    types = getattr(config, "layer_types", None)
    if not types:
        return True
    return layer < len(types) and types[layer] == "sliding_attention"


def sliding_windows(config: Any, n_layers: int) -> tuple[int | None, ...]:
    """Per layer, the sliding window W it attends through, None for full attention."""
    window = getattr(config, "sliding_window", None)
    return tuple(
        int(window) if window is not None and layer_slides(config, i) else None
        for i in range(n_layers)
    )


def position_limit(config: Any) -> int | None:
    """The most positions the model was built for: ``max_position_embeddings``, or MPT's
    ``max_seq_len`` (its ALiBi table has that many columns: a longer window cannot attend)."""
    for name in ("max_position_embeddings", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
