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
3. ``steady`` — ``SUSTAIN`` x capacity entries/s for ``duration`` seconds, then drain
   (``SINKSTREAM_SCALE_STEADY_RATE`` sets the rate instead: to compare latencies of two
   configurations at one load, since each calibrates its own capacity).
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
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._scale_load import (
    PRODUCERS,
    REPO,
    _burst,
    _collect,
    _expected_tokens,
    _fill_rounds,
    _sid,
    _size,
    _start_producers,
    captions,
    produce,
)
from benchmarks._scale_measure import (
    CommitWatcher,
    Monitor,
    Worker,
    _check_alive,
    _committed,
    _phase_row,
    _rss,
    _wait_applied,
    _worker_env,
)
from benchmarks.common import output_path, pyplot, scrape_metrics
from benchmarks.run import BenchResult

WORKERS = 2
#: steady rate and overload rate, as multiples of the calibrated one-entry-per-task capacity
SUSTAIN = 0.6
OVERLOAD = 2.0
FAIRNESS_TARGET = 2.0


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
        steady_rate = float(os.environ.get("SINKSTREAM_SCALE_STEADY_RATE", "0") or 0)
        rates = {"steady": steady_rate or SUSTAIN * capacity, "overload": OVERLOAD * capacity}
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
