"""Perplexity over a long text with real weights: the StreamingLLM paper's comparison.

A model (SmolLM2-135M-Instruct by default, ``--model`` another spec or preset such as
``gemma3-270m``; fp32, CPU) reads one long text (tinyshakespeare, else QMSum transcripts) and
we record the log-loss of every next token under four ways of keeping memory (arXiv
2309.17453, figure 3):

* ``dense``: a growing cache, every token attends to everything the model itself lets it
  (a model with sliding-window layers keeps those windows: its cache is built from its
  config). SmolLM2 was trained with an 8,192-token context; dense is run a little past the
  model's context to show what happens there, then stopped (cost grows with the cache).
* ``window``: the sink-KV engine with ``sink_tokens=0``: the most recent W tokens only.
* ``sink``: the sink-KV engine, S=4 sinks + W-4 recent tokens (same cache size W).
* ``recompute``: sliding window with re-computation: for position p, a fresh forward over
  the W tokens before p. Exact but O(W) work per token (O(W^2) attention), so on a CPU it is
  evaluated on a strided subset of positions (stated in the output), and the other methods are
  also reported on that same subset for a like-for-like comparison.

``window``, ``sink`` and ``dense`` prefill in the engine's 64-token chunks: a token inside a
chunk sees up to W-1+63 earlier tokens in ``window``/``sink`` (that is how the engine streams).

Output: per-method perplexity per segment of the text (rows), a PNG of the curves next to
the JSON (or in benchmarks/results/), overall numbers in the summary.

``python -m benchmarks.run perplexity [--quick] [--model NAME] [--tokens N] --json PATH``
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import bench_settings, long_text, output_path, pyplot, threads
from benchmarks.run import BenchResult

CHUNK = 64
SINKS = 4
#: the text's length without ``--tokens``: the paper's 20k, and 2,048 with ``--quick``
TOKENS, QUICK_TOKENS = 20480, 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="model spec or preset name (a preset must be prepared first)")
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"tokens of text to read (default {TOKENS}, {QUICK_TOKENS} "
                             "with --quick): fewer where the full length does not fit the time")
    parser.add_argument("--bos", action="store_true",
                        help="start the text with the tokenizer's BOS token, as models such "
                             "as Gemma were trained to see it (it then is the first sink)")


def _load(model: str) -> tuple[Any, Any, str, float]:
    """(model, tokenizer, display name, seconds) in float32 on the CPU: the numbers compare
    ways of keeping memory, so the model's own precision is held fixed across models."""
    from pathlib import Path

    from workers.engines import loading

    settings = bench_settings()
    if settings.torch_threads:  # SINKSTREAM_TORCH_THREADS, as the workers apply it
        torch.set_num_threads(settings.torch_threads)
    started = time.perf_counter()
    hf_model, tokenizer = loading.load_hf_model(model, Path(settings.model_cache_dir))
    name = loading.parse_spec(model).display_name or model
    return hf_model, tokenizer, name, time.perf_counter() - started


def _ppl(nll: np.ndarray) -> float:
    nll = nll[~np.isnan(nll)]
    return float(math.exp(nll.mean())) if nll.size else float("nan")


