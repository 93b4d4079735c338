"""Meeting notes people can trust: faithfulness, recall and precision against hand labels, and
the time from the end of a meeting to its notes, per model preset.

For each preset and each labelled meeting (``benchmarks/data/notes_labels``: the demo meeting
and six QMSum val meetings; ``--quick``: the demo meeting and ES2006a) the real pipeline runs
in-process against a private ``redis-server`` with the default settings but the model: the
meeting is published (every turn an entry, ``ts`` its media time or its index), the processor
drains it, and the rolling updates and final notes are read back from the output stream.

* **Faithfulness**: every name, number, date and time the published notes state in the model's
  words (the final notes' summary, the items the model phrased, the rolling updates' prose) is
  looked up in the whole transcript (``workers.notes.facts``: "sixty one percent" supports
  "61%"); ``unsupported_share`` is the share not found (target <= 2%). Beside it,
  ``guard_dropped_share``: the share of the model's sentences the guard dropped or repaired
  before publishing (what the model invents, which readers never see), and a second,
  independent check (``naive_unsupported_share``): capitalised words and digits of the notes
  not found in the transcript's words.
* **Recall / precision** of decisions and action items against the labels: a label is found
  when a published item of its kind cites one of its turns; an item is right when it matches a
  label. Owners and due dates are compared where the label has one (owner: same person; due:
  the label's words in the item's due or text).
* **Time**: seconds from the end-of-stream entry being read to the final notes committed (the
  last batch), tokens/s of generation, peak RSS of the process.

``python -m benchmarks.run notes [--quick] --json PATH``; ``SINKSTREAM_BENCH_PRESETS`` names the
presets (comma-separated; default: the model setting), ``SINKSTREAM_BENCH_MEETINGS`` the
meetings (default: all labelled ones, ``--quick`` two).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import bench_settings
from benchmarks.notes_labels import (
    REPO_DIR,
    default_data_dir,
    label_names,
    load_labels,
    qmsum_dir,
)
from benchmarks.run import BenchResult

QUICK_MEETINGS = ("launch-review", "ES2006a")
#: threads for the model (the box has 2 cores)
THREADS = int(os.environ.get("SINKSTREAM_BENCH_THREADS", "2"))


@dataclass
class Run:
    """One meeting through the pipeline with one preset."""

    meeting: str
    final: str
    rolling: list[str]
    items: list[dict[str, Any]]
    entry_turns: dict[str, int]
    verdicts: list[Any]
    generated_tokens: int
    generate_s: float
    eos_to_notes_s: float
    wall_s: float
    transcript: list[str] = field(default_factory=list)
    #: the model wrote the summary (``notes_prose``); else it is the counted overview line
    prose: bool = False


class _Recorder:
    """Observer that records the guard's verdicts and the generation counts."""

    def __init__(self) -> None:
        from workers.processing.observer import NullObserver

        self._null = NullObserver()
        self.verdicts: list[Any] = []
        self.tokens = 0
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._null, name)

    def guarded(self, verdicts: Sequence[Any]) -> None:
        self.verdicts.extend(verdicts)

    def generated(self, kind: str, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds


def _turns(labels: dict[str, Any], data: Path) -> list[tuple[str, str | None, float]]:
    """(text, speaker, ts) of every turn the producer publishes (blank QMSum turns are skipped
    by the producer, as ``sinkstream publish`` does: ``_label_index`` maps them back)."""
    from producer.formats import read_file

    source = labels["source"]
    if source.startswith("qmsum/val/"):
        path = qmsum_dir(data) / source[len("qmsum/val/"):]
        return [(t.text, t.speaker, float(i)) for i, t in enumerate(read_file(path, "qmsum"))]
    return [(t.text, t.speaker, float(t.ts if t.ts is not None else i))
            for i, t in enumerate(read_file(REPO_DIR / source))]


def _label_index(labels: dict[str, Any], data: Path) -> list[int]:
    """For each published turn, its index in the label file's numbering."""
    import json

    source = labels["source"]
    if not source.startswith("qmsum/val/"):
        return list(range(len(_turns(labels, data))))
    doc = json.loads((qmsum_dir(data) / source[len("qmsum/val/"):]).read_text())
    return [i for i, t in enumerate(doc["meeting_transcripts"])
            if str(t.get("content", "")).strip()]


def run_meeting(preset: str, name: str, data: Path, workdir: Path,
                engines: dict[str, Any]) -> Run:
    from producer.publisher import Producer
    from sinkstream.cli.localredis import RedisServer
    from sinkstream.contracts.keys import StreamKeys
    from state_store.replies import as_text, text_fields
    from workers.engines.loading import load_engine
    from workers.processing.processor import StreamProcessor
    from workers.processing.summarizer import prose_on

    labels = load_labels(name)
    turns = _turns(labels, data)
    index = _label_index(labels, data)
    server = RedisServer(workdir / f"redis-{preset}-{name}").start()
    try:
        settings = bench_settings(redis_url=server.url, model=preset, metrics_port=0,
                                  torch_threads=THREADS)
        if preset not in engines:
            engines[preset] = load_engine(settings)
        recorder = _Recorder()
        client: Any = server.client()
        proc = StreamProcessor(engines[preset], client, settings, "notes-bench",
                               observer=recorder)
        Producer(client, settings=settings).publish_many(name, turns, eos=True)
        published = [as_text(e) for e, _ in client.xrange(StreamKeys.of(name).input)]
        if len(published) != len(turns) + 1:  # one entry per turn, then the end marker
            raise RuntimeError(f"{name}: {len(published)} entries for {len(turns)} turns")
        entry_turns = {e: index[i] for i, e in enumerate(published[:-1])}
        started = time.perf_counter()
        last_batch = 0.0
        while True:
            batch_started = time.perf_counter()
            outcome = proc.process(name)
            if outcome.status == "idle":
                break
            if outcome.status != "applied":
                raise RuntimeError(f"{name}: {outcome.status} {outcome.reason}")
            if any(s.kind.value == "final" for s in outcome.summaries):
                last_batch = time.perf_counter() - batch_started
        wall = time.perf_counter() - started
        outputs = [text_fields(f) for _, f in client.xrange(StreamKeys.of(name).output)]
        finals = [o for o in outputs if o.get("kind") == "final"]
        if not finals:
            raise RuntimeError(f"{name}: no final notes")
        import json

        items = json.loads(finals[-1].get("items", "[]") or "[]")
        return Run(name, finals[-1]["text"],
                   [o["text"] for o in outputs if o.get("kind") == "rolling"], items,
                   entry_turns, recorder.verdicts, recorder.tokens, recorder.seconds,
                   last_batch, wall, [f"{s}: {t}" if s else t for t, s, _ in turns],
                   prose_on(settings))
    finally:
        server.stop(hard=True)


# ----- scoring ------------------------------------------------------------------------------
def faithfulness(run: Run) -> dict[str, Any]:
    """Shares of the notes' model-written facts that the transcript does not support."""
    from workers.notes.facts import facts, normalise_numbers, words
    from workers.notes.guard import Support

    support = Support.of(run.transcript)
    written = _model_written(run)
    stated = [f for text in written for f in facts(text)]
    unsupported = [f for f in stated if not support.supports(f)]
    vocabulary = {w for line in run.transcript for w in words(normalise_numbers(line))}
    naive = [t for text in written for t in re.findall(r"\b(?:[A-Z][a-z]+|\d+(?:\.\d+)?)\b",
                                                      normalise_numbers(text))
             if t.lower() not in vocabulary and not _sentence_start(text, t)]
    naive_total = sum(len(re.findall(r"\b(?:[A-Z][a-z]+|\d+(?:\.\d+)?)\b",
                                     normalise_numbers(text))) for text in written)
    touched = [v for v in run.verdicts if v.action != "kept"]
    return {
        "facts": len(stated), "unsupported": len(unsupported),
        "unsupported_share": len(unsupported) / len(stated) if stated else 0.0,
        "unsupported_examples": [f.surface for f in unsupported[:5]],
        "naive_unsupported_share": len(naive) / naive_total if naive_total else 0.0,
        "guard_sentences": len(run.verdicts),
        "guard_dropped_or_repaired": len(touched),
        "guard_dropped_share": len(touched) / len(run.verdicts) if run.verdicts else 0.0,
    }


def _sentence_start(text: str, token: str) -> bool:
    return bool(re.search(rf"(?:^|[.!?:]\s+|\n-?\s*){re.escape(token)}\b", text))


def _model_written(run: Run) -> list[str]:
    """The parts of the notes the model wrote: summary prose, phrased items, rolling prose.
    (Without ``notes_prose`` the summary is the overview line counted from the items: its
    numbers are counts, true by construction, and not in the transcript.)"""
    out = []
    summary = re.search(r"## Summary\n(.*?)(?:\n\n## |\Z)", run.final, re.S)
    if summary and run.prose:
        out.append(summary.group(1))
    out += [i["text"] for i in run.items if not i.get("verbatim")]
    for text in run.rolling:
        so_far = re.search(r"## So far\n(.*)", text, re.S)
        if so_far:
            out.append(so_far.group(1))
    return out


def recall_precision(run: Run, labels: dict[str, Any], turn_of: dict[str, int]
                     ) -> dict[str, Any]:
    """Decision and action-item recall/precision; owner and due accuracy of found actions."""
    out: dict[str, Any] = {}
    turn_text = {turn: line for turn, line in zip(turn_of.values(), run.transcript, strict=False)}
    for kind, key in (("decision", "decisions"), ("action", "action_items"),
                      ("question", "open_questions")):
        items = [i for i in run.items if i["kind"] == kind]
        wanted = labels[key]
        found_labels, right_items = set(), set()
        owner_ok = due_ok = due_n = 0
        for li, label in enumerate(wanted):
            for ii, item in enumerate(items):
                cited = {turn_of.get(e) for e in item.get("entries", [])}
                if cited & set(label["turns"]):
                    found_labels.add(li)
                    right_items.add(ii)
            if kind == "action" and li in found_labels:
                match = _answering(items, label, turn_of, turn_text)
                if label.get("owner") in (None, "all") or match.get("owner") == label["owner"]:
                    owner_ok += 1
                if label.get("due"):
                    due_n += 1
                    said = " ".join([*match.get("due", []), match["text"]]).lower()
                    due_ok += any(w in said for w in _due_words(label["due"]))
        out[kind] = {
            "labels": len(wanted), "items": len(items),
            "recall": len(found_labels) / len(wanted) if wanted else None,
            "precision": len(right_items) / len(items) if items else None,
        }
        if kind == "action":
            out[kind]["owner_right"] = owner_ok / len(found_labels) if found_labels else None
            out[kind]["due_right"] = due_ok / due_n if due_n else None
    return out


def _answering(items: Sequence[dict[str, Any]], label: dict[str, Any],
               turn_of: dict[str, int], turn_text: dict[int, str]) -> dict[str, Any]:
    """The item that stands for ``label`` among those citing its turns: one citing the turn
    its evidence is said in, else the one sharing most turns with it, else the first. (A recap
    line is cited by every task it recaps, so "the first item citing any turn" often judged
    another task's owner.)"""
    wanted = set(label["turns"])
    evidence = " ".join(label.get("evidence", "").lower().split())
    said_in = {t for t in wanted if evidence and evidence in " ".join(
        turn_text.get(t, "").lower().split())}

    def rank(item: dict[str, Any]) -> tuple[bool, int]:
        cited = {turn_of.get(e) for e in item.get("entries", [])}
        return bool(cited & said_in), len(cited & wanted)

    citing = [i for i in items if rank(i)[1]]
    return max(citing, key=rank)  # max keeps the first of equals


def _due_words(due: str) -> list[str]:
    words = [w for w in re.findall(r"[a-z0-9']+", due.lower())
             if w not in {"by", "the", "on", "at", "before", "until", "this", "next"}]
    return words or [due.lower()]


# ----- the benchmark ------------------------------------------------------------------------
def presets() -> list[str]:
    from sinkstream.settings import load_settings

    named = os.environ.get("SINKSTREAM_BENCH_PRESETS")
    if named:
        return [p.strip() for p in named.split(",") if p.strip()]
    return [load_settings().model]


def run(quick: bool) -> BenchResult:
    data = default_data_dir()
    named = os.environ.get("SINKSTREAM_BENCH_MEETINGS")
    meetings = [m.strip() for m in named.split(",")] if named \
        else list(QUICK_MEETINGS) if quick else label_names()
    workdir = Path(tempfile.mkdtemp(prefix="sinkstream-notesbench-"))
    rows: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    try:
        for preset in presets():
            engines: dict[str, Any] = {}
            for name in meetings:
                labels = load_labels(name)
                run_ = run_meeting(preset, name, data, workdir, engines)
                turn_of = run_.entry_turns
                faith = faithfulness(run_)
                scores = recall_precision(run_, labels, turn_of)
                rows.append(_row(preset, name, run_, faith, scores))
                details[f"{preset}/{name}"] = {"faithfulness": faith, "scores": scores,
                                               "final": run_.final, "items": run_.items}
                print(f"{preset} {name}: {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = _summary(rows)
    return BenchResult(title="notes: faithfulness, recall and precision against hand labels",
                       rows=rows, summary=summary, extra={"details": details})


def _row(preset: str, name: str, run_: Run, faith: dict[str, Any],
         scores: dict[str, Any]) -> dict[str, Any]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "preset": preset, "meeting": name,
        "unsupported": faith["unsupported_share"],
        "guard drop": faith["guard_dropped_share"],
        "dec recall": scores["decision"]["recall"],
        "dec prec": scores["decision"]["precision"],
        "act recall": scores["action"]["recall"],
        "act prec": scores["action"]["precision"],
        "owner ok": scores["action"]["owner_right"],
        "due ok": scores["action"]["due_right"],
        "eos->notes s": run_.eos_to_notes_s,
        "gen tok/s": run_.generated_tokens / run_.generate_s if run_.generate_s else None,
        "wall s": run_.wall_s,
        "rss MiB": rss,
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"target_unsupported_share": 0.02, "target_demo_recall": 0.8}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        key = "".join(c if c.isalnum() else "_" for c in preset)

        def mean(col: str, rows_: list[dict[str, Any]] = mine) -> float | None:
            vals = [r[col] for r in rows_ if r[col] is not None]
            return sum(vals) / len(vals) if vals else None

        out[f"unsupported_share.{key}"] = mean("unsupported")
        out[f"guard_dropped_share.{key}"] = mean("guard drop")
        for col in ("dec recall", "dec prec", "act recall", "act prec", "eos->notes s"):
            out[f"{col.replace(' ', '_').replace('->', '_to_')}.{key}"] = mean(col)
        demo = [r for r in mine if r["meeting"] == "launch-review"]
        if demo:
            out[f"demo_decision_recall.{key}"] = demo[0]["dec recall"]
            out[f"demo_action_recall.{key}"] = demo[0]["act recall"]
    return out
