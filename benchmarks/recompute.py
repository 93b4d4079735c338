"""Per-token latency: sink-KV vs a sliding window with re-computation, same cache size.

The StreamingLLM paper's efficiency comparison (arXiv 2309.17453, Fig. 10: up to 22.2x at a
4096-token cache with Llama-2-7B): for each cache size L, generating one token costs

* ``sinkkv``: one step of the sink-KV engine whose window (S=4 sinks + L-4 recent) is full and
  already shifted, so every step re-rotates the cached keys, attends over L, evicts, and picks
  the next token: ``engine.generate(state, [token], 1)``;
* ``recompute``: a forward of the model over the last L tokens from scratch (no cache), then
  lm_head on the last position and the pick: what a sliding window without a cache must do to
  give every token the positions it was trained on.

Both run the same model, interleaved in one process, with one torch thread, timed in process
CPU seconds (these 2 cores are shared with other jobs, which makes wall time swing 2-3x; CPU
time of a one-thread process is the work itself). Each latency is the fastest repetition
(medians in the JSON). ``speedup`` = recompute / sink-KV latency at the largest L measured.

Model: a mid-size tiny Llama (4 layers, hidden 256, 8 heads / 2 KV heads). SmolLM2-135M with
``SINKSTREAM_BENCH_MODEL=smollm2`` (when converted; a 4096-token recompute then takes minutes
per repetition on 2 cores). Full: L = 256, 512, 1024, 2048, 4096; quick: 256, 1024, 4096.
A PNG of both curves is written next to the JSON (or under ``benchmarks/results``).
"""

from __future__ import annotations

import functools
import os
import random
import time
from typing import Any

import torch

from benchmarks.common import (
    bench_settings,
    load_smollm2,
    median,
    mid_tiny_llama,
    output_path,
    pyplot,
    smollm2_ready,
    threads,
)
from benchmarks.run import BenchResult


def cpu_timed(fn: Any) -> tuple[float, Any]:
    """CPU seconds of this process for ``fn()``: with one torch thread, the work itself,
    whatever other jobs on these shared cores do to wall time."""
    started = time.process_time()
    out = fn()
    return time.process_time() - started, out


SINKS, CHUNK = 4, 64
FULL_SIZES = (256, 512, 1024, 2048, 4096)
QUICK_SIZES = (256, 1024, 4096)


def _model(quick: bool) -> tuple[Any, Any, int, str]:
    if os.environ.get("SINKSTREAM_BENCH_MODEL") == "smollm2":
        settings = bench_settings()
        if smollm2_ready(settings):
            model, tokenizer, _ = load_smollm2(settings, prepare=False)
            return model, tokenizer, int(model.config.vocab_size), "SmolLM2-135M-Instruct fp32"
        print("SmolLM2 is not converted (sinkstream model prepare): using the tiny Llama")
    from workers.engines.tokenizers import ByteTokenizer

    return mid_tiny_llama(), ByteTokenizer(), 256, "mid-size tiny Llama (4x256) fp32"


def _measure(model: Any, tokenizer: Any, vocab: int, size: int, reps: int) -> dict[str, Any]:
    from workers.engines.sinkkv import SinkKVEngine

    engine = SinkKVEngine(
        model,
        tokenizer,
        model_name="bench",
        sink_tokens=SINKS,
        recent_tokens=size - SINKS,
        chunk_tokens=CHUNK,
    )
    rng = random.Random(size)
    stream = [rng.randrange(vocab) for _ in range(size + CHUNK)]
    state = engine.feed(engine.new_state(), stream)  # full and shifted: eviction is active
    assert state.cache_len == size and not state.pending
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    window = stream[-size:]

    def sink_step(tok: int) -> int:
        return engine.generate(state, [tok], 1)[0]

    @torch.no_grad()
    def recompute_step(tok: int) -> int:
        ids = torch.tensor([[*window[1:], tok]])  # the last L tokens, the new one included
        out = decoder(input_ids=ids, use_cache=False)
        return int(torch.argmax(head(out.last_hidden_state[0, -1]).float()))

    tokens = [rng.randrange(vocab) for _ in range(reps + 1)]
    sink_step(tokens[0])  # warm-up
    recompute_step(tokens[0])
    sink_t: list[float] = []
    rec_t: list[float] = []
    for r in range(reps):
        tok = tokens[r + 1]
        order = (sink_step, recompute_step) if r % 2 == 0 else (recompute_step, sink_step)
        for fn in order:
            seconds, _ = cpu_timed(functools.partial(fn, tok))
            (sink_t if fn is sink_step else rec_t).append(seconds)
    return {
        "cache_tokens": size,
        "reps": reps,
        "sinkkv_ms": 1000 * min(sink_t),
        "recompute_ms": 1000 * min(rec_t),
        "speedup": min(rec_t) / min(sink_t),
        "median_speedup": median(rec_t) / median(sink_t),
    }


def _plot(rows: list[dict[str, Any]], title: str, quick: bool) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    sizes = [r["cache_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(sizes, [r["recompute_ms"] for r in rows], "o-", label="sliding window + recompute")
    ax.plot(sizes, [r["sinkkv_ms"] for r in rows], "s-", label="sink-KV (StreamingLLM)")
    for r in rows:
        ax.annotate(
            f"{r['speedup']:.1f}x",
            (r["cache_tokens"], r["recompute_ms"]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cache size (tokens)")
    ax.set_ylabel("ms per generated token")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    path = output_path("recompute", quick, ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def run(quick: bool) -> BenchResult:
    torch.set_num_threads(1)  # CPU-time measurement: one thread, no spin-waits
    torch.manual_seed(0)
    model, tokenizer, vocab, label = _model(quick)
    sizes = QUICK_SIZES if quick else FULL_SIZES
    reps = 2 if quick else 4
    rows = [_measure(model, tokenizer, vocab, size, reps) for size in sizes]
    title = f"per-token latency, sink-KV vs recompute, {label}, {threads()} threads"
    plot = _plot(rows, title, quick)
    return BenchResult(
        title=title,
        rows=rows,
        summary={
            "speedup": rows[-1]["speedup"],
            "speedup_at_cache_tokens": rows[-1]["cache_tokens"],
            "model": label,
            "threads": threads(),
            "plot": plot,
        },
    )
