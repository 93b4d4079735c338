"""QMSum: what the streaming memory keeps of a real meeting, scored against human references.

Each QMSum validation meeting (``../shared/data/qmsum/val``) is streamed through the real
pipeline code, in this process: a private ``redis-server`` on a free port, the meeting's turns
published with speakers and an end-of-stream marker by the producer library, then
``StreamProcessor.process`` called batch after batch until the final summary is committed to
the stream's output stream. That is exactly what a worker does, minus Celery. On the same
meetings in the same run:

* (a) ``window``: ``sink_tokens=0`` (the recent window only, same cache size S+R), final
  summary only;
* (b) ``sink``: S attention sinks + R recent tokens, final summary only;
* (c) ``memory``: as (b), plus rolling summaries every ``summary_every_tokens`` with
  ``summary_memory`` on (each rolling and the final summary folds in the previous one), and
  evicted text kept in chunks for retrieval;
* (d) ``answers``: every specific query of the meeting answered from pass (c)'s committed
  stream twice, with ``retrieval`` on (evicted chunks retrieved) and ``retrieval="off"``
  (sink-only: the window alone), both without the summary memory so only retrieval differs.

(b) and (c) feed the same tokens into the same engine, and summaries never change the KV state
(they are generated from a copy), so their committed states are bit-identical; by default
(b)'s final summary is therefore generated from pass (c)'s committed final state by a processor
with (b)'s settings, exactly as (b)'s worker would at the end-of-stream entry, saving a whole
feeding pass. ``--separate-passes`` streams (b) on its own instead (the test checks that both
ways give the same text). With summary memory on, the processor ends batches at rolling-summary
boundaries, so no stretch of the meeting leaves the window before a summary has read it.

Every variant runs with ``notes_phrasing`` and ``notes_prose`` on (not the defaults): the model's
prose is what is scored, and the product's default notes publish none (items and a counted
summary line instead).

Scores (Google's ``rouge-score`` package, F1, Porter stemming): ROUGE-1/2/L of each final
summary against the meeting's "Summarize the whole meeting." reference, and of each answer
against its specific-query reference. ROUGE-L is the plain LCS over the whole text (the
``rougeL`` type, not ``rougeLsum``: the model's output has no reliable sentence breaks).

Coverage: QMSum lists the meeting's topics (``topic_list``: a label and the turn spans that
discuss it). A topic counts as *covered* by a summary when at least half of its label's content
words occur in the summary (ROUGE-1 recall of the label >= 0.5, same tokenizer and stemmer,
after dropping stopwords and generic meeting words such as "discussion" or "presentation").
Coverage is the share of the meeting's topics covered; ``label_recall`` is the unthresholded
mean recall, reported too. Labels are short, so this reads as "the summary names the topic".

Paired comparisons are over the same meetings (c vs b) and the same queries (d vs sink-only):
mean difference and wins / ties / losses (a tie is a difference under 0.0005).

Cost: SmolLM2-135M on a 2-core CPU feeds ~90 tokens/s and decodes ~5-10 tokens/s, and the
val set is ~430k tokens, so one pass over all 35 meetings takes over an hour. ``--quick`` runs
three short meetings at full length (``QUICK_MEETINGS``: the 3-5k-word range holds only AMI
meetings; these are from three different AMI series with 6-7 specific queries each); full mode
runs every meeting (``--limit N``, ``--meetings A,B`` to choose). ``--quick`` answers every
specific query of its meetings (``QUICK_QUERIES``; ``--max-queries N`` for fewer).
After each meeting the report so far is written to ``<json>.partial.json``. ``--model`` takes
any model spec the workers accept, to run the same evaluation with a larger model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import DATA_DIR, bench_settings, output_path
from benchmarks.run import BenchResult

log = logging.getLogger(__name__)

QMSUM_DIR = DATA_DIR / "qmsum" / "val"
#: short AMI meetings from three series (ES2006, TS3010, ES2009), 3.4k-4.8k words each
QUICK_MEETINGS = ("ES2006a", "TS3010b", "ES2009b")
#: --quick answers the first N specific queries of each meeting (None: all, 19 over the 3
#: meetings; 9 queries could not tell two answerers 0.01 ROUGE-L apart, and with the
#: repetition penalty on generated tokens only an answer takes ~10 s, not ~20)
QUICK_QUERIES: int | None = None
#: a paired difference smaller than this is a tie
TIE = 0.0005
#: a topic is covered when at least this share of its label's content words is in the summary
COVERAGE_THRESHOLD = 0.5
VARIANTS = ("window", "sink", "memory")
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


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


# ----- the pipeline, in-process ------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """What the memory features of this checkout provide (they may be missing)."""

    summary_memory: bool
    retrieval: bool

    @classmethod
    def detect(cls) -> Features:
        from sinkstream.settings import Settings
        from workers.processing.processor import StreamProcessor

        fields = Settings.model_fields
        return cls(summary_memory="summary_memory" in fields,
                   retrieval="retrieval" in fields and hasattr(StreamProcessor, "answer"))


@dataclass
class EvalConfig:
    """The run's knobs; the engine and batching settings are the same for every variant."""

    model: str = "smollm2"
    sink_tokens: int = 4
    recent_tokens: int = 1020
    summary_every_tokens: int = 512
    summary_max_new_tokens: int = 128
    max_batch_tokens: int = 2048
    retrieval: str = "embedding"
    separate_passes: bool = False  # stream (b) on its own instead of reusing (c)'s state
    #: only (d): stream each meeting once without summaries, then answer its queries
    answers_only: bool = False
    #: keep the streamed meetings in this folder's Redis dump and reuse them in later runs
    #: with the same model and window (answer prompts compared on the same states)
    states_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other Settings overrides

    def check(self) -> None:
        if not self.answers_only and not 0 < self.summary_every_tokens <= self.recent_tokens:
            raise ValueError("summary_every_tokens must be in 1..recent_tokens, so every "
                             "stretch of the meeting is summarized before it is evicted")
        if self.states_dir is not None and not self.answers_only:
            raise ValueError("--states keeps answer states only: use it with --answers-only "
                             "(a kept stream has no final summary to score)")
        if self.retrieval == "off":
            raise ValueError("retrieval must name a method (embedding, bm25) to compare with off")


