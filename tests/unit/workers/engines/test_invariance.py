"""Batch invariance: a stream fed in a batch, with any neighbours in any order, commits the same
bits as the stream fed alone (``workers/engines/invariance.py``), for sink-KV (every family the
engine serves, fp32 and bf16) and RWKV-7 (fp32 and bf16). This is what lets workers batch by
default and still replay a stream bit for bit after a crash."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from sinkstream.settings import load_settings
from tests.unit.workers.engines.test_rwkv import _same
from tests.unit.workers.engines.test_sinkkv import assert_states_equal, make_engine, stream
from workers.engines.base import Engine
from workers.engines.invariance import check_batch_invariance
from workers.engines.rwkv import RWKVEngine
from workers.engines.sinkkv import SinkKVEngine, SinkKVState
from workers.engines.tiny import SUPPORTED_ARCHS
from workers.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: the tiny archs whose family declares batched rows round unlike solo ones (mixture of
#: experts): workers do not batch them (``batch_exact``). Falcon was declared too while its
#: attention was computed inline (transformers 5.23); through the attention interface (5.25)
#: its rows round alike, and the worker's own check guards other versions
NOT_INVARIANT = ("gpt-oss",)


def test_only_moe_families_declare_batched_rows_round_differently() -> None:
    declared = {a for a in SUPPORTED_ARCHS if make_engine(a).batch_variance() is not None}
    assert declared == set(NOT_INVARIANT)


def _rounds(engine: Engine[Any], starts: Sequence[Any]) -> list[tuple[list[int], list[Any]]]:
    """Three batched rounds over ``starts`` with different neighbours and row orders: (rows,
    states fed) per round; every round feeds each of its rows ``stream(...)`` of a new length."""
    c = engine.chunk_tokens
    plans = [[0, 1, 2, 3, 4, 5, 6], [5, 2, 6], [3, 0]]
    out = []
    for r, rows in enumerate(plans):
        news = [stream(c * (1 + (i + r) % 3) + (i % 2), 100 * r + i) for i in rows]
        out.append((rows, [engine.feed_batch([starts[i] for i in rows], news), news]))
    return out


def _rows_round_alike(engine: SinkKVEngine) -> bool:
    """Empty, pending-only, partial and evicted windows (re-rotated keys), uneven lengths:
    every row of every round equal to the stream fed alone."""
    new = engine.new_state()
    starts = [engine.feed(new, stream(n, i)) for i, n in enumerate([0, 5, 16, 40, 90, 24, 61])]
    for rows, (fed, news) in _rounds(engine, starts):
        for i, got, tokens in zip(rows, fed, news, strict=True):
            try:
                assert_states_equal(got, engine.feed(starts[i], tokens))
            except AssertionError:
                return False
    return True


#: families batched through the padded path (their attention is computed inline, no ragged
#: rows): with 8-token chunks, some CPUs' kernels round their rows with the neighbours'
#: padding (MPT and BLOOM in fp32 on an AVX-512 Xeon; identical on an AVX2 EPYC)
PADDED_KERNEL_DEPENDENT = ("mpt", "bloom")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", [a for a in SUPPORTED_ARCHS if a not in NOT_INVARIANT])
def test_sinkkv_rows_round_alike_alone_and_in_any_batch(arch: str, dtype: str) -> None:
    """Every family at the default 64-token chunks; at 8-token chunks (eviction within a few
    chunks) every family but those whose padded rows depend on the CPU's kernels, and for
    those, where they differ, the worker's own check must see it (it then feeds solo)."""
    def engine(chunk: int) -> SinkKVEngine:
        return make_engine(arch, sink_tokens=4, recent_tokens=3 * chunk, chunk_tokens=chunk,
                           compute_dtype=dtype, storage_dtype=dtype)

    assert _rows_round_alike(engine(64))
    small = engine(8)
    if arch in PADDED_KERNEL_DEPENDENT and not _rows_round_alike(small):
        check = check_batch_invariance(small)
        assert not check.invariant, "the worker would batch rows that round differently"
    else:
        assert _rows_round_alike(small)


def _rwkv_rounds_match(directory: Path, strategy: str) -> bool:
    engine = RWKVEngine.tiny(directory, seed=2, strategy=strategy, chunk_tokens=16)
    new = engine.new_state()
    starts = [engine.feed(new, stream(n, i)) for i, n in enumerate([0, 5, 16, 40, 90, 24, 61])]
    return all(_same(got, engine.feed(starts[i], tokens))
               for rows, (fed, news) in _rounds(engine, starts)
               for i, got, tokens in zip(rows, fed, news, strict=True))