@torch.no_grad()
def _chunk_nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Negative log-likelihood of ``targets`` [T] under fp32 ``logits`` [T, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (-logp.gather(1, targets[:, None])[:, 0]).double().cpu().numpy()


def _engine_nll(engine: Any, ids: list[int]) -> np.ndarray:
    """nll[p] for p >= 1 (nll[0] is NaN) streaming ``ids`` through a sink-KV engine.

    Uses the engine's chunk forward (the exact code path of ``feed``) and keeps each chunk's
    final hidden states, so scoring costs no second pass; logits via the engine's lm_head.
    """
    from workers.engines.sinkkv.state import _Window

    nll = np.full(len(ids), np.nan)
    window = _Window.of(engine.new_state())
    for start in range(0, len(ids) - 1, CHUNK):
        piece = ids[start : start + CHUNK]
        (window,), hidden = engine._forward([window], [piece])  # hidden [1, T, E]
        # hidden after ids[start + j] predicts ids[start + j + 1]
        n = min(len(piece), len(ids) - 1 - start)
        logits = engine._logits(hidden[0, :n])
        targets = torch.tensor(ids[start + 1 : start + 1 + n])
        nll[start + 1 : start + 1 + n] = _chunk_nll(logits, targets)
    return nll


@torch.no_grad()
def _dense_nll(model: Any, ids: list[int], limit: int, deadline: float) -> np.ndarray:
    """nll[p] with a growing DynamicCache, for p < ``limit`` (or until ``deadline``)."""
    from transformers import DynamicCache

    from workers.engines.sinkkv import cache_keyword

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    nll = np.full(len(ids), np.nan)
    # built from the config, so sliding-window layers keep only their window (the model's
    # own attention either way; without it every layer's cache grows and costs O(n) per token)
    cache = DynamicCache(config=model.config)
    keyword = cache_keyword(decoder)
    for start in range(0, min(limit, len(ids)) - 1, CHUNK):
        if time.monotonic() > deadline:
            break
        piece = ids[start : start + CHUNK]
        out = decoder(input_ids=torch.tensor([piece]), use_cache=True, **{keyword: cache})
        n = min(len(piece), min(limit, len(ids)) - 1 - start)
        logits = head(out.last_hidden_state[0, :n])
        nll[start + 1 : start + 1 + n] = _chunk_nll(
            logits, torch.tensor(ids[start + 1 : start + 1 + n])
        )
    return nll


@torch.no_grad()
def _recompute_nll(model: Any, ids: list[int], window: int, positions: list[int]) -> np.ndarray:
    """nll[p] for p in ``positions``: a fresh forward over ids[p - window : p] each time."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    nll = np.full(len(ids), np.nan)
    full = [p for p in positions if p >= window]
    short = [p for p in positions if p < window]
    batch = 4
    for i in range(0, len(full), batch):
        group = full[i : i + batch]
        x = torch.tensor([ids[p - window : p] for p in group])
        h = decoder(input_ids=x, use_cache=False).last_hidden_state[:, -1]  # [B, E]
        nll[group] = _chunk_nll(head(h), torch.tensor([ids[p] for p in group]))
    for p in short:
        h = decoder(input_ids=torch.tensor([ids[:p]]), use_cache=False).last_hidden_state[:, -1]
        nll[p] = _chunk_nll(head(h), torch.tensor([ids[p]]))[0]
    return nll


def run(quick: bool, options: argparse.Namespace | None = None) -> BenchResult:
    from workers.engines.sinkkv import SinkKVEngine

    opts = options or argparse.Namespace(model="smollm2", tokens=None, bos=False)
    model, tokenizer, model_name, load_seconds = _load(opts.model)
    context = int(model.config.max_position_embeddings)

    n_tokens = opts.tokens or (QUICK_TOKENS if quick else TOKENS)
    if quick:
        window, segment, stride = 256, 256, 128
        dense_limit, dense_budget = n_tokens, 600.0
    else:
        window, segment, stride = 256, 1024, 128
        dense_limit, dense_budget = min(n_tokens, context + 1024), 2400.0

    text_name, text = long_text()
    ids: list[int] = tokenizer.encode(text[: n_tokens * 8], add_special_tokens=False)[:n_tokens]
    if opts.bos:
        if tokenizer.bos_token_id is None:
            raise RuntimeError(f"{model_name}'s tokenizer has no BOS token")
        ids = [int(tokenizer.bos_token_id), *ids[: n_tokens - 1]]
    if len(ids) < n_tokens:
        raise RuntimeError(f"{text_name} gave only {len(ids)} tokens, need {n_tokens}")

    def engine(sinks: int) -> SinkKVEngine:
        return SinkKVEngine(
            model,
            tokenizer,
            model_name=model_name,
            sink_tokens=sinks,
            recent_tokens=window - sinks,
            chunk_tokens=CHUNK,
        )

    positions = list(range(stride - 1, n_tokens, stride))
    deadline = time.monotonic() + dense_budget
    runs = {
        "sink": lambda: _engine_nll(engine(SINKS), ids),
        "window": lambda: _engine_nll(engine(0), ids),
        "recompute": lambda: _recompute_nll(model, ids, window, positions),
        "dense": lambda: _dense_nll(model, ids, dense_limit, deadline),
    }
    seconds: dict[str, float] = {}
    nll: dict[str, np.ndarray] = {}
    for name, fn in runs.items():
        if name == "dense":
            deadline = time.monotonic() + dense_budget
        t = time.perf_counter()
        nll[name] = fn()
        seconds[name] = time.perf_counter() - t
        print(f"[perplexity] {name}: {_ppl(nll[name]):.2f} in {seconds[name]:.0f} s", flush=True)
    dense_reached = int(np.flatnonzero(~np.isnan(nll["dense"])).max()) + 1

    methods = ("dense", "window", "recompute", "sink")
    subset = np.zeros(n_tokens, dtype=bool)
    subset[positions] = True
    rows = []
    for start in range(0, n_tokens, segment):
        sl = slice(start, start + segment)
        row: dict[str, Any] = {"tokens": f"{start}-{min(start + segment, n_tokens)}"}
        for m in methods:
            row[m] = _ppl(nll[m][sl])
        # like for like on the strided subset (recompute is only evaluated there)
        sub = subset[sl]
        row["sink@subset"] = _ppl(nll["sink"][sl][sub])
        row["dense@subset"] = _ppl(nll["dense"][sl][sub])
        row["window@subset"] = _ppl(nll["window"][sl][sub])
        rows.append(row)

    def overall(m: str, mask: np.ndarray | None = None, upto: int | None = None) -> float:
        values = nll[m][:upto] if upto else nll[m]
        if mask is not None:
            values = values[mask[: len(values)]]
        return _ppl(values)

    within = min(dense_reached, context)
    summary: dict[str, Any] = {
        "model": model_name,
        "text": text_name,
        "bos": bool(opts.bos),
        "tokens": n_tokens,
        "cache_tokens": window,
        "sink_tokens": SINKS,
        "chunk_tokens": CHUNK,
        "recompute_stride": stride,
        "recompute_positions": len(positions),
        "dense_tokens_evaluated": dense_reached,
        "model_context": context,
        "ppl_sink": overall("sink"),
        "ppl_window": overall("window"),
        "ppl_recompute_subset": overall("recompute", subset),
        "ppl_sink_subset": overall("sink", subset),
        "ppl_window_subset": overall("window", subset),
        f"ppl_dense_first_{within}": overall("dense", upto=within),
        f"ppl_sink_first_{within}": overall("sink", upto=within),
    }
    if dense_reached > context:
        past = np.zeros(n_tokens, dtype=bool)
        past[context:dense_reached] = True
        summary[f"ppl_dense_{context}_{dense_reached}"] = overall("dense", past)
        summary[f"ppl_sink_{context}_{dense_reached}"] = overall("sink", past)
    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    summary["threads"] = threads()
    summary["model_load_seconds"] = round(load_seconds, 2)

    try:
        plot = _plot(rows, segment, window, context, stride, quick, text_name, model_name)
    except Exception as exc:  # noqa: BLE001 - never lose a long run to a plotting problem
        print(f"plot failed: {type(exc).__name__}: {exc}")
        plot = None
    if plot:
        summary["plot"] = str(plot)
    notes = [
        f"recompute evaluated on every {stride}th position ({len(positions)} positions): "
        "O(window) forward per position is too slow on this CPU for every token",
        f"dense evaluated on the first {dense_reached} tokens (model context {context}; "
        + ("stopped a little past it" if dense_reached > context else "not reached")
        + ")",
    ]
    return BenchResult(
        title=f"perplexity per {segment}-token segment, {model_name} fp32, cache {window} "
        f"tokens (sink: S={SINKS} + {window - SINKS}), {text_name}",
        rows=rows,
        summary=summary,
        extra={
            "notes": notes,
            "segment_tokens": segment,
            # per-token negative log-likelihoods (nats; null where not evaluated), so curves
            # can be re-binned or re-plotted without re-running
            "nll": {
                m: [None if math.isnan(v) else round(float(v), 4) for v in nll[m]] for m in methods
            },
        },
    )


def _plot(
    rows: list[dict[str, Any]],
    segment: int,
    window: int,
    context: int,
    stride: int,
    quick: bool,
    text_name: str,
    model_name: str,
) -> Any:
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    x = [int(r["tokens"].split("-")[0]) + segment / 2 for r in rows]
    labels = {
        "dense": "dense attention",
        "window": f"window attention ({window}, no sinks)",
        "recompute": f"sliding window w/ re-computation ({window})",
        "sink": f"StreamingLLM sink-KV (4+{window - 4})",
    }
    styles = {"dense": "k-", "window": "r-", "recompute": "g--", "sink": "b-"}
    for m in ("dense", "window", "sink"):
        ax1.plot(x, [r[m] for r in rows], styles[m], marker="o", markersize=3, label=labels[m])
    ax1.set_title(f"every token ({text_name})")
    for m, key in (
        ("dense", "dense@subset"),
        ("window", "window@subset"),
        ("recompute", "recompute"),
        ("sink", "sink@subset"),
    ):
        ax2.plot(x, [r[key] for r in rows], styles[m], marker="o", markersize=3, label=labels[m])
    ax2.set_title(f"every {stride}th token (where re-computation was evaluated)")
    dense_end = max(
        (xi for xi, r in zip(x, rows, strict=True) if not math.isnan(r["dense"])), default=0.0
    )
    for ax in (ax1, ax2):
        if dense_end > context:
            ax.axvline(context, color="grey", linestyle=":", label=f"model context {context}")
        ax.set_yscale("log")
        ax.set_xlabel("input length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel(f"perplexity per {segment}-token segment")
    fig.suptitle(f"{model_name} fp32: perplexity vs input length")
    path = output_path("perplexity", quick, ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
