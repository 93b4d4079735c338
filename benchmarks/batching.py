"""Cross-stream batching: throughput of ``engine.feed_batch`` vs one stream at a time.

For N = 1, 4, 16, 64 concurrent streams, each stream holds a state already fed a different
number of tokens (so sink-KV rows have different cache fills and are left-padded), and gets
one new 64-token chunk. Both sides feed the same states and chunks, interleaved, with one torch
thread, timed in process CPU seconds (the cores are shared; CPU time of a one-thread process is
the work itself, whatever other jobs do to wall time):

* ``batched``: ``engine.feed_batch(states, chunks)`` (one forward per round for all rows);
* ``sequential``: ``[engine.feed(s, c) for s, c in zip(states, chunks)]``.

``tok_s`` = N * 64 / the fastest of the interleaved repetitions (medians in the JSON);
``speedup`` = batched tok/s / sequential tok/s.
Engines: ``tiny-llama`` through sink-KV (S=4, R=1020) and ``tiny-rwkv`` (RWKV-7, 2x128)
through the RWKV engine (batched via :mod:`workers.engines.rwkv_batched`). Headline keys:
``speedup_16_sinkkv``, ``speedup_16_rwkv`` and ``speedup_16`` (the smaller of the two).
"""

from __future__ import annotations

import functools
import random
import time
from typing import Any

from benchmarks.common import bench_settings, median, threads
from benchmarks.run import BenchResult


def cpu_timed(fn: Any) -> tuple[float, Any]:
    """CPU seconds of this process for ``fn()``: with one torch thread, the work itself,
    whatever other jobs on these shared cores do to wall time."""
    started = time.process_time()
    out = fn()
    return time.process_time() - started, out


CHUNK = 64
STREAMS = (1, 4, 16, 64)


def _measure(engine: Any, n: int, reps: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    vocab = 256
    # different history lengths per stream (multiples of the chunk: no pending tokens)
    histories = [[rng.randrange(1, vocab) for _ in range(CHUNK * (2 + i % 5))] for i in range(n)]
    states = engine.feed_batch([engine.new_state() for _ in range(n)], histories)
    chunks = [
        [[rng.randrange(1, vocab) for _ in range(CHUNK)] for _ in range(n)] for _ in range(reps + 1)
    ]

    def batched(c: list[list[int]]) -> None:
        engine.feed_batch(states, c)

    def sequential(c: list[list[int]]) -> None:
        for s, t in zip(states, c, strict=True):
            engine.feed(s, t)

    batched(chunks[0])  # warm-up
    sequential(chunks[0])
    times: dict[str, list[float]] = {"batched": [], "sequential": []}
    for r in range(reps):
        c = chunks[r + 1]
        order = (batched, sequential) if r % 2 == 0 else (sequential, batched)
        for fn in order:
            seconds, _ = cpu_timed(functools.partial(fn, c))
            times[fn.__name__].append(seconds)
    tokens = n * CHUNK
    b_tps = tokens / min(times["batched"])
    s_tps = tokens / min(times["sequential"])
    return {
        "engine": engine.kind,
        "streams": n,
        "reps": reps,
        "batched_tok_s": b_tps,
        "sequential_tok_s": s_tps,
        "speedup": b_tps / s_tps,
        "median_speedup": median(times["sequential"]) / median(times["batched"]),
    }


def run(quick: bool) -> BenchResult:
    import torch

    torch.set_num_threads(1)  # CPU-time measurement: one thread, no spin-waits
    from workers.engines.loading import load_engine

    settings = bench_settings(sink_tokens=4, recent_tokens=1020, chunk_tokens=CHUNK)
    reps = 3 if quick else 7
    rows: list[dict[str, Any]] = []
    for spec in ("tiny-llama", "tiny-rwkv"):
        engine = load_engine(settings, spec)
        for n in STREAMS:
            rows.append(_measure(engine, n, reps if n < 64 else max(2, reps - 2), seed=n))
    by = {(r["engine"], r["streams"]): r["speedup"] for r in rows}
    return BenchResult(
        title=f"feed_batch vs one stream at a time, {CHUNK}-token chunks, tiny-llama (sink-KV) "
        f"and tiny-rwkv7, {threads()} threads",
        rows=rows,
        summary={
            "speedup_16": min(by[("sinkkv", 16)], by[("rwkv", 16)]),
            "speedup_16_sinkkv": by[("sinkkv", 16)],
            "speedup_16_rwkv": by[("rwkv", 16)],
            "speedup_64_sinkkv": by[("sinkkv", 64)],
            "speedup_64_rwkv": by[("rwkv", 64)],
            "threads": threads(),
        },
    )