@dataclass
class _Pass:
    final: str
    rolling: int
    tokens: int
    wall_s: float
    stream: str


def _variant_overrides(cfg: EvalConfig, variant: str, features: Features) -> dict[str, Any]:
    """Settings of one variant on top of the shared ones."""
    out: dict[str, Any] = {}
    if variant == "window":
        out = {"sink_tokens": 0, "recent_tokens": cfg.sink_tokens + cfg.recent_tokens,
               "summary_every_tokens": 0}
    elif variant == "sink":
        out = {"summary_every_tokens": 0}
    else:  # memory: rolling summaries folded into each other; evicted chunks kept for (d)
        out = {"summary_every_tokens": cfg.summary_every_tokens}
        if features.summary_memory:
            out["summary_memory"] = True
        if features.retrieval:
            out["retrieval"] = cfg.retrieval
    if variant != "memory":
        if features.summary_memory:
            out["summary_memory"] = False
        if features.retrieval:
            out["retrieval"] = "off"
    return out


class Harness:
    """A private redis-server, engines loaded once per engine-parameter set, and one
    StreamProcessor per settings variant, all in this process."""

    def __init__(self, cfg: EvalConfig, workdir: Path, features: Features) -> None:
        from sinkstream.cli.localredis import RedisServer

        self.cfg = cfg
        self.features = features
        self.server = RedisServer(cfg.states_dir or workdir / "redis").start()
        self.client = self.server.client()
        self.base = bench_settings(
            redis_url=self.server.url, model=cfg.model, sink_tokens=cfg.sink_tokens,
            recent_tokens=cfg.recent_tokens, max_batch_tokens=cfg.max_batch_tokens,
            summary_every_tokens=cfg.summary_every_tokens,
            summary_max_new_tokens=cfg.summary_max_new_tokens, metrics_port=0,
            # what the memory lets the model write is what this benchmark scores: the model's
            # prose, which the product publishes only with these (non-default) settings
            **{"notes_phrasing": True, "notes_prose": True, **cfg.extra},
        )
        self._engines: dict[tuple[int, int], Any] = {}
        self.load_s = 0.0

    def settings(self, **overrides: Any) -> Any:
        return bench_settings(**{**self.base.model_dump(), **overrides})

    def engine(self, settings: Any) -> Any:
        """One engine per (sink_tokens, recent_tokens): weights are loaded once for each."""
        from workers.engines.loading import load_engine

        key = (settings.sink_tokens, settings.recent_tokens)
        if key not in self._engines:
            started = time.perf_counter()
            self._engines[key] = load_engine(settings)
            self.load_s += time.perf_counter() - started
        return self._engines[key]

    def processor(self, settings: Any) -> Any:
        from workers.processing.processor import StreamProcessor

        return StreamProcessor(self.engine(settings), self.client, settings, "qmsum-bench")

    def stream(self, processor: Any, sid: str, turns: Sequence[Any],
               on_tokens: Callable[[int], None], eos: bool = True) -> _Pass:
        """Publish the meeting and drive the processor until its input is applied and, with
        ``eos``, the final summary is out. A stream kept from an earlier run
        (``states_dir``) is not published again."""
        from producer.publisher import Producer
        from sinkstream.contracts.keys import StreamKeys

        started = time.perf_counter()
        if self.cfg.states_dir is not None and self.client.exists(StreamKeys.of(sid).input):
            state, _ = processor.committed_state(sid)
            return _Pass(final="", rolling=0, tokens=state.tokens_seen, wall_s=0.0, stream=sid)
        Producer(self.client, settings=processor.settings).publish_many(sid, turns, eos=eos)
        tokens = 0
        while True:
            outcome = processor.process(sid)
            if outcome.status == "idle":
                break
            if outcome.status != "applied":
                raise RuntimeError(f"stream {sid}: {outcome.status} {outcome.reason}")
            tokens += outcome.tokens
            on_tokens(outcome.tokens)
        raw: Any = self.client.xrange(StreamKeys.of(sid).output)
        outputs = [_decode(f) for _, f in raw]
        finals = [o["text"] for o in outputs if o.get("kind") == "final"]
        if not eos:
            return _Pass(final="", rolling=0, tokens=tokens,
                         wall_s=time.perf_counter() - started, stream=sid)
        if not finals:
            raise RuntimeError(f"stream {sid}: ended without a final summary")
        return _Pass(final=finals[-1], rolling=sum(o.get("kind") == "rolling" for o in outputs),
                     tokens=tokens, wall_s=time.perf_counter() - started, stream=sid)

    def drop(self, sid: str) -> None:
        """Delete a finished stream's keys (a SmolLM2 state is ~47 MB), unless they are
        kept for later runs (``states_dir``)."""
        if self.cfg.states_dir is not None:
            return
        keys = list(self.client.scan_iter(match=f"*{{{sid}}}*", count=1000))
        if keys:
            self.client.delete(*keys)

    def close(self) -> None:
        if self.cfg.states_dir is not None:
            self.client.save()
        self.server.stop(hard=True)


