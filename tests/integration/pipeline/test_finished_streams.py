"""``sinkstream streams`` and ``status`` on a finished stream whose applied input the worker
trimmed away (the default): they report the entries applied, the last entry's time and the
end, from what the worker committed (issue 22). A real worker, a real redis-server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from producer.publisher import Producer
from producer.registry import describe_streams, list_streams
from sinkstream.cli import app as cli
from sinkstream.cli import common as cli_common
from sinkstream.cli.localredis import RedisServer
from sinkstream.cli.reading import _workers_line
from sinkstream.contracts.keys import StreamKeys
from state_store.presence import WorkerPresence, live_slots
from tests.integration.pipeline.harness import (
    WorkerPool,
    settings_from_env,
    wait_until,
    worker_env,
)

TURNS = 9


def test_a_finished_trimmed_stream_reports_applied_entries_time_and_end(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = worker_env(redis_server.url, tmp_path, SINKSTREAM_TRIM_APPLIED_INPUT="true")
    client = redis_server.client()
    producer = Producer(client, settings=settings_from_env(env))
    result = producer.publish_many("done", [f"Alice: point {i}" for i in range(TURNS)],
                                   eos=True)
    written = time.time()
    pool = WorkerPool(env, tmp_path)
    try:
        pool.start("finisher")
        wait_until(lambda: client.hget(StreamKeys.of("done").meta, "ended") == b"1", 120,
                   "the worker to apply the end of the stream", pool.logs)
    finally:
        pool.close()
    assert client.xlen(StreamKeys.of("done").input) == 0  # applied input is gone

    [info] = list_streams(client)
    assert info.stream_id == "done" and info.length == 0
    assert info.applied == TURNS + 1  # the end marker is an entry too
    assert info.ended
    assert info.last_entry_id == result.last_id
    assert info.last_entry_time is not None and abs(info.last_entry_time - written) < 60
    assert describe_streams(client, [("done", 0.0)]) == [
        type(info)("done", 0, result.last_id, 0.0, True, TURNS + 1)]

    monkeypatch.setenv("SINKSTREAM_REDIS_URL", redis_server.url)
    monkeypatch.delenv("SINKSTREAM_CONFIG", raising=False)
    monkeypatch.setattr(cli_common.state, "settings", None)
    monkeypatch.setattr(cli_common.state, "config", None)
    runner = CliRunner()
    listed = runner.invoke(cli.app, ["streams"])
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if "done" in line)
    assert f" {TURNS + 1} " in row and "yes" in row
    assert time.strftime("%Y-%m-%d", time.gmtime(written)) in row
    status = runner.invoke(cli.app, ["status", "done", "--json"])
    assert status.exit_code == 0, status.output
    got = json.loads(status.output)
    assert got["applied_entries"] == TURNS + 1 and got["ended"] is True
    assert got["last_entry"].startswith(time.strftime("%Y-%m-%d", time.gmtime(written)))
    # the table also says whether any worker is there to apply new input
    before = live_slots(client)  # the worker that applied the stream, while its beats last
    WorkerPresence(client, "gpu-1", slots=2).beat()
    assert f"live workers: {before + 2} task slots" in \
        runner.invoke(cli.app, ["status", "done"]).output
    empty = redis.Redis(port=redis_server.port, db=1)  # a database no worker has joined
    assert _workers_line(empty) == "live workers: none (start one with `sinkstream worker`)"
