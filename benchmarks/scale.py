"""Scale: many live streams publishing at once against 2 real workers: throughput, lag
fairness, worker memory under a binding hot-cache budget, and exactly-once at the end.

Setup: a private ``redis-server`` (free loopback port), 2 real ``sinkstream worker``
processes (tiny-llama, one torch thread each, production defaults for the window, batching,
time slice, dispatcher and trimming; rolling summaries off so feeding is what is measured,
and for the same reason retrieval memory on its lexical index (``retrieval = "bm25"``;
``SINKSTREAM_SCALE_RETRIEVAL=embedding`` for the default): tiny-llama stands in for a model
~100x its cost, but the 22M-parameter MiniLM embedder does not shrink with it, so embedding
each closed chunk would cost more than feeding it and the benchmark would measure MiniLM;
with SmolLM2 the embedder adds 7.6% (``retrieval_cost``);
which dispatcher mode ran, producers' wake-ups or full passes only (``SINKSTREAM_DISPATCH_WAKE``,
``SINKSTREAM_DISPATCH_INTERVAL_SECONDS``), is recorded in ``extra.settings.dispatcher``;
``hot_cache_bytes`` small enough that the streams' states do not all fit), and producer
*processes* (``python -m benchmarks.scale produce``, each with its own ``Producer``) that
publish caption-like entries (a QMSum speaker, 10-30 words) round-robin over their streams at
a steady aggregate rate.

Phases, all on the same streams and workers:

1. ``warm-up`` — rounds of one entry to every stream, until every stream's recent window is
   full and evicting: a state's size (load, save) and its attention grow with its tokens up to
   the window and stay flat after it, so every later phase runs at the size a long-lived
   stream has. (Calibrating on 1-2 entry streams overstated capacity: the steady phase then
   fell behind as the streams grew.)
2. ``calibrate`` — again one entry to every stream at once; entries/s to apply them all is the
   workers' capacity when each task carries one entry of one stream (the steady regime).
3. ``steady`` — ``SUSTAIN`` x capacity entries/s for ``duration`` seconds, then drain.
4. ``overload`` — ``OVERLOAD`` x capacity entries/s: above what one-entry tasks sustain, so
   backlogs build (each task then carries several entries) and lag grows; then drain.

Entry latency = the commit time of the commit that applied an entry (``committed_ms``, set
by the commit script on Redis's clock, read by :class:`CommitWatcher` on every state write via
keyspace notifications) minus its publish time (the ms in its entry id): exact, per entry.
``fairness`` = max / median over streams of each stream's mean entry latency in the phase
(target <= 2); ``halves corr`` = the correlation over streams of that mean in the first vs
the second half of each stream's entries: near 0 means the spread is chance, near 1 that
the same streams are systematically served later (unfair scheduling).

Lag of a stream (``monitoring.lag.LagReader``, the exporter's own computation) = Redis time
now minus the publish time of its oldest unapplied entry, 0 when nothing is pending: what an
operator sees. Sampled for every stream every ``sample_s``; per phase p50/p90/p99/max over
all (stream, sample) pairs, and percentiles over streams per sample for the plot. (Its
time-averaged max/median ratio is in ``extra``; at steady load most samples are 0 and that
ratio is sampling noise, hence the per-entry latency above.)

tokens/s = the workers' ``sinkstream_tokens_fed_total`` delta over the phase's publishing
window (applied, not published). Worker RSS (psutil) and the ``sinkstream_hot_cache_bytes``
gauge are sampled too; RSS growth is measured from the baseline taken after each worker
applied small warm-up streams (models loaded: the language model and, with
``retrieval = "embedding"``, the MiniLM embedder, which workers load at start; first forwards
done; retrieval memory chunks closed) and compared with ``hot_cache_bytes``.
Exactly-once: after the last drain each stream's committed ``last_entry_id`` must equal the
id of the last entry published to it, and its ``tokens_seen`` the tokens of every entry
published to it, tokenized as the worker does (a duplicate or a loss changes the count); no
dead letters, no failed streams.

The box has 2 CPU cores shared with other jobs: capacity is calibrated in the same run, and
the load average is recorded. Environment: ``SINKSTREAM_SCALE_STREAMS``,
``SINKSTREAM_SCALE_SECONDS``, ``SINKSTREAM_SCALE_CACHE_MIB`` override the sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import DATA_DIR, output_path, pyplot, scrape_metrics
from benchmarks.run import BenchResult

REPO = Path(__file__).resolve().parents[1]
WORKERS = 2
PRODUCERS = 2
#: steady rate and overload rate, as multiples of the calibrated one-entry-per-task capacity
SUSTAIN = 0.6
OVERLOAD = 2.0
FAIRNESS_TARGET = 2.0
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


# ----- workers and measurements ------------------------------------------------------------


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    rss_baseline: int = 0


def _worker_env(url: str, port: int, cache_bytes: int, tmp: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "SINKSTREAM_REDIS_URL": url,
        "SINKSTREAM_BROKER_URL": url,
        "SINKSTREAM_MODEL": "tiny-llama",
        "SINKSTREAM_MODEL_CACHE_DIR": str(tmp / "models"),
        "SINKSTREAM_HOT_CACHE_BYTES": str(cache_bytes),
        "SINKSTREAM_SUMMARY_EVERY_TOKENS": "0",
        "SINKSTREAM_RETRIEVAL": os.environ.get("SINKSTREAM_SCALE_RETRIEVAL", "bm25"),
        "SINKSTREAM_METRICS_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
    }
    env.pop("SINKSTREAM_CONFIG", None)
    return env


def _rss(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def _check_alive(workers: list[Worker]) -> None:
    for w in workers:
        if w.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {w.proc.returncode}:\n"
                               f"{w.log.read_text(errors='replace')[-3000:]}")


def _committed(client: Any, sids: list[str]) -> list[tuple[str | None, int]]:
    from sinkstream.contracts.keys import StreamKeys

    pipe = client.pipeline(transaction=False)
    for sid in sids:
        pipe.hmget(StreamKeys.of(sid).state, ["last_entry_id", "tokens_seen"])
    return [((last.decode() if last else None), int(tokens or 0))
            for last, tokens in pipe.execute()]


def _wait_applied(client: Any, last_ids: dict[str, str], workers: list[Worker],
                  timeout: float, monitor: Monitor | None = None) -> float:
    """Seconds until every stream's committed id reached ``last_ids`` (sampling lag
    meanwhile when a monitor is given)."""
    from sinkstream.ids import entry_id_key

    sids = list(last_ids)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        _check_alive(workers)
        done = all(entry_id_key(c) >= entry_id_key(last_ids[s])
                   for s, (c, _) in zip(sids, _committed(client, sids), strict=True))
        if done:
            return time.monotonic() - started
        if monitor is not None:
            monitor.sample()
        time.sleep(0.05 if monitor is None else monitor.size.sample_s)
    raise TimeoutError(f"streams not applied within {timeout:.0f}s")


class CommitWatcher:
    """Records every commit of the benchmark's streams: (stream, last_entry_id, commit ms).

    Keyspace notifications (``notify-keyspace-events Kh``) announce each write of a state
    hash; the watcher then reads ``last_entry_id`` and ``committed_ms`` (Redis's clock, set by
    the commit script). An entry's apply latency = the commit ms of the first commit whose
    ``last_entry_id`` >= its id, minus the ms in its id: exact to the millisecond, unlike
    sampling. (Two commits of one stream between an event and its read are seen as the later
    one: a slight overestimate, and rare with one stream committed every few seconds.)
    """

    def __init__(self, url: str) -> None:
        import threading

        import redis

        self.client = redis.Redis.from_url(url)
        self.client.config_set("notify-keyspace-events", "Kh")
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"__keyspace@0__:sinkstream:{{{PREFIX}-*}}:state")
        self.commits: dict[str, list[tuple[tuple[int, int], int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from sinkstream.contracts.keys import StreamKeys
        from sinkstream.ids import entry_id_key

        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message is None:
                continue
            channel = message["channel"].decode()
            sid = channel[channel.index("{") + 1 : channel.rindex("}")]
            last, ms = self.client.hmget(StreamKeys.of(sid).state,
                                         ["last_entry_id", "committed_ms"])
            if not last or not ms:
                continue
            seen = self.commits.setdefault(sid, [])
            key = entry_id_key(last)
            if not seen or seen[-1][0] != key:
                seen.append((key, int(ms)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.pubsub.close()

    def catch_up(self, last_ids: dict[str, str], timeout: float = 30.0) -> None:
        """Wait (bounded) until the watcher has seen the commits of ``last_ids``: events are
        read in this thread, which can lag behind a loaded box."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.latency_s(sid, eid) is not None for sid, eid in last_ids.items()):
                return
            time.sleep(0.1)

    def latency_s(self, sid: str, entry_id: str) -> float | None:
        """Seconds from publishing ``entry_id`` to the commit that applied it."""
        from sinkstream.ids import entry_id_key

        key = entry_id_key(entry_id)
        for committed, ms in self.commits.get(sid, []):
            if committed >= key:
                return (ms - key[0]) / 1000.0
        return None


