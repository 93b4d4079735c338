"""Streams a newer build wrote: each worker reads such a state once per committed version."""

from __future__ import annotations

import logging

import pytest
import redis

from workers.processing.newer import NewerStreams


def test_a_deferral_is_known_while_the_state_stays_at_its_version(
    caplog: pytest.LogCaptureFixture,
) -> None:
    newer = NewerStreams(limit=10)
    assert newer.known("m", 7) is None
    with caplog.at_level(logging.WARNING, logger="workers.processing.newer"):
        newer.met("m", 7, "state is format version 3")
        newer.met("m", 7, "state is format version 3")
    assert newer.known("m", 7) == "state is format version 3"
    assert [r.getMessage() for r in caplog.records] == [  # once
        "state is format version 3; left for an upgraded worker"]
    assert newer.known("m", 8) is None  # someone committed since: read it again
    assert newer.known("other", 7) is None


def test_it_remembers_at_most_its_limit_oldest_first_out() -> None:
    newer = NewerStreams(limit=2)
    newer.met("a", 1, "a")
    newer.met("b", 1, "b")
    newer.met("a", 2, "a again")  # a moved on: now the newest remembered
    newer.met("c", 1, "c")
    assert (newer.known("a", 2), newer.known("b", 1), newer.known("c", 1)) == \
        ("a again", None, "c")


def test_the_first_meeting_is_marked_on_the_stream_and_a_refused_mark_is_only_logged() -> None:
    marks: list[tuple[str, int, str]] = []
    newer = NewerStreams(limit=10, mark=lambda *mark: marks.append(mark))
    newer.met("m", 7, "newer")
    newer.met("m", 7, "newer")
    newer.met("m", 8, "newer still")
    assert marks == [("m", 7, "newer"), ("m", 8, "newer still")]

    def down(*_: object) -> None:
        raise redis.ConnectionError("Redis went away")

    unmarked = NewerStreams(limit=10, mark=down)
    unmarked.met("m", 7, "newer")  # deferred all the same
    assert unmarked.known("m", 7) == "newer"
