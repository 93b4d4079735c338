"""The HTTP gateway: publish throughput against the Python producer, and 1,000 SSE followers.

1. **Entries/s through POST batches** (1,000 caption entries per request, each with its own
   ``Idempotency-Key``) against ``Producer.publish_many`` with the same batches, on the same
   private redis-server, alternating rounds (the box is shared: compare the ratio, not
   absolute numbers). Two ways in: one client on one keep-alive connection, posting batch
   after batch (it waits for each reply: client encoding, HTTP, validation and the append
   in series), and four clients at once, each feeding its own stream (a gateway's capacity:
   one request's append overlaps another's parsing). ``ratio`` is the four clients' best
   against the producer's best, ``ratio_one_connection`` the single client's. Target:
   ratio >= 0.5.
2. **1,000 concurrent SSE followers on one gateway process** (loopback only, bounded in time):
   followers in two client processes (``benchmarks/_sse_load.py``) spread over a few
   streams; output entries are committed straight into the output streams, as a worker's
   commit would, with their commit time in ``ts``. Commit-to-client latency p50/p99 (events
   committed while the gateway is up), the gateway's RSS with every follower connected,
   then a ``kill -9`` of the gateway mid-run, events committed while it is down, a new
   gateway on the same port, and a check that every follower got every event of its stream
   exactly once, in order (``Last-Event-ID``).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from benchmarks.publish import captions
from benchmarks.run import BenchResult
from producer.formats import Turn
from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from sinkstream.settings import load_settings
from state_store.connection import redis_from_settings
from tests.integration.gateway.server import ROOT, GatewayProcess, Tokens, gateway_env

BATCH = 1000
CONNECTIONS = 4
METHODS = ("POST, 1 connection", f"POST, {CONNECTIONS} connections", "Producer.publish_many")
CLIENT_PROCESSES = 2
SUMMARY = ("The team reviewed the launch: the camera permission crash blocks it, Tomas merges "
           "the fix by two, and onboarding completion rose to sixty one percent.")


# ----- 1. publish throughput ------------------------------------------------------------------
def _post_batches(client: httpx.Client, stream: str, turns: list[Turn]) -> None:
    for start in range(0, len(turns), BATCH):
        body = {"entries": [{"text": t.text, "speaker": t.speaker, "ts": t.ts}
                            for t in turns[start:start + BATCH]]}
        reply = client.post(f"/v1/streams/{stream}/entries", json=body,
                            headers={"Idempotency-Key": f"{stream}-{start}"})
        reply.raise_for_status()


def _post_concurrently(url: str, token: str, stream: str, turns: list[Turn],
                       connections: int) -> None:
    """``connections`` clients at once, each feeding its own stream (as several caption
    services or meeting bots would), ``len(turns) / connections`` entries each."""
    share = len(turns) // connections

    def one(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                          timeout=60) as http:
            _post_batches(http, f"{stream}-{i}", turns[i * share:(i + 1) * share])

    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(one, range(connections)))


def _throughput(server: RedisServer, gateway: GatewayProcess, token: str, quick: bool
                ) -> dict[str, list[float]]:
    n, rounds = (20_000, 3) if quick else (100_000, 5)
    turns = captions(n)
    cfg = load_settings(redis_url=server.url, max_stream_length=10 * n)
    data = redis_from_settings(cfg)
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token}"},
                      timeout=60) as http:
        for rnd in range(rounds):
            for name in METHODS if rnd % 2 == 0 else METHODS[::-1]:
                stream = f"bench-{METHODS.index(name)}-{rnd}"
                started = time.perf_counter()
                if name == METHODS[0]:
                    _post_batches(http, stream, turns)
                elif name == METHODS[1]:
                    _post_concurrently(gateway.url, token, stream, turns, CONNECTIONS)
                else:
                    Producer(data, settings=cfg, batch_entries=BATCH).publish_many(stream, turns)
                times[name].append(time.perf_counter() - started)
                _check_and_clear(data, stream, n, CONNECTIONS if name == METHODS[1] else 0)
    times["n"] = [float(n)]
    return times


def _check_and_clear(data: redis.Redis, stream: str, n: int, parts: int) -> None:
    keys = [StreamKeys.of(f"{stream}-{i}" if parts else stream) for i in range(parts or 1)]
    written = sum(int(data.xlen(k.input)) for k in keys)
    if written != n:
        raise RuntimeError(f"{stream}: wrote {written} entries, not {n}")
    for k in keys:
        data.delete(k.input, k.producers)


# ----- 2. SSE followers -------------------------------------------------------------------------
def _commit(data: redis.Redis, stream: str, seq: int) -> str:
    fields: Any = {"kind": "rolling", "text": f"{SUMMARY} ({seq})", "covers": "1-0",
                   "tokens_seen": str(512 * seq), "model": "bench", "ts": f"{time.time():.6f}"}
    return str(data.xadd(StreamKeys.of(stream).output, fields))


class _RssSampler(threading.Thread):
    def __init__(self, gateway: GatewayProcess) -> None:
        super().__init__(daemon=True)
        self.gateway, self.peak, self.stop = gateway, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                assert self.gateway.proc is not None
                self.peak = max(self.peak, psutil.Process(self.gateway.proc.pid).memory_info().rss)
            except (psutil.Error, AssertionError):
                pass


def _wait_clients(gateway: GatewayProcess, count: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if httpx.get(gateway.url + "/readyz", timeout=2).json().get("sse_clients", 0) >= count:
                return time.monotonic() - started
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"only some of {count} followers connected within {timeout}s")


def _start_clients(workdir: Path, gateway: GatewayProcess, token: str, streams: list[str],
                   followers: int, expect: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    procs = []
    for p in range(CLIENT_PROCESSES):
        mine = [streams[i % len(streams)] for i in range(p, followers, CLIENT_PROCESSES)]
        config = {"host": "127.0.0.1", "port": gateway.port, "token": token, "streams": mine,
                  "expect": expect, "seconds": seconds}
        (workdir / f"clients-{p}.json").write_text(json.dumps(config))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "benchmarks._sse_load", str(workdir / f"clients-{p}.json"),
             str(workdir / f"results-{p}.json")], cwd=ROOT))
    return procs


def _followers(server: RedisServer, gateway: GatewayProcess, token: str, workdir: Path,
               quick: bool) -> dict[str, Any]:
    followers, nstreams = 1000, 5
    per_stream = 8 if quick else 20
    streams = [f"bench-live-{i}" for i in range(nstreams)]
    data = server.client(decode_responses=True)
    baseline_rss = psutil.Process(gateway.proc.pid).memory_info().rss  # type: ignore[union-attr]
    procs = _start_clients(workdir, gateway, token, streams, followers, per_stream, 240.0)
    sampler = _RssSampler(gateway)
    sampler.start()
    connect_s = _wait_clients(gateway, followers, 120)
    time.sleep(1.0)
    connected_rss = psutil.Process(gateway.proc.pid).memory_info().rss  # type: ignore[union-attr]
    committed: dict[str, list[str]] = {s: [] for s in streams}
    down_ids: set[str] = set()
    restart_s = reconnect_s = 0.0
    for seq in range(per_stream):
        if seq == per_stream // 2:  # kill -9 mid-run; commits go on while it is down
            gateway.kill()
            killed = time.monotonic()
            for stream in streams:
                event_id = _commit(data, stream, seq)
                down_ids.add(event_id)
                committed[stream].append(event_id)
            gateway.start()
            restart_s = time.monotonic() - killed
            # live latency is measured again once every follower is back
            reconnect_s = _wait_clients(gateway, followers, 120)
            continue
        for stream in streams:
            committed[stream].append(_commit(data, stream, seq))
            time.sleep(0.02)
        time.sleep(0.2)
    for proc in procs:
        proc.wait(timeout=300)
    sampler.stop.set()
    results = [f for p in range(CLIENT_PROCESSES)
               for f in json.loads((workdir / f"results-{p}.json").read_text())]
    scored = _score(results, committed, down_ids, connect_s, restart_s, baseline_rss,
                    connected_rss, sampler.peak)
    return {**scored, "all_reconnected_s": reconnect_s}


def _score(results: list[dict[str, Any]], committed: dict[str, list[str]], down: set[str],
           connect_s: float, restart_s: float, baseline_rss: int, connected_rss: int,
           peak_rss: int) -> dict[str, Any]:
    missed = duplicated = wrong_order = 0
    live: list[float] = []
    caught_up: list[float] = []
    for follower in results:
        expected, got = committed[follower["stream"]], follower["ids"]
        missed += len(set(expected) - set(got))
        duplicated += len(got) - len(set(got))
        wrong_order += int([i for i in got if i in expected] != expected[:len(got)])
        for event_id, latency in zip(got, follower["latencies"], strict=False):
            (caught_up if event_id in down else live).append(latency)
    live.sort()
    mib = 1024 * 1024
    return {
        "followers": len(results), "events_per_stream": len(next(iter(committed.values()))),
        "deliveries": sum(len(f["ids"]) for f in results),
        "missed": missed, "duplicated": duplicated, "out_of_order_followers": wrong_order,
        "reconnects": sum(f["reconnects"] for f in results),
        "connect_all_s": connect_s, "restart_s": restart_s,
        "latency_p50_ms": 1000 * statistics.median(live) if live else None,
        "latency_p99_ms": 1000 * live[int(0.99 * (len(live) - 1))] if live else None,
        "latency_max_ms": 1000 * live[-1] if live else None,
        "restart_catch_up_max_s": max(caught_up) if caught_up else None,
        "rss_idle_mib": baseline_rss / mib, "rss_connected_mib": connected_rss / mib,
        "rss_peak_mib": peak_rss / mib,
    }


def run(quick: bool) -> BenchResult:
    workdir = Path(tempfile.mkdtemp(prefix="sinkstream-bench-gateway-"))
    server = RedisServer(workdir / "redis").start()
    tokens = Tokens.create(workdir / "tokens.json")
    gateway = GatewayProcess(gateway_env(server.url, tokens.path,
                                         SINKSTREAM_GATEWAY_MAX_BODY_BYTES=str(8 << 20),
                                         SINKSTREAM_MAX_STREAM_LENGTH="10000000"),
                             workdir / "gateway.log")
    try:
        gateway.start()
        times = _throughput(server, gateway, tokens.admin, quick)
        sse = _followers(server, gateway, tokens.admin, workdir, quick)
    finally:
        gateway.stop()
        server.stop(hard=True)
        shutil.rmtree(workdir, ignore_errors=True)
    n = int(times.pop("n")[0])
    rows: list[dict[str, Any]] = [
        {"what": f"{name}: {n:,} entries, batches of {BATCH}",
         "best entries/s": n / min(times[name]),
         "median entries/s": n / statistics.median(times[name])} for name in METHODS]
    rows.append({"what": f"SSE: {sse['followers']} followers, {sse['events_per_stream']} events "
                         "x 5 streams, kill -9 + restart mid-run",
                 "p50 ms": sse["latency_p50_ms"], "p99 ms": sse["latency_p99_ms"],
                 "RSS MiB": sse["rss_connected_mib"], "missed": sse["missed"],
                 "duplicated": sse["duplicated"]})
    one, many, producer = (times[name] for name in METHODS)
    return BenchResult(
        title="gateway: POST batches vs the Python producer; 1,000 SSE followers on one process",
        rows=rows,
        summary={"ratio": min(producer) / min(many),
                 "ratio_one_connection": min(producer) / min(one),
                 "ratio_median": statistics.median(producer) / statistics.median(many),
                 "gateway_entries_per_s": n / min(many),
                 "gateway_one_connection_entries_per_s": n / min(one),
                 "producer_entries_per_s": n / min(producer),
                 "sse_followers": sse["followers"],
                 "sse_latency_p50_ms": sse["latency_p50_ms"],
                 "sse_latency_p99_ms": sse["latency_p99_ms"],
                 "gateway_rss_mib": sse["rss_connected_mib"],
                 "sse_missed_events": sse["missed"],
                 "sse_duplicated_events": sse["duplicated"]},
        extra={"seconds": times, "sse": sse, "targets": {"ratio": 0.5, "sse_missed_events": 0}},
    )
