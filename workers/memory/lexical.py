"""BM25 scoring of chunks for a question: the retrieval that needs no model.

Used when ``retrieval = "bm25"``, when the embedding package is missing, and for chunks stored
without an embedding. The index is built per question over the (bounded) evicted chunks of
one stream: a few milliseconds for a thousand chunks, and nothing to keep consistent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-case words without English stop words (what BM25 matches on)."""
    from bm25s.stopwords import STOPWORDS_EN

    stop = set(STOPWORDS_EN)
    return [w for w in _WORD.findall(text.lower()) if w not in stop]


def bm25_scores(question: str, texts: Sequence[str]) -> list[float]:
    """BM25 score of each text for ``question`` (0 = no word in common)."""
    if not texts:
        return []
    import bm25s  # lazily: only workers that answer questions need it

    corpus = [words(t) for t in texts]
    query = words(question)
    if not query or not any(corpus):
        return [0.0] * len(texts)
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    known = [w for w in query if w in retriever.vocab_dict]
    if not known:
        return [0.0] * len(texts)
    return [float(s) for s in retriever.get_scores(known)]
