"""How the sink-KV window reaches a transformers model's attention during one forward.

The model gets our own ``DynamicCache`` whose layers (``_WindowLayer``) hand each attention
call its window, re-rotated to the current slots, materialised only when that layer attends,
in one buffer reused by all layers (``_ForwardWindows``): no second copy of the whole window,
and no big allocation per layer. One row uses the model's own attention function unchanged;
several rows of different cache lengths use ``_ragged_attention``, registered with
transformers' ``AttentionInterface`` and switched on only for that forward.

Shapes (nanoGPT style): B batch rows, T new tokens per row, L cached tokens (n for one group
of rows), H query heads, H_kv key/value heads, D head dim.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from workers.engines.sinkkv.rotary import LayerRotary
from workers.engines.sinkkv.state import _Window


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword a transformers model's ``forward`` takes its cache under: ``cache`` from
    transformers 5.24 on (``past_key_values`` still works there with a FutureWarning, until
    5.40), ``past_key_values`` before."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ----- the windows of one forward --------------------------------------------------------------


class _ForwardWindows:
    """The windows of a batch of streams as the model's layers see them in one forward.

    Rows come sorted by cache length (``SinkKVEngine._forward`` sorts them). Rows of equal
    length n share one contiguous buffer pair ``[g, H_kv, n + T, D]`` (compute dtype): their
    cached tokens at slots 0..n-1, then the T new tokens. Rows are *not* padded to the longest
    cache: a multi-row forward attends group by group (``_ragged_attention``), so a short row
    costs its own length, not the longest one's, and no padding mask is built. A single row's
    buffer is exactly the ``[1, H_kv, L + T, D]`` window the model's own attention gets (the
    solo path is unchanged, bit for bit).

    Each layer's keys/values are materialised only when that layer asks for them (``layer``),
    into buffers shared by all layers: layers run one after another and each reads its window
    inside its own attention call, so the next layer may overwrite it. The whole window is thus
    never copied for all layers at once (memory), and no big tensor is allocated per layer (CPU
    page faults cost more than the copies).
    """

    def __init__(
        self, rotary: LayerRotary, windows: Sequence[_Window], T: int, dtype: torch.dtype,
        sliding: Sequence[int | None] = (),
    ) -> None:
        self.windows = windows
        #: per layer, the sliding window it attends through (None: the whole cache)
        self.sliding = tuple(sliding)
        #: the layer whose window was handed out last: the one now attending (a layer's cache
        #: update comes right before its attention call)
        self.current = 0
        self.T = T
        self.lengths = [w.length for w in windows]
        if self.lengths != sorted(self.lengths):
            raise ValueError("rows of a forward must come sorted by cache length")
        self.length = self.lengths[-1]  # L, the longest cache
        first = windows[0].keys[0]
        H, D, dev = first.shape[0], first.shape[2], first.device
        self.dtype, self.device = dtype, dev
        #: (first row, end row, cache length) of each run of rows with equal length
        self.groups = _equal_runs(self.lengths)
        self.group_keys: list[torch.Tensor] = []  # per group [g, H_kv, n + T, D]
        self.group_values: list[torch.Tensor] = []
        self.row_keys: list[torch.Tensor] = []  # per row [H_kv, n_i + T, D]
        self.row_values: list[torch.Tensor] = []
        for start, end, n in self.groups:
            for kind, rows in ((self.group_keys, self.row_keys),
                               (self.group_values, self.row_values)):
                buf = torch.empty(end - start, H, n + T, D, dtype=dtype, device=dev)
                kind.append(buf)
                rows.extend(buf.unbind(0))
        # Per row: the first cached index whose slot moved (sinks never move), and per rotary
        # table the rotation from stored to current slot for the moved ones: cos/sin
        # [n_i - s0_i, D/2] (None: nothing moved), kept per slot pattern (a steady stream
        # repeats one: ``LayerRotary.moved``).
        self.rotary = rotary
        self.moved = [rotary.moved(w.slots, dev, memo=True) for w in windows]
        self.first_moved: list[int] = [m.first for m in self.moved]
        longest_moved = max(n - s0 for n, s0 in zip(self.lengths, self.first_moved, strict=True))
        self.scratch = (  # fp32 rotation output when the model computes in bf16/fp16
            torch.empty(H, longest_moved, D, dtype=torch.float32, device=dev)
            if dtype != torch.float32 and longest_moved
            else None
        )
        self.new_keys: list[torch.Tensor] = []  # per layer [B, H_kv, T, D], as HF made them
        self.new_values: list[torch.Tensor] = []

    def layer(
        self, index: int, new_keys: torch.Tensor, new_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s window incl. the new chunk.

        One row: ``[1, H_kv, L + T, D]``, what the model's own attention function expects.
        Several rows: the last group's buffers, a placeholder; ``_ragged_attention`` reads
        every group (``group_keys``/``group_values``) itself.
        """
        self.current = index
        for i, w in enumerate(self.windows):
            self._fill_row(i, index, w.keys[index], w.values[index])
        for g, (start, end, n) in enumerate(self.groups):  # the new chunk: one copy per group
            self.group_keys[g][:, :, n:] = new_keys[start:end]
            self.group_values[g][:, :, n:] = new_values[start:end]
        self.new_keys.append(new_keys)
        self.new_values.append(new_values)
        if len(self.windows) == 1:
            return self.group_keys[0], self.group_values[0]
        return self.group_keys[-1], self.group_values[-1]

    def _fill_row(
        self, i: int, layer: int, stored_k: torch.Tensor, stored_v: torch.Tensor
    ) -> None:
        """Row ``i``'s cached part of ``layer`` from its stored ``[H_kv, n, D]`` (storage
        dtype): keys that did not move as stored, moved ones rotated once in fp32 to their
        current slot by the layer's own rotary table."""
        n, s0 = self.lengths[i], self.first_moved[i]
        dst = self.row_keys[i]  # [H_kv, n + T, D]
        dst[:, :s0].copy_(stored_k[:, :s0])  # not moved: exactly as stored
        moved = self.moved[i]
        if moved.halves is not None:  # moved: one fp32 rotation from the stored slot
            table = self.rotary.table_of[layer]
            cos, sin = moved.halves[table]
            whole = moved.cos_whole[table] if moved.cos_whole is not None else None
            rotate = self.rotary.tables[table].rotate_into
            if self.scratch is None:
                rotate(stored_k[:, s0:], cos, sin, dst[:, s0:n], whole)
            else:
                tmp = self.scratch[:, : n - s0]
                rotate(stored_k[:, s0:], cos, sin, tmp, whole)
                dst[:, s0:n].copy_(tmp)
        self.row_values[i][:, :n].copy_(stored_v)

    def window_of_current_layer(self) -> int | None:
        """The sliding window of the layer now attending, None for a full-attention layer."""
        return self.sliding[self.current] if self.current < len(self.sliding) else None

    def mask(self, n: int, window: int | None = None) -> torch.Tensor:
        """The additive attention mask ``[T, n + T]`` of rows with ``n`` cached tokens
        (``_additive_mask``)."""
        return _additive_mask(self.T, n, window, self.dtype, self.device)


