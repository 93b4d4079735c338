"""Reading a stream's memory hash, and planning what one batch writes to it.

Writes are never sent from here: ``plan_write`` returns the fields to set and delete, and the
processor passes them to ``StateStore.commit`` as a ``HashUpdate``, so memory changes commit
with the batch, exactly once, and a fenced-out worker writes nothing. The plan depends only on
the previous memory and the batch's entries, so a replayed batch writes the same fields.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import redis

from sinkstream.contracts.keys import StreamKeys
from state_store.replies import as_text
from workers.memory.chunks import extend_chunks
from workers.memory.highlights import Moment
from workers.memory.lines import TranscriptLine
from workers.memory.records import (
    CHUNK_PREFIX,
    FIRST_FIELD,
    HEAD_FIELDS,
    MOMENTS_FIELD,
    NEXT_FIELD,
    OPEN_FIELD,
    SUMMARY_FIELD,
    VECTOR_PREFIX,
    WINDOW_FIELD,
    Chunk,
    ChunkVector,
    MemoryHead,
    MemoryRecordError,
    MemoryWrite,
    SummaryMemory,
    chunk_field,
    encode_moments,
    encode_window,
    field_seq,
    vector_field,
)

log = logging.getLogger(__name__)


def read_head(client: redis.Redis, stream_id: str) -> MemoryHead:
    """The summary memory, open chunk and counters (one HMGET; the chunks stay in Redis)."""
    pipe = client.pipeline(transaction=False)
    request_head(pipe, stream_id)
    return parse_head(stream_id, pipe.execute()[0])


def request_head(pipe: redis.client.Pipeline, stream_id: str) -> None:
    """Queue the head's HMGET on ``pipe`` (to share a round trip with the batch's XRANGE)."""
    pipe.hmget(StreamKeys.of(stream_id).memory, list(HEAD_FIELDS))


def parse_head(stream_id: str, values: Any) -> MemoryHead:
    """The head from its HMGET reply."""
    try:
        return MemoryHead.from_fields(list(values))
    except (MemoryRecordError, ValueError, KeyError, TypeError) as exc:
        # memory is an aid, not the state: start it afresh rather than park the stream
        log.warning("stream %s: memory head unreadable (%s); starting it afresh", stream_id, exc)
        return MemoryHead()


def read_chunks(client: redis.Redis, stream_id: str) -> list[Chunk]:
    """Every stored closed chunk with its embedding when it has one yet, oldest first
    (unreadable records are skipped).

    One HGETALL: the hash is bounded by ``memory_max_chunks`` (~1.6 MB at the defaults), and
    the least-privilege worker user (``deploy/redis/acl.conf``) has HGETALL, not HSCAN.
    """
    chunks: list[Chunk] = []
    vectors: dict[int, ChunkVector] = {}
    fields: Any = client.hgetall(StreamKeys.of(stream_id).memory)
    for raw_name, value in fields.items():
        name = as_text(raw_name, "replace")
        try:
            if name.startswith(CHUNK_PREFIX):
                chunks.append(Chunk.decode(value))
            elif name.startswith(VECTOR_PREFIX):
                vectors[field_seq(name)] = ChunkVector.decode(value)
        except (MemoryRecordError, ValueError, KeyError, TypeError) as exc:
            log.warning("stream %s: skipping memory record %r (%s)", stream_id, name, exc)
    chunks = [_with_vector(c, vectors.get(c.seq)) for c in chunks]
    chunks.sort(key=lambda c: c.seq)
    return chunks


def _with_vector(chunk: Chunk, vector: ChunkVector | None) -> Chunk:
    if vector is None or chunk.embedding:
        return chunk  # none yet, or a chunk written with its embedding (before 0.2)
    return replace(chunk, embedding=vector.embedding, embed_model=vector.model)


def plan_write(
    head: MemoryHead, turns: Sequence[TranscriptLine], *, chunk_tokens: int | None,
    max_chunks: int, summary: SummaryMemory | None, moments: Sequence[Moment] | None = None,
    horizon: int | None = None,
) -> MemoryWrite:
    """The memory fields one batch sets and deletes.

    ``chunk_tokens`` None keeps no chunks (retrieval off); ``summary`` replaces the summary
    memory when the batch produced one. Beyond ``max_chunks`` the oldest chunks are deleted,
    with their embeddings. Closed chunks are written without an embedding and kept in the
    ``window`` list until they leave the model's window (``end <= horizon``, the stream's
    tokens after the batch minus the window; ``horizon`` None: no window, at once); then
    ``evicted`` lists them for the vectorizer: only text that left the window can be
    retrieved, so only it is embedded.
    """
    write = MemoryWrite()
    if summary is not None:
        write.set[SUMMARY_FIELD] = summary.encode()
    if moments is not None and list(moments) != head.moments:
        write.set[MOMENTS_FIELD] = encode_moments(moments)
    if chunk_tokens is None:
        return write
    closed, still_open = extend_chunks(head.open, turns, chunk_tokens)
    if still_open != head.open:
        if still_open is None:
            write.delete.append(OPEN_FIELD)
        else:
            write.set[OPEN_FIELD] = still_open.encode()
    seq = head.next_seq
    in_window = list(head.in_window)
    for chunk in closed:
        write.set[chunk_field(seq)] = Chunk(
            chunk.first_id, chunk.last_id, chunk.text, chunk.start, chunk.end, chunk.speakers,
            chunk.ts, seq=seq,
        ).encode()
        in_window.append((seq, chunk.end))
        seq += 1
    if closed:
        write.set[NEXT_FIELD] = seq
    first = head.first_seq
    while seq - first > max_chunks:
        name = chunk_field(first)
        if write.set.pop(name, None) is None:
            write.delete += [name, vector_field(first)]
        first += 1
    if first != head.first_seq:
        write.set[FIRST_FIELD] = first
    write.evicted = [s for s, end in in_window if s >= first and (horizon is None or
                                                                   end <= horizon)]
    still = [(s, end) for s, end in in_window if s >= first and s not in write.evicted]
    if still != head.in_window:
        if still:
            write.set[WINDOW_FIELD] = encode_window(still)
        else:
            write.delete.append(WINDOW_FIELD)
    return write
