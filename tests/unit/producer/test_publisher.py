"""The producer against a real private redis-server: order, idempotent retries across restarts,
backpressure, splitting, the raw-XADD contract, replay/follow, and the CLI."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from producer.encoding import split_utf8
from producer.formats import Turn, read_file
from producer.publisher import Producer, StreamFullError
from producer.reader import read_entries
from producer.replay import follow, replay, timed_groups
from sinkstream.cli import app as cli
from sinkstream.cli import common as cli_common
from sinkstream.cli.localredis import RedisServer, free_port
from sinkstream.contracts.entries import InputEntry, Rejected, parse_entry
from sinkstream.contracts.keys import RUNNABLE, STREAMS_REGISTRY, StreamKeys
from sinkstream.ids import InvalidStreamId
from sinkstream.settings import Settings
from state_store.connection import redis_from_settings
from tests.unit.producer.test_formats import SRT_TURNS, VTT_TURNS

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
REPO = Path(__file__).resolve().parents[3]


def make_producer(server: RedisServer, **kwargs: Any) -> Producer:
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in Settings.model_fields}
    cfg = Settings(redis_url=server.url, **overrides)
    # the production client: redis-py retries once quietly, longer outages reach retry_call
    return Producer(redis_from_settings(cfg), settings=cfg, **kwargs)


def entries(server: RedisServer, stream: str) -> list[InputEntry]:
    out = []
    for parsed in read_entries(server.client(), stream):
        assert isinstance(parsed, InputEntry), parsed
        out.append(parsed)
    return out


def turns_of(items: list[InputEntry]) -> list[Turn]:
    return [Turn(e.text, e.speaker, e.ts) for e in items if not e.eos]


# --- the entry contract ---------------------------------------------------------------------


def test_raw_xadd_entry_is_read_by_the_library(r: redis.Redis, redis_server: RedisServer) -> None:
    # exactly what `redis-cli XADD 'sinkstream:{standup}:in' '*' text "Alice: ship it friday"` does
    r.execute_command("XADD", "sinkstream:{standup}:in", "*", "text", "Alice: ship it friday")
    r.execute_command("XADD", "sinkstream:{standup}:in", "*", "text", "ok", "speaker", "Bob",
                      "ts", "12.5", "source", "zoom")
    r.execute_command("XADD", "sinkstream:{standup}:in", "*", "text", "", "eos", "1")
    parsed = list(read_entries(r, "standup"))
    assert [(e.text, e.speaker, e.ts, e.eos) for e in parsed if isinstance(e, InputEntry)] == [
        ("Alice: ship it friday", None, None, False),
        ("ok", "Bob", 12.5, False),
        ("", None, None, True),
    ]
    assert all(isinstance(e.id, str) and "-" in e.id for e in parsed)
    # the same through a decode_responses client
    decoded = redis_server.client(decode_responses=True)
    assert [e.text for e in read_entries(decoded, "standup")][:2] == ["Alice: ship it friday", "ok"]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"speaker": b"A"}, "missing required field 'text'"),
        ({b"text": b""}, "'text' is empty"),
        ({b"text": b"caf\xe9"}, "'text' is not valid UTF-8 (byte offset 3)"),
        ({b"text": b"x", b"speaker": b"\xff"}, "'speaker' is not valid UTF-8"),
        ({b"text": b"x", b"ts": b"noon"}, "'ts' must be a number"),
        ({b"text": b"x", b"ts": b"nan"}, "'ts' must be finite"),
        ({b"text": b"x", b"eos": b"maybe"}, "'eos' must be '1'"),
    ],
)
def test_bad_entries_are_rejected_with_a_reason(fields: dict[bytes, bytes], reason: str) -> None:
    parsed = parse_entry(b"1-0", fields)
    assert isinstance(parsed, Rejected)
    assert reason in parsed.reason
    assert parsed.id == "1-0" and all(isinstance(v, str) for v in parsed.fields.values())


def test_parse_entry_size_limit_and_lenient_flags() -> None:
    assert isinstance(parse_entry("1-0", {"text": "x" * 100}, max_text_bytes=99), Rejected)
    ok = parse_entry("1-0", {"text": "x", "eos": "0", "ts": "", "speaker": ""})
    assert ok == InputEntry("1-0", "x", None, None, False)


def test_read_entries_pages_and_bounds(r: redis.Redis) -> None:
    for i in range(25):
        r.xadd("sinkstream:{p}:in", {"text": f"t{i}"})
    assert [e.text for e in read_entries(r, "p", page_size=4)] == [f"t{i}" for i in range(25)]  # type: ignore[union-attr]
    assert len(list(read_entries(r, "p", count=7, page_size=3))) == 7
    with pytest.raises(InvalidStreamId):
        list(read_entries(r, "a}:x"))


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


# --- idempotent retries -------------------------------------------------------------------------


def test_retry_after_a_lost_reply_does_not_duplicate(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis runs the append but the reply is lost: the retry must skip what landed."""
    original = redis.client.Pipeline.execute
    calls = {"n": 0}

    def execute_then_drop_reply(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        replies = original(self, *args, **kwargs)
        if calls["n"] in (2, 3):
            raise redis.ConnectionError("connection reset by peer (simulated after execution)")
        return replies

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute_then_drop_reply)
    producer = make_producer(redis_server, batch_entries=10)
    result = producer.publish_many("s", [f"t{i}" for i in range(35)])
    assert [e.text for e in entries(redis_server, "s")] == [f"t{i}" for i in range(35)]
    assert result.entries == 35 and result.duplicates == 10  # 10 landed in a lost attempt
    assert sum("publishing to" in rec.getMessage() for rec in caplog.records) == 2


