"""Producer throughput: our idempotent, capped Lua append vs raw redis-py pipelined XADD.

Both paths write the same ~100-byte caption entries (text, speaker, ts) to a private
redis-server started here, in batches of the same size, in alternating order over several
rounds (the machine is shared, so both are measured side by side and the best and median
rounds are compared). Ours does strictly more work per entry (sequence check, length cap,
registry updates), so the question is how much of raw XADD throughput is kept.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from benchmarks.run import BenchResult
from producer.formats import Turn
from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from sinkstream.settings import Settings, load_settings
from state_store.connection import redis_from_settings

BATCH = 1000
_WORDS = (
    "we the release build is green so let's ship it on friday after the review and I think "
    "customers asked about pricing for the new tier but marketing wants a launch plan with "
    "numbers from last quarter okay sounds good could you share the slides before standup "
    "café naïve déjà vu résumé"
).split()
_SPEAKERS = ("Alice", "Bob Smith", "Carol", "Project Manager", "Speaker 5", "Dr. Okafor")


def captions(n: int, seed: int = 7) -> list[Turn]:
    """``n`` deterministic caption turns of 80-120 bytes with speakers and timestamps."""
    rng = random.Random(seed)
    turns = []
    ts = 0.0
    for _ in range(n):
        target = rng.randint(80, 120)
        words: list[str] = []
        size = 0
        while size < target:
            word = rng.choice(_WORDS)
            words.append(word)
            size += len(word.encode()) + 1
        ts += rng.uniform(0.5, 4.0)
        turns.append(Turn(" ".join(words).capitalize() + ".", rng.choice(_SPEAKERS), round(ts, 3)))
    return turns


def _ours(client: redis.Redis, cfg: Settings, stream: str, turns: list[Turn]) -> None:
    producer = Producer(client, settings=cfg, batch_entries=BATCH)
    producer.publish_many(stream, turns)


def _raw(client: redis.Redis, cfg: Settings, stream: str, turns: list[Turn]) -> None:
    key = StreamKeys.of(stream).input
    pipe = client.pipeline(transaction=False)
    for i, (text, speaker, ts) in enumerate(turns, 1):
        pipe.xadd(key, {"text": text, "speaker": speaker or "", "ts": repr(ts)})
        if i % BATCH == 0:
            pipe.execute()
    pipe.execute()


METHODS: dict[str, Callable[[redis.Redis, Settings, str, list[Turn]], None]] = {
    "ours (Producer)": _ours,
    "raw XADD pipeline": _raw,
}


def _measure(quick: bool) -> tuple[int, int, dict[str, list[float]]]:
    n, rounds = (50_000, 5) if quick else (200_000, 7)
    turns = captions(n)
    workdir = Path(tempfile.mkdtemp(prefix="sinkstream-bench-publish-"))
    server = RedisServer(workdir / "redis").start()
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    try:
        cfg = load_settings(redis_url=server.url, max_stream_length=10 * n)
        client = redis_from_settings(cfg)
        names = list(METHODS)
        for rnd in range(rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:
                stream = f"bench-{rnd}-{names.index(name)}"
                started = time.perf_counter()
                METHODS[name](client, cfg, stream, turns)
                times[name].append(time.perf_counter() - started)
                key = StreamKeys.of(stream).input
                if client.xlen(key) != n:
                    raise RuntimeError(f"{name}: wrote {client.xlen(key)} entries, not {n}")
                client.delete(key, StreamKeys.of(stream).producers)
    finally:
        server.stop(hard=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return n, rounds, times


def run(quick: bool) -> BenchResult:
    n, rounds, times = _measure(quick)
    rows = []
    for name, secs in times.items():
        rows.append({
            "method": name,
            "entries": n,
            "best s": min(secs),
            "median s": statistics.median(secs),
            "best entries/s": n / min(secs),
            "median entries/s": n / statistics.median(secs),
        })
    ours, raw = (times[name] for name in METHODS)
    return BenchResult(
        title=f"publish: {n:,} captions (~100 B + speaker + ts), batches of {BATCH}, "
        f"{rounds} alternating rounds",
        rows=rows,
        summary={
            "ratio": min(raw) / min(ours),  # throughput ours / raw, best rounds
            "ratio_median": statistics.median(raw) / statistics.median(ours),
            "entries_per_s": n / min(ours),
        },
        extra={"seconds": times, "batch": BATCH, "targets": {"ratio": 0.8, "entries_per_s": 30000}},
    )
