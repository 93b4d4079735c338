"""Log streams: template grouping accuracy through the real batch steps vs raw Drain3, and
lines/s through the pipeline vs Drain3 alone in-process.

For every system folder of the data (``--data DIR``, default ``../shared/data/loghub``; any
folder in the layout ``SYSTEM/SYSTEM_2k.log_structured.csv`` with ``Content`` and ``EventId``
columns works):

1. **Raw Drain3**: ``drain3.TemplateMiner()`` at its defaults (0.9.11: no masking, sim 0.4,
   depth 4) mines the ``Content`` column in this process; its cluster ids are its groups. Timed
   alone: the in-process baseline of the throughput ratio.
2. **Pipeline**: a private ``redis-server``; the lines are published beforehand as a backlog
   with the producer (``Producer.set_kind(stream, "log")``, each line a JSON log record
   ``{"message": Content, "level": Level}``), then a ``StreamProcessor`` (the worker's batch
   steps: claim, read, parse, mine, feed, fenced commit, release; the tiny seeded Llama as the
   model) works the stream until it is caught up. By default ``log_feed = "none"`` and no
   narrative (``--feed templates`` and ``--narrative`` turn the model's share on): what is
   timed is parsing, mining, counting and the fenced commits; the rolling log notes (every
   ``log_notes_every_lines``) are still rendered and committed. The groups are the template
   ids of each committed batch's lines (``LogUpdate.assignments``, recorded after the commit
   succeeded).
3. **Grouping accuracy** (LogPAI's definition): a line counts when the lines of its predicted
   group are exactly the lines of its true ``EventId``.

Summary keys: ``grouping_accuracy_mean``, ``grouping_accuracy.<SYSTEM>``,
``drain3_accuracy_mean``, ``drain3_accuracy.<SYSTEM>``, ``systems_below_drain3``,
``pipeline_lines_per_s``, ``drain3_lines_per_s``, ``throughput_ratio`` (pipeline / Drain3 alone,
summed over systems), ``miner_lines_per_s`` and ``throughput_ratio_vs_our_miner`` (our
masking + miner alone in-process: what the pipeline adds on top of mining),
``read_decode_lines_per_s`` (reading the lines back from Redis in worker-sized batches and
decoding their JSON, nothing else) and ``throughput_ratio_ceiling`` (Drain3 alone / that
floor: the best ``throughput_ratio`` any Python worker could reach before it mines a line), and
``throughput_ratio_bound`` (Drain3 alone / (that floor + the faster of the two miners): the
best ratio of a worker that reads the lines, decodes them and mines them, and does nothing
else: no parsing of levels and times, no counts, no commit).

4. **A grown stream** (``--grown N``, default 4,000, below the miner's bound of 5,000 so the
   LogHub lines still make their own templates; 1,000 with ``--quick``): a log stream first
   mines N synthetic templates (seeded, worked untimed), then the same LogHub lines as above
   are published onto it and timed, next to the same lines on a fresh stream in the same run.
   What a long-lived stream pays per batch for the size of its miner and table:
   ``grown_lines_per_s``, ``fresh_lines_per_s``, ``grown_slowdown`` (fresh / grown), and the
   bytes Redis received and sent per batch on each (``INFO stats``:
   ``grown_in_bytes_per_batch``, ``grown_out_bytes_per_batch``, ``fresh_...``).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import DATA_DIR
from benchmarks.run import BenchResult

#: the tiny seeded model: the benchmark measures mining and the pipeline, not a model
MODEL = "tiny-llama"
STREAM_PREFIX = "logbench-"


@dataclass(frozen=True)
class System:
    name: str
    contents: list[str]
    truth: list[str]
    levels: list[str]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=DATA_DIR / "loghub",
                        help="folder of SYSTEM/SYSTEM_2k.log_structured.csv (default: loghub)")
    parser.add_argument("--feed", choices=("templates", "none"), default="none",
                        help="the worker's log_feed: what a log stream feeds the model")
    parser.add_argument("--narrative", action="store_true",
                        help="let the log notes' narrative run the model (notes_prose)")
    parser.add_argument("--grown", type=int, default=None, metavar="N",
                        help="templates the grown stream mines first (default 4,000; 1,000 "
                             "with --quick; 0 skips it)")


def load_systems(folder: Path, limit: int | None = None) -> list[System]:
    """Every ``SYSTEM/SYSTEM*_structured.csv`` under ``folder``, sorted by name."""
    systems = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(sub.glob("*_structured.csv"))
        if not files:
            continue
        with files[0].open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))[:limit]
        systems.append(System(sub.name, [r["Content"] for r in rows],
                              [r["EventId"] for r in rows], [r.get("Level", "") for r in rows]))
    if not systems:
        raise FileNotFoundError(f"no SYSTEM/*_structured.csv under {folder}")
    return systems


def grouping_accuracy(predicted: Sequence[Hashable], truth: Sequence[Hashable]) -> float:
    """Share of lines whose predicted group holds exactly the lines of their true group."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} lines")
    by_pred: dict[Hashable, set[int]] = defaultdict(set)
    by_true: dict[Hashable, set[int]] = defaultdict(set)
    for index, (p, t) in enumerate(zip(predicted, truth, strict=True)):
        by_pred[p].add(index)
        by_true[t].add(index)
    good = sum(1 for p, t in zip(predicted, truth, strict=True) if by_pred[p] == by_true[t])
    return good / len(truth) if truth else 1.0