def test_publish_survives_a_redis_restart(
    redis_aof_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL + restart (AOF) twice while a long publish runs: no duplicates, no gaps."""
    producer = make_producer(redis_aof_server, batch_entries=10)
    n = 3000
    marks = {n // 4: threading.Event(), n // 2: threading.Event()}

    def turns() -> Iterator[tuple[str, str, float]]:
        for i in range(n):
            if i in marks:
                marks[i].set()
            if i % 10 == 0:
                time.sleep(0.002)
            yield (f"turn {i}", f"S{i % 3}", float(i))

    def restarter() -> None:
        for event in marks.values():
            event.wait(20)
            redis_aof_server.restart(hard=True, down_seconds=0.2)

    thread = threading.Thread(target=restarter)
    thread.start()
    try:
        result = producer.publish_many("live", turns(), eos=True)
    finally:
        thread.join()
    got = entries(redis_aof_server, "live")
    assert [e.text for e in got[:-1]] == [f"turn {i}" for i in range(n)]
    assert got[-1].eos and result.last_id == got[-1].id
    assert any("publishing to" in rec.getMessage() for rec in caplog.records), "no outage hit"


class ReplyCuttingProxy:
    """A TCP proxy in front of Redis that, for the N-th script call, lets Redis execute it,
    then SIGKILLs and restarts Redis and closes the client's socket before the reply reaches
    it: the worst case for a retry (the append happened and survived, the producer can't know).
    """

    def __init__(self, server: RedisServer, cut_on_call: int) -> None:
        self.server = server
        self.cut_on_call = cut_on_call
        self.calls = 0
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.server.port))
            except OSError:  # Redis is restarting: the client sees a reset and retries
                client.close()
                continue
            cut = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, cut), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, cut), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, cut: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if b"EVALSHA" in data:
                    with self._lock:
                        self.calls += 1
                        if self.calls == self.cut_on_call:
                            cut.set()
                dst.sendall(data)
        except OSError:
            pass

    def _down(self, src: socket.socket, dst: socket.socket, cut: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if cut.is_set():  # Redis ran the script (its reply is here): lose the reply
                    self.cuts += 1
                    self.server.restart(hard=True, down_seconds=0.2)
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # FIN now, even with a thread in recv()
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_reply_lost_in_a_restart_is_not_duplicated(redis_aof_server: RedisServer) -> None:
    proxy = ReplyCuttingProxy(redis_aof_server, cut_on_call=3)
    try:
        cfg = Settings(redis_url=f"redis://127.0.0.1:{proxy.port}/0")
        producer = Producer(redis_from_settings(cfg), settings=cfg, batch_entries=10)
        result = producer.publish_many("s", [f"t{i}" for i in range(50)], eos=True)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    got = entries(redis_aof_server, "s")
    assert [e.text for e in got[:-1]] == [f"t{i}" for i in range(50)] and got[-1].eos
    assert result.duplicates == 10 and result.entries == 51


def test_pending_entries_go_first_after_a_call_failed(redis_aof_server: RedisServer) -> None:
    producer = make_producer(redis_aof_server, batch_entries=5, retry_attempts=2)
    producer.publish_many("s", ["a", "b"])
    redis_aof_server.stop(hard=True)
    with pytest.raises(redis.ConnectionError):
        producer.publish_many("s", ["c", "d", "e"])
    assert producer.pending == 3
    redis_aof_server.start()
    producer.publish_many("s", ["f"])
    assert [e.text for e in entries(redis_aof_server, "s")] == ["a", "b", "c", "d", "e", "f"]
    assert producer.pending == 0


def test_fixed_producer_id_resumes_numbering_and_close_forgets(redis_server: RedisServer) -> None:
    first = make_producer(redis_server, producer_id="camera-1")
    first.publish_many("s", ["a", "b"])
    second = make_producer(redis_server, producer_id="camera-1")
    second.publish_many("s", ["c"])  # would be skipped as a duplicate if numbering restarted
    assert [e.text for e in entries(redis_server, "s")] == ["a", "b", "c"]
    producers_key = StreamKeys.of("s").producers
    assert redis_server.client().hget(producers_key, "camera-1") is not None
    second.close()
    assert redis_server.client().hget(producers_key, "camera-1") is None
    assert 0 < redis_server.client().pttl(producers_key) or not redis_server.client().exists(
        producers_key)


def test_two_producers_interleave_without_losing_entries(redis_server: RedisServer) -> None:
    a, b = make_producer(redis_server), make_producer(redis_server)
    assert a.producer_id != b.producer_id
    for i in range(5):
        a.publish("s", f"a{i}")
        b.publish("s", f"b{i}")
    assert [e.text for e in entries(redis_server, "s")] == [
        x for i in range(5) for x in (f"a{i}", f"b{i}")]


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


# --- replay ------------------------------------------------------------------------------------


def test_realtime_schedule_follows_timestamps_and_speed(redis_server: RedisServer) -> None:
    turns = [Turn("a", None, 10.0), Turn("b", None, 10.0), Turn("c", None, 12.0),
             Turn("d"), Turn("e", None, 11.0), Turn("f", None, 16.0)]
    assert [(due, [t.text for t in g]) for due, g in timed_groups(turns, speed=2.0)] == [
        (0.0, ["a", "b"]), (1.0, ["c", "d", "e"]), (3.0, ["f"])]
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    producer = make_producer(redis_server)
    replay(producer, "rt", turns, realtime=True, speed=2.0, sleep=sleep, clock=lambda: now[0])
    assert slept == [1.0, 2.0]
    got = entries(redis_server, "rt")
    assert [e.text for e in got] == ["a", "b", "c", "d", "e", "f", ""] and got[-1].eos


def test_follow_handles_appends_truncation_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "live.txt"
    path.write_text("Alice: one\n")
    now = [0.0]
    steps = iter([
        lambda: path.open("a").write("Bob: two\nCarol: thr"),
        lambda: path.open("a").write("ee\n"),
        lambda: path.write_text("x\n"),  # truncated (copytruncate rotation)
        lambda: (path.rename(tmp_path / "live.txt.1"), path.write_text("after rotate\n")),
    ])

    def sleep(seconds: float) -> None:
        now[0] += seconds
        step = next(steps, None)
        if step is not None:
            step()

    batches = list(follow(path, "text", idle_timeout=1.0, sleep=sleep, clock=lambda: now[0]))
    turns = [t for batch in batches for t in batch]
    assert turns == [Turn("one", "Alice"), Turn("two", "Bob"), Turn("three", "Carol"),
                     Turn("x"), Turn("after rotate")]


# --- CLI -----------------------------------------------------------------------------------------


@pytest.fixture
def runner(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("SINKSTREAM_REDIS_URL", redis_server.url)
    monkeypatch.delenv("SINKSTREAM_CONFIG", raising=False)
    monkeypatch.setattr(cli_common.state, "settings", None)
    monkeypatch.setattr(cli_common.state, "config", None)
    return CliRunner()


def _ok(result: Any) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def _user_error(result: Any, *needles: str) -> str:
    text = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert result.exit_code != 0
    assert "Traceback" not in text
    flat = " ".join(text.split())
    for needle in needles:
        assert needle in flat, text
    return flat


def test_cli_publishes_a_vtt_file(runner: CliRunner, redis_server: RedisServer) -> None:
    result = runner.invoke(cli.app, ["publish", "talk", str(SAMPLES / "standup.vtt")])
    _ok(result)
    assert "published 7 entries" in result.output
    got = entries(redis_server, "talk")
    assert turns_of(got) == VTT_TURNS and got[-1].eos


def test_cli_publishes_qmsum_and_lists_streams(
    runner: CliRunner, redis_server: RedisServer, qmsum_dir: Path
) -> None:
    path = sorted(qmsum_dir.glob("*.json"))[0]
    _ok(runner.invoke(cli.app, ["publish", "meeting", str(path), "--format", "qmsum",
                                "--no-eos"]))
    _ok(runner.invoke(cli.app, ["publish", "other", "-"], input="hello\n"))
    got = entries(redis_server, "meeting")
    assert not got[-1].eos and len(got) == len(read_file(path, "qmsum"))
    listed = runner.invoke(cli.app, ["streams"])
    _ok(listed)
    assert "meeting" in listed.output and "other" in listed.output
    assert f"{len(got):,}" in listed.output and "yes" in listed.output  # 'other' ended


def test_cli_streams_when_empty(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["streams"])
    _ok(result)
    assert "no streams yet" in result.output


def test_cli_stdin_streams_lines(runner: CliRunner, redis_server: RedisServer) -> None:
    result = runner.invoke(cli.app, ["publish", "pipe"],
                           input="Alice: hi there\n\nplain line\nBob: last, no newline")
    _ok(result)
    assert turns_of(entries(redis_server, "pipe")) == [
        Turn("hi there", "Alice"), Turn("plain line"), Turn("last, no newline", "Bob")]


def test_cli_realtime_speed(runner: CliRunner, redis_server: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "ts": i * 0.5}) + "\n" for i in range(3)))
    started = time.monotonic()
    _ok(runner.invoke(cli.app, ["publish", "rt", str(path), "--realtime", "--speed", "5"]))
    assert time.monotonic() - started >= 0.2  # 1.0 s of transcript at 5x
    got = entries(redis_server, "rt")
    assert [e.text for e in got] == ["t0", "t1", "t2", ""]
    assert [e.ts for e in got[:3]] == [0.0, 0.5, 1.0]


def test_cli_follow_with_idle_timeout(runner: CliRunner, redis_server: RedisServer,
                                      tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    path.write_text('{"text": "first", "speaker": "A"}\n')

    def writer() -> None:
        time.sleep(0.4)
        with path.open("a") as handle:
            handle.write('{"text": "second"}\n{"text": "thi')
            handle.flush()
            time.sleep(0.3)
            handle.write('rd", "ts": 3}\n')

    thread = threading.Thread(target=writer)
    thread.start()
    result = runner.invoke(cli.app, ["publish", "tail", str(path), "--follow",
                                     "--idle-timeout", "1.2"])
    thread.join()
    _ok(result)
    got = entries(redis_server, "tail")
    assert turns_of(got) == [Turn("first", "A"), Turn("second"), Turn("third", None, 3.0)]
    assert got[-1].eos


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["publish", "a}:x", "-"], ["invalid stream id 'a}:x'"]),
        (["publish", "a b", "-"], ["invalid stream id"]),
        (["publish", "x" * 200, "-"], ["1..128 characters"]),
        (["publish", "ok", "/nonexistent/file.txt"], ["cannot read /nonexistent/file.txt"]),
        (["publish", "ok", "-", "--format", "docx"], ["unknown --format 'docx'"]),
        (["publish", "ok", "-", "--follow"], ["--follow needs a FILE"]),
        (["publish", "ok", str(SAMPLES / "standup.vtt"), "--follow"], ["line formats"]),
    ],
)
def test_cli_user_errors_are_clear(runner: CliRunner, args: list[str],
                                   needles: list[str]) -> None:
    _user_error(runner.invoke(cli.app, args, input=""), *needles)


def test_cli_non_utf8_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"Alice: ok\nBob: na\xefve\n")
    _user_error(runner.invoke(cli.app, ["publish", "s", str(path)]),
                "not valid UTF-8 at byte offset 17 (line 2)")


def test_cli_redis_unreachable(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("SINKSTREAM_REDIS_URL", url)
    monkeypatch.setenv("SINKSTREAM_REDIS_SOCKET_TIMEOUT", "1")
    _user_error(runner.invoke(cli.app, ["publish", "s", "-"], input="hi\n"),
                f"cannot reach Redis at {url}", "SINKSTREAM_REDIS_URL")
    _user_error(runner.invoke(cli.app, ["streams"]), f"cannot reach Redis at {url}")


def test_cli_full_stream_with_on_full_fail(runner: CliRunner, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SINKSTREAM_MAX_STREAM_LENGTH", "10")
    monkeypatch.setenv("SINKSTREAM_ON_FULL", "fail")
    path = tmp_path / "many.txt"
    path.write_text("".join(f"line {i}\n" for i in range(20)))
    _user_error(runner.invoke(cli.app, ["publish", "s", str(path)]), "is full (10/10 entries)")


def test_producer_modules_do_not_import_torch() -> None:
    code = (
        "import sys, producer, producer.replay, producer.registry, producer.reader, "
        "state_store.connection, sinkstream.contracts.keys, state_store.scripts\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.fixture(autouse=True)
def _quiet_retries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
