"""The sink-KV engine: a Hugging Face RoPE decoder listening to endless streams.

A stream's memory is the keys and values of S sink tokens plus the R most recent ones
(``window.py``); positions are *slots*: the token at cache index j is treated as position j,
whatever its position in the stream (position shift), so the model never sees a position
beyond S + R + chunk. Keys are stored as the model produced them, with the slot they were
rotated at, and re-rotated once in fp32 at use time (``rotary.py``).

Feeding: ``aligned_chunks`` cuts the stream into chunks of ``chunk_tokens`` counted from its
start; a chunk attends to [cache + itself, causally], then the cache is evicted down to S + R.
The remainder waits in ``state.pending``. ``generate`` and ``score`` work on temporary copies;
``generate``'s token-by-token steps run on one ``DecodeWindow`` per call (``decode.py``), built
once and appended in place, bit-identical to feeding each token as a one-token chunk.
States are never mutated: a new state shares nothing it would have to change (copy-on-write).
The state also keeps the final hidden state after its last token (``[E]``), so the next token
can be scored or sampled without re-feeding anything.

Shapes (nanoGPT style): B batch rows, T tokens in a chunk, L cached tokens, H_kv key/value
heads, D head dim, E hidden size, V vocabulary. A state stores per layer ``[H_kv, L, D]``.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache

from state_store.tensors import StateSnapshot
from workers.engines.base import Engine, Sampling, Tokenizer, aligned_chunks
from workers.engines.sampling import penalized, pick_token
from workers.engines.sinkkv import prompts
from workers.engines.sinkkv.attention import (
    _RAGGED_ATTENTION,
    _equal_runs,
    _ForwardWindows,
    _register_ragged_attention,
    _WindowLayer,
    cache_keyword,
)
from workers.engines.sinkkv.decode import DecodeWindow
from workers.engines.sinkkv.positions import position_limit, sliding_windows
from workers.engines.sinkkv.rotary import ROPE_SCHEME, LayerRotary
from workers.engines.sinkkv.state import (
    SinkKVState,
    _Window,
    empty_state,
    export_snapshot,
    import_snapshot,
    state_nbytes,
)
from workers.engines.sinkkv.support import check_supported, model_fingerprint
from workers.engines.sinkkv.window import SinkWindow, _append_evicted
from workers.engines.tensor_bytes import dtype_name, torch_dtype
from workers.engines.tokenizers import adapt_tokenizer, eos_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class SinkKVEngine(Engine[SinkKVState]):
    """Sink-KV engine for a Hugging Face RoPE causal LM of a family in ``families.py``."""

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

        bound = check_supported(model, self.window.capacity + chunk_tokens)
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

        self.tokenizer = adapt_tokenizer(tokenizer)
        config = self.model.config
        #: the model's pieces per its family's layout (``families.py``); ``Module.to`` moves
        #: them in place, so they are still the model's own
        self.family = bound
        self._decoder = self.family.decoder
        self._cache_kw = cache_keyword(self._decoder)
        self.n_layers = len(self.family.layers)
        #: per layer, its sliding window (None: full attention), masked by slot on every path
        self.sliding = sliding_windows(config, self.n_layers)
        self.kv_heads = self.family.kv_heads
        self.head_dim = self.family.head_dim
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(self.family.embeddings.num_embeddings)
        self.rope_type = self.family.rope_type()
        self.rotary = self._layer_rotary(self.window.capacity + chunk_tokens)
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)
        self._fingerprint: str | None = None
        #: held around every model call: a multi-row forward switches the model's attention
        #: implementation for its duration, which no other call may see
        self._model_lock = threading.Lock()

    def _layer_rotary(self, max_slots: int) -> LayerRotary:
        """Each layer's rotary table over ``max_slots`` slots (``LayerRotary.of``)."""
        return LayerRotary.of(self.family.layer_inv_freq, self.head_dim, max_slots,
                              self.device, self.family.family.interleaved)

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
        return empty_state(self)

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
        no padding), one SDPA call per group of equal length: per row the same kernel and
        reduction order as the model's own SDPA call, and the matmuls round a row alike over
        ``B * T`` rows as over ``T``, so a stream fed in a batch commits the same bits as fed
        alone (``workers/engines/invariance.py`` checks it on the running machine; families
        where it does not hold say so in ``Family.batch_variance``).
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
        if not self.family.family.ragged_batches and windows[0].length != windows[-1].length:
            return self._forward_groups(windows, pieces)
        view = _ForwardWindows(self.rotary, windows, T, self.compute_dtype, self.sliding)
        hidden = self._run_decoder(view, pieces)  # [B, T, E]
        if len(view.new_keys) != self.n_layers:
            raise RuntimeError("the model did not update every cache layer exactly once")
        # each layer's new keys/values as the window stores them, split into rows once
        new_k = [k.to(self.storage_dtype).unbind(0) for k in view.new_keys]  # [H_kv, T, D]
        new_v = [v.to(self.storage_dtype).unbind(0) for v in view.new_values]
        last = hidden[:, -1].clone().unbind(0)  # [E] per row
        return [self._evicted(view.windows[i], view.lengths[i], T, [k[i] for k in new_k],
                              [v[i] for v in new_v], last[i]) for i in range(B)], hidden

    def _forward_groups(
        self, windows: Sequence[_Window], pieces: Sequence[Sequence[int]]
    ) -> tuple[list[_Window], torch.Tensor]:
        """``_forward`` one forward per run of rows with equal cache length (rows sorted), for
        a family whose attention cannot take ragged rows (Falcon computes attention inline and
        does not pass layer kwargs down): rows of one length need no ragged attention, and
        full windows all have one length, so a steady batch is still one forward."""
        new_windows: list[_Window] = []
        hidden = []
        for start, end, _ in _equal_runs([w.length for w in windows]):
            group, h = self._forward(windows[start:end], pieces[start:end])
            new_windows += group
            hidden.append(h)
        return new_windows, torch.cat(hidden)

    def _run_decoder(self, view: _ForwardWindows, pieces: Sequence[Sequence[int]]) -> torch.Tensor:
        """The decoder over ``pieces`` ``[B, T]`` attending to ``view``: final hidden states
        ``[B, T, E]``; the new keys/values land in ``view.new_keys``/``new_values``."""
        dev, T = self.device, view.T
        cache = DynamicCache()  # our own cache object, one window layer per model layer
        cache.layers.extend(_WindowLayer(view, i) for i in range(self.n_layers))
        input_ids = torch.tensor([list(p) for p in pieces], dtype=torch.long, device=dev)  # [B, T]
        # explicit positions: row i's new tokens take slots lengths[i] .. lengths[i] + T - 1
        position_ids = (
            torch.tensor(view.lengths, dtype=torch.long)[:, None] + torch.arange(T)[None, :]
        ).to(dev)  # [B, T]
        B = len(pieces)
        with self._model_lock:
            if B == 1 or not self.family.family.ragged_batches:  # rows of one length
                out = self._decoder(
                    input_ids=input_ids,
                    attention_mask=torch.ones(B, view.length + T, dtype=torch.long, device=dev),
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
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    @torch.no_grad()
    def _decode_step(self, decode: DecodeWindow, token: int) -> torch.Tensor:
        """One generated ``token`` through the decoder on ``decode``'s window (the same call as
        a one-row ``_run_decoder``); returns its final hidden state ``[E]``."""
        dev, n = self.device, decode.length
        with self._model_lock:
            out = self._decoder(
                input_ids=torch.tensor([[token]], dtype=torch.long, device=dev),
                attention_mask=torch.ones(1, n + 1, dtype=torch.long, device=dev),
                position_ids=torch.tensor([[n]], dtype=torch.long, device=dev),
                **{self._cache_kw: decode.cache},
                use_cache=True,
            )
        decode.advance()
        hidden: torch.Tensor = out.last_hidden_state  # [1, 1, E]
        return hidden[0, -1]

    def _evicted(self, w: _Window, n: int, T: int, k_new: Sequence[torch.Tensor],
                 v_new: Sequence[torch.Tensor], last_hidden: torch.Tensor) -> _Window:
        """Window ``w`` (``n`` cached tokens) after a chunk of ``T``: the chunk's own keys and
        values per layer ``[H_kv, T, D]`` (as the model produced them, not the re-rotated
        copies of the old ones, in the storage dtype) appended, then evicted."""
        ranges = self.window.kept(n + T)
        return _Window(
            keys=tuple(_append_evicted(old, new, ranges, dim=1)
                       for old, new in zip(w.keys, k_new, strict=True)),
            values=tuple(_append_evicted(old, new, ranges, dim=1)
                         for old, new in zip(w.values, v_new, strict=True)),
            slots=_append_evicted(w.slots, torch.arange(n, n + T), ranges, dim=0),
            last_hidden=last_hidden,  # [E]
        )

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
        return self.family.logits(hidden.to(self.device)).float()

    def _check_tokens(self, tokens: Sequence[int]) -> None:
        if tokens and not (0 <= min(tokens) and max(tokens) < self.vocab_size):
            bad = next(t for t in tokens if not 0 <= int(t) < self.vocab_size)
            raise ValueError(
                f"token id {bad} outside the model's vocabulary [0, {self.vocab_size})")

    # ----- reading the state ---------------------------------------------------------------
    def rotated_keys(self, state: SinkKVState) -> list[torch.Tensor]:
        """The keys as the model sees them now: per layer ``[H_kv, L, D]`` in fp32, each at
        its current slot (for tests and diagnostics)."""
        current = torch.arange(state.cache_len).to(self.device)
        out = []
        for layer, k in enumerate(state.keys):
            table = self.rotary.layer(layer)
            cos, sin = table.cos_sin(state.slots.to(self.device), current)
            rotated = torch.empty(k.shape, dtype=torch.float32, device=k.device)
            table.rotate_into(k, cos, sin, rotated)
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
        decode: DecodeWindow | None = None  # built at the first token that needs a forward
        for step in range(max_new_tokens):
            token = pick_token(self._logits(last), penalized(context, out, sampling), sampling,
                               generator)
            if token in stops:
                break
            out.append(token)
            if step == max_new_tokens - 1:
                break
            if decode is None:
                decode = DecodeWindow(window, engine.window, engine.rotary,
                                      max_new_tokens - 1 - step, self.compute_dtype)
            last = self._decode_step(decode, token)  # evicts as it goes, like a feed
        return out

    def max_extra_capacity(self) -> int:
        # a sliding layer masks by slot whatever the window's width: only positions limit it
        limit = position_limit(self.model.config) or 0
        return max(0, limit - self.window.capacity - self.chunk_tokens)

    def window_tokens(self) -> int | None:
        return self.window.recent

    def _widened(self, extra: int) -> SinkKVEngine:
        """This engine with ``extra`` more recent slots, for one ``generate`` call.

        Its rotary table is long enough for the wider slots (cached per size).
        """
        if extra == 0:
            return self
        if not 0 < extra <= self.max_extra_capacity():
            raise ValueError(f"extra_capacity {extra} outside [0, {self.max_extra_capacity()}] "
                             "(the model's position limit minus the window)")
        size = -(-extra // 256) * 256  # a few table sizes, not one per prompt length
        size = min(size, self.max_extra_capacity())
        tables: dict[int, LayerRotary] = self.__dict__.setdefault("_wide_rotary", {})
        if size not in tables:
            tables[size] = self._layer_rotary(self.window.capacity + size + self.chunk_tokens)
        return self._with_recent(self.window.recent + size, tables[size])

    def _with_recent(self, recent: int, rotary: LayerRotary) -> SinkKVEngine:
        """A shallow copy with ``recent`` recent slots and ``rotary`` (covering them): it
        shares the model, tokenizer and lock, so feeds on this engine are unaffected."""
        other = copy.copy(self)
        other.window = SinkWindow(self.window.sink, recent)
        other.rotary = rotary
        return other

    def scaled_down(self) -> SinkKVEngine:
        """Two chunks of recent slots: a stream evicts and re-rotates from its third chunk."""
        return self._with_recent(min(self.window.recent, 2 * self.chunk_tokens), self.rotary)

    def batch_variance(self) -> str | None:
        return self.family.family.batch_variance

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

    # ----- persistence (state.py) ----------------------------------------------------------
    def export_state(self, state: SinkKVState) -> StateSnapshot:
        return export_snapshot(self, state)

    def import_state(self, snapshot: StateSnapshot) -> SinkKVState:
        return import_snapshot(self, snapshot)

    def state_nbytes(self, state: SinkKVState) -> int:
        return state_nbytes(state)

    # ----- text helpers (prompts.py) -------------------------------------------------------
    def stream_prefix(self) -> list[int]:
        return prompts.stream_prefix(self.tokenizer)

    def summary_prompt(self, instruction: str) -> list[int]:
        return prompts.summary_prompt(self.tokenizer, instruction)


# ----- helpers ---------------------------------------------------------------------------------


def _pieces(tokens: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(tokens), size):
        yield list(tokens[i : i + size])


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype.removeprefix("torch."))
