"""The most cross-stream batching could gain for one model on this CPU, measured.

Batching shares what one forward costs whatever its rows: reading the weights and running the
matmuls at a better rate over more rows, the Python and per-op overhead. It cannot share the
attention (each row attends to its own cache), nor make a matmul run above the rate this CPU
reaches on the model's own weight shapes with many rows. So for one sequential round of N
streams (each fed one chunk alone), profiled op by op (``torch.profiler``, FLOPs counted):

    bound = sequential seconds / (matmul FLOPs / best matmul rate + attention seconds)

where the best rate is measured per weight shape ``[K, N]`` the round used, over ``BIG_ROWS``
rows (the best of a few), and the attention seconds are the round's own SDPA calls. Every other
op is counted as free, so no batched forward of this model on this CPU can reach the bound;
its ``speedup`` is below it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

#: rows of the matmuls timed for the best rate (16 streams of 64-token chunks)
BIG_ROWS = 1024
_MATMULS = ("aten::mm", "aten::addmm")
_ATTENTION = "aten::_scaled_dot_product_flash_attention_for_cpu"


def batching_bound(sequential: Callable[[], Any]) -> dict[str, float]:
    """Profile ``sequential()`` (one round, streams fed one by one; one torch thread) and
    return its seconds, its matmul FLOPs and seconds, its attention seconds, the matmul FLOPs
    at the best rate, and ``bound``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sequential()  # warm
    started = time.process_time()
    sequential()
    seconds = time.process_time() - started
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        sequential()
    shapes: dict[tuple[int, int], float] = {}  # weight [K, N] -> FLOPs of the round
    mm_s = attention_s = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key in _MATMULS:
            mm_s += event.self_cpu_time_total / 1e6
            kn = _weight_shape(event.input_shapes)
            if kn is not None:
                shapes[kn] = shapes.get(kn, 0.0) + float(event.flops)
        elif event.key == _ATTENTION:
            attention_s += event.self_cpu_time_total / 1e6
    flops = sum(shapes.values())
    best_s = sum(f / _best_rate(torch, k, n) for (k, n), f in shapes.items())
    return {"sequential_s": seconds, "matmul_gflop": flops / 1e9, "matmul_s": mm_s,
            "attention_s": attention_s, "matmul_best_s": best_s,
            "bound": seconds / (best_s + attention_s)}


def _weight_shape(shapes: Sequence[Sequence[int]]) -> tuple[int, int] | None:
    """``(K, N)`` of the weight operand: mm(a [M, K], b [K, N]); addmm(bias, a, b)."""
    operands = [s for s in shapes if len(s) == 2]
    if len(operands) < 2:
        return None
    k, n = operands[-1]
    return int(k), int(n)


def _best_rate(torch: Any, k: int, n: int) -> float:
    """FLOP/s of a ``[BIG_ROWS, k] x [k, n]`` fp32 matmul on this thread, the best of a few."""
    a, b = torch.randn(BIG_ROWS, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2.0 * BIG_ROWS * k * n / best
