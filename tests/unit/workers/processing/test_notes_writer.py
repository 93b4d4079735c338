"""The notes a stream publishes: rolling updates with what is new, final notes whose every item
cites its entries, all of it checked by the guard (a tiny random model's phrasing never
reaches a reader: the speakers' own words stand in)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from producer.formats import read_file
from producer.publisher import Producer
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.outputs import OutputEntry
from sinkstream.settings import Settings
from workers.engines.base import Engine
from workers.engines.loading import load_engine
from workers.processing.observer import NullObserver
from workers.processing.processor import StreamProcessor

DEMO = Path(__file__).resolve().parents[4] / "sinkstream" / "samples" / "launch-review.vtt"
BASE: dict[str, Any] = {
    "model": "tiny-llama", "recent_tokens": 256, "sink_tokens": 4, "chunk_tokens": 16,
    "summary_every_tokens": 200, "summary_max_new_tokens": 8, "metrics_port": 0,
    "retrieval": "bm25",
}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Verdicts(NullObserver):
    def __init__(self) -> None:
        self.actions: list[str] = []
        self.generated_kinds: list[str] = []

    def guarded(self, verdicts: Any) -> None:
        self.actions += [v.action for v in verdicts]

    def generated(self, kind: str, tokens: int, seconds: float) -> None:
        self.generated_kinds.append(kind)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine[Any]:
    return load_engine(Settings(**BASE, model_cache_dir=tmp_path_factory.mktemp("models")))


def _notes(engine: Engine[Any], server: RedisServer, **over: Any,
           ) -> tuple[list[OutputEntry], Verdicts, list[str]]:
    settings = Settings(**{**BASE, **over}, redis_url=server.url)
    observer = Verdicts()
    proc = StreamProcessor(engine, server.client(), settings, "notes-test", observer=observer)
    turns = read_file(DEMO, "vtt")
    client = server.client()
    Producer(client, settings=settings).publish_many("demo", turns, eos=True)
    ids = [e.decode() for e, _ in client.xrange("sinkstream:{demo}:in")]
    published: list[OutputEntry] = []
    while (outcome := proc.process("demo")).status == "applied":
        published += outcome.summaries
    return published, observer, ids


def test_final_notes_list_the_meeting_items_each_citing_its_entries(
    engine: Engine[Any], redis_server: RedisServer
) -> None:
    published, observer, ids = _notes(engine, redis_server)
    final = published[-1]
    assert final.kind.value == "final"
    decisions = [i for i in final.items if i["kind"] == "decision"]
    actions = [i for i in final.items if i["kind"] == "action"]
    assert any("three-screen onboarding flow" in d["text"] for d in decisions)
    assert {a["owner"] for a in actions} == {"Tomas", "Priya", "Jonas"}
    merge_fix = next(a for a in actions if a["owner"] == "Tomas" and "merge" in a["text"])
    assert "by two o'clock" in merge_fix["due"] and len(merge_fix["entries"]) >= 3
    assert all(set(i["entries"]) <= set(ids) for i in final.items)  # real entries, cited
    # the tiny random model's phrasings state nothing the lines support: the guard dropped
    # them and every item is the speakers' own words
    assert all(i.get("verbatim") for i in final.items)
    assert "dropped" in observer.actions or not observer.actions
    for item in final.items:
        assert item["text"] in final.text and item["entries"][0] in final.text


def test_rolling_updates_report_each_item_once_as_it_is_first_said(
    engine: Engine[Any], redis_server: RedisServer
) -> None:
    published, _, _ = _notes(engine, redis_server)
    rolling = [p for p in published if p.kind.value == "rolling"]
    assert len(rolling) >= 3
    assert all(r.text.startswith("## New since the last update") for r in rolling)
    reported = [(i["kind"], i["text"]) for r in rolling for i in r.items]
    assert len(reported) == len(set(reported))  # nothing reported twice as new
    first = next(r for r in rolling if r.items)
    assert any("blocker" in i["text"] for i in first.items)  # said in the first minute


def test_without_phrasing_the_model_writes_no_item(
    engine: Engine[Any], redis_server: RedisServer
) -> None:
    published, observer, _ = _notes(engine, redis_server, notes_phrasing=False,
                                    summary_every_tokens=0)
    final = published[-1]
    assert final.items and all(i.get("verbatim") for i in final.items)
    assert [p.kind.value for p in published] == ["final"]
    # no model prose either: the summary is counted from the items below it
    summary = final.text.split("## Summary\n", 1)[1].split("\n\n", 1)[0]
    kinds = [i["kind"] for i in final.items]
    assert summary.endswith("each below with the lines it rests on.")
    assert f"{kinds.count('decision')} decision" in summary
    assert observer.generated_kinds == []


@pytest.mark.parametrize("prose", [False, True])
def test_free_prose_is_written_only_when_asked_for(
    engine: Engine[Any], redis_server: RedisServer, prose: bool
) -> None:
    # the guard checks a summary's names, numbers and dates but not its claims, so a phrasing
    # model writes the summary and the rolling 'so far' only with notes_prose on
    published, observer, _ = _notes(engine, redis_server, notes_phrasing=True,
                                    notes_prose=prose, summary_every_tokens=0)
    final = published[-1]
    summary = final.text.split("## Summary\n", 1)[1].split("\n\n", 1)[0]
    assert ("final" in observer.generated_kinds) is prose
    assert observer.generated_kinds  # the items were phrased either way
    assert summary.endswith("each below with the lines it rests on.") is not prose


def test_a_phrasing_must_reword_the_clauses_that_stated_its_item(
    engine: Engine[Any], redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the 1.5B preset wrote on the demo meeting: rewordings of the item's own clauses
    are kept; a sentence built from the rest of a cited line (the recap) is not."""
    from workers.notes.items import NoteItem

    settings = Settings(**BASE, redis_url=redis_server.url, notes_phrasing=True)
    writer = StreamProcessor(engine, redis_server.client(), settings, "phrase-test").notes
    recap = ("Maya: Thanks all. To recap: Tomas merges the crash fix today, Priya reviews it "
             "and gets the legal answer by Monday. We decide the on-call rotation on Friday.")
    deferred = NoteItem(0, "question", "Let's decide the rotation on Friday.",
                        "Let's decide the rotation on Friday.",
                        lines=("Maya: Let's decide the rotation on Friday. Tomas covers the "
                               "first weekend.",),
                        clauses=("Let's decide the rotation on Friday.",))
    decided = NoteItem(1, "decision", "We decide the on-call rotation on Friday.",
                       "We decide the on-call rotation on Friday.", lines=(recap,),
                       clauses=("We decide the on-call rotation on Friday.",))
    merge = NoteItem(2, "action", "I will merge it by two o'clock.", "", owner="Tomas",
                     lines=("Tomas: Yes, if Priya reviews it this morning. I will merge it by "
                            "two o'clock.", recap),
                     clauses=("I will merge it by two o'clock.",
                              "Tomas merges the crash fix today"))
    written = {0: "Who will cover the first weekend?",
               1: "The meeting discusses the progress of a project, including Tomas' crash fix, "
                  "legal review by Priya and the on-call rotation for Friday.",
               2: " merge the crash fix by two o'clock today."}
    for item in (deferred, decided, merge):
        monkeypatch.setattr(writer.summarizer, "generate",
                            lambda *a, _t=written[item.seq], **k: _t)
        out = writer._phrased(item, ["Maya", "Tomas", "Priya"])
        assert out.phrased is (item is merge), out.text
    assert out.text == "Tomas will merge the crash fix by two o'clock today."