@dataclass
class Monitor:
    """Samples lag of every stream, worker RSS and /metrics; tags samples with the phase."""

    client: Any
    sids: list[str]
    workers: list[Worker]
    size: Size
    t0: float = field(default_factory=time.monotonic)
    phase: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list)
    #: phase -> stream -> list of sampled lags (seconds)
    lags: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from monitoring.lag import LagReader

        self.reader = LagReader(self.client, batch_size=500)

    def sample(self) -> None:
        _check_alive(self.workers)
        seconds, micros = self.client.time()
        now = float(seconds) + float(micros) / 1e6
        ages: list[float] = []
        pending = 0
        by_stream = self.lags.setdefault(self.phase, {})
        for start in range(0, len(self.sids), 500):
            for lag in self.reader.read_batch(self.sids[start : start + 500], now):
                ages.append(lag.oldest_age_s)
                pending += lag.pending
                by_stream.setdefault(lag.stream_id, []).append(lag.oldest_age_s)
        metrics = [scrape_metrics(w.port) for w in self.workers]
        ages.sort()
        self.samples.append({
            "t": time.monotonic() - self.t0,
            "phase": self.phase,
            "pending_entries": pending,
            "lagging_streams": sum(a > 0 for a in ages),
            "lag_p50": _pct(ages, 50), "lag_p90": _pct(ages, 90), "lag_p99": _pct(ages, 99),
            "lag_max": ages[-1] if ages else 0.0,
            "rss": [_rss(w.proc.pid) for w in self.workers],
            "hot_cache_bytes": [m.get("sinkstream_hot_cache_bytes", 0.0) for m in metrics],
            "tokens_fed": sum(m.get("sinkstream_tokens_fed_total", 0.0) for m in metrics),
            "entries_applied": sum(m.get("sinkstream_entries_applied_total", 0.0)
                                   for m in metrics),
            "batches_applied": sum(m.get("sinkstream_batches_total:applied", 0.0)
                                   for m in metrics),
            "hits": sum(m.get("sinkstream_hot_cache_hits_total", 0.0) for m in metrics),
            "misses": sum(m.get("sinkstream_hot_cache_misses_total", 0.0) for m in metrics),
        })

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            self.sample()
            time.sleep(max(0.0, self.size.sample_s - (time.monotonic() - started)))


