"""Sink-KV prefill speed at a FULL window vs a plain transformers DynamicCache forward.

Both sides run the same model's decoder (no lm_head: ``feed`` never computes logits) on the
same chunk of new tokens over a cache of the same length (S + R = 1024 by default), with the
same torch threads, measured interleaved in one process so machine noise hits both alike:

* sink-KV: ``engine.feed(full_state, chunk)`` where ``full_state`` has already evicted (the
  stored slots differ from the current ones, so every call re-rotates all cached keys, then
  appends and evicts): the steady state of a long stream.
* baseline: ``decoder(chunk, past_key_values=DynamicCache with 1024 tokens)``, then
  ``cache.crop(1024)`` so every repetition sees the same cache length.

``ratio`` = sink-KV tokens/s / baseline tokens/s (target >= 0.9), measured with 1 torch
thread (stable on shared machines, where OpenMP threads spin on cores other processes hold);
the same is repeated with the default thread count. ``decode`` rows do the same for
one-token generation steps. State bytes per stream are printed for each engine at the
default settings, with the formulas for sizes that are not loaded.

``generate`` rows (``generate_ratio_vs_hf``): a whole summary generation, the summary prompt
then 64 greedy tokens after a cache of S + R tokens, sink-KV ``engine.generate`` vs Hugging
Face ``model.generate`` over a ``DynamicCache`` of the same length, same model, 1 thread,
interleaved, process CPU seconds; once with the room beside the window the summarizer gives
a generation (``extra_capacity``), once evicting at every token
(``generate_ratio_vs_hf_evicting``).

Full: SmolLM2-135M (when converted in the model cache: ``sinkstream model prepare``);
quick: a mid-size tiny Llama (4 layers, hidden 256).
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from benchmarks.common import (
    SMOLLM2_DIMS,
    bench_settings,
    load_smollm2,
    median,
    mid_tiny_llama,
    rwkv7_state_bytes,
    sinkkv_state_bytes,
    smollm2_ready,
    threads,
    timed,
)
from benchmarks.run import BenchResult

SINKS, RECENT, CHUNK = 4, 1020, 64


def _setup(model: Any, tokenizer: Any, vocab: int, seed: int = 0) -> dict[str, Any]:
    """A sink-KV engine with a full, shifted window, and a DynamicCache of the same length."""
    from transformers import DynamicCache

    from workers.engines.sinkkv import SinkKVEngine, cache_keyword

    engine = SinkKVEngine(
        model,
        tokenizer,
        model_name="bench",
        sink_tokens=SINKS,
        recent_tokens=RECENT,
        chunk_tokens=CHUNK,
    )
    capacity = engine.window.capacity
    rng = random.Random(seed)
    stream = [rng.randrange(vocab) for _ in range(capacity + 4 * CHUNK)]
    # fill past the window so that eviction and re-rotation are active on every call
    full_state = engine.feed(engine.new_state(), stream)
    assert full_state.cache_len == capacity and not full_state.pending
    assert bool((full_state.slots != torch.arange(capacity)).any()), "window has not shifted"

    decoder = model.get_decoder()
    cache = DynamicCache()
    with torch.no_grad():
        for i in range(0, capacity, CHUNK):
            ids = torch.tensor([stream[i : min(i + CHUNK, capacity)]])
            decoder(input_ids=ids, use_cache=True, **{cache_keyword(decoder): cache})
    assert cache.get_seq_length() == capacity
    return {
        "engine": engine,
        "state": full_state,
        "decoder": decoder,
        "cache": cache,
        "head": model.get_output_embeddings(),
        "rng": rng,
        "capacity": capacity,
        "stream": stream,
    }


def _measure(setup: dict[str, Any], vocab: int, step: str, reps: int) -> dict[str, Any]:
    """Interleaved timings of one step kind on both sides.

    ``prefill``: feed one 64-token chunk (decoder only, as ``feed`` does).
    ``decode``: one generation step: a 1-token forward, lm_head on it, pick the next token
    (``engine.generate(state, [tok], 1)``; the baseline does the same with its cache).
    """
    engine, state, decoder, cache, head = (
        setup[k] for k in ("engine", "state", "decoder", "cache", "head")
    )
    from workers.engines.sinkkv import cache_keyword

    n = CHUNK if step == "prefill" else 1
    keyword = cache_keyword(decoder)
    rng = setup["rng"]
    inputs = [[rng.randrange(vocab) for _ in range(n)] for _ in range(reps + 1)]

    def run_sink(c: list[int]) -> None:
        if step == "prefill":
            engine.feed(state, c)
        else:
            engine.generate(state, c, 1)

    @torch.no_grad()
    def run_dense(c: list[int]) -> None:
        out = decoder(input_ids=torch.tensor([c]), use_cache=True, **{keyword: cache})
        if step == "decode":
            int(torch.argmax(head(out.last_hidden_state[0, -1]).float()))
        cache.crop(-len(c))  # back to `capacity` tokens (v5: negative = tokens to drop)

    run_sink(inputs[0])  # warm-up both paths
    run_dense(inputs[0])
    sink_times, dense_times = [], []
    for r in range(reps):
        c = inputs[r + 1]
        order = (run_sink, run_dense) if r % 2 == 0 else (run_dense, run_sink)
        for fn in order:
            seconds, _ = timed(lambda fn=fn, c=c: fn(c))
            (sink_times if fn is run_sink else dense_times).append(seconds)
    sink_tps = n / median(sink_times)
    dense_tps = n / median(dense_times)
    return {
        "step": f"{step} ({n} tok)",
        "cache_tokens": setup["capacity"],
        "reps": reps,
        "sinkkv_tok_s": sink_tps,
        "dynamiccache_tok_s": dense_tps,
        "ratio": sink_tps / dense_tps,
        "sinkkv_ms": 1000 * median(sink_times),
        "dynamiccache_ms": 1000 * median(dense_times),
        "state_bytes": engine.state_nbytes(state),
    }


#: new tokens per generation (a rolling summary's budget), and the summary prompt's instruction
GENERATE_TOKENS = 64
_INSTRUCTION = "Summarize the conversation so far in two sentences."


def _measure_generate(setup: dict[str, Any], stream: list[int], reps: int) -> list[dict[str, Any]]:
    """Summary generation, end to end: the summary prompt after a cache of ``capacity``
    tokens, then ``GENERATE_TOKENS`` greedy tokens, sink-KV ``engine.generate`` against
    Hugging Face ``model.generate`` with the same model over a ``DynamicCache`` of the same
    length (prompt prefill included on both sides; no repetition penalty, no early stop).

    Two sink-KV rows: with the room beside the window the summarizer gives a generation
    (``extra_capacity`` = prompt + new tokens: nothing is evicted), and without it (the
    window evicts at every prompt chunk and every token). Interleaved repetitions, medians
    of process CPU seconds (one thread: on the shared 2-core box a 64-token generation's wall
    time ran at ~2x its CPU time and swung by 1.5x between repetitions); wall ratios beside.
    """
    from workers.engines.base import Sampling
    from workers.engines.sinkkv import cache_keyword

    engine, state, cache = setup["engine"], setup["state"], setup["cache"]
    model, capacity = engine.model, setup["capacity"]
    prompt = engine.summary_prompt(_INSTRUCTION)
    greedy = Sampling(repetition_penalty=1.0)
    hf_ids = torch.tensor([[*stream[:capacity], *prompt]])  # the cache holds the first part
    eos = engine.eos_token_ids
    keyword = cache_keyword(model)  # `cache` from transformers 5.24 on

    def sink(extra: int) -> int:
        return len(engine.generate(state, prompt, GENERATE_TOKENS, greedy, extra_capacity=extra))

    def hf() -> int:
        out = model.generate(
            input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), **{keyword: cache},
            max_new_tokens=GENERATE_TOKENS, min_new_tokens=GENERATE_TOKENS, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )
        cache.crop(capacity - cache.get_seq_length())  # back to `capacity` tokens
        return int(out.shape[1] - hf_ids.shape[1])

    sides = {
        "hf_generate": hf,
        "sinkkv_generate": lambda: sink(len(prompt) + GENERATE_TOKENS),
        "sinkkv_generate_evicting": lambda: sink(0),
    }
    engine.eos_token_ids = ()  # the same number of tokens on every side
    try:
        for fn in sides.values():  # warm-up, and every side makes all its tokens
            assert fn() == GENERATE_TOKENS
        cpu: dict[str, list[float]] = {name: [] for name in sides}
        wall: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(reps):
            names = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in names:
                started = time.process_time()
                seconds, _ = timed(sides[name])
                cpu[name].append(time.process_time() - started)
                wall[name].append(seconds)
    finally:
        engine.eos_token_ids = eos
    hf_cpu, hf_wall = median(cpu["hf_generate"]), median(wall["hf_generate"])
    return [
        {
            "side": name,
            "cache_tokens": capacity,
            "prompt_tokens": len(prompt),
            "new_tokens": GENERATE_TOKENS,
            "reps": reps,
            "cpu_seconds": median(cpu[name]),
            "wall_seconds": median(wall[name]),
            "tok_s": GENERATE_TOKENS / median(cpu[name]),
            "ratio_vs_hf": hf_cpu / median(cpu[name]),
            "ratio_vs_hf_wall": hf_wall / median(wall[name]),
        }
        for name in sides
    ]


def _generate_table(generate: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The generate rows in the table's columns (the baseline column is HF ``generate``)."""
    hf = generate["hf_generate"]
    return [
        {
            "step": f"generate ({r['new_tokens']} tok, {label})",
            "threads": 1,
            "reps": r["reps"],
            "sinkkv_tok_s": r["tok_s"],
            "dynamiccache_tok_s": hf["tok_s"],
            "ratio": r["ratio_vs_hf"],
        }
        for label, r in (("room beside the window", generate["sinkkv_generate"]),
                         ("evicting", generate["sinkkv_generate_evicting"]))
    ]


