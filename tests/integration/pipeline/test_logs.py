"""Log streams end to end: Celery worker subprocesses, one killed with SIGKILL mid-batch; the
template table the survivor commits is bit-identical to an uninterrupted run's."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest
import redis

from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import RUNNABLE, STREAMS_REGISTRY, StreamKeys
from state_store.connection import redis_from_settings
from tests.integration.pipeline.harness import (
    WorkerPool,
    caught_up,
    settings_from_env,
    wait_until,
    worker_env,
)
from workers.engines.loading import load_engine
from workers.processing.hot_cache import HotStateCache
from workers.processing.processor import StreamProcessor

DATA = Path(os.environ.get("SINKSTREAM_DATA_DIR")
            or Path(__file__).resolve().parents[4] / "shared" / "data")
HDFS = DATA / "loghub" / "HDFS" / "HDFS_2k.log_structured.csv"
LINES = 240


def _hdfs_lines() -> list[str]:
    with HDFS.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:LINES]
    out = []
    for row in rows:
        when = dt.datetime.strptime(row["Date"] + row["Time"], "%y%m%d%H%M%S").replace(
            tzinfo=dt.timezone.utc).timestamp()
        out.append(json.dumps({"timestamp": when, "level": row["Level"],
                               "message": row["Content"]}))
    return out


def _publish(client: redis.Redis, stream: str, lines: list[str]) -> None:
    """The kind as a producer sets it, the lines under fixed entry ids (so two streams can be
    compared byte for byte), and the stream registered for the dispatcher."""
    keys = StreamKeys.of(stream)
    client.hset(keys.meta, "kind", "log")
    pipe = client.pipeline(transaction=False)
    for index, line in enumerate(lines):
        pipe.xadd(keys.input, {"text": line}, id=f"1700000000000-{index + 1}")
    pipe.execute()
    client.zadd(STREAMS_REGISTRY, {stream: time.time()})
    client.zadd(RUNNABLE, {stream: time.time()})


@pytest.mark.skipif(not HDFS.is_file(), reason="../shared/data/loghub is absent")
@pytest.mark.parametrize("point", ["after_feed", "before_commit"])
def test_a_worker_killed_mid_batch_leaves_a_bit_identical_template_table(
        redis_server: RedisServer, tmp_path: Path, point: str) -> None:
    env = worker_env(redis_server.url, tmp_path, SINKSTREAM_MAX_BATCH_ENTRIES="16",
                     SINKSTREAM_LOG_NOTES_EVERY_LINES="50", SINKSTREAM_NOTES_PHRASING="false")
    env.pop("SINKSTREAM_DATA_DIR", None)  # where the tests' data is, not a worker setting
    pool = WorkerPool(env, tmp_path)
    client = redis_server.client()
    lines = _hdfs_lines()
    marker = tmp_path / "fault"
    try:
        _publish(client, "hdfs", lines)
        doomed = pool.start("doomed", SINKSTREAM_FAULT_POINT=point, SINKSTREAM_FAULT_AFTER="4",
                            SINKSTREAM_FAULT_MARKER=str(marker))
        wait_until(marker.exists, 180, f"the worker to reach {point}", pool.logs)
        doomed.kill()
        pool.start("survivor")
        wait_until(lambda: caught_up(client, "hdfs"), 240, "the survivor to finish",
                   pool.logs)
    finally:
        pool.close()
    # the uninterrupted reference: the same entries through the same steps, in this process
    settings = settings_from_env(env)
    _publish(client, "reference", lines)
    client.zrem(RUNNABLE, "reference")
    reference = StreamProcessor(load_engine(settings), redis_from_settings(settings), settings,
                                "reference", cache=HotStateCache(1 << 30))
    while reference.process("reference", time_slice_s=60).more:
        pass
    killed = client.hgetall(StreamKeys.of("hdfs").logs)
    straight = client.hgetall(StreamKeys.of("reference").logs)
    assert killed == straight and b"miner:head" in killed  # every miner and table field
    assert killed[b"applied"] == f"1700000000000-{LINES}".encode()
    # the log notes each run published cover the same entries with the same text
    def notes(stream: str) -> list[tuple[str, str]]:
        outs = client.xrange(StreamKeys.of(stream).output)
        return [(f[b"covers"].decode(), f[b"text"].decode()) for _, f in outs]
    assert notes("hdfs") == notes("reference") != []
