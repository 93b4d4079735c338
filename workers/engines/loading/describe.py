"""What an engine is, for ``sinkstream model info``: its model, dimensions and state size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.engines.base import Engine

if TYPE_CHECKING:
    from sinkstream.settings import Settings

__all__ = ["describe_engine", "full_state_nbytes"]


def full_state_nbytes(engine: Engine[Any]) -> int:
    """Bytes one stream's state holds at its largest (a full sink + recent window), as the
    engine's own ``state_nbytes`` counts them. RWKV states have one size."""
    from workers.engines.sinkkv import SinkKVEngine, SinkKVState

    if isinstance(engine, SinkKVEngine):
        import torch

        cap = engine.window.capacity

        def kv() -> tuple[torch.Tensor, ...]:
            shape = (engine.kv_heads, cap, engine.head_dim)
            return tuple(
                torch.empty(shape, dtype=engine.storage_dtype, device="meta")
                for _ in range(engine.n_layers)
            )

        full = SinkKVState(
            tokens_seen=cap,
            keys=kv(),
            values=kv(),
            slots=torch.empty(cap, dtype=torch.long, device="meta"),
            last_hidden=torch.empty(engine.hidden_size, dtype=engine.compute_dtype, device="meta"),
        )
        return engine.state_nbytes(full)
    return engine.state_nbytes(engine.new_state())


def _sinkkv_layout(engine: Engine[Any]) -> dict[str, Any]:
    """Family, position scheme, per-layer windows and bytes per token of a sink-KV engine."""
    from workers.engines.sinkkv import SinkKVEngine
    from workers.engines.sinkkv.info import describe_layout

    return describe_layout(engine) if isinstance(engine, SinkKVEngine) else {}


def describe_engine(engine: Engine[Any], settings: Settings | None = None) -> dict[str, Any]:
    """What ``sinkstream model info`` prints."""
    info: dict[str, Any] = {"model": engine.model_name, "engine": engine.kind}
    model = getattr(engine, "model", None)
    if model is not None and hasattr(model, "config"):
        config = model.config
        info["architecture"] = (
            ", ".join(getattr(config, "architectures", None) or []) or type(model).__name__
        )
        info["model_type"] = config.model_type
        info["parameters"] = sum(p.numel() for p in model.parameters())
        info["layers"] = getattr(engine, "n_layers", config.num_hidden_layers)
        info["kv_heads"] = getattr(engine, "kv_heads", None)
        info["head_dim"] = getattr(engine, "head_dim", None)
        info["vocab_size"] = getattr(engine, "vocab_size", config.vocab_size)
        from workers.engines.sinkkv.positions import position_limit

        info["context_length"] = position_limit(config)  # MPT: max_seq_len
        info["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    elif engine.kind == "rwkv":
        info["architecture"] = f"RWKV-{getattr(engine, 'version', '?')}"
        info["checkpoint"] = str(getattr(engine, "path", ""))
        info["layers"] = getattr(engine, "n_layer", None)
        info["hidden_size"] = getattr(engine, "n_embd", None)
        info["vocab_size"] = getattr(engine, "vocab_size", None)
        rwkv_model = getattr(engine, "_model", None)
        weights = getattr(rwkv_model, "z", None) or getattr(rwkv_model, "w", None)
        if isinstance(weights, dict):
            info["parameters"] = sum(int(t.numel()) for t in weights.values())
    info["fingerprint"] = engine.fingerprint
    info["engine_params"] = engine.params
    info.update(_sinkkv_layout(engine))
    info["state_bytes_per_stream"] = full_state_nbytes(engine)
    if settings is not None:
        info["device"] = settings.device
        info["model_cache_dir"] = str(settings.model_cache_dir)
    return info
