"""The StreamingLLM sink-KV engine against independent references, on tiny seeded models.

The helpers here (tiny engines, token streams, state comparisons, the plain sink-window
reference, ``_through_bytes``) serve the other ``test_sinkkv_*`` modules too: a state's export
and import in ``test_sinkkv_state.py``, the engine's API (batches, purity, prompts, scores,
refusals) in ``test_sinkkv_engine.py``."""

from __future__ import annotations

import inspect
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from state_store.tensors import RawTensor, StateSnapshot
from workers.engines.sinkkv import SinkKVEngine, SinkKVState, cache_keyword
from workers.engines.sinkkv.families import bind
from workers.engines.tiny import SUPPORTED_ARCHS, tiny_hf_model
from workers.engines.tokenizers import ByteTokenizer

try:  # the msgpack envelope, when present
    from state_store import codec
except ImportError:  # pragma: no cover
    codec = None  # type: ignore[assignment]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_engine(arch: str = "llama", seed: int = 0, **kw: Any) -> SinkKVEngine:
    model = tiny_hf_model(arch, seed, **kw.pop("model_overrides", {}))
    kw.setdefault("sink_tokens", 4)
    kw.setdefault("recent_tokens", 24)
    kw.setdefault("chunk_tokens", 8)
    return SinkKVEngine(model, ByteTokenizer(), model_name=f"tiny-{arch}:{seed}", **kw)