def _state_rows(measured: dict[str, int]) -> list[dict[str, Any]]:
    d = SMOLLM2_DIMS
    cap = SINKS + RECENT
    rows: list[dict[str, Any]] = []
    for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        rows.append(
            {
                "engine": "sinkkv",
                "model": "SmolLM2-135M",
                "setting": f"S={SINKS},R={RECENT},{dtype}",
                "state_bytes": sinkkv_state_bytes(
                    d["layers"], d["kv_heads"], d["head_dim"], d["hidden"], cap, nbytes, nbytes
                ),
                "source": "formula",
            }
        )
    for name, nbytes in measured.items():
        rows.append(
            {
                "engine": name.split(":")[0],
                "model": name.split(":", 1)[1],
                "setting": "defaults",
                "state_bytes": nbytes,
                "source": "measured",
            }
        )
    # real RWKV-7 "World" sizes (layers, n_embd); vocab 65536
    for label, layers, embd in (
        ("RWKV-7 0.1B", 12, 768),
        ("RWKV-7 1.5B", 24, 2048),
        ("RWKV-7 2.9B", 32, 2560),
    ):
        for dtype, nbytes in (("fp32", 4), ("bf16", 2)):
            rows.append(
                {
                    "engine": "rwkv",
                    "model": label,
                    "setting": dtype,
                    "state_bytes": rwkv7_state_bytes(layers, embd, 65536, nbytes),
                    "source": "formula",
                }
            )
    return rows