def raw_drain3(contents: Sequence[str]) -> tuple[list[int], float]:
    """Drain3 0.9.11 at its defaults: cluster id per line, and the seconds it took."""
    from drain3 import TemplateMiner
    from drain3.template_miner_config import TemplateMinerConfig

    miner = TemplateMiner(config=TemplateMinerConfig())
    started = time.perf_counter()
    ids = [miner.add_log_message(line)["cluster_id"] for line in contents]
    return ids, time.perf_counter() - started


def our_miner(contents: Sequence[str]) -> tuple[list[int], float]:
    """Our miner alone, in process (masking + Drain), for scale; with a masker of its own,
    so the tokens the pipeline masked before do not make it look faster."""
    from workers.logs.masking import Masker
    from workers.logs.mining import Miner

    miner = Miner()
    miner.masker = Masker(miner.config.masking)
    started = time.perf_counter()
    ids = [miner.add(line).template_id for line in contents]
    return ids, time.perf_counter() - started


def json_line(content: str, level: str) -> str:
    record: dict[str, str] = {"message": content}
    if level:
        record["level"] = level
    return json.dumps(record, ensure_ascii=False)


class Pipeline:
    """A private Redis and one worker's batch steps, recording each committed line's group."""

    def __init__(self, workdir: Path, feed: str = "none", narrative: bool = False) -> None:
        from sinkstream.cli.localredis import RedisServer

        self.feed, self.narrative = feed, narrative
        self.server = RedisServer(workdir / "redis").start()
        self.assignments: dict[str, int] = {}
        self._processor: Any = None

    def processor(self) -> Any:
        if self._processor is None:
            self._processor = _recording_processor(self.server.url, self.assignments,
                                                   log_feed=self.feed,
                                                   notes_phrasing=self.narrative,
                                                   notes_prose=self.narrative)
            # as a worker does once its model is loaded (workers/tasks.py): torch's and the
            # model's objects out of the collector's sight. Unfrozen, a full collection walks
            # ~400k of them a few times a second while templates are being created (the grown
            # stream's warm-up ran at half speed, and by chance more or less of it).
            gc.collect()
            gc.freeze()
        return self._processor

    def publish(self, stream: str, system: System) -> None:
        from producer.publisher import Producer

        producer = Producer(self.server.client(), settings=self.processor().settings,
                            mark_runnable=False)
        producer.set_kind(stream, "log")
        producer.publish_many(stream, [json_line(c, lv) for c, lv in
                                       zip(system.contents, system.levels, strict=True)])

    def run(self, stream: str) -> tuple[list[int], float]:
        """Work ``stream`` until caught up: each line's template id in order, and seconds."""
        from sinkstream.contracts.keys import StreamKeys

        proc = self.processor()
        raw: Any = self.server.client().xrange(StreamKeys.of(stream).input)
        ids = [entry_id.decode() for entry_id, _ in raw]
        started = time.perf_counter()
        while True:
            outcome = proc.process(stream, time_slice_s=60.0)
            if outcome.status != "applied" or not outcome.more:
                break
        seconds = time.perf_counter() - started
        return [self.assignments[i] for i in ids], seconds

    def read_floor(self, stream: str, lines: int) -> float:
        """Seconds to read ``stream``'s lines back in batches, as the worker does, and decode
        each JSON record, and nothing else: what no pipeline in Python goes below."""
        from sinkstream.contracts.entries import TEXT
        from sinkstream.contracts.keys import StreamKeys

        client: Any = self.server.client()
        key = StreamKeys.of(stream).input
        size = self.processor().settings.max_batch_entries
        started = time.perf_counter()
        after, read = "-", 0
        while batch := client.xrange(key, min=after, count=size):
            for _, fields in batch:
                json.loads(fields[TEXT.encode()])
            after = "(" + batch[-1][0].decode()
            read += len(batch)
        seconds = time.perf_counter() - started
        if read != lines:
            raise RuntimeError(f"{stream}: read {read} lines back, published {lines}")
        return seconds

    @property
    def batches(self) -> int:
        """Log batches committed so far."""
        return int(self.processor().batches)

    def net_bytes(self) -> tuple[int, int]:
        """Bytes Redis has received and sent so far (``INFO stats``)."""
        info: Any = self.server.client().info("stats")
        return int(info["total_net_input_bytes"]), int(info["total_net_output_bytes"])

    def close(self) -> None:
        self.server.stop(hard=True)


