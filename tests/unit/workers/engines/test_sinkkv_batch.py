"""The sink-KV batched forward (``_ragged_attention``): rows of uneven cache length, sorted and
grouped, each attending at its own length, equal to feeding every stream alone within 1e-5."""

from __future__ import annotations

import pytest
import torch

from tests.unit.workers.engines.test_sinkkv import make_engine, max_state_diff, stream
from workers.engines.sinkkv.attention import _RAGGED_ATTENTION
from workers.engines.sinkkv.state import _Window

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_uneven_unsorted_rows_match_solo_feeds(arch: str) -> None:
    """Fill levels in no particular order, two rows of equal length (one group), a row past
    eviction (re-rotated keys) and an empty one; several rounds."""
    engine = make_engine(arch, sink_tokens=4, recent_tokens=40, chunk_tokens=8)
    new = engine.new_state()
    states = [engine.feed(new, stream(n, i)) for i, n in enumerate([56, 8, 0, 24, 24, 90, 16])]
    news = [stream(n, 20 + i) for i, n in enumerate([16, 24, 8, 8, 16, 40, 3])]
    for _ in range(2):
        batched = engine.feed_batch(states, news)
        for state, tokens, got in zip(states, news, batched, strict=True):
            assert max_state_diff(got, engine.feed(state, tokens)) <= TOL
        states = batched
    assert engine.model.config._attn_implementation != _RAGGED_ATTENTION  # switched back


def test_bf16_compute_and_storage_batched_rows_stay_close() -> None:
    """bf16: the rotation goes through the fp32 scratch buffer; one bf16 rounding apart."""
    engine = make_engine(storage_dtype="bfloat16", compute_dtype="bfloat16",
                         sink_tokens=4, recent_tokens=24, chunk_tokens=8)
    new = engine.new_state()
    states = [engine.feed(new, stream(n, i)) for i, n in enumerate([40, 16, 64])]
    news = [stream(16, 30 + i) for i in range(3)]
    batched = engine.feed_batch(states, news)
    for state, tokens, got in zip(states, news, batched, strict=True):
        solo = engine.feed(state, tokens)
        assert solo.last_hidden is not None and got.last_hidden is not None
        scale = solo.last_hidden.float().abs().max().item()
        assert max_state_diff(got, solo) <= 0.05 * max(1.0, scale)


def test_hidden_states_come_back_in_the_callers_row_order() -> None:
    engine = make_engine()
    new = engine.new_state()
    windows_states = [engine.feed(new, stream(n, i)) for i, n in enumerate([32, 8, 16])]
    pieces = [stream(8, 40 + i) for i in range(3)]

    _, hidden = engine._forward([_Window.of(s) for s in windows_states], pieces)
    for i, (state, piece) in enumerate(zip(windows_states, pieces, strict=True)):
        _, solo = engine._forward([_Window.of(state)], [piece])
        torch.testing.assert_close(hidden[i], solo[0], rtol=TOL, atol=TOL)
