"""Cross-stream batching: throughput of ``engine.feed_batch`` vs one stream at a time.

For N = 1, 4, 16, 64 concurrent streams, each stream holds a state already fed a different
number of tokens (so sink-KV rows have different cache fills and are left-padded), and gets
one new 64-token chunk. Both sides feed the same states and chunks, interleaved, with one torch
thread, timed in process CPU seconds (the cores are shared; CPU time of a one-thread process is
the work itself, whatever other jobs do to wall time):

* ``batched``: ``engine.feed_batch(states, chunks)`` (one forward per round for all rows);
* ``sequential``: ``[engine.feed(s, c) for s, c in zip(states, chunks)]``.

``tok_s`` = N * 64 / the fastest of the interleaved repetitions (medians in the JSON);
``speedup`` = batched tok/s / sequential tok/s; ``bit_identical``: every batched state equals
the sequential one byte for byte (exported as a commit stores it), in every repetition.
Engines: ``tiny-llama`` through sink-KV (S=4, R=1020) and ``tiny-rwkv`` (RWKV-7, 2x128)
through the RWKV engine (batched via :mod:`workers.engines.rwkv.batched`; since issue #23 a lone
stream takes that forward too, with one row), and the real default model (SmolLM2-135M,
N = 1, 4, 16, fewer repetitions: ``speedup_16_sinkkv_default_model``), and tiny-llama at N = 16
with full windows (1,024 cached tokens per row, as any stream older than a minute or two: row
``level = engine_full_window``, ``speedup_16_sinkkv_full_window``). Headline keys:
``speedup_16_sinkkv``, ``speedup_16_rwkv`` and ``speedup_16`` (the smaller of the two).

Worker level (rows with ``level = worker``): M streams of QMSum turns published to a private
``redis-server``; ``solo`` drains them with ``StreamProcessor.process`` one stream per task
(round-robin), ``multi`` with ``MultiStreamProcessor`` (``batch_streams`` = M) claiming the
others as companions: the whole per-batch path (lease, load from the hot cache, read, feed,
fenced commit with state encoding), no summaries. Wall seconds (Redis is another process),
the faster of interleaved repetitions; ``ratio`` = multi tok/s / solo tok/s. Rows with ``level
= worker_live``: the worker's defaults (batch limits, ``batch_streams``, time slice, for solo
tasks too) on 64 streams of 4 turns, more streams than a forward holds, as many live streams
look between two tasks (``worker_ratio_live_64_*``). Rows with ``level = worker_even``: as
``worker``, but every entry ``EVEN_CHARS`` characters, so all 16 streams are the same length
(``worker_ratio_even_16_*``). Every worker row also says how much of its ratio the workload
allows: ``feed_ratio`` (solo / multi seconds in forwards alone: the ratio if nothing but the
model cost time), ``rows_per_forward`` (chunks fed / forwards) and ``longest_stream_chunks``
(no schedule needs fewer forwards: QMSum turns vary, so one stream can hold a quarter of all
chunks and run alone at the end); summary keys ``worker_feed_ratio_16_*`` and
``worker_rows_per_forward_16_sinkkv``.

Budget sweep (rows with ``level = budget``): the default model through ``MultiStreamProcessor``
with the worker's default batch limits and time slice on a 16-stream backlog, once per
``batch_tokens`` in ``BUDGETS``: tokens/s and seconds per task (``budget_<N>_tok_s_default_model``).

Bound (row with ``level = bound``, ``speedup_16_sinkkv_default_model_bound``): the most a
16-stream batch of the default model could gain on this CPU, whatever the engine did: a
sequential round's seconds over its matmul FLOPs at the best rate this CPU reaches on the
model's weight shapes plus its attention seconds (``benchmarks/_batching_bound.py``).
"""

from __future__ import annotations

import functools
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks._batching_bound import batching_bound
from benchmarks.common import bench_settings, median, threads
from benchmarks.run import BenchResult
from workers.processing.observer import NullObserver


