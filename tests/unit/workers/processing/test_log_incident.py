"""An incident injected into real HDFS logs at a known time: the log notes name its template,
its count and its first and last time (issue 20's incident detection)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.keys import StreamKeys
from sinkstream.settings import Settings
from state_store.connection import redis_from_settings
from workers.engines.base import Engine
from workers.processing.hot_cache import HotStateCache
from workers.processing.processor import StreamProcessor

DATA = Path(os.environ.get("SINKSTREAM_DATA_DIR")
            or Path(__file__).resolve().parents[5] / "shared" / "data")
HDFS = DATA / "loghub" / "HDFS" / "HDFS_2k.log_structured.csv"
BASE: dict[str, Any] = {
    "model": "tiny-llama", "recent_tokens": 64, "sink_tokens": 4, "chunk_tokens": 16,
    "summary_every_tokens": 0, "metrics_port": 0, "retrieval": "off",
    "max_batch_entries": 512, "log_feed": "none", "notes_phrasing": False,
}
START = dt.datetime(2008, 11, 10, 12, 0, 0, tzinfo=dt.timezone.utc).timestamp()
BURST = 40
TEMPLATE = "Disk failure on datanode volume <PATH>: no space left for block <BLK>"


def _hdfs_lines() -> list[tuple[float, str]]:
    with HDFS.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        when = dt.datetime.strptime(row["Date"] + row["Time"], "%y%m%d%H%M%S").replace(
            tzinfo=dt.timezone.utc).timestamp()
        out.append((when, json.dumps({"timestamp": when, "level": row["Level"],
                                      "logger": row["Component"], "message": row["Content"]})))
    return out


def _incident() -> list[tuple[float, str]]:
    return [(START + 3 * i, json.dumps({
        "timestamp": START + 3 * i, "level": "ERROR", "logger": "dfs.FSDataset",
        "message": f"Disk failure on datanode volume /data/{i % 3}/dfs: no space left for "
                   f"block blk_{-9000000 - i}"})) for i in range(BURST)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine[Any]]:
    from workers.engines.loading import load_engine

    yield load_engine(Settings(**BASE, model_cache_dir=tmp_path_factory.mktemp("models")))


@pytest.mark.skipif(not HDFS.is_file(), reason="../shared/data/loghub is absent")
def test_the_notes_name_the_burst_its_count_and_times(
        engine: Engine[Any], redis_server: RedisServer) -> None:
    lines = sorted(_hdfs_lines() + _incident(), key=lambda pair: pair[0])
    settings = Settings(**BASE, redis_url=redis_server.url)
    producer = Producer(redis_server.client(), settings=settings)
    producer.set_kind("hdfs", "log")
    producer.publish_many("hdfs", [line for _, line in lines], eos=True)
    proc = StreamProcessor(engine, redis_from_settings(settings), settings, "w",
                           cache=HotStateCache(1 << 30))
    while (outcome := proc.process("hdfs", time_slice_s=60)).more:
        assert outcome.status == "applied"
    outputs = redis_server.client(decode_responses=True).xrange(
        StreamKeys.of("hdfs").output)
    final = outputs[-1][1]
    assert final["kind"] == "final"
    text = final["text"]
    print(text)
    burst = f"{BURST} lines from 2008-11-10 12:00:00 to 2008-11-10 12:01:57"
    named = [line for line in text.splitlines() if TEMPLATE in line and burst in line]
    assert named, text
    assert "[ERROR]" in named[0]
    timeline = text.split("## Incident timeline", 1)[1].split("##", 1)[0]
    assert "2008-11-10 12:00:00 burst" in timeline and TEMPLATE in timeline
    # every bullet about a template cites where its lines are: its first and last entry
    errors = text.split("## Errors and warnings", 1)[1].split("##", 1)[0]
    cited = next(line for line in errors.splitlines() if TEMPLATE in line)
    first, last = cited.rsplit("(entries ", 1)[1].rstrip(")").split("..")
    client = redis_server.client(decode_responses=True)
    [(_, said)] = client.xrange(StreamKeys.of("hdfs").input, first, first)
    assert "Disk failure" in said["text"] and f"blk_{-9000000}" in said["text"]
    [(_, said)] = client.xrange(StreamKeys.of("hdfs").input, last, last)
    assert f"blk_{-9000000 - BURST + 1}" in said["text"]
    assert f"first T11 [ERROR] `{TEMPLATE}` (entry {first})" in timeline
    # the burst cites its own first and last line: here the same 40 lines
    bursts = text.split("## Bursts", 1)[1].split("##", 1)[0]
    assert f"(entries {first}..{last})" in next(b for b in bursts.splitlines() if burst in b)
    assert f"(entries {first}..{last})" in timeline.split("12:00:00 burst", 1)[1].splitlines()[0]
    # and the question an SRE asks is answered from the template table, with its evidence,
    # and with the first lines that say so, kept in the input, quoted with time and entry
    answer = proc.answer("hdfs", "when did the datanode errors start?")
    facts, _, quoted = answer.text.partition("\n\nLines:\n")
    assert facts.splitlines()[-2 if "Burst" in facts else -1].startswith("- T")
    assert f"`{TEMPLATE}`: {BURST} lines, first at 2008-11-10 12:00:00" in facts
    assert answer.sources[0].entries[0] and "Disk failure" in answer.sources[0].quote
    # the burst is a source of its own: its first and last line
    assert any(source.entries == (first, last) and source.ts is not None
               and source.ts[0] == START for source in answer.sources[1:]), answer.sources
    assert [line.split(" [ERROR] Disk failure on datanode volume")[0]
            for line in quoted.splitlines()] == [
        f"- 2008-11-10 12:00:{3 * i:02d}" for i in range(5)]
    now = proc.summary_now("hdfs")
    assert now.kind.value == "on_demand" and burst in now.text
