"""StreamingLLM attention-sink KV cache for Hugging Face RoPE decoders (arXiv 2309.17453).

A stream's memory is the keys and values of S *sink* tokens (the first S of the stream) plus the
R most recent tokens; everything in between is evicted. Positions are *slots*: the token at
cache index j is treated as position j, whatever its position in the stream (position shift),
so the model never sees a position beyond S + R + chunk.

Hugging Face caches keys after the rotary embedding (RoPE). When the window shifts, a kept
key's slot changes and its rotation must follow. Re-rotating stored keys in place, step after
step, accumulates rounding (badly in bf16). Instead each key is stored exactly as the model
produced it, together with the slot it was rotated at (one int per cached token, shared by all
layers); at use time a temporary fp32 copy is rotated by the angle difference between the
current and the stored slot, then cast to the compute dtype. One rounding, no drift:

    stored key      k_p = R(a_p) k           (a_x = fl32(x * inv_freq), exactly as HF computes)
    key at slot j   R(a_j - a_p) k_p = R(a_j) k

The angle difference is taken in float64 from the same fp32 angles Hugging Face uses, so a
re-rotated key equals the key the model would have produced at slot j up to fp32 rounding.
RoPE's attention scaling (YaRN) is already inside k_p and a rotation does not change it, so the
correction rotation is unscaled.

Shapes (nanoGPT style): B batch rows, T tokens in a chunk, L cached tokens, H_kv key/value
heads, D head dim, E hidden size, V vocabulary. A state stores per layer ``[H_kv, L, D]``.

Feeding: ``aligned_chunks`` cuts the stream into chunks of ``chunk_tokens`` counted from its
start; a chunk attends to [cache + itself, causally], then the cache is evicted down to S + R.
The remainder waits in ``state.pending``. ``generate`` and ``score`` work on temporary copies.
States are never mutated: a new state shares nothing it would have to change (copy-on-write).
The state also keeps the final hidden state after its last token (``[E]``), so the next token
can be scored or sampled without re-feeding anything.

The model gets our own ``DynamicCache``, explicit per-row ``position_ids`` and a 2D attention
mask (rows left-padded to the longest cache). Its layers (``_WindowLayer``) materialise each
layer's re-rotated window only when that layer attends, in one buffer reused by all layers
(``_ForwardWindows``): no second copy of the whole window, and no big allocation per layer.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from state_store.tensors import RawTensor, StateSnapshot
from workers.engines.base import (
    Engine,
    EngineState,
    Sampling,
    StateMismatchError,
    Tokenizer,
    UnsupportedModelError,
    aligned_chunks,
)
from workers.engines.sampling import penalized, pick_token
from workers.engines.tensor_bytes import dtype_name, from_raw, to_raw, torch_dtype
from workers.engines.tokenizers import HFTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: model types whose attention is Llama-style: full rotary on every head with the
#: rotate-half convention, keys cached after RoPE, logits = lm_head(final hidden)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: rope types whose frequencies are fixed (do not depend on the sequence length)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ATTENTION = ("eager", "sdpa")
#: what a stream's user turn starts with, before the first entry
TRANSCRIPT_INTRO = "Here is a live transcript. You will be asked about it.\n\n"
#: names the position scheme in stored states: a state only loads where it means the same
ROPE_SCHEME = "slot-shift/fp32-rerotate/v1"

SUPPORTED_TEXT = (
    "supported: decoder-only causal LMs of type "
    + ", ".join(SUPPORTED_MODEL_TYPES)
    + " with rotary embeddings on the full head dim (rope types "
    + ", ".join(SUPPORTED_ROPE_TYPES)
    + "), attention implementation "
    + " or ".join(SUPPORTED_ATTENTION)
    + ", and no sliding window shorter than sink_tokens + recent_tokens + chunk_tokens"
)

# config fields that do not change what a model computes
_VOLATILE_CONFIG_KEYS = (
    "transformers_version",
    "_name_or_path",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_commit_hash",
)


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword a transformers model's ``forward`` takes its cache under: ``cache`` from
    transformers 5.24 on (``past_key_values`` still works there with a FutureWarning, until
    5.40), ``past_key_values`` before."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ----- eviction policy -----------------------------------------------------------------------


@dataclass(frozen=True)
class SinkWindow:
    """Which cached tokens survive: the first ``sink`` plus the last ``recent``."""

    sink: int
    recent: int

    @property
    def capacity(self) -> int:
        return self.sink + self.recent

    def kept(self, length: int) -> list[tuple[int, int]]:
        """Index ranges ``[start, stop)`` of a cache of ``length`` tokens kept after eviction."""
        if length <= self.capacity:
            return [(0, length)]
        return [(0, self.sink), (length - self.recent, length)]


def _append_evicted(
    old: torch.Tensor, new: torch.Tensor, ranges: list[tuple[int, int]], dim: int
) -> torch.Tensor:
    """``cat([old, new], dim)`` restricted to ``ranges``, without building the full concat."""
    n_old = old.shape[dim]
    if ranges == [(0, n_old + new.shape[dim])]:  # nothing evicted: one plain concat
        return torch.cat([old, new], dim=dim)
    parts = []
    for start, stop in ranges:
        if start < n_old:
            parts.append(old.narrow(dim, start, min(stop, n_old) - start))
        if stop > n_old:
            lo = max(start, n_old) - n_old
            parts.append(new.narrow(dim, lo, stop - n_old - lo))
    return torch.cat(parts, dim=dim)


# ----- slot re-rotation ----------------------------------------------------------------------


class SlotRotary:
    """Rotates keys cached at one slot to another slot, exactly as the model's RoPE would.

    ``inv_freq`` is the model's own buffer (llama3/linear/yarn scaling already applied), in the
    precision the model uses it (a bf16 model rounds it). ``a_x = fl32(x * inv_freq)`` is the
    fp32 angle Hugging Face computes for position x; this class tabulates ``cos a_x, sin a_x``
    in float64 once, and forms the rotation by ``a_j - a_p`` with the angle-difference
    identities (float64, then rounded to fp32 once): no transcendental calls per step.
    """

    def __init__(self, inv_freq: torch.Tensor, max_slots: int, device: torch.device) -> None:
        inv = inv_freq.detach().to(device=device, dtype=torch.float32)  # [D/2]
        slots = torch.arange(max_slots, device=device, dtype=torch.float32)  # [X]
        # same op and dtype as HF: position.float() * inv_freq.float()  -> [X, D/2]
        angles = (slots[:, None] * inv[None, :]).double()
        self.cos_table, self.sin_table = angles.cos(), angles.sin()  # [X, D/2] float64
        self.max_slots = max_slots

    def cos_sin(
        self, stored: torch.Tensor, current: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin`` of shape ``[..., L, D/2]`` rotating from ``stored`` to ``current``
        (int64 slot tensors of shape ``[..., L]``)."""
        shape = (*stored.shape, self.cos_table.shape[1])
        # index_select on flat indices: much cheaper on CPU than advanced indexing
        p, j = stored.reshape(-1), current.reshape(-1)
        cp = self.cos_table.index_select(0, p).view(shape)  # [..., L, D/2]
        sp = self.sin_table.index_select(0, p).view(shape)
        cj = self.cos_table.index_select(0, j).view(shape)
        sj = self.sin_table.index_select(0, j).view(shape)
        cos = (cj * cp + sj * sp).float()  # cos(a_j - a_p)
        sin = (sj * cp - cj * sp).float()  # sin(a_j - a_p)
        return cos, sin

    @staticmethod
    def rotate_into(
        k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Write keys ``k`` ``[..., L, D]`` (any float dtype) rotated by the half-width fp32
        ``cos, sin`` ``[..., L, D/2]`` into the fp32 tensor ``out`` (a view is fine).

        Rotate-half convention, pairs (i, i + D/2), all arithmetic in fp32:
        ``out1 = k1 cos - k2 sin``, ``out2 = k2 cos + k1 sin``.
        """
        half = k.shape[-1] // 2
        k1, k2 = k[..., :half], k[..., half:]
        o1, o2 = out[..., :half], out[..., half:]
        torch.mul(k1, cos, out=o1)
        o1.addcmul_(k2, sin, value=-1.0)
        torch.mul(k2, cos, out=o2)
        o2.addcmul_(k1, sin)


# ----- the cache the model sees during one forward -------------------------------------------


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
        self, rotary: SlotRotary, windows: Sequence[_Window], T: int, dtype: torch.dtype
    ) -> None:
        self.windows = windows
        self.T = T
        self.lengths = [w.length for w in windows]
        if self.lengths != sorted(self.lengths):
            raise ValueError("rows of a forward must come sorted by cache length")
        self.length = self.lengths[-1]  # L, the longest cache
        first = windows[0].keys[0]
        H, D, dev = first.shape[0], first.shape[2], first.device
        #: (first row, end row, cache length) of each run of rows with equal length
        self.groups: list[tuple[int, int, int]] = []
        for i, n in enumerate(self.lengths):
            if self.groups and self.groups[-1][2] == n:
                self.groups[-1] = (self.groups[-1][0], i + 1, n)
            else:
                self.groups.append((i, i + 1, n))
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
        self.dtype, self.device = dtype, dev
        # Per row: the first cached index whose slot moved (sinks never move), and the
        # rotation from stored to current slot for the moved ones: cos/sin [n_i - s0_i, D/2].
        self.first_moved: list[int] = []
        self.cos_sin: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for w in windows:
            moved = (w.slots != torch.arange(w.length)).nonzero()
            s0 = int(moved[0, 0]) if len(moved) else w.length
            self.first_moved.append(s0)
            if s0 < w.length:
                current = torch.arange(s0, w.length)
                self.cos_sin.append(rotary.cos_sin(w.slots[s0:].to(dev), current.to(dev)))
            else:
                self.cos_sin.append(None)
        longest_moved = max(n - s0 for n, s0 in zip(self.lengths, self.first_moved, strict=True))
        self.scratch = (  # fp32 rotation output when the model computes in bf16/fp16
            torch.empty(H, longest_moved, D, dtype=torch.float32, device=dev)
            if dtype != torch.float32 and longest_moved
            else None
        )
        self._masks: dict[int, torch.Tensor] = {}
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
        for i, w in enumerate(self.windows):
            n, s0 = self.lengths[i], self.first_moved[i]
            stored_k, stored_v = w.keys[index], w.values[index]  # [H_kv, n, D] storage dtype
            dst = self.row_keys[i]  # [H_kv, n + T, D]
            dst[:, :s0].copy_(stored_k[:, :s0])  # not moved: exactly as stored
            rotation = self.cos_sin[i]
            if rotation is not None:  # moved: one fp32 rotation from the stored slot
                cos, sin = rotation
                if self.scratch is None:
                    SlotRotary.rotate_into(stored_k[:, s0:], cos, sin, dst[:, s0:n])
                else:
                    tmp = self.scratch[:, : n - s0]
                    SlotRotary.rotate_into(stored_k[:, s0:], cos, sin, tmp)
                    dst[:, s0:n].copy_(tmp)
            self.row_values[i][:, :n].copy_(stored_v)
        for g, (start, end, n) in enumerate(self.groups):  # the new chunk: one copy per group
            self.group_keys[g][:, :, n:] = new_keys[start:end]
            self.group_values[g][:, :, n:] = new_values[start:end]
        self.new_keys.append(new_keys)
        self.new_values.append(new_values)
        if len(self.windows) == 1:
            return self.group_keys[0], self.group_values[0]
        return self.group_keys[-1], self.group_values[-1]

    def mask(self, n: int) -> torch.Tensor:
        """The additive attention mask ``[T, n + T]`` of rows with ``n`` cached tokens (compute
        dtype; 0 = attend, -inf = not): every cached token, and the new tokens causally.
        Shared by all layers. Additive, because SDPA would turn a boolean mask into one on
        every call."""
        found = self._masks.get(n)
        if found is None:
            T, dev = self.T, self.device
            found = torch.zeros(T, n + T, dtype=self.dtype, device=dev)
            found[:, n:].masked_fill_(
                torch.ones(T, T, dtype=torch.bool, device=dev).triu(1), float("-inf"))
            self._masks[n] = found
        return found


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
    out = torch.empty(B, T, H, D, dtype=query.dtype, device=query.device)
    for g, (start, end, n) in enumerate(rows.groups):
        k, v = rows.group_keys[g], rows.group_values[g]  # [g, H_kv, n + T, D]
        o = torch.nn.functional.scaled_dot_product_attention(
            query[start:end], k, v, attn_mask=rows.mask(n), scale=scaling,
            enable_gqa=k.shape[1] != H,
        )  # [g, H, T, D]
        out[start:end] = o.transpose(1, 2)
    return out, None


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


class _WindowLayer(DynamicLayer):
    """A ``DynamicCache`` layer that hands the model its window from ``_ForwardWindows``."""

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


# ----- states ----------------------------------------------------------------------------------


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
    """The model memory of a state (or of a temporary copy of one); never mutated."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    slots: torch.Tensor
    last_hidden: torch.Tensor | None

    @classmethod
    def of(cls, state: SinkKVState) -> _Window:
        return cls(state.keys, state.values, state.slots, state.last_hidden)

    @property
    def length(self) -> int:
        return int(self.slots.shape[0])


def _pieces(tokens: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(tokens), size):
        yield list(tokens[i : i + size])


# ----- the engine ------------------------------------------------------------------------------


class SinkKVEngine(Engine[SinkKVState]):
    """Sink-KV engine for a Llama/Mistral/Qwen2/Qwen3-style Hugging Face causal LM."""

    kind = "sinkkv"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer | Any,
        *,
        model_name: str,
        sink_tokens: int = 4,
        recent_tokens: int = 1020,
        chunk_tokens: int = 64,
        storage_dtype: torch.dtype | str | None = None,
        compute_dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if sink_tokens < 0 or recent_tokens < 1 or chunk_tokens < 1:
            raise ValueError(
                f"need sink_tokens >= 0, recent_tokens >= 1, chunk_tokens >= 1; got "
                f"{sink_tokens}, {recent_tokens}, {chunk_tokens}"
            )
        self.window = SinkWindow(sink_tokens, recent_tokens)
        self.chunk_tokens = chunk_tokens
        self._model_name = model_name
        self.device = torch.device(device)

        _check_supported(model, self.window.capacity + chunk_tokens)
        hf: Any = model  # transformers' typing of .to() confuses mypy
        if compute_dtype is not None:
            hf = hf.to(_as_dtype(compute_dtype))
        self.model: PreTrainedModel = hf.to(self.device).eval()
        self.compute_dtype: torch.dtype = next(self.model.parameters()).dtype
        self.storage_dtype = (
            _as_dtype(storage_dtype) if storage_dtype is not None else self.compute_dtype
        )
        if not self.storage_dtype.is_floating_point:
            raise ValueError(f"storage dtype must be a float type, got {self.storage_dtype}")

        self.tokenizer = _adapt_tokenizer(tokenizer)
        config = self.model.config
        self._decoder = self.model.get_decoder()
        self._cache_kw = cache_keyword(self._decoder)
        self._lm_head = self.model.get_output_embeddings()
        attn = self._decoder.layers[0].self_attn
        self.n_layers = len(self._decoder.layers)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(attn.head_dim)
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(self._decoder.embed_tokens.num_embeddings)
        rotary = self._decoder.rotary_emb
        self.rope_type = str(rotary.rope_type)
        self.rotary = SlotRotary(rotary.inv_freq, self.window.capacity + chunk_tokens, self.device)
        self.eos_token_ids = _eos_ids(self.model, self.tokenizer)
        self._fingerprint: str | None = None
        #: held around every model call: a multi-row forward switches the model's attention
        #: implementation for its duration, which no other call may see
        self._model_lock = threading.Lock()

    # ----- identity ------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def params(self) -> dict[str, Any]:
        return {
            "sink_tokens": self.window.sink,
            "recent_tokens": self.window.recent,
            "chunk_tokens": self.chunk_tokens,
            "storage_dtype": dtype_name(self.storage_dtype),
            "rope": f"{ROPE_SCHEME}:{self.rope_type}",
        }

    # ----- state lifecycle -----------------------------------------------------------------
    def new_state(self) -> SinkKVState:
        empty = torch.zeros(
            self.kv_heads, 0, self.head_dim, dtype=self.storage_dtype, device=self.device
        )
        layers = tuple(empty for _ in range(self.n_layers))  # immutable: sharing is safe
        return SinkKVState(keys=layers, values=layers)

    def feed_batch(
        self, states: Sequence[SinkKVState], token_lists: Sequence[Sequence[int]]
    ) -> list[SinkKVState]:
        if len(states) != len(token_lists):
            raise ValueError(f"{len(states)} states but {len(token_lists)} token lists")
        for tokens in token_lists:
            self._check_tokens(tokens)
        plans = [
            aligned_chunks(s.pending, t, self.chunk_tokens)
            for s, t in zip(states, token_lists, strict=True)
        ]
        windows = [_Window.of(s) for s in states]
        # Round r feeds the r-th chunk of every stream that has one, all in one forward.
        rounds = max((len(chunks) for chunks, _ in plans), default=0)
        for r in range(rounds):
            rows = [i for i, (chunks, _) in enumerate(plans) if len(chunks) > r]
            new_windows, _ = self._forward(
                [windows[i] for i in rows], [plans[i][0][r] for i in rows]
            )
            for i, w in zip(rows, new_windows, strict=True):
                windows[i] = w
        return [
            SinkKVState(
                tokens_seen=s.tokens_seen + len(t),
                pending=rest,
                keys=w.keys,
                values=w.values,
                slots=w.slots,
                last_hidden=w.last_hidden,
            )
            for s, t, (_, rest), w in zip(states, token_lists, plans, windows, strict=True)
        ]

    # ----- the forward ---------------------------------------------------------------------
    @torch.no_grad()
    def _forward(
        self, windows: Sequence[_Window], pieces: Sequence[Sequence[int]]
    ) -> tuple[list[_Window], torch.Tensor]:
        """Feed ``pieces[i]`` (all of length T) after ``windows[i]``; evict; return the new
        windows and the final hidden states ``[B, T, E]``.

        One row runs the model exactly as configured (its own attention function and mask).
        Several rows run with ``_ragged_attention`` (each row attends at its own cache length,
        no padding): the same maths, rounded differently (~1e-6 on fp32 logits), so a stream
        fed in a batch matches it fed alone to that tolerance, not bit for bit.
        """
        B, T = len(windows), len(pieces[0])
        if any(len(p) != T for p in pieces):
            raise ValueError("all rows of one forward must have the same number of tokens")
        order = sorted(range(B), key=lambda i: windows[i].length)
        if order != list(range(B)):  # rows of equal cache length must sit side by side
            new_windows, hidden = self._forward(
                [windows[i] for i in order], [pieces[i] for i in order])
            back = [0] * B
            for j, i in enumerate(order):
                back[i] = j
            return [new_windows[j] for j in back], hidden[torch.tensor(back)]
        dev = self.device
        view = _ForwardWindows(self.rotary, windows, T, self.compute_dtype)
        L, lengths = view.length, view.lengths
        cache = DynamicCache()  # our own cache object, one window layer per model layer
        cache.layers.extend(_WindowLayer(view, i) for i in range(self.n_layers))

        input_ids = torch.tensor([list(p) for p in pieces], dtype=torch.long, device=dev)  # [B, T]
        # explicit positions: row i's new tokens take slots lengths[i] .. lengths[i] + T - 1
        position_ids = (
            torch.tensor(lengths, dtype=torch.long)[:, None] + torch.arange(T)[None, :]
        ).to(dev)  # [B, T]
        with self._model_lock:
            if B == 1:
                out = self._decoder(
                    input_ids=input_ids,
                    attention_mask=torch.ones(1, L + T, dtype=torch.long, device=dev),
                    position_ids=position_ids,
                    **{self._cache_kw: cache},
                    use_cache=True,
                )
            else:
                config = self.model.config
                configured = config._attn_implementation
                _register_ragged_attention()
                config._attn_implementation = _RAGGED_ATTENTION
                try:
                    out = self._decoder(
                        input_ids=input_ids,
                        position_ids=position_ids,
                        **{self._cache_kw: cache},
                        use_cache=True,
                        sinkstream_rows=view,
                    )
                finally:
                    config._attn_implementation = configured
        hidden = out.last_hidden_state  # [B, T, E]
        if len(view.new_keys) != self.n_layers:
            raise RuntimeError("the model did not update every cache layer exactly once")

        # Keep the chunk's own keys/values as the model produced them (not the re-rotated
        # copies of the old ones), append them, evict.
        new_windows = []
        for i, w in enumerate(windows):
            ranges = self.window.kept(lengths[i] + T)
            new_slots = torch.arange(lengths[i], lengths[i] + T)  # [T]
            keys, values = [], []
            for layer in range(self.n_layers):
                k_new = view.new_keys[layer][i].to(self.storage_dtype)  # [H_kv, T, D]
                v_new = view.new_values[layer][i].to(self.storage_dtype)  # [H_kv, T, D]
                keys.append(_append_evicted(w.keys[layer], k_new, ranges, dim=1))
                values.append(_append_evicted(w.values[layer], v_new, ranges, dim=1))
            new_windows.append(
                _Window(
                    keys=tuple(keys),
                    values=tuple(values),
                    slots=_append_evicted(w.slots, new_slots, ranges, dim=0),
                    last_hidden=hidden[i, -1].clone(),  # [E]
                )
            )
        return new_windows, hidden

    def _run(self, window: _Window, tokens: Sequence[int]) -> tuple[_Window, list[torch.Tensor]]:
        """Feed ``tokens`` in pieces of ``chunk_tokens`` (one row), evicting after each piece.

        Returns the final window and each piece's final hidden states ``[1, T, E]``.
        """
        hidden = []
        for piece in _pieces(tokens, self.chunk_tokens):
            (window,), h = self._forward([window], [piece])
            hidden.append(h)
        return window, hidden

    @torch.no_grad()
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., E]`` final hidden states -> fp32 logits ``[..., V]``."""
        logits: torch.Tensor = self._lm_head(hidden.to(self.device))
        return logits.float()

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            if not 0 <= int(t) < self.vocab_size:
                raise ValueError(
                    f"token id {t} outside the model's vocabulary [0, {self.vocab_size})"
                )

    # ----- reading the state ---------------------------------------------------------------
    def rotated_keys(self, state: SinkKVState) -> list[torch.Tensor]:
        """The keys as the model sees them now: per layer ``[H_kv, L, D]`` in fp32, each at
        its current slot (for tests and diagnostics)."""
        current = torch.arange(state.cache_len)
        cos, sin = self.rotary.cos_sin(state.slots.to(self.device), current.to(self.device))
        out = []
        for k in state.keys:
            rotated = torch.empty(k.shape, dtype=torch.float32, device=k.device)
            SlotRotary.rotate_into(k, cos, sin, rotated)
            out.append(rotated)
        return out

    def logits(self, state: SinkKVState, token_ids: Sequence[int]) -> torch.Tensor:
        """fp32 logits ``[N, V]`` after each of ``token_ids``, given the state and its pending
        tokens: what a plain ``DynamicCache`` run would give while nothing is evicted."""
        self._check_tokens(token_ids)
        context = [*state.pending, *token_ids]
        # Pending starts on a chunk boundary, so these pieces follow the stream's chunk grid.
        _, hidden = self._run(_Window.of(state), context)
        if not hidden:
            return torch.zeros(0, self.vocab_size)
        # lm_head per piece, shaped [1, T, E] like the model's own forward
        return torch.cat([self._logits(h)[0] for h in hidden])[len(state.pending) :]

    def generate(
        self,
        state: SinkKVState,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        extra_capacity: int = 0,
    ) -> list[int]:
        self._check_tokens(prompt_ids)
        # a wider copy of this engine (same model) holds the prompt without evicting the window
        engine = self._widened(extra_capacity)
        context = [*state.pending, *prompt_ids]
        window, hidden = engine._run(_Window.of(state), context)
        last = hidden[-1][0, -1] if hidden else state.last_hidden  # [E]
        if last is None:
            raise ValueError("nothing to continue from: the stream is empty and so is the prompt")
        generator = torch.Generator().manual_seed(sampling.seed)
        stops = set(sampling.stop_token_ids) | set(self.eos_token_ids)
        out: list[int] = []
        for step in range(max_new_tokens):
            token = pick_token(self._logits(last), penalized(context, out, sampling), sampling,
                               generator)
            if token in stops:
                break
            out.append(token)
            if step == max_new_tokens - 1:
                break
            (window,), h = engine._forward([window], [[token]])  # evicts as it goes
            last = h[0, -1]
        return out

    def max_extra_capacity(self) -> int:
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        sliding = getattr(self.model.config, "sliding_window", None)
        if sliding:
            limit = min(limit, int(sliding)) if limit else int(sliding)
        return max(0, limit - self.window.capacity - self.chunk_tokens)

    def window_tokens(self) -> int | None:
        return self.window.recent

    def _widened(self, extra: int) -> SinkKVEngine:
        """This engine with ``extra`` more recent slots, for one ``generate`` call.

        A shallow copy: it shares the model, tokenizer and lock, and only has its own window
        policy and a rotary table long enough for the wider slots (cached per size), so
        concurrent feeds on this engine are unaffected.
        """
        if extra == 0:
            return self
        if not 0 < extra <= self.max_extra_capacity():
            raise ValueError(f"extra_capacity {extra} outside [0, {self.max_extra_capacity()}] "
                             "(the model's position limit minus the window)")
        size = -(-extra // 256) * 256  # a few table sizes, not one per prompt length
        size = min(size, self.max_extra_capacity())
        tables: dict[int, SlotRotary] = self.__dict__.setdefault("_wide_rotary", {})
        if size not in tables:
            inv_freq = self._decoder.rotary_emb.inv_freq
            tables[size] = SlotRotary(inv_freq, self.window.capacity + size + self.chunk_tokens,
                                      self.device)
        wide = copy.copy(self)
        wide.window = SinkWindow(self.window.sink, self.window.recent + size)
        wide.rotary = tables[size]
        return wide

    def score(self, state: SinkKVState, token_ids: Sequence[int]) -> list[float]:
        """Log-probabilities; the first token of a stream that has seen nothing has none (NaN)."""
        if not token_ids:
            return []
        self._check_tokens(token_ids)
        context = [*state.pending, *token_ids]
        _, hidden = self._run(_Window.of(state), context)
        # after[k]: logits after context[k], [len(context), V]
        after = torch.cat([self._logits(h)[0] for h in hidden])
        if state.last_hidden is not None:
            first = self._logits(state.last_hidden)[None]  # [1, V]
        else:
            first = torch.full((1, self.vocab_size), math.nan, device=after.device)
        # the prediction for context[k] is the logits after context[k - 1]
        predicting = torch.cat([first, after[:-1]])[len(state.pending) :]  # [N, V]
        logprobs = torch.log_softmax(predicting, dim=-1)
        targets = torch.tensor(list(token_ids), device=logprobs.device)
        picked = logprobs.gather(1, targets[:, None])[:, 0]
        return [float(x) for x in picked.cpu()]

    # ----- persistence ---------------------------------------------------------------------
    def export_state(self, state: SinkKVState) -> StateSnapshot:
        tensors: dict[str, RawTensor] = {"slots": to_raw(state.slots.to(torch.long))}
        for layer, (k, v) in enumerate(zip(state.keys, state.values, strict=True)):
            tensors[f"keys.{layer}"] = to_raw(k)
            tensors[f"values.{layer}"] = to_raw(v)
        hidden = state.last_hidden
        tensors["last_hidden"] = to_raw(
            hidden if hidden is not None else torch.zeros(0, dtype=self.compute_dtype)
        )
        scalars: dict[str, object] = {
            "tokens_seen": int(state.tokens_seen),
            "pending": [int(t) for t in state.pending],
            "layers": len(state.keys),
            "fingerprint": self.fingerprint,
            "params": self.params,
        }
        return StateSnapshot(tensors=tensors, scalars=scalars)

    def import_state(self, snapshot: StateSnapshot) -> SinkKVState:
        sc, ts = snapshot.scalars, snapshot.tensors
        if sc.get("fingerprint") != self.fingerprint:
            raise StateMismatchError(
                f"state belongs to model fingerprint {str(sc.get('fingerprint'))[:16]}..., "
                f"this engine serves {self.model_name!r} ({self.fingerprint[:16]}...)"
            )
        stored_params = sc.get("params")
        if not isinstance(stored_params, dict) or stored_params != self.params:
            theirs = stored_params if isinstance(stored_params, dict) else {}
            diffs = [
                f"{k}: state {theirs.get(k)!r} vs engine {v!r}"
                for k, v in self.params.items()
                if theirs.get(k) != v
            ] + [
                f"{k}: state {theirs[k]!r} vs engine (none)" for k in theirs if k not in self.params
            ]
            raise StateMismatchError(
                "state was made with other engine parameters: " + "; ".join(diffs or ["missing"])
            )

        expected = {"slots", "last_hidden"} | {
            f"{kind}.{layer}" for kind in ("keys", "values") for layer in range(self.n_layers)
        }
        if set(ts) != expected:
            missing, extra = sorted(expected - set(ts)), sorted(set(ts) - expected)
            raise StateMismatchError(f"state tensors differ: missing {missing}, unexpected {extra}")

        tokens_seen, pending = sc.get("tokens_seen"), sc.get("pending")
        if not isinstance(tokens_seen, int) or not isinstance(pending, list):
            raise StateMismatchError("state scalars tokens_seen/pending missing or malformed")
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in pending):
            raise StateMismatchError("state pending tokens are not token ids of this model")
        cached = tokens_seen - len(pending)
        if len(pending) >= self.chunk_tokens or cached < 0 or cached % self.chunk_tokens:
            raise StateMismatchError(
                f"state holds {len(pending)} pending tokens after {tokens_seen} tokens, which "
                f"chunks of {self.chunk_tokens} cannot produce"
            )
        length = min(cached, self.window.capacity)

        def load(name: str, shape: tuple[int, ...], floating: bool) -> torch.Tensor:
            raw = ts[name]
            if tuple(raw.shape) != shape:
                raise StateMismatchError(f"state tensor {name} has shape {raw.shape}, need {shape}")
            is_float = raw.dtype in ("float32", "float16", "bfloat16", "float64")
            if is_float != floating:
                raise StateMismatchError(f"state tensor {name} has dtype {raw.dtype}")
            return from_raw(raw)

        kv_shape = (self.kv_heads, length, self.head_dim)
        keys = tuple(
            load(f"keys.{i}", kv_shape, True).to(self.device, self.storage_dtype)
            for i in range(self.n_layers)
        )
        values = tuple(
            load(f"values.{i}", kv_shape, True).to(self.device, self.storage_dtype)
            for i in range(self.n_layers)
        )
        slots = load("slots", (length,), False).to(torch.long)
        index = torch.arange(length)
        if bool((slots < index).any()) or bool((slots >= self.rotary.max_slots).any()):
            raise StateMismatchError("state slot vector is inconsistent with its cache")
        hidden_shape = (self.hidden_size,) if cached else (0,)
        hidden = load("last_hidden", hidden_shape, True).to(self.device, self.compute_dtype)
        return SinkKVState(
            tokens_seen=tokens_seen,
            pending=list(pending),
            keys=keys,
            values=values,
            slots=slots,
            last_hidden=hidden if cached else None,
        )

    def state_nbytes(self, state: SinkKVState) -> int:
        tensors = [*state.keys, *state.values, state.slots]
        if state.last_hidden is not None:
            tensors.append(state.last_hidden)
        return sum(t.numel() * t.element_size() for t in tensors)

    # ----- text helpers --------------------------------------------------------------------
    def stream_prefix(self) -> list[int]:
        parts = self._chat_parts()
        opening = parts[0] if parts else ""
        return self.tokenizer.encode(opening + TRANSCRIPT_INTRO)

    def summary_prompt(self, instruction: str) -> list[int]:
        parts = self._chat_parts()
        if parts is None:
            return self.tokenizer.encode(f"\n\nInstruction: {instruction}\nAnswer:")
        return self.tokenizer.encode(f"\n---\n{instruction}{parts[1]}")

    def _chat_parts(self) -> tuple[str, str] | None:
        """The chat template around one user message: (text before it, text after it).

        The stream opens the user turn (``stream_prefix``) and a summary closes it and opens
        the assistant's turn, so the transcript is the user's message, not stray context.
        """
        tok = self.tokenizer
        if not (getattr(tok, "chat_template", None) and hasattr(tok, "apply_chat_template")):
            return None
        marker = "\u0000TRANSCRIPT\u0000"
        text = str(tok.apply_chat_template([{"role": "user", "content": marker}],
                                           add_generation_prompt=True, tokenize=False))
        before, found, after = text.partition(marker)
        return (before, after) if found else None


# ----- helpers ---------------------------------------------------------------------------------


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype.removeprefix("torch."))


def _adapt_tokenizer(tokenizer: Any) -> Any:
    """Wrap a transformers tokenizer; pass anything else with encode/decode through."""
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover
        return tokenizer
    return HFTokenizer(tokenizer) if isinstance(tokenizer, PreTrainedTokenizerBase) else tokenizer


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    sources = [
        getattr(tokenizer, "eos_token_ids", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
    ]
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple, set)):
            ids.update(int(i) for i in source if isinstance(i, int))
    return tuple(sorted(ids))


def model_fingerprint(model: PreTrainedModel) -> str:
    """sha256 over the architecture, the config (JSON) and every parameter's bytes."""
    digest = hashlib.sha256(b"sinkstream-model-v1\0")
    digest.update(type(model).__name__.encode() + b"\0")
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode() + b"\0")
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        t = param.detach().to("cpu").contiguous()
        digest.update(f"{name}:{dtype_name(t.dtype)}:{tuple(t.shape)}\0".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_supported(model: Any, window_span: int) -> None:
    """Raise ``UnsupportedModelError`` unless sink-KV serves ``model`` exactly."""
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face model; " + SUPPORTED_TEXT
        )
    model_type = getattr(config, "model_type", "?")
    problems = []
    if getattr(config, "is_encoder_decoder", False):
        problems.append("encoder-decoder models are not supported")
    if model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model type {model_type!r} is not supported")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        problems.append("no rotary position embedding (ALiBi or absolute positions)")
    else:
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            problems.append(f"rope type {rope_type!r} changes frequencies with sequence length")
    rope_params = getattr(config, "rope_parameters", None) or {}
    partial = rope_params.get(
        "partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)
    )
    if partial is not None and float(partial) < 1.0:
        problems.append(f"partial rotary embedding (partial_rotary_factor={partial})")
    elif rotary is not None and decoder is not None and hasattr(rotary, "inv_freq"):
        head_dim = getattr(decoder.layers[0].self_attn, "head_dim", None)
        if head_dim is not None and 2 * rotary.inv_freq.numel() != head_dim:
            problems.append("the rotary embedding does not cover the whole head dim")
    window = getattr(config, "sliding_window", None)
    sliding = model_type == "mistral" or "sliding_attention" in (
        getattr(config, "layer_types", None) or ()
    )
    if sliding and window is not None and int(window) < window_span:
        problems.append(
            f"sliding window {window} is shorter than sink_tokens + recent_tokens + "
            f"chunk_tokens = {window_span}"
        )
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        problems.append(f"attention implementation {impl!r} (load with attn_implementation='sdpa')")
    if problems:
        raise UnsupportedModelError(
            f"cannot serve {type(model).__name__} with a sink-KV cache exactly: "
            + "; ".join(problems)
            + ". "
            + SUPPORTED_TEXT
        )
