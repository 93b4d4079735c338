"""The QMSum evaluation benchmark: its scoring rules, and one short end-to-end run.

The end-to-end test drives ``python -m benchmarks.run qmsum`` (its ``main``) with the tiny
seeded Llama on the first 30 turns of one real QMSum meeting: a private redis-server, the
producer, ``StreamProcessor.process`` until the final summary, answers, scoring and the JSON.
It skips only when the QMSum data is absent.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from benchmarks import qmsum
from benchmarks._qmsum_harness import EvalConfig, Features, Harness, _variant_overrides
from benchmarks._qmsum_meetings import (
    QUICK_MEETINGS,
    Scorer,
    Topic,
    load_meeting,
    paired,
    select_files,
)
from benchmarks.run import main as run_main


def test_rouge_is_one_for_identical_text_and_zero_for_disjoint_text() -> None:
    scorer = Scorer()
    text = "The team agreed on a yellow remote."
    same = scorer.rouge(text, text)
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert scorer.rouge("bananas everywhere", "The team agreed.")["rouge1"] == 0.0
    # stemming: "designs" matches "designed"
    assert scorer.rouge("designs", "designed")["rouge1"] == 1.0


def test_a_topic_is_covered_when_half_its_label_content_words_are_in_the_summary() -> None:
    scorer = Scorer()
    topics = [Topic("Discussion about the price of the remote control", [(0, 3)]),
              Topic("Drawing favourite animals", [(4, 9)])]
    # label content words: price, remote, control ("discussion", "about", "the" dropped)
    result = scorer.coverage("They set the price of the remote at 25 euros.", topics)
    assert result["topics"] == 2
    assert result["topics_covered"] == ["Discussion about the price of the remote control"]
    assert result["coverage"] == 0.5
    assert math.isclose(result["label_recall"], (2 / 3 + 0) / 2)
    assert scorer.coverage("", topics)["coverage"] == 0.0


def test_paired_comparison_counts_wins_ties_and_losses() -> None:
    out = paired([0.3, 0.2, 0.1], [0.1, 0.2, 0.3])
    assert out == {"pairs": 3, "mean_diff": pytest.approx(0.0), "wins": 1, "ties": 1,
                   "losses": 1}


def test_quick_meetings_are_short_full_meetings_with_queries(qmsum_dir: Path) -> None:
    files = select_files(qmsum_dir, quick=True)
    assert [f.stem for f in files] == list(QUICK_MEETINGS)
    for file in files:
        meeting = load_meeting(file)
        assert 3000 <= meeting.words <= 5000
        assert len(meeting.queries) >= 5 and meeting.topics and meeting.reference
    assert len(select_files(qmsum_dir, quick=False)) == len(list(qmsum_dir.glob("*.json")))
    with pytest.raises(FileNotFoundError, match="nope"):
        select_files(qmsum_dir, quick=False, names=["nope"])


def test_published_turns_carry_their_transcript_index_for_retrieval_recall(
    qmsum_dir: Path
) -> None:
    meeting = load_meeting(qmsum_dir / "ES2006a.json")
    doc = json.loads((qmsum_dir / "ES2006a.json").read_text())["meeting_transcripts"]
    published = meeting.published()
    assert len(published) == len(meeting.turns) == len(meeting.indexes)
    for turn, index in zip(published, meeting.indexes, strict=True):
        assert turn.ts == float(index) and turn.text == doc[index]["content"].strip()
    # each query's reference rests on transcript turns (QMSum's relevant_text_span)
    assert len(meeting.spans) == len(meeting.queries)
    assert all(span and all(a <= b for a, b in span) for span in meeting.spans)


def test_benchmark_run_writes_every_variant_and_score(qmsum_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "qmsum.json"
    assert run_main([
        "qmsum", "--model", "tiny-llama", "--meetings", "ES2006a", "--max-turns", "30",
        "--max-queries", "2", "--max-new-tokens", "8", "--summary-every", "256",
        "--data", str(qmsum_dir), "--json", str(out), "--partial", str(tmp_path / "part.json"),
    ]) == 0
    report = json.loads(out.read_text())
    partial = json.loads((tmp_path / "part.json").read_text())  # written after the meeting
    assert partial["summary"]["meetings"] == 1 and partial["rows"][0] == report["rows"][0]
    features = report["extra"]["config"]["features"]
    assert report["meetings"] == 1 and report["queries"] == 2
    for key in ("rouge_l_final_memory", "rouge_l_final_sink_only", "rouge_l_final_window",
                "rouge_l_answers_sink_only", "coverage_final_memory", "rouge1_final_sink"):
        assert 0.0 <= report[key] <= 1.0, key
    if features["retrieval"]:
        assert 0.0 <= report["rouge_l_answers_retrieval"] <= 1.0
        assert report["retrieval_vs_sink_only"]["pairs"] == 2
        assert 0 <= report["retrieval_recall_queries"] <= 2
    else:
        assert report["rouge_l_answers_retrieval"] is None
    assert report["memory_vs_sink"]["pairs"] == 1

    (meeting,) = report["extra"]["meetings"]
    assert meeting["meeting"] == "ES2006a" and meeting["turns"] == 30
    assert meeting["tokens"] > 1000  # 30 turns of bytes, well past tiny windows' sinks
    variants = meeting["variants"]
    assert set(variants) == {"window", "sink", "memory"}
    # rolling summaries every 256 tokens (the processor may cut batches at the boundaries)
    assert variants["memory"]["rolling_summaries"] >= meeting["tokens"] // (2 * 256)
    assert variants["sink"]["rolling_summaries"] == variants["window"]["rolling_summaries"] == 0
    for scores in variants.values():
        assert scores["topics"] == 5  # ES2006a's topic_list
        assert all(0.0 <= scores[m] <= 1.0 for m in ("rouge1", "rouge2", "rougeL", "coverage"))
    assert len(meeting["answers"]) == 2
    assert all("sink_only" in a and ("retrieval" in a) == features["retrieval"]
               for a in meeting["answers"])
    (example,) = report["extra"]["examples"]  # one meeting: first = middle = last
    assert example["meeting"] == "ES2006a" and example["reference"] == meeting["reference"]
    assert [r["meeting"] for r in report["rows"]] == ["ES2006a", "mean"]


def test_sink_final_from_the_memory_pass_state_equals_its_own_pass(
        qmsum_dir: Path, tmp_path: Path) -> None:
    """(b)'s final summary generated from pass (c)'s committed state is the one a (b) worker
    writes at the end of its own pass: summaries never change the KV state."""
    meeting = load_meeting(qmsum_dir / "ES2006a.json", max_turns=16)
    cfg = EvalConfig(model="tiny-llama", recent_tokens=256, summary_every_tokens=128,
                     summary_max_new_tokens=8)
    features = Features.detect()
    harness = Harness(cfg, tmp_path, features)
    try:
        runs = {}
        for variant in ("sink", "memory"):
            settings = harness.settings(**_variant_overrides(cfg, variant, features))
            runs[variant] = harness.stream(harness.processor(settings), f"s-{variant}",
                                           meeting.turns, lambda n: None)
        sink = harness.processor(harness.settings(**_variant_overrides(cfg, "sink", features)))
        reused = qmsum._final_from(sink, "s-memory")
    finally:
        harness.close()
    assert runs["memory"].rolling > 0 and runs["sink"].rolling == 0
    assert runs["sink"].tokens == runs["memory"].tokens == reused.tokens > 256
    # the two streams hold the same turns under different entry ids, which citations name
    assert _without_ids(reused.final) == _without_ids(runs["sink"].final)
    assert "## Summary" in reused.final


def _without_ids(notes: str) -> str:
    return re.sub(r"\b\d{10,}-\d+\b", "<id>", notes)
