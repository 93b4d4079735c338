"""The steady-state re-rotation path: rotation tables kept per slot pattern
(``LayerRotary.moved``) and the whole-width product by cos (``rotate_into``'s ``cos_whole``)
change nothing, bit for bit, and a steady stream computes its tables once."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from workers.engines.sinkkv import SinkKVEngine
from workers.engines.sinkkv import rotary as rotary_module
from workers.engines.sinkkv.rotary import MEMO_PATTERNS, LayerRotary, SlotRotary
from workers.engines.tiny import tiny_hf_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def _inv_freq(r: int) -> torch.Tensor:
    return 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize(("D", "r"), [(16, 16), (16, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_cos_product_is_bit_identical(
    D: int, r: int, interleaved: bool, dtype: torch.dtype
) -> None:
    """One whole-width product by ``[cos, cos]`` equals the two half-width ones, for
    rotate-half and interleaved pairs, full and partial rotary, into a strided view."""
    torch.manual_seed(0)
    table = SlotRotary(_inv_freq(r), 2048, CPU, interleaved)
    stored = torch.randn(3, 1020, D).to(dtype)
    cos, sin = table.cos_sin(torch.arange(1024, 1024 + 1020) - 7, torch.arange(4, 1024))
    halves = torch.empty(3, 1100, D)[:, 4:1024]  # a view into a bigger buffer, as _fill_row
    whole = torch.empty(3, 1100, D)[:, 4:1024]
    table.rotate_into(stored, cos, sin, halves)
    table.rotate_into(stored, cos, sin, whole, table.whole(cos))
    assert torch.equal(halves, whole)
    assert torch.equal(whole[..., r:], stored[..., r:].float())


def test_moved_keeps_tables_per_slot_pattern() -> None:
    """``moved(memo=True)`` computes what ``moved()`` does, returns the kept tables on a repeat
    of the pattern, keeps at most ``MEMO_PATTERNS`` patterns, and reports an unmoved window."""
    rot = LayerRotary.of([_inv_freq(16), None], 16, 2048, CPU)
    slots = torch.cat([torch.arange(4), torch.arange(1024, 1088).repeat(16)[:1020]])
    fresh = rot.moved(slots, CPU)
    kept = rot.moved(slots, CPU, memo=True)
    assert fresh.first == kept.first == 4
    assert fresh.halves is not None and kept.halves is not None and kept.cos_whole is not None
    for (c0, s0), (c1, s1), w, t in zip(fresh.halves, kept.halves, kept.cos_whole, rot.tables,
                                        strict=True):
        assert torch.equal(c0, c1) and torch.equal(s0, s1)
        assert torch.equal(w, t.whole(c1))
    assert rot.moved(slots.clone(), CPU, memo=True) is kept  # same pattern: same tables
    unmoved = rot.moved(torch.arange(1024), CPU, memo=True)
    assert (unmoved.first, unmoved.halves, unmoved.cos_whole) == (1024, None, None)
    for shift in range(MEMO_PATTERNS + 2):
        rot.moved(slots + shift, CPU, memo=True)
    assert len(rot._memo) == MEMO_PATTERNS
    assert rot.moved(slots, CPU, memo=True) is not kept  # dropped, computed again


def _engine(**kw: Any) -> SinkKVEngine:
    return SinkKVEngine(tiny_hf_model("llama", 0), None, model_name="tiny-llama:0",
                        sink_tokens=4, recent_tokens=60, chunk_tokens=16, **kw)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_feeds_with_kept_tables_equal_feeds_without(
    monkeypatch: pytest.MonkeyPatch, storage: str
) -> None:
    """Streams fed with tables kept across chunks (and the whole-width cos product) end in the
    same state bit for bit as with nothing kept and the half-width products, alone and in a
    batch of streams at different phases."""
    tokens = [(7 * i + 3) % 256 for i in range(900)]

    def run(engine: SinkKVEngine) -> list[Any]:
        alone = engine.new_state()
        for i in range(0, 600, 50):
            alone = engine.feed(alone, tokens[i : i + 50])
        batch = [engine.new_state() for _ in range(3)]
        for n in (40, 90, 17, 130):
            batch = engine.feed_batch(batch, [tokens[j * 9 : j * 9 + n + 5 * j] for j in range(3)])
        return [(s.keys, s.values, s.slots, s.last_hidden) for s in (alone, *batch)]

    kept_engine = _engine(storage_dtype=storage)
    with_memo = run(kept_engine)
    plain = SlotRotary.rotate_into

    def halves_only(self: SlotRotary, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    out: torch.Tensor, cos_whole: torch.Tensor | None = None) -> None:
        plain(self, k, cos, sin, out)

    monkeypatch.setattr(rotary_module, "MEMO_PATTERNS", 0)
    monkeypatch.setattr(SlotRotary, "rotate_into", halves_only)
    without = run(_engine(storage_dtype=storage))
    for a, b in zip(with_memo, without, strict=True):
        for x, y in zip(a, b, strict=True):
            if isinstance(x, tuple):
                assert all(torch.equal(p, q) for p, q in zip(x, y, strict=True))
            else:
                assert torch.equal(x, y)


def test_a_steady_stream_computes_its_tables_once() -> None:
    """Once the window is full, a stream fed in aligned chunks shows one slot pattern every
    chunk: its tables are computed once, then looked up."""
    tokens = [(7 * i + 3) % 256 for i in range(900)]
    steady = _engine()
    state = steady.new_state()
    for i in range(0, 900, 16):
        state = steady.feed(state, tokens[i : i + 16])
    assert len(steady.rotary._memo) <= MEMO_PATTERNS
    patterns = list(steady.rotary._memo)
    assert patterns[-1] == state.slots.numpy().tobytes()
    computed = 0
    real_cos_sin = SlotRotary.cos_sin

    def counting(self: SlotRotary, stored: torch.Tensor, current: torch.Tensor) -> Any:
        nonlocal computed
        computed += 1
        return real_cos_sin(self, stored, current)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SlotRotary, "cos_sin", counting)
        for i in range(0, 160, 16):
            state = steady.feed(state, tokens[i : i + 16])
    assert computed == 0
    assert list(steady.rotary._memo) == patterns