def run(quick: bool) -> BenchResult:
    settings = bench_settings()
    use_smollm2 = not quick and smollm2_ready(settings)
    load_seconds = None
    if use_smollm2:
        model, tokenizer, load_seconds = load_smollm2(settings, prepare=False)
        vocab, model_label = int(model.config.vocab_size), "SmolLM2-135M-Instruct fp32"
    else:
        from workers.engines.tokenizers import ByteTokenizer

        model, tokenizer = mid_tiny_llama(), ByteTokenizer()
        vocab, model_label = 256, "mid-size tiny Llama (4x256) fp32"
    torch.manual_seed(0)

    reps = 6 if quick else 12
    setup = _setup(model, tokenizer, vocab)
    default_threads = threads()
    rows = []
    # 1 thread first: on shared machines OpenMP threads spin-wait on cores that other
    # processes hold, which makes multi-thread timings erratic; then the default count.
    for n_threads in sorted({1, default_threads}):
        torch.set_num_threads(n_threads)
        try:
            for step, n in (("prefill", reps), ("decode", reps * 3)):
                rows.append({"threads": n_threads, **_measure(setup, vocab, step, n)})
        finally:
            torch.set_num_threads(default_threads)
    torch.set_num_threads(1)
    try:
        generate_rows = _measure_generate(setup, setup["stream"], 2 if quick else 5)
    finally:
        torch.set_num_threads(default_threads)
    generate = {r["side"]: r for r in generate_rows}
    prefill = next(r for r in rows if r["threads"] == 1 and r["step"].startswith("prefill"))
    decode = next(r for r in rows if r["threads"] == 1 and r["step"].startswith("decode"))
    prefill_default = [r for r in rows if r["threads"] != 1 and r["step"].startswith("prefill")]

    # measured state sizes at the defaults: this model, and the tiny RWKV
    from workers.engines.loading import full_state_nbytes, load_engine

    measured = {f"sinkkv:{model_label}": prefill["state_bytes"]}
    rwkv = load_engine(settings, "tiny-rwkv")
    measured["rwkv:tiny-rwkv7 (2x128)"] = full_state_nbytes(rwkv)
    if use_smollm2:
        d = SMOLLM2_DIMS
        formula = sinkkv_state_bytes(
            d["layers"], d["kv_heads"], d["head_dim"], d["hidden"], SINKS + RECENT, 4, 4
        )
        assert formula == prefill["state_bytes"], (formula, prefill["state_bytes"])
    state_rows = _state_rows(measured)

    state_summary = {
        f"state_bytes ({r['engine']} {r['model']} {r['setting']}, {r['source']})": r["state_bytes"]
        for r in state_rows
    }
    keep = ("step", "threads", "reps", "sinkkv_tok_s", "dynamiccache_tok_s", "ratio")
    return BenchResult(
        title=f"sink-KV vs DynamicCache at a full window (S={SINKS}, R={RECENT}), {model_label}",
        rows=[{k: r[k] for k in keep} for r in rows] + _generate_table(generate),
        summary={
            "ratio": prefill["ratio"],
            "decode_ratio": decode["ratio"],
            f"ratio_{default_threads}_threads": (
                prefill_default[0]["ratio"] if prefill_default else prefill["ratio"]
            ),
            "generate_ratio_vs_hf": generate["sinkkv_generate"]["ratio_vs_hf"],
            "generate_ratio_vs_hf_evicting": generate["sinkkv_generate_evicting"]["ratio_vs_hf"],
            "generate_ratio_vs_hf_wall": generate["sinkkv_generate"]["ratio_vs_hf_wall"],
            "generate_seconds_cpu (sinkkv, hf)": (generate["sinkkv_generate"]["cpu_seconds"],
                                                  generate["hf_generate"]["cpu_seconds"]),
            "generate_tokens": GENERATE_TOKENS,
            "model": model_label,
            "ratio_threads": 1,
            "model_load_seconds": load_seconds,
            **state_summary,
        },
        extra={"state_bytes": state_rows, "timings_ms": rows, "generate": generate_rows},
    )
