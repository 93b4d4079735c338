"""The QMSum benchmark's report: means and paired comparisons over meetings and queries, the
examples, the configuration, and the table's rows.

``benchmarks/qmsum.py`` describes the benchmark and its scores.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks._qmsum_harness import EvalConfig, Features, Harness
from benchmarks._qmsum_meetings import paired


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _report(results: list[dict[str, Any]], cfg: EvalConfig, features: Features, h: Harness,
            variants: list[str], wall_s: float) -> dict[str, Any]:
    def final(v: str, metric: str) -> list[float]:
        return [r["variants"][v][metric] for r in results if v in r["variants"]]

    def answer(k: str, metric: str) -> list[float]:
        return [a[k][metric] for r in results for a in r["answers"] if k in a]

    summary: dict[str, Any] = {
        "rouge_l_final_memory": _mean(final("memory", "rougeL")),
        "rouge_l_final_sink_only": _mean(final("sink", "rougeL")),
        "rouge_l_final_window": _mean(final("window", "rougeL")),
        "rouge_l_answers_retrieval": _mean(answer("retrieval", "rougeL")),
        "rouge_l_answers_sink_only": _mean(answer("sink_only", "rougeL")),
    }
    for v in variants:
        for metric in ("rouge1", "rouge2", "coverage", "label_recall"):
            summary[f"{metric}_final_{v}"] = _mean(final(v, metric))
    for k in ("retrieval", "sink_only"):
        for metric in ("rouge1", "rouge2"):
            summary[f"{metric}_answers_{k}"] = _mean(answer(k, metric))
    summary["memory_vs_sink"] = paired(final("memory", "rougeL"), final("sink", "rougeL"))
    summary["retrieval_vs_sink_only"] = paired(answer("retrieval", "rougeL"),
                                               answer("sink_only", "rougeL")) \
        if features.retrieval else None
    recalls = [a["recall"] for r in results for a in r["answers"] if a.get("recall")]
    for ranking in ("embedding", "bm25", "random"):
        summary[f"retrieval_recall_{ranking}"] = _mean([x[ranking] for x in recalls])
    summary["retrieval_recall_queries"] = len(recalls)
    missing = [n for n, ok in (("summary_memory", features.summary_memory),
                               ("retrieval + StreamProcessor.answer", features.retrieval))
               if not ok]
    summary.update(meetings=len(results), queries=sum(len(r["answers"]) for r in results),
                   tokens=sum(r["tokens"] for r in results), wall_s=wall_s,
                   missing_features=missing)
    picks = sorted({0, len(results) // 2, len(results) - 1}) if results else []
    examples = [{"meeting": results[i]["meeting"], "reference": results[i]["reference"],
                 **{v: results[i]["variants"][v]["final"] for v in variants}} for i in picks]
    engine = h.engine(h.settings())
    return {
        "summary": summary,
        "rows": [_row(r, variants) for r in results] + ([_mean_row(summary, variants)]
                                                       if results else []),
        "meetings": results,
        "examples": examples,
        "model": engine.model_name,
        "config": {**cfg.__dict__, "features": features.__dict__,
                   "settings": {k: v for k, v in h.base.model_dump(mode="json").items()
                                if "url" not in k and "password" not in k}},
        "engine_load_s": h.load_s,
    }


def _row(r: dict[str, Any], variants: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"meeting": r["meeting"], "words": r["words"], "tokens": r["tokens"]}
    for v in variants:
        row[f"RL {v[:3]}"] = r["variants"][v]["rougeL"]
    for v in variants:
        row[f"cov {v[:3]}"] = r["variants"][v]["coverage"]
    for k in ("retrieval", "sink_only"):
        values = [a[k]["rougeL"] for a in r["answers"] if k in a]
        row[f"ans RL {k[:4]}"] = _mean(values) if values else "-"
    row["s"] = round(sum(r["variants"][v]["wall_s"] for v in variants))
    return row


def _mean_row(summary: dict[str, Any], variants: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"meeting": "mean", "words": "", "tokens": summary["tokens"]}
    names = {"window": "rouge_l_final_window", "sink": "rouge_l_final_sink_only",
             "memory": "rouge_l_final_memory"}
    for v in variants:
        row[f"RL {v[:3]}"] = summary[names[v]]
    for v in variants:
        row[f"cov {v[:3]}"] = summary[f"coverage_final_{v}"]
    for k in ("retrieval", "sink_only"):
        value = summary[f"rouge_l_answers_{k}"]
        row[f"ans RL {k[:4]}"] = value if value is not None else "-"
    row["s"] = round(summary["wall_s"])
    return row
