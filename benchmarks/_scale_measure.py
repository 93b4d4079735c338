"""The scale benchmark's measurements: the worker processes, each stream's committed id
and tokens, entry latencies from the commit watcher, sampled lag, RSS and /metrics from the
monitor, and a phase's row (rates, latency percentiles, fairness).

``benchmarks/scale.py`` describes the benchmark.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._scale_load import PREFIX, REPO, Size
from benchmarks.common import scrape_metrics


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