def test_rwkv_rows_round_alike_alone_and_in_any_batch_fp32(tmp_path: Path) -> None:
    assert _rwkv_rounds_match(tmp_path, "cpu fp32")


def test_rwkv_rows_round_alike_alone_and_in_any_batch_bf16(tmp_path: Path) -> None:
    """In a child: the rwkv package holds one dtype per process (``package.py``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.workers.engines.test_invariance", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("identical"), proc.stderr


def test_the_check_passes_for_both_engines(tmp_path: Path) -> None:
    for engine in (make_engine("qwen2", chunk_tokens=16), RWKVEngine.tiny(tmp_path)):
        check = check_batch_invariance(engine)
        assert check.invariant, check.reason
        assert "past eviction" in check.reason and check.seconds > 0


def test_the_check_refuses_a_mixture_of_experts_by_design() -> None:
    check = check_batch_invariance(make_engine("gpt-oss"))
    assert not check.invariant and "mixture of experts" in check.reason


class _NeighbourSensitive(SinkKVEngine):
    """Rounds a batched row's memory differently from a solo one (one ulp on the last hidden
    state), as a BLAS with shape-dependent kernels would."""

    def feed_batch(self, states: Sequence[SinkKVState],
                   token_lists: Sequence[Sequence[int]]) -> list[SinkKVState]:
        out = super().feed_batch(states, token_lists)
        if len(states) > 1:
            for s in out:
                if s.last_hidden is not None:
                    s.last_hidden = torch.nextafter(s.last_hidden, s.last_hidden + 1)
        return out


def _sensitive() -> _NeighbourSensitive:
    base = make_engine("llama", chunk_tokens=8)
    engine = _NeighbourSensitive.__new__(_NeighbourSensitive)
    engine.__dict__.update(base.__dict__)
    return engine


def test_the_check_catches_one_ulp_of_difference() -> None:
    check = check_batch_invariance(_sensitive())
    assert not check.invariant
    assert "fed in one batch differs from it fed alone" in check.reason


def _runtime(engine: Engine[Any], **settings: Any) -> Runtime:
    rt = Runtime(load_settings(**settings), enqueue=lambda *a, **k: None)
    rt.__dict__["engine"] = engine  # the loaded engine (a cached property)
    return rt


def test_the_worker_batches_only_where_the_check_holds(caplog: pytest.LogCaptureFixture) -> None:
    assert _runtime(make_engine("llama")).batch_streams == 16  # the default
    with caplog.at_level(logging.WARNING, logger="workers.runtime"):
        assert _runtime(_sensitive()).batch_streams == 1
    assert "cross-stream batching off" in caplog.text and "BATCH_EXACT" in caplog.text
    # asked to batch anyway, or not to batch at all: no check
    assert _runtime(_sensitive(), batch_exact=False).batch_streams == 16
    assert _runtime(make_engine("gpt-oss"), batch_streams=1).batch_streams == 1



def test_the_streams_per_forward_fit_in_half_the_memory_budget(
        caplog: pytest.LogCaptureFixture) -> None:
    from workers.engines.loading import full_state_nbytes
    from workers.processing.multistream import FLIGHT_COPIES, streams_within

    engine = make_engine("llama")
    flight = FLIGHT_COPIES * full_state_nbytes(engine)  # one stream in a batched forward
    assert streams_within(10 * flight, flight // FLIGHT_COPIES) == 10
    assert streams_within(flight - 1, flight // FLIGHT_COPIES) == 1  # never fewer than one
    with caplog.at_level(logging.INFO, logger="workers.runtime"):
        rt = _runtime(engine, hot_cache_bytes=2 * 5 * flight)
        assert rt.batch_streams == 5
    assert "5 streams per forward, not 16" in caplog.text
    assert "Raise hot_cache_bytes" in caplog.text
    assert rt.multistream.reserve_bytes == 5 * flight
    budget = rt.memory_budget
    assert budget is not None and budget.reserve_bytes == 5 * flight
    assert _runtime(engine, hot_cache_bytes=2 * 16 * flight).batch_streams == 16
    assert _runtime(engine, hot_cache_bytes=flight).batch_streams == 1
    solo = _runtime(engine, hot_cache_bytes=flight)
    assert solo.memory_budget is not None and solo.memory_budget.reserve_bytes == 0

if __name__ == "__main__":  # the bf16 RWKV check's child process
    torch.set_num_threads(1)
    print("identical" if _rwkv_rounds_match(Path(sys.argv[1]), "cpu bf16") else "different")
