"""End-to-end tokens/s through Redis + Celery vs the bare engine, same model, same threads.

For each engine (one row each):

1. A private ``redis-server`` (``RedisServer``) gets M streams of QMSum meeting turns (synthetic
   caption turns if the data is absent), published with the producer library *before* any
   clock starts, as a backlog. Each backlog stream is "gated" by setting its ``scheduled`` flag
   (the dispatcher skips scheduled streams), so the worker cannot start on it early.
2. One real worker subprocess (``python -m sinkstream worker``) starts with the same model,
   ``SINKSTREAM_SUMMARY_EVERY_TOKENS=0`` (feeding only) and ``OMP_NUM_THREADS`` pinned. A small
   ungated warm-up stream proves it is ready: /metrics answers *and* the warm-up tokens are
   committed (model loaded, first forward done, Celery consuming).
3. Pipeline clock: t0 = the gates are lifted and each stream is scheduled exactly as the
   dispatcher does (``Scheduler.schedule``: SET NX flag + enqueue a Celery task); t1 = every
   stream's committed ``tokens_seen`` (``sinkstream:{id}:meta``) reached the expected total.
   Everything after t0 is the real path: tasks re-enqueued through the broker, lease, hot-cache
   load, XRANGE + tokenize, feed, encode + fenced commit, metrics.
4. Bare: in this process the same engine (``load_engine``) is fed the same entries, tokenized
   exactly as the worker does (``parse_entry`` -> ``format_turn`` -> ``tokenizer.encode``,
   read back from the same Redis stream), cut into the same batches as
   ``StreamProcessor._read_batch`` (``max_batch_entries`` / ``max_batch_tokens``), streams taken
   in the same round-robin order; only ``engine.feed`` is timed.
5. The box is shared and its speed drifts by tens of percent within seconds (identical bare
   runs: 2,200 to 6,500 tok/s), so the streams are split into ``rounds`` groups and each round
   runs bare and pipeline on its group (alternating which goes first): both sides sample the
   same stretches of time. Sums over the rounds give the ratio; per-round ratios are in
   ``extra`` to show the spread.

Rows report tokens/s both ways and ``ratio = pipeline / bare``, with two steadier companions:
``feed share`` = the worker's own ``engine.feed`` seconds / pipeline wall seconds, both from the
same window (what ``ratio`` would be if the worker fed exactly as fast as the bare engine), and
``cpu ratio`` = bare CPU seconds / (worker + redis-server) CPU seconds (extra work, not
waiting). From the worker's /metrics (deltas over the timed rounds): feed, state load (Redis
loads only) and state save milliseconds per batch, and the hot-cache hit rate leaving out each
new stream's first batch (it has nothing to load: neither a hit nor a miss).
``other ms/b`` is the rest of the pipeline's wall time per batch: Celery re-enqueue, ack and
fetch, claim, XRANGE and tokenization. ``redis rt/b`` is the round trips the worker's tasks made
to the data Redis per applied batch (``sinkstream_redis_round_trips_total{source="tasks"}``:
every command or pipeline sent); ``extra`` also has them with the dispatcher's, the lease
renewals' and the vectorizer's.

Engines: ``tiny-llama-mid`` is the mid-size tiny Llama of ``benchmarks.common`` (4 layers,
hidden 256, 2 KV heads of 32) saved as a local Hugging Face directory with an exact byte-level
tokenizer, so that feed time dominates like with a real model; ``tiny-rwkv`` the seeded tiny
RWKV-7. Full mode adds the stock ``tiny-llama`` (overhead-sensitive: ~5x faster per token), the
same at a small batch size, and ``smollm2`` when its converted cache is present.

State layouts (issue #6): the sink-KV rows run with the default ``state_layout`` first (the
headline ``ratio``), and ``tiny-llama-mid`` (and in full mode ``tiny-llama``) again with the
other layout; ``ratio_whole`` / ``ratio_segments`` are the ``tiny-llama-mid`` pair. RWKV
states always use the whole layout.

Threads: ``SINKSTREAM_BENCH_THREADS`` (default 1, the machines are shared) for both sides.
"""

from __future__ import annotations

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

from benchmarks._pipeline_bare import _bare, _read_streams, _Stream, _torch_threads
from benchmarks._pipeline_fixtures import Case, _backlog, _cases, _layouts, _settings
from benchmarks.common import scrape_metrics
from benchmarks.run import BenchResult

