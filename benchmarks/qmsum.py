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
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks._qmsum_harness import (
    EvalConfig,
    Features,
    Harness,
    _answer,
    _Pass,
    _variant_overrides,
    retrieval_recall,
)
from benchmarks._qmsum_meetings import Meeting, Scorer, load_meeting, select_files
from benchmarks._qmsum_report import _report
from benchmarks.common import DATA_DIR, bench_settings, output_path
from benchmarks.run import BenchResult

log = logging.getLogger(__name__)

QMSUM_DIR = DATA_DIR / "qmsum" / "val"
#: --quick answers the first N specific queries of each meeting (None: all, 19 over the 3
#: meetings; 9 queries could not tell two answerers 0.01 ROUGE-L apart, and with the
#: repetition penalty on generated tokens only an answer takes ~10 s, not ~20)
QUICK_QUERIES: int | None = None
VARIANTS = ("window", "sink", "memory")


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