def stream(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def state_tensors(state: SinkKVState) -> list[torch.Tensor]:
    hidden = [] if state.last_hidden is None else [state.last_hidden]
    return [*state.keys, *state.values, state.slots, *hidden]


def assert_states_equal(a: SinkKVState, b: SinkKVState) -> None:
    """Bit-identical states (dtype, shape and bytes)."""
    assert (a.tokens_seen, a.pending) == (b.tokens_seen, b.pending)
    ta, tb = state_tensors(a), state_tensors(b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


def max_state_diff(a: SinkKVState, b: SinkKVState) -> float:
    assert (a.tokens_seen, a.pending) == (b.tokens_seen, b.pending)
    assert torch.equal(a.slots, b.slots)
    ta, tb = state_tensors(a), state_tensors(b)
    assert len(ta) == len(tb)
    return max(
        (x.float() - y.float()).abs().max().item() if x.numel() else 0.0
        for x, y in zip(ta, tb, strict=True)
    )


# ----- an independent reference --------------------------------------------------------------


@contextmanager
def recording_prerope_keys(model: Any) -> Iterator[list[torch.Tensor]]:
    """Record the keys each attention layer hands to RoPE (pre-rotation, ``[B, H, T, D]``), in
    call order (a NoPE layer makes no call; StableLM hands over its first rotary dims only)."""
    module = sys.modules[type(model).__module__]
    calls: list[torch.Tensor] = []
    if not hasattr(module, "apply_rotary_pos_emb"):  # ALiBi: no rotary embedding at all
        yield calls
        return
    original: Callable[..., Any] = module.apply_rotary_pos_emb

    def recorder(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *a: Any):
        calls.append(k.detach().clone())
        return original(q, k, cos, sin, *a)

    module.apply_rotary_pos_emb = recorder
    try:
        yield calls
    finally:
        module.apply_rotary_pos_emb = original


def _layer_cos_sin(model: Any, n: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per layer, HF's own rotary ``cos, sin`` at slots 0..n-1, None on a NoPE layer: the
    layer-type table (Gemma 3) where the rotary embedding takes a layer type."""
    bound = bind(model)
    rotary, x, pos = bound.rotary, torch.zeros(1, dtype=torch.float32), torch.arange(n)[None]
    if rotary is None:  # ALiBi
        return [None] * len(bound.layer_inv_freq)
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for layer, inv in enumerate(bound.layer_inv_freq):
        if inv is None:
            out.append(None)
        elif per_type:
            out.append(rotary(x, pos, model.config.layer_types[layer]))
        else:
            out.append(rotary(x, pos))
    return out


@torch.no_grad()
def reference_logits(
    model: Any, tokens: Sequence[int], sink: int, recent: int, chunk: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sink-window attention written plainly, without the engine's machinery.

    Every token keeps its pre-RoPE key and its value as computed at its own step. Before each
    chunk, the visible tokens (first ``sink`` + last ``recent``) get HF's own rotary embedding
    (``apply_rotary_pos_emb`` of the model's module, each layer's own table; none on a NoPE
    layer; on the first ``rotary_dim`` dims where the attention slices them, as StableLM's
    does) at their slot 0..n-1, the chunk runs at slots n..n+T-1 through a fresh plain
    ``DynamicCache`` (HF's default positions and mask), and then the window is cut.
    Returns logits ``[N, V]`` after each token and the final per-layer keys at their slots.
    """
    module = sys.modules[type(model).__module__]
    n_layers = model.config.num_hidden_layers
    roped = [inv is not None for inv in bind(model).layer_inv_freq]
    kept: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # per token: raw k, v per layer
    widths = [0] * n_layers  # per layer, the dims HF's apply_rotary_pos_emb gets (0: NoPE)

    def rotated(n: int) -> list[torch.Tensor]:
        tables = _layer_cos_sin(model, n)
        out = []
        for layer in range(n_layers):
            raw = torch.cat([kept[t][0][layer] for t in range(n)], dim=2)  # [1, H, n, D]
            rope = tables[layer]
            if rope is None:  # NoPE: keys as computed
                out.append(raw)
                continue
            r = widths[layer]
            turned = module.apply_rotary_pos_emb(raw[..., :r], raw[..., :r], *rope)[1]
            out.append(torch.cat([turned, raw[..., r:]], dim=-1))
        return out

    logits = []
    for start in range(0, len(tokens) - len(tokens) % chunk, chunk):
        piece = tokens[start : start + chunk]
        n = len(kept)
        if n:
            keys = rotated(n)
            values = [
                torch.cat([kept[t][1][layer] for t in range(n)], dim=2) for layer in range(n_layers)
            ]
            cache = DynamicCache(list(zip(keys, values, strict=True)))
        else:
            cache = DynamicCache()
        with recording_prerope_keys(model) as calls:
            out = model(torch.tensor([piece]), **{cache_keyword(model): cache}, use_cache=True)
        assert len(calls) == sum(roped)
        raw_keys = []  # per layer, the chunk's keys before RoPE [1, H, T, D]
        recorded = iter(calls)
        for layer in range(n_layers):
            cached = cache.layers[layer].keys[:, :, n : n + len(piece)]
            if not roped[layer]:
                raw_keys.append(cached)  # NoPE: the cache holds them as computed
                continue
            pre = next(recorded)  # the dims past a sliced rotary part are cached unrotated
            widths[layer] = pre.shape[-1]
            raw_keys.append(torch.cat([pre, cached[..., pre.shape[-1] :]], dim=-1))
        logits.append(out.logits[0].float())
        for t in range(len(piece)):
            kept.append(
                (
                    [raw_keys[layer][:, :, t : t + 1] for layer in range(n_layers)],
                    [
                        cache.layers[layer].values[:, :, n + t : n + t + 1]
                        for layer in range(n_layers)
                    ],
                )
            )
        if len(kept) > sink + recent:
            kept = kept[:sink] + kept[len(kept) - recent :]
    return torch.cat(logits), rotated(len(kept))


def engine_logits(engine: SinkKVEngine, tokens: Sequence[int]) -> tuple[torch.Tensor, SinkKVState]:
    """Logits after each token, chunk by chunk, then the state after all of them."""
    state, out, c = engine.new_state(), [], engine.chunk_tokens
    for start in range(0, len(tokens) - len(tokens) % c, c):
        piece = tokens[start : start + c]
        out.append(engine.logits(state, piece))
        state = engine.feed(state, piece)
    return torch.cat(out), state


def _through_bytes(engine: SinkKVEngine, snap: StateSnapshot) -> StateSnapshot:
    if codec is None:
        tensors = {k: RawTensor(t.dtype, t.shape, bytes(t.data)) for k, t in snap.tensors.items()}
        return StateSnapshot(tensors=tensors, scalars=dict(snap.scalars))
    env = codec.StateEnvelope(
        engine=engine.kind,
        fingerprint=engine.fingerprint,
        params=engine.params,
        tokens_seen=int(snap.scalars["tokens_seen"]),  # type: ignore[call-overload]
        last_entry_id="1-0",
        snapshot=snap,
    )
    back = codec.decode_state(codec.encode_state(env))
    codec.check_compatible(back, engine.kind, engine.fingerprint, engine.params)
    return back.snapshot


# ----- 1. no eviction: identical to a plain DynamicCache ---------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_no_eviction_is_identical_to_plain_dynamic_cache(arch: str) -> None:
    engine = make_engine(arch, sink_tokens=4, recent_tokens=200, chunk_tokens=8)
    tokens = stream(100)  # 96 cached + 4 pending: nothing is evicted
    model = engine.model
    cache = DynamicCache()
    plain = []
    with torch.no_grad():
        for start in range(0, 96, 8):
            out = model(torch.tensor([tokens[start : start + 8]]), **{cache_keyword(model): cache})
            plain.append(out.logits[0].float())
    got, state = engine_logits(engine, tokens[:96])
    assert torch.equal(got, torch.cat(plain))
    assert state.cache_len == 96 and torch.equal(state.slots, torch.arange(96))
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(state.keys[layer], cache.layers[layer].keys[0])
        assert torch.equal(state.values[layer], cache.layers[layer].values[0])
    # score over pending + new tokens equals the plain run's log-probs
    state = engine.feed(state, tokens[96:99])
    with torch.no_grad():
        out = model(torch.tensor([tokens[96:100]]), **{cache_keyword(model): cache})
    plain_lp = torch.log_softmax(torch.cat([plain[-1][-1:], out.logits[0].float()]), dim=-1)
    expect = [plain_lp[i, tokens[96 + i]].item() for i in range(4)][3:]
    assert engine.score(state, tokens[99:100]) == expect


# ----- 2. after eviction: matches the per-token / per-chunk reference -------------------------


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_per_token_matches_reference_after_eviction(arch: str) -> None:
    engine = make_engine(arch, sink_tokens=4, recent_tokens=20, chunk_tokens=1)
    tokens = stream(90, seed=1)
    got, state = engine_logits(engine, tokens)
    want, want_keys = reference_logits(engine.model, tokens, 4, 20, 1)
    assert (got - want).abs().max().item() <= 1e-5
    assert state.cache_len == 24
    for mine, ref in zip(engine.rotated_keys(state), want_keys, strict=True):
        assert (mine - ref[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "yarn-rope"])
def test_chunked_matches_reference_with_chunk_visibility(arch: str) -> None:
    engine = make_engine(arch, sink_tokens=4, recent_tokens=28, chunk_tokens=8)
    tokens = stream(160, seed=2)
    got, state = engine_logits(engine, tokens)
    want, want_keys = reference_logits(engine.model, tokens, 4, 28, 8)
    assert (got - want).abs().max().item() <= 1e-5
    for mine, ref in zip(engine.rotated_keys(state), want_keys, strict=True):
        assert (mine - ref[0]).abs().max().item() <= 1e-5


def test_eviction_keeps_sinks_and_recent_slots() -> None:
    engine = make_engine(sink_tokens=4, recent_tokens=12, chunk_tokens=4)
    state = engine.feed(engine.new_state(), stream(40))
    assert state.cache_len == 16 and state.tokens_seen == 40 and state.pending == []
    # sinks never move; recent keys were rotated at slots 16..19 (cache full before each chunk)
    assert state.slots.tolist() == [0, 1, 2, 3] + [16, 17, 18, 19] * 3


# ----- 3. replay determinism -------------------------------------------------------------------


def test_replay_in_any_batch_split_is_bit_identical() -> None:
    engine = make_engine(sink_tokens=4, recent_tokens=20, chunk_tokens=8)
    tokens = stream(203, seed=4)
    reference = engine.feed(engine.new_state(), tokens)
    rng = random.Random(0)
    for _ in range(3):
        state, i = engine.new_state(), 0
        while i < len(tokens):
            n = rng.choice([1, 3, 7, 8, 13, 40])
            state = engine.feed(state, tokens[i : i + n])
            i += n
        assert_states_equal(state, reference)


# ----- 4. bf16 storage: no drift after >1000 window shifts ---------------------------------------


def test_bf16_keys_do_not_drift_over_a_thousand_shifts() -> None:
    """Each kept key, re-rotated to its current slot, stays within bf16 rounding of the exact
    fp32 key HF would compute there, even for keys shifted more than 1000 times."""
    sink, recent = 4, 1008
    engine = make_engine(
        sink_tokens=sink,
        recent_tokens=recent,
        chunk_tokens=1,
        storage_dtype="bfloat16",
        model_overrides={"num_hidden_layers": 1},
    )
    tokens = stream(sink + recent + 1020, seed=5)
    with recording_prerope_keys(engine.model) as calls:
        state = engine.feed(engine.new_state(), tokens)
    assert len(calls) == len(tokens)  # one layer, one token per forward
    n = len(tokens)
    kept = list(range(sink)) + list(range(n - recent, n))  # stream index of each cached token
    assert state.slots[sink].item() == sink + recent  # oldest recent key: shifted 1008 times
    raw = torch.cat([calls[t] for t in kept], dim=2)  # [1, H, L, D] pre-RoPE fp32
    module = sys.modules[type(engine.model).__module__]
    cos, sin = engine.model.get_decoder().rotary_emb(raw, torch.arange(len(kept))[None])
    exact = module.apply_rotary_pos_emb(raw, raw, cos, sin)[1][0]  # [H, L, D]
    mine = engine.rotated_keys(state)[0]  # [H, L, D] from bf16 storage
    half = exact.shape[-1] // 2

    def pair_norm(x: torch.Tensor) -> torch.Tensor:  # norm of each rotated (i, i + D/2) pair
        return torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)

    # bf16 rounds each element to 2**-9 relative: a rotation keeps pair norms, so the error of
    # a re-rotated pair is bounded by the one rounding at store time
    err = pair_norm(mine - exact)
    assert bool((err <= 2**-8 * pair_norm(exact) + 1e-6).all()), err.max()
    assert (mine - exact).abs().max().item() > 0  # bf16 really rounded something
