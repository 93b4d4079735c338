"""Real worker subprocesses against a private redis-server, and a one-process reference.

Every pipeline test compares what the workers committed with feeding the same entries to the
engine directly in this process: equal state bytes prove order and exactly-once application.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producer.reader import read_entries
from sinkstream.contracts.entries import InputEntry
from sinkstream.contracts.keys import StreamKeys
from sinkstream.settings import Settings
from state_store.store import StateStore
from tests.threads import one_torch_thread
from workers.engines.loading import load_engine
from workers.engines.sinkkv.segments import whole_snapshot
from workers.processing.batches import entry_tokens

ROOT = Path(__file__).resolve().parents[3]


def worker_env(
    redis_url: str, tmp: Path, model: str = "tiny-llama", **extra: str
) -> dict[str, str]:
    """Small, fast settings: short leases so takeovers happen within seconds."""
    env = {
        **os.environ,
        "SINKSTREAM_REDIS_URL": redis_url,
        "SINKSTREAM_BROKER_URL": redis_url,
        "SINKSTREAM_MODEL": model,
        "SINKSTREAM_MODEL_CACHE_DIR": str(tmp / "models"),
        "SINKSTREAM_RECENT_TOKENS": "48",
        "SINKSTREAM_SINK_TOKENS": "4",
        "SINKSTREAM_CHUNK_TOKENS": "16",
        "SINKSTREAM_MAX_BATCH_ENTRIES": "6",
        "SINKSTREAM_SUMMARY_EVERY_TOKENS": "0",
        "SINKSTREAM_LEASE_SECONDS": "2",
        "SINKSTREAM_SCHEDULE_TTL_SECONDS": "3",
        "SINKSTREAM_DISPATCH_INTERVAL_SECONDS": "0.05",
        "SINKSTREAM_METRICS_PORT": "0",
        "SINKSTREAM_TRIM_APPLIED_INPUT": "false",
        # lexical retrieval: no embedding model to load in every test worker (tests/memory
        # covers the embedding path)
        "SINKSTREAM_RETRIEVAL": "bm25",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("SINKSTREAM_CONFIG", None)
    env.update(extra)
    return env


def settings_from_env(env: dict[str, str]) -> Settings:
    values = {k[len("SINKSTREAM_"):].lower(): v for k, v in env.items()
              if k.startswith("SINKSTREAM_") and not k.startswith("SINKSTREAM_FAULT")}
    return Settings(**values)


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@dataclass
class WorkerPool:
    env: dict[str, str]
    tmp: Path
    workers: list[Worker] = field(default_factory=list)

    def start(self, name: str, **extra_env: str) -> Worker:
        log = self.tmp / f"worker-{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sinkstream", "worker", "--name", f"{name}@test"],
            env={**self.env, **extra_env}, cwd=ROOT, stdout=log.open("wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        worker = Worker(proc, log)
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {w.log.name}\n{w.tail()}" for w in self.workers)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               on_timeout: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_timeout()}")


def is_ready(worker: Worker) -> bool:
    """The worker logged Celery's "ready" line: it has joined the live workers (heartbeat)
    and consumes tasks."""
    return worker.proc.poll() is None and worker.log.exists() and b" ready." in \
        worker.log.read_bytes()


def wait_ready(pool: WorkerPool, workers: Sequence[Worker], timeout: float = 120) -> None:
    wait_until(lambda: all(is_ready(w) for w in workers), timeout, "workers to be ready",
               pool.logs)


def last_input_id(client: redis.Redis, stream: str) -> str:
    entries = client.xrevrange(StreamKeys.of(stream).input, count=1)
    return entries[0][0].decode()


def committed_id(client: redis.Redis, stream: str) -> str | None:
    info = StateStore(client).info(stream)
    return info.last_entry_id if info else None


def caught_up(client: redis.Redis, stream: str) -> bool:
    return committed_id(client, stream) == last_input_id(client, stream)


def valid_entries(
    client: redis.Redis, stream: str, max_entry_bytes: int = Settings().max_entry_bytes
) -> list[InputEntry]:
    """The entries a worker applies: those the contract accepts (same size limit)."""
    entries = read_entries(client, stream, max_text_bytes=max_entry_bytes)
    return [e for e in entries if isinstance(e, InputEntry)]


def reference_tensors(settings: Settings, turns: Iterable[InputEntry]) -> dict[str, bytes]:
    """Feed the entries straight into the engine, one call per entry, in this process, on
    one torch thread like the workers (``tests/threads.py``)."""
    with one_torch_thread():
        engine = load_engine(settings)  # its first forward (the fresh state) included
        state = engine.new_state()
        for index, turn in enumerate(turns):
            state = engine.feed(state, entry_tokens(engine, [turn], at_stream_start=index == 0))
    return snapshot_bytes(engine.export_state(state))


def committed_tensors(client: redis.Redis, stream: str) -> dict[str, bytes]:
    stored = StateStore(client).load(stream)
    assert stored is not None, f"no committed state for {stream}"
    return snapshot_bytes(whole_snapshot(stored.data, stored.segments))  # either layout


def snapshot_bytes(snapshot: Any) -> dict[str, bytes]:
    """A state as a commit stores it, in a form tests compare bit for bit: each tensor's
    bytes, and its scalars as sorted JSON."""
    return {name: t.data for name, t in snapshot.tensors.items()} | {
        "__scalars__": json.dumps(snapshot.scalars, sort_keys=True, default=str).encode()
    }


def meta(client: redis.Redis, stream: str) -> dict[str, Any]:
    return {k.decode(): v.decode() for k, v in client.hgetall(StreamKeys.of(stream).meta).items()}
