"""What a sink-KV engine makes of its model, for ``sinkstream model info``.

The family whose adapter drives the model, how positions are encoded and re-rotated, the
window each layer attends to, and the bytes a stream's state grows by per cached token: the
facts that decide whether a model is served exactly and what a stream costs in Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.engines.sinkkv.rotary import ROPE_SCHEME
from workers.engines.sinkkv.support import layer_slides

if TYPE_CHECKING:
    from workers.engines.sinkkv.engine import SinkKVEngine

#: bytes of a cached token's slot (int64), kept once for all layers
_SLOT_BYTES = 8


def position_scheme(engine: SinkKVEngine) -> str:
    """E.g. ``partial rotary, first 16 of 64 dims (rope default); slot-shift/...``."""
    rotary_dim, head_dim = engine.rotary.rotary_dim, engine.head_dim
    extent = (
        f"full rotary, all {head_dim} dims"
        if rotary_dim == head_dim
        else f"partial rotary, first {rotary_dim} of {head_dim} dims"
    )
    return f"{extent} (rope {engine.rope_type}); cached keys re-rotated by {ROPE_SCHEME}"


def layer_windows(engine: SinkKVEngine) -> dict[str, str]:
    """The window each layer attends to, runs of equal layers merged (``"0-29": ...``).

    Every layer keeps S sinks + R recent tokens and a chunk of T attends to them plus itself;
    a layer with a sliding window (``support.layer_slides``) is accepted only
    when that window covers S + R + T, so it never cuts what the sink window keeps."""
    config = engine.model.config
    S, R, T = engine.window.sink, engine.window.recent, engine.chunk_tokens
    described = []
    for layer in range(engine.n_layers):
        text = f"{S} sinks + {R} recent (+{T}-token chunks)"
        if layer_slides(config, layer):
            text += f", inside a sliding window of {config.sliding_window}"
        described.append(text)
    return _merged_runs(described)


def state_bytes_per_token(engine: SinkKVEngine) -> int:
    """Bytes one cached token adds to a stream's state: its key and value in every layer
    (storage dtype) and its slot."""
    element = engine.storage_dtype.itemsize
    return engine.n_layers * 2 * engine.kv_heads * engine.head_dim * element + _SLOT_BYTES


def describe_layout(engine: SinkKVEngine) -> dict[str, Any]:
    """The fields ``sinkstream model info`` adds for a sink-KV engine."""
    bound = engine.family
    divisor = bound.logits_divisor
    return {
        "family": bound.family.name,
        "position_scheme": position_scheme(engine),
        "layer_windows": layer_windows(engine),
        "logits": "head output" if divisor is None else f"head output / {divisor:g}",
        "batched_attention": (
            "ragged rows" if bound.family.ragged_batches else "one forward per cache length"),
        "state_bytes_per_token": state_bytes_per_token(engine),
    }


def _merged_runs(values: list[str]) -> dict[str, str]:
    """``{"0-3": v, "4": w}``: consecutive layers with the same value under one key."""
    runs: dict[str, str] = {}
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            key = str(start) if i - 1 == start else f"{start}-{i - 1}"
            runs[key] = values[start]
            start = i
    return runs