def _pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, int(round(q / 100 * len(sorted_values) + 0.4999)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _stream_means(per_stream: dict[str, list[float]], pending_only: bool = False) -> dict[
        str, float]:
    """Each stream's mean sampled lag (over samples where it had input pending, if asked)."""
    out = {}
    for sid, values in per_stream.items():
        kept = [v for v in values if v > 0] if pending_only else values
        if kept:
            out[sid] = statistics.fmean(kept)
    return out


def _fairness(means: list[float]) -> tuple[float, float, float]:
    """(max / median, max, median) of per-stream mean lags."""
    if not means:
        return float("nan"), 0.0, 0.0
    med, top = statistics.median(means), max(means)
    return (top / med if med > 0 else float("inf")), top, med


def _persistence(per_stream: dict[str, list[float]]) -> float:
    """Pearson correlation, over streams, of mean latency in the first vs the second half of
    each stream's values. Unfair scheduling (some streams systematically served later) keeps
    the same streams behind in both halves (correlation near 1); chance alone gives ~0."""
    first, second = [], []
    for values in per_stream.values():
        half = len(values) // 2
        if half:
            first.append(statistics.fmean(values[:half]))
            second.append(statistics.fmean(values[half:]))
    if len(first) < 3 or len(set(first)) < 2 or len(set(second)) < 2:
        return float("nan")
    return statistics.correlation(first, second)


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


def _phase_row(mon: Monitor, watcher: CommitWatcher, name: str, rate: float,
               window: tuple[float, float], entries: list[list[str]], tokens_published: int,
               drain_s: float, late_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(table row, details) for phase ``name``: applied rates over its publishing window,
    entry latencies from the commit watcher, sampled lag over the whole phase."""
    samples = [s for s in mon.samples if s["phase"] == name]
    inside = [s for s in samples if window[0] <= s["t"] <= window[1]] or samples
    span = max(inside[-1]["t"] - inside[0]["t"], 1e-9)
    tokens_s = (inside[-1]["tokens_fed"] - inside[0]["tokens_fed"]) / span
    entries_s = (inside[-1]["entries_applied"] - inside[0]["entries_applied"]) / span
    batches = inside[-1]["batches_applied"] - inside[0]["batches_applied"]
    hits = inside[-1]["hits"] - inside[0]["hits"]
    misses = inside[-1]["misses"] - inside[0]["misses"]
    # entry latency: publish -> the commit that applied it (exact, from committed_ms)
    by_stream: dict[str, list[float]] = {}
    timeline: list[tuple[int, float]] = []  # (publish ms, latency s): is the tail periodic?
    unseen = 0
    for sid, entry_id, _, _ in entries:
        latency = watcher.latency_s(sid, entry_id)
        if latency is None:
            unseen += 1
        else:
            by_stream.setdefault(sid, []).append(latency)
            timeline.append((int(entry_id.partition("-")[0]), round(latency, 4)))
    latencies = sorted(v for values in by_stream.values() for v in values)
    means = sorted(statistics.fmean(v) for v in by_stream.values())
    fair, fair_max, fair_med = _fairness(means)
    # sampled lag (monitoring.lag), over the whole phase, publishing and drain
    per_stream = mon.lags.get(name, {})
    lags = sorted(v for values in per_stream.values() for v in values)
    sampled_fair, _, _ = _fairness(list(_stream_means(per_stream).values()))
    pending_fair, _, _ = _fairness(list(_stream_means(per_stream, True).values()))
    row = {
        "phase": name,
        "target entries/s": rate,
        "published": len(entries),
        "applied entries/s": entries_s,
        "applied tok/s": tokens_s,
        "entries/batch": (entries_s * span / batches) if batches else float("nan"),
        "latency p50 s": _pct(latencies, 50),
        "latency p99 s": _pct(latencies, 99),
        "latency max s": latencies[-1] if latencies else float("nan"),
        "fairness": fair,
        "halves corr": _persistence(by_stream),
        "lag p50 s": _pct(lags, 50),
        "lag p90 s": _pct(lags, 90),
        "lag p99 s": _pct(lags, 99),
        "lag max s": lags[-1] if lags else 0.0,
        "hot hit": hits / (hits + misses) if hits + misses else float("nan"),
        "drain s": drain_s,
    }
    details = {
        "published_tokens_per_s": tokens_published / max(window[1] - window[0], 1e-9),
        "latency_p90_s": _pct(latencies, 90),
        "stream_mean_latency_max_s": fair_max, "stream_mean_latency_median_s": fair_med,
        "stream_mean_latency_p99_over_p50": _pct(means, 99) / fair_med if fair_med else None,
        "entries_without_commit_seen": unseen,
        "fairness_sampled_lag": sampled_fair,
        "fairness_sampled_lag_pending": pending_fair,
        "producer_worst_late_s": late_s,
        "entry_latencies": sorted(timeline),
    }
    return row, details


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


def _memory_chunks(client: Any, sids: list[str]) -> dict[str, int]:
    """Closed retrieval memory chunks per stream (the warm-up streams should have some)."""
    from workers.memory.persistence import read_chunks

    return {sid: len(read_chunks(client, sid)) for sid in sids}


def _dispatcher_mode(settings: Any) -> dict[str, Any]:
    """How the workers dispatch: they read the same environment as ``settings``."""
    return {"mode": "wake" if settings.dispatch_wake else "poll",
            "dispatch_interval_seconds": settings.dispatch_interval_seconds}


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(quick: bool) -> BenchResult:
    import redis

    from producer.publisher import Producer
    from sinkstream.cli.localredis import RedisServer, free_port
    from sinkstream.contracts.keys import StreamKeys
    from sinkstream.settings import Settings
    from workers.engines.loading import load_engine

    os.environ.setdefault("COLUMNS", "200")
    size = _size(quick)
    cache_bytes = size.cache_mib * 1024 * 1024
    tmp = Path(tempfile.mkdtemp(prefix="sinkstream-scale-"))
    server = RedisServer(tmp / "redis")
    workers: list[Worker] = []
    load: dict[str, list[float]] = {"start": _load_avg()}
    try:
        server.start()
        url = server.url
        client = redis.Redis.from_url(url)
        settings = Settings(redis_url=url, broker_url=url, model="tiny-llama")
        producer = Producer(client, settings=settings)
        texts = captions(1)
        all_entries: list[list[str]] = []

        # --- workers: ready = /metrics answers and a warm-up stream of its own is applied -----
        for i in range(WORKERS):
            port = free_port()
            log = tmp / f"worker-{i}.log"
            workers.append(Worker(subprocess.Popen(
                [sys.executable, "-m", "sinkstream", "worker", "--loglevel", "WARNING",
                 "--name", f"scale{i}@%h"],
                env=_worker_env(url, port, cache_bytes, tmp), cwd=REPO,
                stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True),
                port, log))
        engine = load_engine(settings)  # for the expected token counts, while they start
        deadline = time.monotonic() + 300
        for w in workers:
            while True:
                _check_alive(workers)
                try:
                    scrape_metrics(w.port)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError("workers did not start") from None
                    time.sleep(0.2)
        warm_ids = {f"warm-{i}": producer.publish_many(
            f"warm-{i}", [next(texts) for _ in range(8)]).last_id or "" for i in range(4)}
        _wait_applied(client, warm_ids, workers, 300)
        warm_chunks = _memory_chunks(client, list(warm_ids))  # closed (and embedded) too
        time.sleep(1.0)
        for w in workers:
            w.rss_baseline = _rss(w.proc.pid)

        sids = [_sid(i) for i in range(size.streams)]
        mon = Monitor(client, sids, workers, size)
        bounds: dict[str, tuple[float, float]] = {}
        rows: list[dict[str, Any]] = []
        details: dict[str, dict[str, Any]] = {}
        watcher = CommitWatcher(url)

        # --- warm-up: every stream's window filled (states at their steady size, evicting);
        # calibration: one more entry to every stream at once --------------------------------
        fill = _fill_rounds(engine, captions(7))
        bursts = {}
        for name in ("warm-up", "calibrate"):
            mon.phase = name
            t_start = time.monotonic() - mon.t0
            started = time.monotonic()
            last, entries = {}, []
            for _ in range(fill if name == "warm-up" else 1):
                round_last, round_entries = _burst(producer, sids, texts)
                last.update(round_last)
                entries.extend(round_entries)
            all_entries.extend(entries)
            publish_s = time.monotonic() - started
            drain_s = _wait_applied(client, last, workers, 900, mon)
            mon.sample()
            watcher.catch_up(last)
            bursts[name] = {"seconds": publish_s + drain_s, "publish_s": publish_s}
            bounds[name] = (t_start, time.monotonic() - mon.t0)
            tokens = sum(_expected_tokens(engine, entries, prefix=False).values())
            row, details[name] = _phase_row(mon, watcher, name, float("nan"), bounds[name],
                                            entries, tokens, drain_s, 0.0)
            rows.append(row)
        capacity = size.streams / bursts["calibrate"]["seconds"]
        load["after_calibration"] = _load_avg()

        # --- steady and overload: producer processes at a fixed aggregate rate --------------
        rates = {"steady": SUSTAIN * capacity, "overload": OVERLOAD * capacity}
        seconds = {"steady": size.steady_s, "overload": size.overload_s}
        for name in ("steady", "overload"):
            mon.phase = name
            procs, outs = _start_producers(url, sids, rates[name], seconds[name], tmp, name,
                                           seed=100 * (len(rows) + 1))
            t_pub = time.monotonic() - mon.t0 + 3.0
            mon.run_for(3.0 + seconds[name])
            result = _collect(procs, outs)
            t_end = time.monotonic() - mon.t0
            entries = result["published"]
            all_entries.extend(entries)
            last = {}
            for sid, entry_id, _, _ in entries:
                last[sid] = entry_id
            drain_started = time.monotonic()
            _wait_applied(client, last, workers, 900, mon)
            drain_s = time.monotonic() - drain_started
            mon.sample()
            watcher.catch_up(last)
            bounds[name] = (t_pub, t_end)
            tokens = sum(_expected_tokens(engine, entries, prefix=False).values())
            row, details[name] = _phase_row(mon, watcher, name, rates[name], bounds[name],
                                            entries, tokens, drain_s, result["worst_late_s"])
            rows.append(row)
            load[f"after_{name}"] = _load_avg()

        # --- exactly once: committed id and tokens_seen per stream ---------------------------
        expected = _expected_tokens(engine, all_entries)
        last_published: dict[str, str] = {}
        counts: dict[str, int] = {}
        for sid, entry_id, _, _ in all_entries:
            last_published[sid] = entry_id  # entries are in publish order per stream
            counts[sid] = counts.get(sid, 0) + 1
        committed = dict(zip(sids, _committed(client, sids), strict=True))
        wrong_id = [s for s in sids if committed[s][0] != last_published[s]]
        wrong_tokens = [s for s in sids if committed[s][1] != expected[s]]
        pipe = client.pipeline(transaction=False)
        for sid in sids:
            pipe.xlen(StreamKeys.of(sid).dead)
            pipe.hget(StreamKeys.of(sid).meta, "status")
            pipe.hget(StreamKeys.of(sid).state, "state_nbytes")
        replies = pipe.execute()
        dead = sum(int(replies[3 * i]) for i in range(len(sids)))
        failed = sum(replies[3 * i + 1] == b"failed" for i in range(len(sids)))
        state_bytes = [int(replies[3 * i + 2] or 0) for i in range(len(sids))]
        final_metrics = [scrape_metrics(w.port) for w in workers]
        watcher.stop()
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(timeout=10)
        server.stop(hard=True)

    shutil.rmtree(tmp, ignore_errors=True)
    growth = [max(s["rss"][i] for s in mon.samples) - w.rss_baseline
              for i, w in enumerate(workers)]
    end_growth = [mon.samples[-1]["rss"][i] - w.rss_baseline for i, w in enumerate(workers)]
    hot_max = [max(s["hot_cache_bytes"][i] for s in mon.samples) for i in range(len(workers))]
    steady = next(r for r in rows if r["phase"] == "steady")
    overload = next(r for r in rows if r["phase"] == "overload")
    summary: dict[str, Any] = {
        "streams": size.streams,
        "workers": WORKERS,
        "warm_up_entries_per_stream": fill,
        "capacity_entries_per_s": capacity,
        "steady_rate_entries_per_s": rates["steady"],
        "tokens_per_s": steady["applied tok/s"],
        "tokens_per_s_saturated": overload["applied tok/s"],
        "fairness": steady["fairness"],
        "fairness_halves_corr": steady["halves corr"],
        "fairness_overload": overload["fairness"],
        "fairness_overload_halves_corr": overload["halves corr"],
        "fairness_target": FAIRNESS_TARGET,
        "latency_p50_s": steady["latency p50 s"], "latency_p99_s": steady["latency p99 s"],
        "latency_max_s": steady["latency max s"],
        "lag_p50_s": steady["lag p50 s"], "lag_p90_s": steady["lag p90 s"],
        "lag_p99_s": steady["lag p99 s"], "lag_max_s": steady["lag max s"],
        "overload_lag_p99_s": overload["lag p99 s"],
        "hot_cache_budget_bytes": cache_bytes,
        "hot_cache_max_bytes": max(hot_max),
        "states_total_bytes": sum(state_bytes),
        "rss_baseline_bytes": [w.rss_baseline for w in workers],
        "rss_growth_max_bytes": max(growth),
        "rss_growth_end_bytes": max(end_growth),
        "rss_growth_over_budget": max(growth) / cache_bytes,
        "entries": len(all_entries),
        "exactly_once": not wrong_id and not wrong_tokens and not dead and not failed,
        "wrong_last_id": len(wrong_id), "wrong_tokens": len(wrong_tokens),
        "dead_letters": dead, "failed_streams": failed,
        "load_avg": load,
        "cpu_cores": os.cpu_count(),
    }
    extra = {
        "phases": details,
        "bursts": bursts,
        "phase_bounds_s": bounds,
        "evictions": [m.get("sinkstream_hot_cache_evictions_total") for m in final_metrics],
        "samples": mon.samples,
        "settings": {"hot_cache_bytes": cache_bytes, "model": "tiny-llama", "threads": 1,
                     "sample_s": size.sample_s, "producers": PRODUCERS, "sustain": SUSTAIN,
                     "overload": OVERLOAD, "summaries": "off",
                     "dispatcher": _dispatcher_mode(settings),
                     "retrieval": os.environ.get("SINKSTREAM_SCALE_RETRIEVAL", "bm25")},
        "warm_up_memory_chunks": warm_chunks,
    }
    _plot(mon, bounds, workers, cache_bytes, quick)
    return BenchResult(
        title=f"scale: {size.streams} streams, {WORKERS} workers (tiny-llama, 1 thread each), "
              f"hot cache {size.cache_mib} MiB, dispatcher {_dispatcher_mode(settings)['mode']}, "
              f"{os.cpu_count()} shared CPU cores",
        rows=rows, summary=summary, extra=extra)


def _plot(mon: Monitor, bounds: dict[str, tuple[float, float]], workers: list[Worker],
          cache_bytes: int, quick: bool) -> None:
    plt = pyplot()
    if plt is None or not mon.samples:
        return
    t = [s["t"] for s in mon.samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for key in ("lag_p50", "lag_p90", "lag_p99", "lag_max"):
        ax1.plot(t, [s[key] for s in mon.samples], label=key.replace("lag_", ""))
    for name, (a, b) in bounds.items():
        ax1.axvspan(a, b, alpha=0.08, color="grey")
        ax1.text(a, 0.98, name, transform=ax1.get_xaxis_transform(), va="top", fontsize=8)
    ax1.set_ylabel("lag over streams (s)")
    ax1.set_yscale("symlog", linthresh=0.1)
    ax1.legend(loc="upper left", fontsize=8)
    mib = 1024 * 1024
    for i, w in enumerate(workers):
        ax2.plot(t, [(s["rss"][i] - w.rss_baseline) / mib for s in mon.samples],
                 label=f"worker {i} RSS growth")
        ax2.plot(t, [s["hot_cache_bytes"][i] / mib for s in mon.samples], linestyle="--",
                 label=f"worker {i} hot cache")
    ax2.axhline(cache_bytes / mib, color="red", linewidth=1, label="hot_cache_bytes budget")
    ax2.set_ylabel("MiB")
    ax2.set_xlabel("seconds")
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = output_path("scale", quick, ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("produce", help="one producer process (started by run())")
    p.add_argument("--url", required=True)
    p.add_argument("--streams", type=Path, required=True, help="JSON list of stream ids")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--start-at", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    produce(args.url, json.loads(args.streams.read_text()), args.rate, args.seconds,
            args.start_at, args.seed, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
