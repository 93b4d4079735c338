"""Replay and follow (``producer/replay.py``): a realtime schedule that follows the timestamps
at the given speed, and a followed file through appends, truncation and rotation."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.formats import Turn
from producer.replay import follow, replay, timed_groups
from sinkstream.cli.localredis import RedisServer
from tests.unit.producer.conftest import entries, make_producer

pytestmark = pytest.mark.usefixtures("quiet_retries")


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
