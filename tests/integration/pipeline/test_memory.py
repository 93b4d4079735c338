"""Whole-stream memory end to end: real worker processes, kill -9, and ``sinkstream ask``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.formats import read_file
from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from state_store.store import StateStore
from tests.integration.pipeline.harness import (
    ROOT,
    WorkerPool,
    caught_up,
    settings_from_env,
    wait_until,
    worker_env,
)
from workers.engines.loading import load_engine
from workers.processing.processor import StreamProcessor

MEMORY_ENV = {
    "SINKSTREAM_RETRIEVAL": "bm25",
    "SINKSTREAM_SUMMARY_EVERY_TOKENS": "40",
    "SINKSTREAM_SUMMARY_MAX_NEW_TOKENS": "3",
    "SINKSTREAM_MEMORY_CHUNK_TOKENS": "40",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _turns(qmsum_dir: Path, n: int) -> list[tuple[str, str | None, float | None]]:
    turns = read_file(sorted(qmsum_dir.glob("*.json"))[0], "qmsum")[:n]
    return [(t.text[:300], t.speaker, float(i)) for i, t in enumerate(turns)]


def _memory(client: redis.Redis, stream: str) -> dict[bytes, bytes]:
    return dict(client.hgetall(StreamKeys.of(stream).memory))


def _copy_input(client: redis.Redis, source: str, target: str) -> None:
    """The same entries, with the same ids, under another stream (a replay reference)."""
    for entry_id, fields in client.xrange(StreamKeys.of(source).input):
        client.xadd(StreamKeys.of(target).input, fields, id=entry_id)


def test_killed_before_commit_replay_rewrites_the_same_memory(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    env = worker_env(redis_server.url, tmp_path, **MEMORY_ENV)
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    marker = tmp_path / "fault"
    settings = settings_from_env(env)
    try:
        Producer(client, settings=settings).publish_many("meeting", _turns(qmsum_dir, 40),
                                                         eos=True)
        doomed = pool.start("doomed", SINKSTREAM_FAULT_POINT="before_commit",
                            SINKSTREAM_FAULT_AFTER="4", SINKSTREAM_FAULT_MARKER=str(marker))
        wait_until(marker.exists, 120, "the worker to reach before_commit", pool.logs)
        memory_before = _memory(client, "meeting")
        doomed.kill()
        assert StateStore(client).version("meeting") == 3
        assert any(k.startswith(b"chunk:") for k in memory_before)
        pool.start("survivor")
        wait_until(lambda: caught_up(client, "meeting"), 180, "the survivor", pool.logs)
    finally:
        pool.close()
    assert int(client.hget(StreamKeys.of("meeting").meta, "leases_taken_over") or 0) >= 1
    # the same entries, processed without any crash, in this process
    _copy_input(client, "meeting", "reference")
    proc = StreamProcessor(load_engine(settings), client, settings, "reference")
    while proc.process("reference").status == "applied":
        pass
    assert _memory(client, "meeting") == _memory(client, "reference")
    outputs = [f[b"text"] for _, f in client.xrange(StreamKeys.of("meeting").output)]
    assert outputs == [f[b"text"] for _, f in client.xrange(StreamKeys.of("reference").output)]


def test_sinkstream_ask_prints_an_answer_with_citations(
    redis_server: RedisServer, tmp_path: Path, qmsum_dir: Path
) -> None:
    env = worker_env(redis_server.url, tmp_path, **MEMORY_ENV)
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    fact: Any = ("The Zanzibar budget is four thousand two hundred euros.", "Olga", 754.0)
    try:
        Producer(client, settings=settings_from_env(env)).publish_many(
            "standup", [fact, *_turns(qmsum_dir, 30)])
        fact_id = client.xrange(StreamKeys.of("standup").input, count=1)[0][0].decode()
        pool.start("a")
        wait_until(lambda: caught_up(client, "standup"), 180, "the worker", pool.logs)
        ask = subprocess.run(
            [sys.executable, "-m", "sinkstream", "ask", "standup",
             "What is the Zanzibar budget?", "--timeout", "120"],
            env={**env, "COLUMNS": "200"}, cwd=ROOT, capture_output=True, text=True,
            timeout=180, check=False)
    finally:
        pool.close()
    assert ask.returncode == 0, ask.stderr + ask.stdout + pool.logs()
    out = ask.stdout
    assert "answer" in out and "Sources" in out, out
    assert "[1] 12:34-" in out and "Olga" in out and f"entries {fact_id}.." in out, out
    answers = [f for _, f in client.xrange(StreamKeys.of("standup").output)
               if f[b"kind"] == b"answer"]
    assert len(answers) == 1 and b"Olga" in answers[0][b"sources"]
