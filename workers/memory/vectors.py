"""Embeddings of closed retrieval chunks, written after the commit that closed them.

A batch commits its chunks without embeddings (embedding them inline cost ~200 ms per batch on
CPU, on the feed path); the worker's vectorizer embeds them right after, in batches, and an
answer embeds whatever it still finds missing. Either way a vector lands in ``vec:<seq>`` next
to ``chunk:<seq>`` through one script that writes it only while the chunk is still there and
has no vector yet: a chunk trimmed meanwhile gets none (no orphan field), and two writers (a
vectorizer and an answer, or a worker and the one that took its stream over) write it once.
A chunk's text is fixed by its sequence number (replays rewrite the same chunk), so any
writer's vector is the right one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.scripts import MEMORY_VECTORS, run_script_each
from workers.memory.embedder import Embedder
from workers.memory.records import (
    Chunk,
    ChunkVector,
    MemoryRecordError,
    chunk_field,
    vector_field,
)

log = logging.getLogger(__name__)


def read_texts(client: redis.Redis, stream_id: str, seqs: Sequence[int]) -> dict[int, str]:
    """The texts of the chunks ``seqs`` that exist and have no vector yet (one round trip)."""
    if not seqs:
        return {}
    names = [name for seq in seqs for name in (chunk_field(seq), vector_field(seq))]
    values: Any = client.hmget(StreamKeys.of(stream_id).memory, names)
    texts: dict[int, str] = {}
    for i, seq in enumerate(seqs):
        chunk, vector = values[2 * i], values[2 * i + 1]
        if chunk is None or vector is not None:
            continue
        try:
            texts[seq] = Chunk.decode(chunk).text
        except (MemoryRecordError, ValueError, KeyError, TypeError) as exc:
            log.warning("stream %s: chunk %d unreadable (%s); not embedded", stream_id, seq, exc)
    return texts


def embed(embedder: Embedder, texts: Mapping[int, str]) -> dict[int, ChunkVector]:
    """One vector per text, in one batched forward of the embedding model."""
    seqs = list(texts)
    vectors = embedder.embed_bytes([texts[s] for s in seqs])
    return {s: ChunkVector(embedder.name, v) for s, v in zip(seqs, vectors, strict=True)}


def store(client: redis.Redis, vectors: Mapping[str, Mapping[int, ChunkVector]]) -> int:
    """Write ``{stream id: {seq: vector}}``, each only beside its chunk and only once; one
    pipelined script per stream. Returns how many vectors were written."""
    calls = []
    for stream_id, by_seq in vectors.items():
        args: list[Any] = []
        for seq, vector in by_seq.items():
            args += [chunk_field(seq), vector_field(seq), vector.encode()]
        if args:
            calls.append(((StreamKeys.of(stream_id).memory,), args))
    written = 0
    for reply in run_script_each(client, MEMORY_VECTORS, calls):
        if isinstance(reply, redis.ConnectionError | redis.TimeoutError):
            raise reply
        if isinstance(reply, Exception):
            log.warning("memory vectors not written: %s", reply)
            continue
        written += int(reply)
    return written
