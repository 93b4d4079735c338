"""A stream's sink-KV memory, and its persistence as a ``StateSnapshot``.

Shapes (nanoGPT style): L cached tokens, H_kv key/value heads, D head dim, E hidden size.

A stored state is checked against the engine that loads it (``StateOwner``): same model
fingerprint and parameters (window, chunking, storage dtype, position scheme), and tensors
whose names, shapes and dtypes that engine would have produced. A state that passes continues
exactly as it would have in the engine that exported it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from state_store.tensors import RawTensor, StateSnapshot
from workers.engines.base import EngineState, StateMismatchError
from workers.engines.sinkkv.rotary import LayerRotary
from workers.engines.sinkkv.window import SinkWindow
from workers.engines.tensor_bytes import from_raw, to_raw

_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class SinkKVState(EngineState):
    """A stream's sink-KV memory. Treat as immutable: engines return new states.

    ``keys``/``values``: per layer ``[H_kv, L, D]`` in the engine's storage dtype and device;
    keys exactly as the model produced them, rotated at ``slots[j]``.
    ``slots``: ``[L]`` int64 (CPU), the slot each cached key was rotated at (>= its index j).
    ``last_hidden``: ``[E]`` final hidden state after the last cached token (compute dtype),
    so the next token can be scored or sampled without re-feeding anything; None when empty.
    """

    keys: tuple[torch.Tensor, ...] = ()
    values: tuple[torch.Tensor, ...] = ()
    slots: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    last_hidden: torch.Tensor | None = None

    @property
    def cache_len(self) -> int:
        return int(self.slots.shape[0])


@dataclass(frozen=True)
class _Window:
    """The model memory of a state (or of a temporary copy of one); never mutated.

    What a forward reads and returns: a state without its stream bookkeeping (tokens seen,
    pending tokens), so ``generate`` and ``score`` can run ahead on copies.
    """

    keys: tuple[torch.Tensor, ...]  # per layer [H_kv, L, D]
    values: tuple[torch.Tensor, ...]  # per layer [H_kv, L, D]
    slots: torch.Tensor  # [L] int64
    last_hidden: torch.Tensor | None  # [E]

    @classmethod
    def of(cls, state: SinkKVState) -> _Window:
        return cls(state.keys, state.values, state.slots, state.last_hidden)

    @property
    def length(self) -> int:
        return int(self.slots.shape[0])


class StateOwner(Protocol):
    """What a state is made by and checked against (``SinkKVEngine`` provides it)."""

    n_layers: int
    kv_heads: int  # H_kv
    head_dim: int  # D
    hidden_size: int  # E
    vocab_size: int
    chunk_tokens: int
    window: SinkWindow
    rotary: LayerRotary
    device: torch.device
    storage_dtype: torch.dtype
    compute_dtype: torch.dtype

    @property
    def model_name(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def params(self) -> dict[str, Any]: ...


def empty_state(owner: StateOwner) -> SinkKVState:
    """A stream that has seen nothing: per layer an empty ``[H_kv, 0, D]``."""
    empty = torch.zeros(
        owner.kv_heads, 0, owner.head_dim, dtype=owner.storage_dtype, device=owner.device
    )
    layers = tuple(empty for _ in range(owner.n_layers))  # immutable: sharing is safe
    return SinkKVState(keys=layers, values=layers)


def state_nbytes(state: SinkKVState) -> int:
    """Bytes of tensor memory the state holds."""
    tensors = [*state.keys, *state.values, state.slots]
    if state.last_hidden is not None:
        tensors.append(state.last_hidden)
    return sum(t.numel() * t.element_size() for t in tensors)


# ----- export ----------------------------------------------------------------------------------


def export_snapshot(owner: StateOwner, state: SinkKVState) -> StateSnapshot:
    """``state`` as tensors ``slots``, ``keys.<i>``, ``values.<i>``, ``last_hidden`` (empty
    ``[0]`` when None) and scalars naming what made it."""
    tensors: dict[str, RawTensor] = {"slots": to_raw(state.slots.to(torch.long))}
    for layer, (k, v) in enumerate(zip(state.keys, state.values, strict=True)):
        tensors[f"keys.{layer}"] = to_raw(k)
        tensors[f"values.{layer}"] = to_raw(v)
    hidden = state.last_hidden
    tensors["last_hidden"] = to_raw(
        hidden if hidden is not None else torch.zeros(0, dtype=owner.compute_dtype)
    )
    scalars: dict[str, object] = {
        "tokens_seen": int(state.tokens_seen),
        "pending": [int(t) for t in state.pending],
        "layers": len(state.keys),
        "fingerprint": owner.fingerprint,
        "params": owner.params,
    }
    return StateSnapshot(tensors=tensors, scalars=scalars)


# ----- import ----------------------------------------------------------------------------------


def import_snapshot(owner: StateOwner, snapshot: StateSnapshot) -> SinkKVState:
    """Rebuild a state from ``export_snapshot`` output on ``owner``'s device and dtypes.

    Raises ``StateMismatchError`` for a state of another model or parameters, or one whose
    tensors or counts ``owner`` could not have produced."""
    sc, ts = snapshot.scalars, snapshot.tensors
    _check_identity(owner, sc)
    _check_tensor_names(owner, ts)
    tokens_seen, pending = _token_counts(owner, sc)
    cached = tokens_seen - len(pending)
    length = min(cached, owner.window.capacity)  # L

    kv_shape = (owner.kv_heads, length, owner.head_dim)
    keys = tuple(
        _load(ts, f"keys.{i}", kv_shape, True).to(owner.device, owner.storage_dtype)
        for i in range(owner.n_layers)
    )
    values = tuple(
        _load(ts, f"values.{i}", kv_shape, True).to(owner.device, owner.storage_dtype)
        for i in range(owner.n_layers)
    )
    slots = _load(ts, "slots", (length,), False).to(torch.long)  # [L]
    index = torch.arange(length)
    if bool((slots < index).any()) or bool((slots >= owner.rotary.max_slots).any()):
        raise StateMismatchError("state slot vector is inconsistent with its cache")
    hidden_shape = (owner.hidden_size,) if cached else (0,)
    hidden = _load(ts, "last_hidden", hidden_shape, True).to(owner.device, owner.compute_dtype)
    return SinkKVState(
        tokens_seen=tokens_seen,
        pending=list(pending),
        keys=keys,
        values=values,
        slots=slots,
        last_hidden=hidden if cached else None,
    )


def _check_identity(owner: StateOwner, sc: Mapping[str, object]) -> None:
    """Same model (fingerprint) and same engine parameters, or a message naming each one."""
    if sc.get("fingerprint") != owner.fingerprint:
        raise StateMismatchError(
            f"state belongs to model fingerprint {str(sc.get('fingerprint'))[:16]}..., "
            f"this engine serves {owner.model_name!r} ({owner.fingerprint[:16]}...)"
        )
    params = owner.params
    stored_params = sc.get("params")
    if not isinstance(stored_params, dict) or stored_params != params:
        theirs = stored_params if isinstance(stored_params, dict) else {}
        diffs = [
            f"{k}: state {theirs.get(k)!r} vs engine {v!r}"
            for k, v in params.items()
            if theirs.get(k) != v
        ] + [f"{k}: state {theirs[k]!r} vs engine (none)" for k in theirs if k not in params]
        raise StateMismatchError(
            "state was made with other engine parameters: " + "; ".join(diffs or ["missing"])
        )


def _check_tensor_names(owner: StateOwner, ts: Mapping[str, RawTensor]) -> None:
    expected = {"slots", "last_hidden"} | {
        f"{kind}.{layer}" for kind in ("keys", "values") for layer in range(owner.n_layers)
    }
    if set(ts) != expected:
        missing, extra = sorted(expected - set(ts)), sorted(set(ts) - expected)
        raise StateMismatchError(f"state tensors differ: missing {missing}, unexpected {extra}")


def _token_counts(owner: StateOwner, sc: Mapping[str, object]) -> tuple[int, list[int]]:
    """``tokens_seen`` and ``pending``, checked: pending ids of this vocabulary, fewer than a
    chunk, after a whole number of chunks (the only states chunked feeding produces)."""
    tokens_seen, pending = sc.get("tokens_seen"), sc.get("pending")
    if not isinstance(tokens_seen, int) or not isinstance(pending, list):
        raise StateMismatchError("state scalars tokens_seen/pending missing or malformed")
    if not all(isinstance(t, int) and 0 <= t < owner.vocab_size for t in pending):
        raise StateMismatchError("state pending tokens are not token ids of this model")
    cached = tokens_seen - len(pending)
    chunk = owner.chunk_tokens
    if len(pending) >= chunk or cached < 0 or cached % chunk:
        raise StateMismatchError(
            f"state holds {len(pending)} pending tokens after {tokens_seen} tokens, which "
            f"chunks of {chunk} cannot produce"
        )
    return tokens_seen, pending


def _load(
    ts: Mapping[str, RawTensor], name: str, shape: tuple[int, ...], floating: bool
) -> torch.Tensor:
    """Tensor ``name`` (a copy, CPU), refused unless of ``shape`` and a float dtype exactly
    when ``floating``."""
    raw = ts[name]
    if tuple(raw.shape) != shape:
        raise StateMismatchError(f"state tensor {name} has shape {raw.shape}, need {shape}")
    if (raw.dtype in _FLOAT_DTYPES) != floating:
        raise StateMismatchError(f"state tensor {name} has dtype {raw.dtype}")
    return from_raw(raw)