def _decode(fields: dict[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes)
                                                          else v) for k, v in fields.items()}


def _answer(processor: Any, sid: str, question: str, features: Features) -> tuple[str, int]:
    """(answer text, number of cited sources) from the stream's committed state."""
    if features.retrieval:
        entry = processor.answer(sid, question)
        return entry.text, len(getattr(entry, "sources", None) or [])
    from sinkstream.contracts.outputs import SummaryKind
    from workers.processing.prompts import answer_instruction

    state, _ = processor.committed_state(sid)
    text = processor.summarizer.generate(
        state, processor.engine.summary_prompt(answer_instruction(question)),
        processor.settings.summary_max_new_tokens, SummaryKind.ANSWER)
    return text, 0


def retrieval_recall(processor: Any, sid: str, question: str,
                     spans: Sequence[tuple[int, int]]) -> dict[str, float] | None:
    """Did the retriever bring back the turns the reference answer rests on?

    Judges retrieval apart from the model that writes the answer: the candidates are the
    chunks that left the window, each holding a range of transcript turns (its ``ts``); a
    ranking scores 1 when one of its ``retrieval_top_k`` chunks holds a turn of the query's
    ``relevant_text_span``. Ranked by the embedding (with BM25 where chunks have none), by
    BM25 alone, and the expected score of as many chunks drawn at random. None when none of
    the relevant turns left the window (the window holds them: nothing to retrieve).
    """
    from workers.memory import retrieve
    from workers.memory.persistence import read_chunks

    state, _ = processor.committed_state(sid)
    chunks = retrieve.evicted(read_chunks(processor.client, sid), state.tokens_seen,
                              processor.engine.window_tokens())
    relevant = {t for a, b in spans for t in range(a, b + 1)}
    holding = [c for c in chunks if c.ts is not None
               and relevant & set(range(int(c.ts[0]), int(c.ts[1]) + 1))]
    if not holding:
        return None
    k = processor.settings.retrieval_top_k
    wanted = {c.seq for c in holding}

    def found(embedder: Any) -> float:
        hits = retrieve.rank(question, chunks, top_k=k, embedder=embedder)
        return float(any(hit.chunk.seq in wanted for hit in hits))

    n, m = len(chunks), len(holding)
    at_random = 1.0 - math.comb(n - m, min(k, n)) / math.comb(n, min(k, n))
    return {"embedding": found(processor.embedder), "bm25": found(None),
            "random": at_random, "candidates": n, "holding": m}


