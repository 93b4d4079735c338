"""``generate(..., extra_capacity=N)``: a temporary context (retrieved text + question) that
does not evict the stream's window, on tiny seeded models."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from sinkstream.settings import Settings
from workers.engines.base import Sampling
from workers.engines.loading import load_engine
from workers.engines.sinkkv import SinkKVEngine
from workers.engines.tiny import tiny_hf_model
from workers.engines.tokenizers import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def test_extra_capacity_equals_a_window_that_wide() -> None:
    model = tiny_hf_model("llama", 0)
    narrow = SinkKVEngine(model, ByteTokenizer(), model_name="t", sink_tokens=4,
                          recent_tokens=24, chunk_tokens=8)
    # extra capacity is rounded up to a multiple of 256 slots
    wide = SinkKVEngine(model, ByteTokenizer(), model_name="t", sink_tokens=4,
                        recent_tokens=24 + 256, chunk_tokens=8)
    state = narrow.feed(narrow.new_state(), _tokens(100, 0))  # window full, 72 evicted
    prompt = _tokens(60, 1)  # longer than the whole window
    greedy = Sampling(repetition_penalty=1.0)
    with_room = narrow.generate(state, prompt, 12, greedy, extra_capacity=60 + 12 + 8)
    assert with_room == wide.generate(state, prompt, 12, greedy)
    # without the room, reading the prompt evicts the window: the model sees something else
    assert not torch.allclose(narrow.logits(state, prompt)[-1], wide.logits(state, prompt)[-1])
    # and the room is temporary: the state itself is untouched
    assert state.cache_len == 28 and narrow.feed(narrow.new_state(), _tokens(100, 0)) \
        .keys[0].equal(state.keys[0])


def test_extra_capacity_is_bounded_by_the_models_positions() -> None:
    engine = SinkKVEngine(tiny_hf_model("llama", 0), ByteTokenizer(), model_name="t",
                          sink_tokens=4, recent_tokens=24, chunk_tokens=8)
    limit = engine.max_extra_capacity()
    assert limit == engine.model.config.max_position_embeddings - 28 - 8
    state = engine.feed(engine.new_state(), _tokens(40, 0))
    with pytest.raises(ValueError, match="extra_capacity"):
        engine.generate(state, _tokens(4, 1), 2, extra_capacity=limit + 1)
    assert engine.window_tokens() == 24


def test_rwkv_accepts_and_ignores_extra_capacity(tmp_path: Path) -> None:
    engine = load_engine(Settings(model="tiny-rwkv", model_cache_dir=tmp_path, metrics_port=0))
    state = engine.feed(engine.new_state(), engine.tokenizer.encode("Ana: hello there\n"))
    prompt = engine.tokenizer.encode("Question: who spoke?")
    assert engine.window_tokens() is None
    assert engine.generate(state, prompt, 5, extra_capacity=500) == \
        engine.generate(state, prompt, 5)


@pytest.mark.parametrize(("model", "setting", "phrased"), [
    ("smollm2", None, False),          # its phrasings read wrong: the speakers' own words
    ("qwen2.5-1.5b", None, True),
    ("/models/some-hf-dir", None, True),
    ("smollm2", True, True),           # an explicit setting wins
    ("qwen2.5-1.5b", False, False),
])
def test_notes_phrasing_auto_follows_the_preset(model: str, setting: bool | None,
                                                phrased: bool) -> None:
    from workers.processing.summarizer import phrasing_on

    assert phrasing_on(Settings(model=model, notes_phrasing=setting)) is phrased
