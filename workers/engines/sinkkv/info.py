"""What a sink-KV engine makes of its model, for ``sinkstream model info``.

The family whose adapter drives the model, how positions are encoded and re-rotated, the
window each layer attends to, and the bytes a stream's state grows by per cached token: the
facts that decide whether a model is served exactly and what a stream costs in Redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.engines.sinkkv.rotary import ROPE_SCHEME

if TYPE_CHECKING:
    from workers.engines.sinkkv.engine import SinkKVEngine

#: bytes of a cached token's slot (int64), kept once for all layers
_SLOT_BYTES = 8


def position_scheme(engine: SinkKVEngine) -> str:
    """E.g. ``partial rotary, first 16 of 64 dims (rope default); slot-shift/...``."""
    if engine.family.alibi:
        return ("ALiBi bias by cache-slot distance (keys carry no position: never re-rotated); "
                f"{ROPE_SCHEME}")
    rotary_dim, head_dim = engine.rotary.rotary_dim, engine.head_dim
    extent = (
        f"full rotary, all {head_dim} dims"
        if rotary_dim == head_dim
        else f"partial rotary, first {rotary_dim} of {head_dim} dims"
    )
    if engine.family.family.interleaved:
        extent += ", interleaved pairs (2i, 2i+1)"
    return f"{extent} (rope {engine.rope_type}); cached keys re-rotated by {ROPE_SCHEME}"


def layer_positions(engine: SinkKVEngine) -> dict[str, str]:
    """Per layer, how its keys carry positions, runs merged: ``rotary``; ``rotary,
    sliding_attention table`` where tables differ by layer type (Gemma 3); ``NoPE`` where a
    layer uses no position embedding (its keys are never re-rotated)."""
    config = engine.model.config
    tables = engine.family.layer_inv_freq
    distinct = {id(t) for t in tables if t is not None}
    types = getattr(config, "layer_types", None) or []
    described = []
    for layer, inv in enumerate(tables):
        if inv is None:
            scheme = "ALiBi bias" if engine.family.alibi else "NoPE"
            described.append(f"{scheme} (keys never re-rotated)")
        elif len(distinct) > 1 and layer < len(types):
            described.append(f"rotary, {types[layer]} table")
        else:
            described.append("rotary")
    return _merged_runs(described)


def layer_windows(engine: SinkKVEngine) -> dict[str, str]:
    """The window each layer attends to, runs of equal layers merged (``"0-29": ...``).

    Every layer keeps S sinks + R recent tokens and a chunk of T attends to them plus itself.
    A sliding layer (``positions.py``) attends only to the last W slots of that, by slot as
    Hugging Face masks it: where W < S + R + T its sinks fall out of view too."""
    S, R, T = engine.window.sink, engine.window.recent, engine.chunk_tokens
    kept = f"{S} sinks + {R} recent (+{T}-token chunks)"
    described = []
    for window in engine.sliding:
        if window is None:
            described.append(kept)
        elif window >= S + R + T:
            described.append(f"{kept}, inside a sliding window of {window}")
        else:
            described.append(f"its last {window} slots only (sliding window {window}, "
                             f"no sinks) of {kept}")
    return _merged_runs(described)


def state_bytes_per_token(engine: SinkKVEngine) -> int:
    """Bytes one cached token adds to a stream's state: its key and value in every layer
    (storage dtype) and its slot."""
    element = engine.storage_dtype.itemsize
    return engine.n_layers * 2 * engine.kv_heads * engine.head_dim * element + _SLOT_BYTES


def describe_layout(engine: SinkKVEngine) -> dict[str, Any]:
    """The fields ``sinkstream model info`` adds for a sink-KV engine."""
    bound = engine.family
    return {
        "family": bound.family.name,
        "position_scheme": position_scheme(engine),
        "layer_positions": layer_positions(engine),
        "layer_windows": layer_windows(engine),
        "logits": _logits_text(bound.logits_divisor, bound.logits_softcap,
                               bound.logits_scale),
        "batched_attention": (
            "ragged rows" if bound.family.ragged_batches else "one forward per cache length"),
        "state_bytes_per_token": state_bytes_per_token(engine),
    }


def _logits_text(divisor: float | None, softcap: float | None, scale: float | None) -> str:
    """E.g. ``head output / 8`` (Granite), ``softcap 30 * tanh(head output / 30)`` (Gemma),
    ``head output * 0.0625`` (Cohere)."""
    text = "head output" if divisor is None else f"head output / {divisor:g}"
    if scale is not None:
        text += f" * {scale:g}"
    if softcap is not None:
        text = f"softcap {softcap:g} * tanh({text} / {softcap:g})"
    return text


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