def synthetic_templates(count: int, seed: int = 0) -> list[str]:
    """``count`` lines of distinct templates shaped like service logs: a component, a verb,
    an object, then 1-7 more words, all letters (nothing a mask takes for a variable), so
    Drain's tree spreads them as it spreads real templates."""
    import random

    rng = random.Random(seed)

    def words(n: int) -> list[str]:
        return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9)))
                for _ in range(n)]

    components, verbs, objects, tail = words(40), words(40), words(60), words(2000)
    seen: set[tuple[str, ...]] = set()
    lines: list[str] = []
    while len(lines) < count:
        line = (rng.choice(components), rng.choice(verbs), rng.choice(objects),
                *rng.sample(tail, rng.randint(1, 7)))
        if line not in seen:
            seen.add(line)
            lines.append(" ".join(line))
    return lines


def grown(pipeline: Pipeline, systems: Sequence[System], templates: int) -> dict[str, Any]:
    """The systems' lines timed on a stream grown to ``templates`` templates first, and on a
    fresh one, in one run (see the module docstring, 4.)."""
    lines = System("all", [c for s in systems for c in s.contents], [],
                   [lv for s in systems for lv in s.levels])
    grown_stream, fresh_stream = STREAM_PREFIX + "grown", STREAM_PREFIX + "fresh"
    warm = synthetic_templates(templates)
    pipeline.publish(grown_stream, System("warm", warm, [], [""] * len(warm)))
    _, warm_s = pipeline.run(grown_stream)
    grown_templates = len(pipeline.processor().logs_templates(grown_stream))
    out: dict[str, Any] = {"grown_templates": grown_templates,
                           "grown_warmup_lines_per_s": round(len(warm) / warm_s)}
    for name, stream in (("fresh", fresh_stream), ("grown", grown_stream)):
        pipeline.publish(stream, lines)
        before = pipeline.net_bytes()
        batches_before = pipeline.batches
        _, seconds = pipeline.run(stream)
        after = pipeline.net_bytes()
        batches = max(1, pipeline.batches - batches_before)
        out[f"{name}_lines_per_s"] = round(len(lines.contents) / seconds)
        out[f"{name}_in_bytes_per_batch"] = round((after[0] - before[0]) / batches)
        out[f"{name}_out_bytes_per_batch"] = round((after[1] - before[1]) / batches)
    out["grown_slowdown"] = round(out["fresh_lines_per_s"] / out["grown_lines_per_s"], 2)
    return out


