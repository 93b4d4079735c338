"""Reading a stream's memory hash, and planning what one batch writes to it.

Writes are never sent from here: ``plan_write`` returns the fields to set and delete, and the
processor passes them to ``StateStore.commit`` as a ``HashUpdate``, so memory changes commit
with the batch, exactly once, and a fenced-out worker writes nothing. The plan depends only on
the previous memory and the batch's entries, so a replayed batch writes the same fields.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from sinkstream.contracts.keys import StreamKeys
from workers.memory.chunks import Turn, extend_chunks
from workers.memory.embedder import Embedder
from workers.memory.highlights import Moment
from workers.memory.records import (
    CHUNK_PREFIX,
    FIRST_FIELD,
    HEAD_FIELDS,
    MOMENTS_FIELD,
    NEXT_FIELD,
    OPEN_FIELD,
    SUMMARY_FIELD,
    Chunk,
    MemoryHead,
    MemoryRecordError,
    MemoryWrite,
    SummaryMemory,
    chunk_field,
    encode_moments,
)

log = logging.getLogger(__name__)


def read_head(client: redis.Redis, stream_id: str) -> MemoryHead:
    """The summary memory, open chunk and counters (one HMGET; the chunks stay in Redis)."""
    values: Any = client.hmget(StreamKeys.of(stream_id).memory, list(HEAD_FIELDS))
    try:
        return MemoryHead.from_fields(list(values))
    except (MemoryRecordError, ValueError, KeyError, TypeError) as exc:
        # memory is an aid, not the state: start it afresh rather than park the stream
        log.warning("stream %s: memory head unreadable (%s); starting it afresh", stream_id, exc)
        return MemoryHead()


def read_chunks(client: redis.Redis, stream_id: str) -> list[Chunk]:
    """Every stored closed chunk, oldest first (unreadable records are skipped).

    One HGETALL: the hash is bounded by ``memory_max_chunks`` (~1.6 MB at the defaults), and
    the least-privilege worker user (``deploy/redis/acl.conf``) has HGETALL, not HSCAN.
    """
    chunks: list[Chunk] = []
    fields: Any = client.hgetall(StreamKeys.of(stream_id).memory)
    prefix = CHUNK_PREFIX.encode()
    for name, value in fields.items():
        if not (name.startswith(prefix) if isinstance(name, bytes)
                else name.startswith(CHUNK_PREFIX)):
            continue
        try:
            chunks.append(Chunk.decode(value))
        except (MemoryRecordError, ValueError, KeyError, TypeError) as exc:
            log.warning("stream %s: skipping memory record %r (%s)", stream_id, name, exc)
    chunks.sort(key=lambda c: c.seq)
    return chunks


def plan_write(
    head: MemoryHead, turns: Sequence[Turn], *, chunk_tokens: int | None, max_chunks: int,
    embedder: Embedder | None, summary: SummaryMemory | None,
    moments: Sequence[Moment] | None = None,
) -> MemoryWrite:
    """The memory fields one batch sets and deletes.

    ``chunk_tokens`` None keeps no chunks (retrieval off); ``summary`` replaces the summary
    memory when the batch produced one. Beyond ``max_chunks`` the oldest chunks are deleted.
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
    vectors = embedder.embed_bytes([c.text for c in closed]) if embedder and closed \
        else [b""] * len(closed)
    seq = head.next_seq
    for chunk, vector in zip(closed, vectors, strict=True):
        write.set[chunk_field(seq)] = Chunk(
            chunk.first_id, chunk.last_id, chunk.text, chunk.start, chunk.end, chunk.speakers,
            chunk.ts, seq=seq, embedding=vector, embed_model=embedder.name if embedder else "",
        ).encode()
        seq += 1
    if closed:
        write.set[NEXT_FIELD] = seq
    first = head.first_seq
    while seq - first > max_chunks:
        name = chunk_field(first)
        if write.set.pop(name, None) is None:
            write.delete.append(name)
        first += 1
    if first != head.first_seq:
        write.set[FIRST_FIELD] = first
    return write
