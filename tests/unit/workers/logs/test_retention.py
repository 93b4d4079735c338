"""The lines a log stream keeps in its input: where the commit may trim, whatever the cut."""

from __future__ import annotations

import random

import msgpack
import pytest

from workers.logs.retention import FIELD, MARKS, Retention, RetentionStateError


def _ids(n: int) -> list[str]:
    return [f"1700000000000-{i}" for i in range(n)]


def _fed(keep: int, cuts: list[int], ids: list[str]) -> tuple[Retention, bytes]:
    """``ids`` fed in batches ending at ``cuts``, each committed: the retention and the
    ``keep`` field as the last commit that wrote it left it."""
    retention, written, start = Retention(keep), b"", 0
    for end in [*cuts, len(ids)]:
        for index in range(start, end):
            retention.line(index, ids[index])
        retention.trim_before(end)
        written = retention.take_changes().get(FIELD, written)
        start = end
    return retention, written


def test_nothing_is_trimmed_until_the_stream_holds_more_than_it_keeps() -> None:
    ids = _ids(200)
    retention = Retention(64)  # a mark every 4th line
    for index in range(64):
        retention.line(index, ids[index])
    assert retention.trim_before(64) == ids[0]  # keeps exactly 64
    for index in range(64, 200):
        retention.line(index, ids[index])
        kept_from = retention.trim_before(index + 1)
        assert kept_from is not None
        kept = index + 1 - ids.index(kept_from)
        assert 64 <= kept < 64 + 64 // MARKS  # never fewer than asked, a step more at most
    assert len(retention.marks) <= MARKS + 1


def test_any_cut_into_batches_gives_the_same_marks_and_bytes() -> None:
    ids = _ids(500)
    whole, stored = _fed(100, [], ids)
    rng = random.Random(7)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, 500), rng.randint(1, 60)))
        cut, written = _fed(100, cuts, ids)
        assert (cut.marks, written) == (whole.marks, stored)
    assert Retention.from_fields({FIELD: stored}, 100).marks == whole.marks


def test_a_batch_writes_the_marks_only_when_they_change() -> None:
    retention = Retention(160)  # a mark every 10th line
    retention.line(0, "1-0")
    assert FIELD in retention.take_changes()
    retention.line(1, "1-1")
    assert retention.take_changes() == {}


def test_keeping_nothing_marks_nothing_and_trims_all() -> None:
    retention = Retention(0)
    retention.line(0, "1-0")
    assert retention.trim_before(1) is None and retention.take_changes() == {}


@pytest.mark.parametrize("raw", [b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([[0]]),
                                 msgpack.packb([[0, "not an id"]]),
                                 msgpack.packb([[-1, "1-0"]]),
                                 msgpack.packb([[i, f"1-{i}"] for i in range(2000)])])
def test_a_malformed_field_is_refused_by_name(raw: bytes) -> None:
    with pytest.raises(RetentionStateError, match="'keep'"):
        Retention.from_fields({FIELD: raw}, 100)


def test_a_stream_keeps_at_most_half_of_the_producers_cap() -> None:
    from workers.logs.retention import kept_lines

    assert kept_lines(10_000, 100_000) == 10_000
    assert kept_lines(10_000, 1_000) == 500  # a small cap never fills with kept lines
    assert kept_lines(0, 100_000) == 0
