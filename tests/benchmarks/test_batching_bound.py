"""The batching bound counts a round's matmul FLOPs from the profile: exactly the model's
linear layers times its tokens (tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import batching
from benchmarks.common import bench_settings
from workers.engines.loading import load_engine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_bound_counts_every_linear_flop_and_exceeds_one(tmp_path: Path) -> None:
    settings = bench_settings(sink_tokens=4, recent_tokens=1020, chunk_tokens=batching.CHUNK,
                              model_cache_dir=tmp_path)
    engine = load_engine(settings, "tiny-llama")
    row = batching._bound(engine, 4, seed=4)
    layers = engine.model.model.layers  # the decoder's linears; the head is not in the feed
    weights = sum(m.weight.numel() for layer in layers for m in layer.modules()
                  if isinstance(m, torch.nn.Linear))
    tokens = 4 * batching.CHUNK
    assert row["matmul_gflop"] * 1e9 == pytest.approx(2 * tokens * weights)
    assert row["attention_s"] > 0 and row["matmul_best_s"] > 0
    # every other op counted as free: the bound is above what a batch can reach, and above 1
    assert row["bound"] > 1
