"""The template table's stored fields: only what a batch counted is rewritten, and the rows
do not depend on where the batches were cut."""

from __future__ import annotations

import msgpack
import pytest

from sinkstream.contracts.formats import NewerFormatError
from workers.logs.table import (
    FORMAT_VERSION,
    HEAD_FIELD,
    BurstConfig,
    Table,
    TableStateError,
    TableTooNewError,
)

T0 = 1_700_000_000.0
CONFIG = BurstConfig(bucket_s=60, history_buckets=30)


def _lines() -> list[tuple[int, float]]:
    """Template 1 for the first 40 minutes, template 2 for five hours: in time order."""
    return sorted([(1, T0 + 60 * m) for m in range(40)] +
                  [(2, T0 + 30 * m + 7) for m in range(600)], key=lambda line: line[1])


def _stored(cut: int) -> dict[str, bytes]:
    table, stored = Table(CONFIG), {}
    for index, (template_id, ts) in enumerate(_lines()):
        table.add(template_id, f"template {template_id}", "info", ts, f"1-{index}", "line")
        if (index + 1) % cut == 0:
            table.close_batch()
            stored.update(table.take_changes())
    table.close_batch()
    stored.update(table.take_changes())
    return stored


def test_rows_are_the_same_however_the_batches_were_cut() -> None:
    whole = _stored(10_000)
    assert _stored(7) == _stored(64) == whole
    again = Table.from_fields(whole, CONFIG)
    assert len(again.templates[1].buckets) == CONFIG.history_buckets + 1
    assert max(again.templates[2].buckets) - min(again.templates[2].buckets) \
        == CONFIG.history_buckets


def test_a_batch_rewrites_only_the_templates_it_counted() -> None:
    table = Table(CONFIG)
    for template_id in (1, 2, 3):
        table.add(template_id, f"template {template_id}", "warn", T0, "1-0", "line")
    table.close_batch()
    assert set(table.take_changes()) == {"table:head", "table:t:1", "table:t:2", "table:t:3"}
    table.add(2, "template 2", "warn", T0 + 1, "1-1", "line")
    table.close_batch()
    assert set(table.take_changes()) == {"table:head", "table:t:2"}


def test_a_table_from_a_newer_build_is_told_apart_from_a_corrupt_one() -> None:
    fields = Table(BurstConfig()).take_changes()
    head = msgpack.unpackb(fields[HEAD_FIELD], strict_map_key=False)
    newer = {**fields, HEAD_FIELD: msgpack.packb({**head, "v": FORMAT_VERSION + 1})}
    with pytest.raises(TableTooNewError, match="template table is format version") as info:
        Table.from_fields(newer)
    assert isinstance(info.value, NewerFormatError)
    with pytest.raises(TableStateError, match="another format") as refused:
        Table.from_fields({**fields, HEAD_FIELD: msgpack.packb({**head, "v": 0})})
    assert not isinstance(refused.value, NewerFormatError)


def _burst_table(cut: int = 5) -> Table:
    """Template 1 once a minute for ten minutes, then 12 lines of template 2 in one minute;
    a batch closed every ``cut`` lines."""
    table = Table(BurstConfig(bucket_s=60, min_count=5, factor=5, warmup_buckets=2))
    lines = [(1, "heartbeat", "info", T0 + 60 * minute, f"{minute + 1}-0")
             for minute in range(10)]
    lines += [(2, "disk failed", "error", T0 + 600 + second, f"11-{second}")
              for second in range(12)]
    for index, (template_id, template, level, ts, entry) in enumerate(lines):
        table.add(template_id, template, level, ts, entry, "line")
        if (index + 1) % cut == 0:
            table.close_batch()
    table.close_batch()
    return table


def test_a_burst_keeps_the_entries_of_its_first_and_last_line() -> None:
    table = _burst_table()
    [burst] = table.incidents
    assert (burst.count, burst.first_entry, burst.last_entry) == (12, "11-0", "11-11")
    stored = table.take_changes()
    # the same incident and bytes whether the burst bursts within a batch or across four
    for cut in (1, 3, 7, 100):
        assert _burst_table(cut).take_changes() == stored
    again = Table.from_fields(stored, table.config)
    assert again.incidents == table.incidents
    # a bucket stores its first line's entry; its last is known only to the batch counting it
    assert again.templates[2].buckets == {
        b: [*cell[:4], ""] for b, cell in table.templates[2].buckets.items()}


def _as_format_2(fields: dict[str, bytes]) -> dict[str, bytes]:
    """What the previous build stored: no entries after a bucket's or an incident's numbers."""
    head = msgpack.unpackb(fields[HEAD_FIELD], strict_map_key=False)
    out = {HEAD_FIELD: msgpack.packb({**head, "v": 2, "i": [i[:7] for i in head["i"]]})}
    for name, value in fields.items():
        if name != HEAD_FIELD:
            row = msgpack.unpackb(value, strict_map_key=False)
            row[8] = [cell[:4] for cell in row[8]]
            out[name] = msgpack.packb(row)
    return out


def test_a_table_of_the_previous_format_is_read_and_its_new_bursts_cite_entries() -> None:
    table = _burst_table()
    old = Table.from_fields(_as_format_2(table.take_changes()), table.config)
    [burst] = old.incidents
    assert (burst.count, burst.first_entry, burst.last_entry) == (12, "", "")
    # the old burst continued in the next minute: part of it has no entries, so none is cited
    for second in range(12):
        old.add(2, "disk failed", "error", T0 + 660 + second, f"12-{second}", "disk")
    old.close_batch()
    [burst] = old.incidents
    assert (burst.count, burst.first_entry, burst.last_entry) == (24, "", "")
    # a later burst of the same template, twenty minutes on, cites the lines it counted
    for second in range(6):
        old.add(1, "heartbeat", "info", T0 + 1800 + 2 * second, f"31-{second}", "hb")
    old.close_batch()
    assert (old.incidents[-1].count, old.incidents[-1].first_entry,
            old.incidents[-1].last_entry) == (6, "31-0", "31-5")
    stored = old.take_changes()
    assert msgpack.unpackb(stored[HEAD_FIELD], strict_map_key=False)["v"] == FORMAT_VERSION
    assert Table.from_fields(stored, table.config).incidents == old.incidents
