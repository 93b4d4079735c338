"""A stream's RWKV memory, and its persistence as a ``StateSnapshot``.

State layout (the ``rwkv`` package's order, ``L`` layers, ``C`` channels, ``H`` heads of size
``N``):

* RWKV-7 and v5/v6: 3 tensors per layer: ``[C]`` att token-shift (strategy dtype),
  ``[H, N, N]`` wkv state (always fp32), ``[C]`` ffn token-shift (strategy dtype).
* RWKV-4: 5 per layer: ``[C]`` (strategy dtype), ``aa, bb, pp [C]`` (fp32), ``[C]``.

A state alone cannot be sampled from, so the logits after the last processed token travel
with the state (``RWKVState.logits``) and are persisted with it. A stored state is checked
against the engine that loads it (``StateOwner``): same model fingerprint and chunking, sane
bookkeeping, and tensors of exactly the shapes that engine's model produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from state_store.tensors import StateSnapshot
from workers.engines.base import EngineState, StateMismatchError
from workers.engines.tensor_bytes import from_raw, to_raw

__all__ = [
    "STATE_FORMAT",
    "RWKVState",
    "StateOwner",
    "export_snapshot",
    "import_snapshot",
    "state_nbytes",
    "zero_state",
]

#: bumped when the exported layout changes; stored in every snapshot's scalars
STATE_FORMAT = 1


@dataclass
class RWKVState(EngineState):
    """A stream's RWKV memory.

    ``tensors`` are in the package's layout (see the module docstring) and are treated as
    immutable: the engine never writes into them, so states may share them safely.
    ``logits`` (``[V]``, the package's output dtype) predict the token after the last one
    *processed* (pending tokens are not yet processed); ``None`` only for a fresh stream of
    an engine without ``bos_token_id``.
    """

    tensors: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None


class StateOwner(Protocol):
    """What a snapshot is written with and checked against (an ``RWKVEngine``)."""

    @property
    def kind(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def chunk_tokens(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def device(self) -> str: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def state_template(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of each state tensor, in package order."""
        ...

    @property
    def logits_dtype(self) -> torch.dtype: ...


def zero_state(
    model: Any, version: str, n_layer: int, device: str, dtype: torch.dtype
) -> list[torch.Tensor]:
    """The package's initial state for ``model`` (its own code path where it has one)."""
    if version == "7":
        # Uses the module-global DTYPE/DEVICE, which the package module keeps consistent.
        return list(model.generate_zero_state())
    # v4-v6 only build it inside forward(tokens, None): mirror that code.
    args, w = model.args, model.w
    C, A, dev = args.n_embd, args.n_att, device
    state: list[torch.Tensor] = []
    for i in range(n_layer):
        if version == "4":
            f32 = torch.float32
            state += [
                torch.zeros(C, dtype=dtype, device=dev),
                torch.zeros(A, dtype=f32, device=dev),  # aa
                torch.zeros(A, dtype=f32, device=dev),  # bb
                torch.zeros(A, dtype=f32, device=dev) - 1e30,  # pp
                torch.zeros(C, dtype=dtype, device=dev),
            ]
            continue
        H = args.n_head
        if getattr(args, "time_state", False):
            wkv = w[f"blocks.{i}.att.time_state"].transpose(1, 2).to(torch.float32, device=dev)
        else:
            wkv = torch.zeros((H, A // H, A // H), dtype=torch.float32, device=dev)
        state += [
            torch.zeros(C, dtype=dtype, device=dev),
            wkv.contiguous(),
            torch.zeros(C, dtype=dtype, device=dev),
        ]
    return state


def state_nbytes(state: RWKVState) -> int:
    n = sum(t.numel() * t.element_size() for t in state.tensors)
    if state.logits is not None:
        n += state.logits.numel() * state.logits.element_size()
    return n


def export_snapshot(owner: StateOwner, state: RWKVState) -> StateSnapshot:
    """Tensors ``state.000 ...`` in package order plus ``logits``; identity in scalars.

    The scalars repeat kind/fingerprint/version so ``import_snapshot`` can refuse a foreign
    state by itself, whatever envelope the store wraps around it.
    """
    tensors = {f"state.{i:03d}": to_raw(t) for i, t in enumerate(state.tensors)}
    if state.logits is not None:
        tensors["logits"] = to_raw(state.logits)
    scalars: dict[str, object] = {
        "kind": owner.kind,
        "format": STATE_FORMAT,
        "fingerprint": owner.fingerprint,
        "rwkv_version": owner.version,
        "chunk_tokens": owner.chunk_tokens,
        "tokens_seen": int(state.tokens_seen),
        "pending": [int(t) for t in state.pending],
    }
    return StateSnapshot(tensors=tensors, scalars=scalars)


def import_snapshot(owner: StateOwner, snapshot: StateSnapshot) -> RWKVState:
    """Rebuild a state, validating identity, bookkeeping and every shape; tensors are cast
    to the owner's dtypes (strategy dtype for token-shift vectors and logits, fp32 for
    wkv) and moved to its device. Any mismatch raises :class:`StateMismatchError`."""
    sc = snapshot.scalars
    if sc.get("kind") != owner.kind:
        raise StateMismatchError(f"state is for engine {sc.get('kind')!r}, not 'rwkv'")
    if sc.get("format") != STATE_FORMAT:
        raise StateMismatchError(
            f"RWKV state format {sc.get('format')!r}; this engine reads {STATE_FORMAT}"
        )
    fp = sc.get("fingerprint")
    if fp != owner.fingerprint:
        raise StateMismatchError(
            f"state belongs to model {str(fp)[:16]}..., this engine serves "
            f"{owner.model_name} ({owner.fingerprint[:16]}...)"
        )
    if sc.get("chunk_tokens") != owner.chunk_tokens:
        raise StateMismatchError(
            f"state was fed in chunks of {sc.get('chunk_tokens')!r} tokens, this engine "
            f"uses {owner.chunk_tokens}: replay would not be identical"
        )
    seen, pending = sc.get("tokens_seen"), sc.get("pending")
    if not isinstance(seen, int) or not isinstance(pending, list):
        raise StateMismatchError("state scalars lack tokens_seen/pending")
    pending_ids = [int(t) for t in pending]
    if len(pending_ids) >= owner.chunk_tokens or (seen - len(pending_ids)) % owner.chunk_tokens:
        raise StateMismatchError(
            f"state bookkeeping is inconsistent: {seen} tokens seen, {len(pending_ids)} "
            f"pending, chunk {owner.chunk_tokens}"
        )
    if any(not 0 <= t < owner.vocab_size for t in pending_ids):
        raise StateMismatchError("pending token ids outside the vocabulary")

    template = owner.state_template
    names = [f"state.{i:03d}" for i in range(len(template))]
    expected = set(names) | {"logits"}
    extra = sorted(set(snapshot.tensors) - expected)
    missing = [n for n in names if n not in snapshot.tensors]
    if extra or missing:
        raise StateMismatchError(
            f"RWKV state tensors do not match the model ({len(names)} expected): "
            f"missing {missing[:4]}, unexpected {extra[:4]}"
        )
    tensors: list[torch.Tensor] = []
    for name, (shape, dtype) in zip(names, template, strict=True):
        raw = snapshot.tensors[name]
        if tuple(raw.shape) != shape:
            raise StateMismatchError(
                f"RWKV state tensor {name} has shape {tuple(raw.shape)}, model needs {shape}"
            )
        tensors.append(from_raw(raw, owner.device).to(dtype))
    logits: torch.Tensor | None = None
    raw_logits = snapshot.tensors.get("logits")
    if raw_logits is not None:
        if tuple(raw_logits.shape) != (owner.vocab_size,):
            raise StateMismatchError(
                f"RWKV state logits have shape {tuple(raw_logits.shape)}, "
                f"model needs ({owner.vocab_size},)"
            )
        logits = from_raw(raw_logits, owner.device).to(owner.logits_dtype)
    elif owner.bos_token_id is not None or seen - len(pending_ids) > 0:
        raise StateMismatchError("RWKV state has no logits after processing tokens")
    return RWKVState(tokens_seen=seen, pending=pending_ids, tensors=tensors, logits=logits)
