"""The QMSum benchmark's pipeline, in-process: which memory features this checkout has, the
run's knobs and each variant's settings, a private redis-server with one StreamProcessor per
settings variant that streams a meeting until its final summary, and answers to queries with
the retriever's recall of the turns they rest on.

``benchmarks/qmsum.py`` describes the benchmark.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import bench_settings


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
    return {"embedding": found(processor.answers.embedder), "bm25": found(None),
            "random": at_random, "candidates": n, "holding": m}
