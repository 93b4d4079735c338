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
