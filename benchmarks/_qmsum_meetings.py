"""QMSum meetings as the benchmark reads them (turns, references, queries, topics), and how
its outputs are scored: ROUGE-1/2/L, topic coverage and paired comparisons.

``benchmarks/qmsum.py`` describes the benchmark and its scores.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: short AMI meetings from three series (ES2006, TS3010, ES2009), 3.4k-4.8k words each
QUICK_MEETINGS = ("ES2006a", "TS3010b", "ES2009b")
#: a paired difference smaller than this is a tie
TIE = 0.0005
#: a topic is covered when at least this share of its label's content words is in the summary
COVERAGE_THRESHOLD = 0.5
_STOPWORDS = (
    "a an the and or but of to in on at for from by with about into over under between "
    "during after before as is are was were be been being it its this that these those "
    "their them they he she we you i his her our your some any all each other more most "
    "how what which who whom why when where whether not no so than then there here also "
    "up down out off new own same such via towards toward etc "
    # generic words of QMSum topic labels that name the form of talk, not its subject
    "discussion discussions discuss discussed presentation presentations present presented "
    "meeting meetings talk talking brief individual general issue issues concern concerns "
    "comment comments announcement opening closing introduction"
)


# ----- data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topic:
    label: str
    spans: list[tuple[int, int]]


@dataclass(frozen=True)
class Meeting:
    """One QMSum meeting as the benchmark uses it."""

    name: str
    turns: list[tuple[str, str | None]]  # (text, speaker), as the producer publishes them
    words: int
    reference: str  # answer to "Summarize the whole meeting"
    queries: list[tuple[str, str]]  # (specific query, reference answer)
    topics: list[Topic]
    #: each turn's index in the file's ``meeting_transcripts`` (blank turns are skipped),
    #: published as its ``ts`` so retrieved chunks say which turns they hold
    indexes: list[int] = field(default_factory=list)
    #: per query, the transcript turns its reference answer rests on (``relevant_text_span``)
    spans: list[list[tuple[int, int]]] = field(default_factory=list)

    def published(self) -> list[Any]:
        """The turns as the benchmark publishes them: ``(text, speaker, ts = turn index)``
        (the model reads ``Speaker: text`` only; ``ts`` lands in the chunks' metadata)."""
        from producer.formats import Turn

        if not self.indexes:
            return [Turn(text, speaker) for text, speaker in self.turns]
        return [Turn(text, speaker, float(i))
                for (text, speaker), i in zip(self.turns, self.indexes, strict=True)]


def load_meeting(path: Path, max_turns: int | None = None,
                 max_queries: int | None = None) -> Meeting:
    """Read one QMSum file: turns through the producer's own QMSum reader (blank turns are
    skipped there, as ``sinkstream publish --format qmsum`` does), references and topics."""
    from producer.formats import read_file

    doc = json.loads(path.read_text())
    turns = [(t.text, t.speaker) for t in read_file(path, "qmsum")][:max_turns]
    indexes = [i for i, item in enumerate(doc.get("meeting_transcripts", []))
               if str(item.get("content", "")).strip()][:len(turns)]
    general = [q["answer"] for q in doc.get("general_query_list", [])
               if q["query"].strip().lower().startswith("summarize the whole meeting")]
    if not general:
        raise ValueError(f"{path}: no 'Summarize the whole meeting' reference")
    specific = doc.get("specific_query_list", [])[:max_queries]
    queries = [(q["query"], q["answer"]) for q in specific]
    spans = [[(int(a), int(b)) for a, b in q.get("relevant_text_span", [])] for q in specific]
    topics = [Topic(t["topic"], [(int(a), int(b)) for a, b in t["relevant_text_span"]])
              for t in doc.get("topic_list", [])]
    return Meeting(
        name=path.stem, turns=turns, words=sum(len(text.split()) for text, _ in turns),
        reference=general[0], queries=queries, topics=topics,
        indexes=indexes if len(indexes) == len(turns) else [], spans=spans,
    )


def select_files(folder: Path, *, quick: bool, limit: int | None = None,
                 names: Sequence[str] = ()) -> list[Path]:
    """The meetings of a run: ``names`` if given, else the quick set, else all (sorted);
    then the first ``limit``."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no QMSum meetings under {folder}")
    by_name = {f.stem: f for f in files}
    wanted = list(names) or (list(QUICK_MEETINGS) if quick else list(by_name))
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise FileNotFoundError(f"no QMSum meeting named {', '.join(missing)} under {folder}")
    chosen = [by_name[n] for n in wanted]
    return chosen[:limit] if limit else chosen


# ----- scoring -----------------------------------------------------------------------------


class Scorer:
    """ROUGE-1/2/L F1 (stemmed) and topic coverage, with one tokenizer for both."""

    def __init__(self) -> None:
        from rouge_score import rouge_scorer, tokenizers

        self._rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=True)
        self._stop = set(self._tokenizer.tokenize(_STOPWORDS))

    def rouge(self, prediction: str, reference: str) -> dict[str, float]:
        scores = self._rouge.score(reference, prediction)  # (target, prediction)
        return {name: float(s.fmeasure) for name, s in scores.items()}

    def content_words(self, text: str) -> set[str]:
        return {t for t in self._tokenizer.tokenize(text) if t not in self._stop}

    def label_recall(self, summary: str, label: str) -> float:
        """Share of the label's content words (stemmed) that the summary contains."""
        wanted = self.content_words(label)
        if not wanted:
            return 0.0
        return len(wanted & set(self._tokenizer.tokenize(summary))) / len(wanted)

    def coverage(self, summary: str, topics: Sequence[Topic]) -> dict[str, Any]:
        recalls = [self.label_recall(summary, t.label) for t in topics]
        covered = [r >= COVERAGE_THRESHOLD for r in recalls]
        return {
            "coverage": sum(covered) / len(topics) if topics else 0.0,
            "label_recall": statistics.fmean(recalls) if recalls else 0.0,
            "topics_covered": [t.label for t, c in zip(topics, covered, strict=True) if c],
            "topics": len(topics),
        }


def paired(better: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Mean difference and wins/ties/losses of ``better`` over ``baseline``, pair by pair."""
    diffs = [b - a for b, a in zip(better, baseline, strict=True)]
    return {
        "pairs": len(diffs),
        "mean_diff": statistics.fmean(diffs) if diffs else 0.0,
        "wins": sum(d > TIE for d in diffs),
        "ties": sum(abs(d) <= TIE for d in diffs),
        "losses": sum(d < -TIE for d in diffs),
    }