def cpu_timed(fn: Any) -> tuple[float, Any]:
    """CPU seconds of this process for ``fn()``: with one torch thread, the work itself,
    whatever other jobs on these shared cores do to wall time."""
    started = time.process_time()
    out = fn()
    return time.process_time() - started, out


CHUNK = 64
#: characters per entry of the worker rows with streams of equal length (~ a QMSum turn)
EVEN_CHARS = 240
STREAMS = (1, 4, 16, 64)
#: streams per round for the real default model
REAL_STREAMS = (1, 4, 16)
#: chunks of history of the first stream in a full-window round: past S + R = 1,024 tokens
FULL_WINDOW_CHUNKS = 18


def _streams(engine: Any, n: int, rounds: int, seed: int,
             full: bool = False) -> tuple[list[Any], list[list[list[int]]]]:
    """``n`` fed states and ``rounds`` rounds of one new chunk each. ``full``: histories past
    the window (S + R = 1,024 cached tokens), as every stream older than a minute or two of
    speech; else 128-384 cached tokens."""
    rng = random.Random(seed)
    vocab = 256
    # different history lengths per stream (multiples of the chunk: no pending tokens)
    first = FULL_WINDOW_CHUNKS if full else 2
    histories = [[rng.randrange(1, vocab) for _ in range(CHUNK * (first + i % 5))]
                 for i in range(n)]
    states = engine.feed_batch([engine.new_state() for _ in range(n)], histories)
    chunks = [[[rng.randrange(1, vocab) for _ in range(CHUNK)] for _ in range(n)]
              for _ in range(rounds)]
    return states, chunks


def _bound(engine: Any, n: int, seed: int) -> dict[str, Any]:
    """``batching_bound`` of one sequential round of ``n`` streams, as ``_measure`` feeds."""
    states, (chunk,) = _streams(engine, n, 1, seed)
    row = batching_bound(lambda: [engine.feed(s, t) for s, t in zip(states, chunk, strict=True)])
    return {"level": "bound", "engine": engine.kind, "model": engine.model_name,
            "streams": n, **row}


def _measure(engine: Any, n: int, reps: int, seed: int, full: bool = False) -> dict[str, Any]:
    """Batched vs sequential rounds of ``n`` streams (``_streams``), interleaved."""
    states, chunks = _streams(engine, n, reps + 1, seed, full)

    def batched(c: list[list[int]]) -> list[Any]:
        return list(engine.feed_batch(states, c))

    def sequential(c: list[list[int]]) -> list[Any]:
        return [engine.feed(s, t) for s, t in zip(states, c, strict=True)]

    batched(chunks[0])  # warm-up
    sequential(chunks[0])
    times: dict[str, list[float]] = {"batched": [], "sequential": []}
    identical = True
    for r in range(reps):
        c = chunks[r + 1]
        order = (batched, sequential) if r % 2 == 0 else (sequential, batched)
        fed: dict[str, list[Any]] = {}
        for fn in order:
            seconds, fed[fn.__name__] = cpu_timed(functools.partial(fn, c))
            times[fn.__name__].append(seconds)
        identical &= all(engine.export_state(a) == engine.export_state(b)
                         for a, b in zip(fed["batched"], fed["sequential"], strict=True))
    tokens = n * CHUNK
    b_tps = tokens / min(times["batched"])
    s_tps = tokens / min(times["sequential"])
    return {
        "engine": engine.kind,
        "model": engine.model_name,
        "streams": n,
        "reps": reps,
        "batched_tok_s": b_tps,
        "sequential_tok_s": s_tps,
        "speedup": b_tps / s_tps,
        "median_speedup": median(times["sequential"]) / median(times["batched"]),
        "bit_identical": identical,
    }


