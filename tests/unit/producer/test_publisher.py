"""The producer against a real private redis-server: order, the registry and end of stream,
bad turns refused, splitting oversize text, and backpressure.

Its other behaviours have modules of their own: idempotent retries across restarts in
``test_publisher_retries.py``, the raw-XADD entry contract in ``test_reader.py``, replay and
follow in ``test_replay.py``, the CLI in ``test_cli.py`` (shared helpers: ``conftest.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.encoding import split_utf8
from producer.formats import Turn, read_file
from producer.publisher import Producer, StreamFullError
from sinkstream.cli.localredis import RedisServer, free_port
from sinkstream.contracts.keys import RUNNABLE, STREAMS_REGISTRY, StreamKeys
from sinkstream.ids import InvalidStreamId
from sinkstream.settings import Settings
from tests.unit.producer.conftest import SAMPLES, entries, make_producer, turns_of
from tests.unit.producer.test_formats import SRT_TURNS, VTT_TURNS

REPO = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.usefixtures("quiet_retries")


# --- publishing -------------------------------------------------------------------------------


def test_publish_round_trip_registry_and_eos(redis_server: RedisServer) -> None:
    producer = make_producer(redis_server)
    first = producer.publish("standup", "ship it friday", speaker="Alice", ts=1.5)
    result = producer.publish_many("standup", ["plain", ("with speaker", "Bob"),
                                               Turn("typed", "Carol", 3.0)], eos=True)
    got = entries(redis_server, "standup")
    assert got[0].id == first and got[-1].id == result.last_id
    assert [(e.text, e.speaker, e.ts, e.eos) for e in got] == [
        ("ship it friday", "Alice", 1.5, False), ("plain", None, None, False),
        ("with speaker", "Bob", None, False), ("typed", "Carol", 3.0, False),
        ("", None, None, True),
    ]
    raw = redis_server.client().xrange("sinkstream:{standup}:in")
    assert set(raw[0][1]) == {b"text", b"speaker", b"ts"}  # contract fields only
    assert set(raw[-1][1]) == {b"text", b"eos"}
    client = redis_server.client()
    assert client.zscore(STREAMS_REGISTRY, "standup") is not None
    assert client.zscore(RUNNABLE, "standup") is not None
    assert producer.end_stream("standup") != result.last_id


def test_module_level_functions_use_the_environment(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import producer
    import producer.publisher as publisher

    monkeypatch.setenv("SINKSTREAM_REDIS_URL", redis_server.url)
    monkeypatch.delenv("SINKSTREAM_CONFIG", raising=False)
    monkeypatch.setattr(publisher, "_default", None)
    try:
        producer.publish("env", "ship it friday", speaker="Alice", ts=2.0)
        producer.publish_many("env", ["two", ("three", "Bob")])
        producer.end_stream("env")
    finally:
        if publisher._default is not None:
            publisher._default.close()
    assert [(e.text, e.speaker, e.eos) for e in entries(redis_server, "env")] == [
        ("ship it friday", "Alice", False), ("two", None, False), ("three", "Bob", False),
        ("", None, True)]


def test_every_qmsum_turn_reads_back_in_order(redis_server: RedisServer, qmsum_dir: Path) -> None:
    producer = make_producer(redis_server)
    meetings = sorted(qmsum_dir.glob("*.json"))
    assert meetings
    for path in meetings:
        stream = "qmsum-" + path.stem
        source = json.loads(path.read_text(encoding="utf-8"))["meeting_transcripts"]
        expected = [(t["content"], t["speaker"]) for t in source if t["content"].strip()]
        producer.publish_many(stream, read_file(path, "qmsum"), eos=True)
        got = entries(redis_server, stream)
        assert [(e.text, e.speaker) for e in got[:-1]] == expected, path.name
        assert got[-1].eos


@pytest.mark.parametrize(("name", "expected"), [("standup.vtt", VTT_TURNS),
                                                ("standup.srt", SRT_TURNS)])
def test_caption_samples_round_trip(redis_server: RedisServer, name: str,
                                    expected: list[Turn]) -> None:
    producer = make_producer(redis_server)
    producer.publish_many("captions", read_file(SAMPLES / name), eos=True)
    assert turns_of(entries(redis_server, "captions")) == expected


def test_invalid_stream_id_is_refused_before_touching_redis() -> None:
    cfg = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    producer = Producer(redis.Redis(port=free_port()), settings=cfg)
    for bad in ("a}:x", "a b", "", "x" * 200):
        with pytest.raises(InvalidStreamId):
            producer.publish(bad, "hello")
    with pytest.raises(ValueError, match="empty"):
        producer.publish("ok", "")


def test_bad_turn_publishes_what_came_before_and_names_the_turn(
    redis_server: RedisServer,
) -> None:
    producer = make_producer(redis_server)
    with pytest.raises(ValueError, match="turn 2: text is empty"):
        producer.publish_many("s", ["one", "two", "", "four"])
    assert [e.text for e in entries(redis_server, "s")] == ["one", "two"]
    with pytest.raises(ValueError, match="turn 0: ts must be a finite"):
        producer.publish_many("s", [("x", None, float("inf"))])
    with pytest.raises(ValueError, match="unpaired surrogate"):
        producer.publish("s", "bad \udcff")


# --- splitting ----------------------------------------------------------------------------------


def test_oversize_text_is_split_at_whitespace_and_reassembles(redis_server: RedisServer) -> None:
    producer = make_producer(redis_server, max_entry_bytes=64)
    words = ["naïve", "café", "résumé", "日本語の", "word", "ok"] * 30
    text = " ".join(words) + " " + "x" * 150 + " end"
    producer.publish("big", text, speaker="Alice", ts=4.0)
    got = entries(redis_server, "big")
    assert len(got) > 5
    assert "".join(e.text for e in got) == text
    assert all(len(e.text.encode()) <= 64 for e in got)
    assert all((e.speaker, e.ts) == ("Alice", 4.0) for e in got)
    # every chunk but the forced ones (inside the 150-char word) and the last ends at whitespace
    forced = [e for e in got[:-1] if not e.text.endswith(" ")]
    assert forced and all(set(e.text) <= {"x"} for e in forced)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400),
       st.integers(min_value=4, max_value=40))
def test_split_utf8_properties(text: str, limit: int) -> None:
    data = text.encode()
    chunks = split_utf8(data, limit)
    assert b"".join(chunks) == data
    assert all(len(c) <= limit for c in chunks)
    assert all(c.decode() is not None for c in chunks)  # each chunk is valid UTF-8 on its own
    assert all(c for c in chunks[:-1])


# --- backpressure -------------------------------------------------------------------------------


def test_full_stream_fails_clearly_and_keeps_the_rest_pending(redis_server: RedisServer) -> None:
    producer = make_producer(redis_server, max_stream_length=10, on_full="fail")
    with pytest.raises(StreamFullError) as info:
        producer.publish_many("bp", [f"t{i}" for i in range(15)])
    message = str(info.value)
    assert "is full (10/10 entries)" in message and "SINKSTREAM_MAX_STREAM_LENGTH" in message
    assert "5 entries were not published" in message
    client = redis_server.client()
    key = StreamKeys.of("bp").input
    assert client.xlen(key) == 10 and producer.pending == 5
    first = [e.text for e in entries(redis_server, "bp")]
    client.xtrim(key, maxlen=0)  # a worker applied and trimmed them
    producer.flush()
    assert first + [e.text for e in entries(redis_server, "bp")] == [f"t{i}" for i in range(15)]


def test_full_stream_blocks_until_workers_consume(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    producer = make_producer(redis_server, max_stream_length=10, on_full="block", batch_entries=4)
    done: dict[str, Any] = {}

    def run() -> None:
        done["result"] = producer.publish_many("bp", [f"t{i}" for i in range(40)])

    thread = threading.Thread(target=run)
    thread.start()
    client = redis_server.client()
    key = StreamKeys.of("bp").input
    consumed: list[str] = []
    deadline = time.monotonic() + 30
    while len(consumed) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
        assert client.xlen(key) <= 10
        batch = client.xrange(key, count=3)  # a slow worker: 3 entries per poll
        for entry_id, fields in batch:
            consumed.append(fields[b"text"].decode())
            client.xdel(key, entry_id)
    thread.join(10)
    assert consumed == [f"t{i}" for i in range(40)]
    assert done["result"].entries == 40
    full_logs = [rec for rec in caplog.records if "is full" in rec.getMessage()]
    assert 1 <= len(full_logs) <= 2  # logged once per interval, not once per poll


def test_block_timeout_raises(redis_server: RedisServer) -> None:
    producer = make_producer(redis_server, max_stream_length=10, on_full="block",
                             block_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(StreamFullError):
        producer.publish_many("bp", [f"t{i}" for i in range(12)])
    assert 0.3 <= time.monotonic() - started < 5
    assert producer.pending == 2


# --- the producer's imports -------------------------------------------------------------------


def test_producer_modules_do_not_import_torch() -> None:
    code = (
        "import sys, producer, producer.replay, producer.registry, producer.reader, "
        "state_store.connection, sinkstream.contracts.keys, state_store.scripts\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
