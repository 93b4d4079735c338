"""The scale benchmark's load: the run's sizes and stream ids, caption texts, the producer
processes (``python -m benchmarks.scale produce``) at a steady aggregate rate, one-entry bursts
to every stream, and the tokens every published entry carries.

``benchmarks/scale.py`` describes the benchmark.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import DATA_DIR

REPO = Path(__file__).resolve().parents[1]
PRODUCERS = 2
PREFIX = "scale"


@dataclass(frozen=True)
class Size:
    streams: int
    steady_s: float
    overload_s: float
    sample_s: float
    cache_mib: int


def _size(quick: bool) -> Size:
    # steady: long enough for ~6 entries per stream at 0.6x capacity (a stream's mean latency
    # over 2-3 entries was mostly one entry's luck); overload: long enough to build a backlog
    size = Size(200, 30.0, 15.0, 0.5, 16) if quick else Size(1000, 120.0, 30.0, 1.0, 64)
    env = os.environ
    steady_s = float(env.get("SINKSTREAM_SCALE_SECONDS", size.steady_s))
    return Size(
        streams=int(env.get("SINKSTREAM_SCALE_STREAMS", size.streams)),
        steady_s=steady_s,
        overload_s=steady_s * size.overload_s / size.steady_s,
        sample_s=size.sample_s,
        cache_mib=int(env.get("SINKSTREAM_SCALE_CACHE_MIB", size.cache_mib)),
    )


def _sid(i: int) -> str:
    return f"{PREFIX}-{i:05d}"


# ----- captions ----------------------------------------------------------------------------


def captions(seed: int) -> Iterator[tuple[str, str]]:
    """Endless (text, speaker) captions of 10-30 words: QMSum turns cut into pieces, else
    synthetic ones (same shape) when the data is absent."""
    rng = random.Random(seed)
    files = sorted((DATA_DIR / "qmsum" / "val").glob("*.json"))
    if files:
        from producer.formats import read_file

        rng.shuffle(files)
        while True:
            for file in files:
                for turn in read_file(file, "qmsum"):
                    words = turn.text.split()
                    while len(words) >= 10:
                        n = min(len(words), rng.randint(10, 30))
                        yield " ".join(words[:n]), turn.speaker or "Speaker"
                        words = words[n:]
    vocab = ("we", "should", "ship", "the", "release", "on", "friday", "after", "review",
             "tests", "are", "green", "budget", "numbers", "look", "fine", "next", "week")
    while True:
        yield (" ".join(rng.choice(vocab) for _ in range(rng.randint(10, 30))),
               rng.choice(("Alice", "Bob", "Carol", "Dan")))


# ----- the producer process ----------------------------------------------------------------


def produce(url: str, streams: list[str], rate: float, seconds: float, start_at: float,
            seed: int, out: Path) -> None:
    """Publish round-robin over ``streams`` (reshuffled each round) at ``rate`` entries/s
    from unix time ``start_at`` for ``seconds``; catch up at full speed when late. Writes
    every published entry (stream, id, text, speaker) and the worst lateness as JSON."""
    import redis

    from producer.publisher import Producer
    from sinkstream.settings import Settings

    client = redis.Redis.from_url(url)
    producer = Producer(client, settings=Settings(redis_url=url, broker_url=url))
    rng = random.Random(seed)
    texts = captions(seed)
    order: list[str] = []
    published: list[tuple[str, str, str, str]] = []
    total = int(rate * seconds)
    worst_late = 0.0
    time.sleep(max(0.0, start_at - time.time()))
    for j in range(total):
        due = start_at + j / rate
        now = time.time()
        if due > now:
            time.sleep(due - now)
        else:
            worst_late = max(worst_late, now - due)
        if not order:
            order = list(streams)
            rng.shuffle(order)
        sid = order.pop()
        text, speaker = next(texts)
        published.append((sid, producer.publish(sid, text, speaker), text, speaker))
    finished = time.time()
    out.write_text(json.dumps({"published": published, "worst_late_s": worst_late,
                               "seconds": finished - start_at}))


def _start_producers(url: str, sids: list[str], rate: float, seconds: float, tmp: Path,
                     tag: str, seed: int) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    """``PRODUCERS`` processes, each owning every PRODUCERS-th stream, starting together."""
    start_at = time.time() + 3.0  # interpreter start-up and imports before the first entry
    procs, outs = [], []
    for k in range(PRODUCERS):
        out = tmp / f"produce-{tag}-{k}.json"
        mine = sids[k::PRODUCERS]
        streams_file = tmp / f"streams-{tag}-{k}.json"
        streams_file.write_text(json.dumps(mine))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "benchmarks.scale", "produce", "--url", url,
             "--streams", str(streams_file), "--rate", str(rate / PRODUCERS),
             "--seconds", str(seconds), "--start-at", str(start_at),
             "--seed", str(seed + k), "--out", str(out)],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}))
        outs.append(out)
    return procs, outs


def _collect(procs: list[subprocess.Popen[bytes]], outs: list[Path]) -> dict[str, Any]:
    published: list[list[str]] = []
    late = 0.0
    for proc, out in zip(procs, outs, strict=True):
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(f"producer exited with {proc.returncode}")
        data = json.loads(out.read_text())
        published.extend(data["published"])
        late = max(late, data["worst_late_s"])
    return {"published": published, "worst_late_s": late}


def _fill_rounds(engine: Any, texts: Iterator[tuple[str, str]], sample: int = 200) -> int:
    """How many entries fill a stream's recent window, plus one so it has started evicting.

    Calibrating on young streams overstated capacity: a state's load, save and attention
    grow with its tokens until the window is full, so a steady phase at 0.6x that capacity
    fell behind once the streams had grown (lag rising from mid-phase on). Past the window a
    stream costs the same per entry for ever, which is the regime a deployment runs in."""
    from sinkstream.contracts.entries import InputEntry
    from workers.processing.batches import turn_tokens

    window = engine.window_tokens() or 0
    lengths = [len(turn_tokens(engine, InputEntry(id="0-0", text=t, speaker=s)))
               for t, s in (next(texts) for _ in range(sample))]
    return math.ceil(window / statistics.fmean(lengths)) + 1


def _burst(producer: Any, sids: list[str], texts: Iterator[tuple[str, str]]) -> tuple[
        dict[str, str], list[list[str]]]:
    """One entry to every stream, as fast as possible; returns last ids and the entries."""
    last: dict[str, str] = {}
    entries = []
    for sid in sids:
        text, speaker = next(texts)
        last[sid] = producer.publish(sid, text, speaker)
        entries.append([sid, last[sid], text, speaker])
    return last, entries


def _expected_tokens(engine: Any, entries: list[list[str]], prefix: bool = True) -> dict[
        str, int]:
    """Tokens each stream's state must have seen: its prefix (at stream start) + every
    entry, tokenized as the worker does."""
    from sinkstream.contracts.entries import InputEntry
    from workers.processing.batches import turn_tokens

    start = len(engine.stream_prefix()) if prefix else 0
    out: dict[str, int] = {}
    for sid, entry_id, text, speaker in entries:
        entry = InputEntry(id=entry_id, text=text, speaker=speaker)
        out[sid] = out.get(sid, start) + len(turn_tokens(engine, entry))
    return out