def _worker_level(engine: Any, spec: str, streams: int, turns: int, reps: int,
                  live: bool = False, even: int = 0) -> dict[str, Any]:
    """M streams through the worker's per-stream path vs the cross-stream path, one Redis.

    ``live``: the worker's defaults (batch limits, ``batch_streams``, time slice) on many
    short streams, as live streams look between two tasks; otherwise one batch of 4 entries
    per stream per task, every stream in one forward. ``even``: entries of that many
    characters (``_publish_backlog``), so every stream has the same length."""
    from workers.processing.multistream import MultiStreamProcessor
    from workers.processing.processor import StreamProcessor

    limits = {} if live else {"max_batch_entries": 4, "max_batch_tokens": 2048,
                              "batch_time_slice_seconds": 0.0, "batch_streams": streams,
                              "batch_tokens": streams * 2048}
    settings = bench_settings(
        sink_tokens=4, recent_tokens=1020, chunk_tokens=CHUNK, summary_every_tokens=0,
        summary_memory=False, retrieval="off", metrics_port=0, **limits)
    time_slice = settings.batch_time_slice_seconds
    times: dict[str, list[float]] = {"solo": [], "multi": []}
    feeds: dict[str, list[_FeedClock]] = {"solo": [], "multi": []}
    tokens, chunks = 0, [0]
    with _private_redis() as client:
        for rep in range(reps):
            for side in (("solo", "multi") if rep % 2 == 0 else ("multi", "solo")):
                client.flushall()
                sids, ends = _publish_backlog(client, settings, f"{side}{rep}", streams, turns,
                                              even)
                clock = _FeedClock()
                proc = StreamProcessor(engine, client, settings, f"bench-{side}", observer=clock)
                multi = MultiStreamProcessor(proc, settings.batch_streams, settings.batch_tokens)
                task = (functools.partial(_solo_task, proc, time_slice) if side == "solo"
                        else functools.partial(_multi_task, multi, time_slice))
                seconds, _ = _drain(proc, ends, task)
                times[side].append(seconds)
                feeds[side].append(clock)
                seen = [proc.committed_state(s)[0].tokens_seen for s in sids]
                tokens, chunks = sum(seen), [n // engine.chunk_tokens for n in seen]
    solo_tps, multi_tps = tokens / min(times["solo"]), tokens / min(times["multi"])
    solo_feed = min(c.seconds for c in feeds["solo"])
    multi_feed = min(feeds["multi"], key=lambda c: c.seconds)
    return {
        "level": "worker_live" if live else "worker_even" if even else "worker",
        "engine": engine.kind,
        "streams": streams,
        "batch_streams": settings.batch_streams,
        "time_slice_s": time_slice,
        "reps": reps,
        "batched_tok_s": multi_tps,
        "sequential_tok_s": solo_tps,
        "speedup": multi_tps / solo_tps,
        "median_speedup": median(times["solo"]) / median(times["multi"]),
        # the model's share alone: what the ratio would be if nothing but the feed cost time
        "feed_ratio": solo_feed / multi_feed.seconds,
        "rows_per_forward": sum(chunks) / max(1, multi_feed.forwards),
        # no schedule needs fewer forwards than the longest stream has chunks
        "longest_stream_chunks": max(chunks),
        "chunks": sum(chunks),
    }


class _FeedClock(NullObserver):
    """A batch observer that keeps only the model's time: seconds in forwards, and how many
    (one ``fed`` per forward in a batched task; one per batch, chunks and all, in a solo
    one)."""

    def __init__(self) -> None:
        self.seconds, self.forwards = 0.0, 0

    def fed(self, tokens: int, seconds: float) -> None:
        self.seconds += seconds
        self.forwards += 1


#: ``batch_tokens`` values tried by the budget sweep: 0 is the default (auto: one time slice
#: of this worker's measured feed speed), the others fixed budgets
BUDGETS = (0, 2048, 8192, 32768)


def _budget_sweep(engine: Any, streams: int, turns: int) -> list[dict[str, Any]]:
    """The worker's defaults on a backlog, for each ``batch_tokens`` in ``BUDGETS``: M streams
    of ``turns`` QMSum turns each, drained by ``MultiStreamProcessor`` (``batch_streams`` = M)
    with the default per-stream batch limits (``max_batch_entries``, ``max_batch_tokens``) and
    the default time slice, so the budget binds: a stream's first batch is a whole
    ``max_batch_tokens``. Per budget: tokens/s, tasks run, and seconds per task (how long a
    task holds its streams before the next task may take them)."""
    from workers.processing.multistream import MultiStreamProcessor
    from workers.processing.processor import StreamProcessor

    settings = bench_settings(summary_every_tokens=0, summary_memory=False, retrieval="off",
                              metrics_port=0)
    rows = []
    with _private_redis() as client:
        for budget in BUDGETS:
            client.flushall()
            proc = StreamProcessor(engine, client, settings, "bench-budget")
            multi = MultiStreamProcessor(proc, streams, budget)
            if not budget:  # auto: speed measured as in a running worker, not cold
                warm, _ = _publish_backlog(client, settings, "budget-warm-up", 1, 4)
                multi.process(warm[0], 0.0)
            sids, ends = _publish_backlog(client, settings, f"budget{budget}", streams, turns)
            seconds, task_s = _drain(proc, ends, functools.partial(
                _multi_task, multi, settings.batch_time_slice_seconds))
            tokens = sum(proc.committed_state(s)[0].tokens_seen for s in sids)
            rows.append({
                "level": "budget", "engine": engine.kind, "model": engine.model_name,
                "streams": streams, "batch_tokens": budget or "auto",
                "default": budget == settings.batch_tokens, "tokens": tokens,
                "tok_s": tokens / seconds, "tasks": len(task_s),
                "task_s_median": median(task_s), "task_s_max": max(task_s),
            })
    return rows


@contextmanager
def _private_redis() -> Iterator[Any]:
    """A client of a private redis-server in a temporary folder, stopped afterwards."""
    from sinkstream.cli.localredis import RedisServer

    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            yield server.client()
        finally:
            server.stop(hard=True)


def _publish_backlog(client: Any, settings: Any, prefix: str, streams: int, turns: int,
                     even: int = 0) -> tuple[list[str], dict[str, str]]:
    """``streams`` streams of ``turns`` QMSum turns each, from staggered offsets; their ids and
    where each ends (applied input is trimmed, so the end is remembered before feeding).
    ``even``: every entry instead ``even`` characters of the meeting's text from the stream's
    offset on, so that with a byte tokenizer every stream holds the same number of tokens."""
    from benchmarks.common import qmsum_text
    from producer.publisher import Producer

    lines = [ln for ln in qmsum_text(3).splitlines() if ln.strip()]
    producer = Producer(client, settings=settings)
    sids = [f"{prefix}-{i}" for i in range(streams)]
    for i, sid in enumerate(sids):
        start = (i * 37) % max(1, len(lines) - turns)
        entries = lines[start : start + turns]
        if even:
            text = " ".join(lines[start:]).encode("ascii", "replace").decode()
            entries = [text[k * even : (k + 1) * even] for k in range(turns)]
        producer.publish_many(sid, entries)
    return sids, {sid: _last_id(client, sid) for sid in sids}


def _solo_task(proc: Any, time_slice_s: float, pending: list[str]) -> list[Any]:
    """A task for every pending stream, one stream per task (``batch_streams`` = 1)."""
    return [proc.process(sid, time_slice_s) for sid in pending]


def _multi_task(multi: Any, time_slice_s: float, pending: list[str]) -> list[Any]:
    """One task for the oldest pending stream, with the others claimed as companions."""
    return list(multi.process(pending[0], time_slice_s))


def _drain(proc: Any, ends: dict[str, str], task: Callable[[list[str]], Sequence[Any]]
           ) -> tuple[float, list[float]]:
    """Run ``task`` on the streams not yet committed to their ends until none is left; the
    wall seconds in all and per task. A failed stream stops the benchmark."""
    task_s: list[float] = []
    started = time.perf_counter()
    pending = list(ends)
    while pending:
        t0 = time.perf_counter()
        outcomes = task(pending)
        task_s.append(time.perf_counter() - t0)
        bad = [o for o in outcomes if o.status not in ("applied", "idle")]
        if bad:
            raise RuntimeError(f"benchmark streams failed: {bad[:3]}")
        pending = [s for s in ends if _committed(proc, s) != ends[s]]
    return time.perf_counter() - started, task_s


def _last_id(client: Any, stream: str) -> str:
    from sinkstream.contracts.keys import StreamKeys

    last: Any = client.xrevrange(StreamKeys.of(stream).input, count=1)
    return str(last[0][0].decode())


def _committed(proc: Any, stream: str) -> str | None:
    info = proc.store.info(stream)
    return None if info is None else str(info.last_entry_id)


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
    # the real default model (SmolLM2-135M, the default dtype): fewer streams and repetitions,
    # a 16-stream round takes seconds
    real = load_engine(settings)
    for n in REAL_STREAMS:
        rows.append(_measure(real, n, 2 if quick else 3, seed=n))
    bound = _bound(real, 16, seed=16)
    full_window = _measure(load_engine(settings, "tiny-llama"), 16, reps, seed=16, full=True)
    for r in rows:
        r["level"] = "engine"
    rows.append({**full_window, "level": "engine_full_window"})
    rows.append(bound)
    for spec in ("tiny-llama", "tiny-rwkv"):
        engine = load_engine(settings, spec)
        rows.append(_worker_level(engine, spec, 16, 8 if quick else 16, 2 if quick else 3))
        rows.append(_worker_level(engine, spec, 16, 8 if quick else 16, 2 if quick else 3,
                                  even=EVEN_CHARS))
        rows.append(_worker_level(engine, spec, 64, 4, 2 if quick else 3, live=True))
    rows += _budget_sweep(real, 16, 16 if quick else 48)
    tiny = [r for r in rows if r["level"] == "engine" and r["model"] != real.model_name]
    by = {(r["engine"], r["streams"]): r["speedup"] for r in tiny}
    by_real = {r["streams"]: r["speedup"] for r in rows
               if r["level"] == "engine" and r["model"] == real.model_name}
    worker = {r["engine"]: r["speedup"] for r in rows if r["level"] == "worker"}
    live = {r["engine"]: r["speedup"] for r in rows if r["level"] == "worker_live"}
    even = {r["engine"]: r["speedup"] for r in rows if r["level"] == "worker_even"}
    feed = {r["engine"]: r["feed_ratio"] for r in rows if r["level"] == "worker"}
    rows_per = {r["engine"]: r["rows_per_forward"] for r in rows if r["level"] == "worker"}
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
            "speedup_16_sinkkv_full_window": full_window["speedup"],
            f"speedup_16_{real.kind}_default_model": by_real[16],
            # the most batching could give that model on this CPU (_batching_bound.py)
            f"speedup_16_{real.kind}_default_model_bound": bound["bound"],
            "default_model": real.model_name,
            "bit_identical": all(r["bit_identical"] for r in rows
                                 if r["level"].startswith("engine")),
            "worker_ratio_16_sinkkv": worker["sinkkv"],
            "worker_ratio_16_rwkv": worker["rwkv"],
            "worker_feed_ratio_16_sinkkv": feed["sinkkv"],
            "worker_feed_ratio_16_rwkv": feed["rwkv"],
            "worker_rows_per_forward_16_sinkkv": rows_per["sinkkv"],
            "worker_ratio_even_16_sinkkv": even["sinkkv"],
            "worker_ratio_even_16_rwkv": even["rwkv"],
            "worker_ratio_live_64_sinkkv": live["sinkkv"],
            "worker_ratio_live_64_rwkv": live["rwkv"],
            **{f"budget_{r['batch_tokens']}_tok_s_default_model": r["tok_s"]
               for r in rows if r["level"] == "budget"},
            "threads": threads(),
        },
    )