def _recording_processor(redis_url: str, assignments: dict[str, int], **overrides: Any) -> Any:
    """A StreamProcessor whose committed batches' line groups land in ``assignments``."""
    from benchmarks.common import bench_settings
    from state_store.connection import redis_from_settings
    from workers.engines.loading import load_engine
    from workers.processing.processor import StreamProcessor

    settings = bench_settings(model=MODEL, redis_url=redis_url, metrics_port=0,
                              summary_every_tokens=0, retrieval="off", **overrides)

    class Recording(StreamProcessor):
        batches = 0

        def finish(self, claim: Any, prepared: Any, new_state: Any, feed_s: float) -> Any:
            outcome = super().finish(claim, prepared, new_state, feed_s)
            if outcome.status == "applied" and prepared.logs is not None:
                assignments.update(prepared.logs.assignments)
                Recording.batches += 1
            return outcome

        def logs_templates(self, stream: str) -> dict[int, str]:
            from workers.logs import head as logs_head

            miner, _ = logs_head.read(self.client, stream).load(self.logs.mining,
                                                                self.logs.bursts)
            return miner.templates

    engine = load_engine(settings)
    return Recording(engine, redis_from_settings(settings), settings, "logbench")


def run(quick: bool, options: argparse.Namespace | None = None) -> BenchResult:
    folder = options.data if options is not None else DATA_DIR / "loghub"
    feed = options.feed if options is not None else "none"
    narrative = bool(options.narrative) if options is not None else False
    grow = options.grown if options is not None and options.grown is not None else \
        (1000 if quick else 4000)
    systems = load_systems(Path(folder), limit=1000 if quick else None)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    totals = {"lines": 0, "pipe_s": 0.0, "drain_s": 0.0, "ours_s": 0.0, "floor_s": 0.0}
    with tempfile.TemporaryDirectory(prefix="logbench-") as tmp:
        pipeline = Pipeline(Path(tmp), feed, narrative)
        try:
            for system in systems:
                stream = STREAM_PREFIX + system.name.lower()
                pipeline.publish(stream, system)
                raw_ids, raw_s = raw_drain3(system.contents)
                floor_s = pipeline.read_floor(stream, len(system.contents))  # before it's trimmed
                pipe_ids, pipe_s = pipeline.run(stream)
                _, ours_s = our_miner(system.contents)
                ours = grouping_accuracy(pipe_ids, system.truth)
                raw = grouping_accuracy(raw_ids, system.truth)
                n = len(system.contents)
                rows.append({"system": system.name, "lines": n, "accuracy": round(ours, 3),
                             "drain3": round(raw, 3), "templates": len(set(pipe_ids)),
                             "true": len(set(system.truth)),
                             "pipeline lines/s": round(n / pipe_s),
                             "drain3 lines/s": round(n / raw_s)})
                summary[f"grouping_accuracy.{system.name}"] = round(ours, 4)
                summary[f"drain3_accuracy.{system.name}"] = round(raw, 4)
                totals["lines"] += n
                totals["pipe_s"] += pipe_s
                totals["drain_s"] += raw_s
                totals["ours_s"] += ours_s
                totals["floor_s"] += floor_s
            at_scale = grown(pipeline, systems, grow) if grow > 0 else {}
        finally:
            pipeline.close()
    accs = [summary[f"grouping_accuracy.{s.name}"] for s in systems]
    raws = [summary[f"drain3_accuracy.{s.name}"] for s in systems]
    summary = {
        "grouping_accuracy_mean": round(sum(accs) / len(accs), 4),
        "drain3_accuracy_mean": round(sum(raws) / len(raws), 4),
        "systems_below_drain3": [s.name for s, a, r in zip(systems, accs, raws, strict=True)
                                 if a < r],
        "pipeline_lines_per_s": round(totals["lines"] / totals["pipe_s"]),
        "drain3_lines_per_s": round(totals["lines"] / totals["drain_s"]),
        "miner_lines_per_s": round(totals["lines"] / totals["ours_s"]),
        "throughput_ratio": round(totals["drain_s"] / totals["pipe_s"], 3),
        "throughput_ratio_vs_our_miner": round(totals["ours_s"] / totals["pipe_s"], 3),
        "read_decode_lines_per_s": round(totals["lines"] / totals["floor_s"]),
        "throughput_ratio_ceiling": round(totals["drain_s"] / totals["floor_s"], 3),
        "throughput_ratio_bound": round(
            totals["drain_s"] / (totals["floor_s"] + min(totals["ours_s"], totals["drain_s"])),
            3),
        **at_scale,
        **summary,
    }
    return BenchResult("log template grouping: pipeline vs raw Drain3 0.9.11 (defaults)", rows,
                       summary, extra={"data": str(folder), "model": MODEL, "log_feed": feed,
                                       "narrative": narrative})