@functools.lru_cache(maxsize=32)
def _additive_mask(
    T: int, n: int, window: int | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The additive attention mask ``[T, n + T]`` of rows with ``n`` cached tokens and ``T``
    new ones (``dtype``; 0 = attend, -inf = not): every cached token, and the new tokens
    causally. Additive, because SDPA would turn a boolean mask into one on every call. Kept
    across forwards (a steady batch asks for the same few every time); never modified.

    A sliding layer (``window`` W) sees what Hugging Face's sliding mask lets it see, by
    slot: query slot q = n + t attends key slot j iff ``q - W < j <= q``, so the sinks too
    fall out of it once they are W slots back (``masking_utils.sliding_window_overlay``)."""
    mask = torch.zeros(T, n + T, dtype=dtype, device=device)
    q = torch.arange(n, n + T, device=device)[:, None]  # [T, 1] query slots
    j = torch.arange(n + T, device=device)[None, :]  # [1, n + T] key slots
    blocked = j > q
    if window is not None:
        blocked |= j <= q - window
    mask.masked_fill_(blocked, float("-inf"))
    return mask


def _equal_runs(lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(first row, end row, length)`` of each run of equal ``lengths``."""
    groups: list[tuple[int, int, int]] = []
    for i, n in enumerate(lengths):
        if groups and groups[-1][2] == n:
            groups[-1] = (groups[-1][0], i + 1, n)
        else:
            groups.append((i, i + 1, n))
    return groups


def _moved_rotations(
    rotary: LayerRotary, w: _Window, device: torch.device
) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """The first index s0 of ``w`` whose stored slot differs from its index (its current
    slot), and per rotary table the fp32 ``cos, sin`` ``[n - s0, D/2]`` rotating indices s0..
    from their stored to their current slot (None when nothing moved). Keys below s0 (the
    sinks, at least) are used exactly as stored; from s0 on every key goes through one
    rotation, a zero one for a key that did not move (``LayerRotary.moved``, not kept: a
    generate step's pattern never repeats)."""
    moved = rotary.moved(w.slots, device)
    return moved.first, moved.halves


# ----- the attention function of a multi-row forward -------------------------------------------


def _ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for a batched forward of rows with different cache lengths, row by row.

    Registered as a Hugging Face attention implementation (``_RAGGED_ATTENTION``) and switched
    on only for the duration of a multi-row forward. ``query`` is ``[B, H, T, D]``; the keys and
    values are read from ``kwargs["sinkstream_rows"]`` (``_ForwardWindows``), each group at its
    own length, so no row pays for another's (the padded alternative spent ~40% of a 16-stream
    forward attending to padding, plus a GQA head copy). Returns ``[B, T, H, D]`` like
    ``sdpa_attention_forward``. Eval only: ``dropout`` must be 0.
    """
    rows: _ForwardWindows = kwargs["sinkstream_rows"]
    if dropout:
        raise ValueError("the ragged attention path is for inference (dropout 0)")
    B, H, T, D = query.shape
    window = rows.window_of_current_layer()
    softcap: float | None = kwargs.get("softcap")
    sinks: torch.Tensor | None = kwargs.get("s_aux")
    out = torch.empty(B, T, H, D, dtype=query.dtype, device=query.device)
    for g, (start, end, n) in enumerate(rows.groups):
        k, v = rows.group_keys[g], rows.group_values[g]  # [g, H_kv, n + T, D]
        mask = rows.mask(n, window)
        if softcap is None and sinks is None:
            o = torch.nn.functional.scaled_dot_product_attention(
                query[start:end], k, v, attn_mask=mask, scale=scaling,
                enable_gqa=k.shape[1] != H,
            )  # [g, H, T, D]
        else:
            o = _eager_group(query[start:end], k, v, mask, scaling, softcap, sinks)
        out[start:end] = o.transpose(1, 2)
    return out, None


def _eager_group(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
    scaling: float | None, softcap: float | None, sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of one group ``q`` ``[g, H, T, D]`` over ``k, v`` ``[g, H_kv, n + T, D]`` in
    the order of operations of the families' own eager attention, for what SDPA cannot do:

    * Gemma 2 logit softcap: ``w = tanh(w / cap) * cap`` before the mask, softmax in fp32;
    * GPT-OSS learned sinks (one logit per head, ``s_aux``): ``softmax([w, s] - max)`` in
      the logits' dtype, the sink's column dropped, so it takes mass without a value.
    """
    H, D = q.shape[1], q.shape[-1]
    groups = H // k.shape[1]
    if groups > 1:  # repeat_kv: each kv head serves ``groups`` query heads in a row
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else D**-0.5
    w = torch.matmul(q, k.transpose(2, 3)) * scale  # [g, H, T, n + T]
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    w = w + mask
    if sinks is None:
        probs = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        s = sinks.reshape(1, -1, 1, 1).expand(w.shape[0], -1, w.shape[2], -1)
        combined = torch.cat([w, s], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(v.dtype)
    return torch.matmul(probs, v)


#: name of ``_ragged_attention`` in transformers' attention registry
_RAGGED_ATTENTION = "sinkstream_ragged"
_registered = False


def _register_ragged_attention() -> None:
    """Register ``_ragged_attention`` once per process (a global registry in transformers).
    No mask function is registered with it: for an implementation without one, transformers
    skips building the 4D mask (the rows carry their own)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(_RAGGED_ATTENTION, _ragged_attention)
        _registered = True


# ----- the cache layer the model updates -------------------------------------------------------


class _WindowLayer(DynamicLayer):
    """A ``DynamicCache`` layer that hands the model its window from ``_ForwardWindows``.

    ``get_seq_length`` reports the longest cache, so the model's default bookkeeping sees the
    window it attends to; positions are always passed explicitly per row anyway."""

    def __init__(self, windows: _ForwardWindows, index: int) -> None:
        super().__init__()
        self._windows, self._index = windows, index
        self._seen = windows.length
        self.dtype, self.device = windows.dtype, windows.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self._seen

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._windows.layer(self._index, key_states, value_states)
        self._seen += key_states.shape[-2]
        return keys, values