REPO = Path(__file__).resolve().parents[1]
GATE_MS = 15 * 60 * 1000  # a gate outlives any run; lifted explicitly at t0
POLL_S = 0.01
WARMUP_STREAM = "pipebench-warmup"


def _threads() -> int:
    return max(1, int(os.environ.get("SINKSTREAM_BENCH_THREADS", "1")))


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def _wait_worker(port: int, proc: subprocess.Popen[bytes], log_path: Path, client: Any,
                 warm_tokens: int, timeout: float = 120.0) -> float:
    """Until /metrics answers and the warm-up stream is committed; returns seconds waited."""
    from sinkstream.contracts.keys import StreamKeys

    started = time.monotonic()
    meta = StreamKeys.of(WARMUP_STREAM).meta
    metrics_up = False
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        if not metrics_up:
            try:
                scrape_metrics(port)
                metrics_up = True
            except OSError:
                pass
        if metrics_up and int(client.hget(meta, "tokens_seen") or 0) >= warm_tokens:
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError(f"worker not ready in {timeout:.0f}s; log:\n"
                       f"{log_path.read_text(errors='replace')[-3000:]}")


def _stop_worker(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----- one row -----------------------------------------------------------------------------


def _measure(case: Case, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import redis

    from producer.publisher import Producer
    from sinkstream.cli.localredis import RedisServer, free_port
    from sinkstream.contracts.keys import StreamKeys
    from sinkstream.contracts.tasks import PROCESS_STREAM
    from workers.app import create_app
    from workers.engines.loading import load_engine
    from workers.scheduling.scheduler import Scheduler

    threads = _threads()
    workdir = Path(tempfile.mkdtemp(prefix="pipebench-", dir=root))
    spec = case.spec(workdir) if callable(case.spec) else case.spec
    server = RedisServer(workdir / "redis")
    proc: subprocess.Popen[bytes] | None = None
    env_overrides = {"SINKSTREAM_SUMMARY_EVERY_TOKENS": "0", **case.env}
    try:
        server.start()
        client = redis.Redis.from_url(server.url)
        overrides = {k.removeprefix("SINKSTREAM_").lower(): v for k, v in env_overrides.items()}
        settings = _settings(redis_url=server.url, broker_url=server.url, model=spec,
                             **overrides)

        # --- backlog, published and gated before anything runs ---------------------------
        sids = [f"pipebench-{i}" for i in range(case.streams)]
        producer = Producer(client, settings=settings)
        scheduler = Scheduler(client, lambda sid: None, settings.schedule_ttl_seconds)
        pipe = client.pipeline(transaction=False)
        for sid in sids:
            pipe.set(StreamKeys.of(sid).scheduled, "gate", px=GATE_MS)
        pipe.execute()
        started = time.perf_counter()
        for sid, turns in zip(sids, _backlog(case.streams, case.bytes_per_stream), strict=True):
            producer.publish_many(sid, turns)
        publish_s = time.perf_counter() - started
        warm_turns = _backlog(1, 600)[0]
        producer.publish_many(WARMUP_STREAM, warm_turns)

        # --- the worker: starts (imports, model load) while we prepare the bare side ---------
        metrics_port = free_port()
        env = {**os.environ, **env_overrides,
               "SINKSTREAM_REDIS_URL": server.url, "SINKSTREAM_BROKER_URL": server.url,
               "SINKSTREAM_MODEL": spec, "SINKSTREAM_METRICS_PORT": str(metrics_port),
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": str(REPO)}
        log_path = workdir / "worker.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sinkstream", "worker", "--loglevel", "WARNING"],
            env=env, cwd=REPO, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        with _torch_threads(threads):
            engine = load_engine(settings)
            streams, tokenize_s = _read_streams(client, sids, engine, settings)
            (warm,), _ = _read_streams(client, [WARMUP_STREAM], engine, settings)
        expected = {s.sid: s.tokens for s in streams}
        total_tokens = sum(expected.values())
        ready_s = _wait_worker(metrics_port, proc, log_path, client, warm.tokens)
        with _torch_threads(threads):
            state = engine.new_state()
            for batch in warm.batches:
                state = engine.feed(state, batch)
        celery_app = create_app(settings)
        scheduler.enqueue = lambda sid: celery_app.send_task(
            PROCESS_STREAM, args=[sid], queue=settings.broker_queue)

        def pipeline(group: list[_Stream]) -> tuple[float, float, int, bool]:
            """Lift the group's gates, schedule like the dispatcher, wait for the commits.
            Returns (wall s, worker + redis CPU s, tokens committed, timed out)."""
            assert proc is not None and server.proc is not None
            metas = [StreamKeys.of(s.sid).meta for s in group]
            cpu0 = _proc_cpu(proc.pid) + _proc_cpu(server.proc.pid)
            t0 = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            for s in group:
                pipe.delete(StreamKeys.of(s.sid).scheduled)
            pipe.execute()
            for s in group:
                scheduler.schedule(s.sid)
            while True:
                pipe = client.pipeline(transaction=False)
                for key in metas:
                    pipe.hmget(key, "tokens_seen", "status")
                seen = pipe.execute()
                done = sum(int(t or 0) for t, _ in seen)
                if all(int(t or 0) >= s.tokens for s, (t, _) in zip(group, seen, strict=True)):
                    break
                failed = [s.sid for s, (_, st) in zip(group, seen, strict=True) if st == b"failed"]
                if failed or proc.poll() is not None:
                    raise RuntimeError(
                        f"pipeline broke (failed streams {failed}, worker rc {proc.poll()}):\n"
                        f"{log_path.read_text(errors='replace')[-3000:]}")
                if time.perf_counter() - t0 > case.timeout_s:
                    return time.perf_counter() - t0, 0.0, done, True
                time.sleep(POLL_S)
            wall = time.perf_counter() - t0
            return wall, _proc_cpu(proc.pid) + _proc_cpu(server.proc.pid) - cpu0, done, False

        # Alternate bare and pipeline, one group of streams per round: this box is shared and
        # its speed drifts by tens of percent within seconds, so each side samples the same
        # stretches of time; sums over the rounds give the ratio.
        groups = [streams[i :: case.rounds] for i in range(case.rounds)]
        before = scrape_metrics(metrics_port)
        feed_s = bare_cpu = pipeline_s = pipe_cpu = 0.0
        committed = 0
        timed_out = False
        round_ratios = []
        states: dict[str, Any] = {}
        for r, group in enumerate(groups):  # ABBA order: neither side always goes first
            if r % 2 == 0:
                b_wall, b_cpu, b_states = _bare(engine, group, threads)
                p_wall, p_cpu, p_done, p_timeout = pipeline(group)
            else:
                p_wall, p_cpu, p_done, p_timeout = pipeline(group)
                b_wall, b_cpu, b_states = _bare(engine, group, threads)
            states.update(b_states)
            feed_s += b_wall
            bare_cpu += b_cpu
            pipeline_s += p_wall
            pipe_cpu += p_cpu
            committed += p_done
            timed_out |= p_timeout
            round_ratios.append((p_done / p_wall) / (sum(s.tokens for s in group) / b_wall))
        after = scrape_metrics(metrics_port)
        _stop_worker(proc)
        proc = None

        applied = _delta(after, before, "sinkstream_batches_total:applied")
        w_feed = _delta(after, before, "sinkstream_batch_feed_seconds_sum")
        load_n = _delta(after, before, "sinkstream_state_load_seconds_count")
        load_sum = _delta(after, before, "sinkstream_state_load_seconds_sum")
        save_n = _delta(after, before, "sinkstream_state_save_seconds_count")
        save_sum = _delta(after, before, "sinkstream_state_save_seconds_sum")
        hits = _delta(after, before, "sinkstream_hot_cache_hits_total")
        misses = _delta(after, before, "sinkstream_hot_cache_misses_total")
        per = max(applied, 1.0)
        # the round trips the worker's tasks made to the data Redis over the timed rounds, per
        # applied batch; and all of them, its dispatcher's, lease renewals and vectorizer's too
        task_trips = _delta(after, before, "sinkstream_redis_round_trips_total:tasks")
        all_trips = sum(_delta(after, before, f"sinkstream_redis_round_trips_total:{s}")
                        for s in ("tasks", "dispatcher", "lease", "vectorizer", "other"))
        bare_tps = total_tokens / feed_s
        pipe_tps = committed / pipeline_s
        row = {
            "engine": case.name,
            "tokens": total_tokens,
            "batches": int(applied),
            "bare tok/s": bare_tps,
            "pipeline tok/s": pipe_tps,
            "ratio": pipe_tps / bare_tps,
            "feed share": w_feed / pipeline_s,
            "cpu ratio": bare_cpu / pipe_cpu if pipe_cpu else float("nan"),
            "feed ms/b": 1000 * w_feed / per,
            "load ms/b": 1000 * load_sum / per,  # Redis loads only; a hot hit is one HGET
            "save ms/b": 1000 * save_sum / max(save_n, 1.0),
            "other ms/b": 1000 * (pipeline_s - w_feed - load_sum - save_sum) / per,
            "redis rt/b": task_trips / per,
            # a new stream's first batch has nothing to load: it counts as neither
            "hot hit (warm)": hits / (hits + misses) if hits + misses else float("nan"),
        }
        detail = {
            "model": spec if not callable(case.spec) else "mid_tiny_llama (local HF dir)",
            "threads": threads,
            "streams": case.streams,
            "entries": sum(s.entries for s in streams),
            "pipeline_s": pipeline_s,
            "rounds": case.rounds,
            "round_ratios": round_ratios,
            "bare_feed_s": feed_s,
            "worker_feed_s": w_feed,
            "worker_feed_tok_s": committed / w_feed if w_feed else None,
            "pipeline_cpu_s_worker_plus_redis": pipe_cpu,
            "bare_cpu_s": bare_cpu,
            "redis_round_trips_per_batch_all_threads": all_trips / per,
            "state_load_s": load_sum, "state_loads": load_n,
            "state_save_s": save_sum, "state_saves": save_n,
            "hot_cache_hits": hits, "hot_cache_misses": misses,
            "hot_cache_hit_rate_raw": hits / (hits + misses) if hits + misses else None,
            "idle_batches": _delta(after, before, "sinkstream_batches_total:idle"),
            "bare_batches": sum(len(s.batches) for s in streams),
            "state_bytes": max(engine.state_nbytes(st) for st in states.values()),
            "state_layout": settings.state_layout,
            "tokenize_s_in_bench": tokenize_s,
            "publish_s": publish_s,
            "worker_ready_s": ready_s,
            "timed_out": timed_out,
            "committed_tokens": committed,
            "settings": {"max_batch_entries": settings.max_batch_entries,
                         "max_batch_tokens": settings.max_batch_tokens,
                         "chunk_tokens": settings.chunk_tokens,
                         "recent_tokens": settings.recent_tokens,
                         "dispatch_interval_seconds": settings.dispatch_interval_seconds},
        }
        return row, detail
    finally:
        _stop_worker(proc)
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def run(quick: bool) -> BenchResult:
    os.environ.setdefault("COLUMNS", "170")  # the runner's rich table: room for every column
    root = Path(tempfile.mkdtemp(prefix="sinkstream-pipebench-"))
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    try:
        for case in _cases(quick):
            row, details[case.name] = _measure(case, root)
            rows.append(row)
            print(json.dumps({"row": row["engine"], "ratio": round(row["ratio"], 3),
                              "feed_share": round(row["feed share"], 3)}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    head = rows[0]
    summary: dict[str, Any] = {
        "ratio": head["ratio"],
        "ratio_engine": head["engine"],
        "feed_share": head["feed share"],
        "target_ratio": 0.9,
        "redis_round_trips_per_batch": head["redis rt/b"],
        "target_redis_round_trips_per_batch": 5,
        "threads": _threads(),
    }
    for row in rows[1:]:
        key = "".join(c if c.isalnum() else "_" for c in row["engine"]).strip("_")
        summary[f"ratio_{key}"] = row["ratio"]
        summary[f"feed_share_{key}"] = row["feed share"]
    default, other = _layouts()
    summary["state_layout_default"] = default
    summary[f"ratio_{default}"] = head["ratio"]
    summary[f"ratio_{other}"] = next(
        (r["ratio"] for r in rows if r["engine"] == f"tiny-llama-mid, {other}"), None)
    return BenchResult(
        title="pipeline: Redis + Celery worker vs bare engine feed (tokens/s, same run)",
        rows=rows, summary=summary, extra={"details": details},
    )