# ----- the evaluation ----------------------------------------------------------------------


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("qmsum tokens fed"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("feed", total=total)
        yield lambda n: bar.advance(task, n)


def _count_tokens(engine: Any, meeting: Meeting) -> int:
    from workers.processing.prompts import format_turn

    return len(engine.stream_prefix()) + sum(
        len(engine.tokenizer.encode(format_turn(t, s))) for t, s in meeting.turns)


def evaluate(meetings: Sequence[Meeting], cfg: EvalConfig, *, progress: bool = True,
             workdir: Path | None = None,
             on_meeting: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every variant on every meeting and score them; returns the JSON-able report."""
    cfg.check()
    features = Features.detect()
    scorer = Scorer()
    with tempfile.TemporaryDirectory(prefix="qmsum-bench-", dir=workdir) as tmp:
        harness = Harness(cfg, Path(tmp), features)
        try:
            return _evaluate(harness, scorer, meetings, progress, on_meeting)
        finally:
            harness.close()


def _evaluate(h: Harness, scorer: Scorer, meetings: Sequence[Meeting], progress: bool,
              on_meeting: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    cfg, features = h.cfg, h.features
    settings = {v: h.settings(**_variant_overrides(cfg, v, features)) for v in VARIANTS}
    first = h.engine(settings["sink"])
    variants = [v for v in VARIANTS if not (v == "window" and first.kind != "sinkkv")]
    processors = {v: h.processor(settings[v]) for v in variants}
    if cfg.answers_only:  # (d) alone: the memory pass without summaries, then the answers
        variants = []
        processors = {"memory": h.processor(h.settings(**{
            **_variant_overrides(cfg, "memory", features), "summary_every_tokens": 0}))}
    answer_settings: dict[str, dict[str, Any]] = {"retrieval": {}, "sink_only": {}}
    if features.summary_memory:
        answer_settings = {k: {"summary_memory": False} for k in answer_settings}
    if features.retrieval:
        answer_settings["retrieval"]["retrieval"] = cfg.retrieval
        answer_settings["sink_only"]["retrieval"] = "off"
    memory = _variant_overrides(cfg, "memory", features)
    answerers = {k: h.processor(h.settings(**{**memory, **o}))
                 for k, o in answer_settings.items()
                 if k == "sink_only" or features.retrieval}

    feeding = 1 if cfg.answers_only else len(variants) - (0 if cfg.separate_passes else 1)
    total = sum(_count_tokens(first, m) for m in meetings) * feeding
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    with _progress(total, progress) as advance:
        for index, meeting in enumerate(meetings):
            log.info("meeting %d/%d %s (%d words, %d queries), %.0f s so far", index + 1,
                     len(meetings), meeting.name, meeting.words, len(meeting.queries),
                     time.perf_counter() - started)
            results.append(_one_meeting(h, scorer, meeting, processors, answerers, advance))
            if on_meeting is not None:  # partial results survive a run stopped midway
                on_meeting(_report(results, cfg, features, h, variants,
                                   time.perf_counter() - started))
    wall_s = time.perf_counter() - started
    return _report(results, cfg, features, h, variants, wall_s)


def _one_meeting(h: Harness, scorer: Scorer, meeting: Meeting, processors: dict[str, Any],
                 answerers: dict[str, Any], advance: Callable[[int], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"meeting": meeting.name, "words": meeting.words,
                           "turns": len(meeting.turns), "reference": meeting.reference,
                           "variants": {}}
    if h.cfg.answers_only:
        sid = f"qmsum-memory-{meeting.name}"
        out["tokens"] = h.stream(processors["memory"], sid, meeting.published(), advance,
                                 eos=False).tokens
        out["answers"] = _answers(h, scorer, meeting, sid, answerers)
        h.drop(sid)
        return out
    order = [v for v in ("window", "memory", "sink") if v in processors]
    for variant in order:
        processor = processors[variant]
        sid = f"qmsum-{variant}-{meeting.name}"
        if variant == "sink" and not h.cfg.separate_passes:
            run = _final_from(processor, f"qmsum-memory-{meeting.name}")
        else:
            run = h.stream(processor, sid, meeting.published(), advance)
            out["tokens"] = run.tokens
        out["variants"][variant] = {
            "final": run.final, "rolling_summaries": run.rolling, "wall_s": run.wall_s,
            "from_stream": run.stream, **scorer.rouge(run.final, meeting.reference),
            **scorer.coverage(run.final, meeting.topics),
        }
        log.info("  %s: %d tokens, %d rolling summaries, %.0f s, ROUGE-L %.3f", variant,
                 run.tokens, run.rolling, run.wall_s, out["variants"][variant]["rougeL"])
        if variant == "memory":
            out["answers"] = _answers(h, scorer, meeting, sid, answerers)
    for variant in order:
        h.drop(f"qmsum-{variant}-{meeting.name}")
    return out


def _final_from(processor: Any, sid: str) -> _Pass:
    """The final notes a worker with ``processor``'s settings writes at the end-of-stream
    entry, generated from ``sid``'s committed final state (same engine, same tokens)."""
    started = time.perf_counter()
    state, _ = processor.committed_state(sid)
    text = processor.final_now(sid).text
    return _Pass(final=text, rolling=0, tokens=state.tokens_seen,
                 wall_s=time.perf_counter() - started, stream=sid)


def _answers(h: Harness, scorer: Scorer, meeting: Meeting, sid: str,
             answerers: dict[str, Any]) -> list[dict[str, Any]]:
    """Each specific query answered from the same committed stream by each answerer."""
    out = []
    started = time.perf_counter()
    for index, (query, reference) in enumerate(meeting.queries):
        row: dict[str, Any] = {"query": query, "reference": reference}
        for name, processor in answerers.items():
            text, sources = _answer(processor, sid, query, h.features)
            row[name] = {"text": text, "sources": sources, **scorer.rouge(text, reference)}
        if "retrieval" in answerers and index < len(meeting.spans) and meeting.indexes:
            row["recall"] = retrieval_recall(answerers["retrieval"], sid, query,
                                             meeting.spans[index])
        out.append(row)
    log.info("  answers: %d queries x %d, %.0f s", len(out), len(answerers),
             time.perf_counter() - started)
    return out


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


# ----- entry points ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m benchmarks.run qmsum`` beyond --quick and --json."""
    parser.add_argument("--model", help="model spec (default: SINKSTREAM_MODEL or smollm2)")
    parser.add_argument("--limit", type=int, help="only the first N meetings of the run")
    parser.add_argument("--meetings", help="comma-separated meeting names, e.g. ES2006a,Bed002")
    parser.add_argument("--retrieval", default=None,
                        help="retrieval method compared with off (default: the settings' own "
                        "when not off, else embedding)")
    parser.add_argument("--summary-every", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="summary_max_new_tokens (default: the settings')")
    parser.add_argument("--max-turns", type=int, help="cut each meeting after N turns (smoke "
                        "tests; scores then compare a prefix with whole-meeting references)")
    parser.add_argument("--max-queries", type=int, help="answer only the first N queries")
    parser.add_argument("--separate-passes", action="store_true",
                        help="stream (b) on its own instead of reusing pass (c)'s state")
    parser.add_argument("--answers-only", action="store_true",
                        help="only (d): stream each meeting once without summaries, then "
                        "answer its queries with and without retrieval")
    parser.add_argument("--states", type=Path, help="keep the streamed meetings in this "
                        "folder's Redis dump and reuse them in later runs (same model and "
                        "window): compare answer prompts without re-feeding")
    parser.add_argument("--data", type=Path, default=QMSUM_DIR, help="QMSum val folder")
    parser.add_argument("--partial", type=Path, help="where the report so far goes after each "
                        "meeting (default: next to --json, <name>.partial.json)")


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(quick: bool, options: argparse.Namespace | None = None) -> BenchResult:
    if options is None:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        options = parser.parse_args([])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    env = bench_settings()
    default_retrieval = getattr(env, "retrieval", "off")
    cfg = EvalConfig(
        model=options.model or env.model, sink_tokens=env.sink_tokens,
        recent_tokens=env.recent_tokens, summary_every_tokens=options.summary_every,
        summary_max_new_tokens=options.max_new_tokens or env.summary_max_new_tokens,
        retrieval=options.retrieval or (default_retrieval if default_retrieval != "off"
                                        else "embedding"),
        max_batch_tokens=env.max_batch_tokens, separate_passes=options.separate_passes,
        answers_only=options.answers_only, states_dir=options.states,
    )
    names = [n.strip() for n in (options.meetings or "").split(",") if n.strip()]
    files = select_files(options.data, quick=quick, limit=options.limit, names=names)
    max_queries = options.max_queries or (QUICK_QUERIES if quick else None)
    meetings = [load_meeting(f, options.max_turns, max_queries) for f in files]
    partial = options.partial or output_path("qmsum", quick, ".partial.json")

    def save(report: dict[str, Any]) -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(report, indent=2, default=str))

    import torch

    threads = torch.get_num_threads()
    handler = signal.signal(signal.SIGTERM, _raise_exit)  # clean up redis-server when stopped
    # one thread unless told (SINKSTREAM_BENCH_THREADS): on a shared 2-core box two threads
    # spin-wait on each other and cost several times the CPU seconds of one
    torch.set_num_threads(max(1, int(os.environ.get("SINKSTREAM_BENCH_THREADS", "1"))))
    try:
        report = evaluate(meetings, cfg, on_meeting=save)
        report["torch_threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, handler)
    return BenchResult(
        title=f"QMSum val, {len(meetings)} meetings, {report['model']}: final-summary ROUGE-L "
              f"and topic coverage per variant, answer ROUGE-L",
        rows=report["rows"], summary=report["summary"],
        extra={k: v for k, v in report.items() if k not in ("rows", "summary")},
    )
