"""How fast, and how large, a model preset runs on this machine, per dtype.

``python -m benchmarks.run presets --model qwen2.5-1.5b --dtypes float32,bfloat16``

Each dtype runs in its own process (``python -m benchmarks.presets MODEL DTYPE``), so its RSS
is that model's alone: load time, RSS once loaded (weights resident), peak RSS, prefill
tokens/s (``feed`` of a transcript through the sink-KV engine) and greedy decode tokens/s
(``generate``: new tokens after the first, the prompt's cost subtracted, after a warm-up
call). This is how a preset's dtype was chosen (docs/models.md); the threads come from
SINKSTREAM_TORCH_THREADS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.run import BenchResult

_SAMPLE = Path(__file__).resolve().parents[1] / "sinkstream" / "samples" / "launch-review.vtt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m benchmarks.run presets`` beyond --quick and --json."""
    parser.add_argument("--model", default="smollm2", help="model spec or preset name")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--prefill", type=int, default=512, help="tokens fed before decoding")
    parser.add_argument("--decode", type=int, default=32, help="new tokens to time")


def run(quick: bool, options: argparse.Namespace | None = None) -> BenchResult:
    opts = options or argparse.Namespace(model="smollm2", dtypes="float32,bfloat16",
                                         prefill=512, decode=32)
    prefill, decode = (128, 8) if quick else (opts.prefill, opts.decode)
    rows = []
    for dtype in opts.dtypes.split(","):
        command = [sys.executable, "-m", "benchmarks.presets", opts.model, dtype.strip(),
                   str(prefill), str(decode)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return BenchResult(
        title=f"{opts.model} on this CPU ({os.environ.get('SINKSTREAM_TORCH_THREADS', 'all')} "
              f"threads), per dtype",
        rows=rows,
        summary={"fastest_decode": max(rows, key=lambda r: r["decode_tok_s"])["dtype"]},
    )


def _rss_mib() -> tuple[float, float]:
    """(current, peak) RSS of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def measure(model: str, dtype: str, prefill: int, decode: int) -> dict[str, Any]:
    """One dtype's row, in this process."""
    import torch

    from sinkstream.settings import load_settings
    from workers.engines.base import Sampling
    from workers.engines.loading import load_engine

    settings = load_settings(model=model, dtype=dtype)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    started = time.perf_counter()
    engine: Any = load_engine(settings)
    load_s = time.perf_counter() - started
    rss_loaded, _ = _rss_mib()
    text = _SAMPLE.read_text() * 8
    tokens = engine.tokenizer.encode(text)[:prefill]
    started = time.perf_counter()
    state = engine.feed(engine.new_state(), tokens)
    prefill_s = time.perf_counter() - started
    prompt = engine.tokenizer.encode("\nSummary:")
    greedy = Sampling(repetition_penalty=1.0)
    engine.generate(state, prompt, 1, greedy)  # warm-up: the first call pays lazy set-up

    def timed(tokens: int) -> float:
        started = time.perf_counter()
        engine.generate(state, prompt, tokens, greedy)
        return time.perf_counter() - started

    # the decode steps alone: the prompt and first token (the best of three one-token calls,
    # cheap) taken from one whole call; unwarmed, the first call's set-up had made that
    # difference negative on the tiny model
    first_s = min(timed(1) for _ in range(3))
    decode_s = timed(decode + 1) - first_s
    rss_now, rss_peak = _rss_mib()
    return {"model": engine.model_name, "dtype": dtype, "threads": torch.get_num_threads(),
            "load_s": round(load_s, 1), "rss_loaded_mib": round(rss_loaded),
            "rss_after_mib": round(rss_now), "rss_peak_mib": round(rss_peak),
            "prefill_tok_s": round(len(tokens) / prefill_s, 1),
            "decode_tok_s": round(decode / decode_s, 2)}


if __name__ == "__main__":
    name, kind, n_prefill, n_decode = sys.argv[1:5]
    print(json.dumps(measure(name, kind, int(n_prefill), int(n_decode))))
