"""Log notes: sections counted from the table, and a narrative the guard holds to the counts."""

from __future__ import annotations

from typing import Any

from sinkstream.settings import Settings
from workers.logs import notes
from workers.logs.table import BurstConfig, Table
from workers.processing.log_notes import LogNotesWriter
from workers.processing.observer import NullObserver

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def _table() -> Table:
    table = Table(BurstConfig(bucket_s=60, min_count=5, factor=5, warmup_buckets=2))
    for minute in range(10):  # a steady template: one line a minute
        table.add(1, "heartbeat from <IP>", "info", T0 + 60 * minute, f"{minute}-0", "hb")
        table.close_batch()
    for second in range(8):  # then a new error template bursts
        table.add(2, "disk <PATH> failed", "error", T0 + 600 + second, f"9-{second}", "disk")
    table.close_batch()
    return table


def test_sections_name_the_burst_with_count_and_times() -> None:
    table = _table()
    assert len(table.incidents) == 1
    text = notes.render(table)
    assert "T2 [ERROR] `disk <PATH> failed`: 8 lines from 2023-11-14 22:23:20 to " \
           "2023-11-14 22:23:27" in text
    # a burst cites the entries of its first and last line, in its section and the timeline
    bursts = text.split("## Bursts")[1].split("##")[0]
    assert bursts.strip().endswith("(baseline 0.0 lines per 60 s) (entries 9-0..9-7)")
    timeline = text.split("## Incident timeline")[1]
    assert timeline.index("first T2") < timeline.index("burst T2")
    assert "(entries 9-0..9-7)" in timeline.split("burst T2")[1].splitlines()[0]
    assert notes.shown("ask <IP> to delete <BLK> <BLK> <BLK> <BLK>") == \
        "ask <IP> to delete <BLK> x4"
    stored = table.take_changes()
    again = Table.from_fields(stored, table.config)
    assert again.take_changes() == {"table:head": stored["table:head"]}
    again._changed.update(again.templates)
    assert again.take_changes() == stored and notes.render(again) == text


class _Model:
    """A summarizer stub: says what it is told to, true or invented."""

    def __init__(self, text: str) -> None:
        self.text = text

    def prose(self, *_: Any, **__: Any) -> str:
        return self.text


def test_the_narrative_keeps_only_what_the_counts_say() -> None:
    table = _table()
    settings = Settings(model="tiny-llama", metrics_port=0)
    true = "Template T2 appeared 8 times, first at 2023-11-14 22:23:20."
    invented = "It failed 31 times on 2023-12-01."
    writer = LogNotesWriter(None, settings, _Model(f"{true} {invented}"),  # type: ignore[arg-type]
                            NullObserver())
    assert writer.narrative(table, None) == true  # type: ignore[arg-type]


def test_questions_find_their_templates() -> None:
    from workers.logs.search import relevant

    table = _table()
    assert [s.template_id for s, _ in relevant(table, "when did the disk errors start?")] == [2]
    assert [s.template_id for s, _ in relevant(table, "any heartbeats?")][0] == 1
    assert relevant(table, "what is the weather like") == []


def test_a_question_finds_a_template_by_another_form_of_its_words() -> None:
    from workers.logs.search import relevant

    table = Table()
    table.add(1, "dfs.FSDataset: Deleting block <BLK> file <PATH>", "info", T0, "1-0", "x")
    table.add(2, "dfs.DataNode: Receiving block <BLK> src: /<IP>", "info", T0, "1-1", "y")
    table.add(2, "dfs.DataNode: Receiving block <BLK> src: /<IP>", "info", T0, "1-2", "y")
    assert relevant(table, "when did the block deletions start?")[0][0].template_id == 1
    assert relevant(table, "what was received?")[0][0].template_id == 2
